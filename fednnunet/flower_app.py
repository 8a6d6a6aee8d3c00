"""fednnunet as a Flower app: a ServerApp and a ClientApp that only convert types.

- The **ServerApp** (``server_app``) reads its run config, waits for the sites (:class:`FlowerEngine`) and
  runs the very same server code as the simulation engine: :func:`fednnunet.plan_and_preprocess.
  plan_and_preprocess` and :class:`fednnunet.training_server.FederatedTraining`.
- The **ClientApp** (``client_app``) answers every fednnunet message kind with the site's
  :class:`fednnunet.site_worker.SiteWorker`, built from the SuperNode's ``--node-config``:
  ``site-id`` (required), ``dataset`` (required: id or name), ``device`` (cuda|cpu|mps|auto; default auto: cuda if
  the machine has it, else the CPU; an explicit cuda without CUDA is an error),
  ``num-processes`` (default 1), ``verbose`` (default false), and optionally ``nnunet-raw``,
  ``nnunet-preprocessed``, ``nnunet-results`` (else the SuperNode's environment variables).

Flower starts the ClientApp afresh for every message and a restarted SuperNode gets a new node id. Under
``fednnunet_site`` the ClientApp hands each message to the site's daemon (:mod:`fednnunet.site_daemon`, environment
``FEDNNUNET_SITE_DAEMON``), whose worker keeps the training run's trainer between rounds; without one it builds a
worker for the message. Either way a site's state between rounds (momentum, local layers, round counter) is on its
disk under its site id (:class:`fednnunet.site_training.SiteStateStore`).

The app's ``pyproject.toml`` (:data:`APP_PYPROJECT`, written by ``fednnunet_server`` or
``fednnunet_server --write-app DIR``) has no dependencies: the app runs in the environment where fednnunet
is installed, and Flower's runtime dependency installation must stay off.
"""
import json
import os
import time
from typing import Optional

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import fednnunet
from fednnunet.engines.flower import MESSAGE_KINDS, FlowerEngine, handle_site_message, handle_via_daemon, message_type
from fednnunet.log_lines import stamped
from fednnunet.site_daemon import SITE_VARIABLE, SOCKET_VARIABLE



def _process_start_time() -> float:
    """When this process started (Linux: /proc; elsewhere: when this module was imported)."""
    try:
        with open('/proc/self/stat') as f:
            start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
        with open('/proc/stat') as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith('btime'))
        return boot + start_ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


_PROCESS_STARTED = _process_start_time()
#: when this ClientApp process got its task (app_pinning: a process kept ready waits for it); None: at its start
_TASK_RECEIVED = None


def mark_task_received():
    global _TASK_RECEIVED
    _TASK_RECEIVED = time.time()

# --------------------------------------------------------------------------------------------- run config

#: every key of the run config, with its default (Flower refuses overrides of keys that are not declared)
RUN_CONFIG_DEFAULTS = {
    'dataset': '',                     # -d: id or DatasetXXX_Name; every site must hold it
    'phase': 'all',                    # plan | train | all | find_best
    'configuration': '3d_fullres',     # the configuration to train
    'configurations': '',              # configurations to preprocess (space separated; default: configuration)
    'fold': '0',
    'planner': 'ExperimentPlanner',    # -pl
    'plans': '',                       # -p (train only; default: the planner's plans, or nnUNetPlans)
    'plans-name': '',                  # -overwrite_plans_name
    'gpu-memory-target': 0.0,          # 0: the sites' own (sites.json gpu_memory_gb) or nnU-Net's 8 GB
    'method': 'fedavg',
    'rounds': 1000,
    'local-iterations': 250,
    'val-iterations': 50,
    'seed': 12345,
    'hyperparameters': '{}',           # JSON, e.g. {"mu": 0.01}
    'weighting': 'num_examples',
    'server-optimizer': '{}',          # JSON, e.g. {"server_optimizer": "adam", "server_lr": 0.01}
    'validate': True,
    'npz': False,                      # the sites' final validation also saves class probabilities (--npz)
    'find-best-configurations': '',    # find_best: the configurations (space separated; '' = nnU-Net's four)
    'find-best-folds': '0 1 2 3 4',    # find_best: the folds (space separated)
    'disable-ensembling': False,       # find_best: no ensembles of two configurations
    'continue': False,
    'overwrite': False,                # a new run in a results folder with an earlier run (deletes its round state)
    'sites': '',                       # the federation's sites (space separated); '' = whoever connects
    'min-sites': 0,                    # 0: every site must answer every round
    'round-timeout': 86400.0,          # seconds per request (round, preprocessing, ...)
    'straggler-grace': 600.0,          # with min-sites: seconds a round still waits once min-sites have answered
    'site-keys': '{}',                 # JSON {site: sha256 of its SuperNode key}: a node is a site only with its key
    'identify-timeout': 300.0,
    'wait-for-sites': 600.0,
    'settle-seconds': 15.0,
    'server-data': '',                 # a sites.json on the server's disk whose 'server' entry is its public set
}

