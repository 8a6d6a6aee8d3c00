"""``--method NAME``: a method is a trainer subclass (what a site does) and a strategy (how the server merges)."""
from dataclasses import dataclass
from typing import Callable, Dict, Type

from fednnunet.strategies import FedAvg, NoAggregation, Strategy, TwoStageFedAvg
from fednnunet.trainers.base import FederatedTrainer
from fednnunet.trainers.fedavg import FedAvgTrainer
from fednnunet.trainers.fedbn import FedBNTrainer
from fednnunet.trainers.feddp import FedDPTrainer
from fednnunet.trainers.lcfed import LCFedTrainer
from fednnunet.trainers.fedper import FedPerTrainer
from fednnunet.trainers.fedprox import FedProxTrainer
from fednnunet.trainers.fedrep import FedRepTrainer
from fednnunet.trainers.local import LocalTrainer


@dataclass(frozen=True)
class Method:
    name: str
    trainer: Type[FederatedTrainer]
    strategy: Callable[..., Strategy]
    summary: str

    @property
    def has_global_model(self) -> bool:
        """A merged model that is a whole network (what fednnunet_predict without --site and nnU-Net load)."""
        return not self.trainer.has_local_parts


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method('fedavg', FedAvgTrainer, FedAvg, 'all weights averaged, weighted by training cases'),
    Method('fedprox', FedProxTrainer, FedAvg, 'FedAvg + proximal term mu/2||w - w_global||^2 (--mu)'),
    Method('fedbn', FedBNTrainer, FedAvg, 'normalization layers stay local'),
    Method('fedper', FedPerTrainer, FedAvg, 'segmentation heads stay local, joint training'),
    Method('fedrep', FedRepTrainer, FedAvg, 'heads local; head-only then body-only steps per round'),
    Method('local', LocalTrainer, NoAggregation, 'each site alone (baseline)'),
    Method('lcfed', LCFedTrainer, TwoStageFedAvg, 'LC-Fed: PCS + contrastive term, local heads; head calibration'),
    Method('feddp', FedDPTrainer, TwoStageFedAvg, 'FedDP: local attention queries; inter-site guided calibration'),
)}

#: methods the project plans but has not built; asking for one is an error, never a silent FedAvg
PLANNED = {
    'hssf': 'HSSF, semi-supervised model-heterogeneous',
    'fedmm': 'FedMM, multimodal drift correction',
}

CENTRALIZED = 'centralized'


def get_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    if name in PLANNED:
        raise NotImplementedError(f'method {name!r} ({PLANNED[name]}) is not implemented yet')
    raise ValueError(f'unknown method {name!r}; available: {sorted(METHODS) + [CENTRALIZED]}')


def method_of_trainer(trainer_name: str) -> Method:
    for m in METHODS.values():
        if m.trainer.__name__ == trainer_name:
            return m
    raise ValueError(f'no fednnunet method trains with {trainer_name!r}')
