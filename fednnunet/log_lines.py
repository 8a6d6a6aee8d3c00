"""Plain one-line progress for operators who watch a log file (no carriage returns): the server's line per
round and per planning phase, and a site's line per request it answered."""
import math
import time
from typing import Dict, Iterable, Optional

from fednnunet.wire import Message


def stamped(text: str) -> str:
    return f'{time.strftime("%Y-%m-%d %H:%M:%S")} {text}'


def _number(x, digits: int = 4) -> str:
    return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.{digits}f}'


def round_line(round_index: int, rounds: int, seconds: float, pooled: float, ema: float,
               site_metrics: Dict[str, dict], missing: Iterable[str]) -> str:
    """``round 3 (of 0-19) in 25.4 s: pooled pseudo Dice 0.8333 (EMA 0.2519); A loss -0.521 Dice 0.8333 24.1 s;
    ...; missing: C``. A site's pseudo Dice is its validation of the model it received this round."""
    text = (f'round {round_index} (of 0-{rounds - 1}) in {seconds:.1f} s: pooled pseudo Dice {_number(pooled)} '
            f'(EMA {_number(ema)})')
    sites = [f"{s} loss {_number(m.get('train_loss'), 3)} Dice {_number(m.get('pseudo_dice'))} "
             f"{_number(m.get('seconds'), 1)} s" for s, m in sorted(site_metrics.items())]
    if sites:
        text += '; ' + '; '.join(sites)
    if missing:
        text += '; missing: ' + ', '.join(sorted(missing))  # why: the line before
    return text


def site_line(site: str, request: Message, reply: Optional[Message], seconds: float,
              error: Optional[str] = None) -> Optional[str]:
    """What a site did for one request, or None for the small ones (identify, the count queries)."""
    kind = request.kind
    if error is not None:
        return f"site '{site}': {kind} failed after {seconds:.1f} s: {error}"
    config = reply.config if reply is not None else {}
    if kind == 'fit':
        m = config.get('metrics') or {}
        return (f"site '{site}': round {request.config.get('round')}: {request.config.get('local_iterations')} "
                f"iterations in {seconds:.1f} s, train loss {_number(m.get('train_loss'), 3)}, val loss "
                f"{_number(m.get('val_loss'), 3)}, pseudo Dice of the received model {_number(m.get('pseudo_dice'))}")
    if kind == 'fingerprint':
        return f"site '{site}': fingerprint of its cases in {seconds:.1f} s"
    if kind == 'preprocess':
        return (f"site '{site}': preprocessed {', '.join(request.config.get('configurations') or [])} in "
                f"{seconds:.1f} s")
    if kind == 'check_training':
        return f"site '{site}': ready to train ({config.get('num_training_cases')} training cases)"
    if kind == 'finish':
        summary = config.get('validation_summary') or {}
        mean = (summary.get('foreground_mean') or {}).get('Dice') if isinstance(summary, dict) else None
        return (f"site '{site}': final model stored in {seconds:.1f} s" +
                (f', validation mean Dice {_number(mean)}' if mean is not None else ''))
    if kind == 'evaluate':
        return f"site '{site}': evaluated a model in {seconds:.1f} s"
    return None
