"""Which models have been trained for a dataset: nnU-Net's results layout
(``$nnUNet_results/DatasetXXX/<Trainer>__<plans>__<configuration>/``) read back as fednnunet methods, so that a
command asking for a model that does not exist can say which ones do, and with which flags.
Imports nothing heavy (no torch, no trainers: trainer class names come from :mod:`fednnunet.method_names`)."""
import os
from typing import Dict, List, Optional

from nnunetv2.paths import nnUNet_results

from fednnunet.method_names import method_of_trainer_name

FOLDS = ('0', '1', '2', '3', '4', 'all')
FINAL = 'checkpoint_final.pth'


def _folds_with(folder: str, checkpoint: str) -> List[str]:
    return [f for f in FOLDS if os.path.isfile(os.path.join(folder, f'fold_{f}', checkpoint))]


def trained_folds(model_folder: str, checkpoint: str = FINAL) -> List[str]:
    """The folds of a model folder (global, or a site's ``sites/<site>``) that hold ``checkpoint``: 0-4, then all."""
    return _folds_with(model_folder, checkpoint)


def sites_with_model(model_base: str, fold: str, checkpoint: str = FINAL) -> List[str]:
    """The sites that hold a personalized model ``sites/<site>/fold_<fold>/<checkpoint>`` in a results folder."""
    root = os.path.join(model_base, 'sites')
    if not os.path.isdir(root):
        return []
    return sorted(s for s in os.listdir(root) if os.path.isfile(os.path.join(root, s, f'fold_{fold}', checkpoint)))


def find_trained_models(dataset_name: str, checkpoint: str = FINAL) -> List[Dict]:
    """Every fednnunet model folder of ``dataset_name`` with at least one fold holding ``checkpoint`` (globally or
    at a site): method, trainer, plans, configuration, folds, global_folds, sites (site -> its folds)."""
    root = os.path.join(str(nnUNet_results), dataset_name)
    models = []
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        parts = entry.split('__')
        folder = os.path.join(root, entry)
        if len(parts) != 3 or not os.path.isdir(folder):
            continue
        method = method_of_trainer_name(parts[0])
        if method is None:  # a stock nnU-Net trainer: nnUNetv2_predict's business
            continue
        global_folds = _folds_with(folder, checkpoint)
        sites_root = os.path.join(folder, 'sites')
        sites = {s: _folds_with(os.path.join(sites_root, s), checkpoint)
                 for s in (sorted(os.listdir(sites_root)) if os.path.isdir(sites_root) else [])}
        sites = {s: f for s, f in sites.items() if f}
        folds = [f for f in FOLDS if f in global_folds or any(f in v for v in sites.values())]
        if folds:
            models.append({'method': method, 'trainer': parts[0], 'plans': parts[1], 'configuration': parts[2],
                           'folder': folder, 'folds': folds, 'global_folds': global_folds, 'sites': sites})
    return models


def model_flags(model: Dict, fold: Optional[str] = None, site: Optional[str] = None) -> str:
    flags = f"-c {model['configuration']} -p {model['plans']} --method {model['method']} -f {fold or model['folds'][0]}"
    return flags + (f' --site {site}' if site else '')


def describe(model: Dict) -> str:
    text = f"{model['method']} (-c {model['configuration']} -p {model['plans']}; fold(s) {', '.join(model['folds'])}"
    if model['sites'] and not model['global_folds']:
        text += f"; personalized models only, at site(s) {', '.join(model['sites'])}"
    elif model['sites']:
        text += f"; personalized at site(s) {', '.join(model['sites'])}"
    return text + ')'


def missing_model_message(dataset_name: str, dataset_arg: str, method: str, plans: str, configuration: str,
                          fold: str, folder: str, command: str, checkpoint: str = FINAL, predict: bool = False,
                          site: Optional[str] = None) -> str:
    """The error for a model folder that does not exist: which models do, and the flags of the closest one.
    ``predict``: the suggestion adds ``--site`` where the model has personalized parts only."""
    asked = f'--method {method} -p {plans} -c {configuration}'
    models = find_trained_models(dataset_name, checkpoint)
    if not models:
        return (f'no model trained with {asked} for {dataset_name} ({folder} does not exist), and no fednnunet '
                f'model of {dataset_name} is under nnUNet_results={nnUNet_results}: train one with fednnunet_train')
    best = max(models, key=lambda m: (m['method'] == method, m['configuration'] == configuration,
                                      fold in m['folds'], m['plans'] == plans))
    best_fold = fold if fold in best['folds'] else best['folds'][0]
    suggested_site = None
    if predict and (site or not best['global_folds']) and best['sites']:
        suggested_site = site if site in best['sites'] else next(iter(best['sites']))
    return (f"no model trained with {asked} for {dataset_name} ({folder} does not exist); trained models: "
            f"{'; '.join(describe(m) for m in models)}. E.g.: {command} -d {dataset_arg} "
            f"{model_flags(best, best_fold, suggested_site)}")
