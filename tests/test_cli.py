"""The command lines as a new user meets them: fast --help and argument errors, every value checked while parsing
(one-line errors, exit status 2, nothing written), the device rule, and errors that say what does exist."""
import json
import os
import subprocess
import sys
import types

import pytest

from fednnunet import cli, method_names
from fednnunet.cli import (demo_next_steps, demo_parser, evaluate_entry, evaluate_parser, plan_and_preprocess_parser,
                           predict_entry, predict_parser, train_entry, train_parser)
from fednnunet.cli_args import FedArgumentParser, other_spelling
from fednnunet.errors import FederationError
from fednnunet.evaluation import format_table
from fednnunet.cli_pipeline import apply_postprocessing_parser, ensemble_parser, find_best_configuration_parser
from fednnunet.flower_cli import run_config_from_args, server_entry, server_parser, site_entry, site_parser

from conftest import DATASET_ID, DATASET_NAME

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = 'nnUNetCPUPlans'
PARSERS = {'fednnunet_train': (train_parser, ['501', '3d_fullres']),
           'fednnunet_predict': (predict_parser, ['-i', 'in', '-o', 'out', '-d', '501', '-c', '3d_fullres']),
           'fednnunet_evaluate': (evaluate_parser, ['-d', '501', '-c', '3d_fullres']),
           'fednnunet_server': (server_parser, ['-d', '501'])}


ALL_PARSERS = (train_parser, predict_parser, evaluate_parser, plan_and_preprocess_parser, demo_parser, server_parser,
               site_parser, find_best_configuration_parser, ensemble_parser, apply_postprocessing_parser)


#: a stand-in for a method the project plans but has not built
PLANNED_NAME, PLANNED_SUMMARY = 'fedplanned', 'a planned method'

