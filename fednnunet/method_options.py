"""The command-line options of a training method, shared by ``fednnunet_train`` and ``fednnunet_server``:
the named hyper-parameter flags, ``--hp KEY=VALUE`` for any other, ``--weighting`` and the server optimizer,
and the check that the method takes them."""
import argparse
from typing import Optional

from fednnunet.cli_args import fraction, int_at_least, number_at_least, positive_number
from fednnunet.errors import FederationError

#: flag -> hyper-parameter name, type (checked while parsing), help
NAMED_FLAGS = {
    '--mu': ('mu', number_at_least(0), 'fedprox: proximal weight, >= 0 (default 0.01)'),
    '--head-fraction': ('head_fraction', fraction,
                        "fedrep/lcfed: share of each round's iterations that train only the heads, in [0, 1) "
                        "(default 0.2)"),
    '--stage2-rounds': ('stage2_rounds', int_at_least(0),
                        'lcfed/feddp: how many of the --rounds are the second (local calibration) stage (>= 0)'),
    '--alpha': ('alpha', number_at_least(0), 'lcfed: weight of the contrastive site term, >= 0 (0.1)'),
    '--igc-lambda': ('igc_lambda', number_at_least(0), 'feddp: weight of the calibration term, >= 0 (1.0)'),
}


def add_method_arguments(parser: argparse.ArgumentParser):
    for flag, (name, kind, text) in NAMED_FLAGS.items():
        parser.add_argument(flag, dest=name, type=kind, default=None, help=text)
    parser.add_argument('--hp', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                        help='any hyper-parameter of the method (see its documentation page), e.g. '
                             '--hp stage2_lr=0.001 stage2_rounds=4 (or --hp given again)')
    parser.add_argument('--weighting', choices=['num_examples', 'uniform'], default='num_examples',
                        help='FedAvg weights: training cases per site (default) or uniform')
    from fednnunet.server_optimizers import SERVER_OPTIMIZERS
    parser.add_argument('--server-optimizer', choices=SERVER_OPTIMIZERS, default='none',
                        help='how the server steps towards the sites\' mean: none (FedAvg, the default), momentum '
                             '(FedAvgM), adam (FedAdam) or yogi (FedYogi); see documentation/methods/server_optimizers.md')
    parser.add_argument('--server-lr', type=positive_number, default=None,
                        help='server learning rate, > 0 (momentum 1.0, adam/yogi 0.01)')
    parser.add_argument('--server-momentum', type=fraction, default=None,
                        help='server momentum / beta1, in [0, 1) (0.9)')
    parser.add_argument('--server-beta2', type=fraction, default=None, help='adam/yogi: beta2, in [0, 1) (0.99)')
    parser.add_argument('--server-tau', type=positive_number, default=None,
                        help='adam/yogi: adaptivity tau, > 0 (0.001)')
    parser.add_argument('--server-iterations', type=int_at_least(0), default=None,
                        help='after every merge, train the merged model this many iterations on the server\'s '
                             'labelled public set (sites.json "server"; fedavg-family methods; default 0: off); see '
                             'documentation/methods/server_training.md')


#: the strategy options the command lines set (TrainingConfig.strategy_options; the Flower run config's
#: 'server-optimizer' holds all but weighting as JSON)
SERVER_OPTIMIZER_OPTIONS = ('server_optimizer', 'server_lr', 'server_momentum', 'server_beta2', 'server_tau',
                            'server_iterations')


def strategy_options_from_args(args, method: Optional[str] = None) -> dict:
    """{'weighting', and the server optimizer's settings that were given}; ValueError for settings that do not fit
    (a --server-beta2 for momentum, a --server-lr without a server optimizer)."""
    options = {'weighting': args.weighting}
    options.update({k: getattr(args, k) for k in SERVER_OPTIMIZER_OPTIONS
                    if getattr(args, k) is not None and not (k == 'server_optimizer' and args.server_optimizer == 'none')
                    and not (k == 'server_iterations' and args.server_iterations == 0)})  # 0: off, as not given
    check_strategy_options(options, method)
    return options


def check_strategy_options(options: dict, method: Optional[str] = None):
    """Only known options, and a server optimizer they make, for ``method``'s strategy where given (ValueError
    otherwise): also for a Flower run config."""
    from fednnunet.methods import METHODS
    from fednnunet.strategies import FedAvg
    unknown = set(options) - {'weighting', *SERVER_OPTIMIZER_OPTIONS}
    if unknown:
        raise ValueError(f'unknown strategy options {sorted(unknown)}')
    for k, v in options.items():
        if k in ('weighting', 'server_optimizer'):
            if not isinstance(v, str):
                raise ValueError(f'{k} must be a name, not {v!r}')
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f'--{k.replace("_", "-")} must be a number, not {v!r}')
    # the method's strategy takes them (local merges nothing); without a method, the merge they would configure
    (METHODS[method].strategy if method in METHODS else FedAvg)(**options)


def hyperparameters_from_args(args) -> dict:
    """The hyper-parameters given on the command line (named flags and --hp); ValueError for a malformed --hp."""
    hyper = {name: getattr(args, name) for name, _, _ in NAMED_FLAGS.values() if getattr(args, name) is not None}
    for item in args.hp:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'--hp expects KEY=VALUE, got {item!r}')
        try:
            hyper[key] = float(value) if any(c in value for c in '.eE') else int(value)
        except ValueError:
            raise ValueError(f'--hp {item}: the value must be a number') from None
    return hyper


def check_hyperparameters(method: str, hyperparameters: dict):
    """Every hyper-parameter given is one the method's trainer has; else a FederationError naming it."""
    from fednnunet.methods import get_method
    trainer = get_method(method).trainer
    for k in hyperparameters:
        if k not in trainer.hyperparameters:
            raise FederationError(f'--{k.replace("_", "-")} is not a hyper-parameter of {method} (it has '
                                  f'{sorted(trainer.hyperparameters) or "none"})', field=k)