APP_NAME = 'fednnunet-flower'
APP_PUBLISHER = 'fednnunet'


def app_pyproject() -> str:
    """The Flower app definition: components from the installed fednnunet, no dependencies."""
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
             '[project]', f'name = "{APP_NAME}"', f'version = "{fednnunet.__version__}"',
             'description = "fednnunet: federated nnU-Net over Flower (components from the installed fednnunet)"',
             'license = "Apache-2.0"',
             '# empty on purpose: the app runs where fednnunet is installed; never let Flower install torch',
             'dependencies = []', '',
             '[tool.flwr.app]', f'publisher = "{APP_PUBLISHER}"', '',
             '[tool.flwr.app.components]', 'serverapp = "fednnunet.flower_app:server_app"',
             'clientapp = "fednnunet.flower_app:client_app"', '',
             '[tool.flwr.app.config]']
    lines += [f'{k} = {_toml_value(v)}' for k, v in RUN_CONFIG_DEFAULTS.items()]
    return '\n'.join(lines) + '\n'


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def write_app(folder: str) -> str:
    """Writes the app folder for ``flwr run`` (just its pyproject.toml); returns the folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'pyproject.toml'), 'w') as f:
        f.write(app_pyproject())
    return folder


def run_config_toml(values: dict) -> str:
    """A run-config override file for ``flwr run --run-config FILE``, with each value in its declared type."""
    lines = []
    for k, v in values.items():
        if k not in RUN_CONFIG_DEFAULTS:
            raise KeyError(f'unknown run config key {k!r}')
        default = RUN_CONFIG_DEFAULTS[k]
        v = type(default)(v) if not isinstance(default, bool) else bool(v)
        lines.append(f'{k} = {_toml_value(v)}')
    return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------------------------------- ClientApp

client_app = ClientApp()


def _node_setting(context: Context, key: str, default=None):
    value = context.node_config.get(key, default)
    if value is None:
        raise ValueError(f"the SuperNode has no --node-config {key}=...; start it with fednnunet_site")
    return value


def _site_worker(context: Context):
    for key, var in (('nnunet-raw', 'nnUNet_raw'), ('nnunet-preprocessed', 'nnUNet_preprocessed'),
                     ('nnunet-results', 'nnUNet_results')):
        if context.node_config.get(key):
            os.environ[var] = str(context.node_config[key])
    from fednnunet.federation import Federation
    from fednnunet.site_worker import SiteWorker
    site = str(_node_setting(context, 'site-id'))
    federation = Federation.from_raw(str(_node_setting(context, 'dataset')), only_sites=[site])
    return SiteWorker(federation.sites[site], federation.dataset_name, int(_node_setting(context, 'num-processes', 1)),
                      device=str(_node_setting(context, 'device', 'auto')), state_in_memory=False,
                      keep_trainers=False,  # this process ends after the message
                      verbose=bool(_node_setting(context, 'verbose', False)))


def _site_handler(message: Message, context: Context) -> Message:
    started = time.time()
    site = str(context.node_config.get('site-id', ''))
    daemon = os.environ.get(SOCKET_VARIABLE)
    if daemon:  # fednnunet_site's long-lived site process holds the worker (and its trainer between rounds)
        content = handle_via_daemon(daemon, os.environ.get(SITE_VARIABLE, ''), message.content, site)
    else:
        content = handle_site_message(lambda: _site_worker(context), message.content, site=site)
    # seconds from the ClientApp process's task (its start, Flower's and our imports included, where it was not
    # kept ready) to the reply
    since = _TASK_RECEIVED or _PROCESS_STARTED
    content['fednnunet']['process_seconds'] = time.time() - since
    content['fednnunet']['handler_started_after'] = started - since
    return Message(content, reply_to=message)


for _kind in MESSAGE_KINDS:
    _category, _action = message_type(_kind).split('.')
    getattr(client_app, _category)(_action)(_site_handler)


# --------------------------------------------------------------------------------------------- ServerApp

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from fednnunet.object_pulls import shorten_object_pull_waits
    try:
        from flwr.superlink.grid import http_grid
    except ImportError:  # another Flower: its own waits
        pass
    else:
        shorten_object_pull_waits(http_grid)  # a site's reply may still be on its way into the SuperLink (local)
    run_server(grid, dict(context.run_config))


def _log(text: str):
    print(f'[fednnunet server] {stamped(text)}', flush=True)


#: the phase after training: nnU-Net's find_best_configuration over the sites' cross-validation (counts only)
FIND_BEST = 'find_best'


def run_server(grid, run_config: dict, engine: Optional[FlowerEngine] = None) -> dict:
    """The server's whole run over a Flower grid: plan and preprocess, then train (same code as simulation); or,
    after the folds are trained, find the best configuration (phase find_best)."""
    from fednnunet.errors import FederationError
    cfg = dict(RUN_CONFIG_DEFAULTS)
    unknown = set(run_config) - set(cfg)
    if unknown:
        raise ValueError(f'unknown run config keys {sorted(unknown)}')
    cfg.update(run_config)
    phase = str(cfg['phase'])
    if phase not in ('plan', 'train', 'all', FIND_BEST):
        raise ValueError(f"phase must be plan, train, all or {FIND_BEST}, not {phase!r}")
    if cfg['continue'] and cfg['overwrite']:
        raise ValueError('continue and overwrite exclude each other')
    strategy_options = {}
    if phase in ('train', 'all'):
        check_method(str(cfg['method']), json.loads(str(cfg['hyperparameters']) or '{}'))
        strategy_options = strategy_options_of(cfg)
    elif phase == FIND_BEST:
        check_method(str(cfg['method']), {})
    sites = str(cfg['sites']).split()
    min_sites = int(cfg['min-sites']) or None
    if engine is None:
        engine = FlowerEngine(grid, sites=sites or None, min_sites=min_sites, round_timeout=float(cfg['round-timeout']),
                              identify_timeout=float(cfg['identify-timeout']),
                              wait_for_sites=float(cfg['wait-for-sites']),
                              settle_seconds=float(cfg['settle-seconds']), dataset=str(cfg['dataset']) or None,
                              log=_log, straggler_grace=float(cfg['straggler-grace']),
                              site_keys=json.loads(str(cfg['site-keys']) or '{}') or None)
    try:
        return _run_phases(engine, cfg, phase, min_sites, strategy_options)
    except FederationError as e:
        _log(f'error: {e}')
        raise


def strategy_options_of(cfg: dict) -> dict:
    """The run config's weighting and server optimizer, checked as the command lines check them."""
    from fednnunet.method_options import check_strategy_options
    options = json.loads(str(cfg['server-optimizer']) or '{}')
    if not isinstance(options, dict):
        raise ValueError('run config server-optimizer must be a JSON object')
    options = {'weighting': str(cfg['weighting']), **options}
    check_strategy_options(options, str(cfg['method']))
    return options


