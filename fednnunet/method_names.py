"""The names of fednnunet's methods, without importing them.

The command-line tools check ``--method`` while they parse their arguments, before torch or nnU-Net is
imported (that takes seconds); :mod:`fednnunet.methods` builds the methods themselves and checks at import that
it agrees with this module (same names, summaries and trainer class names).
"""
from typing import Dict, List

#: method -> (its trainer's class name, one-line summary)
METHODS: Dict[str, tuple] = {
    'fedavg': ('FedAvgTrainer', 'all weights averaged, weighted by training cases'),
    'fedprox': ('FedProxTrainer', 'FedAvg + proximal term mu/2||w - w_global||^2 (--mu)'),
    'fedbn': ('FedBNTrainer', 'normalization layers stay local'),
    'fedper': ('FedPerTrainer', 'segmentation heads stay local, joint training'),
    'fedrep': ('FedRepTrainer', 'heads local; head-only then body-only steps per round'),
    'local': ('LocalTrainer', 'each site alone (baseline)'),
    'lcfed': ('LCFedTrainer', 'LC-Fed: PCS + contrastive term, local heads; head calibration'),
    'feddp': ('FedDPTrainer', 'FedDP: local attention queries; inter-site guided calibration'),
    'fedfixmatch': ('FedFixMatchTrainer', 'semi-supervised FedAvg: FixMatch pseudo-labels on unlabelled cases'),
    'hssf': ('HSSFTrainer', 'HSSF: semi-supervised, per-site networks, predictions on a public set'),
    'fedmm': ('FedMMTrainer', 'FedMM: an encoder per modality, each averaged over the sites that have it'),
    'multifedavg': ('MultiFedAvgTrainer', "FedAvg at sites with different channels: a site's missing ones are zeros"),
}

#: the pooled baseline: nnU-Net's trainer on every site's data in one place (simulation only)
CENTRALIZED = 'centralized'
CENTRALIZED_TRAINER = 'CentralizedTrainer'
CENTRALIZED_SUMMARY = "pooled data, nnU-Net's own training (baseline; not federated)"

#: methods the project plans but has not built; asking for one is an error, never a silent FedAvg
PLANNED: Dict[str, str] = {}


def available(centralized: bool = True) -> List[str]:
    """The methods one can ask for, sorted, with ``centralized`` last."""
    return sorted(METHODS) + ([CENTRALIZED] if centralized else [])


def summaries(centralized: bool = True) -> Dict[str, str]:
    """method -> one-line summary, in the order of :func:`available`."""
    out = {m: METHODS[m][1] for m in sorted(METHODS)}
    if centralized:
        out[CENTRALIZED] = CENTRALIZED_SUMMARY
    return out


def method_of_trainer_name(trainer_name: str):
    """The fednnunet method that trains with the trainer class ``trainer_name`` (None if none does)."""
    if trainer_name == CENTRALIZED_TRAINER:
        return CENTRALIZED
    return next((m for m, (trainer, _) in METHODS.items() if trainer == trainer_name), None)


def trainer_name_of(method: str) -> str:
    return CENTRALIZED_TRAINER if method == CENTRALIZED else METHODS[method][0]


def check_method_name(name: str, centralized: bool = True) -> str:
    """``name`` if it is a method one can run; else ValueError (unknown) or NotImplementedError (planned)."""
    if name in METHODS or (centralized and name == CENTRALIZED):
        return name
    if name in PLANNED:
        raise NotImplementedError(f'method {name!r} ({PLANNED[name]}) is not implemented yet')
    raise ValueError(f"unknown method {name!r}; available: {', '.join(available(centralized))}")
