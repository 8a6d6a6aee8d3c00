"""Server optimisers (FedAvgM, FedAdam, FedYogi): hand-computed updates, their state across a resume, the option
checks, and both engines running them."""
import io
import json
import os

import numpy as np
import pytest
import torch

from fednnunet.server_optimizers import ServerOptimizer, server_optimizer
from fednnunet.strategies import FedAvg, NoAggregation, SiteUpdate, TwoStageFedAvg

from conftest import DATASET_NAME
from test_flower import InProcessGrid, site_node, task_identity  # noqa: F401 - task_identity is a fixture

PLANS = 'nnUNetCPUPlans'


def _round(strategy, r, global_state, means):
    """One round in which two sites (1 and 3 training cases) send arrays whose weighted mean is ``means``."""
    a = {k: np.asarray(v, dtype=np.float32) - 3.0 for k, v in means.items()}
    b = {k: np.asarray(v, dtype=np.float32) + 1.0 for k, v in means.items()}  # (1 * (m - 3) + 3 * (m + 1)) / 4 = m
    return strategy.aggregate(r, [SiteUpdate('A', a, 1), SiteUpdate('B', b, 3)], global_state)


def test_server_momentum_is_fedavgm_by_hand():
    s = FedAvg(server_optimizer='momentum', server_lr=1.0, server_momentum=0.5)
    x0 = {'w': np.array([1.0, 2.0], dtype=np.float32), 'n': np.array([7])}
    # round 0: mean [1.2, 1.6] -> delta [0.2, -0.4] = m -> x1 = [1.2, 1.6]
    x1 = _round(s, 0, x0, {'w': [1.2, 1.6]}) | {'n': x0['n']}
    np.testing.assert_allclose(x1['w'], [1.2, 1.6], atol=1e-6)
    # round 1: mean [1.5, 1.6] -> delta [0.3, 0] -> m = 0.5 * [0.2, -0.4] + [0.3, 0] = [0.4, -0.2] -> x2 = [1.6, 1.4]
    x2 = _round(s, 1, x1, {'w': [1.5, 1.6]})
    np.testing.assert_allclose(x2['w'], [1.6, 1.4], atol=1e-6)
    assert x2['w'].dtype == np.float32
    # lr 0.5: half the step
    half = FedAvg(server_optimizer='momentum', server_lr=0.5, server_momentum=0.5)
    np.testing.assert_allclose(_round(half, 0, x0, {'w': [1.2, 1.6]})['w'], [1.1, 1.8], atol=1e-6)


def test_fedavgm_without_momentum_at_lr_1_is_fedavg():
    x0 = {'w': np.array([0.3, -0.1, 2.0], dtype=np.float32)}
    means = {'w': [0.5, 0.0, 1.0]}
    plain = _round(FedAvg(), 0, x0, means)
    np.testing.assert_allclose(_round(FedAvg(server_optimizer='momentum', server_lr=1.0, server_momentum=0.0), 0, x0,
                                      means)['w'], plain['w'], atol=1e-7)
    np.testing.assert_allclose(plain['w'], means['w'], atol=1e-7)


def test_fedadam_and_fedyogi_by_hand():
    x0 = {'w': np.array([1.0, -1.0], dtype=np.float64)}
    settings = dict(server_lr=0.1, server_momentum=0.5, server_beta2=0.5, server_tau=0.1)
    adam, yogi = FedAvg(server_optimizer='adam', **settings), FedAvg(server_optimizer='yogi', **settings)
    # round 0: delta = [0.4, -0.2]; m = 0.5 * delta = [0.2, -0.1]; v starts at tau^2 = 0.01
    # adam: v = 0.5 * 0.01 + 0.5 * [0.16, 0.04] = [0.085, 0.025]
    x1 = _round(adam, 0, x0, {'w': [1.4, -1.2]})
    np.testing.assert_allclose(x1['w'], [1.0 + 0.1 * 0.2 / (np.sqrt(0.085) + 0.1),
                                         -1.0 + 0.1 * -0.1 / (np.sqrt(0.025) + 0.1)], atol=1e-6)
    # yogi: v = 0.01 - 0.5 * d2 * sign(0.01 - d2) = 0.01 + 0.5 * [0.16, 0.04] = [0.09, 0.03]
    y1 = _round(yogi, 0, x0, {'w': [1.4, -1.2]})
    np.testing.assert_allclose(y1['w'], [1.0 + 0.1 * 0.2 / (0.3 + 0.1), -1.0 + 0.1 * -0.1 / (np.sqrt(0.03) + 0.1)],
                               atol=1e-6)
    # round 1 for adam: delta' = mean - x1; m and v carry over
    d = np.array([1.5, -1.0]) - x1['w']
    m = 0.5 * np.array([0.2, -0.1]) + 0.5 * d
    v = 0.5 * np.array([0.085, 0.025]) + 0.5 * d * d
    x2 = _round(adam, 1, x1, {'w': [1.5, -1.0]})
    np.testing.assert_allclose(x2['w'], x1['w'] + 0.1 * m / (np.sqrt(v) + 0.1), atol=1e-6)
    # yogi's v differs from adam's where v < delta^2 (it grows additively, never by more than (1 - beta2) d^2)
    assert not np.allclose(y1['w'], x1['w'])


