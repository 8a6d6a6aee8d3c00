"""``fednnunet_find_best_configuration``: nnU-Net's choice of configuration (or ensemble of two) and of postprocessing
from the federation's cross-validation, with only counts leaving the sites.

nnU-Net's ``find_best_configuration`` merges each model's five folds, ensembles every pair of models, scores every
candidate by ``compute_metrics_on_folder``'s ``foreground_mean`` Dice (per label the mean Dice over the cases where
it is defined, then the mean over labels), takes the best (the first on a tie: single models before ensembles), and
then decides postprocessing on the best one: remove all but the largest foreground component if that raises the
score and lowers no label's mean; then, for every label (or region) in turn, remove all but its largest component if
that raises its mean. It writes ``inference_information.json``, ``inference_instructions.txt`` and the
postprocessing files.

Here every site does the merging, ensembling and postprocessing on its own predictions (fednnunet.crossval) and sends
per label the sum of its per-case Dice, the number of cases where Dice is defined, and its summed TP/FP/FN. The
server's scores are then exactly nnU-Net's over the union of the sites' cases (sum of sums / sum of counts), and the
same rules decide. The pooled Dice (2 sum TP / (2 sum TP + sum FP + sum FN)) is reported beside it.

Methods whose sites keep personal parts (no global model) also get a choice per site, from the site's own counts
(configuration, ensemble and postprocessing), since each site predicts with its own model; methods with a global
model get the pooled choice only.
"""
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join

from nnunetv2.paths import nnUNet_results
from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fednnunet.crossval import (COUNT_KEYS, chain_to_wire, ensemble_name, merged_folder_name,
                                write_postprocessing_files)
from fednnunet.errors import FederationError
from fednnunet.federation import load_json
from fednnunet.jsonio import write_json
from fednnunet.wire import Message

POOLED = 'pooled'
KEEP_LARGEST = 'remove_all_but_largest_component_from_segmentation'
MAX_CASES = 10 ** 7  # what one site may declare


@dataclass(frozen=True)
class Model:
    method: str
    trainer: str
    plans: str
    configuration: str
    previous_stage: Optional[str] = None  # a cascade stage's (its predictions need the previous stage's first)

    @property
    def name(self) -> str:
        """nnU-Net's results folder name (and its identifier in find_best_configuration)."""
        return f'{self.trainer}__{self.plans}__{self.configuration}'


@dataclass
class Group:
    """Who a decision is for: the whole federation (pooled counts) or one site (its own counts)."""
    name: str
    sites: List[str]
    results: Dict[str, float] = field(default_factory=dict)  # candidate identifier -> nnU-Net's score
    best: Optional[Tuple[str, ...]] = None  # the chosen source (one model, or two: an ensemble)
    chain: List[dict] = field(default_factory=list)
    before: Optional[dict] = None  # the best source's scores before / after postprocessing
    after: Optional[dict] = None


def scores(counts: Sequence[Dict[str, dict]]) -> dict:
    """nnU-Net's summary numbers over the union of the sites' cases, from each site's counts: per label or region the
    mean Dice over the cases where it is defined (nnU-Net's nanmean) and the pooled Dice, then their means over the
    labels (nnU-Net's foreground_mean: NaN where a label has no defined case)."""
    keys = list(counts[0]) if counts else []
    mean, pooled = {}, {}
    for k in keys:
        dice_sum = sum(c[k]['dice_sum'] for c in counts)
        n = sum(c[k]['dice_cases'] for c in counts)
        tp, fp, fn = (sum(c[k][x] for c in counts) for x in ('tp', 'fp', 'fn'))
        mean[k] = {'Dice': dice_sum / n if n else float('nan'), 'TP': tp, 'FP': fp, 'FN': fn}
        pooled[k] = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn > 0 else float('nan')
    return {'mean': mean, 'foreground_mean': {'Dice': float(np.mean([m['Dice'] for m in mean.values()]))
                                              if mean else float('nan')},
            'pooled_foreground_dice': float(np.mean(list(pooled.values()))) if pooled else float('nan'),
            'pooled_dice': pooled}


