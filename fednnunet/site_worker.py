"""What a site does when the server asks: one handler per message kind.

A :class:`SiteWorker` keeps no state in memory between requests. Whatever must survive from one
request to the next (the sorted foreground sample of the fingerprint, later the optimizer state) lives
on the site's own disk, because the Flower engine starts a fresh process for every message.

The heavy modules (torch, nnU-Net's trainers, planners, preprocessing) are imported by the handler that
needs them, so that a message which needs none of them (``identify``) answers in a fraction of a second:
the Flower engine pays the imports once per message.
"""
import os
import platform
from typing import Callable, Dict, Optional

import fednnunet
from fednnunet import server_input
from fednnunet.errors import FederationError
from fednnunet.federation import Site, site_folder
from fednnunet.wire import Message

#: every request a site answers (the Flower ClientApp registers one handler per kind)
MESSAGE_KINDS = ('identify', 'describe', 'fingerprint', 'count_leq', 'release_fingerprint', 'preprocess',
                 'check_training', 'fit', 'finish', 'evaluate', 'crossval_counts', 'store_postprocessing')


def package_version(name: str) -> Optional[str]:
    """The installed version of a distribution, without importing it (None if it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def software_versions() -> dict:
    """What a site and the server compare before they work together."""
    return {'fednnunet_version': fednnunet.__version__, 'flwr_version': package_version('flwr'),
            'nnunetv2_version': package_version('nnunetv2'), 'torch_version': package_version('torch'),
            'python_version': platform.python_version()}


class SiteWorker:
    def __init__(self, site: Site, dataset_name: str, num_processes: int = 1, device: str = 'auto',
                 state_in_memory: bool = False, verbose: bool = False, keep_trainers: bool = True,
                 keep_augmentation_workers: bool = True):
        """keep_trainers: keep the training run's trainer alive between rounds (site_training.LiveTrainer); off
        where the process ends after every message anyway. keep_augmentation_workers: with a kept trainer, keep
        nnU-Net's augmentation workers running between rounds too; off where sites take turns on one machine
        (simulation), since idle workers poll and slow down the site whose turn it is: they are paused between
        the site's rounds (fednnunet.augmentation_workers), or stopped where processes cannot be paused."""
        self.site = site
        self.dataset_name = dataset_name
        self.num_processes = num_processes
        self.device_name = device
        self.verbose = verbose
        self.state_in_memory = state_in_memory
        self.keep_trainers = keep_trainers
        self.keep_augmentation_workers = keep_augmentation_workers
        self.live_trainer = None  # site_training.LiveTrainer of the current training run
        self._state_store = None
        self._state_writer = None
        self.handlers: Dict[str, Callable[[Message], Message]] = {
            'identify': self.identify,
            'describe': self.describe,
            'fingerprint': self.fingerprint,
            'count_leq': self.count_leq,
            'release_fingerprint': self.release_fingerprint,
            'preprocess': self.preprocess,
            'check_training': lambda m: self._site_training().check_training(self, m),
            'fit': lambda m: self._site_training().fit(self, m),
            'finish': lambda m: self._site_training().finish(self, m),
            'evaluate': lambda m: self._site_training().evaluate(self, m),
            'crossval_counts': lambda m: self._crossval().crossval_counts(self, m),
            'store_postprocessing': lambda m: self._crossval().store_postprocessing(self, m),
        }
        assert set(self.handlers) == set(MESSAGE_KINDS)

    @staticmethod
    def _crossval():
        from fednnunet import crossval
        return crossval

    @staticmethod
    def _site_training():
        from fednnunet import site_training
        return site_training

    @property
    def state_store(self):
        """The site's state between rounds (fednnunet.site_training.SiteStateStore): on disk unless in memory."""
        if self._state_store is None:
            self._state_store = self._site_training().SiteStateStore(in_memory=self.state_in_memory)
        return self._state_store

    @property
    def state_writer(self):
        """Writes the round states to the state store in the background (site_training.StateWriter)."""
        if self._state_writer is None:
            self._state_writer = self._site_training().StateWriter(self.state_store, background=self.keep_trainers)
        return self._state_writer

    def close_trainer(self, trainer=None):
        """Ends the kept trainer (its augmentation workers stop), and ``trainer`` if it is another one."""
        live, self.live_trainer = self.live_trainer, None
        if live is not None:
            live.close()
        if trainer is not None and (live is None or trainer is not live.trainer):
            trainer.close()

    def close(self):
        """The end of this site's work in this process: the kept trainer ends, every state is on disk, the pool
        of processes for fingerprinting/preprocessing (fednnunet.parallel) ends."""
        from fednnunet.parallel import close_pool
        close_pool()
        self.close_trainer()
        if self._state_writer is not None:
            self._state_writer.flush()

    @property
    def folder(self) -> str:
        """The site's nnU-Net preprocessed dataset folder (see federation.site_folder)."""
        return site_folder(self.dataset_name, self.site.name)

    @property
    def device(self):
        return self._site_training().resolve_device(self.device_name)

    @property
    def private_folder(self) -> str:
        """Scratch that never leaves the site (e.g. its sampled foreground intensities)."""
        return os.path.join(self.folder, 'private')

    def handle(self, message: Message) -> Message:
        try:
            handler = self.handlers[message.kind]
        except KeyError:
            raise ValueError(f"site '{self.site.name}' does not know the request {message.kind!r}") from None
        return handler(message)

    def identify(self, message: Message) -> Message:
        """Who this site is and what it runs: the Flower engine maps node ids to sites with it (a restarted
        SuperNode gets a new node id) and refuses a site whose versions differ from the server's."""
        return Message('identity', {'site': self.site.name, 'dataset_name': self.dataset_name,
                                    'device': self.device_name, **software_versions()})

    def describe(self, message: Message) -> Message:
        from fednnunet.planners.negotiation import describe_site
        return Message('description', describe_site(self.site))

    def fingerprint(self, message: Message) -> Message:
        from fednnunet.fingerprint import count_values_leq, fingerprint_site, merge_site_fingerprints
        from fednnunet.jsonio import write_json
        reader = server_input.identifier(message.config.get('reader_writer'), 'reader_writer', self.site.name)
        samples = server_input.integer(message.config.get('num_samples_per_case'), 'num_samples_per_case', 1,
                                       10 ** 9, self.site.name)
        self.count_queries.reset()
        fp = fingerprint_site(self.site, reader, samples, self.private_folder, self.num_processes)
        # the site's own fingerprint in nnU-Net's format, merged from its part alone; it stays at the site (nnU-Net
        # copies a fingerprint next to every trained model)
        if fp['cases']:
            own = merge_site_fingerprints([fp], lambda thresholds: count_values_leq(self.private_folder, thresholds))
        else:  # a site with unlabelled cases only: no labelled case to fingerprint (nnU-Net's format, empty)
            own = {'spacings': [], 'shapes_after_crop': [], 'foreground_intensity_properties_per_channel': {},
                   'median_relative_size_after_cropping': None}
        write_json(os.path.join(self.folder, 'dataset_fingerprint.json'), own)
        return Message('site_fingerprint', fp)

    @property
    def count_queries(self):
        from fednnunet.fingerprint import CountQueryBudget
        return CountQueryBudget(self.private_folder, self.site.name)

    def count_leq(self, message: Message) -> Message:
        """Counts of the private sample <= the server's thresholds, within the honest search's schedule only
        (fednnunet.fingerprint.CountQueryBudget): a curious server cannot rebuild the site's histogram."""
        from fednnunet.fingerprint import count_values_leq
        self.count_queries.spend(message.arrays, self.site.present_channels)
        return Message('counts', arrays=count_values_leq(self.private_folder, message.arrays))

    def release_fingerprint(self, message: Message) -> Message:
        """After the merge: the private sample goes. ``discard`` (after a failed planning): the site's fingerprint
        goes too."""
        from fednnunet.fingerprint import release_private_sample
        release_private_sample(self.private_folder)
        if message.config.get('discard') is True:
            own = os.path.join(self.folder, 'dataset_fingerprint.json')
            if os.path.isfile(own):
                os.remove(own)
        return Message('released')

    def preprocess(self, message: Message) -> Message:
        from fednnunet.preprocessing import preprocess_site
        plans = server_input.plans(message.config.get('plans'), self.site.name)
        dataset_json = server_input.dataset_json(message.config.get('dataset_json'), self.site.name)
        configurations = message.config.get('configurations')
        if not isinstance(configurations, list):
            raise FederationError('must be a list of configuration names', site=self.site.name,
                                  field='configurations')
        for c in configurations:
            server_input.identifier(c, 'configurations', self.site.name)
        report = preprocess_site(self.site, plans, dataset_json, configurations, self.folder, self.num_processes)
        return Message('preprocessed', report)
