"""The server's own labelled public set (sites.json ``server``), as one more participant in planning.

The public set is the server's data: it is fingerprinted, planned and preprocessed exactly as a site's (the server
answers the same messages through its own :class:`~fednnunet.site_worker.SiteWorker`, in the server's process, on the
server's disk), and it is pooled into the merged fingerprint like a site's cases: nnU-Net plans from every labelled
training case of a dataset, and the server trains on this set with the same plans. Its preprocessed folder is
``<preprocessed>/DatasetXXX/sites/server/`` (no site may be named ``server``).

:class:`WithServerData` wraps an engine (simulation or Flower) for planning: every request to "all sites" also goes
to the server's worker, so the planning code needs no special case. Training does not use it: the server's public set
is no site of the federation's rounds; a method that trains on it gets it through the training server (see
:class:`fednnunet.training_server.FederatedTraining`).
"""
from typing import Dict, List

from fednnunet.errors import FederationError
from fednnunet.federation import SERVER_DATA
from fednnunet.wire import Message, decode, encode


class WithServerData:
    """An engine whose participants are the wrapped engine's sites and the server's public set (named
    :data:`~fednnunet.federation.SERVER_DATA`). Messages to the public set cross the wire encoding too, so it sees
    what a site would see; its errors raise (it is the server's own data)."""

    def __init__(self, engine, server_worker):
        if SERVER_DATA in engine.site_names:
            raise FederationError(f"a site calls itself '{SERVER_DATA}', the name of the server's public set",
                                  site=SERVER_DATA, field='name')
        self.engine = engine
        self.server_worker = server_worker
        self.bytes_sent = engine.bytes_sent
        self.bytes_received = engine.bytes_received
        self.bytes_sent.setdefault(SERVER_DATA, 0)
        self.bytes_received.setdefault(SERVER_DATA, 0)

    @property
    def site_names(self) -> List[str]:
        return list(self.engine.site_names) + [SERVER_DATA]

    @property
    def missing(self) -> Dict[str, str]:
        return self.engine.missing

    def ask(self, requests: Dict[str, Message]) -> Dict[str, Message]:
        own = requests.get(SERVER_DATA)
        replies = self.engine.ask({s: m for s, m in requests.items() if s != SERVER_DATA})
        if own is not None:
            replies[SERVER_DATA], sent, received = ask_in_process(self.server_worker, own)
            self.bytes_sent[SERVER_DATA] += sent
            self.bytes_received[SERVER_DATA] += received
        return replies

    def ask_all(self, message: Message) -> Dict[str, Message]:
        return self.ask({s: message for s in self.site_names})

    def close(self):
        self.server_worker.close()
        close = getattr(self.engine, 'close', None)
        if close is not None:
            close()


def ask_in_process(worker, message: Message):
    """``worker``'s reply to ``message`` through the wire encoding (it sees what a site would see); returns (reply,
    bytes sent, bytes received)."""
    wire_out = encode(message)
    wire_back = encode(worker.handle(decode(wire_out)))
    return decode(wire_back), len(wire_out), len(wire_back)


def public_set_worker(site, dataset_name: str, num_processes: int = 1, **worker_options):
    """The site worker of the server's public set (None without one). Its augmentation workers pause between its
    turns, as simulated sites' do: idle, they would poll and slow the sites down."""
    if site is None:
        return None
    from fednnunet.site_worker import SiteWorker
    worker_options.setdefault('keep_augmentation_workers', False)
    return SiteWorker(site, dataset_name, num_processes, **worker_options)


def with_server_data(engine, site, dataset_name: str, num_processes: int = 1):
    """``engine``, with the server's public set (``site``, or None) as a participant in planning."""
    if site is None:
        return engine
    return WithServerData(engine, public_set_worker(site, dataset_name, num_processes))


def planning_engine(engine, federation, num_processes: int = 1):
    """``engine``, with the server's public set as a participant when sites.json gives the server one."""
    return with_server_data(engine, federation.server, federation.dataset_name, num_processes)


class ServerTrainer:
    """The server's trainer on its public set, for a strategy's :meth:`~fednnunet.strategies.Strategy.server_step`:
    the method's trainer at a site worker of the public set, in the server's process, on the server's device. It is
    asked exactly as a site is (``check_training``, ``fit``, ``finish`` through the wire encoding), so it keeps its
    optimizer and logs across rounds, resumes with ``--continue`` and writes its own nnU-Net model folder
    (``sites/server/`` of the results), as a site does.

    ``config_for(**extra)``: the training server's request config for the public set; ``screen(reply)``: why a
    reply cannot be used (None: it can)."""

    def __init__(self, worker, config_for, screen):
        self.worker = worker
        self.config_for = config_for
        self.screen = screen
        self.last_update = None  # the latest round's (for the server's round log)

    @property
    def device(self):
        """The device the server trains on (the public set's worker's)."""
        return self.worker.device

    def ask(self, message: Message) -> Message:
        return ask_in_process(self.worker, message)[0]

    def local_trainer(self):
        """The method's trainer at the public set, configured for this run but not started (its data not loaded): for a
        strategy that needs the public set's own settings (patch size, labels, split) or draws from it."""
        from fednnunet.site_training import build_site_trainer
        return build_site_trainer(self.worker, self.config_for(round=0))

    def check_training(self):
        self.ask(Message('check_training', self.config_for(round=0)))

    def fit(self, round_index: int, arrays: dict):
        """One round of the method's local training on the public set (the strategy's iterations), from ``arrays``;
        returns the :class:`~fednnunet.strategies.SiteUpdate` (its metrics: the received model validated on the
        public set's validation split first, as a site validates)."""
        from fednnunet.strategies import SiteUpdate
        reply = self.ask(Message('fit', self.config_for(round=round_index), arrays=arrays))
        why = self.screen(reply)
        if why:
            raise FederationError(f'the server step on the public set gave an unusable update: {why}',
                                  site=SERVER_DATA, field='server step')
        self.last_update = SiteUpdate(SERVER_DATA, dict(reply.arrays), int(reply.config['num_examples']),
                                      reply.config['metrics'])
        return self.last_update

    def finish(self, arrays: dict, validate: bool) -> Message:
        """The final model stored in the public set's model folder, and validated on its validation split."""
        return self.ask(Message('finish', self.config_for(validate=validate), arrays=arrays))

