"""What a site does for training: its FederatedTrainer for a round, its state between rounds, its final
(personalized) model in nnU-Net's layout.

Within one training run a site keeps its trainer alive from round to round, as nnU-Net keeps one trainer for all
epochs (:class:`LiveTrainer`): network, optimizer, nnU-Net's data loaders with their background augmentation
workers, and the compiled network where nnU-Net compiles are built once. After every round the site's state
(network incl. its local layers, SGD momentum, logs) still goes to a :class:`SiteStateStore`, on the site's disk
(written in the background, atomically: :class:`StateWriter`) or in memory, so that a site whose process ends
(a crash, a restart, a Flower ClientApp without a long-lived site process) rebuilds its trainer from it and loses
at most the round it was in. Both paths give the same rounds: every round re-seeds from (seed, site, round).
"""
import json
import multiprocessing
import os
import queue
import re
import shutil
import threading
from typing import Dict, Optional, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from nnunetv2.paths import nnUNet_results
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.file_path_utilities import get_output_folder

from fednnunet import server_input
from fednnunet.errors import FederationError
from fednnunet.methods import get_method
from fednnunet.parallel import close_pool
from fednnunet.preprocessing import unlabelled_data_folder
from fednnunet.trainers.base import FederatedTrainer, cpu_copy, to_plain
from fednnunet.wire import Message

_cpu_notice_shown = False
RUN_ID = re.compile(r'^[0-9a-f]{32}$')
#: the site's training_log.txt says this each time the site builds its trainer
TRAINER_BUILT = 'site trainer built'

#: the CPU threads of a site's training where several sites share the CPU at the same time
CPU_THREADS_VARIABLE = 'FEDNNUNET_CPU_THREADS'
STATE_FILE = re.compile(r'^round_(\d{4})\.pth$')


def resolve_device(name: Optional[str] = 'auto') -> torch.device:
    """nnU-Net's -device. 'auto' (or None: the flag not given): CUDA if this machine has it, else the CPU with a
    one-line notice (once per process). An explicit 'cuda' or 'mps' that this machine lacks is an error, as in
    nnU-Net (FederationError '-device cuda: CUDA is not available on this machine; use -device cpu')."""
    global _cpu_notice_shown
    from fednnunet.devices import AUTO, DEVICES, unavailable
    name = name or AUTO
    if name not in DEVICES + (AUTO,):
        raise ValueError(f"-device must be cpu, cuda or mps, not {name!r}")
    if name == AUTO:
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
        if name == 'cpu' and not _cpu_notice_shown:
            print('fednnunet: CUDA is not available on this machine; training and inference run on the CPU',
                  flush=True)
            _cpu_notice_shown = True
    problem = unavailable(name)
    if problem:
        raise FederationError(problem)
    if name == 'cpu':  # all cores, or this site's share where sites train side by side (engines.site_processes)
        torch.set_num_threads(int(os.environ.get(CPU_THREADS_VARIABLE) or multiprocessing.cpu_count()))
    return torch.device(name)


