"""Does a site's unlabelled data help? Semi-supervised FedAvg (fedfixmatch) against its supervised baselines.

    python benchmarks/semi_supervised.py [--labelled-per-site 2] [--size 64] [--rounds 20] [--local-iterations 50]
                                         [--methods local fedavg fedfixmatch] [--workdir W] [--report]

Builds the semi-supervised demo federation (``fednnunet_demo_data --labelled-per-site N``, Dataset504: the demo's
cases, at every site only the first N labelled, the rest unlabelled), plans it with the CPU preset, and trains
every method as a user runs it (``fednnunet_train``, nnU-Net's augmentation workers as nnU-Net picks them, seed
12345) with the same rounds and local iterations. The supervised methods see the labelled cases only; fedfixmatch
also trains on the unlabelled ones. Prints each site's and the pooled final validation Dice (nnU-Net's predictor
on the site's labelled fold-0 validation cases) and, for fedfixmatch, each site's unlabelled term and share of
confident voxels in the last round. Runs already done in the work folder are kept.
"""
import argparse
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fedavg_gap import _fold, final_dice, run_once  # noqa: E402 - the same runs and reading of their summaries

from fednnunet.demo import SEMI_SUPERVISED_DATASET_ID  # noqa: E402


def run(method: str, args, work: str, env: dict) -> float:
    cmd = [os.path.join(os.path.dirname(sys.executable), 'fednnunet_train'), str(SEMI_SUPERVISED_DATASET_ID),
           '3d_fullres', '0', '--method', method, '-p', 'nnUNetCPUPlans', '--rounds', str(args.rounds),
           '--local-iterations', str(args.local_iterations), '--val-iterations', str(args.val_iterations),
           '-device', args.device, '--overwrite']
    return run_once(method, cmd, os.path.join(work, f'results_{method}'), env)


def last_unlabelled_term(results: str) -> dict:
    """{site: (L_u, share of confident voxels)} of the last round that had the term, from each site's log."""
    sites = os.path.join(os.path.dirname(_fold(results)), 'sites')
    out = {}
    for site in sorted(os.listdir(sites)):
        log = open(os.path.join(sites, site, 'fold_0', 'training_log.txt')).read()
        found = re.findall(r'unlabelled term over \d+ steps: loss ([0-9.]+), confident voxels ([0-9.]+)%', log)
        if found:
            out[site] = (float(found[-1][0]), float(found[-1][1]) / 100)
    return out


def report(work: str, methods):
    rows = {m: final_dice(os.path.join(work, f'results_{m}')) for m in methods
            if os.path.isfile(os.path.join(work, f'results_{m}', 'done'))}
    sites = sorted(k for k in next(iter(rows.values())) if k != 'pooled')
    spec = json.load(open(os.path.join(work, 'nnUNet_raw', os.listdir(os.path.join(work, 'nnUNet_raw'))[0],
                                       'sites.json')))['sites']
    print('\ncases per site (labelled + unlabelled): ' + ', '.join(
        f"{s} {len(spec[s]['cases'])} + {len(spec[s].get('unlabelled', []))}" for s in sites))
    print('\nfinal validation, mean foreground Dice (pooled: over all validation cases)')
    print('| method | ' + ' | '.join(sites) + ' | pooled | wall time |')
    print('|' + '---|' * (len(sites) + 3))
    for m, d in rows.items():
        seconds = json.load(open(os.path.join(work, f'results_{m}', 'done')))['seconds']
        print(f'| {m} | ' + ' | '.join(f'{d[s]:.4f}' for s in sites) + f" | {d['pooled']:.4f} | {seconds:.0f} s |")
    for m in rows:
        term = last_unlabelled_term(os.path.join(work, f'results_{m}'))
        if term:
            print(f'\n{m}, last round: ' + ', '.join(f'{s} L_u {lu:.4f}, confident voxels {share:.1%}'
                                                   for s, (lu, share) in term.items()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--labelled-per-site', type=int, default=2)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--rounds', type=int, default=20)
    p.add_argument('--local-iterations', type=int, default=50)
    p.add_argument('--val-iterations', type=int, default=10)
    p.add_argument('--device', default='cpu')
    p.add_argument('--methods', nargs='+', default=['local', 'fedavg', 'fedfixmatch'])
    p.add_argument('--workdir', default=None)
    p.add_argument('--report', action='store_true', help="only print the table of --workdir's runs")
    args = p.parse_args()
    work = os.path.abspath(args.workdir or f'semi_supervised_size{args.size}_labelled{args.labelled_per_site}')
    if args.report:
        report(work, args.methods)
        return
    env = dict(os.environ, nnUNet_raw=os.path.join(work, 'nnUNet_raw'),
               nnUNet_preprocessed=os.path.join(work, 'nnUNet_preprocessed'))
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.isdir(os.path.join(work, 'nnUNet_preprocessed')):
        os.makedirs(work, exist_ok=True)
        subprocess.run([os.path.join(bin_dir, 'fednnunet_demo_data'), '--size', str(args.size),
                        '--labelled-per-site', str(args.labelled_per_site)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([os.path.join(bin_dir, 'fednnunet_plan_and_preprocess'), '-d', str(SEMI_SUPERVISED_DATASET_ID),
                        '-c', '3d_fullres', '-pl', 'nnUNetPlannerCPU', '-np', '2'],
                       env=dict(env, nnUNet_results=os.path.join(work, 'results_planning')), check=True,
                       stdout=subprocess.DEVNULL)
    for m in args.methods:
        seconds = run(m, args, work, env)
        print(f'{m}: {seconds:.0f} s; {final_dice(os.path.join(work, f"results_{m}"))}', flush=True)
    report(work, args.methods)


if __name__ == '__main__':
    main()
