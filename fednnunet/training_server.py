"""The server's side of ``fednnunet_train``: rounds of fit messages, merges, checkpoints, logs.

Results follow nnU-Net's layout::

    $nnUNet_results/DatasetXXX/<Trainer>__<plans>__<config>/
        plans.json, dataset.json, dataset_fingerprint.json     (negotiated / merged)
        fold_X/checkpoint_final.pth, checkpoint_best.pth      (global model, nnU-Net's checkpoint format;
                                                               only for methods whose merge is a whole network)
        fold_X/federated_round_latest.pth                    (server state for --continue)
        fold_X/progress.png, progress_sites.png, federation_log.json, training_log.txt
        sites/<site>/                                         (each site's own nnU-Net model folder: its
                                                               personalized checkpoint_final.pth, logs, plots)

The server never sees images. It sends each site what the method's strategy says, merges what comes back,
and keeps the pooled pseudo Dice (exact, from the sites' summed TP/FP/FN) to select the best global model.
"""
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from tqdm import tqdm

from nnunetv2.training.logging.nnunet_logger import MetaLogger
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fednnunet.errors import FederationError
from fednnunet.evaluation import pooled_summary
from fednnunet.federation import SERVER_DATA, server_folder
from fednnunet.jsonio import write_json
from fednnunet.log_lines import round_line, stamped
from fednnunet.methods import get_method
from fednnunet.progress import plot_federated_progress
from fednnunet.server_data import ServerTrainer
from fednnunet.site_training import remove_empty_network_folder, results_folder
from fednnunet.strategies import SiteUpdate, pooled_dice
from fednnunet.trainers.two_stage import READONLY
from fednnunet.trainers.base import (canonical_keys, canonical_state, expand_aliases, initial_weights_seed,
                                     seed_everything, state_dict_aliases, to_plain)
from fednnunet.wire import Message

SERVER_CHECKPOINT = 'federated_round_latest.pth'
#: what federation_log.json keeps of every site's round metrics (and of the server's step on its public set)
ROUND_LOG_METRICS = ('pseudo_dice', 'train_loss', 'val_loss', 'seconds', 'lr', 'num_training_cases',
                     'state_from_round')
#: files in a results fold folder that show an earlier run (a new run refuses the folder unless asked to overwrite)
RUN_FILES = (SERVER_CHECKPOINT, 'federation_log.json', 'federated_summary.json', 'checkpoint_final.pth',
             'checkpoint_best.pth')
#: settings that may differ between an interrupted run and its --continue (they do not change what is trained)
OPERATIONAL_SETTINGS = ('min_sites', 'plot_interval_seconds')
#: the planner that writes nnU-Net's (and fednnunet's) standard plans, for the hint when plans are missing
PLANNER_OF_PLANS = {'nnUNetPlans': 'ExperimentPlanner', 'nnUNetCPUPlans': 'nnUNetPlannerCPU',
                    'nnUNetResEncUNetMPlans': 'nnUNetPlannerResEncM', 'nnUNetResEncUNetLPlans': 'nnUNetPlannerResEncL',
                    'nnUNetResEncUNetXLPlans': 'nnUNetPlannerResEncXL'}


@dataclass
class TrainingConfig:
    dataset_name: str
    configuration: str
    fold: object
    method: str
    plans_identifier: str
    rounds: int = 1000
    local_iterations: int = 250
    val_iterations: int = 50
    seed: int = 12345
    hyperparameters: dict = field(default_factory=dict)
    strategy_options: dict = field(default_factory=dict)
    validate: bool = True
    #: the sites' final validation also writes the class probabilities (.npz, nnU-Net's --npz): for ensembles
    save_probabilities: bool = False
    #: rounds go on while at least this many sites answer (None: every site must answer)
    min_sites: Optional[int] = None
    #: seconds between two progress.png (plotting costs ~0.3 s; nnU-Net plots every epoch)
    plot_interval_seconds: float = 30.0


def check_trainable(plans: dict, plans_identifier: str, configuration: str, trainer_class=None):
    """The configuration exists in the plans; a cascade stage only for a method whose network takes the previous
    stage's segmentation as more input channels (fednnunet.cascade)."""
    if configuration not in plans['configurations']:
        raise FederationError(f"the plans '{plans_identifier}' have no configuration '{configuration}' (they have "
                              f"{sorted(plans['configurations'])})", field='configuration')
    previous = PlansManager(plans).get_configuration(configuration).previous_stage_name
    if previous is not None and trainer_class is not None:
        from fednnunet.cascade import refuse_cascade
        refuse_cascade(trainer_class, configuration, previous)


