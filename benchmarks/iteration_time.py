"""Time per local iteration: fednnunet's FederatedTrainer (FedAvg) vs. nnU-Net's nnUNetTrainer, same data, same
plans, same iterations, measured in one run (alternating, best of --repeats), with nnU-Net's default augmentation
workers and with none.

    python benchmarks/iteration_time.py [--size 64] [--epochs 3] [--iterations 100] [--val-iterations 20]
                                        [--sites 1 4] [--da default 0] [--repeats 2]

Both sides include everything a user waits for: nnU-Net's run_training (set-up, epochs, per-epoch checkpoints and
progress plot, final checkpoint) and fednnunet's rounds (validation, state written to disk, merge, server checkpoint
and plot), without the final validation. fednnunet runs twice: as it does by default (each site keeps its trainer
across rounds) and rebuilding every site's trainer every round (what a ClientApp process per message pays without
fednnunet's site daemon, and what fednnunet did before), so before/after is measured in the same run.

--da default: nnU-Net's own number of augmentation processes (nnUNet_n_proc_DA unset: nnU-Net's table, capped at
the machine's cores); --da 0: none (what the tests use). With 4 sites each site gets the same iterations per round;
time per iteration is the whole run over rounds x iterations x sites, against nnU-Net training site A.

Prints per setting: nnU-Net time / fednnunet time per iteration (goal >= 0.97), the same for the rebuilding path,
and fednnunet's fixed cost per round (round wall time minus the sites' nnU-Net epochs, which include their
validation; goal <= 1 s). The device is CUDA where the machine has it, else the CPU: the same command takes the GPU
figure (see documentation/performance.md).
"""
import argparse
import json
import os
import tempfile
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--iterations', type=int, default=100)
    parser.add_argument('--val-iterations', type=int, default=20)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--sites', type=int, nargs='+', default=[1, 4], choices=[1, 2, 3, 4])
    parser.add_argument('--da', nargs='+', default=['default', '0'], help="'default' (nnU-Net's) and/or a number")
    parser.add_argument('-c', default='3d_fullres')
    parser.add_argument('-pl', default='nnUNetPlannerCPU', choices=['nnUNetPlannerCPU', 'ExperimentPlanner'],
                        help="the planner (nnUNetPlannerCPU: tiny networks; nnU-Net's ExperimentPlanner on a GPU)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='fednnunet_bench_')
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[var] = os.path.join(work, var)
        os.makedirs(os.environ[var])
    os.environ['nnUNet_n_proc_DA'] = '0'  # planning and preprocessing; each measured setting sets its own

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    from fednnunet import demo
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation, server_folder, site_folder
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    from fednnunet.training_server import FederatedTraining, TrainingConfig

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    folder = demo.build_demo_federation(501, size=args.size, verbose=False)
    fed = Federation.from_folder(folder)
    plan_and_preprocess(SimulationEngine.for_federation(fed), fed.dataset_name, [args.c], args.pl)
    plans_name = {'nnUNetPlannerCPU': 'nnUNetCPUPlans', 'ExperimentPlanner': 'nnUNetPlans'}[args.pl]
    plans_file = join(server_folder(fed.dataset_name), plans_name + '.json')

    def nnunet_run():
        plans = load_json(plans_file)
        plans['continue_training'] = False
        trainer = nnUNetTrainer(plans, args.c, 0, load_json(join(server_folder(fed.dataset_name), 'dataset.json')),
                                torch.device(device))
        trainer.preprocessed_dataset_folder_base = site_folder(fed.dataset_name, 'A')
        trainer.preprocessed_dataset_folder = join(trainer.preprocessed_dataset_folder_base,
                                                   trainer.configuration_manager.data_identifier)
        trainer.num_epochs, trainer.num_iterations_per_epoch = args.epochs, args.iterations
        trainer.num_val_iterations_per_epoch = args.val_iterations
        t = time.perf_counter()
        trainer.run_training()
        return time.perf_counter() - t, None

    def fednnunet_run(sites, keep):
        federation = Federation.from_folder(folder, only_sites=fed.site_names[:sites])
        config = TrainingConfig(fed.dataset_name, args.c, 0, 'fedavg', plans_name, rounds=args.epochs,
                                local_iterations=args.iterations, val_iterations=args.val_iterations, validate=False)
        training = FederatedTraining(SimulationEngine.for_federation(federation, device=device, keep_trainers=keep),
                                     config)
        t = time.perf_counter()
        training.run(overwrite=True)
        elapsed = time.perf_counter() - t
        with open(join(training.output_folder, 'federation_log.json')) as f:
            rounds = json.load(f)
        fixed = [r['seconds'] - sum(s['seconds'] for s in r['sites'].values()) for r in rounds]
        return elapsed, fixed

    print(f'{args.c}, planner {args.pl}, demo size {args.size}, device {device}; {args.epochs} epochs/rounds x '
          f'{args.iterations} iterations (+{args.val_iterations} validation iterations each); torch threads '
          f'{torch.get_num_threads()}')
    for da in args.da:
        if da == 'default':
            os.environ.pop('nnUNet_n_proc_DA', None)
        else:
            os.environ['nnUNet_n_proc_DA'] = str(int(da))
        workers = get_allowed_n_proc_DA()
        for sites in args.sites:
            times = {'nnunet': [], 'kept': [], 'rebuilt': []}
            fixed = {'kept': [], 'rebuilt': []}
            for _ in range(args.repeats):
                times['nnunet'].append(nnunet_run()[0])
                for name, keep in (('kept', True), ('rebuilt', False)):
                    elapsed, per_round = fednnunet_run(sites, keep)
                    times[name].append(elapsed)
                    fixed[name].append(per_round)
            n = args.epochs * args.iterations
            nn_it = min(times['nnunet']) / n
            kept_it, rebuilt_it = (min(times[k]) / (n * sites) for k in ('kept', 'rebuilt'))
            best = {k: fixed[k][times[k].index(min(times[k]))] for k in fixed}
            print(f'\naugmentation processes {workers} ({"nnU-Net default" if da == "default" else "set"}), '
                  f'{sites} site(s):')
            print(f'  nnUNetTrainer          : {nn_it * 1000:.1f} ms per iteration '
                  f'(runs {[round(x, 1) for x in times["nnunet"]]} s)')
            for k, it in (('kept', kept_it), ('rebuilt', rebuilt_it)):
                print(f'  fednnunet, trainer {k:7s}: {it * 1000:.1f} ms per iteration '
                      f'(runs {[round(x, 1) for x in times[k]]} s); ratio nnU-Net / fednnunet {nn_it / it:.3f}; '
                      f'fixed cost per round {[round(x, 2) for x in best[k]]} s')
            print('  goal: ratio >= 0.97 with the kept trainer; fixed cost per round <= 1 s')


if __name__ == '__main__':
    main()
