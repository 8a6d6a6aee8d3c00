"""Sites without labels, a server with a labelled public set: HSSF against its baselines, on one federation.

    python benchmarks/public_set.py [--size 64] [--rounds 20] [--local-iterations 50] [--methods ...]
                                    [--workdir W] [--report]

Builds the public-set demo (``fednnunet_demo_data --public-set``, Dataset505: site A with 2 labelled training
cases, sites B, C, D with none, every site 2 labelled validation-only cases, the server 8 labelled cases of a scanner
of its own, a network per participant), plans it with the CPU preset and trains, as a user runs them
(``fednnunet_train``, nnU-Net's augmentation workers as nnU-Net picks them, seed 12345), with the same rounds and
local iterations (and the server training as many iterations per round as a site):

- ``hssf``: every party its own network, predictions on the public patches exchanged after the warm-up;
- ``server_only``: hssf with the warm-up over every round and site A only: the server's model trains on the public
  set alone (and A on the public patches and its own labels; nothing is exchanged, no unlabelled case used);
- ``hssf_every_image``: hssf without its per-image gate (``image_threshold=0``): the pseudo-label term on every
  unlabelled patch;
- ``hssf_lr_1e-3``: hssf with AdamW at 10x the paper's learning rate (a short run's budget);
- ``fedavg``: FedAvg over the labelled data only: site A, and the public set at the server (``--server-iterations``);
- ``local``: site A alone, the only site with labels;
- ``fedfixmatch``: the homogeneous semi-supervised baseline: one shared network, every site's unlabelled cases
  pseudo-labelled (weak/strong views), the public set at the server.

Then measures every model as a site would use it on every site's validation cases (nnU-Net's predictor and
metrics; mean foreground Dice per site and pooled over all sites' validation cases): a method's global model where it
has one, else the site's own model (hssf), else the one model there is (local: A's). Runs and evaluations already in
the work folder are kept.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fedavg_gap import _fold, run_once  # noqa: E402 - the same runs and reading of their folders

from fednnunet.demo import PUBLIC_SET_DATASET_ID  # noqa: E402

RUNS = {  # name: (method, extra flags)
    'hssf': ('hssf', []),
    'server_only': ('hssf', ['--hp', 'warmup_rounds={rounds}', '--sites', 'A']),
    'hssf_every_image': ('hssf', ['--hp', 'image_threshold=0']),
    'hssf_lr_1e-3': ('hssf', ['--hp', 'lr=0.001']),
    'fedavg': ('fedavg', ['--sites', 'A', '--server-iterations', '{local_iterations}']),
    'local': ('local', ['--sites', 'A']),
    'fedfixmatch': ('fedfixmatch', ['--server-iterations', '{local_iterations}']),
}


def run(name: str, args, work: str, env: dict) -> float:
    method, extra = RUNS[name]
    cmd = [os.path.join(os.path.dirname(sys.executable), 'fednnunet_train'), str(PUBLIC_SET_DATASET_ID),
           '3d_fullres', '0', '--method', method, '-p', 'nnUNetCPUPlans', '--rounds', str(args.rounds),
           '--local-iterations', str(args.local_iterations), '--val-iterations', str(args.val_iterations),
           '-device', args.device, '--overwrite'] + [e.format(**vars(args)) for e in extra]
    return run_once(name, cmd, os.path.join(work, f'results_{name}'), env)


def raw_folder(work: str) -> str:
    (name,) = os.listdir(os.path.join(work, 'nnUNet_raw'))
    return os.path.join(work, 'nnUNet_raw', name)


def models_of(name: str, results: str, sites) -> dict:
    """{site: the model folder that site uses} (and 'server' for hssf's server model)."""
    base = os.path.dirname(_fold(results))
    if RUNS[name][0] == 'hssf':
        out = {s: os.path.join(base, 'sites', s) for s in sites if name != 'server_only'}
        out['server'] = os.path.join(base, 'sites', 'server')
        return out
    if RUNS[name][0] == 'local':
        return {s: os.path.join(base, 'sites', 'A') for s in sites}
    return {s: base for s in sites}


def evaluate(name: str, work: str) -> dict:
    """{model: {site: summary}} of the run's models on every site's validation cases, cached in the run's folder."""
    results = os.path.join(work, f'results_{name}')
    cached = os.path.join(results, 'public_set_evaluation.json')
    if os.path.isfile(cached):
        return json.load(open(cached))
    from fednnunet.evaluation import evaluate_cases
    from fednnunet.federation import Federation
    from fednnunet.inference import load_predictor

    fed = Federation.from_folder(raw_folder(work))
    models = models_of(name, results, fed.sites)
    models = {k: v for k, v in models.items() if os.path.isdir(v)}  # server_only trains site A only
    out = {}
    for owner, folder in models.items():
        predictor = load_predictor(folder, 0)
        targets = fed.sites if owner == 'server' else {owner: fed.sites[owner]}
        for s, site in targets.items():
            cases = list(site.validation)
            summary = evaluate_cases(predictor, cases, {c: site.image_files(c) for c in cases},
                                     {c: site.label_file(c) for c in cases},
                                     os.path.join(results, 'public_set_evaluation', owner, s))
            out.setdefault('server' if owner == 'server' else 'sites', {})[s] = summary
    json.dump(out, open(cached, 'w'))
    return out


def report(work: str, names):
    from fednnunet.evaluation import pooled_summary
    rows = []  # (label, run, {site: summary})
    for name in names:
        if not os.path.isfile(os.path.join(work, f'results_{name}', 'done')):
            continue
        ev = evaluate(name, work)
        if name == 'server_only':
            rows.append(('server_only', name, ev['server']))
            continue
        hssf = RUNS[name][0] == 'hssf'
        rows.append((name + (" (the sites' own models)" if hssf else ''), name, ev['sites']))
        if hssf:
            rows.append((f"{name}, the server's model", name, ev['server']))
    if not rows:
        return
    sites = sorted(rows[0][2])
    spec = json.load(open(os.path.join(raw_folder(work), 'sites.json')))
    print('\ncases per site (labelled training + unlabelled, validation; network): ' + ', '.join(
        f"{s} {len(spec['sites'][s]['cases'])} + {len(spec['sites'][s].get('unlabelled', []))}, "
        f"{len(spec['sites'][s]['validation'])}; {spec['sites'][s].get('network')}" for s in sites) +
        f"; server {len(spec['server']['cases'])} labelled; {spec['server'].get('network')}")
    print('\nmean foreground Dice on every site\'s validation cases (pooled: over all of them)')
    print('| model | ' + ' | '.join(sites) + ' | pooled | wall time |')
    print('|' + '---|' * (len(sites) + 3))
    for label, name, per_site in rows:
        pooled = pooled_summary(per_site)['pooled_foreground_mean_dice']
        seconds = json.load(open(os.path.join(work, f'results_{name}', 'done')))['seconds']
        print(f'| {label} | ' + ' | '.join(f"{per_site[s]['foreground_mean']['Dice']:.4f}" for s in sites) +
              f' | {pooled:.4f} | {seconds:.0f} s |')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--rounds', type=int, default=20)
    p.add_argument('--local-iterations', type=int, default=50)
    p.add_argument('--val-iterations', type=int, default=10)
    p.add_argument('--device', default='cpu')
    p.add_argument('--methods', nargs='+', default=list(RUNS), choices=list(RUNS))
    p.add_argument('--workdir', default=None)
    p.add_argument('--report', action='store_true', help="only print the table of --workdir's runs")
    args = p.parse_args()
    work = os.path.abspath(args.workdir or f'public_set_size{args.size}')
    env = dict(os.environ, nnUNet_raw=os.path.join(work, 'nnUNet_raw'),
               nnUNet_preprocessed=os.path.join(work, 'nnUNet_preprocessed'),
               nnUNet_results=os.path.join(work, 'results_planning'))
    os.environ.update(env)  # the evaluation runs nnU-Net in this process
    if args.report:
        report(work, args.methods)
        return
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.isdir(os.path.join(work, 'nnUNet_preprocessed')):
        os.makedirs(work, exist_ok=True)
        subprocess.run([os.path.join(bin_dir, 'fednnunet_demo_data'), '--size', str(args.size), '--public-set'],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([os.path.join(bin_dir, 'fednnunet_plan_and_preprocess'), '-d', str(PUBLIC_SET_DATASET_ID),
                        '-c', '3d_fullres', '-pl', 'nnUNetPlannerCPU', '-np', '2'], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    for name in args.methods:
        seconds = run(name, args, work, env)
        print(f'{name}: {seconds:.0f} s', flush=True)
    report(work, args.methods)


if __name__ == '__main__':
    main()