class SiteStateStore:
    """A site's state after each completed round of one run: ``site_state/<run id>/round_XXXX.pth`` in the site's
    results fold folder, or in memory. Keeps the run's last two (a server that failed before saving its round
    resumes from the previous); states of other runs are never read, and never outrank this run's."""

    def __init__(self, in_memory: bool = False):
        self.in_memory = in_memory
        self._memory: Dict[str, Dict[int, dict]] = {}

    @staticmethod
    def root(trainer: FederatedTrainer) -> str:
        return join(trainer.output_folder, 'site_state')

    @classmethod
    def _folder(cls, trainer: FederatedTrainer) -> str:
        if not trainer.run_id or not RUN_ID.match(trainer.run_id):
            raise ValueError(f"site '{trainer.site_name}': the run id {trainer.run_id!r} is not a run id (32 hex "
                             f"digits)")
        return join(cls.root(trainer), trainer.run_id)

    def save(self, trainer: FederatedTrainer, rounds_done: int, state: dict):
        self.write(self._folder(trainer), rounds_done, state)

    def write(self, folder: str, rounds_done: int, state: dict):
        """``state`` must not change while this runs (site_state() gives CPU copies)."""
        if self.in_memory:
            kept = self._memory.setdefault(folder, {})
            kept[rounds_done] = cpu_copy(state)
            for r in sorted(kept)[:-2]:
                del kept[r]
            return
        os.makedirs(folder, exist_ok=True)
        path = join(folder, f'round_{rounds_done:04d}.pth')
        torch.save(state, path + '.partial')
        os.replace(path + '.partial', path)
        for r in self._rounds_on_disk(folder)[:-2]:
            os.remove(join(folder, f'round_{r:04d}.pth'))

    @staticmethod
    def _rounds_on_disk(folder: str) -> list:
        if not os.path.isdir(folder):
            return []
        return sorted(int(m.group(1)) for m in map(STATE_FILE.match, os.listdir(folder)) if m)

    def latest(self, trainer: FederatedTrainer, at_most: int) -> Tuple[Optional[int], Optional[dict]]:
        """The newest state of the trainer's run with at most ``at_most`` completed rounds."""
        folder = self._folder(trainer)
        if self.in_memory:
            kept = self._memory.get(folder, {})
            rounds = [r for r in kept if r <= at_most]
            return (max(rounds), cpu_copy(kept[max(rounds)])) if rounds else (None, None)
        rounds = [r for r in self._rounds_on_disk(folder) if r <= at_most]
        if not rounds:
            return None, None
        state = torch.load(join(folder, f'round_{rounds[-1]:04d}.pth'), map_location='cpu', weights_only=True)
        if state.get('run_id') != trainer.run_id:
            raise ValueError(f"site '{trainer.site_name}': {folder} holds a state of run {state.get('run_id')!r}")
        return rounds[-1], state

    def other_runs(self, trainer: FederatedTrainer) -> list:
        """Run ids of other runs whose state this site holds in the same results folder (on disk)."""
        return [] if self.in_memory else earlier_runs(trainer.output_folder, trainer.run_id)


class StateWriter:
    """Writes a site's round states in the background (one thread, in order), so that the next round need not
    wait for the disk. A state is written atomically (``.partial``, then renamed); a failed write is raised at the
    next save or flush. Anything that reads the site's state first calls :meth:`flush`."""

    def __init__(self, store: SiteStateStore, background: bool = True):
        """background=False: written before save() returns (a process that ends after the message)."""
        self.store = store
        self.background = background
        self._queue: 'queue.Queue' = queue.Queue()
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    def save(self, trainer: FederatedTrainer, rounds_done: int, state: dict):
        self._raise_failure()
        folder = self.store._folder(trainer)
        if self.store.in_memory or not self.background:
            self.store.write(folder, rounds_done, state)
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, daemon=True, name='fednnunet-state-writer')
            self._thread.start()
        self._queue.put((folder, rounds_done, state))

    def _run(self):
        while True:
            folder, rounds_done, state = self._queue.get()
            try:
                if self._error is None:
                    self.store.write(folder, rounds_done, state)
            except BaseException as e:  # noqa: B036 - handed to the training thread
                self._error = e
            finally:
                self._queue.task_done()

    def flush(self):
        """Waits until every state handed over is on disk."""
        self._queue.join()
        self._raise_failure()

    def _raise_failure(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f'writing the site\'s round state failed: {error}') from error


class LiveTrainer:
    """A site's trainer kept from one round to the next within one training run: reused while every setting of
    the run (all of the request but the round) is the same and it has not run ahead of the round asked for (a
    server that resumes from an earlier round gets a trainer rebuilt from the site's state of that round)."""

    #: request fields that change from message to message within one run
    PER_MESSAGE = ('round', 'overwrite', 'continue', 'validate', 'save_probabilities')

    def __init__(self, key: str, trainer: FederatedTrainer):
        self.key, self.trainer = key, trainer

    @classmethod
    def run_key(cls, config: dict) -> str:
        return json.dumps({k: v for k, v in config.items() if k not in cls.PER_MESSAGE}, sort_keys=True,
                          default=str)

    def serves(self, config: dict, round_index: int) -> bool:
        return self.key == self.run_key(config) and self.trainer.current_epoch <= round_index

    def close(self):
        self.trainer.close()


