"""Sites with different modalities and per-site intensity drift: FedMM against its baselines, on one federation,
measured with every subset of the modalities.

    python benchmarks/multimodal.py [--size 64] [--rounds 20] [--local-iterations 50] [--methods ...]
                                    [--workdir W] [--report]

Builds the multimodal demo (``fednnunet_demo_data --multimodal``, Dataset506: A T1+T2+FLAIR, B T1+T2, C T1+FLAIR,
D T1; white-matter lesions visible in FLAIR only; per-site, per-contrast drift), plans it with the CPU preset and
trains, as a user runs them (``fednnunet_train``, nnU-Net's augmentation workers as nnU-Net picks them, seed 12345,
the same rounds and local iterations):

- ``fedmm``: an encoder per modality, each averaged over the sites that have it (``--method fedmm``);
- ``multifedavg``: FedAvg of nnU-Net's U-Net on the three channels, a site's missing ones zero-filled;
- ``fedavg_t1``: FedAvg on the channels every site has (T1): a copy of the federation with T1 only (Dataset507),
  planned on its own;
- ``local``: every site alone, on its own channels.

Then measures every model on every site's held-out test cases (imagesTs/labelsTs: every contrast, with the site's
drift), with nnU-Net's predictor and metrics, once per subset of the contrasts given to it: ``all`` (every contrast
the model takes: T1 for fedavg_t1, the site's own for local), ``own`` (the site's contrasts), and each contrast
alone. A model is not given a contrast it cannot take (fedavg_t1 without T1, a local model without the site's
contrasts): "n/a". Mean foreground Dice per site, pooled Dice from summed TP/FP/FN, and the lesion's pooled Dice.
Runs and evaluations already in the work folder are kept.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fedavg_gap import _fold, run_once  # noqa: E402 - the same runs and reading of their folders

from fednnunet.demo import LESION_LABEL, dataset_folder_name  # noqa: E402
from fednnunet.demo_multimodal import (MODALITIES, MULTIMODAL_DATASET_ID, MULTIMODAL_DATASET_NAME,  # noqa: E402
                                       test_cases)

COMMON_DATASET_ID = MULTIMODAL_DATASET_ID + 1
COMMON_DATASET_NAME = MULTIMODAL_DATASET_NAME + 'Common'
RUNS = {  # name: (method, dataset id)
    'fedmm': ('fedmm', MULTIMODAL_DATASET_ID),
    'multifedavg': ('multifedavg', MULTIMODAL_DATASET_ID),
    'fedavg_t1': ('fedavg', COMMON_DATASET_ID),
    'local': ('local', MULTIMODAL_DATASET_ID),
}
SUBSETS = ('all', 'own') + MODALITIES


def raw(work: str, dataset_id: int) -> str:
    name = MULTIMODAL_DATASET_NAME if dataset_id == MULTIMODAL_DATASET_ID else COMMON_DATASET_NAME
    return os.path.join(work, 'nnUNet_raw', dataset_folder_name(dataset_id, name))


def common_channel_copy(work: str):
    """Dataset507: the multimodal federation with only the channels every site has (T1), renumbered from 0, the
    test cases likewise; sites.json without 'channels'."""
    src, dst = raw(work, MULTIMODAL_DATASET_ID), raw(work, COMMON_DATASET_ID)
    if os.path.isdir(dst):
        return
    spec = json.load(open(os.path.join(src, 'sites.json')))
    common = [m for m in MODALITIES if all(m in e['channels'] for e in spec['sites'].values())]
    dataset_json = json.load(open(os.path.join(src, 'dataset.json')))
    tmp = dst + '.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ('imagesTr', 'imagesTs'):
        os.makedirs(os.path.join(tmp, sub))
        for f in sorted(os.listdir(os.path.join(src, sub))):
            case, code = f[:-len('.nii.gz')].rsplit('_', 1)
            name = dataset_json['channel_names'][str(int(code))]
            if name in common:
                shutil.copyfile(os.path.join(src, sub, f),
                                os.path.join(tmp, sub, f'{case}_{common.index(name):04d}.nii.gz'))
    for sub in ('labelsTr', 'labelsTs'):
        shutil.copytree(os.path.join(src, sub), os.path.join(tmp, sub))
    dataset_json.update(channel_names={str(i): m for i, m in enumerate(common)}, name=COMMON_DATASET_NAME,
                        description=dataset_json['description'] + f' This copy: only {"+".join(common)}.')
    json.dump(dataset_json, open(os.path.join(tmp, 'dataset.json'), 'w'), indent=2)
    json.dump({'sites': {s: {'cases': e['cases']} for s, e in spec['sites'].items()}},
              open(os.path.join(tmp, 'sites.json'), 'w'), indent=2)
    os.rename(tmp, dst)


def run(name: str, args, work: str, env: dict) -> float:
    method, dataset = RUNS[name]
    cmd = [os.path.join(os.path.dirname(sys.executable), 'fednnunet_train'), str(dataset), '3d_fullres', '0',
           '--method', method, '-p', 'nnUNetCPUPlans', '--rounds', str(args.rounds), '--local-iterations',
           str(args.local_iterations), '--val-iterations', str(args.val_iterations), '-device', args.device,
           '--overwrite']
    return run_once(name, cmd, os.path.join(work, f'results_{name}'), env)


def model_channels(name: str, own, spec: dict):
    """The contrasts a run's model takes at a site with the contrasts ``own``."""
    if RUNS[name][1] == COMMON_DATASET_ID:
        return [m for m in MODALITIES if all(m in e['channels'] for e in spec['sites'].values())]
    return list(own) if name == 'local' else list(MODALITIES)


