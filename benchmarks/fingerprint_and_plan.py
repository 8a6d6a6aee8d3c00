"""Wall time of the federated fingerprint + plan vs. nnU-Net's own on the same pooled data, in one run.

    python benchmarks/fingerprint_and_plan.py [--size 64] [-np 2]

Builds the demo federation in a temporary folder (or uses $nnUNet_raw's Dataset501 with --existing),
then times, alternating to share the machine's noise:
  nnU-Net:    extract_fingerprint_dataset + plan_experiment_dataset(ExperimentPlanner) on the pooled folder
  fednnunet:  describe + per-site fingerprint + exact order-statistic rounds + merge + the same planner
and prints the ratio fednnunet / nnU-Net (below 1: faster).
"""
import argparse
import os
import tempfile
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('-np', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=2)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='fednnunet_bench_')
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[var] = os.path.join(work, var)
        os.makedirs(os.environ[var])
    os.environ.setdefault('nnUNet_n_proc_DA', '1')

    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, \
        plan_experiment_dataset

    from fednnunet import demo
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    from fednnunet.plan_and_preprocess import plan_and_preprocess

    folder = demo.build_demo_federation(501, size=args.size, verbose=False)
    fed = Federation.from_folder(folder)
    n_cases = sum(len(s.cases) for s in fed.sites.values())
    times = {'nnunet': [], 'fednnunet': []}
    for _ in range(args.repeats):
        os.environ['nnUNet_preprocessed'] = os.path.join(work, 'stock')
        os.makedirs(os.environ['nnUNet_preprocessed'], exist_ok=True)
        t = time.perf_counter()
        extract_fingerprint_dataset(501, num_processes=args.np, clean=True, verbose=False, show_progress_bar=False)
        plan_experiment_dataset(501, ExperimentPlanner)
        times['nnunet'].append(time.perf_counter() - t)

        os.environ['nnUNet_preprocessed'] = os.path.join(work, 'federated')
        os.makedirs(os.environ['nnUNet_preprocessed'], exist_ok=True)
        t = time.perf_counter()
        plan_and_preprocess(SimulationEngine.for_federation(fed, args.np), fed.dataset_name,
                            planner_name='ExperimentPlanner', preprocess=False)
        times['fednnunet'].append(time.perf_counter() - t)
    nn, fe = min(times['nnunet']), min(times['fednnunet'])
    print(f'demo federation: {len(fed.sites)} sites, {n_cases} cases, size {args.size}, -np {args.np}')
    print(f'nnU-Net fingerprint+plan (pooled): best of {args.repeats}: {nn:.2f} s  {times["nnunet"]}')
    print(f'fednnunet fingerprint+plan       : best of {args.repeats}: {fe:.2f} s  {times["fednnunet"]}')
    print(f'ratio fednnunet / nnU-Net: {fe / nn:.2f}')


if __name__ == '__main__':
    main()
