"""What a site does when the server asks: one handler per message kind.

A :class:`SiteWorker` keeps no state in memory between requests. Whatever must survive from one
request to the next (the sorted foreground sample of the fingerprint, later the optimizer state) lives
on the site's own disk, because the Flower engine starts a fresh process for every message.
"""
import os
from typing import Callable, Dict

from fednnunet import site_training
from fednnunet.federation import Site, site_folder
from fednnunet.fingerprint import count_values_leq, fingerprint_site, merge_site_fingerprints, release_private_sample
from fednnunet.jsonio import write_json
from fednnunet.planners.negotiation import describe_site
from fednnunet.preprocessing import preprocess_site
from fednnunet.site_training import SiteStateStore
from fednnunet.wire import Message


class SiteWorker:
    def __init__(self, site: Site, dataset_name: str, num_processes: int = 1, device: str = 'cuda',
                 state_in_memory: bool = False, verbose: bool = False):
        self.site = site
        self.dataset_name = dataset_name
        self.num_processes = num_processes
        self.device_name = device
        self.verbose = verbose
        self.state_store = SiteStateStore(in_memory=state_in_memory)
        self.handlers: Dict[str, Callable[[Message], Message]] = {
            'describe': self.describe,
            'fingerprint': self.fingerprint,
            'count_leq': self.count_leq,
            'release_fingerprint': self.release_fingerprint,
            'preprocess': self.preprocess,
            'fit': lambda m: site_training.fit(self, m),
            'finish': lambda m: site_training.finish(self, m),
            'evaluate': lambda m: site_training.evaluate(self, m),
        }

    @property
    def folder(self) -> str:
        """The site's nnU-Net preprocessed dataset folder (see federation.site_folder)."""
        return site_folder(self.dataset_name, self.site.name)

    @property
    def device(self):
        return site_training.resolve_device(self.device_name)

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

    def describe(self, message: Message) -> Message:
        return Message('description', describe_site(self.site))

    def fingerprint(self, message: Message) -> Message:
        fp = fingerprint_site(self.site, message.config['reader_writer'], int(message.config['num_samples_per_case']),
                              self.private_folder, self.num_processes)
        # the site's own fingerprint in nnU-Net's format, merged from its part alone; it stays at the site (nnU-Net
        # copies a fingerprint next to every trained model)
        own = merge_site_fingerprints([fp], lambda thresholds: count_values_leq(self.private_folder, thresholds))
        write_json(os.path.join(self.folder, 'dataset_fingerprint.json'), own)
        return Message('site_fingerprint', fp)

    def count_leq(self, message: Message) -> Message:
        return Message('counts', arrays=count_values_leq(self.private_folder, message.arrays))

    def release_fingerprint(self, message: Message) -> Message:
        release_private_sample(self.private_folder)
        return Message('released')

    def preprocess(self, message: Message) -> Message:
        report = preprocess_site(self.site, message.config['plans'], message.config['dataset_json'],
                                 message.config['configurations'], self.folder, self.num_processes)
        return Message('preprocessed', report)
