"""FederatedTrainer: nnU-Net's trainer, run one federated round at a time.

One round is one nnU-Net epoch at one site, driven through nnU-Net's own epoch hooks (``on_epoch_start``,
``on_validation_epoch_start``/``validation_step``/``on_validation_epoch_end``, ``on_train_epoch_start``,
``train_step`` x ``local_iterations``, ``on_train_epoch_end``, ``on_epoch_end``), so that a subclass of any
nnU-Net trainer variant keeps its behaviour. The one difference to nnU-Net's epoch: validation comes first, so it
measures the model the site received (the global model for FedAvg), not the site's locally trained one. nnU-Net's
own data loaders, augmentation, deep supervision, loss and gradient clipping are used unchanged. The poly learning
rate is indexed by the round, so it spans all rounds (``num_epochs`` = rounds); the optimizer state (SGD
momentum) stays with the site between rounds.

The only interface engines see is :meth:`train_round` and :meth:`shared_keys` (and the state a site keeps
between rounds, :meth:`site_state`/:meth:`load_site_state`). A method subclasses this trainer: it says which
state keys it shares and what a site does in a round (extra loss terms, which parameters train when).
"""
import contextlib
import io
import os
import random
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p
from torch import nn

from nnunetv2.training.logging.nnunet_logger import MetaLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

from fednnunet import augmentation_workers
from fednnunet.errors import FederationError


def round_seed(seed: int, site_index: int, round_index: int) -> int:
    """A seed per (run, site, round): every round starts from the same random state whether the site kept
    its trainer in memory, reloaded it from disk or resumed a stopped run."""
    return int(np.random.SeedSequence([seed, site_index, round_index]).generate_state(1)[0])


