"""A site's part of ``fednnunet_find_best_configuration``: its own cross-validation predictions, counted at the site.

Fold k of a federation is every site's own fold k (its ``splits_final.json``), and every site keeps its final
validation predictions of fold k in its own model folder (``<Trainer>__<plans>__<configuration>/sites/<site>/
fold_k/validation``, with ``.npz`` class probabilities after ``fednnunet_train ... --npz``). For
``fednnunet_find_best_configuration`` a site, as nnU-Net's ``find_best_configuration`` does on the pooled folder:

- merges a model's folds into ``crossval_results_folds_<folds>/`` of its model folder (nnU-Net's
  ``accumulate_cv_results`` layout; a case that several folds validate, at a site with fewer cases than folds, is
  taken from the first of them);
- ensembles two models' merged predictions by averaging their class probabilities (nnU-Net's ``merge_files``) into
  ``ensembles/<nnU-Net's ensemble name>/sites/<site>/``;
- applies a chain of nnU-Net's postprocessing steps (remove all but the largest connected component of some labels
  or regions: ``remove_all_but_largest_component_from_segmentation``) to a source's predictions;
- counts, per foreground label or region, against its own reference segmentations: the sum of the per-case Dice
  scores over the cases where Dice is defined, that number of cases, and the summed TP, FP and FN (nnU-Net's
  ``compute_tp_fp_fn_tn``). Only these numbers leave the site: no case, file name or per-case number.

The server (fednnunet.best_configuration) turns every site's counts into nnU-Net's score (the mean over labels of the
mean Dice over cases, ``compute_metrics_on_folder``'s ``foreground_mean``) exactly, and into the pooled Dice.
"""
import os
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from nnunetv2.evaluation.evaluate_predictions import (compute_tp_fp_fn_tn, label_or_region_to_key,
                                                      region_or_label_to_mask)
from nnunetv2.paths import nnUNet_results
from nnunetv2.postprocessing.remove_connected_components import (apply_postprocessing,
                                                                 remove_all_but_largest_component_from_segmentation)
from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string, get_ensemble_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fednnunet import server_input
from fednnunet.errors import FederationError
from fednnunet.wire import Message

#: the one postprocessing function nnU-Net's find_best_configuration decides on (by name on the wire)
POSTPROCESSING_FUNCTIONS = {f.__name__: f for f in (remove_all_but_largest_component_from_segmentation,)}
#: what a site counts per label or region
COUNT_KEYS = ('dice_sum', 'dice_cases', 'tp', 'fp', 'fn')


def merged_folder_name(folds: Sequence) -> str:
    """nnU-Net's name of a model's merged cross-validation folder."""
    return f'crossval_results_folds_{folds_tuple_to_string(list(folds))}'


def ensemble_name(results_base: str, models: Sequence[str], folds: Sequence) -> str:
    """nnU-Net's name of the ensemble of two models (their results folder names)."""
    return get_ensemble_name(join(results_base, models[0]), join(results_base, models[1]), list(folds))


