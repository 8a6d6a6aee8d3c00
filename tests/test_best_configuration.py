"""fednnunet_find_best_configuration: nnU-Net's choice from the federation's cross-validation with only counts leaving
the sites; equal to nnUNetv2_find_best_configuration where one site holds every case, equal to nnU-Net's evaluation
of the union of the sites' predictions where several do; the written instructions predict; bad counts and bad
requests are refused by name."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from fednnunet.best_configuration import BestConfiguration, Model, checked_counts, scores
from fednnunet.cli import predict_entry, train_entry
from fednnunet.cli_pipeline import (apply_postprocessing_entry, ensemble_entry, find_best_configuration_entry,
                                    instruction_commands, run_instructions)
from fednnunet.errors import FederationError
from fednnunet.federation import SITES_FILE, Federation, site_folder
from fednnunet.wire import Message

from conftest import DATASET_NAME, point_nnunet_folder

PLANS = 'nnUNetCPUPlans'
TINY = ['-p', PLANS, '--rounds', '1', '--local-iterations', '1', '--val-iterations', '1', '-device', 'cpu', '--npz']
MODELS = [f'FedAvgTrainer__{PLANS}__2d', f'FedAvgTrainer__{PLANS}__3d_fullres']


def _counts(dice_sum, dice_cases, tp, fp, fn):
    return {'dice_sum': dice_sum, 'dice_cases': dice_cases, 'tp': tp, 'fp': fp, 'fn': fn}


# ============================================================================== the rules, on counts

def test_scores_are_nnunets_means_over_the_union_of_the_cases_and_the_pooled_dice():
    # site 1: label 1 Dice 0.5 and 1.0 (two cases), label 2 undefined in one case; site 2: one case each
    a = {'1': _counts(1.5, 2, 30, 10, 20), '2': _counts(0.25, 1, 1, 3, 3)}
    b = {'1': _counts(0.75, 1, 6, 2, 2), '2': _counts(1.0, 1, 5, 0, 0)}
    s = scores([a, b])
    assert s['mean']['1']['Dice'] == pytest.approx((1.5 + 0.75) / 3)  # nnU-Net's nanmean over the three cases
    assert s['mean']['2']['Dice'] == pytest.approx((0.25 + 1.0) / 2)
    assert s['foreground_mean']['Dice'] == pytest.approx(np.mean([2.25 / 3, 1.25 / 2]))
    assert s['pooled_dice']['1'] == pytest.approx(2 * 36 / (2 * 36 + 12 + 22))
    no_case = {'1': _counts(0.0, 0, 0, 0, 0), '2': _counts(1.0, 1, 4, 0, 0)}
    assert math.isnan(scores([no_case])['mean']['1']['Dice'])
    assert math.isnan(scores([no_case])['foreground_mean']['Dice'])


@pytest.mark.parametrize('bad, field', [
    ({'num_cases': -1}, 'num_cases'), ({'num_cases': True}, 'num_cases'), ({'counts': 'x'}, 'counts'),
    ({'counts': [{'1': _counts(0.5, 1, 1, 1, 1)}]}, 'counts'),  # a label missing
    ({'counts': [{'1': _counts(3.0, 2, 1, 1, 1), '2': _counts(0.5, 1, 1, 1, 1)}]}, 'counts'),  # Dice sum > cases
    ({'counts': [{'1': _counts(float('nan'), 1, 1, 1, 1), '2': _counts(0.5, 1, 1, 1, 1)}]}, 'counts'),
    ({'counts': [{'1': _counts(0.5, 1, -4, 1, 1), '2': _counts(0.5, 1, 1, 1, 1)}]}, 'counts'),
    ({'counts': [{'1': _counts(0.5, 9, 1, 1, 1), '2': _counts(0.5, 1, 1, 1, 1)}]}, 'counts'),  # cases > num_cases
    ({'counts': [{'1': dict(_counts(0.5, 1, 1, 1, 1), extra=1), '2': _counts(0.5, 1, 1, 1, 1)}]}, 'counts'),
])
def test_counts_that_cannot_be_counts_are_refused_by_site_and_field(bad, field):
    good = {'num_cases': 2, 'counts': [{'1': _counts(0.5, 1, 1, 1, 1), '2': _counts(0.5, 1, 1, 1, 1)}]}
    assert checked_counts(Message('crossval_counts', good), 1, ['1', '2'], 'B')[1] == 2
    with pytest.raises(FederationError) as e:
        checked_counts(Message('crossval_counts', dict(good, **bad)), 1, ['1', '2'], 'B')
    assert e.value.site == 'B' and e.value.field == field


class CountingEngine:
    """Sites that count from a table {site: {source: {chain: per-label Dice}}}, one case each; a chain is keyed by its
    steps ('fg' for the foreground step, else the label), and a chain missing from the table counts as the chain
    without its last step (the step changed nothing). The site ``liar`` answers counts that cannot be counts."""

    def __init__(self, table, liar=None):
        self.table, self.liar, self.asked = table, liar, []
        self.site_names = sorted(table) + ([liar] if liar else [])

    def dice(self, site, source, chain):
        key = tuple('fg' if isinstance(s['labels_or_regions'], list) else s['labels_or_regions'] for s in chain)
        while key not in self.table[site][source]:
            key = key[:-1]
        return self.table[site][source][key]

    def ask(self, requests):
        self.asked.append(requests)
        out = {}
        for site, message in requests.items():
            if message.kind != 'crossval_counts':
                out[site] = Message('stored')
            elif site == self.liar:
                out[site] = Message('crossval_counts', {'num_cases': 1, 'counts': [{'1': _counts(5.0, 1, 1, 1, 1)}]})
            else:
                counts = [{k: _counts(d, 1, int(100 * d), 100 - int(100 * d), 0)
                           for k, d in self.dice(site, tuple(r['source']), r['chain']).items()}
                          for r in message.config['requests']]
                out[site] = Message('crossval_counts', {'num_cases': 1, 'counts': counts})
        return out


def test_the_choice_follows_nnunets_rules_per_group_and_leaves_out_a_site_with_bad_counts(monkeypatch, tmp_path):
    """A method without a global model: a pooled choice and one per site, each by nnU-Net's rules on its own counts;
    the site X that answers nonsense is named, left out and never asked again."""
    m2d, m3d, ens = (MODELS[0],), (MODELS[1],), (MODELS[0], MODELS[1])

    def d(one, two):
        return {'1': one, '2': two}
    engine = CountingEngine({
        'A': {m2d: {(): d(.70, .70)}, m3d: {(): d(.60, .60)},
              ens: {(): d(.80, .80), ('fg',): d(.85, .81), ('fg', 2): d(.85, .82)}},
        'B': {m2d: {(): d(.50, .50)}, m3d: {(): d(.90, .90), ('fg',): d(.95, .85), (1,): d(.96, .90)},
              ens: {(): d(.60, .60)}}}, liar='X')
    results = tmp_path / 'results'
    point_nnunet_folder(monkeypatch, 'nnUNet_results', results)
    for m in MODELS:
        (results / DATASET_NAME / m).mkdir(parents=True)
        (results / DATASET_NAME / m / 'plans.json').write_text(json.dumps(_plans()))
        (results / DATASET_NAME / m / 'dataset.json').write_text(json.dumps(
            {'labels': {'background': 0, 'grey_matter': 1, 'white_matter': 2}, 'channel_names': {'0': 'T1'},
             'file_ending': '.nii.gz', 'numTraining': 1}))
    models = [Model('fedper', 'FedAvgTrainer', PLANS, c) for c in ('2d', '3d_fullres')]  # (the folders above)
    info = BestConfiguration(engine, DATASET_NAME, models, [0, 1, 2, 3, 4], True, per_site=True,
                             log=lambda t: None).run()
    ens_name = f'ensemble___{MODELS[0]}___{MODELS[1]}___0_1_2_3_4'
    # pooled over A and B: 2d 0.60, 3d 0.75, the ensemble 0.70
    assert info['all_results'] == pytest.approx({MODELS[0]: .60, MODELS[1]: .75, ens_name: .70})
    best = info['best_model_or_ensemble']
    assert [m['configuration'] for m in best['selected_model_or_models']] == ['3d_fullres']
    # 3d pooled: the foreground step leaves the mean at 0.75 (refused); label 1's step raises label 1 to 0.78
    # (kept); label 2's changes nothing (refused)
    assert best['postprocessing_kwargs'] == [{'labels_or_regions': 1}]
    assert best['result_on_crossval_post_pp'] == pytest.approx(np.mean([.78, .75]))
    # A alone: the ensemble (0.80); the foreground step raises the mean and lowers no label (kept), label 1's
    # changes nothing, label 2's raises it 0.81 -> 0.82 (kept)
    a, b = info['per_site']['A'], info['per_site']['B']
    assert [m['configuration'] for m in a['selected_model_or_models']] == ['2d', '3d_fullres']
    assert a['postprocessing_kwargs'] == [{'labels_or_regions': [1, 2]}, {'labels_or_regions': 2}]
    # B alone: 3d (0.90); the foreground step lowers label 2 (refused), label 1's raises it (kept)
    assert [m['configuration'] for m in b['selected_model_or_models']] == ['3d_fullres']
    assert b['postprocessing_kwargs'] == [{'labels_or_regions': 1}]
    assert "site 'X'" in info['sites_left_out']['X'] and 'X' not in info['per_site']
    assert sum('X' in r for r in engine.asked) == 1
    assert 'Site A:' in info['instructions'] and '--site B' in info['instructions']
    # every site keeps its own decision (a method without a global model)
    stored = [r for r in engine.asked if next(iter(r.values())).kind == 'store_postprocessing']
    assert {s: m.config['requests'][0]['chain'] for r in stored for s, m in r.items()} == {
        'A': [{'function': 'remove_all_but_largest_component_from_segmentation', 'labels_or_regions': [1, 2]},
              {'function': 'remove_all_but_largest_component_from_segmentation', 'labels_or_regions': 2}],
        'B': [{'function': 'remove_all_but_largest_component_from_segmentation', 'labels_or_regions': 1}]}


def _plans():
    return {'dataset_name': DATASET_NAME, 'plans_name': PLANS, 'original_median_spacing_after_transp': [1, 1, 1],
            'original_median_shape_after_transp': [8, 8, 8], 'image_reader_writer': 'SimpleITKIO',
            'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2], 'configurations': {},
            'experiment_planner_used': 'x', 'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {}}


def test_a_site_refuses_requests_that_name_anything_but_its_models_folds_labels_and_the_one_function(planned):
    """What the server may ask: results folder names (no path), folds, sources among the models, postprocessing
    steps of nnU-Net's one function on the dataset's labels."""
    from fednnunet.crossval import crossval_counts
    from fednnunet.site_worker import SiteWorker
    worker = SiteWorker(planned.sites['A'], DATASET_NAME, 1, device='cpu')
    good = {'models': [MODELS[0]], 'folds': [0], 'rebuild': False, 'requests': []}
    assert crossval_counts(worker, Message('crossval_counts', good)).config['counts'] == []
    for bad, field in ((dict(good, models=['../../etc']), 'models'), (dict(good, models=['a__b']), 'models'),
                       (dict(good, folds=[7]), 'fold'), (dict(good, rebuild='yes'), 'rebuild'),
                       (dict(good, requests=[{'source': ['other__x__y']}]), 'requests'),
                       (dict(good, requests=[{'source': [MODELS[0]] * 2}]), 'requests')):
        with pytest.raises(FederationError) as e:
            crossval_counts(worker, Message('crossval_counts', bad))
        assert e.value.site == 'A' and e.value.field == field, (bad, e.value)
    from fednnunet.crossval import chain_from_wire
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = json.load(open(os.path.join(site_folder(DATASET_NAME, 'A'), PLANS + '.json')))
    lm = PlansManager(plans).get_label_manager(json.load(open(os.path.join(site_folder(DATASET_NAME, 'A'),
                                                                           'dataset.json'))))
    step = {'function': 'remove_all_but_largest_component_from_segmentation', 'labels_or_regions': [1, 2]}
    assert chain_from_wire([step, dict(step, labels_or_regions=2)], lm) == [step, dict(step, labels_or_regions=2)]
    for bad in ([dict(step, function='os.system')], [dict(step, labels_or_regions=[1, 7])],
                [dict(step, labels_or_regions=True)], [dict(step, extra=1)], [step] * 9, 'x'):
        with pytest.raises(FederationError):
            chain_from_wire(bad, lm, 'A')


# ============================================================================== end to end

@pytest.fixture(scope='module')
def one_site_cv(demo_raw, tmp_path_factory):
    """The tiny demo with every case at one site A (7 cases: nnU-Net's own 5-fold split), planned (2d, 3d_fullres)
    and trained on all five folds of both configurations with --npz (1 round of 1 iteration)."""
    root = tmp_path_factory.mktemp('one_site')
    with pytest.MonkeyPatch.context() as mp:
        for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
            (root / var).mkdir()
            point_nnunet_folder(mp, var, root / var)
        raw = root / 'nnUNet_raw' / DATASET_NAME
        shutil.copytree(demo_raw, raw)
        spec = json.load(open(raw / SITES_FILE))
        cases = sorted(c for e in spec['sites'].values() for c in e['cases'])
        json.dump({'sites': {'A': {'cases': cases}}}, open(raw / SITES_FILE, 'w'))
        from fednnunet.engines.simulation import SimulationEngine
        from fednnunet.plan_and_preprocess import plan_and_preprocess
        federation = Federation.from_raw(DATASET_NAME)
        plan_and_preprocess(SimulationEngine.for_federation(federation), DATASET_NAME, ['2d', '3d_fullres'],
                            'nnUNetPlannerCPU')
        for c in ('2d', '3d_fullres'):
            train_entry([DATASET_NAME, c, '0', '1', '2', '3', '4'] + TINY)
    return root  # nnU-Net's folders point back at the session's: other tests of this module use those


@pytest.fixture
def one_site(one_site_cv, monkeypatch):
    """nnU-Net's folders pointed at the one-site federation's for one test."""
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        point_nnunet_folder(monkeypatch, var, one_site_cv / var)
    return one_site_cv


def _nnunet_tree(root, tmp_path):
    """nnU-Net's own layout of site A's models (its results folders as nnU-Net's, its reference segmentations as the
    dataset's gt_segmentations), for nnUNetv2_find_best_configuration."""
    results, pre = tmp_path / 'nnunet_results' / DATASET_NAME, tmp_path / 'nnunet_pre' / DATASET_NAME
    results.mkdir(parents=True)
    pre.mkdir(parents=True)
    for m in MODELS:
        src = root / 'nnUNet_results' / DATASET_NAME / m / 'sites' / 'A'
        shutil.copytree(src, results / m, ignore=shutil.ignore_patterns('crossval_results_folds_*'))
    shutil.copytree(site_folder(DATASET_NAME, 'A'), pre, dirs_exist_ok=True, ignore=shutil.ignore_patterns('*.b2nd'))
    return results.parent, pre.parent


@pytest.mark.slow
def _add_stray_components(root):
    """A stray 2x2x2 blob of label 1 in a corner of every validation prediction of every fold: removing all but the
    largest component then pays, so the postprocessing decision has something to decide."""
    for m in MODELS:
        for fold in range(5):
            folder = root / 'nnUNet_results' / DATASET_NAME / m / 'sites' / 'A' / f'fold_{fold}' / 'validation'
            for f in folder.glob('*.nii.gz'):
                image = sitk.ReadImage(str(f))
                seg = sitk.GetArrayFromImage(image)
                seg[:2, :2, :2] = 1
                out = sitk.GetImageFromArray(seg)
                out.CopyInformation(image)
                sitk.WriteImage(out, str(f))


def test_one_site_with_every_case_chooses_as_nnunets_find_best_configuration(one_site, tmp_path, capsys):
    root = one_site
    _add_stray_components(root)
    find_best_configuration_entry([DATASET_NAME, '-c', '2d', '3d_fullres', '-p', PLANS])
    out = capsys.readouterr().out
    ours = json.load(open(root / 'nnUNet_results' / DATASET_NAME / 'inference_information.json'))
    nnunet_results, nnunet_pre = _nnunet_tree(root, tmp_path)
    with pytest.MonkeyPatch.context() as inner:
        point_nnunet_folder(inner, 'nnUNet_results', nnunet_results)
        point_nnunet_folder(inner, 'nnUNet_preprocessed', nnunet_pre)
        from nnunetv2.evaluation import find_best_configuration as fbc
        inner.setattr(fbc, 'nnUNet_results', str(nnunet_results))
        inner.setattr(fbc, 'nnUNet_preprocessed', str(nnunet_pre))
        theirs = fbc.find_best_configuration(DATASET_NAME, [{'plans': PLANS, 'configuration': c,
                                                             'trainer': 'FedAvgTrainer'} for c in ('2d', '3d_fullres')],
                                             num_processes=1)
    assert ours['all_results'] == pytest.approx(theirs['all_results'], abs=1e-12)
    ob, tb = ours['best_model_or_ensemble'], theirs['best_model_or_ensemble']
    assert [(m['configuration'], m['trainer'], m['plans_identifier']) for m in ob['selected_model_or_models']] == \
        [(m['configuration'], m['trainer'], m['plans_identifier']) for m in tb['selected_model_or_models']]
    assert ob['result_on_crossval_post_pp'] == pytest.approx(tb['result_on_crossval_post_pp'], abs=1e-12)
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    their_fns, their_kwargs = load_pickle(tb['postprocessing_file'])
    assert ob['postprocessing_fns'] == [f.__name__ for f in their_fns]
    assert ob['postprocessing_kwargs'] == json.loads(json.dumps(their_kwargs, default=int))
    assert ob['postprocessing_fns'], 'the stray components should make removing them pay'
    assert ob['result_on_crossval_post_pp'] > ob['result_on_crossval_pre_pp']
    our_fns, our_kwargs = load_pickle(ob['postprocessing_file'])  # nnU-Net's own file, for nnU-Net's tool
    assert [f.__name__ for f in our_fns] == [f.__name__ for f in their_fns] and our_kwargs == their_kwargs
    assert '*Best*' in out and 'fednnunet_predict' in out


@pytest.mark.slow
def test_the_written_instructions_predict_new_scans(one_site, tmp_path, capsys):
    """inference_instructions.txt's commands, run as written on a new scan: the five folds ensembled, the two
    configurations ensembled where they won (and fednnunet_ensemble on both either way), the decided postprocessing
    applied from its JSON."""
    root = one_site
    find_best_configuration_entry([DATASET_NAME, '-c', '2d', '3d_fullres', '-p', PLANS])
    capsys.readouterr()
    scans = tmp_path / 'scans'
    scans.mkdir()
    image = Federation.from_raw(DATASET_NAME).sites['A'].image_files('C_001')[0]
    shutil.copy(image, scans)
    text = open(root / 'nnUNet_results' / DATASET_NAME / 'inference_instructions.txt').read()
    final = run_instructions(text, str(scans), str(tmp_path), ['-device', 'cpu'])
    predicted = capsys.readouterr().out
    assert predicted.count('fold(s) 0, 1, 2, 3, 4, ensembled') == sum(c[0] == 'fednnunet_predict'
                                                                     for c in instruction_commands(text)) > 0
    assert final == str(tmp_path / 'OUTPUT_FOLDER_PP')
    folders = {}
    final = tmp_path / 'OUTPUT_FOLDER_PP' / 'C_001.nii.gz'
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(final)))
    assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(image)).shape and set(np.unique(seg)) <= {0, 1, 2}
    # the JSON decision applied as nnU-Net's tool applies its pickle
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing_to_folder
    info = json.load(open(root / 'nnUNet_results' / DATASET_NAME / 'inference_information.json'))
    fns, kwargs = load_pickle(info['best_model_or_ensemble']['postprocessing_file'])
    apply_postprocessing_to_folder(str(tmp_path / 'OUTPUT_FOLDER'), str(tmp_path / 'nnunet_pp'), fns, kwargs,
                                   info['best_model_or_ensemble']['some_plans_file'], None, 1)
    assert np.array_equal(seg, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'nnunet_pp' / 'C_001.nii.gz'))))
    # both configurations' fold ensembles, then their ensemble, whatever won
    for c in ('2d', '3d_fullres'):
        folders[c] = tmp_path / f'pred_{c}'
        predict_entry(['-i', str(scans), '-o', str(folders[c]), '-d', DATASET_NAME, '-c', c, '-p', PLANS,
                       '-device', 'cpu', '--save_probabilities'])
    ensemble_entry(['-i', str(folders['2d']), str(folders['3d_fullres']), '-o', str(tmp_path / 'ens')])
    p = [np.load(folders[c] / 'C_001.npz')['probabilities'] for c in ('2d', '3d_fullres')]
    ensembled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'ens' / 'C_001.nii.gz')))
    assert np.array_equal(ensembled, np.argmax((p[0] + p[1]) / 2, 0))