def _error(capsys, parse, argv) -> str:
    """The one-line error of a command line that must not parse (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('fednnunet: error: ') and '\n' not in err, err
    return err


# ============================================================================================ 1. fast, no imports

def test_help_and_argument_errors_import_neither_torch_nor_nnunet():
    """--help and a wrong argument of every command answer before torch, nnU-Net or Flower is imported."""
    calls = [('fednnunet.cli', 'train_entry', ['--help']),
             ('fednnunet.cli', 'train_entry', ['501', '3d_fullres', '--method', 'nope']),
             ('fednnunet.cli', 'train_entry', ['501', '3d_fullres', '--method', PLANNED_NAME]),
             ('fednnunet.cli', 'predict_entry', ['--help']),
             ('fednnunet.cli', 'predict_entry', ['-i', 'x', '-o', 'y', '-d', '501', '-c', '2d', '--method', 'nope']),
             ('fednnunet.cli', 'evaluate_entry', ['--help']),
             ('fednnunet.cli', 'evaluate_entry', ['-d', '501', '-c', '2d', '--method', PLANNED_NAME]),
             ('fednnunet.cli', 'plan_and_preprocess_entry', ['--help']),
             ('fednnunet.cli', 'plan_and_preprocess_entry', ['-d', '501', '-np', '0']),
             ('fednnunet.cli', 'demo_entry', ['--help']),
             ('fednnunet.cli', 'demo_entry', ['--methods', 'nope']),
             ('fednnunet.cli', 'demo_data_entry', ['--size', '8']),
             ('fednnunet.flower_cli', 'server_entry', ['--help']),
             ('fednnunet.flower_cli', 'server_entry', ['-d', '501', '--method', 'nope', '--insecure']),
             ('fednnunet.flower_cli', 'site_entry', ['--help']),
             ('fednnunet.flower_cli', 'site_entry', ['--site', 'A', '-d', '501', '--server', 'x:0'])]
    code = ('import importlib, json, sys, time\n'
            'import fednnunet.method_names\n'
            f'fednnunet.method_names.PLANNED[{PLANNED_NAME!r}] = {PLANNED_SUMMARY!r}\n'
            'codes = []\n'
            't0 = time.time()\n'
            'for module, entry, argv in json.loads(sys.argv[1]):\n'
            '    try:\n'
            '        getattr(importlib.import_module(module), entry)(argv)\n'
            '    except SystemExit as e:\n'
            '        codes.append(e.code or 0)\n'
            'heavy = sorted(m for m in ("torch", "nnunetv2", "flwr") if m in sys.modules)\n'
            'print(json.dumps({"codes": codes, "heavy": heavy, "seconds": time.time() - t0}))\n')
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    done = subprocess.run([sys.executable, '-c', code, json.dumps(calls)], capture_output=True, text=True, env=env,
                          timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result['heavy'] == [], done.stderr
    assert result['codes'] == [0 if argv == ['--help'] else 2 for _, _, argv in calls], done.stderr
    assert 'not implemented yet' in done.stderr and "unknown method 'nope'" in done.stderr


def test_method_names_agree_with_the_methods():
    from fednnunet import methods
    from fednnunet.trainers.centralized import CentralizedTrainer
    assert set(method_names.METHODS) == set(methods.METHODS)
    for name, m in methods.METHODS.items():
        assert method_names.METHODS[name] == (m.trainer.__name__, m.summary)
        assert method_names.method_of_trainer_name(m.trainer.__name__) == name
    assert method_names.CENTRALIZED == methods.CENTRALIZED
    assert method_names.CENTRALIZED_TRAINER == CentralizedTrainer.__name__
    assert methods.PLANNED == method_names.PLANNED
    assert not set(method_names.PLANNED) & set(method_names.METHODS)
    methods.check_method_names()


@pytest.fixture
def a_planned_method(monkeypatch):
    """A method the project plans but has not built (every planned one is built today)."""
    monkeypatch.setitem(method_names.PLANNED, PLANNED_NAME, PLANNED_SUMMARY)


@pytest.mark.parametrize('command', sorted(PARSERS))
def test_method_is_checked_while_parsing(capsys, command, a_planned_method):
    parser, base = PARSERS[command]
    err = _error(capsys, parser().parse_args, base + ['--method', 'nope'])
    assert "argument --method: unknown method 'nope'; available: fedavg, fedbn" in err and command in err
    err = _error(capsys, parser().parse_args, base + ['--method', PLANNED_NAME])
    assert f"method '{PLANNED_NAME}' ({PLANNED_SUMMARY}) is not implemented yet" in err
    for name in method_names.METHODS:
        assert parser().parse_args(base + ['--method', name]).method == name
    if command == 'fednnunet_server':
        assert 'does not run over Flower' in _error(capsys, parser().parse_args, base + ['--method', 'centralized'])
    else:
        assert parser().parse_args(base + ['--method', 'centralized']).method == 'centralized'
    help_text = parser().format_help()
    assert f'planned, not implemented yet: {PLANNED_NAME}' in help_text
    assert method_names.METHODS['fedprox'][1] in help_text


def test_demo_checks_its_methods(capsys, a_planned_method):
    assert demo_parser().parse_args(['--methods', 'local', 'fedavg']).methods == ['local', 'fedavg']
    assert 'not implemented yet' in _error(capsys, demo_parser().parse_args, ['--methods', 'fedavg', PLANNED_NAME])


# ============================================================================================ 2. numbers

NUMERIC = [
    (train_parser, ['501', '3d_fullres'], [('--rounds', '0', '>= 1'), ('--rounds', '-3', '>= 1'),
                                           ('--local-iterations', '0', '>= 1'), ('--val-iterations', '0', '>= 1'),
                                           ('--seed', '-1', '>= 0'), ('-np', '0', '>= 1'),
                                           ('--stage2-rounds', '-1', '>= 0'), ('--mu', '-0.1', '>= 0'),
                                           ('--alpha', '-1', '>= 0'), ('--igc-lambda', '-1', '>= 0'),
                                           ('--head-fraction', '1', 'in [0, 1)'),
                                           ('--head-fraction', '-0.1', 'in [0, 1)'),
                                           ('--rounds', 'ten', 'an integer is needed'),
                                           ('--mu', 'nan', '>= 0')]),
    (predict_parser, PARSERS['fednnunet_predict'][1], [('-npp', '-1', '>= 0')]),
    (evaluate_parser, PARSERS['fednnunet_evaluate'][1], [('-np', '0', '>= 1')]),
    (server_parser, ['-d', '501'], [('--rounds', '0', '>= 1'), ('--local-iterations', '0', '>= 1'),
                                    ('--val-iterations', '0', '>= 1'), ('--seed', '-5', '>= 0'),
                                    ('--min-sites', '0', '>= 1'), ('--round-timeout', '0', '> 0'),
                                    ('--wait-for-sites', '-1', '> 0'), ('--identify-timeout', '0', '> 0'),
                                    ('--settle-seconds', '-1', '>= 0'), ('--port', '0', '1-65535'),
                                    ('--port', '65536', '1-65535'), ('-gpu_memory_target', '0', '> 0'),
                                    ('--mu', '-1', '>= 0'), ('--superlink', 'localhost', 'HOST:PORT'),
                                    ('--superlink', 'localhost:99999', 'HOST:PORT')]),
    (site_parser, ['--site', 'A', '-d', '501', '--server', '127.0.0.1:9092'],
     [('-np', '0', '>= 1'), ('--local-port', '70000', '1-65535'), ('--max-wait-time', '0', '> 0')]),
    (demo_parser, [], [('--size', '15', '>= 16'), ('--rounds', '0', '>= 1'), ('--local-iterations', '0', '>= 1'),
                       ('--val-iterations', '0', '>= 1'), ('-np', '0', '>= 1'), ('--seed', '-1', '>= 0')]),
]


@pytest.mark.parametrize('parser, base, cases', NUMERIC, ids=lambda x: getattr(x, '__name__', None))
def test_numbers_are_checked_while_parsing(capsys, parser, base, cases):
    for flag, value, expected in cases:
        err = _error(capsys, parser().parse_args, base + [flag, value])
        assert f'argument {flag}: ' in err and expected in err, (flag, value, err)


def test_plan_and_preprocess_numbers(capsys):
    from fednnunet.cli import plan_and_preprocess_entry
    for argv, expected in ((['-np', '0'], 'argument -np: must be an integer >= 1, got 0'),
                           (['-gpu_memory_target', '-4'], 'argument -gpu_memory_target: must be a number > 0'),
                           (['-overwrite_target_spacing', '1', '0', '1'],
                            'argument -overwrite_target_spacing: must be a number > 0, got 0')):
        assert expected in _error(capsys, plan_and_preprocess_entry, ['-d', '501'] + argv)
    assert 'argument --size: must be an integer >= 16, got 8' in _error(capsys, cli.demo_data_entry, ['--size', '8'])


def test_bad_numbers_write_nothing_and_train_nothing(fresh_results, capsys, monkeypatch):
    """Today's --rounds 0 / --local-iterations 0 reached nnU-Net (ZeroDivisionError, IndexError, files left)."""
    monkeypatch.setattr('fednnunet.federation.Federation.from_raw',
                        lambda *a, **k: pytest.fail('the federation was opened after a bad argument'))
    for argv in (['--rounds', '0'], ['--rounds', '-2'], ['--local-iterations', '0'], ['--val-iterations', '0']):
        err = _error(capsys, train_entry, ['501', '3d_fullres', '0', '--method', 'fedavg', '-p', PLANS] + argv)
        assert f'fednnunet: error: fednnunet_train: argument {argv[0]}: must be an integer >= 1' in err
    assert os.listdir(fresh_results) == []