def earlier_runs(fold_folder: str, run_id: Optional[str]) -> list:
    """The ids of the runs other than ``run_id`` whose state a site's results fold folder holds."""
    root = join(fold_folder, 'site_state')
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d != run_id and os.path.isdir(join(root, d)))


def earlier_run_error(worker, fold_folder: str, runs: list) -> FederationError:
    return FederationError(f'{join(fold_folder, "site_state")} holds an earlier training run (run id(s) '
                           f'{", ".join(runs)}): the server resumes it with --continue, or replaces it with '
                           f'--overwrite', site=worker.site.name, field='results folder')


def results_folder(dataset_name: str, trainer_class, plans_identifier: str, configuration: str) -> str:
    """nnU-Net's results folder: <nnUNet_results>/<dataset>/<Trainer>__<plans>__<configuration>."""
    return get_output_folder(dataset_name, trainer_class.__name__, plans_identifier, configuration)


def remove_empty_network_folder(dataset_name: str, trainer_class, plans_identifier: str, configuration: str, fold):
    """A party that trains its own network is an nnU-Net trainer of that network's configuration, whose constructor
    made <results>/<Trainer>__<plans>__<that configuration>/fold_X; the party writes under sites/<party>/ of the
    method's folder only, so that folder stays empty: removed (only ever while empty) once the party is done."""
    folder = results_folder(dataset_name, trainer_class, plans_identifier, configuration)
    for empty in (join(folder, f'fold_{fold}'), folder):
        try:
            os.rmdir(empty)
        except OSError:
            pass


def build_site_trainer(worker, config: dict) -> FederatedTrainer:
    """The site's trainer for one message: plans and dataset.json come from the site's own folder (checked again
    here: the classes they name are imported)."""
    server_input.training_config(config, worker.site.name)
    method = get_method(config['method'])
    dataset_json = server_input.dataset_json(load_json(join(worker.folder, 'dataset.json')), worker.site.name)
    plans = method.trainer.adapt_plans(server_input.plans(load_json(join(worker.folder, config['plans_identifier']
                                                                         + '.json')), worker.site.name),
                                       config['configuration'], config['num_sites'], config['site_index'],
                                       config.get('hyperparameters') or {}, dataset_json)
    plans['continue_training'] = False
    trainer = method.trainer(plans, trained_configuration(plans, config, worker.site.name), config['fold'],
                             dataset_json, worker.device)
    trainer.verbose = worker.verbose
    trainer.configure_federation(
        worker.site.name, config['site_index'], worker.folder,
        results_folder(worker.dataset_name, method.trainer, config['plans_identifier'], config['configuration']),
        config['rounds'], config['local_iterations'], config['val_iterations'], config['seed'],
        config.get('hyperparameters') or {}, config['num_sites'])
    trainer.run_id = config.get('run_id')
    trainer.unlabelled_cases = list(worker.site.unlabelled)  # only the cases sites.json lists now
    trainer.validation_cases = list(worker.site.validation)
    trainer.present_channels = list(worker.site.present_channels)
    return trainer


def trained_configuration(plans: dict, config: dict, site: str) -> str:
    """The configuration the site trains: the run's, or its own network's (``network_configuration``, planned per site:
    fednnunet.planners.site_networks), which must be in its plans and inherit from the run's."""
    own = config.get('network_configuration')
    if own is None or own == config['configuration']:
        return config['configuration']
    entry = plans['configurations'].get(own)
    if not isinstance(entry, dict) or entry.get('inherits_from') != config['configuration']:
        raise FederationError(f"'{own}' is not a network configuration of '{config['configuration']}' in the site's "
                              f"plans", site=site, field='network_configuration')
    if get_method(config['method']).trainer.trains_site_networks is False:
        raise FederationError(f"{config['method']} merges weights: every site trains '{config['configuration']}', "
                              f"not a network of its own", site=site, field='network_configuration')
    return own