def check_method(method: str, hyperparameters: dict):
    """The method exists, runs over Flower, and takes these hyper-parameters (as fednnunet_train checks)."""
    from fednnunet.errors import FederationError
    from fednnunet.method_options import check_hyperparameters
    from fednnunet.methods import CENTRALIZED
    if method == CENTRALIZED:
        raise FederationError('--method centralized pools every site\'s data on one machine; it does not run over '
                              'Flower (use fednnunet_train on the pooled data)', field='--method')
    check_hyperparameters(method, hyperparameters)


def _run_phases(engine: FlowerEngine, cfg: dict, phase: str, min_sites: Optional[int], strategy_options: dict) -> dict:
    from fednnunet.federation import server_folder
    from fednnunet.jsonio import write_json
    result = {}
    t0 = time.time()
    public_set = server_public_set(str(cfg['server-data']))  # checked before waiting for any site
    engine.connect()
    dataset_name = engine.dataset_name
    plans_identifier = str(cfg['plans'])
    if phase in ('plan', 'all'):
        from fednnunet.plan_and_preprocess import plan_and_preprocess
        configurations = str(cfg['configurations']).split() or [str(cfg['configuration'])]
        from fednnunet.server_data import with_server_data
        summary = plan_and_preprocess(with_server_data(engine, public_set, dataset_name), dataset_name,
                                      configurations, str(cfg['planner']), float(cfg['gpu-memory-target']) or None,
                                      str(cfg['plans-name']) or None, log=_log)
        plans_identifier = summary['plans_identifier']
        _log(f"plans '{plans_identifier}' negotiated by {len(summary['sites'])} sites, preprocessed "
             f"{sorted(summary['preprocessed'])} (order-statistic rounds: {summary['order_statistic_rounds']})")
        result['planning'] = summary
        write_json(os.path.join(server_folder(dataset_name), 'federation', f'flower_messages_{plans_identifier}.json'),
                   _engine_report(engine), indent=1)
        engine.message_log = []  # the training's own log starts here
    if phase in ('train', 'all'):
        from fednnunet.training_server import FederatedTraining, TrainingConfig
        fold = str(cfg['fold'])
        config = TrainingConfig(
            dataset_name=dataset_name, configuration=str(cfg['configuration']),
            fold=fold if fold == 'all' else int(fold), method=str(cfg['method']),
            plans_identifier=plans_identifier or 'nnUNetPlans', rounds=int(cfg['rounds']),
            local_iterations=int(cfg['local-iterations']), val_iterations=int(cfg['val-iterations']),
            seed=int(cfg['seed']), hyperparameters=json.loads(str(cfg['hyperparameters']) or '{}'),
            strategy_options=strategy_options, validate=bool(cfg['validate']), save_probabilities=bool(cfg['npz']),
            min_sites=min_sites)
        if cfg['continue']:
            _members_from_checkpoint(engine, config)
        from fednnunet.server_data import public_set_worker
        # the server trains on its device: CUDA if it has one, else the CPU
        training = FederatedTraining(engine, config, server_data=public_set_worker(public_set, dataset_name))
        result['training'] = training.run(continue_training=bool(cfg['continue']), overwrite=bool(cfg['overwrite']))
        write_json(os.path.join(training.output_folder, 'flower_messages.json'), _engine_report(engine), indent=1)
        if result['training'].get('final_validation'):
            from fednnunet.evaluation import format_table
            print(format_table(result['training']['final_validation'],
                               f"{config.method}: final validation, fold {config.fold}",
                               labels=training.dataset_json.get('labels')), flush=True)
        _log(f"results: {result['training']['results_folder']}")
    if phase == FIND_BEST:
        from fednnunet.cli_pipeline import DEFAULT_CONFIGURATIONS, find_best, print_best
        result[FIND_BEST] = find_best(engine, dataset_name, [str(cfg['method'])], [plans_identifier or 'nnUNetPlans'],
                                      str(cfg['find-best-configurations']).split() or DEFAULT_CONFIGURATIONS,
                                      str(cfg['find-best-folds']).split(), not bool(cfg['disable-ensembling']),
                                      log=_log)
        print_best(result[FIND_BEST])
    _log(f'done in {time.time() - t0:.0f} s; bytes to/from each site: ' +
         ', '.join(f'{s} {engine.bytes_sent.get(s, 0) / 1e6:.1f}/{engine.bytes_received.get(s, 0) / 1e6:.1f} MB'
                   for s in engine.site_names))
    return result