def subset_channels(subset: str, takes, own):
    """The contrasts given to a model that takes ``takes`` at a site with ``own`` (``all``: every contrast it takes;
    ``own``: those of the site's it takes; a contrast alone only to a model that takes it); None: nothing to give."""
    wanted = {'all': MODALITIES, 'own': own}.get(subset, [subset])
    return [m for m in MODALITIES if m in wanted and m in takes] or None


def evaluate(name: str, work: str) -> dict:
    """{subset: {site: summary or None}} of the run's models on every site's test cases, cached in the run's
    folder."""
    results = os.path.join(work, f'results_{name}')
    cached = os.path.join(results, 'multimodal_evaluation.json')
    if os.path.isfile(cached):
        return json.load(open(cached))
    from fednnunet.evaluation import evaluate_cases
    from fednnunet.inference import load_predictor

    dataset = RUNS[name][1]
    folder = raw(work, dataset)
    spec = json.load(open(os.path.join(raw(work, MULTIMODAL_DATASET_ID), 'sites.json')))
    channel_index = {m: i for i, m in enumerate(json.load(open(os.path.join(folder, 'dataset.json')))
                                                   ['channel_names'].values())}
    base = os.path.dirname(_fold(results))
    out = {subset: {} for subset in SUBSETS}
    for site, entry in sorted(spec['sites'].items()):
        model = os.path.join(base, 'sites', site) if name == 'local' else base
        predictor = load_predictor(model, 0)
        takes = model_channels(name, entry['channels'], spec)
        cases = test_cases(folder, site)
        for subset in SUBSETS:
            given = subset_channels(subset, takes, entry['channels'])
            if given is None:
                out[subset][site] = None
                continue
            images = {c: [os.path.join(folder, 'imagesTs', f'{c}_{channel_index[m]:04d}.nii.gz')
                          for m in sorted(given, key=channel_index.get)] for c in cases}
            out[subset][site] = evaluate_cases(predictor, cases, images,
                                               {c: os.path.join(folder, 'labelsTs', f'{c}.nii.gz') for c in cases},
                                               os.path.join(results, 'multimodal_evaluation', subset, site))
            out[subset][site]['given'] = given
    json.dump(out, open(cached, 'w'))
    return out


def report(work: str, names):
    from fednnunet.evaluation import pooled_summary
    spec = json.load(open(os.path.join(raw(work, MULTIMODAL_DATASET_ID), 'sites.json')))
    sites = sorted(spec['sites'])
    print('\nsites: ' + ', '.join(f"{s} {len(spec['sites'][s]['cases'])} cases, "
                                  f"{'+'.join(spec['sites'][s]['channels'])}" for s in sites))
    print('\nmean foreground Dice on every site\'s held-out test cases (pooled: from summed TP/FP/FN over them), '
          'by the contrasts given to the model; lesion: its pooled Dice')
    print('| model | contrasts given | ' + ' | '.join(sites) + ' | pooled | lesion (pooled) | wall time |')
    print('|' + '---|' * (len(sites) + 5))
    lesion = str(LESION_LABEL)
    for name in names:
        done = os.path.join(work, f'results_{name}', 'done')
        if not os.path.isfile(done):
            continue
        ev = evaluate(name, work)
        seconds = json.load(open(done))['seconds']
        for subset in SUBSETS:
            per_site = ev[subset]
            if not any(per_site.values()):
                continue
            cells = [f"{per_site[s]['foreground_mean']['Dice']:.4f}" if per_site.get(s) else 'n/a' for s in sites]
            complete = all(per_site.get(s) for s in sites)
            pooled = pooled_summary({s: v for s, v in per_site.items() if v}) if complete else None
            pooled_cells = (f"{pooled['pooled_foreground_mean_dice']:.4f} | {pooled['pooled'][lesion]['Dice']:.4f}"
                            if pooled else 'n/a | n/a')
            print(f'| {name} | {subset} | ' + ' | '.join(cells) + f' | {pooled_cells} | {seconds:.0f} s |')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--rounds', type=int, default=20)
    p.add_argument('--local-iterations', type=int, default=50)
    p.add_argument('--val-iterations', type=int, default=10)
    p.add_argument('--device', default='cpu')
    p.add_argument('--test-sites', action='store_true', help="the tests' 3-site federation (a quick check)")
    p.add_argument('--methods', nargs='+', default=list(RUNS), choices=list(RUNS))
    p.add_argument('--workdir', default=None)
    p.add_argument('--report', action='store_true', help="only print the table of --workdir's runs")
    args = p.parse_args()
    work = os.path.abspath(args.workdir or f'multimodal_size{args.size}')
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
        subprocess.run([os.path.join(bin_dir, 'fednnunet_demo_data'), '--size', str(args.size), '--multimodal']
                       + (['--test-sites'] if args.test_sites else []), env=env, check=True,
                       stdout=subprocess.DEVNULL)
        common_channel_copy(work)
        for dataset in (MULTIMODAL_DATASET_ID, COMMON_DATASET_ID):
            subprocess.run([os.path.join(bin_dir, 'fednnunet_plan_and_preprocess'), '-d', str(dataset), '-c',
                            '3d_fullres', '-pl', 'nnUNetPlannerCPU', '-np', '2'], env=env, check=True,
                           stdout=subprocess.DEVNULL)
    for name in args.methods:
        seconds = run(name, args, work, env)
        print(f'{name}: {seconds:.0f} s', flush=True)
    report(work, args.methods)


if __name__ == '__main__':
    main()