def test_values_in_range_parse():
    args = train_parser().parse_args(['501', '3d_fullres', '--rounds', '1', '--local-iterations', '1', '--seed', '0',
                                      '--head-fraction', '0', '--mu', '0', '--stage2-rounds', '0'])
    assert (args.rounds, args.local_iterations, args.seed, args.head_fraction, args.mu) == (1, 1, 0, 0.0, 0.0)
    args = server_parser().parse_args(['-d', '501', '--port', '65535', '--superlink', '[::1]:9093',
                                       '--settle-seconds', '0', '--min-sites', '1'])
    assert (args.port, args.superlink, args.settle_seconds, args.min_sites) == (65535, '[::1]:9093', 0.0, 1)


# ============================================================================================ 3. folds

@pytest.mark.parametrize('command', sorted(PARSERS))
def test_fold_is_0_to_4_or_all(capsys, command):
    parser, base = PARSERS[command]

    def with_fold(value):
        return base + [value] if command == 'fednnunet_train' else base + ['-f', value]

    name = 'fold' if command == 'fednnunet_train' else '-f/--fold' if command == 'fednnunet_server' else '-f'
    for bad in ('7', '5', '-1', 'x'):
        err = _error(capsys, parser().parse_args, with_fold(bad))
        assert f"argument {name}: a fold is 0, 1, 2, 3, 4 or all, got '{bad}'" in err
    for good in ('0', '4', 'all'):
        args = parser().parse_args(with_fold(good))
        value = getattr(args, 'fold', getattr(args, 'f', None))
        # fednnunet_train and fednnunet_predict take several folds (cross-validation, fold ensembles)
        assert value == ([good] if command in ('fednnunet_train', 'fednnunet_predict') else good)
    assert '0-4 or all' in parser().format_help()


# ============================================================================================ 4. device

@pytest.fixture
def no_cuda(monkeypatch):
    import torch
    from fednnunet import site_training
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(site_training, '_cpu_notice_shown', False)


def test_default_device_is_cuda_if_available_else_cpu_with_one_notice(no_cuda, capsys, monkeypatch):
    import torch
    from fednnunet.site_training import resolve_device
    from fednnunet.site_worker import SiteWorker
    assert resolve_device() == torch.device('cpu') and resolve_device(None) == torch.device('cpu')
    assert resolve_device('auto') == torch.device('cpu')
    out = capsys.readouterr().out
    assert out.count('fednnunet: CUDA is not available on this machine; training and inference run on the CPU') == 1
    assert resolve_device('cpu') == torch.device('cpu') and capsys.readouterr().out == ''
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert resolve_device() == torch.device('cuda') and resolve_device('cuda') == torch.device('cuda')
    import inspect
    assert inspect.signature(SiteWorker).parameters['device'].default == 'auto'


def test_explicit_cuda_without_cuda_is_an_error(no_cuda, capsys, fresh_results, monkeypatch):
    from fednnunet.site_training import resolve_device
    expected = 'fednnunet: error: -device cuda: CUDA is not available on this machine; use -device cpu'
    with pytest.raises(FederationError, match='^-device cuda: CUDA is not available on this machine; use -device cpu$'):
        resolve_device('cuda')
    monkeypatch.setattr('fednnunet.federation.Federation.from_raw',
                        lambda *a, **k: pytest.fail('the federation was opened before the device was checked'))
    for entry, argv in ((train_entry, ['501', '3d_fullres', '-p', PLANS]),
                        (evaluate_entry, ['-d', '501', '-c', '3d_fullres']),
                        (predict_entry, ['-i', 'in', '-o', str(fresh_results / 'out'), '-d', '501', '-c', '2d']),
                        (cli.demo_entry, ['--workdir', str(fresh_results / 'demo')]),
                        (site_entry, ['--site', 'A', '-d', '501', '--server', '127.0.0.1:9092', '--insecure'])):
        assert _error(capsys, entry, argv + ['-device', 'cuda']) == expected
    assert os.listdir(fresh_results) == []


