"""What Flower costs per round: engine overhead and bytes, measured in one real run on 127.0.0.1.

    python benchmarks/flower_overhead.py [--sites 2] [--rounds 3] [--local-iterations 20] [--size 32]
                                         [--planner nnUNetPlannerCPU] [--device cpu] [--workdir DIR]

Builds the demo federation, plans it (simulation: planning is not what is measured), then trains fedavg over Flower:
a SuperLink and one SuperNode per site, each a separate process (fednnunet_server / fednnunet_site, --insecure on
127.0.0.1). Every site trains at the same time on this machine's cores.

Per round it prints
- the round's wall time at the server, the slowest site's training time (nnU-Net's epoch: validation + local
  iterations, as the site measures it) and the difference: the engine overhead, also as a fraction of the round;
- how that overhead splits: Flower (ClientApp process start and imports, polling, transfer: round wall time minus
  the slowest site's handler time) and the site's own setup around training (trainer construction, state
  load/save: handler time minus training time; the simulation engine pays this too);
- bytes sent to each site and received from it, as fednnunet's wire encoding and as Flower's payload (npy bytes of
  every array + the config strings; HTTP/protobuf framing not counted), against the size of the shared state (the
  model arrays a site receives).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np


def _start(args, env, log_path):
    log = open(log_path, 'ab')
    p = subprocess.Popen([sys.executable, '-m', 'fednnunet.flower_cli'] + args, env=env, stdout=log,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return p


def _stop(p):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(15)
            return
        except subprocess.TimeoutExpired:
            continue


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sites', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--local-iterations', type=int, default=20)
    parser.add_argument('--val-iterations', type=int, default=5)
    parser.add_argument('--size', type=int, default=32, help='demo volume size (32: tiny, 64: the demo)')
    parser.add_argument('--planner', default='nnUNetPlannerCPU')
    parser.add_argument('--configuration', default='3d_fullres')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--workdir', default=None)
    parser.add_argument('--report', metavar='FOLD_FOLDER', default=None,
                        help='only print the report of an earlier run (its results fold_0 folder)')
    args = parser.parse_args()
    if args.report:
        report(args.report, args, names=None, total=None)
        return

    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='flower_overhead_'))
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.makedirs(os.path.join(work, var), exist_ok=True)
        os.environ[var] = os.path.join(work, var)
    os.environ.setdefault('nnUNet_n_proc_DA', '0')
    os.environ.setdefault('nnUNet_def_n_proc', '1')

    from fednnunet.demo import DEFAULT_SITES, TEST_SITES, build_demo_federation, dataset_folder_name
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    from fednnunet.flower_cli import free_port
    from fednnunet.plan_and_preprocess import plan_and_preprocess

    sites = (TEST_SITES if args.size <= 32 else DEFAULT_SITES)[:args.sites]
    names = [s.name for s in sites]
    dataset = dataset_folder_name()
    if not os.path.isdir(os.path.join(work, 'nnUNet_raw', dataset)):
        build_demo_federation(raw_root=os.path.join(work, 'nnUNet_raw'), size=args.size, sites=sites, verbose=False)
    federation = Federation.from_raw(dataset)
    summary = plan_and_preprocess(SimulationEngine.for_federation(federation, 1), dataset, [args.configuration],
                                  args.planner)
    plans = summary['plans_identifier']

    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    results = os.path.join(work, f'nnUNet_results_{int(time.time())}')
    os.makedirs(results)
    env['nnUNet_results'] = results
    procs = []
    t0 = time.time()
    try:
        for name in names:
            procs.append(_start(['site', '--site', name, '-d', dataset, '--server', f'127.0.0.1:{port}', '--insecure',
                                 '-device', args.device, '-np', '1'],
                                dict(env, FLWR_HOME=os.path.join(work, f'flwr_{name}')),
                                os.path.join(work, f'site_{name}.log')))
        server = _start(['server', '-d', dataset, '--phase', 'train', '-p', plans, '-c', args.configuration,
                         '--method', 'fedavg', '--rounds', str(args.rounds), '--local-iterations',
                         str(args.local_iterations), '--val-iterations', str(args.val_iterations), '--no-val',
                         '--sites', *names, '--insecure', '--host', '127.0.0.1', '--port', str(port),
                         '--work-dir', os.path.join(work, 'server')],
                        dict(env, FLWR_HOME=os.path.join(work, 'flwr_server')), os.path.join(work, 'server.log'))
        procs.append(server)
        code = server.wait()
    finally:
        for p in procs:
            _stop(p)
    if code != 0:
        sys.exit(f'the Flower run failed; see {work}/server.log')
    total = time.time() - t0

    fold = os.path.join(results, dataset, f'FedAvgTrainer__{plans}__{args.configuration}', 'fold_0')
    report(fold, args, names, total)
    print(f'\nlogs and results: {work}')


def report(fold, args, names, total):
    rounds = json.load(open(os.path.join(fold, 'federation_log.json')))
    engine = json.load(open(os.path.join(fold, 'flower_messages.json')))
    fits = [m for m in engine['messages'] if m['kind'] == 'fit']

    names = names or engine['sites']
    print(f'fedavg over Flower: {len(names)} sites ({", ".join(names)}) on one machine ({os.cpu_count()} cores), '
          f'{len(rounds)} rounds; {fold}' + (f'; whole run incl. start-up {total:.0f} s' if total else ''))
    print('\nper round [s]: wall = the server\'s round; training = the slowest site\'s nnU-Net epoch; overhead = wall - '
          'training.\nThe last site to answer splits its time into: its setup around training (trainer, state load/'
          'save; paid in simulation too), ClientApp start (from its task to fednnunet\'s handler: process + imports where no '
          'process was kept ready, task input, bundle check), Flower polling + transfer; server = '
          'push, merge, logs.')
    print('round    wall  training  overhead  overhead/wall |  site setup  ClientApp start  polling+transfer  server')
    fractions, flower_parts = [], []
    for log, fit in zip(rounds, fits):
        training = max(s['seconds'] for s in log['sites'].values())
        last = max((s for s in fit['sites'] if fit['sites'][s].get('reply_seconds') is not None),
                   key=lambda s: fit['sites'][s]['reply_seconds'])
        f = fit['sites'][last]
        setup = f['handler_seconds'] - log['sites'][last]['seconds']
        start = f['process_seconds'] - f['handler_seconds']
        transfer = f['reply_seconds'] - f['process_seconds']
        server = log['seconds'] - f['reply_seconds']
        overhead = log['seconds'] - training
        fractions.append(overhead / log['seconds'])
        flower_parts.append((start + transfer) / log['seconds'])
        print(f"{log['round']:>5}  {log['seconds']:6.1f}  {training:8.1f}  {overhead:8.1f}  {overhead / log['seconds']:13.1%} |"
              f"  {setup:10.1f}  {start:15.1f}  {transfer:16.1f}  {server:6.1f}")
    print(f'mean engine overhead: {np.mean(fractions):.1%} of a round; Flower itself (ClientApp start + polling + '
          f'transfer): {np.mean(flower_parts):.1%}')

    print('\nbytes per site per round (fit request and reply):')
    print('round  site  shared state [B]  sent: wire [B]  sent: Flower [B]  sent/state  received: wire [B]  '
          'received: Flower [B]')
    ratios = []
    for fit in fits:
        r = fits.index(fit)
        for site, s in sorted(fit['sites'].items()):
            state = s['array_bytes_sent']
            ratios.append(s['flower_bytes_sent'] / state if state else float('nan'))
            print(f"{r:>5}  {site:>4}  {state:16d}  {s['bytes_sent']:14d}  {s['flower_bytes_sent']:16d}  "
                  f"{s['bytes_sent'] / state:10.4f}  {s.get('bytes_received', 0):18d}  "
                  f"{s.get('flower_bytes_received', 0):20d}")
    print(f'Flower payload sent / shared state: {np.nanmean(ratios):.4f} on average (1.0 = only the model)')
    default_network_bytes()


def default_network_bytes():
    """The same encodings for nnU-Net's default 3d_fullres network (6 stages, 32..320 features): what a site of a
    real task receives each round."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from fednnunet.engines.flower import flower_payload_size, to_record_dict
    from fednnunet.wire import encoded_size
    from fednnunet.trainers.fedavg import FedAvgTrainer
    from fednnunet.wire import Message
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from merge_time import ARCH
    net = get_network_from_plans('dynamic_network_architectures.architectures.unet.PlainConvUNet', ARCH,
                                 ('conv_op', 'norm_op', 'dropout_op', 'nonlin'), 1, 3, deep_supervision=True)
    sd = net.state_dict()
    state = {k: sd[k].numpy() for k in FedAvgTrainer.shared_keys(net)}
    message = Message('fit', {'method': 'fedavg', 'round': 0, 'site_index': 0, 'hyperparameters': {}}, state)
    t = time.perf_counter()
    payload = flower_payload_size(to_record_dict(message))
    t = time.perf_counter() - t
    print(f"nnU-Net's default 3d_fullres network ({message.nbytes / 2 ** 20:.0f} MiB shared state, {len(state)} arrays): "
          f"wire {encoded_size(message) / message.nbytes:.5f}x, Flower payload {payload / message.nbytes:.5f}x the state; "
          f"conversion to Flower records {t:.2f} s")


if __name__ == '__main__':
    main()
