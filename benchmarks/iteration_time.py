"""Time per local iteration: fednnunet's FederatedTrainer (FedAvg, one site) vs. nnU-Net's nnUNetTrainer, same data,
same plans, same iterations, measured in one run (alternating, best of --repeats).

    python benchmarks/iteration_time.py [--size 64] [--epochs 3] [--iterations 100] [--val-iterations 20]

Both sides include everything a user waits for: nnU-Net's run_training (set-up, epochs, per-epoch checkpoints and
progress plot, final checkpoint) and fednnunet's rounds (trainer set-up per round, validation, state kept on disk,
merge, server checkpoint and plot), without the final validation. Prints nnU-Net time / fednnunet time per
iteration (goal >= 0.97).
"""
import argparse
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
    parser.add_argument('-c', default='3d_fullres')
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='fednnunet_bench_')
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[var] = os.path.join(work, var)
        os.makedirs(os.environ[var])
    os.environ.setdefault('nnUNet_n_proc_DA', '0')

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from fednnunet import demo
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation, server_folder, site_folder
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    from fednnunet.training_server import FederatedTraining, TrainingConfig

    folder = demo.build_demo_federation(501, size=args.size, verbose=False)
    fed = Federation.from_folder(folder)
    plan_and_preprocess(SimulationEngine.for_federation(fed), fed.dataset_name, [args.c], 'nnUNetPlannerCPU')
    one_site = Federation.from_folder(folder, only_sites=['A'])
    plans_file = join(server_folder(fed.dataset_name), 'nnUNetCPUPlans.json')

    def nnunet_run():
        plans = load_json(plans_file)
        plans['continue_training'] = False
        trainer = nnUNetTrainer(plans, args.c, 0, load_json(join(server_folder(fed.dataset_name), 'dataset.json')),
                                torch.device('cpu'))
        trainer.preprocessed_dataset_folder_base = site_folder(fed.dataset_name, 'A')
        trainer.preprocessed_dataset_folder = join(trainer.preprocessed_dataset_folder_base,
                                                   trainer.configuration_manager.data_identifier)
        trainer.num_epochs, trainer.num_iterations_per_epoch = args.epochs, args.iterations
        trainer.num_val_iterations_per_epoch = args.val_iterations
        t = time.perf_counter()
        trainer.run_training()
        return time.perf_counter() - t

    def fednnunet_run():
        config = TrainingConfig(fed.dataset_name, args.c, 0, 'fedavg', 'nnUNetCPUPlans', rounds=args.epochs,
                                local_iterations=args.iterations, val_iterations=args.val_iterations, validate=False)
        t = time.perf_counter()
        FederatedTraining(SimulationEngine.for_federation(one_site, device='cpu'), config).run(overwrite=True)
        return time.perf_counter() - t

    times = {'nnunet': [], 'fednnunet': []}
    for _ in range(args.repeats):
        times['nnunet'].append(nnunet_run())
        times['fednnunet'].append(fednnunet_run())
    n = args.epochs * args.iterations
    nn_it, fed_it = min(times['nnunet']) / n, min(times['fednnunet']) / n
    print(f'{args.c}, CPU preset, demo size {args.size}, site A; {args.epochs} epochs/rounds x {args.iterations} '
          f'iterations (+{args.val_iterations} validation iterations each); torch threads {torch.get_num_threads()}')
    print(f'nnUNetTrainer   : {nn_it * 1000:.1f} ms per iteration (runs: {[round(x, 1) for x in times["nnunet"]]} s)')
    print(f'FederatedTrainer: {fed_it * 1000:.1f} ms per iteration (runs: {[round(x, 1) for x in times["fednnunet"]]} s)')
    print(f'ratio nnU-Net / fednnunet time per iteration: {nn_it / fed_it:.3f} (goal >= 0.97)')


if __name__ == '__main__':
    main()