def test_site_passes_auto_unless_a_device_is_given(demo_raw, no_cuda):
    from fednnunet.flower_cli import site_setup
    pytest.importorskip('flwr')

    def node_config(argv):
        cmd, _ = site_setup(site_parser().parse_args(['--site', 'A', '-d', str(DATASET_ID), '--server',
                                                      '127.0.0.1:9092', '--insecure', '-np', '1'] + argv),
                            'secret-file')
        return cmd[cmd.index('--node-config') + 1]
    assert 'device="auto"' in node_config([])
    assert 'device="cpu"' in node_config(['-device', 'cpu'])


def test_flower_client_app_defaults_to_auto(demo_raw, monkeypatch):
    pytest.importorskip('flwr')
    from fednnunet import flower_app
    context = types.SimpleNamespace(node_config={'site-id': 'A', 'dataset': str(DATASET_ID)})
    worker = flower_app._site_worker(context)
    assert worker.device_name == 'auto'


# ============================================================================================ 5-7. what exists

def _fake_model(results, trainer, plans, configuration, folds=('0',), sites=(), global_model=True,
                channels=None):
    """A results folder as training leaves it (empty checkpoints: nothing here loads them)."""
    base = results / DATASET_NAME / f'{trainer}__{plans}__{configuration}'
    base.mkdir(parents=True)
    dataset_json = {'channel_names': channels or {'0': 'T1'}, 'file_ending': '.nii.gz',
                    'labels': {'background': 0, 'grey_matter': 1, 'white_matter': 2}}
    (base / 'dataset.json').write_text(json.dumps(dataset_json))
    for fold in folds:
        (base / f'fold_{fold}').mkdir()
        if global_model:
            (base / f'fold_{fold}' / 'checkpoint_final.pth').write_bytes(b'')
        for site in sites:
            (base / 'sites' / site / f'fold_{fold}').mkdir(parents=True, exist_ok=True)
            (base / 'sites' / site / 'dataset.json').write_text(json.dumps(dataset_json))
            (base / 'sites' / site / f'fold_{fold}' / 'checkpoint_final.pth').write_bytes(b'')
    return base


def test_predict_with_an_unknown_site_lists_the_sites(fresh_results, tmp_path, capsys):
    base = _fake_model(fresh_results, 'FedRepTrainer', PLANS, '3d_fullres', sites=('A', 'B', 'C'),
                       global_model=False)
    (base / 'sites' / 'D' / 'fold_0').mkdir(parents=True)  # a site whose training did not finish
    argv = ['-i', str(tmp_path), '-o', str(tmp_path / 'out'), '-d', '501', '-c', '3d_fullres', '-p', PLANS,
            '--method', 'fedrep', '-device', 'cpu', '--site']
    assert _error(capsys, predict_entry, argv + ['Z']) == \
        "fednnunet: error: unknown site 'Z'; sites with a trained model: A, B, C"
    assert _error(capsys, predict_entry, argv + ['D']) == \
        "fednnunet: error: site 'D' has no fold with checkpoint_final.pth (was its training finished?); sites with " \
        "a trained model: A, B, C"
    assert _error(capsys, predict_entry, argv + ['D', '-f', '0']) == \
        "fednnunet: error: site 'D' has no fold_0/checkpoint_final.pth (was its training finished?); sites with a " \
        "trained model: A, B, C"
    assert not (tmp_path / 'out').exists()


def test_predict_checks_the_input_names_before_predicting(fresh_results, tmp_path, capsys):
    _fake_model(fresh_results, 'FedAvgTrainer', PLANS, '3d_fullres')
    images = tmp_path / 'in'
    images.mkdir()
    for name in ('brain.nii.gz', 'x_0000.nii.gz', 'y_0003.nii.gz', 'notes.txt', 'z_0000.nii'):
        (images / name).write_bytes(b'')
    argv = ['-i', str(images), '-o', str(tmp_path / 'out'), '-d', '501', '-c', '3d_fullres', '-p', PLANS,
            '-device', 'cpu']
    assert _error(capsys, predict_entry, argv) == (
        f"fednnunet: error: -i {images}: 2 file(s) are not named CASE_XXXX.nii.gz (XXXX: the channel, 0000 for "
        f"'T1'): brain.nii.gz, y_0003.nii.gz")
    assert not (tmp_path / 'out').exists()
    for name in os.listdir(images):
        os.remove(images / name)
    assert 'no image named CASE_XXXX.nii.gz' in _error(capsys, predict_entry, argv)