def test_the_optimizer_state_survives_a_resume_exactly():
    rng = np.random.default_rng(0)
    x0 = {'w': rng.standard_normal(5).astype(np.float32), 'b': rng.standard_normal((2, 2)).astype(np.float32)}
    rounds = [{k: x0[k] + rng.standard_normal(x0[k].shape).astype(np.float32) * 0.1 for k in x0} for _ in range(3)]
    for kind in ('momentum', 'adam', 'yogi'):
        straight, x = FedAvg(server_optimizer=kind), x0
        for r, means in enumerate(rounds):
            x = _round(straight, r, x, means)
        first = FedAvg(server_optimizer=kind)
        y = _round(first, 0, x0, rounds[0])
        buffer = io.BytesIO()  # as the server checkpoint keeps it (torch.save of the strategy's state)
        from fednnunet.training_server import arrays_to_tensors, tensors_to_arrays
        torch.save(arrays_to_tensors(first.state()), buffer)
        buffer.seek(0)
        resumed = FedAvg(server_optimizer=kind)
        resumed.load_state(tensors_to_arrays(torch.load(buffer, weights_only=True)))
        for r, means in enumerate(rounds[1:], start=1):
            y = _round(resumed, r, y, means)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f'{kind} {k}')
    with pytest.raises(ValueError, match="saved server optimizer state is 'momentum', this run's 'adam'"):
        FedAvg(server_optimizer='adam').load_state(FedAvg(server_optimizer='momentum').state())


def test_two_stage_methods_step_the_first_stage_and_keep_their_handover():
    s = TwoStageFedAvg(server_optimizer='momentum', server_lr=1.0, server_momentum=0.5)
    s.setup(3, {'A': 0, 'B': 1}, {'stage2_rounds': 1})
    x1 = _round(s, 0, {'w': np.array([1.0])}, {'w': [2.0]})
    x2 = _round(s, 1, x1, {'w': [2.0]})
    np.testing.assert_allclose([x1['w'][0], x2['w'][0]], [2.0, 2.5])  # m: 1 -> 0.5 * 1 + 0 = 0.5
    assert set(s.state()) >= {'readonly', 'handed_over', 'server_optimizer'}


def test_settings_that_do_not_fit_are_clear_errors():
    with pytest.raises(ValueError, match='--server-beta2 does not apply to the momentum server optimizer'):
        ServerOptimizer('momentum', beta2=0.9)
    with pytest.raises(ValueError, match=r'--server-lr need\(s\) --server-optimizer momentum, adam or yogi'):
        server_optimizer('none', lr=0.1)
    with pytest.raises(ValueError, match=r'--server-momentum 1.0 is out of range .* \(in \[0, 1\)\)'):
        ServerOptimizer('adam', beta1=1.0)
    with pytest.raises(ValueError, match='server optimizer must be one of none, momentum, adam, yogi'):
        ServerOptimizer('sgd')
    with pytest.raises(ValueError, match='the local baseline merges nothing'):
        NoAggregation(server_optimizer='adam')
    assert server_optimizer('none') is None and FedAvg().state() == {}


def test_the_command_lines_check_server_optimizer_options_while_parsing(capsys):
    from fednnunet.cli import train_entry
    from fednnunet.flower_cli import CliError, run_config_from_args, server_parser
    base = ['501', '3d_fullres', '0', '-p', PLANS]
    for argv, expected in ((['--method', 'fedavg', '--server-lr', '0.1'], '--server-optimizer momentum, adam or yogi'),
                           (['--method', 'local', '--server-optimizer', 'adam'], 'the local baseline merges nothing'),
                           (['--method', 'fedavg', '--server-optimizer', 'momentum', '--server-tau', '0.1'],
                            '--server-tau does not apply to the momentum server optimizer'),
                           (['--method', 'fedavg', '--server-optimizer', 'adam', '--server-lr', '-1'],
                            'argument --server-lr: must be a number > 0, got -1'),
                           (['--method', 'fedavg', '--centralized-iterations', '50'],
                            '--centralized-iterations applies to --method centralized only')):
        with pytest.raises(SystemExit):
            train_entry(base + argv)
        assert expected in capsys.readouterr().err
    args = server_parser().parse_args(['-d', '501', '--method', 'fedavg', '--server-optimizer', 'adam',
                                       '--server-lr', '0.05', '--insecure'])
    config = run_config_from_args(args)
    assert json.loads(config['server-optimizer']) == {'server_optimizer': 'adam', 'server_lr': 0.05}
    with pytest.raises(CliError, match='the local baseline merges nothing'):
        run_config_from_args(server_parser().parse_args(['-d', '501', '--method', 'local', '--server-optimizer',
                                                          'momentum', '--insecure']))


