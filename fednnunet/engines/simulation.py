"""The default engine: every site in this process, training one after another on one device.

Every message crosses the same wire encoding a network would carry (:mod:`fednnunet.wire`), so what a
simulated site receives is exactly what it would receive over Flower: plain JSON and arrays.

The engine contract (shared with the Flower engine):
- ``site_names``: the sites taking part;
- ``ask(requests) -> replies``: sends each site its message, returns the replies of the sites that answered;
  ``missing`` then holds {site: reason} for the others (a simulated site never goes missing: its errors raise);
- ``ask_all(message)``: the same message to every site;
- ``bytes_sent`` / ``bytes_received``: running totals per site, as encoded on the wire.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

from fednnunet.site_worker import SiteWorker
from fednnunet.wire import Message, decode, encode


#: what the simulated sites do at the same time (CPU work in case workers); everything else takes turns
CONCURRENT_KINDS = ('fingerprint', 'preprocess')


class SimulationEngine:
    def __init__(self, workers: Dict[str, SiteWorker]):
        self.workers = workers
        self.bytes_sent: Dict[str, int] = {s: 0 for s in workers}
        self.bytes_received: Dict[str, int] = {s: 0 for s in workers}
        self.missing: Dict[str, str] = {}

    @property
    def site_names(self):
        return list(self.workers)

    def ask(self, requests: Dict[str, Message]) -> Dict[str, Message]:
        """Sends each site its request and returns the sites' replies (in the order asked). Fingerprinting and
        preprocessing (CONCURRENT_KINDS) with case workers (num_processes > 1) run for all sites at once, in
        threads that share this process's pool of case workers (fednnunet.parallel), as nnU-Net's one pool for the pooled dataset: no worker idles while a
        site's last case finishes. Training takes turns (one device). A site's error is raised (the first
        site's in the order asked)."""
        self.missing = {}
        if len(requests) > 1 and all(m.kind in CONCURRENT_KINDS and self.workers[s].num_processes > 1
                                     for s, m in requests.items()):
            with ThreadPoolExecutor(len(requests), thread_name_prefix='fednnunet-site') as threads:
                futures = {site: threads.submit(self._ask_one, site, m) for site, m in requests.items()}
                return {site: future.result() for site, future in futures.items()}
        return {site: self._ask_one(site, message) for site, message in requests.items()}

    def _ask_one(self, site: str, message: Message) -> Message:
        wire_out = encode(message)
        self.bytes_sent[site] += len(wire_out)
        reply = self.workers[site].handle(decode(wire_out))
        wire_back = encode(reply)
        self.bytes_received[site] += len(wire_back)
        return decode(wire_back)

    def ask_all(self, message: Message) -> Dict[str, Message]:
        return self.ask({s: message for s in self.workers})

    def close(self):
        """Ends the sites' kept trainers (and their augmentation workers); their states are on disk after this."""
        for worker in self.workers.values():
            worker.close()

    @classmethod
    def for_federation(cls, federation, num_processes: int = 1, **worker_options) -> 'SimulationEngine':
        """One worker per site; worker_options: device, state_in_memory, verbose, keep_trainers (see SiteWorker).
        The sites take turns on this machine, so with more than one site each pauses its augmentation workers at
        the end of its turn (they would poll and slow the others down) until its next; everything stays built."""
        worker_options.setdefault('keep_augmentation_workers', len(federation.sites) == 1)
        return cls({name: SiteWorker(site, federation.dataset_name, num_processes, **worker_options)
                    for name, site in federation.sites.items()})
