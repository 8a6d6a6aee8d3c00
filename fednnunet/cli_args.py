"""What every fednnunet command line shares, and nothing heavy: argument checks that run while the arguments are
parsed (before torch or nnU-Net is imported, so that ``--help`` and a bad argument answer at once), one-line
errors, and the other spelling of every multi-word flag.

Flag spelling: where nnU-Net has the same flag, its spelling (``--no_pp``, ``-np``, ``-npp``, ``--disable_tta``,
``--save_probabilities``, ``-chk``, ``-device``, ``-gpu_memory_target``, ``-overwrite_plans_name``,
``-overwrite_target_spacing``, ``--c``); every fednnunet-only flag is kebab-case (``--local-iterations``). The
other spelling of a multi-word flag (``-`` for ``_`` or ``_`` for ``-``) is accepted too and not shown in the help
(:meth:`FedArgumentParser.add_spelling_aliases`).
"""
import argparse
import shutil
import sys
import textwrap
from typing import Optional

from fednnunet import method_names

ERROR_PREFIX = 'fednnunet: error: '


def fail(text, code: int = 2):
    """The one-line error of every fednnunet command: ``fednnunet: error: ...`` on stderr, exit status 2."""
    print(f'{ERROR_PREFIX}{text}', file=sys.stderr, flush=True)
    sys.exit(code)


def other_spelling(option: str):
    """``--local-iterations`` <-> ``--local_iterations``, ``-gpu_memory_target`` <-> ``-gpu-memory-target``; None
    for a one-word flag."""
    prefix = '--' if option.startswith('--') else '-'
    body = option[len(prefix):]
    if '-' in body:
        return prefix + body.replace('-', '_')
    if '_' in body:
        return prefix + body.replace('_', '-')
    return None


class FedArgumentParser(argparse.ArgumentParser):
    """argparse with fednnunet's conventions: errors are one line (``fednnunet: error: PROG: ...``, exit 2) and
    every multi-word flag is accepted in its other spelling too (hidden from the help)."""

    def __init__(self, *args, description=None, **kwargs):
        kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
        if description:  # the raw formatter keeps the epilog's lines; the description is wrapped here, as argparse
            width = max(shutil.get_terminal_size().columns - 2, 40)  # wraps the rest of the help
            description = textwrap.fill(' '.join(description.split()), width)
        super().__init__(*args, description=description, **kwargs)

    def error(self, message):
        fail(f'{self.prog}: {message} (see {self.prog} --help)')

    def add_spelling_aliases(self):
        """Registers the other spelling of every multi-word long flag as a hidden alias of the same argument."""
        for action in self._actions:
            for option in action.option_strings:
                alias = other_spelling(option) if len(option) > 2 else None
                if alias and alias not in self._option_string_actions:
                    self._option_string_actions[alias] = action

    def parse_known_args(self, args=None, namespace=None):
        self.add_spelling_aliases()
        return super().parse_known_args(args, namespace)

    def _get_option_tuples(self, option_string):
        # an abbreviation that matches a flag and its hidden other spelling is not ambiguous
        seen, tuples = set(), []
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in seen:
                seen.add(id(t[0]))
                tuples.append(t)
        return tuples


# ------------------------------------------------------------------------------------------------ value checks

def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is needed, got "
                                         f"{text!r}") from None


def int_at_least(low: int):
    def check(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f'must be an integer >= {low}, got {text}')
        return value
    check.__name__ = f'integer >= {low}'
    return check


def number_at_least(low: float):
    def check(text: str) -> float:
        value = _number(float, text)
        if not value >= low:  # NaN too
            raise argparse.ArgumentTypeError(f'must be a number >= {low:g}, got {text}')
        return value
    check.__name__ = f'number >= {low:g}'
    return check


def positive_number(text: str) -> float:
    value = _number(float, text)
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'must be a number > 0, got {text}')
    return value


def fraction(text: str) -> float:
    """A share in [0, 1)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f'must be a number in [0, 1), got {text}')
    return value


def heartbeat_interval(text: str) -> float:
    """fednnunet_site --heartbeat-interval: seconds between the SuperNode's heartbeats, within what Flower's
    SuperLink accepts."""
    from fednnunet.supernode_runner import MAX_HEARTBEAT, MIN_HEARTBEAT
    value = _number(float, text)
    if not MIN_HEARTBEAT <= value <= MAX_HEARTBEAT:
        raise argparse.ArgumentTypeError(f'must be between {MIN_HEARTBEAT} and {MAX_HEARTBEAT} seconds, got {text}')
    return value


def pull_interval(text: str) -> float:
    """fednnunet_site --pull-interval: seconds between a waiting SuperNode's pulls (fednnunet.supernode_runner)."""
    from fednnunet.supernode_runner import FLOWER_IDLE_WAIT, MIN_PULL_INTERVAL
    value = _number(float, text)
    if not MIN_PULL_INTERVAL <= value <= FLOWER_IDLE_WAIT:
        raise argparse.ArgumentTypeError(f'must be between {MIN_PULL_INTERVAL} and {FLOWER_IDLE_WAIT} seconds, '
                                         f'got {text}')
    return value


