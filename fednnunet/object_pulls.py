"""How long Flower's processes wait for a message object that is still on its way.

A Flower message travels as its metadata first and its objects (the records, fednnunet's one Array) after it. A
process that gets the metadata before the objects are all there (the ServerApp pulling a reply the SuperNode is
still pushing, a SuperNode pulling a message the server is still pushing, a ClientApp started while its SuperNode
is still receiving the message) looks again after 1 s, then 2 s, 4 s... up to 10 s (flwr 1.42,
``flwr.supercore.inflatable.inflatable_utils``: ``PULL_INITIAL_BACKOFF``, ``PULL_BACKOFF_CAP``). The objects
usually arrive within milliseconds, so that first second was most of Flower's share of some rounds (measured:
pulls of a 0.35 MB reply that took 1.0-1.2 s). fednnunet's processes look again after a short wait, doubling up
to a cap: for a local API (ClientApp -> its SuperNode, ServerApp -> its SuperLink) 0.02 s up to 0.5 s, for the
SuperNode's pulls over the network 0.05 s up to 1 s. Flower gives up on an object after 500 looks (with its own
waits about 80 minutes); with the short waits 500 looks would be over in 4-8 minutes, less than a large message
to many sites over a slow line may need, so the number of looks is not limited and Flower's limit on the time
(``PULL_MAX_TIME``, 2 hours) is the one that ends the wait. Nothing else of the pull changes (its checks of every
object's content).
"""
import functools
import inspect

#: (first wait, longest wait) in seconds for a missing object
LOCAL_BACKOFF = (0.02, 0.5)
REMOTE_BACKOFF = (0.05, 1.0)
#: Flower's own pull functions that take these waits as keyword arguments
_PULLS = ('pull_objects', 'pull_and_inflate_object_from_tree')
_KEYWORDS = ('initial_backoff', 'backoff_cap', 'max_tries_per_object')


def shorten_object_pull_waits(module, backoff=LOCAL_BACKOFF) -> bool:
    """Makes the object pulls that ``module`` (one of Flower's, in this process) makes wait ``backoff`` (first,
    longest) for a missing object. False, and nothing changed, if ``module`` pulls otherwise than this was written
    for (another Flower)."""
    names = [n for n in _PULLS if callable(getattr(module, n, None))]
    if not names:
        return False
    todo = [n for n in names if not isinstance(getattr(module, n), functools.partial)]  # (else already shortened)
    for name in todo:
        try:
            parameters = set(inspect.signature(getattr(module, name)).parameters)
        except (TypeError, ValueError):
            return False
        if not set(_KEYWORDS) <= parameters:
            return False
    for name in todo:
        setattr(module, name, functools.partial(getattr(module, name), initial_backoff=backoff[0],
                                                backoff_cap=backoff[1], max_tries_per_object=None))
    return True
