"""Server optimisers: the server steps from its global model towards the sites' merged model instead of taking
the merge as it is (Reddi et al., "Adaptive Federated Optimization", ICLR 2021; FedAvgM: Hsu et al., 2019).

With x the global model and mean the sites' (case-weighted) mean, the pseudo-gradient of a round is
``delta = mean - x``, per array:

- ``momentum`` (FedAvgM): ``m = beta1 * m + delta``, ``x = x + lr * m``; lr 1 and beta1 0 is FedAvg;
- ``adam`` (FedAdam): ``m = beta1 * m + (1 - beta1) * delta``, ``v = beta2 * v + (1 - beta2) * delta**2``,
  ``x = x + lr * m / (sqrt(v) + tau)``;
- ``yogi`` (FedYogi): as adam, with ``v = v - (1 - beta2) * delta**2 * sign(v - delta**2)``.

m starts at 0, v at tau**2 (Reddi et al.'s v_{-1} >= tau**2), no bias correction (as there). Only floating
arrays step; integer arrays (counters) are merged as before. An array that no site sent this round keeps its
value and its optimiser state. m and v are kept across a resume (the strategy's state)."""
from typing import Dict, Optional

import numpy as np

#: --server-optimizer choices
SERVER_OPTIMIZERS = ('none', 'momentum', 'adam', 'yogi')
#: default settings per optimiser (Reddi et al.'s beta1/beta2/tau; server learning rates: FedAvgM's 1 as in Hsu et
#: al., 0.01 for the adaptive ones, which step about lr per coordinate and round)
DEFAULTS = {
    'momentum': {'lr': 1.0, 'beta1': 0.9},
    'adam': {'lr': 0.01, 'beta1': 0.9, 'beta2': 0.99, 'tau': 1e-3},
    'yogi': {'lr': 0.01, 'beta1': 0.9, 'beta2': 0.99, 'tau': 1e-3},
}
#: what each setting may be
_RANGES = {'lr': lambda x: np.isfinite(x) and x > 0, 'tau': lambda x: np.isfinite(x) and x > 0,
           'beta1': lambda x: 0 <= x < 1, 'beta2': lambda x: 0 <= x < 1}
_RANGE_TEXT = {'lr': '> 0', 'tau': '> 0', 'beta1': 'in [0, 1)', 'beta2': 'in [0, 1)'}
#: the command-line flag of each setting
FLAGS = {'lr': '--server-lr', 'beta1': '--server-momentum', 'beta2': '--server-beta2', 'tau': '--server-tau'}


class ServerOptimizer:
    """One of SERVER_OPTIMIZERS but 'none'; settings left None take DEFAULTS."""

    def __init__(self, kind: str, lr: Optional[float] = None, beta1: Optional[float] = None,
                 beta2: Optional[float] = None, tau: Optional[float] = None):
        if kind not in DEFAULTS:
            raise ValueError(f"server optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, not {kind!r}")
        self.kind = kind
        given = {'lr': lr, 'beta1': beta1, 'beta2': beta2, 'tau': tau}
        for name, value in given.items():
            if value is not None and name not in DEFAULTS[kind]:
                raise ValueError(f'{FLAGS[name]} does not apply to the {kind} server optimizer (it takes '
                                 f'{", ".join(FLAGS[k] for k in DEFAULTS[kind])})')
        self.settings = {name: float(given[name]) if given[name] is not None else default
                         for name, default in DEFAULTS[kind].items()}
        for name, value in self.settings.items():
            if not _RANGES[name](value):
                raise ValueError(f'{FLAGS[name]} {value} is out of range for the {kind} server optimizer '
                                 f'({_RANGE_TEXT[name]})')
        self.m: Dict[str, np.ndarray] = {}
        self.v: Dict[str, np.ndarray] = {}

    def step(self, key: str, current: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """The new global value of one floating array from its current value and the sites' mean."""
        x = np.asarray(current, dtype=np.float64)
        delta = np.asarray(mean, dtype=np.float64) - x
        s = self.settings
        m = self.m.get(key, np.zeros_like(x))
        if self.kind == 'momentum':
            m = s['beta1'] * m + delta
            new = x + s['lr'] * m
        else:
            m = s['beta1'] * m + (1 - s['beta1']) * delta
            v = self.v.get(key, np.full_like(x, s['tau'] ** 2))
            d2 = delta * delta
            if self.kind == 'adam':
                v = s['beta2'] * v + (1 - s['beta2']) * d2
            else:
                v = v - (1 - s['beta2']) * d2 * np.sign(v - d2)
            self.v[key] = v
            new = x + s['lr'] * m / (np.sqrt(v) + s['tau'])
        self.m[key] = m
        return new.astype(np.asarray(current).dtype, copy=False)

    def state(self) -> dict:
        return {'kind': self.kind, 'm': dict(self.m), 'v': dict(self.v)}

    def load_state(self, state: dict):
        if state.get('kind') != self.kind:
            raise ValueError(f"the saved server optimizer state is {state.get('kind')!r}, this run's {self.kind!r}")
        self.m = {k: np.asarray(a, dtype=np.float64) for k, a in state.get('m', {}).items()}
        self.v = {k: np.asarray(a, dtype=np.float64) for k, a in state.get('v', {}).items()}


def server_optimizer(kind: Optional[str], **settings) -> Optional[ServerOptimizer]:
    """None for 'none' (plain FedAvg) when no setting is given; a clear error for settings without an optimiser."""
    if kind in (None, 'none'):
        given = sorted(k for k, v in settings.items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(FLAGS[k] for k in given)} need(s) --server-optimizer momentum, adam or "
                             f"yogi")
        return None
    return ServerOptimizer(kind, **settings)
