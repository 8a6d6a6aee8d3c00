"""``--method NAME``: a method is a trainer subclass (what a site does) and a strategy (how the server merges)."""
from dataclasses import dataclass
from typing import Callable, Dict, Type

from fednnunet import method_names
from fednnunet.strategies import FedAvg, KnowledgeExchange, ModalityFedAvg, NoAggregation, Strategy, TwoStageFedAvg
from fednnunet.trainers.base import FederatedTrainer
from fednnunet.trainers.fedavg import FedAvgTrainer
from fednnunet.trainers.fedbn import FedBNTrainer
from fednnunet.trainers.feddp import FedDPTrainer
from fednnunet.trainers.fedmm import FedMMTrainer
from fednnunet.trainers.multifedavg import MultiFedAvgTrainer
from fednnunet.trainers.fedfixmatch import FedFixMatchTrainer
from fednnunet.trainers.lcfed import LCFedTrainer
from fednnunet.trainers.fedper import FedPerTrainer
from fednnunet.trainers.fedprox import FedProxTrainer
from fednnunet.trainers.fedrep import FedRepTrainer
from fednnunet.trainers.hssf import HSSFTrainer
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


_BUILT = {
    'fedavg': (FedAvgTrainer, FedAvg),
    'fedprox': (FedProxTrainer, FedAvg),
    'fedbn': (FedBNTrainer, FedAvg),
    'fedper': (FedPerTrainer, FedAvg),
    'fedrep': (FedRepTrainer, FedAvg),
    'local': (LocalTrainer, NoAggregation),
    'lcfed': (LCFedTrainer, TwoStageFedAvg),
    'feddp': (FedDPTrainer, TwoStageFedAvg),
    'fedfixmatch': (FedFixMatchTrainer, FedAvg),
    'hssf': (HSSFTrainer, KnowledgeExchange),
    'fedmm': (FedMMTrainer, ModalityFedAvg),
    'multifedavg': (MultiFedAvgTrainer, FedAvg),
}

#: every method, with its summary from fednnunet.method_names (the light list the command lines check)
METHODS: Dict[str, Method] = {name: Method(name, trainer, strategy, method_names.METHODS[name][1])
                              for name, (trainer, strategy) in _BUILT.items()}

PLANNED = method_names.PLANNED
CENTRALIZED = method_names.CENTRALIZED


def check_method_names():
    """This module and fednnunet.method_names name the same methods with the same trainer classes."""
    if set(METHODS) != set(method_names.METHODS):
        raise RuntimeError(f'fednnunet.methods has {sorted(METHODS)}, fednnunet.method_names has '
                           f'{sorted(method_names.METHODS)}')
    for name, m in METHODS.items():
        if m.trainer.__name__ != method_names.METHODS[name][0]:
            raise RuntimeError(f'{name}: fednnunet.methods trains with {m.trainer.__name__}, fednnunet.method_names '
                               f'says {method_names.METHODS[name][0]}')


check_method_names()


def get_method(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    method_names.check_method_name(name)  # a planned or unknown name: NotImplementedError / ValueError
    raise ValueError(f'method {name!r} is not federated (no trainer and strategy); it runs through '
                     f'fednnunet.centralized')


def method_of_trainer(trainer_name: str) -> Method:
    for m in METHODS.values():
        if m.trainer.__name__ == trainer_name:
            return m
    raise ValueError(f'no fednnunet method trains with {trainer_name!r}')
