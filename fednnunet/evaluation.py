"""Per-site evaluation with nnU-Net's metrics, HD95, and the pooled Dice across sites.

A site predicts its own validation cases and computes per-case metrics locally (nnU-Net's
``compute_metrics``: TP/FP/FN/TN, Dice, IoU per label; plus the 95th percentile Hausdorff distance in mm).
Only these numbers leave the site. The pooled Dice per label is exact: 2 sum TP / (2 sum TP + sum FP + sum FN)
over all sites' cases.
"""
import contextlib
import io
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from nnunetv2.evaluation.evaluate_predictions import compute_metrics, region_or_label_to_mask, save_summary_json
from nnunetv2.utilities.json_export import recursive_fix_for_json_export


def surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile of the symmetric surface distances (mm). NaN when both masks are empty, inf when only
    one is (no surface to measure against)."""
    if not reference.any() and not prediction.any():
        return float('nan')
    if not reference.any() or not prediction.any():
        return float('inf')
    s_ref, s_pred = surface(reference), surface(prediction)
    to_ref = ndimage.distance_transform_edt(~s_ref, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)
    distances = np.concatenate([to_ref[s_pred], to_pred[s_ref]])
    return float(np.percentile(distances, 95))


def case_metrics(reference_file: str, prediction_file: str, reader, labels: List, ignore_label=None) -> dict:
    """nnU-Net's per-case metrics with an 'HD95' entry per label."""
    result = compute_metrics(reference_file, prediction_file, reader, labels, ignore_label)
    ref, props = reader.read_seg(reference_file)
    pred, _ = reader.read_seg(prediction_file)
    spacing = list(props['spacing'])[-(ref.ndim - 1):]
    for label in labels:
        result['metrics'][label]['HD95'] = hd95(region_or_label_to_mask(ref[0], label),
                                                region_or_label_to_mask(pred[0], label), spacing)
    return result


def summarize_cases(results: List[dict], labels: List) -> dict:
    """nnU-Net's summary (``compute_metrics_on_folder``'s numbers: per label the NaN-ignoring mean over cases,
    foreground the plain mean over labels), plus HD95: per label the mean over the cases where it is finite
    ('HD95_undefined' counts the others), foreground the mean over the labels that have one."""
    means = {}
    for label in labels:
        means[label] = {}
        for metric in results[0]['metrics'][label]:
            values = np.array([r['metrics'][label][metric] for r in results], dtype=np.float64)
            if metric == 'HD95':
                means[label]['HD95_undefined'] = int(np.sum(~np.isfinite(values)))
                values = values[np.isfinite(values)]
                means[label][metric] = float(np.mean(values)) if values.size else float('nan')
            else:
                means[label][metric] = float(np.nanmean(values))
    foreground_labels = [k for k in means if k not in (0, '0')]
    foreground = {m: float(np.mean([means[k][m] for k in foreground_labels]))
                  for m in means[labels[0]] if m not in ('HD95', 'HD95_undefined')}
    hd95 = [means[k]['HD95'] for k in foreground_labels if np.isfinite(means[k]['HD95'])]
    foreground['HD95'] = float(np.mean(hd95)) if hd95 else float('nan')
    summary = {'metric_per_case': results, 'mean': means, 'foreground_mean': foreground}
    recursive_fix_for_json_export(summary)
    return summary


def evaluate_cases(predictor, cases: Sequence[str], image_files: Dict[str, List[str]], label_files: Dict[str, str],
                   output_folder: str, num_processes: int = 0, verbose: bool = False,
                   save_probabilities: bool = False, previous_stage_predictions: Optional[str] = None) -> dict:
    """Predicts ``cases`` with nnU-Net's predictor into ``output_folder`` (``save_probabilities``: with nnU-Net's
    ``.npz``/``.pkl`` class probabilities; ``previous_stage_predictions``: a cascade stage's input, nnU-Net's
    folder_with_segs_from_prev_stage) and writes nnU-Net's summary.json (with HD95) there. Returns the summary as
    written (label keys as strings)."""
    from fednnunet.inference import predict_cases
    os.makedirs(output_folder, exist_ok=True)
    ending = predictor.dataset_json['file_ending']
    with contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext():
        predict_cases(predictor, [image_files[c] for c in cases], [os.path.join(output_folder, c) for c in cases],
                      num_processes, save_probabilities, previous_stage_predictions)
    lm = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    labels = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    reader = predictor.plans_manager.image_reader_writer_class()
    results = [case_metrics(label_files[c], os.path.join(output_folder, c + ending), reader, labels,
                            lm.ignore_label) for c in cases]
    save_summary_json(summarize_cases(results, labels), os.path.join(output_folder, 'summary.json'))
    with open(os.path.join(output_folder, 'summary.json')) as f:
        return json.load(f)  # the JSON form (labels as strings), as it travels to the server


