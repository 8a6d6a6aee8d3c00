"""Flower's processes look again for a message object that is still on its way after a short wait
(fednnunet.object_pulls), not after Flower's 1 s, 2 s, 4 s...: the ClientApp pulling from its SuperNode, the
ServerApp pulling a reply from its SuperLink, the SuperNode pulling a message from the server."""
import time
import types

import numpy as np
import pytest

pytest.importorskip('flwr', reason="Flower is not installed (pip install -e '.[flower]' or '.[test]')")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import (ObjectUnavailableError,  # noqa: E402
                                                        pull_and_inflate_object_from_tree, pull_objects)

from fednnunet import object_pulls  # noqa: E402


def _record():
    record = RecordDict({'arrays': ArrayRecord([np.arange(10.0)]), 'config': ConfigRecord({'a': 1})})
    contents = {k: v.deflate() for k, v in get_all_nested_objects(record).items()}
    return record, contents


def _pull_object_missing(contents, misses):
    """Every object is still on its way: not there for its first ``misses`` looks."""
    missing = {k: misses for k in contents}

    def pull_object(object_id):
        if missing[object_id]:
            missing[object_id] -= 1
            raise ObjectUnavailableError(object_id)
        return contents[object_id]
    return pull_object


def _timed(call):
    t = time.monotonic()
    result = call()
    return time.monotonic() - t, result


def test_a_clientapp_waits_briefly_for_a_message_its_supernode_is_still_receiving():
    record, contents = _record()
    module = types.SimpleNamespace(pull_and_inflate_object_from_tree=pull_and_inflate_object_from_tree)
    assert object_pulls.shorten_object_pull_waits(module)
    tree = get_object_tree(record)
    seconds, got = _timed(lambda: module.pull_and_inflate_object_from_tree(
        tree, _pull_object_missing(contents, 2), lambda _: None, return_type=RecordDict))
    assert seconds < 2.0 and got['config']['a'] == 1  # Flower's own: at least 3 s (1 s + 2 s)
    seconds, _ = _timed(lambda: pull_and_inflate_object_from_tree(  # Flower's own: 1 s (+-20 %) after a miss
        tree, _pull_object_missing(contents, 1), lambda _: None, return_type=RecordDict))
    assert seconds > 0.75


def test_the_server_and_the_supernode_wait_briefly_for_objects_still_on_their_way():
    _, contents = _record()
    module = types.SimpleNamespace(pull_objects=pull_objects)
    assert object_pulls.shorten_object_pull_waits(module, object_pulls.REMOTE_BACKOFF)
    assert object_pulls.shorten_object_pull_waits(module)  # once shortened, left as it is
    assert module.pull_objects.keywords == {'initial_backoff': 0.05, 'backoff_cap': 1.0, 'max_tries_per_object': None}
    seconds, got = _timed(lambda: module.pull_objects(list(contents), _pull_object_missing(contents, 2)))
    assert seconds < 2.0 and got == contents  # Flower's own: at least 3 s (1 s + 2 s)


def test_short_waits_do_not_give_up_sooner_than_flower():
    """Flower gives up on an object after 500 looks (about 80 minutes with its waits); with short waits that many
    looks would be over in minutes, so only Flower's limit on the time ends the wait."""
    _, contents = _record()
    module = types.SimpleNamespace(pull_objects=pull_objects)
    assert object_pulls.shorten_object_pull_waits(module)
    seconds, got = _timed(lambda: module.pull_objects(list(contents)[:1], _pull_object_missing(contents, 600),
                                                      backoff_cap=0.0001, initial_backoff=0.0001))
    assert got == {k: contents[k] for k in list(contents)[:1]}  # 600 looks, more than Flower's 500


def test_the_modules_it_is_written_for_are_flowers_and_another_is_left_alone(monkeypatch):
    """The ClientApp's, the ServerApp's grid's and the SuperNode's module of this Flower can be shortened (the
    modules are restored after the test); a module that pulls otherwise is left as it is."""
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp
    for module, name in ((run_clientapp, 'pull_and_inflate_object_from_tree'), (http_grid, 'pull_objects'),
                         (start_client_internal, 'pull_objects')):
        monkeypatch.setattr(module, name, getattr(module, name))
        assert object_pulls.shorten_object_pull_waits(module), module.__name__
        assert getattr(module, name).keywords['initial_backoff'] < 0.1
    assert not object_pulls.shorten_object_pull_waits(types.SimpleNamespace())
    assert not object_pulls.shorten_object_pull_waits(types.SimpleNamespace(pull_objects=lambda ids, fn: {}))