def round_trainer(worker, config: dict, round_index: int) -> Tuple[FederatedTrainer, Optional[int]]:
    """The site's trainer for ``round_index``: the one it kept from its previous round of this run, else one
    rebuilt from its newest saved state (:func:`started_trainer`), kept for the next round if the site keeps its
    trainers. Returns (trainer, the number of rounds its state had completed)."""
    live = worker.live_trainer
    if live is not None and live.serves(config, round_index):
        live.trainer.restart_dataloaders()  # if its augmentation workers paused or stopped after its last turn
        return live.trainer, live.trainer.current_epoch
    worker.close_trainer()
    trainer, rounds_done = started_trainer(worker, config, round_index, kept=worker.keep_trainers)
    if worker.keep_trainers:
        worker.live_trainer = LiveTrainer(LiveTrainer.run_key(config), trainer)
    return trainer, rounds_done


def started_trainer(worker, config: dict, round_index: int, kept: bool = False) -> Tuple[FederatedTrainer,
                                                                                          Optional[int]]:
    """The site's trainer, set up for ``round_index`` with its own newest state of this run loaded (if any).
    Returns (trainer, the number of rounds that state had completed).

    A results folder that holds another run's state is refused at a run's start, unless the server asked to
    overwrite (then that state is deleted): a new run never mixes with an old one."""
    close_pool()  # a site that trains is done with planning: its pool of preprocessing processes ends
    trainer = build_site_trainer(worker, config)
    trainer.kept_across_rounds = kept  # nnU-Net's torch.compile rules apply (fednnunet.trainers.base)
    worker.state_writer.flush()
    rounds_done, state = worker.state_store.latest(trainer, round_index)
    if state is None:
        others = worker.state_store.other_runs(trainer)
        if others and config.get('overwrite'):  # the earlier run's models, logs and state go; this run starts clean
            shutil.rmtree(trainer.output_folder)
            os.makedirs(trainer.output_folder)
        elif others:
            raise earlier_run_error(worker, trainer.output_folder, others)
    trainer.start(round_index)
    if state is not None:
        trainer.load_site_state(state)
    trainer.print_to_log_file(f'{TRAINER_BUILT} for round {round_index}' + (
        f' from its state after {rounds_done} round(s)' if state is not None else '') +
        (', kept for the next rounds' if kept else ''))
    return trainer, rounds_done


def _not_preprocessed(folder: str, cases) -> list:
    """The cases without nnU-Net's preprocessed properties file in ``folder``."""
    return [c for c in cases if not os.path.isfile(join(folder, c + '.pkl'))]