class SiteCrossValidation:
    """One site's cross-validation predictions of the models a find_best_configuration run compares."""

    def __init__(self, worker, folds: Sequence):
        self.worker = worker
        self.site = worker.site.name
        self.folds = list(folds)
        self.results = join(str(nnUNet_results), worker.dataset_name)

    # ------------------------------------------------------------------ folders
    def model_folder(self, model: str) -> str:
        folder = join(self.results, model, 'sites', self.site)
        if not os.path.isdir(folder):
            raise FederationError(f"this site has no model {model} (train it: fednnunet_train with every fold asked, "
                                  f"--npz to ensemble it)", site=self.site, field='models')
        return folder

    def source_folder(self, source: Sequence[str]) -> str:
        """Where a source's merged predictions are at this site: a model's crossval folder, or an ensemble's."""
        if len(source) == 1:
            return join(self.model_folder(source[0]), merged_folder_name(self.folds))
        return join(self.results, 'ensembles', ensemble_name(self.results, source, self.folds), 'sites', self.site)

    def validation_cases(self) -> List[str]:
        """Every case some fold asked validates at this site (its splits_final.json), each once."""
        splits = load_json(join(self.worker.folder, 'splits_final.json'))
        cases = []
        for f in self.folds:
            cases += [c for c in splits[int(f)]['val'] if c not in cases]
        return sorted(cases)

    # ------------------------------------------------------------------ building the sources
    def accumulate(self, model: str) -> str:
        """The model's folds merged (nnU-Net's accumulate_cv_results layout): each validated case once, from the
        first fold that validates it, with its class probabilities where they were saved."""
        folder = self.model_folder(model)
        ending = load_json(join(folder, 'dataset.json'))['file_ending']
        out = join(folder, merged_folder_name(self.folds))
        partial = out + '.partial'
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for name in ('dataset.json', 'plans.json'):
            shutil.copy(join(folder, name), join(partial, name))
        taken = set()
        for f in self.folds:
            validation = join(folder, f'fold_{f}', 'validation')
            if not os.path.isdir(validation):
                shutil.rmtree(partial)
                raise FederationError(f"fold {f} of {model} has no validation predictions at this site (train and "
                                      f"validate it: fednnunet_train ... {f} --npz)", site=self.site, field='folds')
            for file in sorted(os.listdir(validation)):
                if not file.endswith(ending) or file[:-len(ending)] in taken:
                    continue
                case = file[:-len(ending)]
                taken.add(case)
                for companion in (file, case + '.npz', case + '.pkl'):
                    if os.path.isfile(join(validation, companion)):
                        shutil.copy(join(validation, companion), join(partial, companion))
        missing = [c for c in self.validation_cases() if c not in taken]
        if missing:
            shutil.rmtree(partial)
            raise FederationError(f"{model} has no prediction of {len(missing)} validation case(s) of folds "
                                  f"{self.folds} (e.g. {missing[0]}): validate every fold", site=self.site,
                                  field='folds')
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
        return out

    def ensemble(self, source: Sequence[str]) -> str:
        """Two models' merged predictions ensembled case by case (nnU-Net's merge_files: the mean of their class
        probabilities, then nnU-Net's conversion to a segmentation), from their .npz files."""
        from nnunetv2.ensembling.ensemble import merge_files
        inputs = [join(self.model_folder(m), merged_folder_name(self.folds)) for m in source]
        out = self.source_folder(source)
        plans_manager = PlansManager(join(inputs[0], 'plans.json'))
        dataset_json = load_json(join(inputs[0], 'dataset.json'))
        cases = self.validation_cases()
        lacking = [(m, c) for m, folder in zip(source, inputs) for c in cases
                   if not os.path.isfile(join(folder, c + '.npz'))]
        if lacking:
            raise FederationError(f"{lacking[0][0]} has no class probabilities of case(s) such as {lacking[0][1]} "
                                  f"at this site: ensembles need them (train with --npz)", site=self.site,
                                  field='ensembles')
        partial = out + '.partial'
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        label_manager = plans_manager.get_label_manager(dataset_json)
        for c in cases:
            merge_files([join(folder, c + '.npz') for folder in inputs], join(partial, c), dataset_json['file_ending'],
                        plans_manager.image_reader_writer_class(), label_manager, False)
        for name in ('dataset.json', 'plans.json'):
            shutil.copy(join(inputs[0], name), join(partial, name))
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        os.replace(partial, out)
        return out

    # ------------------------------------------------------------------ counting
    def counts(self, source: Sequence[str], chain: Sequence[dict]) -> Dict[str, dict]:
        """Per foreground label or region (nnU-Net's key): the sum of the per-case Dice over the cases where it is
        defined, their number, and the summed TP, FP, FN of the source's predictions after the postprocessing
        ``chain``, against the site's reference segmentations."""
        folder = self.source_folder(source)
        if not os.path.isdir(folder):
            raise FederationError(f"no predictions of {list(source)} at this site (ask with 'rebuild' first)",
                                  site=self.site, field='requests')
        plans_manager = PlansManager(join(folder, 'plans.json'))
        dataset_json = load_json(join(folder, 'dataset.json'))
        label_manager = plans_manager.get_label_manager(dataset_json)
        labels = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
        reader = plans_manager.image_reader_writer_class()
        ending = dataset_json['file_ending']
        functions = [POSTPROCESSING_FUNCTIONS[step['function']] for step in chain]
        kwargs = [{'labels_or_regions': step['labels_or_regions']} for step in chain]
        gt = join(self.worker.folder, 'gt_segmentations')
        dice = {label_or_region_to_key(r): [] for r in labels}
        totals = {label_or_region_to_key(r): np.zeros(3, dtype=np.int64) for r in labels}
        for case in self.validation_cases():
            ref, _ = reader.read_seg(join(gt, case + ending))
            pred, _ = reader.read_seg(join(folder, case + ending))
            if functions:
                pred = apply_postprocessing(pred[0], functions, kwargs)[None]
            ignore = ref == label_manager.ignore_label if label_manager.ignore_label is not None else None
            for r in labels:
                tp, fp, fn, _ = compute_tp_fp_fn_tn(region_or_label_to_mask(ref, r), region_or_label_to_mask(pred, r),
                                                    ignore)
                key = label_or_region_to_key(r)
                dice[key].append(np.nan if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
                totals[key] += [tp, fp, fn]
        return {key: {'dice_sum': float(np.nansum(values)), 'dice_cases': int(np.sum(~np.isnan(values))),
                      'tp': int(totals[key][0]), 'fp': int(totals[key][1]), 'fn': int(totals[key][2])}
                for key, values in ((k, np.array(v, dtype=np.float64)) for k, v in dice.items())}

    def write_postprocessing(self, source: Sequence[str], chain: Sequence[dict], summary: dict):
        """The decided postprocessing in the site's copy of the source folder, in nnU-Net's two files:
        postprocessing.pkl (nnU-Net's (functions, kwargs), for nnUNetv2_apply_postprocessing) and postprocessing.json
        (what fednnunet_apply_postprocessing reads; it never unpickles)."""
        write_postprocessing_files(self.source_folder(source), chain, summary)


# ---------------------------------------------------------------------------------------------- the wire

def chain_from_wire(value, label_manager, site: Optional[str] = None) -> List[dict]:
    """A postprocessing chain from the server: a list of steps {'function': a name of POSTPROCESSING_FUNCTIONS,
    'labels_or_regions': a foreground label, or a list of foreground labels / regions (lists of labels)}, each
    checked against the dataset's labels; regions become tuples, as nnU-Net has them."""
    labels = list(label_manager.foreground_labels)
    regions = [tuple(r) for r in label_manager.foreground_regions] if label_manager.has_regions else []
    if not isinstance(value, list) or len(value) > 1 + len(labels) + len(regions):
        raise FederationError('a postprocessing chain is a short list of steps', site=site, field='chain')

    def one(item):
        if isinstance(item, int) and not isinstance(item, bool) and item in labels:
            return item
        if isinstance(item, list) and tuple(item) in regions:
            return tuple(item)
        raise FederationError(f'{str(item)[:50]} is not a foreground label or region of the dataset', site=site,
                              field='chain')
    out = []
    for step in value:
        if not isinstance(step, dict) or set(step) != {'function', 'labels_or_regions'} or \
                step['function'] not in POSTPROCESSING_FUNCTIONS:
            raise FederationError(f'{str(step)[:80]} is not a postprocessing step (function '
                                  f'{sorted(POSTPROCESSING_FUNCTIONS)} and labels_or_regions)', site=site, field='chain')
        target = step['labels_or_regions']  # a list: several labels/regions (a region itself is a list, inside it)
        if isinstance(target, list) and not target:
            raise FederationError('a postprocessing step needs a label or region', site=site, field='chain')
        target = [one(x) for x in target] if isinstance(target, list) else one(target)
        out.append({'function': step['function'], 'labels_or_regions': target})
    return out


def chain_to_wire(chain: Sequence[dict]) -> List[dict]:
    def plain(x):  # a region as a list, a label as a Python int
        return [int(y) for y in x] if isinstance(x, tuple) else int(x)
    return [{'function': s['function'], 'labels_or_regions': [plain(x) for x in s['labels_or_regions']]
             if isinstance(s['labels_or_regions'], list) else plain(s['labels_or_regions'])} for s in chain]


def write_postprocessing_files(folder: str, chain: Sequence[dict], summary: dict):
    """nnU-Net's postprocessing.pkl and postprocessing.json for ``chain`` in ``folder`` (``summary``: the scores
    before and after, as nnU-Net's json has them)."""
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from fednnunet.jsonio import write_json
    os.makedirs(folder, exist_ok=True)
    functions = [POSTPROCESSING_FUNCTIONS[s['function']] for s in chain]
    kwargs = [{'labels_or_regions': s['labels_or_regions']} for s in chain]
    save_pickle((functions, kwargs), join(folder, 'postprocessing.pkl'))
    record = {'input_folder': summary['input_folder'], 'postprocessed': summary['postprocessed'],
              'postprocessing_fns': [f.__name__ for f in functions],
              'postprocessing_kwargs': [{'labels_or_regions': s['labels_or_regions']}
                                        for s in chain_to_wire(chain)]}
    recursive_fix_for_json_export(record)
    write_json(join(folder, 'postprocessing.json'), record)


def read_postprocessing_json(path: str, label_manager) -> List[dict]:
    """A postprocessing.json (nnU-Net's, or fednnunet's) as a checked chain: only the allowed function, only the
    dataset's labels and regions. No pickle is read."""
    record = load_json(path)
    names, kwargs = record.get('postprocessing_fns'), record.get('postprocessing_kwargs')
    if not isinstance(names, list) or not isinstance(kwargs, list) or len(names) != len(kwargs):
        raise FederationError(f'{path} has no postprocessing_fns and postprocessing_kwargs of the same length',
                              field='postprocessing')
    steps = [{'function': n, 'labels_or_regions': k.get('labels_or_regions') if isinstance(k, dict) else None}
             for n, k in zip(names, kwargs)]
    return chain_from_wire(steps, label_manager)


# ---------------------------------------------------------------------------------------------- the handlers

def _request_sources(config: dict, site: str) -> tuple:
    """(models, folds, requests) of a request, checked."""
    models = config.get('models')
    if not isinstance(models, list) or not models or len(models) > 16 or len(set(map(str, models))) != len(models):
        raise FederationError('models must be a short list of distinct results folder names', site=site,
                              field='models')
    for m in models:
        server_input.results_folder_name(m, site, field='models')
    folds = config.get('folds')
    if not isinstance(folds, list) or not folds or len(set(map(str, folds))) != len(folds):
        raise FederationError('folds must be a list of distinct folds', site=site, field='folds')
    for f in folds:
        server_input.fold(f, site)
    requests = config.get('requests')
    if not isinstance(requests, list) or len(requests) > 256:
        raise FederationError('requests must be a list', site=site, field='requests')
    for r in requests:
        source = r.get('source') if isinstance(r, dict) else None
        if not isinstance(source, list) or not 1 <= len(source) <= 2 or len(set(source)) != len(source) or \
                any(s not in models for s in source):
            raise FederationError('a request names one model, or two (an ensemble), of the models asked', site=site,
                                  field='requests')
    return models, folds, requests


def crossval_counts(worker, message: Message) -> Message:
    """``crossval_counts``: with ``rebuild``, merge every model's folds and build every requested ensemble first;
    then the counts of each request (a source and a postprocessing chain)."""
    config = message.config if isinstance(message.config, dict) else {}
    site = worker.site.name
    models, folds, requests = _request_sources(config, site)
    if not isinstance(config.get('rebuild'), bool):
        raise FederationError('rebuild must be true or false', site=site, field='rebuild')
    cv = SiteCrossValidation(worker, folds)
    if config['rebuild']:
        for m in models:
            cv.accumulate(m)
        for source in {tuple(r['source']) for r in requests if len(r['source']) == 2}:
            cv.ensemble(source)
    out = []
    for r in requests:
        folder = cv.source_folder(r['source'])
        manager = PlansManager(join(folder, 'plans.json')).get_label_manager(load_json(join(folder, 'dataset.json')))
        out.append(cv.counts(r['source'], chain_from_wire(r.get('chain', []), manager, site)))
    return Message('crossval_counts', {'counts': out, 'num_cases': len(cv.validation_cases())})


def store_postprocessing(worker, message: Message) -> Message:
    """``store_postprocessing``: the decided postprocessing of a source, written in nnU-Net's files in the site's
    copy of that source's folder."""
    config = message.config if isinstance(message.config, dict) else {}
    site = worker.site.name
    models, folds, requests = _request_sources(config, site)
    if len(requests) != 1:
        raise FederationError('one source and its postprocessing', site=site, field='requests')
    summary = config.get('summary')
    if not isinstance(summary, dict) or set(summary) != {'input_folder', 'postprocessed'}:
        raise FederationError('summary holds the scores before and after postprocessing', site=site, field='summary')
    cv = SiteCrossValidation(worker, folds)
    folder = cv.source_folder(requests[0]['source'])
    manager = PlansManager(join(folder, 'plans.json')).get_label_manager(load_json(join(folder, 'dataset.json')))
    chain = chain_from_wire(requests[0].get('chain', []), manager, site)
    cv.write_postprocessing(requests[0]['source'], chain, _plain_scores(summary, site))
    return Message('stored')


def _plain_scores(summary: dict, site: str) -> dict:
    """The server's scores for postprocessing.json: {'input_folder'|'postprocessed': {'foreground_mean': {'Dice': x},
    'mean': {label key: {'Dice': x}}}} with finite or NaN numbers only."""
    import math
    out = {}
    for part in ('input_folder', 'postprocessed'):
        scores = summary[part]
        try:
            fg = float(scores['foreground_mean']['Dice'])
            mean = {str(k)[:50]: {'Dice': float(v['Dice'])} for k, v in scores['mean'].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise FederationError(f'{part} is not a score summary', site=site, field='summary') from None
        if len(mean) > 1000 or any(math.isinf(x) for x in [fg] + [v['Dice'] for v in mean.values()]):
            raise FederationError(f'{part} is not a score summary', site=site, field='summary')
        out[part] = {'foreground_mean': {'Dice': fg}, 'mean': mean}
    return out
