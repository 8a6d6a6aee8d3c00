"""Server-side merge rules. A strategy never sees images; it sees what sites send: named arrays, their
number of training cases and their metrics.

The API is built for what the methods need:
- keys shared by only some sites (per-modality encoders averaged over the sites that have that modality):
  :class:`FedAvg` averages every key over exactly the sites that sent it;
- sites with different architectures exchanging predictions instead of weights: updates are arbitrary named
  arrays, and :meth:`Strategy.configure_fit` decides per site what is sent, so a strategy can distribute
  predictions (or other sites' heads, read-only) instead of weights;
- a training step on server-held data: :meth:`Strategy.server_step` runs after every merge, with the server's
  trainer on its public set (sites.json ``server``; :class:`fednnunet.server_data.ServerTrainer`).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


@dataclass
class SiteUpdate:
    site: str
    arrays: Dict[str, np.ndarray]
    num_examples: int
    metrics: dict = field(default_factory=dict)


class Strategy:
    """Base class: what the server sends each site, and how it merges the replies.

    ``weighting``: how sites' updates weigh in a mean: by their number of training cases (default, as FedAvg)
    or 'uniform' (as the lab's public code does)."""
    #: False when the server merges no model (then no method using it has a global model)
    produces_global_model = True
    #: local iterations per round of the server's trainer on its public set (0: the strategy does not train there)
    server_iterations = 0

    @property
    def uses_server_data(self) -> bool:
        """True when :meth:`server_step` trains on the server's public set (the run then needs one)."""
        return self.server_iterations > 0

    def __init__(self, weighting: str = 'num_examples'):
        if weighting not in ('num_examples', 'uniform'):
            raise ValueError(f"weighting must be 'num_examples' or 'uniform', not {weighting!r}")
        self.weighting = weighting
        self._notes: List[str] = []

    def note(self, text: str):
        """Something the server should log for this round (e.g. a site that handed nothing over)."""
        self._notes.append(text)

    def take_notes(self) -> List[str]:
        notes, self._notes = self._notes, []
        return notes

    def weight(self, update: 'SiteUpdate') -> float:
        """An update's weight in a mean. 0 for a site that trained on nothing this round (num_examples 0: a site
        with unlabelled cases only, in a semi-supervised method's warm-up), whatever the weighting."""
        if update.num_examples == 0:
            return 0.0
        return 1.0 if self.weighting == 'uniform' else float(update.num_examples)

    def setup(self, rounds: int, site_indices: Dict[str, int], hyperparameters: dict):
        """Called by the server before the first round."""

    def initial_state(self, network_state: Dict[str, np.ndarray], shared_keys: List[str]) -> Dict[str, np.ndarray]:
        """The global state before round 0: the shared part of the (seeded) initial network."""
        return {k: np.array(network_state[k], copy=True) for k in shared_keys}

    def configure_fit(self, round_index: int, site: str, global_state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The arrays sent to ``site`` for this round (default: the global state)."""
        return global_state

    def expected_update_keys(self, round_index: int, shared_keys: List[str], readonly_keys: List[str]) -> set:
        """The array keys every site's update must hold in this round; the server drops an update with others."""
        return set(shared_keys)

    def site_update_keys(self, round_index: int, site: str, expected: set) -> set:
        """The keys ``site``'s update must hold (default: what every site's must, :meth:`expected_update_keys`)."""
        return expected

    def sites_ready(self, present_channels: Dict[str, List[int]]):
        """Called by the server after the training check, with each site's channels (dataset.json indices, checked)."""

    def aggregate(self, round_index: int, updates: List[SiteUpdate],
                  global_state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def server_start(self, server, seed: int):
        """Called before the first round (and again when a run resumes) when :attr:`uses_server_data`, with the
        server's trainer on its public set and the run's seed."""

    def update_array_spec(self) -> Dict[str, tuple]:
        """{key: (shape, dtype)} of the arrays a site's update may hold besides the network's (e.g. predictions)."""
        return {}

    def server_update_keys(self, shared_keys: List[str]) -> set:
        """The keys the server's trainer on its public set must return from its step."""
        return set(shared_keys)

    def server_step(self, round_index: int, global_state: Dict[str, np.ndarray], server=None) -> Dict[str, np.ndarray]:
        """Training on server-held data after the merge. ``server``: the server's trainer on its public set
        (:class:`fednnunet.server_data.ServerTrainer`: ``fit(round, arrays)``, ``device``), when
        :attr:`uses_server_data`; else None. Default: none."""
        return global_state

    def state(self) -> dict:
        """Anything the strategy must keep across a resume (plain data and numpy arrays)."""
        return {}

    def load_state(self, state: dict):
        pass


def weighted_mean(arrays: List[np.ndarray], weights: List[float]) -> np.ndarray:
    """sum_i w_i x_i / sum_i w_i, accumulated in float64, returned in the arrays' dtype."""
    total = float(sum(weights))
    out = np.zeros(arrays[0].shape, dtype=np.float64)
    for a, w in zip(arrays, weights):
        out += np.asarray(a, dtype=np.float64) * (w / total)
    return out.astype(arrays[0].dtype, copy=False)


class FedAvg(Strategy):
    """McMahan et al. (2017): the mean of the sites' arrays weighted by their number of training cases
    (``weighting='uniform'``: unweighted). A key is averaged over the sites that sent it; a key nobody sent keeps
    its previous value. Integer arrays (counters) must agree and are kept.

    ``server_optimizer`` ('momentum', 'adam', 'yogi'; fednnunet.server_optimizers): the server steps from the
    global model towards that mean with server momentum (FedAvgM) or FedAdam / FedYogi instead of taking it.

    ``server_iterations`` N > 0: after every merge the server trains the merged model for N iterations of the
    method's local training on its labelled public set (sites.json ``server``), and that is the round's global model
    (server-side training on a public set, as in Zhao et al., 2018, who share such a set to counter non-IID sites;
    documentation/methods/server_training.md)."""

    def __init__(self, weighting: str = 'num_examples', server_optimizer: Optional[str] = None,
                 server_lr: Optional[float] = None, server_momentum: Optional[float] = None,
                 server_beta2: Optional[float] = None, server_tau: Optional[float] = None,
                 server_iterations: Optional[int] = None):
        super().__init__(weighting)
        from fednnunet.server_optimizers import server_optimizer as make_optimizer
        self.optimizer = make_optimizer(server_optimizer, lr=server_lr, beta1=server_momentum, beta2=server_beta2,
                                        tau=server_tau)
        from fednnunet.server_input import MAX_ITERATIONS
        if server_iterations is not None and (isinstance(server_iterations, bool) or
                                              not isinstance(server_iterations, int) or
                                              not 0 <= server_iterations <= MAX_ITERATIONS):
            raise ValueError(f'server_iterations must be a whole number of iterations in [0, {MAX_ITERATIONS}], not '
                             f'{server_iterations!r}')
        self.server_iterations = int(server_iterations or 0)

    def aggregate(self, round_index, updates, global_state):
        if not updates:
            raise ValueError('no site update to merge')
        merged = dict(global_state)
        keys = sorted({k for u in updates for k in u.arrays})
        for k in keys:
            senders = [u for u in updates if k in u.arrays]
            arrays = [np.asarray(u.arrays[k]) for u in senders]
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1:
                raise ValueError(f"sites sent {k} with different shapes: "
                                 f"{ {u.site: u.arrays[k].shape for u in senders} }")
            if arrays[0].dtype.kind != 'f':
                if any(not np.array_equal(a, arrays[0]) for a in arrays[1:]):
                    raise ValueError(f'sites disagree on the non-float array {k}')
                merged[k] = arrays[0]
                continue
            weights = [self.weight(u) for u in senders]
            if sum(weights) <= 0:  # only sites that trained on nothing this round sent it: it keeps its value
                if k not in global_state:
                    raise ValueError(f'the sites that sent {k} trained on nothing, and it has no previous value')
                merged[k] = global_state[k]
                continue
            merged[k] = weighted_mean(arrays, weights)
            if self.optimizer is not None and k in global_state:
                merged[k] = self.optimizer.step(k, global_state[k], merged[k])
        return merged

    def server_step(self, round_index, global_state, server=None):
        """With ``server_iterations``: the merged model trained on the server's public set becomes the global
        model (every key the method shares; the rest keeps the merge's value)."""
        if not self.uses_server_data:
            return global_state
        return {**global_state, **server.fit(round_index, global_state).arrays}

    def state(self):
        return {'server_optimizer': self.optimizer.state()} if self.optimizer is not None else {}

    def load_state(self, state):
        if self.optimizer is not None:
            self.optimizer.load_state(state.get('server_optimizer', {'kind': None}))


class TwoStageFedAvg(FedAvg):
    """FedAvg over the shared keys for the first stage; then hands every site's ``readonly/`` parts (sent with the
    last first-stage round) to every site, with the first second-stage round that site takes part in, and merges
    nothing afterwards (see fednnunet/trainers/two_stage.py). A site that missed the last first-stage round handed
    nothing over: the others calibrate without its parts, and the server says so."""

    READONLY = 'readonly/'

    def __init__(self, weighting: str = 'num_examples', **server_optimizer):
        if server_optimizer.get('server_iterations'):
            raise ValueError('server iterations train a whole merged model on the public set; a two-stage method '
                             'merges only its shared part and, in its second stage, nothing')
        super().__init__(weighting, **server_optimizer)
        self.readonly: Dict[str, Dict[str, np.ndarray]] = {}
        self.handed_over: List[str] = []  # sites that have received the read-only parts
        self.stage1_rounds = self.rounds = None
        self.site_indices: Dict[str, int] = {}

    def setup(self, rounds, site_indices, hyperparameters):
        self.rounds = rounds
        self.stage1_rounds = rounds - int(hyperparameters['stage2_rounds'])
        self.site_indices = dict(site_indices)

    def configure_fit(self, round_index, site, global_state):
        if round_index < self.stage1_rounds:
            return global_state
        if site not in self.handed_over and round_index < self.rounds:  # the finish message hands nothing over
            out = dict(global_state)
            for s, parts in self.readonly.items():
                out.update({f'{self.READONLY}{self.site_indices[s]}/{k}': v for k, v in parts.items()})
            return out
        return {}

    def expected_update_keys(self, round_index, shared_keys, readonly_keys):
        if round_index >= self.stage1_rounds:
            return set()
        if round_index == self.stage1_rounds - 1 and self.stage1_rounds < self.rounds:
            return set(shared_keys) | {self.READONLY + k for k in readonly_keys}
        return set(shared_keys)

    def aggregate(self, round_index, updates, global_state):
        plain = []
        for u in updates:
            parts = {k[len(self.READONLY):]: v for k, v in u.arrays.items() if k.startswith(self.READONLY)}
            if parts:
                self.readonly[u.site] = parts
            plain.append(SiteUpdate(u.site, {k: v for k, v in u.arrays.items() if not k.startswith(self.READONLY)},
                                    u.num_examples, u.metrics))
        if round_index == self.stage1_rounds - 1:
            missing = sorted(set(self.site_indices) - set(self.readonly))
            if missing:
                self.note(f'the second stage starts without the parts of site(s) {missing} (no update in the last '
                          f'round of the first stage): the other sites calibrate against '
                          f'{sorted(self.readonly)} only')
        if round_index >= self.stage1_rounds:
            for u in updates:
                if u.site not in self.handed_over:
                    self.handed_over.append(u.site)
            return global_state
        return super().aggregate(round_index, plain, global_state)

    def state(self):
        return {'readonly': self.readonly, 'handed_over': list(self.handed_over), **super().state()}

    def load_state(self, state):
        super().load_state(state)
        self.readonly = {s: {k: np.asarray(v) for k, v in parts.items()}
                         for s, parts in state.get('readonly', {}).items()}
        self.handed_over = list(state.get('handed_over', []))


class ModalityFedAvg(FedAvg):
    """FedMM's merge: FedAvg in which the encoder of modality m (keys ``encoders.<m>.``) is sent to, accepted from
    and averaged over only the sites that have modality m (their channels, as each said at the training check);
    every other key is FedAvg's. A site never receives, and may not send, the encoder of a modality it lacks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.site_channels: Dict[str, set] = {}

    def sites_ready(self, present_channels):
        self.site_channels = {s: {int(c) for c in channels} for s, channels in present_channels.items()}

    def owns(self, site: str, key: str) -> bool:
        from fednnunet.networks.fedmm import modality_of_key
        modality = modality_of_key(key)
        if modality is None:
            return True
        if site not in self.site_channels:
            raise ValueError(f"site '{site}' did not say which channels it has (training check)")
        return modality in self.site_channels[site]

    def configure_fit(self, round_index, site, global_state):
        return {k: v for k, v in global_state.items() if self.owns(site, k)}

    def site_update_keys(self, round_index, site, expected):
        return {k for k in expected if self.owns(site, k)}


class NoAggregation(Strategy):
    """Each site trains alone (the 'local' baseline): nothing is sent, nothing merged."""
    produces_global_model = False

    def __init__(self, weighting: str = 'num_examples', server_optimizer: Optional[str] = None, **settings):
        super().__init__(weighting)
        if settings.get('server_iterations'):
            raise ValueError('server iterations train the merged model; the local baseline merges nothing')
        if server_optimizer not in (None, 'none') or any(v is not None for k, v in settings.items()
                                                         if k != 'server_iterations'):
            raise ValueError('a server optimizer needs a merge: the local baseline merges nothing')

    def setup(self, rounds: int, site_indices: Dict[str, int], hyperparameters: dict):
        """Called by the server before the first round."""

    def initial_state(self, network_state, shared_keys):
        return {}

    def expected_update_keys(self, round_index, shared_keys, readonly_keys):
        return set()

    def configure_fit(self, round_index, site, global_state):
        return {}

    def aggregate(self, round_index, updates, global_state):
        return {}


def pooled_dice(metrics: Dict[str, dict]) -> Optional[List[float]]:
    """Pooled (global) pseudo Dice per class from the sites' summed TP/FP/FN, as nnU-Net computes it."""
    if not metrics:
        return None
    tp = np.sum([m['tp'] for m in metrics.values()], 0)
    fp = np.sum([m['fp'] for m in metrics.values()], 0)
    fn = np.sum([m['fn'] for m in metrics.values()], 0)
    with np.errstate(invalid='ignore', divide='ignore'):
        return [float(x) for x in 2 * tp / (2 * tp + fp + fn)]


class KnowledgeExchange(Strategy):
    """HSSF's server (fednnunet/trainers/hssf.py): no weights are merged. Before the first round the server draws the
    public patch bank from its public set (:mod:`fednnunet.public_patches`); each site gets it with its first round.
    After the warm-up, the sites send their predictions on the bank; the server checks them (a site whose predictions
    fail a check is named and left out of the round), and its own trainer on the public set rectifies its model
    towards the best site per patch (``server_iterations`` iterations a round; default: as many as the sites'); its
    predictions on the bank go to every site with the next round.

    Each party's update weighs nothing here (there is no mean); ``weighting`` is accepted for the command lines."""
    produces_global_model = False

    def __init__(self, weighting: str = 'num_examples', server_optimizer: Optional[str] = None,
                 server_iterations: Optional[int] = None, **settings):
        super().__init__(weighting)
        if server_optimizer not in (None, 'none') or any(v is not None for v in settings.values()):
            raise ValueError('a server optimizer steps a merged model; hssf merges no weights')
        from fednnunet.server_input import MAX_ITERATIONS
        if server_iterations is not None and (isinstance(server_iterations, bool) or
                                              not isinstance(server_iterations, int) or
                                              not 0 <= server_iterations <= MAX_ITERATIONS):
            raise ValueError(f'server_iterations must be a whole number of iterations in [0, {MAX_ITERATIONS}], not '
                             f'{server_iterations!r}')
        self.server_iterations = int(server_iterations or 0)  # 0: as many as the sites' local iterations
        self.bank: Dict[str, np.ndarray] = {}
        self.num_classes = self.patch_size = None
        self.handed_over: List[str] = []
        self.server_knowledge: Dict[str, np.ndarray] = {}
        self.site_knowledge: Dict[str, Dict[str, np.ndarray]] = {}
        self._server_has_bank = False
        self.warmup_rounds = self.rounds = 0
        self.site_indices: Dict[str, int] = {}

    @property
    def uses_server_data(self) -> bool:
        return True

    def setup(self, rounds, site_indices, hyperparameters):
        self.rounds, self.site_indices = rounds, dict(site_indices)
        self.warmup_rounds = int(hyperparameters['warmup_rounds'])
        self.num_patches = int(hyperparameters['public_patches'])

    def server_start(self, server, seed: int):
        """The bank, drawn from the server's public set (the same one for the same seed, after a resume too)."""
        from fednnunet.public_patches import draw_public_patches
        trainer = server.local_trainer()
        self.bank = draw_public_patches(trainer, self.num_patches, seed)
        self.num_classes = trainer.label_manager.num_segmentation_heads
        self.patch_size = tuple(int(s) for s in trainer.configuration_manager.patch_size)

    @property
    def num_patches_drawn(self) -> int:
        from fednnunet.public_patches import IMAGES
        return len(self.bank[IMAGES])

    def knowledge_spec(self) -> Dict[str, tuple]:
        from fednnunet import knowledge
        n = self.num_patches_drawn
        return {knowledge.PROBABILITIES: ((n, self.num_classes, *self.patch_size), np.dtype(np.float16)),
                knowledge.CONFIDENCE: ((n, 1, *self.patch_size), np.dtype(np.float16))}

    def update_array_spec(self) -> Dict[str, tuple]:
        return self.knowledge_spec()

    def server_update_keys(self, shared_keys):
        return set(self.knowledge_spec())

    def initial_state(self, network_state, shared_keys):
        return {}

    def configure_fit(self, round_index, site, global_state):
        if round_index >= self.rounds:  # the finish message
            return {}
        out = {} if site in self.handed_over else dict(self.bank)
        if round_index >= self.warmup_rounds:
            out.update(self.server_knowledge)
        return out

    def expected_update_keys(self, round_index, shared_keys, readonly_keys):
        return set(self.knowledge_spec()) if round_index >= self.warmup_rounds else set()

    def aggregate(self, round_index, updates, global_state):
        from fednnunet import knowledge
        from fednnunet.errors import FederationError
        self.site_knowledge = {}
        for u in updates:
            if u.site not in self.handed_over:
                self.handed_over.append(u.site)
            if not u.arrays:
                continue
            try:
                knowledge.check_predictions(u.arrays, self.num_patches_drawn, self.num_classes, self.patch_size,
                                            u.site)
            except FederationError as e:
                self.note(f'predictions of {u.site} left out: {e}')
                continue
            self.site_knowledge[u.site] = dict(u.arrays)
        return global_state

    def server_step(self, round_index, global_state, server=None):
        from fednnunet import knowledge
        from fednnunet.trainers.hssf import site_knowledge_keys
        arrays = {} if self._server_has_bank else dict(self.bank)
        if round_index >= self.warmup_rounds:
            for site, predictions in sorted(self.site_knowledge.items()):
                keys = site_knowledge_keys(self.site_indices[site])
                arrays.update({keys[0]: predictions[knowledge.PROBABILITIES],
                               keys[1]: predictions[knowledge.CONFIDENCE]})
        update = server.fit(round_index, arrays)
        self._server_has_bank = True
        self.server_knowledge = dict(update.arrays)
        self.site_knowledge = {}
        return global_state

    def state(self):
        return {'server_knowledge': self.server_knowledge, 'handed_over': list(self.handed_over)}

    def load_state(self, state):
        self.server_knowledge = {k: np.asarray(v) for k, v in state.get('server_knowledge', {}).items()}
        self.handed_over = list(state.get('handed_over', []))