def test_input_files_follow_nnunet_naming(tmp_path):
    from fednnunet.inference import input_files
    dataset_json = {'channel_names': {'0': 'T1', '1': 'FLAIR'}, 'file_ending': '.nii.gz'}
    for name in ('a_b_0000.nii.gz', 'a_b_0001.nii.gz', 'c_0000.nii.gz', 'c_0001.nii.gz', 'readme.txt', 'c.json'):
        (tmp_path / name).write_bytes(b'')
    assert input_files(str(tmp_path), dataset_json) == [[str(tmp_path / 'a_b_0000.nii.gz'),
                                                         str(tmp_path / 'a_b_0001.nii.gz')],
                                                        [str(tmp_path / 'c_0000.nii.gz'),
                                                         str(tmp_path / 'c_0001.nii.gz')]]
    os.remove(tmp_path / 'c_0001.nii.gz')
    with pytest.raises(FederationError, match=r"1 case\(s\) lack a channel .*0000 for 'T1', 0001 for 'FLAIR'.*"
                                              r"missing: c_0001.nii.gz$"):
        input_files(str(tmp_path), dataset_json)
    # a model that predicts without some channels (FedMM's) takes the files a case has
    assert input_files(str(tmp_path), dataset_json, missing_channels_ok=True)[1] == [str(tmp_path / 'c_0000.nii.gz')]
    for i in range(7):
        (tmp_path / f'scan{i}.nii.gz').write_bytes(b'')
    with pytest.raises(FederationError, match=r'7 file\(s\) are not named .*: scan0.nii.gz, scan1.nii.gz, '
                                              r'scan2.nii.gz, scan3.nii.gz, scan4.nii.gz, \.\.\. \(7 in all\)$'):
        input_files(str(tmp_path), dataset_json)
    with pytest.raises(FederationError, match='not a folder'):
        input_files(str(tmp_path / 'nope'), dataset_json)


def test_a_model_that_does_not_exist_lists_the_trained_ones(demo_raw, fresh_results, tmp_path, capsys):
    empty = ['-d', '501', '-c', '3d_fullres', '-device', 'cpu']
    err = _error(capsys, evaluate_entry, empty)
    assert 'no model trained with --method fedavg -p nnUNetPlans -c 3d_fullres' in err and 'train one' in err
    _fake_model(fresh_results, 'FedAvgTrainer', PLANS, '3d_fullres', folds=('0', '1'))
    _fake_model(fresh_results, 'FedRepTrainer', PLANS, '2d', sites=('A', 'B', 'C'), global_model=False)
    _fake_model(fresh_results, 'nnUNetTrainer', 'nnUNetPlans', '3d_fullres')  # stock nnU-Net: not listed
    err = _error(capsys, predict_entry, ['-i', str(tmp_path), '-o', str(tmp_path / 'out'), '-d', '501', '-c',
                                         '3d_fullres', '-device', 'cpu'])
    folder = fresh_results / DATASET_NAME / 'FedAvgTrainer__nnUNetPlans__3d_fullres'
    assert err == (f"fednnunet: error: no model trained with --method fedavg -p nnUNetPlans -c 3d_fullres for "
                   f"{DATASET_NAME} ({folder} does not exist); trained models: fedavg (-c 3d_fullres -p {PLANS}; "
                   f"fold(s) 0, 1); fedrep (-c 2d -p {PLANS}; fold(s) 0; personalized models only, at site(s) A, B, "
                   f"C). E.g.: fednnunet_predict -i IN -o OUT -d 501 -c 3d_fullres -p {PLANS} --method fedavg -f 0")
    err = _error(capsys, predict_entry, ['-i', str(tmp_path), '-o', str(tmp_path / 'out'), '-d', '501', '-c', '2d',
                                         '--method', 'fedrep', '-device', 'cpu'])
    assert err.endswith(f'E.g.: fednnunet_predict -i IN -o OUT -d 501 -c 2d -p {PLANS} --method fedrep -f 0 '
                        f'--site A')
    err = _error(capsys, evaluate_entry, empty + ['-f', '1'])
    assert err.endswith(f'E.g.: fednnunet_evaluate -d 501 -c 3d_fullres -p {PLANS} --method fedavg -f 1')
    assert not (tmp_path / 'out').exists()


def test_demo_ends_with_the_commands_to_go_on_with(tmp_path, monkeypatch):
    monkeypatch.setenv('nnUNet_results', '/data/results')
    text = demo_next_steps(501, '/data/raw/Dataset501_FedBrainDemo', '3d_fullres', PLANS,
                           ['local', 'fedavg', 'fedrep'], 'A', '/work/demo', None, exported=('nnUNet_results',))
    lines = text.splitlines()
    images = '/data/raw/Dataset501_FedBrainDemo/imagesTr'
    assert '  export nnUNet_results=/data/results' in lines
    assert (f'  fednnunet_predict -i {images} -o /work/demo/predictions_fedavg -d 501 -c 3d_fullres -p {PLANS} '
            f'--method fedavg') in lines
    assert f'  fednnunet_evaluate -d 501 -c 3d_fullres -p {PLANS} --method fedavg' in lines
    assert (f'  fednnunet_predict -i {images} -o /work/demo/predictions_local_A -d 501 -c 3d_fullres -p {PLANS} '
            f'--method local --site A') in lines
    text = demo_next_steps(501, '/raw', '2d', PLANS, ['fedavg'], 'A', '/w', 'cpu')
    assert 'export' not in text and '--site' not in text and text.count('-device cpu') == 2


def test_the_commands_the_demo_prints_parse():
    text = demo_next_steps(501, '/raw', '3d_fullres', PLANS, ['fedavg', 'fedbn'], 'B', '/w', 'cpu')
    commands = [line.split()[1:] for line in text.splitlines() if line.startswith('  fednnunet_')]
    parsers = {'fednnunet_predict': predict_parser, 'fednnunet_evaluate': evaluate_parser}
    for line in text.splitlines():
        if line.startswith('  fednnunet_'):
            name, *argv = line.split()
            args = parsers[name]().parse_args(argv)
            assert (args.p, args.c, args.d) == (PLANS, '3d_fullres', '501')
    assert len(commands) == 3