def server_public_set(path: str):
    """The server's labelled public set from the run config's ``server-data`` (a sites.json on the server's disk, or
    the raw folder holding one; only its ``server`` entry is read), checked like a federation's; None if not given."""
    if not path:
        return None
    from fednnunet.errors import FederationError
    from fednnunet.federation import SITES_FILE, SERVER_DATA, load_json, parse_server_data
    sites_file = os.path.join(path, SITES_FILE) if os.path.isdir(path) else path
    site = parse_server_data(load_json(sites_file, SERVER_DATA, 'server-data'), os.path.dirname(os.path.abspath(
        sites_file)))
    if site is None:
        raise FederationError(f"{sites_file} has no 'server' entry (the server's public set)", site=SERVER_DATA,
                              field='server-data')
    site.check_files_exist()
    return site


def _members_from_checkpoint(engine: FlowerEngine, config):
    """--continue without --sites: the interrupted run's sites stay the federation (one that has not connected
    yet misses rounds until it does)."""
    if engine.expected:
        return
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join
    from fednnunet.methods import get_method
    from fednnunet.site_training import results_folder
    from fednnunet.training_server import SERVER_CHECKPOINT
    path = join(results_folder(config.dataset_name, get_method(config.method).trainer, config.plans_identifier,
                               config.configuration), f'fold_{config.fold}', SERVER_CHECKPOINT)
    if os.path.isfile(path):
        saved = sorted(torch.load(path, map_location='cpu', weights_only=True)['site_indices'])
        engine.members = sorted(set(saved) | set(engine.members or []))


def _engine_report(engine: FlowerEngine) -> dict:
    return {'sites': engine.site_names, 'identities': engine.identities, 'bytes_sent': engine.bytes_sent,
            'bytes_received': engine.bytes_received, 'flower_bytes_sent': engine.flower_bytes_sent,
            'flower_bytes_received': engine.flower_bytes_received, 'messages': engine.message_log}