def checked_counts(reply: Message, expected: int, label_keys: Sequence[str], site: str) -> Tuple[List[dict], int]:
    """A site's counts, checked: one per request, every label key, counts that can be counts (a per-case Dice sum in
    [0, cases], integers in range). A FederationError names the site and what is wrong."""
    config = reply.config if isinstance(reply.config, dict) else {}
    num_cases, out = config.get('num_cases'), config.get('counts')
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or not 0 <= num_cases <= MAX_CASES:
        raise FederationError(f'{str(num_cases)[:30]} is not a number of cases', site=site, field='num_cases')
    if not isinstance(out, list) or len(out) != expected:
        raise FederationError(f'the counts are not {expected} sets of counts', site=site, field='counts')
    for counts in out:
        if not isinstance(counts, dict) or sorted(counts) != sorted(label_keys):
            raise FederationError(f'counts for other labels than {list(label_keys)}', site=site, field='counts')
        for k, c in counts.items():
            if not isinstance(c, dict) or set(c) != set(COUNT_KEYS):
                raise FederationError(f'the counts of label {k} are not {COUNT_KEYS}', site=site, field='counts')
            cases, dice_sum = c['dice_cases'], c['dice_sum']
            whole = [c[x] for x in ('tp', 'fp', 'fn')] + [cases]
            if any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2 ** 53 for x in whole) or \
                    cases > num_cases or isinstance(dice_sum, bool) or not isinstance(dice_sum, (int, float)) or \
                    not math.isfinite(dice_sum) or not 0 <= dice_sum <= cases:
                raise FederationError(f'the counts of label {k} are not counts ({str(c)[:120]})', site=site,
                                      field='counts')
    return out, num_cases