def plan_and_preprocess_hint(dataset_name: str, plans_identifier: str, configuration: str) -> str:
    """The command that makes these plans and preprocesses this configuration at every site."""
    planner = PLANNER_OF_PLANS.get(plans_identifier)
    planner_args = f'-pl {planner}' if planner else f'-pl PLANNER -overwrite_plans_name {plans_identifier}'
    return f'fednnunet_plan_and_preprocess -d {dataset_name} {planner_args} -c {configuration}'


def load_plans(dataset_name: str, plans_identifier: str, configuration: str) -> dict:
    """The negotiated plans from the server's folder; a clear error (with the command that makes them) if absent."""
    folder = server_folder(dataset_name)
    path = join(folder, plans_identifier + '.json')
    if not os.path.isfile(path):
        found = sorted(f[:-5] for f in os.listdir(folder) if f.endswith('Plans.json')) if os.path.isdir(folder) else []
        raise FederationError(f"no plans '{plans_identifier}' in {folder}: plan and preprocess first with "
                              f"`{plan_and_preprocess_hint(dataset_name, plans_identifier, configuration)}`"
                              + (f" (plans found there: {', '.join(found)}; choose them with -p)" if found else ''),
                              field='-p')
    return load_json(path)


def json_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class FederatedTraining:
    def __init__(self, engine, config: TrainingConfig, server_data=None):
        """``server_data``: the site worker of the server's public set (fednnunet.server_data.public_set_worker),
        for strategies that train on it; None without one."""
        self.engine = engine
        self.server_data = server_data
        self.server: Optional[ServerTrainer] = None
        self.method = get_method(config.method)
        # every hyper-parameter with its value for this run (e.g. the second stage's share of the rounds): the sites
        # get the resolved values, and --continue compares them
        resolved, self.notes = self.method.trainer.resolve_hyperparameters(dict(config.hyperparameters),
                                                                           config.rounds)
        self.config = config = replace(config, hyperparameters=resolved)
        self.strategy = self.method.strategy(**config.strategy_options)
        self.has_global_model = self.strategy.produces_global_model and self.method.has_global_model
        self.plans = load_plans(config.dataset_name, config.plans_identifier, config.configuration)
        check_trainable(self.plans, config.plans_identifier, config.configuration, self.method.trainer)
        self.results_base = results_folder(config.dataset_name, self.method.trainer, config.plans_identifier,
                                           config.configuration)
        self.output_folder = join(self.results_base, f'fold_{config.fold}')
        self.dataset_json = load_json(join(server_folder(config.dataset_name), 'dataset.json'))
        self.logger = MetaLogger(self.output_folder, False)
        self.site_dice: Dict[str, List[float]] = {}
        self.rounds_log: List[dict] = []
        self.best_ema: Optional[float] = None
        self.site_indices = {s: i for i, s in enumerate(sorted(engine.site_names))}
        self.log_file = join(self.output_folder, 'training_log.txt')
        self.run_id = uuid.uuid4().hex  # a resumed run keeps its own; sites ignore states of other runs
        self.continue_training = self.overwrite = False
        self._checkpoint_trainer = None
        self.declared_cases: Dict[str, int] = {}
        self.site_networks = self.planned_site_networks()
        lm = PlansManager(self.plans).get_label_manager(self.dataset_json)
        #: how many classes (or regions) the sites' online validation counts TP/FP/FN for
        self.num_foreground = len(lm.foreground_regions if lm.has_regions else lm.foreground_labels)

    def planned_site_networks(self) -> Dict[str, str]:
        """{site: the configuration of its own network} where the planning gave it one (sites.json ``network``) and the
        method trains per-site networks; a method that merges weights trains the shared network everywhere (said)."""
        c = self.config
        record = join(server_folder(c.dataset_name), 'federation', f'negotiation_{c.plans_identifier}.json')
        networks = (load_json(record).get('networks') or {}) if os.path.isfile(record) else {}
        own = {s: n[c.configuration] for s, n in networks.items()
               if isinstance(n, dict) and n.get(c.configuration) not in (None, c.configuration)
               and n[c.configuration] in self.plans['configurations']}
        if own and not self.method.trainer.trains_site_networks:
            self.notes.append(f"the planning gave {', '.join(sorted(own))} networks of their own; {c.method} merges "
                              f"weights, so every site trains '{c.configuration}'")
            return {}
        return own

    # ------------------------------------------------------------------ helpers
    def log(self, text: str, console: bool = False):
        os.makedirs(self.output_folder, exist_ok=True)
        with open(self.log_file, 'a') as f:
            f.write(f'{time.strftime("%Y-%m-%d %H:%M:%S")}: {text}\n')
        if console:
            tqdm.write(stamped(text))

    def site_config(self, site: str, **extra) -> dict:
        c = self.config
        return {'method': c.method, 'configuration': c.configuration, 'fold': c.fold,
                'plans_identifier': c.plans_identifier, 'rounds': c.rounds, 'local_iterations': c.local_iterations,
                'val_iterations': c.val_iterations, 'seed': c.seed, 'hyperparameters': c.hyperparameters,
                'site_index': self.site_indices[site], 'num_sites': len(self.site_indices), 'run_id': self.run_id,
                'overwrite': self.overwrite, 'continue': self.continue_training,
                **({'network_configuration': self.site_networks[site]} if site in self.site_networks else {}),
                **extra}

    def server_data_config(self, **extra) -> dict:
        """The request config of the server's public set: a site's, with the index after the sites' (its own random
        streams) and the strategy's server iterations per round."""
        any_site = sorted(self.site_indices)[0]
        config = self.site_config(any_site, site_index=len(self.site_indices), num_sites=len(self.site_indices) + 1,
                                  local_iterations=self.server_iterations, **extra)
        config.pop('network_configuration', None)
        if SERVER_DATA in self.site_networks:  # a method that trains per-site networks: the server's own one
            config['network_configuration'] = self.site_networks[SERVER_DATA]
        return config

    @property
    def server_iterations(self) -> int:
        """The server's local iterations on its public set per round (a strategy's 0: as many as the sites')."""
        return int(self.strategy.server_iterations) or int(self.config.local_iterations)

    def setup_server_training(self):
        """The server's trainer on its public set, for a strategy that trains on it (checked like a site before
        anything is written); a public set that the method does not use is said."""
        if not self.strategy.uses_server_data:
            if self.server_data is not None:
                self.log(f"note: sites.json gives the server a public set; {self.config.method} does not train on it "
                         f"with these options", console=True)
            return
        if self.server_data is None:
            raise FederationError(f"{self.config.method} with server iterations trains at the server on its labelled "
                                  f"public set, and sites.json gives the server none: add \"server\": {{\"cases\": "
                                  f"[...]}} and run fednnunet_plan_and_preprocess", field='server')
        self.server = ServerTrainer(
            self.server_data, self.server_data_config,
            lambda reply: update_problem(reply, self.strategy.server_update_keys(self.shared_keys),
                                         {**self.array_spec, **self.strategy.update_array_spec()},
                                         len(self.server_data.site.cases), self.num_foreground))
        self.server.check_training()
        self.strategy.server_start(self.server, self.config.seed)

    def checkpoint_trainer(self):
        """The method's nnU-Net trainer on the server, without data: it builds the initial network (seeded as the
        sites seed theirs) and writes the global model's checkpoints with nnU-Net's own ``save_checkpoint``,
        including nnU-Net's inference mirroring axes for this configuration."""
        if self._checkpoint_trainer is None:
            c = self.config
            plans = self.method.trainer.adapt_plans(self.plans, c.configuration, len(self.site_indices), 0,
                                                    c.hyperparameters, self.dataset_json)
            trainer = self.method.trainer(dict(plans, continue_training=False), c.configuration, c.fold,
                                          self.dataset_json, torch.device('cpu'))
            trainer.output_folder_base, trainer.output_folder = self.results_base, self.output_folder
            trainer.log_file = self.log_file
            trainer.num_epochs = c.rounds
            trainer.set_hyperparameters(c.hyperparameters)
            seed_everything(initial_weights_seed(c.seed))
            trainer.build_without_data()
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the inference mirroring axes
            self._checkpoint_trainer = trainer
        return self._checkpoint_trainer

    def initial_network_state(self) -> Dict[str, np.ndarray]:
        """The network every site starts from: the method's architecture from the plans, seeded. Also fixes what a
        site's update may hold (keys, shapes, dtypes)."""
        network = self.checkpoint_trainer().unwrapped_network
        self.shared_keys = self.method.trainer.shared_keys(network)
        self.readonly_keys = (self.method.trainer.readonly_keys(network)
                              if hasattr(self.method.trainer, 'readonly_keys') else [])
        state = canonical_state(network)
        self.array_spec = {k: (tuple(v.shape), v.detach().cpu().numpy().dtype) for k, v in state.items()}
        self.array_spec.update({READONLY + k: self.array_spec[k] for k in self.readonly_keys})
        self.aliases = state_dict_aliases(network)
        if self.method.has_global_model != (set(self.shared_keys) == set(canonical_keys(network))):
            raise RuntimeError(f'{self.method.trainer.__name__}.has_local_parts disagrees with its shared keys')
        return {k: v.detach().cpu().numpy() for k, v in canonical_state(network).items()}

    def write_model_folder(self):
        os.makedirs(self.output_folder, exist_ok=True)
        plans = self.plans
        if self.method.has_global_model:  # the plans that build the global model's network (FedMM's: its own class)
            c = self.config
            plans = self.method.trainer.adapt_plans(self.plans, c.configuration, len(self.site_indices), 0,
                                                    c.hyperparameters, self.dataset_json)
        write_json(join(self.results_base, 'plans.json'), plans)
        write_json(join(self.results_base, 'dataset.json'), self.dataset_json)
        shutil.copyfile(join(server_folder(self.config.dataset_name), 'dataset_fingerprint.json'),
                        join(self.results_base, 'dataset_fingerprint.json'))

    def save_global_checkpoint(self, filename: str, state: Dict[str, np.ndarray]):
        """The global model in nnU-Net's checkpoint format, written by nnU-Net's own ``save_checkpoint`` (the
        server's logs and best EMA, the rounds, init args, trainer name, mirroring axes; the optimizer state is the
        server trainer's empty one: momentum lives at the sites)."""
        trainer = self.checkpoint_trainer()
        trainer.unwrapped_network.load_state_dict(expand_aliases(
            {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, self.aliases))
        trainer.logger.load_checkpoint(to_plain(self.logger.get_checkpoint()))
        trainer._best_ema = to_plain(self.best_ema)
        trainer.current_epoch = self.config.rounds - 1  # nnU-Net stores current_epoch + 1
        trainer.save_checkpoint(join(self.output_folder, filename))

    def save_server_state(self, rounds_done: int, global_state: Dict[str, np.ndarray]):
        path = join(self.output_folder, SERVER_CHECKPOINT)
        torch.save({'rounds_done': rounds_done,
                    'global_state': {k: torch.from_numpy(np.array(v)) for k, v in global_state.items()},
                    'logging': to_plain(self.logger.get_checkpoint()), 'site_dice': self.site_dice,
                    'best_ema': to_plain(self.best_ema), 'strategy': arrays_to_tensors(self.strategy.state()),
                    'site_indices': self.site_indices, 'config': to_plain(asdict(self.config)), 'run_id': self.run_id,
                    'plans_sha256': json_digest(self.plans), 'dataset_json_sha256': json_digest(self.dataset_json)},
                   path + '.partial')
        os.replace(path + '.partial', path)
        write_json(join(self.output_folder, 'federation_log.json'), self.rounds_log, indent=1)

    def load_server_state(self) -> tuple:
        path = join(self.output_folder, SERVER_CHECKPOINT)
        if not os.path.isfile(path):
            raise FederationError(f'--continue: no {SERVER_CHECKPOINT} in {self.output_folder}: there is no '
                                  f'interrupted run to resume (start without --continue)', field='--continue')
        ck = torch.load(path, map_location='cpu', weights_only=True)
        self.check_same_run(ck)
        self.logger.load_checkpoint(ck['logging'])
        self.site_dice = ck['site_dice']
        self.best_ema = ck['best_ema']
        self.strategy.load_state(tensors_to_arrays(ck['strategy']))
        self.site_indices = ck['site_indices']
        self.run_id = ck['run_id']
        log_file = join(self.output_folder, 'federation_log.json')
        self.rounds_log = json.load(open(log_file)) if os.path.isfile(log_file) else []
        return ck['rounds_done'], {k: v.numpy() for k, v in ck['global_state'].items()}

    def check_same_run(self, checkpoint: dict):
        """--continue resumes the same run: every setting that changes the result, the plans and dataset.json are as
        they were; the first difference is named."""
        saved, now = checkpoint['config'], to_plain(asdict(self.config))
        for key in now:
            if key not in OPERATIONAL_SETTINGS and saved.get(key) != now[key]:
                raise FederationError(f'--continue: {key} was {saved.get(key)!r} in the interrupted run, now '
                                      f'{now[key]!r}; resume with the same settings, or start a new run with '
                                      f'--overwrite', field=key)
        for key, obj, what in (('plans_sha256', self.plans, 'plans'),
                               ('dataset_json_sha256', self.dataset_json, 'dataset.json')):
            if checkpoint.get(key) != json_digest(obj):
                raise FederationError(f'--continue: the {what} changed since the interrupted run (planned again?); '
                                      f'start a new run with --overwrite', field=what)

    def check_results_folder(self):
        """A new run starts in an empty results fold folder: an earlier run's files are refused (a federated run can
        cost days; it is never silently replaced), or deleted first with ``overwrite``."""
        found = [f for f in RUN_FILES if os.path.isfile(join(self.output_folder, f))]
        if not found:
            return
        if not self.overwrite:
            raise FederationError(f'{self.output_folder} holds an earlier training run ({", ".join(found)}): resume '
                                  f'it with --continue, or replace it with --overwrite', field='results folder')
        shutil.rmtree(self.output_folder)
        # the server's public-set model of that run goes too (a run without server training would leave it behind)
        shutil.rmtree(join(self.results_base, 'sites', SERVER_DATA, f'fold_{self.config.fold}'), ignore_errors=True)
        self.log(f'--overwrite: the earlier run in {self.output_folder} was deleted', console=True)

    def check_sites_ready(self):
        """Every site has what this training needs (the plans, the preprocessed configuration, its splits, no state of
        another run unless overwriting), asked before anything is written."""
        replies = self.engine.ask({s: Message('check_training',
                                              self.site_config(s, round=0, validate=self.config.validate))
                                   for s in sorted(self.engine.site_names)})
        self.check_quorum(-1, replies, what='training check')
        # the most training cases a site may weigh in with: what it declared at planning (else now)
        planned = join(server_folder(self.config.dataset_name), 'federation',
                       f'negotiation_{self.config.plans_identifier}.json')
        declared = load_json(planned).get('sites', {}) if os.path.isfile(planned) else {}
        semi_supervised = self.method.trainer.uses_unlabelled_data
        for site, reply in replies.items():
            now = reply.config.get('num_training_cases')
            at_planning = declared.get(site, {})
            planned = at_planning.get('num_cases', 0) + (at_planning.get('num_unlabelled', 0) if semi_supervised
                                                         else 0)  # counts checked at planning
            if isinstance(now, bool) or not isinstance(now, int):
                now = 0
            self.declared_cases[site] = int(planned or now or 0)
        channels = {}
        for s, r in replies.items():
            try:
                channels[s] = present_channels(r.config.get('present_channels'), self.dataset_json, s)
            except FederationError as e:  # a bad answer: the site has no channel (FedMM: it is sent no encoder)
                self.log(f'site {s}: {e}; taken as no channel', console=True)
                channels[s] = []
        self.strategy.sites_ready(channels)
        if self.method.trainer.uses_unlabelled_data:
            counts = {s: r.config.get('num_unlabelled_cases') for s, r in replies.items()}
            for s, n in counts.items():
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:  # a bad answer counts as none
                    self.log(f'site {s}: num_unlabelled_cases {repr(n)[:40]} is not a count; taken as 0', console=True)
                    counts[s] = 0
            if not sum(counts.values()):
                raise FederationError(f"{self.config.method} trains on unlabelled cases, and no site has any: list "
                                      f"them as 'unlabelled' in sites.json (images in imagesTrUnlabelled/), then run "
                                      f"fednnunet_plan_and_preprocess", field='unlabelled')
            self.log('unlabelled cases: ' + ', '.join(f'{s} {n}' for s, n in sorted(counts.items())), console=True)

    # ------------------------------------------------------------------ the run
    def run(self, continue_training: bool = False, overwrite: bool = False) -> dict:
        """The whole run. Nothing is written before the settings, the results folder and every site are checked.
        ``continue_training``: resume after the last completed round (same settings); ``overwrite``: replace an
        earlier run in this results folder (without it, such a folder is refused). However it ends, an engine
        whose sites live in this process (simulation) ends their kept trainers, with every round state on disk."""
        try:
            return self._run(continue_training, overwrite)
        finally:
            if self.server_data is not None:
                self.server_data.close()
            close = getattr(self.engine, 'close', None)
            if close is not None:
                close()

    def _run(self, continue_training: bool, overwrite: bool) -> dict:
        if continue_training and overwrite:
            raise FederationError('--continue and --overwrite exclude each other', field='--overwrite')
        c = self.config
        self.continue_training, self.overwrite = bool(continue_training), bool(overwrite)
        self.strategy.setup(c.rounds, self.site_indices, c.hyperparameters)
        if continue_training:
            start, global_state = self.load_server_state()
        else:
            self.check_results_folder()
        self.check_sites_ready()
        for note in self.notes:
            self.log(f'note: {note}', console=True)
        network_state = self.initial_network_state()
        self.setup_server_training()
        self.write_model_folder()
        if continue_training:
            self.log(f'continuing at round {start} of 0-{c.rounds - 1} ({start} round(s) were completed)', console=True)
        else:
            start, global_state = 0, self.strategy.initial_state(network_state, self.shared_keys)
            self.log(f'{c.method} on sites {sorted(self.site_indices)}: {c.rounds} rounds x {c.local_iterations} '
                     f'local iterations, seed {c.seed}, hyper-parameters {c.hyperparameters}', console=False)

        last_plot = 0.0
        # the bar only on a terminal: in a log file the round lines say it without carriage returns
        bar = tqdm(range(start, c.rounds), desc=f'{c.method} rounds', initial=start, total=c.rounds, disable=None)
        for r in bar:
            t0 = time.time()
            sent_before = dict(self.engine.bytes_sent)
            requests = {s: Message('fit', self.site_config(s, round=r), arrays=self.strategy.configure_fit(
                r, s, global_state)) for s in sorted(self.engine.site_names)}
            replies = self.engine.ask(requests)
            updates, dropped = self.screen_updates(r, replies)
            self.check_quorum(r, {u.site: u for u in updates}, dropped=dropped)
            received = global_state  # the model the sites just validated
            t_merge = time.time()
            global_state = self.strategy.aggregate(r, updates, global_state)
            global_state = self.strategy.server_step(r, global_state, self.server)
            t_merge = time.time() - t_merge
            for note in self.strategy.take_notes():
                self.log(f'round {r}: {note}', console=True)
            self.record_round(r, t0, updates, received, t_merge, sent_before, dropped)
            self.save_server_state(r + 1, global_state)
            if time.time() - last_plot >= c.plot_interval_seconds or r + 1 == c.rounds:
                plot_federated_progress(self.logger, self.site_dice, self.output_folder)
                last_plot = time.time()
            bar.set_postfix(pooled_pseudo_dice=f"{self.logger.get_value('mean_fg_dice', -1):.4f}")
        return self.finish(global_state)

    def screen_updates(self, r: int, replies: Dict[str, Message]):
        """The updates that may be merged, and {site: why} for the dropped ones. A site's update must hold exactly
        the keys the method expects this round, each with the network's shape and dtype and finite values, a
        number of training cases between 1 and what the site declared, and well-formed metrics: one bad (or
        malicious) site is then missing from this round instead of stopping or poisoning the federation."""
        expected = self.strategy.expected_update_keys(r, self.shared_keys, self.readonly_keys)
        spec = {**self.array_spec, **self.strategy.update_array_spec()}
        updates, dropped = [], {}
        for site, reply in replies.items():
            why = update_problem(reply, self.strategy.site_update_keys(r, site, expected), spec,
                                 self.declared_cases.get(site, 0), self.num_foreground)
            if why:
                dropped[site] = f'update refused: {why}'
            else:
                updates.append(SiteUpdate(site, dict(reply.arrays), int(reply.config['num_examples']),
                                          reply.config['metrics']))
        return updates, dropped

    def check_quorum(self, r: int, replies: Dict[str, Message], what: Optional[str] = None,
                     dropped: Optional[Dict[str, str]] = None):
        """A round merges the sites that answered (with an update that passed the checks), if there are at least
        ``min_sites`` of them."""
        missing = {**self.engine.missing, **(dropped or {})}
        if missing:
            self.log((f'{what}: no answer from ' if what else f'round {r}: no update from ') +
                     ', '.join(f"site '{s}' ({why})" for s, why in sorted(missing.items())), console=True)
        what = what or f'round {r}'
        needed = self.config.min_sites if self.config.min_sites is not None else len(self.site_indices)
        if len(replies) < needed:
            raise RuntimeError(f'{what}: only {len(replies)} site(s) answered ({sorted(replies)}), {needed} needed '
                               f'(--min-sites); the last completed round is saved, --continue resumes')

    def record_round(self, r: int, t0: float, updates: List[SiteUpdate], received: Dict[str, np.ndarray],
                     t_merge: float, sent_before: Dict[str, int], dropped: Optional[Dict[str, str]] = None):
        metrics = {u.site: u.metrics for u in updates}
        weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        pooled = pooled_dice(metrics)
        mean_pooled = float(np.nanmean(pooled)) if pooled else float('nan')
        self.logger.log('epoch_start_timestamps', t0, r)
        self.logger.log('lrs', float(updates[0].metrics['lr']), r)
        self.logger.log('train_losses', mean_of_measured([u.metrics['train_loss'] for u in updates], weights), r)
        self.logger.log('val_losses', mean_of_measured([u.metrics['val_loss'] for u in updates], weights), r)
        self.logger.log('mean_fg_dice', mean_pooled, r)
        self.logger.log('dice_per_class_or_region', pooled, r)
        self.logger.log('epoch_end_timestamps', time.time(), r)
        for site in self.site_indices:  # a site that missed the round gets a gap in its curve
            self.site_dice.setdefault(site, []).append(float(metrics[site]['pseudo_dice']) if site in metrics
                                                       else float('nan'))
        ema = float(self.logger.get_value('ema_fg_dice', -1))
        if self.has_global_model and (self.best_ema is None or ema > self.best_ema):
            self.best_ema = ema
            self.save_global_checkpoint('checkpoint_best.pth', received)
        seconds, missing = time.time() - t0, {**self.engine.missing, **(dropped or {})}
        self.rounds_log.append(to_plain({
            'round': r, 'pooled_pseudo_dice': pooled, 'mean_pooled_pseudo_dice': mean_pooled, 'ema': ema,
            'seconds': seconds, 'merge_seconds': t_merge, 'missing_sites': missing,
            'bytes_to_sites': {s: self.engine.bytes_sent[s] - sent_before.get(s, 0) for s in metrics},
            'sites': {s: {k: m[k] for k in ROUND_LOG_METRICS} for s, m in metrics.items()},
            **({'server': {k: self.server.last_update.metrics[k] for k in ROUND_LOG_METRICS}}
               if self.server is not None and self.server.last_update is not None else {}),
        }))
        self.log(round_line(r, self.config.rounds, seconds, mean_pooled, ema, metrics, missing), console=True)
        if self.server is not None and self.server.last_update is not None:
            m = self.server.last_update.metrics
            self.log(f"round {r}: server step on the public set ({self.server_iterations} iterations): pseudo Dice "
                     f"there before it {m['pseudo_dice']:.4f}, training loss {m['train_loss']:.4f}", console=True)

    def finish(self, global_state: Dict[str, np.ndarray]) -> dict:
        """Sites store their final models and validate them; the server stores the global model."""
        c = self.config
        requests = {s: Message('finish', self.site_config(s, validate=c.validate,
                                                             save_probabilities=c.save_probabilities),
                               arrays=self.strategy.configure_fit(c.rounds, s, global_state))
                    for s in sorted(self.engine.site_names)}
        replies = self.engine.ask(requests)
        if self.engine.missing:
            self.log('finish: no final model stored at ' + ', '.join(sorted(self.engine.missing)), console=True)
        if not replies:
            raise RuntimeError('no site answered the final message')
        if self.has_global_model:
            self.save_global_checkpoint('checkpoint_final.pth', global_state)
        summaries = {s: rep.config['validation_summary'] for s, rep in replies.items()}
        result = {'method': c.method, 'results_folder': self.results_base, 'fold': c.fold,
                  'global_model': self.has_global_model,
                  'final_validation': pooled_summary(summaries) if c.validate else None}
        if self.server is not None:  # the final model measured on the public set's validation split too
            result['server_validation'] = self.server.finish(global_state, c.validate).config['validation_summary']
        write_json(join(self.output_folder, 'federated_summary.json'), to_plain(result))
        self.remove_empty_network_folders()
        self.log('training done', console=False)
        return result

    def remove_empty_network_folders(self):
        """The parties' empty folders of their own networks' configurations (remove_empty_network_folder), where this
        process can see them: removed once everyone is done (not before: a party still starting would find its
        parent gone)."""
        c = self.config
        for configuration in set(self.site_networks.values()) - {c.configuration}:
            remove_empty_network_folder(c.dataset_name, self.method.trainer, c.plans_identifier, configuration, c.fold)


def present_channels(value, dataset_json: dict, site: str) -> List[int]:
    """A site's channels as it said them at the training check (dataset.json indices): checked, as data from the
    network; a site that says nothing has every channel."""
    channels = sorted(int(c) for c in dataset_json.get('channel_names', dataset_json.get('modality', {})))
    if value is None:  # (a site of an earlier fednnunet)
        return channels
    if not isinstance(value, list) or not value or len(value) > len(channels) or \
            not all(isinstance(c, str) and c.isdigit() and int(c) in channels for c in value) or \
            len(set(value)) != len(value):
        raise FederationError(f"present_channels {str(value)[:100]} are not some of dataset.json's channels "
                              f"{channels}, each once", site=site, field='present_channels')
    return sorted(int(c) for c in value)


def mean_of_measured(values: List[float], weights: np.ndarray) -> float:
    """The case-weighted mean of the sites' losses over the sites that measured one (a site without validation cases
    reports no validation loss, a site that had nothing to train on in a round no training loss) and trained this
    round; over all that measured one if none trained; NaN if none measured one."""
    values, weights = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    measured = np.isfinite(values)
    if not measured.any():
        return float('nan')
    weighed = measured & (weights > 0)
    if not weighed.any():
        return float(np.mean(values[measured]))
    return float(np.average(values[weighed], weights=weights[weighed]))


#: metrics a site reports every round, and whether they may be NaN (pseudo Dice: a validation without any
#: foreground; the validation loss: a site without validation cases; the training loss: a round without local steps)
_ROUND_METRICS = {'pseudo_dice': True, 'ema_pseudo_dice': True, 'train_loss': True, 'val_loss': True, 'lr': False,
                  'seconds': False}


def update_problem(reply: Message, expected_keys: set, spec: Dict[str, tuple], declared_cases: int,
                   num_foreground: int) -> Optional[str]:
    """Why a site's round update cannot be merged (None: it can)."""
    arrays = reply.arrays
    extra, missing = sorted(set(arrays) - expected_keys), sorted(expected_keys - set(arrays))
    if extra or missing:
        return f'other keys than the method shares this round (unexpected {extra[:3]}, missing {missing[:3]})'
    for k, a in arrays.items():
        shape, dtype = spec[k]
        if tuple(a.shape) != shape or a.dtype != dtype:
            return f'{k} has shape {tuple(a.shape)} and dtype {a.dtype}, the network {shape} and {dtype}'
        if a.dtype.kind == 'f' and not np.isfinite(a).all():
            return f'{k} holds NaN or infinite values'
    n = reply.config.get('num_examples')  # 0: the site had nothing to train on this round (its update weighs 0)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= max(declared_cases, 1):
        return f'num_examples {n!r} is not between 0 and the {declared_cases} training cases the site declared'
    metrics = reply.config.get('metrics')
    if not isinstance(metrics, dict):
        return 'no metrics'
    for key, nan_ok in _ROUND_METRICS.items():
        v = metrics.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (not nan_ok and not np.isfinite(v)) or (
                key == 'train_loss' and n > 0 and not np.isfinite(v)) or (np.isinf(v)):
            return f'metric {key} is {v!r}'
    if not all(isinstance(metrics.get(k), int) or (k == 'state_from_round' and metrics.get(k) is None)
               for k in ('num_training_cases', 'state_from_round')):
        return 'metrics num_training_cases / state_from_round are not integers'
    for key in ('tp', 'fp', 'fn'):
        v = metrics.get(key)
        if not isinstance(v, list) or len(v) != num_foreground or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) and x >= 0 for x in v):
            return f'metric {key} is not {num_foreground} counts'
    return None


def arrays_to_tensors(obj):
    """Numpy arrays in a (nested) strategy state as tensors, for torch.save/torch.load(weights_only=True)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, dict):
        return {k: arrays_to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(arrays_to_tensors(v) for v in obj)
    return to_plain(obj)


def tensors_to_arrays(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: tensors_to_arrays(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensors_to_arrays(v) for v in obj)
    return obj