# ============================================================================================ 8. spelling

def test_flags_have_one_style_and_accept_the_other_spelling(capsys):
    assert other_spelling('--local-iterations') == '--local_iterations'
    assert other_spelling('--no_pp') == '--no-pp' and other_spelling('-gpu_memory_target') == '-gpu-memory-target'
    assert other_spelling('--rounds') is None
    args = train_parser().parse_args(['501', '3d_fullres', '--local_iterations', '3', '--val_iterations', '2',
                                      '--no_val', '--state_in_memory', '--head_fraction', '0.5', '--igc_lambda', '2',
                                      '--stage2_rounds', '1', '--c'])
    assert (args.local_iterations, args.val_iterations, args.no_val, args.state_in_memory, args.head_fraction,
            args.igc_lambda, args.stage2_rounds, args.continue_training) == (3, 2, True, True, 0.5, 2.0, 1, True)
    assert train_parser().parse_args(['501', '3d_fullres', '--continue']).continue_training
    assert train_parser().parse_args(['501', '3d_fullres', '--local', '7']).local_iterations == 7  # abbreviation
    args = predict_parser().parse_args(PARSERS['fednnunet_predict'][1] + ['--disable-tta', '--save-probabilities'])
    assert args.disable_tta and args.save_probabilities
    args = server_parser().parse_args(['-d', '501', '--round_timeout', '5', '--min_sites', '2', '--c',
                                       '--auth_keys', 'k.pub', '--tls_dir', 'certs', '--no_val', '--wait_for_sites', '9',
                                       '-gpu-memory-target', '4', '-overwrite-plans-name', 'X'])
    assert (args.round_timeout, args.min_sites, args.continue_training, args.auth_keys, args.tls_dir, args.no_val,
            args.wait_for_sites, args.gpu_memory_target, args.overwrite_plans_name) == \
        (5.0, 2, True, ['k.pub'], 'certs', True, 9.0, 4.0, 'X')
    assert server_parser().parse_args(['-d', '501', '--auth-key', 'a.pub']).auth_keys == ['a.pub']
    assert site_parser().parse_args(['--site', 'A', '-d', '1', '--server', 'h:1', '--auth_key', 'k',
                                     '--max_wait_time', '3', '--local_port', '9']).local_port == 9
    args = plan_and_preprocess_parser().parse_args(['-d', '501', '--no-pp', '-gpu-memory-target', '4',
                                                    '-overwrite-target-spacing', '1', '2', '3'])
    assert args.no_pp and args.gpu_memory_target == 4.0 and args.overwrite_target_spacing == [1.0, 2.0, 3.0]
    for parser in ALL_PARSERS:
        text = parser().format_help()
        assert '--local_iterations' not in text and '--no-pp' not in text and '--disable-tta' not in text
        assert '--round_timeout' not in text and '-gpu-memory-target' not in text


def test_every_long_flag_has_one_style():
    """fednnunet-only flags are kebab-case; nnU-Net's keep nnU-Net's spelling."""
    nnunet_spellings = {'--no_pp', '--disable_tta', '--save_probabilities', '-gpu_memory_target',
                        '-overwrite_plans_name', '-overwrite_target_spacing', '-prev_stage_predictions',
                        '--disable_ensembling', '--save_npz', '-plans_json', '-dataset_json',
                        '-pp_json'}  # (the last: nnU-Net's -pp_pkl_file, as JSON)
    for parser in ALL_PARSERS:
        for action in parser()._actions:
            for option in action.option_strings:
                assert '_' not in option or option in nnunet_spellings, option


def test_the_server_finds_the_best_configuration_with_nnunets_options(capsys):
    """fednnunet_server --phase find_best: the configurations, folds and ensembling reach the run config; they apply
    to that phase only, and it trains nothing (no --continue)."""
    args = server_parser().parse_args(['-d', '501', '--phase', 'find_best', '--find-best-configurations', '2d',
                                       '3d_fullres', '--find-best-folds', '0', '1', '--disable_ensembling'])
    config = run_config_from_args(args)
    assert (config['phase'], config['find-best-configurations'], config['find-best-folds'],
            config['disable-ensembling'], config['plans']) == ('find_best', '2d 3d_fullres', '0 1', True, 'nnUNetPlans')
    assert run_config_from_args(server_parser().parse_args(['-d', '501', '--phase', 'find_best']))[
        'find-best-folds'] == '0 1 2 3 4'
    for argv, says in ((['--find-best-folds', '0'], 'apply to --phase find_best'),
                       (['--phase', 'find_best', '--continue'], 'trains nothing'),
                       (['--phase', 'find_best', '--find-best-folds', '5'], 'a fold is 0, 1, 2, 3, 4 or all')):
        with pytest.raises(SystemExit):
            server_entry(['-d', '501'] + argv)
        assert says in capsys.readouterr().err