class BestConfiguration:
    """The federated find_best_configuration over an engine (simulation or Flower): see the module's text."""

    def __init__(self, engine, dataset_name: str, models: Sequence[Model], folds: Sequence, allow_ensembling: bool,
                 per_site: bool, log: Callable[[str], None] = print):
        if not models:
            raise FederationError('no trained model to choose from', field='-c')
        self.engine, self.dataset_name, self.models = engine, dataset_name, list(models)
        self.folds, self.allow_ensembling, self.log = list(folds), allow_ensembling, log
        self.results_root = join(str(nnUNet_results), dataset_name)
        first = join(self.results_root, self.models[0].name)
        self.plans_file = join(first, 'plans.json')
        manager = PlansManager(self.plans_file)
        self.dataset_json = load_json(join(first, 'dataset.json'))
        self.label_manager = manager.get_label_manager(self.dataset_json)
        from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key
        self.labels = (self.label_manager.foreground_regions if self.label_manager.has_regions
                       else self.label_manager.foreground_labels)
        self.label_keys = [label_or_region_to_key(r) for r in self.labels]
        self.sites = sorted(engine.site_names)
        self.groups = [Group(POOLED, list(self.sites))] + ([Group(s, [s]) for s in self.sites] if per_site else [])
        self.candidates: List[Tuple[str, ...]] = [(m.name,) for m in self.models]
        if allow_ensembling:
            self.candidates += [(a.name, b.name) for i, a in enumerate(self.models) for b in self.models[i + 1:]]
        self.cache: Dict[Tuple[str, Tuple[str, ...], str], dict] = {}  # (site, source, chain) -> its counts
        self.left_out: Dict[str, str] = {}
        self.num_cases: Dict[str, int] = {}

    def identifier(self, source: Tuple[str, ...]) -> str:
        """nnU-Net's name of a candidate in all_results: the model's folder name, or the ensemble's name."""
        return source[0] if len(source) == 1 else ensemble_name(self.results_root, source, self.folds)

    @staticmethod
    def chain_key(chain: Sequence[dict]) -> str:
        import json
        return json.dumps(chain_to_wire(chain), sort_keys=True)

    # ------------------------------------------------------------------ asking the sites
    def ask(self, wanted: Dict[str, List[Tuple[Tuple[str, ...], List[dict]]]], rebuild: bool = False):
        """Each site counts the (source, chain) pairs it is asked for; the checked counts go to the cache. A site
        whose counts fail the checks is left out of every decision from here on (named in the log)."""
        requests = {s: Message('crossval_counts', {
            'models': [m.name for m in self.models], 'folds': self.folds, 'rebuild': rebuild,
            'requests': [{'source': list(src), 'chain': chain_to_wire(chain)} for src, chain in pairs]})
            for s, pairs in wanted.items() if pairs and s not in self.left_out}
        replies = self.engine.ask(requests)
        for s, reply in replies.items():
            try:
                counts, n = checked_counts(reply, len(wanted[s]), self.label_keys, s)
            except FederationError as e:
                self.left_out[s] = str(e)
                self.log(f'site {s} is left out of the choice: {e}')
                continue
            self.num_cases[s] = n
            for (src, chain), c in zip(wanted[s], counts):
                self.cache[s, src, self.chain_key(chain)] = c

    @property
    def active(self) -> List[Group]:
        """The groups with a site left to decide for (a site left out takes its own group with it)."""
        return [g for g in self.groups if g.name == POOLED or any(s not in self.left_out for s in g.sites)]

    def group_scores(self, group: Group, source: Tuple[str, ...], chain: Sequence[dict]) -> dict:
        members = [s for s in group.sites if s not in self.left_out]
        if not members:
            raise FederationError(f"no site's counts are left for {group.name}: " + '; '.join(self.left_out.values()))
        return scores([self.cache[s, source, self.chain_key(chain)] for s in members])

    # ------------------------------------------------------------------ the choice
    def run(self) -> dict:
        t0 = time.time()
        self.ask({s: [(c, []) for c in self.candidates] for s in self.sites}, rebuild=True)
        for g in self.active:
            g.results = {self.identifier(c): self.group_scores(g, c, [])['foreground_mean']['Dice']
                         for c in self.candidates}
            finite = {k: v for k, v in g.results.items() if not math.isnan(v)}
            if not finite:
                raise FederationError(f'no candidate has a defined score for {g.name} (no validation case with a '
                                      f'label)')
            best = max(finite.values())
            g.best = next(c for c in self.candidates if g.results[self.identifier(c)] == best)  # first on a tie
            g.before = self.group_scores(g, g.best, [])
        self.decide_postprocessing()
        self.log(f'best configuration found in {time.time() - t0:.0f} s')
        return self.write()

    def _ask_candidates(self, step_of: Callable[[Group], Optional[dict]]) -> Dict[str, dict]:
        """One round of the postprocessing decision: each group's candidate step (None: the group asks nothing)
        on its best source after its chain so far; returns {group name: step asked}."""
        asked = {g.name: step_of(g) for g in self.active}
        wanted: Dict[str, List] = {s: [] for s in self.sites}
        for g in self.active:
            if asked[g.name] is not None:
                for s in g.sites:
                    pair = (g.best, g.chain + [asked[g.name]])
                    if pair not in wanted[s]:
                        wanted[s].append(pair)
        self.ask(wanted)
        return asked

    def decide_postprocessing(self):
        """nnU-Net's determine_postprocessing rules on each group's counts: first all but the largest foreground
        component (kept if the mean rises and no label's mean falls), then each label or region in turn (kept if
        its mean rises), each step judged on the predictions after the steps kept so far."""
        foreground = {'function': KEEP_LARGEST,
                      'labels_or_regions': [int(x) for x in self.label_manager.foreground_labels]}
        asked = self._ask_candidates(lambda g: foreground)
        for g in self.active:
            base, pp = g.before, self.group_scores(g, g.best, [asked[g.name]])
            if pp['foreground_mean']['Dice'] > base['foreground_mean']['Dice'] and \
                    all(pp['mean'][k]['Dice'] >= base['mean'][k]['Dice'] for k in self.label_keys):
                g.chain = [foreground]
                self.log(f'{g.name}: removing all but the largest foreground region improves the mean Dice '
                         f"({base['foreground_mean']['Dice']:.5f} -> {pp['foreground_mean']['Dice']:.5f})")
        if len(self.labels) > 1:
            for label, key in zip(self.labels, self.label_keys):
                step = {'function': KEEP_LARGEST,
                        'labels_or_regions': tuple(int(x) for x in label) if isinstance(label, tuple) else int(label)}
                self._ask_candidates(lambda g: step)
                for g in self.active:
                    base = self.group_scores(g, g.best, g.chain)
                    pp = self.group_scores(g, g.best, g.chain + [step])
                    if pp['mean'][key]['Dice'] > base['mean'][key]['Dice']:
                        g.chain = g.chain + [step]
                        self.log(f'{g.name}: removing all but the largest component of {key} improves its Dice '
                                 f"({base['mean'][key]['Dice']:.5f} -> {pp['mean'][key]['Dice']:.5f})")
        for g in self.active:
            g.after = self.group_scores(g, g.best, g.chain)

    # ------------------------------------------------------------------ nnU-Net's files
    def source_folder(self, source: Tuple[str, ...], site: Optional[str] = None) -> str:
        """The server's folder of a source (nnU-Net's: the model's crossval folder, or the ensemble's), or its copy at
        a site (site's model folder / the ensemble's sites/<site>)."""
        if len(source) == 1:
            base = join(self.results_root, source[0]) if site is None else \
                join(self.results_root, source[0], 'sites', site)
            return join(base, merged_folder_name(self.folds))
        base = join(self.results_root, 'ensembles', self.identifier(source))
        return base if site is None else join(base, 'sites', site)

    def summary(self, g: Group) -> dict:
        def short(s):
            return {'foreground_mean': s['foreground_mean'], 'mean': {k: {'Dice': v['Dice']}
                                                                      for k, v in s['mean'].items()}}
        return {'input_folder': short(g.before), 'postprocessed': short(g.after)}

    def selected(self, source: Tuple[str, ...]) -> List[dict]:
        by_name = {m.name: m for m in self.models}
        return [{'configuration': by_name[n].configuration, 'trainer': by_name[n].trainer,
                 'plans_identifier': by_name[n].plans, 'method': by_name[n].method,
                 **({'previous_stage': by_name[n].previous_stage} if by_name[n].previous_stage else {})}
                for n in source]

    def write(self) -> dict:
        pooled = self.groups[0]
        folder = self.source_folder(pooled.best)
        os.makedirs(folder, exist_ok=True)
        for name in ('plans.json', 'dataset.json'):
            write_json(join(folder, name), load_json(join(self.results_root, pooled.best[0], name)))
        write_postprocessing_files(folder, pooled.chain, self.summary(pooled))
        # every site keeps the decision for its predictions in its own copy of the source (its own choice for a
        # method without a global model, else the pooled one)
        for g in self.active:
            members = [s for s in g.sites if s not in self.left_out]
            if g.name == POOLED and len(self.groups) > 1:
                continue
            self.engine.ask({s: Message('store_postprocessing', {
                'models': [m.name for m in self.models], 'folds': self.folds,
                'requests': [{'source': list(g.best), 'chain': chain_to_wire(g.chain)}],
                'summary': self.summary(g)}) for s in members})
        info = {
            'folds': self.folds,
            'dataset_name_or_id': self.dataset_name,
            'considered_models': [{'plans': m.plans, 'configuration': m.configuration, 'trainer': m.trainer,
                                   'method': m.method} for m in self.models],
            'ensembling_allowed': self.allow_ensembling,
            'all_results': pooled.results,
            'best_model_or_ensemble': {
                'result_on_crossval_pre_pp': pooled.before['foreground_mean']['Dice'],
                'result_on_crossval_post_pp': pooled.after['foreground_mean']['Dice'],
                'pooled_dice_pre_pp': pooled.before['pooled_foreground_dice'],
                'pooled_dice_post_pp': pooled.after['pooled_foreground_dice'],
                'postprocessing_file': join(folder, 'postprocessing.pkl'),
                'postprocessing_json': join(folder, 'postprocessing.json'),
                'postprocessing_fns': [s['function'] for s in pooled.chain],
                'postprocessing_kwargs': [{'labels_or_regions': s['labels_or_regions']}
                                          for s in chain_to_wire(pooled.chain)],
                'some_plans_file': join(folder, 'plans.json'),
                'selected_model_or_models': self.selected(pooled.best),
            },
            'sites': self.sites,
            'cases_per_site': self.num_cases,
            'sites_left_out': self.left_out,
        }
        if len(self.groups) > 1:
            info['per_site'] = {g.name: {
                'all_results': g.results, 'selected_model_or_models': self.selected(g.best),
                'result_on_crossval_pre_pp': g.before['foreground_mean']['Dice'],
                'result_on_crossval_post_pp': g.after['foreground_mean']['Dice'],
                'postprocessing_json': join(self.source_folder(g.best, g.name), 'postprocessing.json'),
                'postprocessing_fns': [s['function'] for s in g.chain],
                'postprocessing_kwargs': [{'labels_or_regions': s['labels_or_regions']}
                                          for s in chain_to_wire(g.chain)]}
                for g in self.active[1:]}
        write_json(join(self.results_root, 'inference_information.json'), info)
        text = inference_instructions(info, self.dataset_name)
        with open(join(self.results_root, 'inference_instructions.txt'), 'w') as f:
            f.write(text)
        info['instructions'] = text
        return info