@pytest.mark.slow
def test_several_sites_score_as_nnunet_on_the_union_of_their_predictions(planned, fresh_results, tmp_path):
    """Three sites, folds 0 and 1: every candidate's score is nnU-Net's compute_metrics_on_folder over the union of
    the sites' merged predictions and references; nothing but counts was sent."""
    for c in ('2d', '3d_fullres'):
        train_entry([DATASET_NAME, c, '0', '1'] + TINY)
    from fednnunet.engines.simulation import SimulationEngine
    engine = SimulationEngine.for_federation(planned)
    sent = []
    ask = engine.ask

    def recording(requests):
        replies = ask(requests)
        sent.extend(r.config for r in replies.values())
        return replies
    engine.ask = recording
    models = [Model('fedavg', 'FedAvgTrainer', PLANS, c) for c in ('2d', '3d_fullres')]
    info = BestConfiguration(engine, DATASET_NAME, models, [0, 1], True, per_site=False, log=lambda t: None).run()
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    ens_name = f'ensemble___{MODELS[0]}___{MODELS[1]}___0_1'
    for name, where in ((MODELS[0], f'{MODELS[0]}/sites/{{site}}/crossval_results_folds_0_1'),
                        (MODELS[1], f'{MODELS[1]}/sites/{{site}}/crossval_results_folds_0_1'),
                        (ens_name, f'ensembles/{ens_name}/sites/{{site}}')):
        union, ref = tmp_path / name / 'pred', tmp_path / name / 'ref'
        union.mkdir(parents=True)
        ref.mkdir()
        for site in 'ABC':
            folder = fresh_results / DATASET_NAME / where.format(site=site)
            for f in os.listdir(folder):
                if f.endswith('.nii.gz'):
                    shutil.copy(folder / f, union / f)
                    shutil.copy(os.path.join(site_folder(DATASET_NAME, site), 'gt_segmentations', f), ref / f)
        theirs = compute_metrics_on_folder(str(ref), str(union), None, SimpleITKIO(), '.nii.gz', [1, 2], None, 1)
        assert info['all_results'][name] == pytest.approx(theirs['foreground_mean']['Dice'], abs=1e-12), name
    # what the sites sent: counts per label, no case name
    for config in sent:
        assert set(config) <= {'counts', 'num_cases'}
        assert all(set(c) == {'1', '2'} for c in config.get('counts', []))
    assert not any(case in json.dumps(sent) for case in ('A_000', 'B_000', 'C_000'))

    # over Flower (fednnunet_server --phase find_best; every message through Flower's encoding): the same decision
    pytest.importorskip('flwr')
    from test_flower import InProcessGrid, _workers, site_node
    from flwr.supercore.task_identity import TaskIdentity
    from fednnunet.engines.flower import FlowerEngine, from_record_dict
    from fednnunet.flower_app import run_server
    os.remove(fresh_results / DATASET_NAME / 'inference_information.json')
    grid = InProcessGrid({i: site_node(w, s) for i, (s, w) in enumerate(sorted(_workers(planned).items()), 1)})
    engine = FlowerEngine(grid, sites=['A', 'B', 'C'], dataset=DATASET_NAME, log=lambda t: None)
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as test_flower's task_identity
    try:
        result = run_server(grid, {'dataset': DATASET_NAME, 'phase': 'find_best', 'plans': PLANS,
                                   'find-best-configurations': '2d 3d_fullres', 'find-best-folds': '0 1',
                                   'sites': 'A B C'}, engine=engine)['find_best']
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
    assert result['all_results'] == info['all_results']
    assert result['best_model_or_ensemble'] == info['best_model_or_ensemble']
    assert json.load(open(fresh_results / DATASET_NAME / 'inference_information.json'))['all_results'] == \
        info['all_results']
    kinds = {from_record_dict(m.content).kind for m in grid.sent}
    assert kinds >= {'crossval_counts'} and kinds <= {'identify', 'crossval_counts', 'store_postprocessing'}