def initial_weights_seed(seed: int) -> int:
    """The seed under which the server and every site build the initial network: identical weights."""
    return int(np.random.SeedSequence([seed, 2 ** 31]).generate_state(1)[0])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def to_plain(obj):
    """Numbers as Python floats/ints, so a site's state loads with torch.load(weights_only=True)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def cpu_copy(obj):
    """Detached CPU copies of every tensor in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class FederatedTrainer(nnUNetTrainer):
    #: the name of the method (``--method``), set by each subclass
    method_name: Optional[str] = None
    #: method hyper-parameters and their defaults; ``configure_federation`` sets them as attributes
    hyperparameters: Dict[str, float] = {}
    #: True when some state keys never leave the site: then there is no global model, only personalized ones
    has_local_parts: bool = False
    #: True when the method's network works through forward hooks (not torch.compile-able)
    uses_hooks: bool = False
    #: True when the method trains on the sites' unlabelled cases too (semi-supervised)
    uses_unlabelled_data: bool = False
    #: True when each site may train its own planned network (sites.json ``network``; the method merges no weights)
    trains_site_networks: bool = False
    #: True when the method trains sites that lack some of the dataset's channels (sites.json ``channels``; their
    #: missing channels are preprocessed as zeros)
    handles_missing_channels: bool = False
    #: False where the method's network reads its input channels as image channels only (FedMM: an encoder per
    #: modality), so it cannot be a cascade stage (the previous stage's segmentation comes as more input channels)
    takes_previous_stage_channels: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        self.verbose = False
        self._constructing = True  # nnU-Net prints its banner and device at construction, once per round here
        with contextlib.redirect_stdout(io.StringIO()):
            super().__init__(plans, configuration, fold, dataset_json, device)
        self._constructing = False
        self.site_name: Optional[str] = None
        self.run_id: Optional[str] = None
        self.site_index = 0
        self.seed = 12345
        self.num_epochs = 1000  # rounds
        self.num_iterations_per_epoch = 250  # local iterations per round
        self.num_val_iterations_per_epoch = 50
        self.plot_every = 10  # rounds between the site's progress.png (nnU-Net plots every epoch; plots cost ~1 s)
        self.num_sites = 1
        self.num_training_cases = None
        self.dataloader_unlabelled = None  # built on demand by semi-supervised methods
        self.unlabelled_cases: Optional[List[str]] = None  # the site's (sites.json); None: every one in its folder
        self.validation_cases: Optional[List[str]] = None  # the site's validation-only cases (sites.json), if any
        #: the dataset.json channel indices the site has images of (sites.json ``channels``); None: every channel
        self.present_channels: Optional[List[str]] = None

    # ------------------------------------------------------------------ set-up
    def configure_federation(self, site_name: str, site_index: int, site_preprocessed_folder: str,
                             results_folder_base: str, rounds: int, local_iterations: int, val_iterations: int,
                             seed: int, hyperparameters: Optional[dict] = None, num_sites: int = 1):
        """Points nnU-Net's folders at the site's own data and results; sets rounds and iterations.

        ``results_folder_base`` is the method's nnU-Net results folder (<Trainer>__<plans>__<config>); the site
        writes under ``sites/<site>/``, itself a complete nnU-Net trained-model folder."""
        if self.was_initialized:
            raise RuntimeError('configure_federation must be called before initialize()')
        self.site_name, self.site_index, self.seed = site_name, int(site_index), int(seed)
        self.num_sites = int(num_sites)
        self.preprocessed_dataset_folder_base = site_preprocessed_folder
        self.preprocessed_dataset_folder = join(site_preprocessed_folder, self.configuration_manager.data_identifier)
        nnunet_default = self.output_folder  # nnU-Net's __init__ made <results>/<Trainer>__<plans>__<config>/fold_X
        self.output_folder_base = join(results_folder_base, 'sites', site_name)
        self.output_folder = join(self.output_folder_base, f'fold_{self.fold}')
        maybe_mkdir_p(self.output_folder)
        try:  # the site writes under sites/<site>/ only: no empty folder of nnU-Net's is left at the site (in a
            os.rmdir(nnunet_default)  # simulation it is the server's fold folder, which then already holds its log)
        except OSError:
            pass
        if self.is_cascaded:  # the site's own out-of-fold predictions of the previous stage (fednnunet.cascade)
            from fednnunet.cascade import previous_stage_folder
            self.folder_with_segs_from_previous_stage = previous_stage_folder(
                os.path.dirname(results_folder_base), type(self).__name__, self.plans_manager.plans_name,
                self.configuration_manager.previous_stage_name, self.configuration_name, site_name)
        self.log_file = join(self.output_folder, 'training_log.txt')
        self.logger = RoundLogger(self.output_folder, False, plot_every=self.plot_every, num_rounds=int(rounds))
        self.num_epochs = int(rounds)
        self.num_iterations_per_epoch = int(local_iterations)
        self.num_val_iterations_per_epoch = int(val_iterations)
        self.set_hyperparameters(hyperparameters or {})

    def set_hyperparameters(self, given: dict):
        """The method's hyper-parameters as attributes (resolved for ``num_epochs`` rounds)."""
        values, _ = self.resolve_hyperparameters(given, self.num_epochs)
        for k, v in values.items():
            setattr(self, k, v)

    @classmethod
    def resolve_hyperparameters(cls, given: dict, rounds: int) -> Tuple[dict, List[str]]:
        """Every hyper-parameter of the method with its value for a run of ``rounds`` rounds (the given ones, the
        defaults for the rest; a method may derive defaults from the rounds), and notes worth a warning. The server
        and every site resolve the same way; the server sends the resolved values."""
        unknown = set(given) - set(cls.hyperparameters)
        if unknown:
            raise ValueError(f'method {cls.method_name} has no hyper-parameter(s) {sorted(unknown)}; '
                             f'it has {sorted(cls.hyperparameters)}')
        return {**cls.hyperparameters, **given}, []

    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        if self._constructing:
            return
        super().print_to_log_file(*args, also_print_to_console=also_print_to_console and self.verbose,
                                  add_timestamp=add_timestamp)

    #: set by the site before the trainer starts: it is kept for the run's next rounds (site_training.LiveTrainer)
    kept_across_rounds = False

    def _do_i_compile(self):
        """nnU-Net's torch.compile rules (on by default on CUDA, off on CPU/MPS/Windows, ``nnUNet_compile=0`` turns
        it off) when the site keeps this trainer across rounds, as nnU-Net keeps one for all epochs. A trainer
        rebuilt for a single round (a Flower ClientApp without a long-lived site process) compiles only when asked
        for (``nnUNet_compile=1``): it would recompile every round. Methods whose networks work through forward
        hooks (``uses_hooks``: LC-Fed, FedDP) never compile."""
        if self.uses_hooks:
            return False
        if not self.kept_across_rounds and os.environ.get('nnUNet_compile', '').lower() not in ('true', '1', 't'):
            return False
        return super()._do_i_compile()

    def plot_network_architecture(self):
        if self.current_epoch == 0:
            super().plot_network_architecture()

    def print_plans(self):
        """nnU-Net's configuration dump, once per run (a site builds its trainer again for every round)."""
        if self.current_epoch == 0:
            super().print_plans()

    def _save_debug_information(self):
        if self.current_epoch == 0:
            super()._save_debug_information()

    def start(self, round_index: int):
        """Builds network, optimizer, loss and nnU-Net's data loaders for this round (on_train_start)."""
        self.current_epoch = round_index
        seed_everything(initial_weights_seed(self.seed))  # the same initial weights at every site
        with contextlib.redirect_stdout(io.StringIO()) if not self.verbose else contextlib.nullcontext():
            self.on_train_start()
        self.num_training_cases = self.count_training_cases()

    def initialize(self):
        """nnU-Net's. It infers the dataset format from the labelled cases' folder; at a site with unlabelled cases
        only (that folder holds none) it infers it from the unlabelled ones (the same preprocessor wrote both)."""
        labelled = self.preprocessed_dataset_folder
        if os.path.isdir(labelled) and not preprocessed_cases(labelled) and os.path.isdir(self.unlabelled_data_folder):
            self.preprocessed_dataset_folder = self.unlabelled_data_folder
        try:
            super().initialize()
        finally:
            self.preprocessed_dataset_folder = labelled

    def do_split(self):
        """nnU-Net's split (the site's splits_final.json). Fold 'all' trains on every preprocessed case in nnU-Net;
        here it keeps the site's validation-only cases (sites.json ``validation``) out of training and validates on
        them."""
        tr_keys, val_keys = super().do_split()
        if self.fold == 'all' and self.validation_cases:
            held_out = set(self.validation_cases)
            tr_keys, val_keys = [k for k in tr_keys if k not in held_out], sorted(held_out)
        return tr_keys, val_keys

    def count_training_cases(self) -> int:
        """The cases this site trains on, the weight of its update in case-weighted merges: its labelled training
        cases, and for a semi-supervised method its unlabelled ones too."""
        n = len(self.do_split()[0])
        if self.uses_unlabelled_data and self.has_unlabelled_data:
            n += len(self.unlabelled_cases if self.unlabelled_cases is not None else
                     preprocessed_cases(self.unlabelled_data_folder))
        return n

    @property
    def has_validation_data(self) -> bool:
        return self.dataloader_val is not None

    def get_dataloaders(self):
        """nnU-Net's loaders. A site without labelled training cases (a semi-supervised method at a site with
        unlabelled cases only) has no training loader; its validation loader (where it has validation cases) is
        nnU-Net's, built by nnU-Net's get_dataloaders over the validation cases, whose training loader is stopped at
        once. Without validation cases either, there is no loader: the site trains on its unlabelled cases
        (:meth:`unlabelled_step`) and reports no validation."""
        tr_keys, val_keys = self.do_split()
        if tr_keys:
            return super().get_dataloaders()
        if not self.uses_unlabelled_data:
            raise FederationError(f"the site has no labelled training case in fold {self.fold}, and {self.method_name} "
                                  f"trains on labelled cases only (a site with unlabelled cases only needs a "
                                  f"semi-supervised method)", site=self.site_name, field='cases')
        if not val_keys:
            return None, None
        own = type(self).get_tr_and_val_datasets  # nnU-Net's datasets; the (empty) training one is not used
        self.get_tr_and_val_datasets = lambda: (own(self)[1],) * 2
        try:
            unused, val = super().get_dataloaders()
        finally:
            del self.get_tr_and_val_datasets
        _stop_loaders([unused])
        return None, val

    def build_without_data(self):
        """The network (nnU-Net's build_network_architecture) and the optimizer, without nnU-Net's initialize(),
        which opens the preprocessed data: what the server, which holds no data, needs to build the initial network
        and to write the global model with nnU-Net's save_checkpoint."""
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.network = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                       self.num_input_channels,
                                                       self.label_manager.num_segmentation_heads,
                                                       self.enable_deep_supervision).to(self.device)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    @property
    def has_augmentation_workers(self) -> bool:
        """nnU-Net's data loaders run background processes (nnUNet_n_proc_DA > 0)."""
        return any(dl is not None and hasattr(dl, '_finish') for dl in self._dataloaders())

    def _dataloaders(self) -> list:
        return [dl for dl in (self.dataloader_train, self.dataloader_val, self.dataloader_unlabelled)
                if dl is not None]

    @property
    def unlabelled_data_folder(self) -> str:
        from fednnunet.preprocessing import unlabelled_data_folder
        return unlabelled_data_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)

    @property
    def has_unlabelled_data(self) -> bool:
        """The site has unlabelled cases: those sites.json lists (checked before training to be preprocessed), or
        where no list was given, any preprocessed one of this configuration."""
        if self.unlabelled_cases is not None:
            return bool(self.unlabelled_cases)
        return bool(preprocessed_cases(self.unlabelled_data_folder))

    def get_unlabelled_dataloader(self):
        """Batches of the site's unlabelled cases, a weak and a strong view of each patch stacked on the channel
        axis (see fednnunet.unlabelled_data); built once, stopped by :meth:`close` with nnU-Net's loaders."""
        if self.dataloader_unlabelled is None:
            from fednnunet.unlabelled_data import two_view_dataloader
            self.dataloader_unlabelled = two_view_dataloader(self, self.unlabelled_data_folder, self.site_name,
                                                             self.unlabelled_cases)
        return self.dataloader_unlabelled

    def pause_augmentation_workers(self) -> bool:
        """Stops nnU-Net's augmentation workers until :meth:`restart_dataloaders` (a site waiting for its turn,
        see fednnunet.augmentation_workers); their queued batches stay. False where the platform cannot."""
        return augmentation_workers.pause(self._dataloaders())

    def restart_dataloaders(self):
        """nnU-Net's data loaders (and their augmentation workers) again, after close() or a pause, for a trainer
        that kept everything else (network, optimizer, logs) between rounds."""
        augmentation_workers.resume(self._dataloaders())
        if self.dataloader_train is None and self.dataloader_val is None:
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()

    def on_train_end(self):
        """nnU-Net's (final checkpoint, its two loaders stopped), and the unlabelled cases' loader stopped too."""
        super().on_train_end()
        _stop_loaders([self.dataloader_unlabelled])
        self.dataloader_unlabelled = None

    def close(self):
        """Stops nnU-Net's background augmentation workers, if any."""
        _stop_loaders(self._dataloaders())
        self.dataloader_train = self.dataloader_val = self.dataloader_unlabelled = None

    @classmethod
    def adapt_plans(cls, plans: dict, configuration: str, num_sites: int, site_index: int,
                    hyperparameters: dict, dataset_json: dict) -> dict:
        """The plans this method trains with at this site. Default: the negotiated plans unchanged; methods that
        change the architecture (LC-Fed, FedDP) name their network class here, so nnU-Net's predictor builds it
        from the site's plans.json."""
        return plans

    def extra_loss(self, output, target):
        """Hook: a term added to nnU-Net's loss during training (FedProx's proximal term, LC-Fed's contrastive
        term, FedDP's calibration term). None: nothing."""
        return None

    def full_resolution_output(self, x: torch.Tensor) -> torch.Tensor:
        """The network's highest-resolution output (deep supervision's lower ones are not computed: memory)."""
        supervised = self.enable_deep_supervision
        if supervised:
            self.set_deep_supervision_enabled(False)
        try:
            out = self.network(x)
        finally:
            if supervised:
                self.set_deep_supervision_enabled(True)
        return out[0] if isinstance(out, (list, tuple)) else out

    #: True during an :meth:`unlabelled_step`: the training loss is the method's term alone (there is no label)
    unlabelled_only = False

    def local_step(self) -> dict:
        """One local iteration: nnU-Net's train_step on a batch of labelled cases; at a site without labelled
        training cases, the method's :meth:`unlabelled_step`."""
        if self.dataloader_train is not None:
            return self.train_step(next(self.dataloader_train))
        return self.unlabelled_step()

    def can_train_this_round(self) -> bool:
        """Whether the site has something to train on this round. Only a site without labelled training cases can
        lack it: a semi-supervised method says when it uses the unlabelled cases (not during its warm-up)."""
        return self.dataloader_train is not None

    def unlabelled_step(self) -> dict:
        """Hook of semi-supervised methods: one local iteration on unlabelled cases only (returns train_step's
        {'loss': ...}). Implementations run nnU-Net's train_step with :attr:`unlabelled_only` set, so its AMP,
        gradient clipping and optimizer step are nnU-Net's."""
        raise FederationError(f'{self.method_name} cannot train a site without labelled training cases',
                              site=self.site_name, field='cases')

    def _build_loss(self):
        return LossWithMethodTerm(super()._build_loss(), self)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's, on a batch whose missing channels (a site without some of the dataset's channels) are zero
        again: nnU-Net's augmentation adds noise to every channel, and the site's cases have zeros there (its
        preprocessing, and prediction, fill them so)."""
        if self.network.training and not self.unlabelled_only:
            batch = dict(batch, data=self.zero_missing_channels(batch['data']))
        return super().train_step(batch)

    def zero_missing_channels(self, data: torch.Tensor) -> torch.Tensor:
        """``data`` (batch, channels, ...) with the channels this site lacks set to 0 (unchanged where it has all)."""
        if self.present_channels is None:
            return data
        from fednnunet.preprocessing import channel_count
        have = {int(c) for c in self.present_channels}
        # the image channels only: a cascade stage's previous-stage segmentation follows them (one-hot)
        missing = [c for c in range(channel_count(self.dataset_json)) if c not in have]
        if not missing:
            return data
        out = data.clone()
        out[:, missing] = 0
        return out

    # ------------------------------------------------------------------ what is shared
    @property
    def unwrapped_network(self) -> nn.Module:
        net = self.network
        if hasattr(net, 'module'):
            net = net.module
        if hasattr(net, '_orig_mod'):
            net = net._orig_mod
        return net

    @classmethod
    def local_keys(cls, network: nn.Module) -> List[str]:
        """State-dict keys that never leave the site. Default: none (FedAvg)."""
        return []

    @classmethod
    def shared_keys(cls, network: nn.Module) -> List[str]:
        """The state-dict keys this method sends to the server: every key that is not local and not an alias."""
        local = set(cls.local_keys(network))
        return [k for k in canonical_keys(network) if k not in local]

    def exchanged_keys(self) -> List[str]:
        """The keys this site sends and receives: the method's shared keys (FedMM: without the encoders of the
        modalities the site lacks)."""
        return self.shared_keys(self.unwrapped_network)

    def shared_state(self) -> Dict[str, np.ndarray]:
        sd = self.unwrapped_network.state_dict()
        return {k: sd[k].detach().cpu().numpy() for k in self.exchanged_keys()}

    def load_shared_state(self, shared: Dict[str, np.ndarray]):
        """Overwrites the shared keys with the server's values; local keys keep the site's own values (aliases of a
        key share its tensor and follow)."""
        own = self.unwrapped_network.state_dict()
        expected = set(self.exchanged_keys())
        if set(shared) != expected:
            missing, extra = sorted(expected - set(shared)), sorted(set(shared) - expected)
            raise ValueError(f"site '{self.site_name}': the server sent other keys than {self.method_name} shares "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # arrays decoded from the wire are read-only; copy_ copies them anyway
            for k, v in shared.items():
                if tuple(v.shape) != tuple(own[k].shape):
                    raise ValueError(f"site '{self.site_name}': shape of {k} is {tuple(v.shape)} from the server, "
                                     f"{tuple(own[k].shape)} here")
                own[k].copy_(torch.from_numpy(np.asarray(v)))

    # ------------------------------------------------------------------ the round
    def validate(self) -> dict:
        """nnU-Net's online validation (pseudo Dice on random validation patches) of the current model, through
        its hooks; returns the summed TP/FP/FN and the logged numbers."""
        if not self.has_validation_data:
            return self.no_validation()
        with torch.no_grad():
            self.on_validation_epoch_start()
            outputs = [self.validation_step(next(self.dataloader_val))
                       for _ in range(self.num_val_iterations_per_epoch)]
            self.on_validation_epoch_end(outputs)
        collated = collate_outputs(outputs)
        return {'tp': np.sum(collated['tp_hard'], 0).tolist(), 'fp': np.sum(collated['fp_hard'], 0).tolist(),
                'fn': np.sum(collated['fn_hard'], 0).tolist(),
                'val_loss': float(np.mean(collated['loss'])),
                'pseudo_dice': float(self.logger.get_value('mean_fg_dice', step=-1)),
                'ema_pseudo_dice': float(self.logger.get_value('ema_fg_dice', step=-1))}

    def no_validation(self) -> dict:
        """A site without validation cases (unlabelled training cases only, no ``validation`` in sites.json): its
        logs get NaN where nnU-Net logs the validation, its metrics say it measured nothing (TP/FP/FN 0, pseudo
        Dice NaN), and it keeps no best checkpoint."""
        if self.current_epoch == 0 or not self.logger.get_value('val_losses', step=None):
            self.print_to_log_file('this site has no validation case (sites.json lists no labelled case for it to '
                                   'validate on): it reports no validation, and keeps no best checkpoint')
        n = len(self.label_manager.foreground_regions if self.label_manager.has_regions else
                self.label_manager.foreground_labels)
        self.logger.log('mean_fg_dice', float('nan'), self.current_epoch)
        self.logger.log('dice_per_class_or_region', [float('nan')] * n, self.current_epoch)
        self.logger.log('val_losses', float('nan'), self.current_epoch)
        return {'tp': [0] * n, 'fp': [0] * n, 'fn': [0] * n, 'val_loss': float('nan'), 'pseudo_dice': float('nan'),
                'ema_pseudo_dice': float('nan'), 'validated': False}

    def keep_best_received(self, val: dict):
        """nnU-Net's best-EMA checkpoint, of the model that was validated (the one the site received). Saved here,
        before local training; nnU-Net's on_epoch_end then finds no better EMA and does not save it again."""
        if val.get('validated') is False:
            self._best_ema = float('nan')  # never better: nnU-Net's on_epoch_end saves no best checkpoint either
            return
        ema = self.logger.local_logger.my_fantastic_logging['ema_fg_dice']
        if np.isnan(ema[-1]):  # first validation after joining late: the average starts here
            ema[-1] = val['ema_pseudo_dice'] = val['pseudo_dice']
        if self._best_ema is None or val['ema_pseudo_dice'] > self._best_ema:
            self._best_ema = val['ema_pseudo_dice']
            self.print_to_log_file(f'new best EMA pseudo Dice of the received model: {self._best_ema:.4f}')
            self.save_checkpoint(join(self.output_folder, 'checkpoint_best.pth'))

    def pad_logs(self, round_index: int):
        """A site that missed rounds (it was offline, or joined late) gets NaN log entries for them, so nnU-Net's
        one-entry-per-epoch logger stays aligned with the round index; the moving average carries over."""
        logs = self.logger.local_logger.my_fantastic_logging
        last_ema = logs['ema_fg_dice'][-1] if logs['ema_fg_dice'] else float('nan')
        for key, values in logs.items():
            while len(values) < round_index:
                values.append(last_ema if key == 'ema_fg_dice' else
                              [] if key == 'dice_per_class_or_region' else float('nan'))

    def before_local_training(self, shared_state: Dict[str, np.ndarray]):
        """Hook: called after the received model was validated, before the local steps (e.g. FedProx keeps
        the global weights here)."""

    def before_train_step(self, step: int):
        """Hook: called before each local step (e.g. FedRep switches from head to body steps)."""

    def after_local_training(self):
        """Hook: called after the local steps. Methods that freeze parts of the network for some steps rely on
        this to make every parameter trainable again (subclasses call super())."""
        for p in self.unwrapped_network.parameters():
            p.requires_grad_(True)

    def update_arrays(self, round_index: int) -> Dict[str, np.ndarray]:
        """What the site sends after its local steps. Default: its shared state."""
        return self.shared_state()

    def train_round(self, round_index: int, shared_state: Optional[Dict[str, np.ndarray]]) -> Tuple[
            Dict[str, np.ndarray], dict]:
        """One federated round at this site, as one nnU-Net epoch through nnU-Net's hooks. Returns (what the site
        sends, metrics).

        The metrics' validation numbers describe the model the site received (global shared keys + its local
        keys), measured on the site's own validation split before it trains."""
        self.current_epoch = round_index
        if self.uses_unlabelled_data and self.has_unlabelled_data:
            # built before the round's seed: building it draws random numbers, so a loader first built in the middle
            # of a round (after a resume, or where the trainer is rebuilt every round) would change what follows
            self.get_unlabelled_dataloader()
        seed_everything(round_seed(self.seed, self.site_index, round_index))
        if shared_state:
            self.load_shared_state(shared_state)
        self.pad_logs(round_index)
        self.on_epoch_start()
        val = self.validate()
        self.keep_best_received(val)
        self.on_train_epoch_start()
        self.before_local_training(shared_state or {})
        trains = self.can_train_this_round()
        outputs = []
        for step in range(self.num_iterations_per_epoch if trains else 0):
            self.before_train_step(step)
            outputs.append(self.local_step())
        self.after_local_training()
        if trains:
            self.on_train_epoch_end(outputs)
        else:
            self.logger.log('train_losses', float('nan'), self.current_epoch)
            self.print_to_log_file(f'round {round_index}: nothing to train on in this round (no labelled training '
                                   f'case, and {self.method_name} does not use the unlabelled ones yet): no local '
                                   f'step; the update repeats the received model and weighs 0 in the merge')
        self.print_to_log_file(f'round {round_index}: validation (before local training) measured the received '
                               f'model')
        self.on_epoch_end()  # nnU-Net's: losses to the log, periodic checkpoint, progress plot, current_epoch + 1
        metrics = dict(val)
        metrics.update({'train_loss': float(self.logger.get_value('train_losses', step=-1)),
                        'lr': float(self.optimizer.param_groups[0]['lr']),
                        'num_training_cases': self.num_training_cases if trains else 0,
                        'seconds': float(self.logger.get_value('epoch_end_timestamps', -1) -
                                         self.logger.get_value('epoch_start_timestamps', -1))})
        return self.update_arrays(round_index), metrics

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, with its logs as plain numbers (loadable with torch.load(weights_only=True))."""
        self.logger.load_checkpoint(to_plain(self.logger.get_checkpoint()))
        self._best_ema = to_plain(self._best_ema)
        super().save_checkpoint(filename)

    # ------------------------------------------------------------------ state kept by the site
    def method_state(self) -> dict:
        """Hook: method-specific tensors a site keeps between rounds (besides network and optimizer)."""
        return {}

    def load_method_state(self, state: dict):
        pass

    def site_state(self) -> dict:
        return {
            'run_id': self.run_id,
            'round': int(self.current_epoch),
            'network': cpu_copy(canonical_state(self.unwrapped_network)),
            'optimizer': cpu_copy(self.optimizer.state_dict()),
            'grad_scaler': cpu_copy(self.grad_scaler.state_dict()) if self.grad_scaler is not None else None,
            'logging': to_plain(self.logger.get_checkpoint()),
            'best_ema': to_plain(self._best_ema),
            'method': cpu_copy(self.method_state()),
        }

    def load_site_state(self, state: dict):
        self.unwrapped_network.load_state_dict(expand_aliases(state['network'], state_dict_aliases(
            self.unwrapped_network)))
        self.optimizer.load_state_dict(state['optimizer'])
        if self.grad_scaler is not None and state['grad_scaler'] is not None:
            self.grad_scaler.load_state_dict(state['grad_scaler'])
        self.logger.load_checkpoint(state['logging'])
        self._best_ema = state['best_ema']
        self.load_method_state(state['method'])

    def checkpoint_for_inference(self) -> dict:
        """What nnU-Net's predictor reads from a checkpoint, for the server's global checkpoint."""
        return {'inference_allowed_mirroring_axes': to_plain(self.inference_allowed_mirroring_axes)}


class RoundLogger(MetaLogger):
    """nnU-Net's logger; its progress plot (nnU-Net draws it every epoch, ~1 s) every ``plot_every`` rounds and
    after the last one."""

    def __init__(self, output_folder, resume, plot_every: int, num_rounds: int, verbose: bool = False):
        super().__init__(output_folder, resume, verbose)
        self.plot_every, self.num_rounds = int(plot_every), int(num_rounds)

    def plot_progress_png(self, output_folder: str, now: bool = False):
        done = len(self.get_value('epoch_end_timestamps', step=None))
        if now or done % self.plot_every == 0 or done >= self.num_rounds:
            super().plot_progress_png(output_folder)


def keys_of_modules(network: nn.Module, module_types: Iterable[type]) -> List[str]:
    """State-dict keys that belong to modules of the given types (e.g. all normalization layers)."""
    module_types = tuple(module_types)
    prefixes = [name + '.' for name, m in network.named_modules() if isinstance(m, module_types) and name]
    return [k for k in network.state_dict() if any(k.startswith(p) for p in prefixes)]


def segmentation_head_keys(network: nn.Module) -> List[str]:
    """The segmentation heads (every deep-supervision output) of nnU-Net's U-Nets: ``decoder.seg_layers``."""
    keys = [k for k in network.state_dict() if k.startswith('decoder.seg_layers.')]
    if not keys:
        raise ValueError(f'{type(network).__name__} has no decoder.seg_layers: cannot tell its segmentation heads')
    return keys