def test_both_engines_train_with_server_momentum_and_it_moves_the_global_model(planned, fresh_results, monkeypatch,
                                                                                  task_identity):
    """fedavg with server momentum, 3 rounds x 2 iterations, in simulation and over Flower's records
    (flower_app.run_server with the run config's server-optimizer): the same global model, which differs from
    plain fedavg's; the saved server state holds the momentum of every shared float array."""
    from fednnunet import flower_app
    from fednnunet.engines.flower import FlowerEngine
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.site_worker import SiteWorker
    from fednnunet.training_server import SERVER_CHECKPOINT, FederatedTraining, TrainingConfig

    def engine():
        return SimulationEngine({n: SiteWorker(s, planned.dataset_name, 1, device='cpu')
                                 for n, s in planned.sites.items()})

    def final(result):
        fold = os.path.join(result['results_folder'], 'fold_0')
        ck = torch.load(os.path.join(fold, SERVER_CHECKPOINT), map_location='cpu', weights_only=True)
        return {k: v.numpy() for k, v in ck['global_state'].items()}, ck['strategy']

    options = {'server_optimizer': 'momentum', 'server_lr': 1.0, 'server_momentum': 0.9}
    config = TrainingConfig(DATASET_NAME, '3d_fullres', 0, 'fedavg', PLANS, rounds=3, local_iterations=2,
                            val_iterations=1, validate=False)
    plain, _ = final(FederatedTraining(engine(), config).run())
    config.strategy_options = {'weighting': 'num_examples', **options}
    simulated, state = final(FederatedTraining(engine(), config).run(overwrite=True))
    float_keys = [k for k, a in simulated.items() if a.dtype.kind == 'f']
    assert set(state['server_optimizer']['m']) == set(float_keys)
    assert any(np.abs(state['server_optimizer']['m'][k].numpy()).max() > 0 for k in float_keys)
    moved = max(float(np.abs(simulated[k] - plain[k]).max()) for k in float_keys)
    assert moved > 1e-4, 'server momentum left the global model as plain fedavg made it'

    workers = {n: (lambda s=s: SiteWorker(s, planned.dataset_name, 1, device='cpu')) for n, s in planned.sites.items()}
    grid = InProcessGrid({10 + i: site_node(workers[n], n) for i, n in enumerate(sorted(planned.sites))})
    flower_engine = FlowerEngine(grid, sites=sorted(planned.sites), settle_seconds=0.1, wait_for_sites=5.0,
                                 log=lambda text: None)
    result = flower_app.run_server(grid, {'phase': 'train', 'plans': PLANS, 'rounds': 3, 'local-iterations': 2,
                                          'val-iterations': 1, 'validate': False, 'overwrite': True,
                                          'dataset': DATASET_NAME, 'server-optimizer': json.dumps(options)},
                                   engine=flower_engine)
    over_flower, _ = final(result['training'])
    for k in float_keys:
        np.testing.assert_allclose(over_flower[k], simulated[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_run_configs_server_optimizer_is_checked_like_the_command_line():
    """The Flower run config carries the server optimizer as JSON: unknown keys, wrong types and settings that do
    not fit are refused before anything runs, as on the command line."""
    from fednnunet.flower_app import strategy_options_of
    base = {'weighting': 'num_examples', 'method': 'fedavg'}
    assert strategy_options_of(dict(base, **{'server-optimizer': '{"server_optimizer": "yogi"}'})) == {
        'weighting': 'num_examples', 'server_optimizer': 'yogi'}
    for bad, expected in (('[1]', 'must be a JSON object'),
                          ('{"server_lr": 0.1, "evil": 1}', r"unknown strategy options \['evil'\]"),
                          ('{"server_optimizer": "adam", "server_lr": "0.1"}', '--server-lr must be a number'),
                          ('{"server_optimizer": "adam", "server_lr": true}', '--server-lr must be a number'),
                          ('{"server_optimizer": "adam", "server_lr": NaN}', '--server-lr nan is out of range'),
                          ('{"server_optimizer": "os.system"}', 'server optimizer must be one of')):
        with pytest.raises(ValueError, match=expected):
            strategy_options_of(dict(base, **{'server-optimizer': bad}))
