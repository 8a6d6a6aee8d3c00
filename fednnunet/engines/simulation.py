"""The default engine: every site in this process, one after another, on one device.

Every message crosses the same wire encoding a network would carry (:mod:`fednnunet.wire`), so what a
simulated site receives is exactly what it would receive over Flower: plain JSON and arrays.

The engine contract (shared with the Flower engine):
- ``site_names``: the sites taking part;
- ``ask(requests) -> replies``: sends each site its message, returns the replies of the sites that answered;
  ``missing`` then holds {site: reason} for the others (a simulated site never goes missing: its errors raise);
- ``ask_all(message)``: the same message to every site;
- ``bytes_sent`` / ``bytes_received``: running totals per site, as encoded on the wire.
"""
from typing import Dict

from fednnunet.site_worker import SiteWorker
from fednnunet.wire import Message, decode, encode


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
        """Sends each site its request and returns the sites' replies (in the order asked)."""
        replies = {}
        self.missing = {}
        for site, message in requests.items():
            wire_out = encode(message)
            self.bytes_sent[site] += len(wire_out)
            reply = self.workers[site].handle(decode(wire_out))
            wire_back = encode(reply)
            self.bytes_received[site] += len(wire_back)
            replies[site] = decode(wire_back)
        return replies

    def ask_all(self, message: Message) -> Dict[str, Message]:
        return self.ask({s: message for s in self.workers})

    def close(self):
        """Ends the sites' kept trainers (and their augmentation workers); their states are on disk after this."""
        for worker in self.workers.values():
            worker.close()

    @classmethod
    def for_federation(cls, federation, num_processes: int = 1, **worker_options) -> 'SimulationEngine':
        """One worker per site; worker_options: device, state_in_memory, verbose, keep_trainers (see SiteWorker).
        The sites take turns on this machine, so with more than one site each stops its augmentation workers at
        the end of its turn (they would poll and slow the others down); everything else stays built."""
        worker_options.setdefault('keep_augmentation_workers', len(federation.sites) == 1)
        return cls({name: SiteWorker(site, federation.dataset_name, num_processes, **worker_options)
                    for name, site in federation.sites.items()})