def preprocessed_cases(folder: str) -> List[str]:
    """The cases with nnU-Net's preprocessed properties file (``<case>.pkl``) in ``folder`` (none if it is absent)."""
    return [f[:-4] for f in os.listdir(folder) if f.endswith('.pkl')] if os.path.isdir(folder) else []


def _stop_loaders(loaders: list):
    """Continues any paused augmentation workers of ``loaders`` and ends them (None entries are skipped)."""
    loaders = [dl for dl in loaders if dl is not None]
    augmentation_workers.resume(loaders)
    for dl in loaders:
        if hasattr(dl, '_finish'):
            dl._finish()


class LossWithMethodTerm(nn.Module):
    """nnU-Net's loss plus the method's extra term (``trainer.extra_loss``) in training mode. Wrapping the loss
    keeps nnU-Net's train_step (AMP, gradient clipping) untouched; validation losses stay nnU-Net's."""

    def __init__(self, loss: nn.Module, trainer: 'FederatedTrainer'):
        super().__init__()
        self.loss = loss
        self.trainer = trainer

    def forward(self, output, target):
        if self.trainer.unlabelled_only and self.trainer.network.training:
            return self.trainer.extra_loss(output, target)  # a batch without labels: the method's term alone
        loss = self.loss(output, target)
        if self.trainer.network.training:
            extra = self.trainer.extra_loss(output, target)
            if extra is not None:
                loss = loss + extra
        return loss


def state_dict_aliases(network: nn.Module) -> Dict[str, str]:
    """Keys whose tensor is the tensor of an earlier key: {alias: canonical key}.

    nnU-Net's U-Nets hold the encoder twice in their state dict (``encoder.*`` and ``decoder.encoder.*``, one
    module); sending, merging and storing it once saves two thirds of the traffic for a PlainConvUNet."""
    first: Dict[int, str] = {}
    aliases = {}
    for k, v in network.state_dict(keep_vars=True).items():
        if id(v) in first:
            aliases[k] = first[id(v)]
        else:
            first[id(v)] = k
    return aliases


def canonical_keys(network: nn.Module) -> List[str]:
    aliases = state_dict_aliases(network)
    return [k for k in network.state_dict() if k not in aliases]


def canonical_state(network: nn.Module) -> Dict[str, torch.Tensor]:
    sd = network.state_dict()
    return {k: sd[k] for k in canonical_keys(network)}


def expand_aliases(state: dict, aliases: Dict[str, str]) -> dict:
    """A full state dict (what nnU-Net's load_state_dict and checkpoints expect) from canonical keys."""
    full = dict(state)
    for alias, key in aliases.items():
        if key in state:
            full[alias] = state[key]
    return full