def port(text: str) -> int:
    value = _number(int, text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f'a port is 1-65535, got {text}')
    return value


def address(text: str) -> str:
    """HOST:PORT (an IPv6 host in brackets: [::1]:9092)."""
    host, sep, p = text.rpartition(':')
    if not sep or not host or not p.isdigit() or not 1 <= int(p) <= 65535:
        raise argparse.ArgumentTypeError(f'HOST:PORT with a port 1-65535 is needed, got {text!r}')
    return text


FOLDS = ('0', '1', '2', '3', '4', 'all')


def fold(text: str) -> str:
    """nnU-Net's fold: 0-4 (the five folds of the sites' splits_final.json) or all."""
    text = str(text).strip()
    if text not in FOLDS:
        raise argparse.ArgumentTypeError(f'a fold is 0, 1, 2, 3, 4 or all, got {text!r}')
    return text


def method(centralized: bool = True):
    """``--method``: a built method (planned ones say 'not implemented yet'); over Flower, no centralized."""
    def check(text: str) -> str:
        if text == method_names.CENTRALIZED and not centralized:
            raise argparse.ArgumentTypeError(
                "centralized pools every site's data on one machine; it does not run over Flower (use "
                "fednnunet_train on the pooled data)")
        try:
            return method_names.check_method_name(text, centralized)
        except (ValueError, NotImplementedError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    check.__name__ = 'method'
    return check


def methods_epilog(centralized: bool = True) -> str:
    lines = ['methods (--method):']
    lines += [f'  {m:<12} {s}' for m, s in method_names.summaries(centralized).items()]
    if method_names.PLANNED:
        lines += [f"  planned, not implemented yet: {', '.join(sorted(method_names.PLANNED))}"]
    return '\n'.join(lines)


#: nnU-Net's schedule: 1000 epochs x 250 iterations, 50 validation iterations; one round = one epoch
NNUNET_SCHEDULE = {'rounds': 1000, 'local_iterations': 250, 'val_iterations': 50}


def add_schedule_arguments(parser, rounds: int = NNUNET_SCHEDULE['rounds'],
                           local_iterations: int = NNUNET_SCHEDULE['local_iterations'],
                           val_iterations: int = NNUNET_SCHEDULE['val_iterations'], seed: Optional[int] = 12345):
    """--rounds, --local-iterations, --val-iterations (and --seed of the run): train, server and demo."""
    parser.add_argument('--rounds', type=int_at_least(1), default=rounds,
                        help=f"federated rounds (nnU-Net's epochs; default {rounds})")
    parser.add_argument('--local-iterations', type=int_at_least(1), default=local_iterations,
                        help=f"nnU-Net iterations per site and round (nnU-Net's epoch; default {local_iterations})")
    parser.add_argument('--val-iterations', type=int_at_least(1), default=val_iterations,
                        help=f'nnU-Net validation iterations per site and round (default {val_iterations})')
    if seed is not None:
        parser.add_argument('--seed', type=int_at_least(0), default=seed,
                            help=f'seed of the run (>= 0; default {seed})')


def add_run_start_arguments(parser, continue_help: str):
    """--continue (nnU-Net's --c too) or --overwrite: how a run starts in a results folder with an earlier run."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--continue', '--c', dest='continue_training', action='store_true', help=continue_help)
    group.add_argument('--overwrite', action='store_true',
                       help='start a new run in a results folder that holds an earlier run (its round state is '
                            'deleted)')


# ------------------------------------------------------------------------------------------------ devices

DEVICE_HELP = ("cuda, cpu or mps, as nnU-Net's -device (default: cuda if this machine has CUDA, else the CPU with "
               "a one-line notice; an explicit -device cuda without CUDA is an error)")


def add_device_argument(parser):
    from fednnunet.devices import DEVICES
    parser.add_argument('-device', default=None, choices=DEVICES, help=DEVICE_HELP)


def device_name(value) -> str:
    """The device string for resolve_device and the sites: the flag's value, or 'auto' when it was not given."""
    from fednnunet.devices import AUTO
    return value or AUTO


def check_device(value):
    """An explicit ``-device`` must exist on this machine: else the one-line error (exit 2) before anything runs.
    Imports torch (not nnU-Net)."""
    from fednnunet.devices import unavailable
    problem = unavailable(value)
    if problem:
        fail(problem)
