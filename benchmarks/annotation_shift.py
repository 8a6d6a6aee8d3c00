"""Do personalized methods help when sites annotate differently? One run, per-site Dice of several methods.

    python benchmarks/annotation_shift.py --source 501 --target 502 [--shifted B D] [--voxels 1]
        [--methods local fedavg fedrep lcfed feddp] [--rounds 20] [--local-iterations 50] [--stage2-rounds 4]

The demo federation's sites differ like scanners (intensity scale, gamma, bias field, noise, spacing) but every
site draws the same anatomical boundary. The papers behind the personalized methods (LC-Fed, FedDP) target sites
whose *labels* differ too. This script copies the demo federation ``--source`` (already built, under
``$nnUNet_raw``) into ``--target`` and changes the annotation protocol at the ``--shifted`` sites: their grey
matter is drawn ``--voxels`` voxels thicker, into the white matter (a binary dilation of the GM label restricted
to WM voxels). Images are unchanged. It then plans (CPU preset), trains every method with the same rounds and
seed, and prints each method's final per-site validation Dice (each site against its own protocol) and the mean
over shifted and unshifted sites.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np


def shift_annotation(source_raw: str, target_raw: str, shifted_sites, voxels: int):
    import SimpleITK as sitk
    from scipy.ndimage import binary_dilation
    with open(os.path.join(source_raw, 'sites.json')) as f:
        sites = json.load(f)['sites']
    if os.path.isdir(target_raw):
        shutil.rmtree(target_raw)
    shutil.copytree(source_raw, target_raw)
    changed = 0
    for site in shifted_sites:
        if site not in sites:
            raise SystemExit(f'site {site!r} is not in {source_raw}/sites.json ({sorted(sites)})')
        for case in sites[site]['cases']:
            path = os.path.join(target_raw, 'labelsTr', case + '.nii.gz')
            image = sitk.ReadImage(path)
            seg = sitk.GetArrayFromImage(image)
            grown = binary_dilation(seg == 1, iterations=voxels) & (seg == 2)
            seg[grown] = 1
            changed += int(grown.sum())
            out = sitk.GetImageFromArray(seg)
            out.CopyInformation(image)
            sitk.WriteImage(out, path)
    return changed


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--source', type=int, default=501)
    p.add_argument('--target', type=int, default=502)
    p.add_argument('--shifted', nargs='+', default=['B', 'D'])
    p.add_argument('--voxels', type=int, default=1)
    p.add_argument('--methods', nargs='+', default=['local', 'fedavg', 'fedrep', 'lcfed', 'feddp'])
    p.add_argument('--rounds', type=int, default=20)
    p.add_argument('--local-iterations', type=int, default=50)
    p.add_argument('--stage2-rounds', type=int, default=4)
    p.add_argument('--device', default='cpu')
    args = p.parse_args()

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    raw = os.environ['nnUNet_raw']
    source_name = maybe_convert_to_dataset_name(args.source)
    target_name = f'Dataset{args.target:03d}_{source_name.split("_", 1)[1]}AnnotationShift'
    changed = shift_annotation(os.path.join(raw, source_name), os.path.join(raw, target_name), args.shifted,
                               args.voxels)
    print(f'{target_name}: sites {args.shifted} annotate grey matter {args.voxels} voxel(s) thicker '
          f'({changed} voxels relabelled WM -> GM)', flush=True)
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, nnUNet_n_proc_DA=os.environ.get('nnUNet_n_proc_DA', '0'))
    subprocess.run([os.path.join(bindir, 'fednnunet_plan_and_preprocess'), '-d', str(args.target), '-c',
                    '3d_fullres', '-pl', 'nnUNetPlannerCPU', '-np', '2'], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    from fednnunet.methods import get_method
    from fednnunet.site_training import results_folder
    table = {}
    for method in args.methods:
        cmd = [os.path.join(bindir, 'fednnunet_train'), str(args.target), '3d_fullres', '0', '--method', method,
               '-p', 'nnUNetCPUPlans', '--rounds', str(args.rounds), '--local-iterations',
               str(args.local_iterations), '--val-iterations', '10', '-device', args.device]
        if method in ('lcfed', 'feddp'):
            cmd += ['--stage2-rounds', str(args.stage2_rounds)]
        print(' '.join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        folder = results_folder(target_name, get_method(method).trainer, 'nnUNetCPUPlans', '3d_fullres')
        with open(os.path.join(folder, 'fold_0', 'federated_summary.json')) as f:
            per_site = json.load(f)['final_validation']['per_site']
        table[method] = {s: float(r['foreground_mean']['Dice']) for s, r in per_site.items()}
        print(f'  {method}: ' + ', '.join(f'{s} {d:.4f}' for s, d in sorted(table[method].items())), flush=True)

    sites = sorted(next(iter(table.values())))
    print('\nmean foreground Dice of the final model at each site (its own validation cases, its own protocol); '
          f'shifted: {args.shifted}')
    print('method'.ljust(10) + ''.join(s.rjust(8) for s in sites) + '  shifted  unshifted')
    for method, row in table.items():
        shifted = np.mean([row[s] for s in sites if s in args.shifted])
        unshifted = np.mean([row[s] for s in sites if s not in args.shifted])
        print(method.ljust(10) + ''.join(f'{row[s]:8.4f}' for s in sites) + f'  {shifted:7.4f}  {unshifted:9.4f}')


if __name__ == '__main__':
    main()
