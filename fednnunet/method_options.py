"""The command-line options of a training method, shared by ``fednnunet_train`` and ``fednnunet_server``:
the named hyper-parameter flags, ``--hp KEY=VALUE`` for any other, ``--weighting``, and the check that the
method takes them."""
import argparse

from fednnunet.cli_args import fraction, int_at_least, number_at_least
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
    parser.add_argument('--hp', nargs='+', default=[], metavar='KEY=VALUE',
                        help='any hyper-parameter of the method (see its documentation page), e.g. '
                             '--hp stage2_lr=0.001')
    parser.add_argument('--weighting', choices=['num_examples', 'uniform'], default='num_examples',
                        help='FedAvg weights: training cases per site (default) or uniform')


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