def test_apply_postprocessing_reads_the_json_decision_and_refuses_anything_else(tmp_path, capsys):
    """Two components of label 1: the decision 'all but the largest of label 1' keeps the larger; a decision naming
    another function or a label the dataset lacks is refused before anything is written."""
    from fednnunet.crossval import write_postprocessing_files
    seg = np.zeros((6, 6, 6), dtype=np.uint8)
    seg[0:3, 0:3, 0:3] = 1
    seg[5, 5, 5] = 1
    seg[4, 0, 0] = 2
    folder = tmp_path / 'pred'
    folder.mkdir()
    img = sitk.GetImageFromArray(seg)
    sitk.WriteImage(img, str(folder / 'x.nii.gz'))
    dataset_json = {'labels': {'background': 0, 'a': 1, 'b': 2}, 'channel_names': {'0': 'T1'},
                    'file_ending': '.nii.gz', 'numTraining': 1}
    (folder / 'dataset.json').write_text(json.dumps(dataset_json))
    (folder / 'plans.json').write_text(json.dumps(_plans()))
    step = {'function': 'remove_all_but_largest_component_from_segmentation', 'labels_or_regions': 1}
    summary = {'input_folder': {'foreground_mean': {'Dice': .5}, 'mean': {'1': {'Dice': .5}}},
               'postprocessed': {'foreground_mean': {'Dice': .6}, 'mean': {'1': {'Dice': .6}}}}
    write_postprocessing_files(str(tmp_path / 'decision'), [step], summary)
    apply_postprocessing_entry(['-i', str(folder), '-o', str(tmp_path / 'out'), '-pp_json',
                                str(tmp_path / 'decision' / 'postprocessing.json')])
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'out' / 'x.nii.gz')))
    assert out[5, 5, 5] == 0 and out[0, 0, 0] == 1 and out[4, 0, 0] == 2
    for bad in ({'postprocessing_fns': ['system'], 'postprocessing_kwargs': [{'labels_or_regions': 1}]},
                {'postprocessing_fns': [step['function']], 'postprocessing_kwargs': [{'labels_or_regions': 9}]}):
        (tmp_path / 'bad.json').write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            apply_postprocessing_entry(['-i', str(folder), '-o', str(tmp_path / 'bad_out'), '-pp_json',
                                        str(tmp_path / 'bad.json')])
        assert 'fednnunet: error:' in capsys.readouterr().err
        assert not (tmp_path / 'bad_out').exists()
