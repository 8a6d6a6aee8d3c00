"""FedAvg against centralized nnU-Net on the demo federation: which part of the federated recipe closes the gap.

    python benchmarks/fedavg_gap.py [--size 64] [--rounds 20] [--local-iterations 50] [--variants A B ...]
                                    [--lesion] [--workdir W] [--report]

Every variant is one ``fednnunet_train`` run as a user runs it (nnU-Net's augmentation workers as nnU-Net picks
them, the CPU preset plans), seed 12345, on the same planned demo federation, each in its own nnUNet_results.
Budgets: every federated variant trains ``--rounds`` x ``--local-iterations`` steps per site (the variants that
trade rounds for iterations keep the product). Centralized nnU-Net gets (a) as many iterations per epoch as all
sites together per round (``--method centralized``) or (b) as many as one site per round (the FednnU-Net paper's
convention, ``--centralized-iterations``).

Prints one table (each site's and the pooled final validation Dice, nnU-Net's predictor on the site's fold-0
validation cases, and the gap to centralized a and b) and the pooled pseudo Dice against rounds; writes
``gap_against_rounds.png`` into the work folder. ``--report`` prints the table of an earlier run's work folder.
``--lesion``: the demo with a small class (every subject has one small white-matter lesion, label 3); the table
adds the lesion's Dice per site and pooled. A work folder that continues an ablation without rerunning the
centralized rows may hold ``reference.json`` ({"centralized_a": {"measured": "where from", "dice": {site: Dice,
"pooled": Dice}}, ...}, an earlier run's numbers on the same data); the table then says where its gaps come from.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from fednnunet.demo import DEMO_DATASET_ID, LESION_DATASET_ID, LESION_LABEL

#: name -> (what it changes, fednnunet_train arguments; {r} rounds, {i} local iterations)
VARIANTS = {
    'centralized_a': ('centralized nnU-Net, iterations per epoch = all sites per round',
                      ['--method', 'centralized', '--rounds', '{r}', '--local-iterations', '{i}']),
    'centralized_b': ('centralized nnU-Net, iterations per epoch = one site per round',
                      ['--method', 'centralized', '--rounds', '{r}', '--local-iterations', '{i}',
                       '--centralized-iterations', '{i}']),
    'fedavg': ('FedAvg (site momentum kept across rounds, case-weighted)',
               ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}']),
    'reset_momentum': ("FedAvg, the sites' SGD momentum reset every round",
                       ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}',
                        '--hp', 'reset_momentum=1']),
    'uniform': ('FedAvg, uniform instead of case-weighted averaging',
                ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}', '--weighting', 'uniform']),
    'fedavgm': ('FedAvgM: server momentum 0.5, server lr 1',
                ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}', '--server-optimizer',
                 'momentum', '--server-momentum', '0.5']),
    'server_lr2': ("FedAvg with server lr 2 (FedAvgM with momentum 0): the global model takes twice the sites' "
                   "mean step",
                   ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}', '--server-optimizer',
                    'momentum', '--server-momentum', '0', '--server-lr', '2']),
    'fedadam': ('FedAdam: server lr 0.01, beta1 0.9, beta2 0.99, tau 0.001',
                ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}', '--server-optimizer', 'adam']),
    'fedyogi': ('FedYogi: server lr 0.01, beta1 0.9, beta2 0.99, tau 0.001',
                ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}', '--server-optimizer', 'yogi']),
    'local': ('local training only (every site alone, same steps)',
              ['--method', 'local', '--rounds', '{r}', '--local-iterations', '{i}']),
    'fedavg_seed2': ('FedAvg again with another seed (the run-to-run noise)',
                     ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}', '--seed', '2']),
    'more_rounds': ('FedAvg, twice the rounds with half the iterations each',
                    ['--method', 'fedavg', '--rounds', '{r2}', '--local-iterations', '{i_half}']),
    'fewer_rounds': ('FedAvg, half the rounds with twice the iterations each',
                     ['--method', 'fedavg', '--rounds', '{r_half}', '--local-iterations', '{i2}']),
    'fedavg_2x': ('FedAvg, the second budget: twice the rounds',
                  ['--method', 'fedavg', '--rounds', '{r2}', '--local-iterations', '{i}']),
    'centralized_a_2x': ('centralized nnU-Net (a), twice the epochs',
                         ['--method', 'centralized', '--rounds', '{r2}', '--local-iterations', '{i}']),
    'centralized_b_2x': ('centralized nnU-Net (b), twice the epochs',
                         ['--method', 'centralized', '--rounds', '{r2}', '--local-iterations', '{i}',
                          '--centralized-iterations', '{i}']),
    'local_2x': ('local training only, the second budget: twice the rounds',
                 ['--method', 'local', '--rounds', '{r2}', '--local-iterations', '{i}']),
    'fedavg_2x_iterations': ('FedAvg, the second budget: twice the iterations per round',
                             ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i2}']),
    'fedadam_lr0.1': ('FedAdam: server lr 0.1, beta1 0.9, beta2 0.99, tau 0.001',
                      ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}', '--server-optimizer',
                       'adam', '--server-lr', '0.1']),
    'fedadam_lr0.03': ('FedAdam: server lr 0.03, beta1 0.9, beta2 0.99, tau 0.001',
                       ['--method', 'fedavg', '--rounds', '{r}', '--local-iterations', '{i}', '--server-optimizer',
                        'adam', '--server-lr', '0.03']),
}

#: the variants of the second budget (twice the steps per site); their gaps are to the centralized runs of that budget
SECOND_BUDGET = ('fedavg_2x', 'fedavg_2x_iterations', 'local_2x', 'centralized_a_2x', 'centralized_b_2x')


def reference_names(name: str) -> tuple:
    """The centralized runs (a, b) of the budget that ``name`` trains on."""
    return ('centralized_a_2x', 'centralized_b_2x') if name in SECOND_BUDGET else ('centralized_a', 'centralized_b')


def run_variant(name: str, args, work: str, env: dict) -> float:
    fill = {'r': args.rounds, 'i': args.local_iterations, 'r2': 2 * args.rounds, 'i_half': args.local_iterations // 2,
            'r_half': max(1, args.rounds // 2), 'i2': 2 * args.local_iterations}
    argv = [a.format(**fill) for a in VARIANTS[name][1]]
    cmd = [os.path.join(os.path.dirname(sys.executable), 'fednnunet_train'), str(args.dataset), '3d_fullres', '0',
           '-p', 'nnUNetCPUPlans', '--val-iterations', str(args.val_iterations), '-device', args.device,
           '--overwrite', *argv]
    return run_once(name, cmd, os.path.join(work, f'results_{name}'), env)


def run_once(name: str, cmd: list, results: str, env: dict) -> float:
    """Runs ``cmd`` with nnUNet_results=``results`` (its output in results/train.log) unless results/done says it
    ran; returns its wall time in seconds."""
    done = os.path.join(results, 'done')
    if os.path.isfile(done):
        return json.load(open(done))['seconds']
    os.makedirs(results, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(results, 'train.log'), 'w') as log:
        finished = subprocess.run(cmd, env=dict(env, nnUNet_results=results), stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        sys.exit(f'{name} failed; see {results}/train.log')
    seconds = time.time() - t0
    json.dump({'seconds': seconds, 'command': cmd}, open(done, 'w'))
    return seconds


def _fold(results: str) -> str:
    (dataset,) = [os.path.join(results, d) for d in os.listdir(results) if d.startswith('Dataset')]
    (trainer,) = [d for d in os.listdir(dataset) if '__' in d]
    return os.path.join(dataset, trainer, 'fold_0')


def final_dice(results: str) -> dict:
    """{site: mean foreground Dice, 'pooled': pooled foreground Dice} of the final validation; with a lesion class
    also {'lesion': {site: its mean Dice, 'pooled': its pooled Dice}}."""
    fold = _fold(results)
    name = 'centralized_summary.json' if os.path.isfile(os.path.join(fold, 'centralized_summary.json')) else \
        'federated_summary.json'
    summary = json.load(open(os.path.join(fold, name)))['final_validation']
    out = {site: s['foreground_mean']['Dice'] for site, s in summary['per_site'].items()}
    out['pooled'] = summary['pooled_foreground_mean_dice']
    lesion = str(LESION_LABEL)
    if lesion in summary['pooled']:
        out['lesion'] = {site: s[lesion]['Dice'] for site, s in summary['per_site'].items()}
        out['lesion']['pooled'] = summary['pooled'][lesion]['Dice']
    return out


def pseudo_dice_curve(results: str) -> list:
    """The pooled pseudo Dice per round (federated: the server's log; centralized: nnU-Net's per epoch)."""
    fold = _fold(results)
    log = os.path.join(fold, 'federation_log.json')
    if os.path.isfile(log):
        return [r['mean_pooled_pseudo_dice'] for r in json.load(open(log))]
    from fednnunet.inference import load_checkpoint
    return list(load_checkpoint(os.path.join(fold, 'checkpoint_final.pth'))['logging']['mean_fg_dice'])


def report(work: str, names, rounds: int):
    rows = {n: final_dice(os.path.join(work, f'results_{n}')) for n in names
            if os.path.isfile(os.path.join(work, f'results_{n}', 'done'))}
    sites = sorted(k for k in next(iter(rows.values())) if k not in ('pooled', 'lesion'))
    with_lesion = all('lesion' in d for d in rows.values())
    ref = {k: rows.get(k) for k in ('centralized_a', 'centralized_b', 'centralized_a_2x', 'centralized_b_2x')}
    earlier = os.path.join(work, 'reference.json')
    if None in ref.values() and os.path.isfile(earlier):
        # the centralized rows of an earlier run of this script on the same data (its final_dice output), for a
        # work folder that continues the ablation without repeating them; the table says so
        kept = json.load(open(earlier))
        for k in ref:
            if ref[k] is None and k in kept:
                ref[k] = kept[k]['dice']
                print(f"gap to {k}: from {earlier} ({kept[k]['measured']})")
    print('\nfinal validation, mean foreground Dice (pooled: over all validation cases); gap = variant - centralized '
          '(a, b) of its budget (the second budget\'s rows: to centralized_a_2x, centralized_b_2x)')
    head = '| variant | ' + ' | '.join(sites) + ' | pooled | gap to a (pooled, worst site) | gap to b (pooled, worst site) |'
    if with_lesion:
        head += ' lesion Dice: ' + ', '.join(sites) + ', pooled |'
    print(head)
    print('|' + '---|' * (len(sites) + 4 + with_lesion))
    for n, d in rows.items():
        gaps = []
        for key in reference_names(n):
            if ref[key] is None or n == key:
                gaps.append('')
                continue
            worst = min(sites, key=lambda s: d[s] - ref[key][s])
            gaps.append(f"{d['pooled'] - ref[key]['pooled']:+.4f}, {d[worst] - ref[key][worst]:+.4f} ({worst})")
        lesion = ''
        if with_lesion:
            lesion = ' ' + ', '.join(f"{d['lesion'][s]:.3f}" for s in sites + ['pooled']) + ' |'
        print(f"| {n}: {VARIANTS[n][0]} | " + ' | '.join(f'{d[s]:.4f}' for s in sites) +
              f" | {d['pooled']:.4f} | {gaps[0]} | {gaps[1]} |{lesion}")
    seconds = {n: json.load(open(os.path.join(work, f'results_{n}', 'done')))['seconds'] for n in rows}
    print('\nwall time per run [s]: ' + ', '.join(f'{n} {s:.0f}' for n, s in seconds.items()))

    curves = {n: pseudo_dice_curve(os.path.join(work, f'results_{n}')) for n in rows}
    print('\npooled pseudo Dice against rounds (epochs for centralized; the variants with other round counts are '
          'shown at the same share of their training):')
    marks = [max(1, round(rounds * f)) for f in (0.25, 0.5, 0.75, 1.0)]
    print('| variant | ' + ' | '.join(f'{m / rounds:.0%} ({m} rounds)' for m in marks) + ' |')
    print('|' + '---|' * (len(marks) + 1))
    for n, c in curves.items():
        vals = [np.nanmean(c[max(0, round(len(c) * m / rounds) - 2):round(len(c) * m / rounds)]) for m in marks]
        print(f'| {n} | ' + ' | '.join(f'{v:.4f}' for v in vals) + ' |')
    import matplotlib
    matplotlib.use('agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for n, c in curves.items():
        x = np.linspace(1, rounds, len(c))
        ax.plot(x, c, label=n, lw=2.5 if n.startswith('centralized') else 1.2,
                ls='-' if n in ('fedavg',) or n.startswith('centralized') else '--')
    ax.set_xlabel(f'training progress (rounds of {rounds}; centralized: epochs)')
    ax.set_ylabel('pooled pseudo Dice (validation patches)')
    ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(os.path.join(work, 'gap_against_rounds.png'), dpi=90)
    print(f"\nplot: {os.path.join(work, 'gap_against_rounds.png')}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--lesion', action='store_true',
                   help="the demo with a small class (fednnunet_demo_data --lesion, dataset 503): the table adds "
                        "the lesion's Dice")
    p.add_argument('--rounds', type=int, default=20)
    p.add_argument('--local-iterations', type=int, default=50)
    p.add_argument('--val-iterations', type=int, default=10)
    p.add_argument('--device', default='cpu')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--workdir', default=None)
    p.add_argument('--report', action='store_true', help="only print the table of --workdir's runs")
    args = p.parse_args()
    args.dataset = LESION_DATASET_ID if args.lesion else DEMO_DATASET_ID
    work = os.path.abspath(args.workdir or f"fedavg_gap{'_lesion' if args.lesion else ''}_size{args.size}")
    if args.report:
        report(work, args.variants, args.rounds)
        return
    env = dict(os.environ, nnUNet_raw=os.path.join(work, 'nnUNet_raw'),
               nnUNet_preprocessed=os.path.join(work, 'nnUNet_preprocessed'))
    bin_dir = os.path.dirname(sys.executable)
    preprocessed = os.path.join(work, 'nnUNet_preprocessed')
    planned = os.path.isdir(preprocessed) and any(d.startswith(f'Dataset{args.dataset}_')
                                                  for d in os.listdir(preprocessed))
    if not planned:
        os.makedirs(work, exist_ok=True)
        dataset = ['-d', str(args.dataset)]
        subprocess.run([os.path.join(bin_dir, 'fednnunet_demo_data'), *dataset, '--size', str(args.size)]
                       + ['--lesion'] * args.lesion, env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([os.path.join(bin_dir, 'fednnunet_plan_and_preprocess'), *dataset, '-c', '3d_fullres',
                        '-pl', 'nnUNetPlannerCPU', '-np', '2'], env=dict(env, nnUNet_results=os.path.join(
                            work, 'results_planning')), check=True, stdout=subprocess.DEVNULL)
    for name in args.variants:
        seconds = run_variant(name, args, work, env)
        print(f'{name}: {seconds:.0f} s; {final_dice(os.path.join(work, f"results_{name}"))}', flush=True)
    report(work, args.variants, args.rounds)


if __name__ == '__main__':
    main()