def _predict_commands(dataset: str, selected: List[dict], folds, site: Optional[str], out: str) -> List[str]:
    ensemble = len(selected) > 1
    lines = []
    for j, m in enumerate(selected):
        folder = f'{out}_MODEL_{j + 1}' if ensemble else out
        common = (f"-f {' '.join(map(str, folds))} -p {m['plans_identifier']} --method {m['method']}"
                  + (f' --site {site}' if site else ''))
        previous = ''
        if m.get('previous_stage'):  # the cascade: its previous stage first, as nnU-Net's instructions
            previous_folder = f'{out}_PREV_STAGE' + (f'_{j + 1}' if ensemble else '')
            lines.append(f"fednnunet_predict -d {dataset} -i INPUT_FOLDER -o {previous_folder} -c "
                         f"{m['previous_stage']} {common}")
            previous = f' -prev_stage_predictions {previous_folder}'
        lines.append(f"fednnunet_predict -d {dataset} -i INPUT_FOLDER -o {folder} -c {m['configuration']} {common}"
                     + previous + (' --save_probabilities' if ensemble else ''))
    if ensemble:
        lines += ['', 'Then ensemble them with:', '',
                  f"fednnunet_ensemble -i {' '.join(f'{out}_MODEL_{j + 1}' for j in range(len(selected)))} -o {out}"]
    return lines