def shareable_summary(summary: dict, file_ending: str) -> dict:
    """What a site sends of its summary: the numbers per case, named by case id (the file name without the
    dataset's file ending; ids may hold dots), without its file paths."""
    cases = [{'case': case_id(r['prediction_file'], file_ending), 'metrics': r['metrics']}
             for r in summary['metric_per_case']]
    return {'metric_per_case': cases, 'mean': summary['mean'], 'foreground_mean': summary['foreground_mean']}


def case_id(path: str, file_ending: str) -> str:
    name = os.path.basename(path)
    if not name.endswith(file_ending):
        raise ValueError(f'{name} does not end with {file_ending}')
    return name[:-len(file_ending)]


def pooled_summary(site_summaries: Dict[str, Optional[dict]]) -> dict:
    """Per-site mean Dice and HD95 per label, and the pooled Dice per label from summed TP/FP/FN."""
    out = {'per_site': {}, 'pooled': {}}
    totals: Dict[str, np.ndarray] = {}
    for site, summary in sorted(site_summaries.items()):
        if summary is None:
            continue
        row = {}
        for label, m in summary['mean'].items():
            row[str(label)] = {'Dice': m['Dice'], 'HD95': m.get('HD95')}
        row['foreground_mean'] = {'Dice': summary['foreground_mean']['Dice'],
                                  'HD95': summary['foreground_mean'].get('HD95')}
        row['num_cases'] = len(summary['metric_per_case'])
        out['per_site'][site] = row
        for case in summary['metric_per_case']:
            for label, m in case['metrics'].items():
                totals.setdefault(str(label), np.zeros(3))
                totals[str(label)] += [m['TP'], m['FP'], m['FN']]
    for label, (tp, fp, fn) in sorted(totals.items()):
        out['pooled'][label] = {'Dice': float(2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) > 0 else None,
                                'TP': int(tp), 'FP': int(fp), 'FN': int(fn)}
    if out['pooled']:
        dices = [v['Dice'] for v in out['pooled'].values() if v['Dice'] is not None]
        out['pooled_foreground_mean_dice'] = float(np.mean(dices)) if dices else None
    return out


def label_names(labels: Optional[dict], keys: Sequence[str]) -> Dict[str, str]:
    """Display names for summary keys ('1', '(1, 2)': nnU-Net's label or region keys) from dataset.json's
    ``labels`` (name -> value or region): the name whose value is the key; a region no name declares is named by
    the labels it combines ('grey_matter+white_matter'); the key itself where dataset.json says nothing."""
    from nnunetv2.evaluation.evaluate_predictions import key_to_label_or_region
    if not labels:
        return {k: str(k) for k in keys}

    def as_tuple(value):
        return tuple(sorted(int(v) for v in value)) if isinstance(value, (list, tuple)) else (int(value),)

    by_value = {}
    for name, value in labels.items():
        if name != 'ignore':
            by_value.setdefault(as_tuple(value), name)
    out = {}
    for key in keys:
        try:
            value = as_tuple(key_to_label_or_region(str(key)))
        except ValueError:
            out[key] = str(key)
            continue
        if value in by_value:
            out[key] = by_value[value]
        elif len(value) > 1 and all((v,) in by_value for v in value):
            out[key] = '+'.join(by_value[(v,)] for v in value)
        else:
            out[key] = str(key)
    return out


def format_table(pooled: dict, title: str = '', labels: Optional[dict] = None) -> str:
    """A plain-text table: one row per site, then the pooled row. ``labels``: dataset.json's ``labels`` (the
    columns are then named 'Dice grey_matter', ...; without it 'Dice 1', ...)."""
    sites = pooled['per_site']
    keys = sorted(pooled['pooled'], key=lambda x: (len(x), x))
    names = label_names(labels, keys)
    header = ['site', 'cases'] + [f'Dice {names[lb]}' for lb in keys] + ['mean Dice', 'mean HD95 [mm]']
    rows = []
    for site, row in sites.items():
        rows.append([site, str(row['num_cases'])] + [_f(row[lb]['Dice']) for lb in keys] +
                    [_f(row['foreground_mean']['Dice']), _f(row['foreground_mean']['HD95'], 2)])
    rows.append(['pooled', str(sum(r['num_cases'] for r in sites.values()))] +
                [_f(pooled['pooled'][lb]['Dice']) for lb in keys] + [_f(pooled.get('pooled_foreground_mean_dice')), ''])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ([title] if title else []) + ['  '.join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return '\n'.join(lines)


def _f(x, digits=4):
    return '-' if x is None or (isinstance(x, float) and np.isnan(x)) else f'{x:.{digits}f}'