def check_training(worker, message: Message) -> Message:
    """Before a run writes anything: the site has the plans, its preprocessed cases of the configuration and its
    splits, and (for a new run) no other run's state in its results folder unless the server overwrites. Reads
    only; an error names the site and the command that fixes it."""
    from fednnunet.training_server import check_trainable, plan_and_preprocess_hint
    config = server_input.training_config(message.config, worker.site.name)
    dataset, plans_id, configuration = worker.dataset_name, config['plans_identifier'], config['configuration']
    hint = plan_and_preprocess_hint(dataset, plans_id, configuration)
    plans_file = join(worker.folder, plans_id + '.json')
    if not os.path.isfile(plans_file):
        raise FederationError(f"the site has no plans '{plans_id}' (in {worker.folder}): run `{hint}` first",
                              site=worker.site.name, field='-p')
    plans = server_input.plans(load_json(plans_file), worker.site.name)
    trainer_class = get_method(config['method']).trainer
    check_trainable(plans, plans_id, configuration, trainer_class)
    trained_configuration(plans, config, worker.site.name)
    configuration_manager = PlansManager(plans).get_configuration(configuration)
    data_identifier = configuration_manager.data_identifier
    semi_supervised = trainer_class.uses_unlabelled_data
    if not worker.site.cases and not semi_supervised:
        raise FederationError(f"the site has no labelled training case (sites.json lists only unlabelled ones for "
                              f"it), and {config['method']} trains on labelled cases; a site with unlabelled cases "
                              f"only takes part in a semi-supervised method ({', '.join(semi_supervised_methods())}) "
                              f"or is left out with --sites", site=worker.site.name, field='cases')
    missing = worker.site.missing_channels
    if missing and not trainer_class.handles_missing_channels:
        names = worker.site.channel_names
        able = missing_channel_methods()
        raise FederationError(f"the site has no images of channel(s) {', '.join(f'{c} ({names[c]})' for c in missing)} "
                              f"(sites.json 'channels'), and {config['method']} needs every channel at every site; "
                              + (f"methods that train such sites: {', '.join(able)}; " if able else
                                 "no method trains such sites yet; ") + "or leave the site out with --sites",
                              site=worker.site.name, field='channels')
    data = join(worker.folder, data_identifier)
    absent = _not_preprocessed(data, worker.site.labelled)
    if absent:
        raise FederationError(f"configuration '{configuration}' is not preprocessed at this site ({len(absent)} of "
                              f"{len(worker.site.labelled)} cases missing in {data}, e.g. {absent[0]}): run `{hint}`",
                              site=worker.site.name, field='-c')
    previous = configuration_manager.previous_stage_name
    if previous is not None:  # a cascade stage: the site's out-of-fold predictions of the previous stage
        from fednnunet.cascade import missing_previous_stage, previous_stage_folder, previous_stage_validation_folder
        results_root = join(str(nnUNet_results), worker.dataset_name)
        folder = previous_stage_folder(results_root, trainer_class.__name__, plans['plans_name'], previous,
                                       configuration, worker.site.name)
        if worker.site.validation:  # its validation-only cases validate every fold: no training case is out of fold
            raise FederationError(f"'{configuration}' trains on the site's out-of-fold '{previous}' predictions of its "
                                  f"training cases, and a site with validation-only cases (sites.json 'validation') "
                                  f"has none: train '{configuration}' without this site (--sites) or use "
                                  f"'{previous}' or 3d_fullres", site=worker.site.name, field='previous_stage')
        absent = missing_previous_stage(folder, worker.site.labelled)
        if absent:
            raise FederationError(f"'{configuration}' needs the site's '{previous}' prediction of every case, and "
                                  f"{len(absent)} of {len(worker.site.labelled)} are missing in {folder} (e.g. "
                                  f"{absent[0]}): train '{previous}' on every fold first (fednnunet_train "
                                  f"{worker.dataset_name} {previous} 0 1 2 3 4 --method {config['method']} -p "
                                  f"{plans_id}), with its final validation", site=worker.site.name,
                                  field='previous_stage')
        if config.get('validate', True):  # the final validation reads that fold's previous-stage validation
            validated = previous_stage_validation_folder(results_root, trainer_class.__name__, plans['plans_name'],
                                                         previous, worker.site.name, config['fold'])
            ending = load_json(join(worker.folder, 'dataset.json'))['file_ending']
            absent = [c for c in validation_cases(worker, config['fold'])
                      if not os.path.isfile(join(validated, c + ending))]
            if absent:
                raise FederationError(f"the final validation of '{configuration}' fold {config['fold']} reads the "
                                      f"'{previous}' validation predictions of the same fold, and {len(absent)} are "
                                      f"missing in {validated} (e.g. {absent[0]}): train '{previous}' fold "
                                      f"{config['fold']} with its final validation, or train with --no-val",
                                      site=worker.site.name, field='previous_stage')
    num_unlabelled = 0
    if semi_supervised and worker.site.unlabelled:
        unlabelled = unlabelled_data_folder(worker.folder, data_identifier)
        absent = _not_preprocessed(unlabelled, worker.site.unlabelled)
        if absent:
            raise FederationError(f"the site's unlabelled cases are not preprocessed for '{configuration}' "
                                  f"({len(absent)} of {len(worker.site.unlabelled)} missing in {unlabelled}, e.g. "
                                  f"{absent[0]}): run `{hint}`", site=worker.site.name, field='unlabelled')
        num_unlabelled = len(worker.site.unlabelled)
    splits_file = join(worker.folder, 'splits_final.json')
    if config['fold'] != 'all' and (not os.path.isfile(splits_file) or
                                    int(config['fold']) >= len(load_json(splits_file))):
        raise FederationError(f"no fold {config['fold']} in {splits_file}: run `{hint}`", site=worker.site.name,
                              field='fold')
    if not config.get('continue') and not config.get('overwrite'):
        fold_folder = join(results_folder(worker.dataset_name, get_method(config['method']).trainer, plans_id,
                                          configuration), 'sites', worker.site.name, f"fold_{config['fold']}")
        runs = earlier_runs(fold_folder, config['run_id'])
        if runs:
            raise earlier_run_error(worker, fold_folder, runs)
    return Message('ready', {'num_training_cases': len(worker.site.cases) + num_unlabelled,
                             'num_unlabelled_cases': num_unlabelled,
                             'present_channels': list(worker.site.present_channels)})