def inference_instructions(info: dict, dataset: str) -> str:
    """nnU-Net's inference_instructions.txt, with fednnunet's commands."""
    best = info['best_model_or_ensemble']
    lines = ['***Run inference like this:***', '']
    if 'per_site' in info:
        lines += [f"The method keeps a personal model per site: each site predicts with its own model, with the "
                  f"configuration its own cross-validation chose (pooled choice, for reference: "
                  f"{' + '.join(m['configuration'] for m in best['selected_model_or_models'])}).", '']
        for site, own in sorted(info['per_site'].items()):
            lines += [f'Site {site}:', '']
            if len(own['selected_model_or_models']) > 1:
                lines += ['An ensemble won! Run the ensemble members:', '']
            lines += _predict_commands(dataset, own['selected_model_or_models'], info['folds'], site,
                                       'OUTPUT_FOLDER')
            lines += ['', 'Once inference is completed, postprocess like this:', '',
                      f"fednnunet_apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP -pp_json "
                      f"{own['postprocessing_json']}", '']
        return '\n'.join(lines) + '\n'
    if len(best['selected_model_or_models']) > 1:
        lines += ['An ensemble won! What a surprise! Run the following commands to run predictions with the ensemble '
                  'members:', '']
    lines += _predict_commands(dataset, best['selected_model_or_models'], info['folds'], None, 'OUTPUT_FOLDER')
    lines += ['', '***Once inference is completed, run postprocessing like this:***', '',
              f"fednnunet_apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP -pp_json "
              f"{best['postprocessing_json']}", '',
              f"(nnU-Net's own tool reads the same decision: nnUNetv2_apply_postprocessing -i OUTPUT_FOLDER -o "
              f"OUTPUT_FOLDER_PP -pp_pkl_file {best['postprocessing_file']} -plans_json {best['some_plans_file']})"]
    return '\n'.join(lines) + '\n'


def folds_string(folds) -> str:
    return folds_tuple_to_string(list(folds))