def test_fednnunet_parser_errors_are_one_line(capsys):
    parser = FedArgumentParser(prog='x')
    parser.add_argument('--a-b', type=int, required=True)
    assert _error(capsys, parser.parse_args, []) == \
        'fednnunet: error: x: the following arguments are required: --a-b (see x --help)'
    assert parser.parse_args(['--a_b', '3']).a_b == 3


# ============================================================================================ 9. preprocessing

def test_server_preprocesses_the_configurations_asked_for(capsys):
    config = run_config_from_args(server_parser().parse_args(['-d', '501', '-c', '2d', '--preprocess-configurations',
                                                               '2d', '3d_fullres']))
    assert config['configurations'] == '2d 3d_fullres' and config['configuration'] == '2d'
    assert run_config_from_args(server_parser().parse_args(['-d', '501']))['configurations'] == '3d_fullres'
    assert run_config_from_args(server_parser().parse_args(['-d', '501', '-c', '2d']))['configurations'] == '2d'
    err = _error(capsys, server_entry, ['-d', '501', '--preprocess-configurations', '2d', '--insecure'])
    assert '-c 3d_fullres must be one of --preprocess-configurations (2d)' in err
    err = _error(capsys, server_entry, ['-d', '501', '--phase', 'train', '--preprocess-configurations', '3d_fullres',
                                        '--insecure'])
    assert '--preprocess-configurations applies to planning' in err
    assert server_parser().parse_args(['-d', '501', '--preprocess_configurations', '2d']).preprocess_configurations \
        == ['2d']


# ============================================================================================ 10. label names

def _pooled(keys):
    row = {k: {'Dice': 0.5, 'HD95': 1.0} for k in keys}
    row.update(foreground_mean={'Dice': 0.5, 'HD95': 1.0}, num_cases=2)
    return {'per_site': {'A': row}, 'pooled': {k: {'Dice': 0.25, 'TP': 1, 'FP': 1, 'FN': 1} for k in keys},
            'pooled_foreground_mean_dice': 0.25}


def test_tables_name_labels_and_regions():
    labels = {'background': 0, 'grey_matter': 1, 'white_matter': 2}
    header = format_table(_pooled(['1', '2']), 'title', labels=labels).splitlines()[1]
    assert header.split() == ['site', 'cases', 'Dice', 'grey_matter', 'Dice', 'white_matter', 'mean', 'Dice', 'mean',
                              'HD95', '[mm]']
    assert 'Dice 1' in format_table(_pooled(['1', '2']))  # no dataset.json: the numbers
    regions = {'background': 0, 'whole_tumor': [1, 2, 3], 'tumor_core': [2, 3], 'enhancing': 3}
    header = format_table(_pooled(['(1, 2, 3)', '(2, 3)', '3']), labels=regions).splitlines()[0]
    assert 'Dice whole_tumor' in header and 'Dice tumor_core' in header and 'Dice enhancing' in header
    header = format_table(_pooled(['1', '(1, 2)']), labels=labels).splitlines()[0]
    assert 'Dice grey_matter+white_matter' in header and 'Dice grey_matter ' in header


# ============================================================================================ 11. --overwrite

class _FakeTraining:
    calls = []

    def __init__(self, engine, config, server_data=None):
        self.config = config
        self.output_folder = None

    def run(self, **kwargs):
        _FakeTraining.calls.append(kwargs)
        return {'results_folder': self.output_folder, 'final_validation': None}


def test_train_passes_continue_and_overwrite(demo_raw, fresh_results, monkeypatch, capsys):
    monkeypatch.setattr('fednnunet.training_server.FederatedTraining', _FakeTraining)
    _FakeTraining.calls = []
    base = ['501', '3d_fullres', '0', '--method', 'fedavg', '-p', PLANS, '-device', 'cpu']
    for extra in (['--overwrite'], ['--c'], ['--continue'], []):
        train_entry(base + extra)
    assert _FakeTraining.calls == [{'continue_training': False, 'overwrite': True},
                                   {'continue_training': True, 'overwrite': False},
                                   {'continue_training': True, 'overwrite': False},
                                   {'continue_training': False, 'overwrite': False}]
    err = _error(capsys, train_entry, base + ['--continue', '--overwrite'])
    assert 'argument --overwrite: not allowed with argument --continue/--c' in err
    assert os.listdir(fresh_results) == []


def test_train_prints_the_table_with_label_names(demo_raw, fresh_results, monkeypatch, capsys):
    folder = fresh_results / 'run'
    folder.mkdir()
    (folder / 'dataset.json').write_text(json.dumps({'labels': {'background': 0, 'grey_matter': 1,
                                                                'white_matter': 2}}))

    class Training(_FakeTraining):
        def run(self, **kwargs):
            return {'results_folder': str(folder), 'final_validation': _pooled(['1', '2'])}
    monkeypatch.setattr('fednnunet.training_server.FederatedTraining', Training)
    train_entry(['501', '3d_fullres', '-p', PLANS, '-device', 'cpu'])
    out = capsys.readouterr().out
    assert 'Dice grey_matter' in out and 'Dice white_matter' in out and 'Dice 1' not in out


