"""Cross-site generalization on an already trained federation: every model measured on every site's validation
cases (mean foreground Dice), in one run. Shows what per-site tables cannot: how a site's model does on the
other hospitals' scanners.

    python benchmarks/cross_site.py -d 501 -c 3d_fullres -p nnUNetCPUPlans --methods local fedavg centralized

Models: for methods with a global model, the global model; otherwise each site's personalized model (rows
"method/site").
"""
import argparse
import os
import tempfile

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('-d', default='501')
    parser.add_argument('-c', default='3d_fullres')
    parser.add_argument('-p', default='nnUNetCPUPlans')
    parser.add_argument('-f', default='0')
    parser.add_argument('--methods', nargs='+', default=['local', 'fedavg', 'centralized'])
    args = parser.parse_args()

    from fednnunet.evaluation import evaluate_cases
    from fednnunet.federation import Federation
    from fednnunet.inference import load_predictor
    from fednnunet.methods import CENTRALIZED, get_method
    from fednnunet.site_training import results_folder
    from fednnunet.trainers.centralized import CentralizedTrainer
    from fednnunet.site_worker import SiteWorker
    from fednnunet.site_training import validation_cases

    fed = Federation.from_raw(args.d)
    fold = args.f if args.f == 'all' else int(args.f)
    cases = {s: validation_cases(SiteWorker(site, fed.dataset_name), fold) for s, site in fed.sites.items()}
    models = {}
    for m in args.methods:
        trainer = CentralizedTrainer if m == CENTRALIZED else get_method(m).trainer
        base = results_folder(fed.dataset_name, trainer, args.p, args.c)
        if m == CENTRALIZED or get_method(m).has_global_model:
            models[m] = base
        else:
            models.update({f'{m}/{s}': os.path.join(base, 'sites', s) for s in fed.sites})
    out = tempfile.mkdtemp(prefix='cross_site_')
    table = {}
    for name, folder in models.items():
        predictor = load_predictor(folder, fold)
        for s, site in fed.sites.items():
            summary = evaluate_cases(predictor, cases[s], {c: site.image_files(c) for c in cases[s]},
                                     {c: site.label_file(c) for c in cases[s]},
                                     os.path.join(out, name.replace('/', '_'), s))
            table[name, s] = summary['foreground_mean']['Dice']
    sites = list(fed.sites)
    width = max(len(n) for n in models) + 2
    print('mean foreground Dice of each model (rows) on each site\'s validation cases (columns); '
          f'fold {args.f}, {args.c}')
    print(''.ljust(width) + ''.join(s.ljust(8) for s in sites) + 'mean')
    for name in models:
        row = [table[name, s] for s in sites]
        print(name.ljust(width) + ''.join(f'{v:.4f}'.ljust(8) for v in row) + f'{np.mean(row):.4f}')


if __name__ == '__main__':
    main()