def missing_channel_methods() -> list:
    from fednnunet.methods import METHODS
    return sorted(name for name, m in METHODS.items() if m.trainer.handles_missing_channels)


def semi_supervised_methods() -> list:
    from fednnunet.methods import METHODS
    return sorted(name for name, m in METHODS.items() if m.trainer.uses_unlabelled_data)


def fit(worker, message: Message) -> Message:
    """One round: load the site's state, train, keep the new state, return the shared part and metrics."""
    config = message.config
    round_index = int(config['round'])
    trainer, resumed_from = round_trainer(worker, config, round_index)
    try:
        shared, metrics = trainer.train_round(round_index, dict(message.arrays))
        worker.state_writer.save(trainer, round_index + 1, trainer.site_state())
    except BaseException:
        worker.close_trainer(trainer)  # a failed round keeps nothing alive: the next one starts from the saved state
        raise
    if worker.live_trainer is None or worker.live_trainer.trainer is not trainer:
        trainer.close()  # this site does not keep its trainer between rounds
    elif not worker.keep_augmentation_workers and trainer.has_augmentation_workers:
        # sites taking turns on one machine: idle augmentation workers poll their full queues every 2 ms and take
        # the CPU from the site whose turn it is (measured: 4 simulated sites ran at 0.74x nnU-Net's speed), so
        # they are stopped until the site's next turn (or ended where processes cannot be stopped)
        if not trainer.pause_augmentation_workers():
            trainer.close()
    metrics['state_from_round'] = resumed_from
    return Message('update', {'num_examples': metrics['num_training_cases'], 'metrics': to_plain(metrics)},
                   arrays=shared)


def finish(worker, message: Message) -> Message:
    """After the last round: the site's final model (received shared keys + its local keys) becomes
    ``sites/<site>/fold_X/checkpoint_final.pth``; then the site predicts its validation cases with it (nnU-Net's
    predictor) and measures them into ``fold_X/validation/summary.json``, as nnU-Net's final validation does."""
    config = message.config
    rounds = int(config['rounds'])
    trainer, rounds_done = round_trainer(worker, config, rounds)
    worker.live_trainer = None  # the run ends here: the trainer is closed below whatever happens
    try:
        worker.state_writer.flush()
        if rounds_done is None:
            raise RuntimeError(f"site '{worker.site.name}' has no training state to finish from")
        if message.arrays:
            trainer.load_shared_state(dict(message.arrays))
        trainer.current_epoch = rounds
        trainer.on_train_end()  # nnU-Net's: checkpoint_final.pth, checkpoint_latest.pth removed, loaders stopped
        if rounds_done < rounds:  # the site missed the last round(s), so its last round did not plot
            trainer.logger.plot_progress_png(trainer.output_folder, now=True)
        summary = None
        if config.get('validate', True) and not validation_cases(worker, config['fold']):
            trainer.print_to_log_file('final validation: this site has no validation case (no labelled case in its '
                                      'validation split); nothing to validate')
        elif config.get('validate', True):
            summary = evaluate_model(worker, config, trainer.output_folder_base, 'checkpoint_final.pth',
                                     join(trainer.output_folder, 'validation'),
                                     save_probabilities=bool(config.get('save_probabilities')))
            from fednnunet.cascade import export_next_stages  # a cascade's first stage: its out-of-fold predictions
            exported = export_next_stages(trainer, trainer.output_folder_base, validation_cases(worker, config['fold']),
                                          worker.device, worker.verbose)
            if exported:
                trainer.print_to_log_file(f'final validation: {exported}')
    finally:
        trainer.close()
    if trainer.configuration_name != config['configuration']:  # its own network's (model-heterogeneous methods)
        remove_empty_network_folder(worker.dataset_name, get_method(config['method']).trainer,
                                    config['plans_identifier'], trainer.configuration_name, config['fold'])
    return Message('finished', to_plain({
        'validation_summary': summary,
        'inference_allowed_mirroring_axes': trainer.inference_allowed_mirroring_axes,
        'num_training_cases': trainer.num_training_cases,
    }))