def test_server_run_config_carries_overwrite(capsys):
    flower_app = pytest.importorskip('fednnunet.flower_app')
    assert flower_app.RUN_CONFIG_DEFAULTS['overwrite'] is False
    assert run_config_from_args(server_parser().parse_args(['-d', '501', '--overwrite']))['overwrite'] is True
    config = run_config_from_args(server_parser().parse_args(['-d', '501', '--c']))
    assert config['overwrite'] is False and config['continue'] is True and config['phase'] == 'train'
    err = _error(capsys, server_entry, ['-d', '501', '--overwrite', '--continue', '--insecure'])
    assert 'argument --continue/--c: not allowed with argument --overwrite' in err


def test_flower_server_passes_overwrite_to_the_training(monkeypatch, tmp_path):
    flower_app = pytest.importorskip('fednnunet.flower_app')
    monkeypatch.setattr('fednnunet.training_server.FederatedTraining', _FakeTraining)
    monkeypatch.setattr(_FakeTraining, '__init__', lambda self, engine, config, server_data=None: setattr(
        self, 'output_folder', str(tmp_path)))
    _FakeTraining.calls = []
    engine = types.SimpleNamespace(connect=lambda: None, dataset_name=DATASET_NAME, site_names=['A'], identities={},
                                   bytes_sent={}, bytes_received={}, flower_bytes_sent={}, flower_bytes_received={},
                                   message_log=[], expected=['A'])
    for overwrite in (True, False):
        flower_app.run_server(None, {'phase': 'train', 'plans': PLANS, 'overwrite': overwrite}, engine=engine)
    assert _FakeTraining.calls == [{'continue_training': False, 'overwrite': True},
                                   {'continue_training': False, 'overwrite': False}]
    with pytest.raises(ValueError, match='continue and overwrite exclude each other'):
        flower_app.run_server(None, {'phase': 'train', 'continue': True, 'overwrite': True}, engine=engine)


def test_train_gives_every_site_its_own_process_on_several_gpus_or_when_asked(demo_raw, monkeypatch, capsys):
    """fednnunet_train's engine: the in-process simulation by default; one process per site with --site-devices,
    or spread over the GPUs where CUDA has several (GPU counts faked here: this machine has none)."""
    import torch
    from fednnunet.engines import site_processes
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    started = []
    monkeypatch.setattr(site_processes, 'SiteProcessEngine',
                        lambda fed, devices, np, verbose=False: started.append(devices) or 'site processes')
    fed = Federation.from_raw(DATASET_ID)

    def engine(argv, gpus=0):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: gpus)
        return cli.training_engine(fed, cli.train_parser().parse_args([str(DATASET_ID), '3d_fullres'] + argv))
    assert isinstance(engine([]), SimulationEngine) and isinstance(engine([], gpus=1), SimulationEngine)
    assert isinstance(engine(['-device', 'cpu'], gpus=2), SimulationEngine)
    assert engine([], gpus=2) == 'site processes' and started[-1] == {'A': 'cuda:0', 'B': 'cuda:1', 'C': 'cuda:0'}
    assert 'A, C on cuda:0; B on cuda:1' in capsys.readouterr().out
    assert engine(['--site-devices', 'A=cpu:0', 'B=cpu:1', 'C=cpu:0']) == 'site processes'
    assert started[-1] == {'A': 'cpu:0', 'B': 'cpu:1', 'C': 'cpu:0'}
    with pytest.raises(FederationError, match='--state-in-memory'):
        engine(['--site-devices', 'A=cpu', 'B=cpu', 'C=cpu', '--state-in-memory'])
    with pytest.raises(FederationError, match="no device for site"):
        engine(['--site-devices', 'A=cpu'])


def test_a_tls_folder_with_a_ca_private_key_is_refused(tmp_path):
    """scripts/make_test_certs.sh writes the CA's private key beside the TLS folder, not in it; a --tls-dir that
    holds one (ca.key, or any other PEM private key than server.key) is refused by name, on server and site."""
    import shutil
    from fednnunet.flower_cli import CliError, tls_files
    if shutil.which('openssl') is None:
        pytest.skip('openssl is not installed')
    certs = tmp_path / 'certs'
    subprocess.run(['bash', os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts',
                    'make_test_certs.sh'), str(certs)], check=True, capture_output=True, timeout=120)
    assert sorted(os.listdir(certs)) == ['ca.crt', 'server.key', 'server.pem']
    assert os.path.isfile(tmp_path / 'certs.ca-key' / 'ca.key')
    assert tls_files(str(certs), need_server=True)['key'].endswith('server.key')
    shutil.copy(tmp_path / 'certs.ca-key' / 'ca.key', certs / 'ca.key')
    for need_server in (True, False):
        with pytest.raises(CliError, match=r'private key of a certificate authority \(ca\.key\)'):
            tls_files(str(certs), need_server=need_server)
    os.rename(certs / 'ca.key', certs / 'backup.pem')
    with pytest.raises(CliError, match=r'\(backup\.pem\)'):
        tls_files(str(certs), need_server=True)


def test_hp_given_twice_keeps_both():
    import argparse
    from fednnunet.method_options import add_method_arguments, hyperparameters_from_args
    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    args = parser.parse_args(['--hp', 'warmup_rounds=1', 'alpha=0.5', '--hp', 'confidence=0.5'])
    assert hyperparameters_from_args(args) == {'warmup_rounds': 1, 'alpha': 0.5, 'confidence': 0.5}