def validation_cases(worker, fold) -> list:
    """The site's validation cases of ``fold`` (its own splits_final.json; fold 'all': every case)."""
    if fold == 'all':
        return list(worker.site.validation or worker.site.cases)
    splits = load_json(join(worker.folder, 'splits_final.json'))
    return list(splits[int(fold)]['val'])


def evaluate_model(worker, config: dict, model_folder: str, checkpoint: str, output_folder: str,
                   save_probabilities: bool = False) -> dict:
    """Predicts the site's validation cases with the model in ``model_folder`` and measures them (nnU-Net's
    metrics + HD95); writes predictions and summary.json to ``output_folder`` (``save_probabilities``: also the class
    probabilities, nnU-Net's ``.npz`` + ``.pkl``, for ensembles). Returns what may leave the site: the per-case numbers
    without file paths."""
    from fednnunet.evaluation import evaluate_cases, shareable_summary
    from fednnunet.inference import load_predictor
    predictor = load_predictor(model_folder, config['fold'], checkpoint, worker.device, verbose=worker.verbose)
    cases = validation_cases(worker, config['fold'])
    if not cases:
        raise FederationError(f"the site has no validation case in fold {config['fold']} (no labelled case to "
                              f"measure: list some as 'validation' in sites.json)", site=worker.site.name,
                              field='validation')
    previous = predictor.configuration_manager.previous_stage_name
    previous_predictions = None
    if previous is not None:  # a cascade stage: the previous stage's predictions of the same cases, same fold
        from fednnunet.cascade import previous_stage_validation_folder
        previous_predictions = previous_stage_validation_folder(
            join(str(nnUNet_results), worker.dataset_name), predictor.trainer_name,
            predictor.plans_manager.plans_name, previous, worker.site.name, config['fold'])
    summary = evaluate_cases(predictor, cases, {c: worker.site.image_files(c) for c in cases},
                             {c: worker.site.label_file(c) for c in cases}, output_folder,
                             num_processes=worker.num_processes if worker.num_processes > 1 else 0,
                             verbose=worker.verbose, save_probabilities=save_probabilities,
                             previous_stage_predictions=previous_predictions)
    return shareable_summary(summary, predictor.dataset_json['file_ending'])


def evaluate(worker, message: Message) -> Message:
    """``fednnunet_evaluate`` at a site: the global model or the site's own (``config['model']``), on the site's
    validation cases. Only per-case metrics leave the site."""
    config = server_input.evaluate_config(message.config, worker.site.name)
    base = join(str(nnUNet_results), worker.dataset_name, config['results_folder_name'])
    site_base = join(base, 'sites', worker.site.name)
    model_folder = site_base if config['model'] == 'site' else base
    stem = os.path.splitext(config['checkpoint'])[0]
    output = join(site_base, f"fold_{config['fold']}", f"evaluation_{config['model']}_{stem}")
    summary = evaluate_model(worker, config, model_folder, config['checkpoint'], output)
    return Message('evaluation', to_plain({'summary': summary}))
