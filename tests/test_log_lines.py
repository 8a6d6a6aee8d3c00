"""What operators read in log files: a site's line per round, Flower's connection failures said plainly, and how
a server run ended."""
import io
import os
import threading

from fednnunet.flower_cli import _relay_output, connection_problem, status_sentence
from fednnunet.site_daemon import SiteDaemon, ask_daemon, daemon_folder
from fednnunet.wire import Message


class RoundWorker:
    def handle(self, message):
        if message.kind == 'fit':
            return Message('update', {'num_examples': 3, 'metrics': {
                'train_loss': -0.5213, 'val_loss': -0.4981, 'pseudo_dice': 0.83331, 'seconds': 2.0}})
        if message.kind == 'fail':
            raise ValueError('no such case')
        return Message('counts')

    def close(self):
        pass


def test_a_site_prints_one_line_per_round_with_its_loss_and_dice(capsys):
    with daemon_folder() as folder:
        d = SiteDaemon(os.path.join(folder, 'site.sock'), RoundWorker, site='A')
        d.listen()
        threading.Thread(target=d.serve_forever, daemon=True).start()
        try:
            ask_daemon(d.socket_path, Message('fit', {'round': 3, 'local_iterations': 250}))
            ask_daemon(d.socket_path, Message('count_leq'))  # small requests say nothing
            try:
                ask_daemon(d.socket_path, Message('fail'))
            except Exception:  # noqa: BLE001 - the error reaches the ClientApp; here only the site's log counts
                pass
        finally:
            d.stop()
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith('fednnunet_site: ')]
    assert len(lines) == 2, lines
    assert ("site 'A': round 3: 250 iterations in " in lines[0] and
            'train loss -0.521, val loss -0.498, pseudo Dice of the received model 0.8333' in lines[0]), lines[0]
    assert "site 'A': fail failed after" in lines[1] and 'ValueError: no such case' in lines[1]


class FakeSuperNode:
    def __init__(self, text: str):
        self.stdout = [line.encode() + b'\n' for line in text.splitlines()]


def test_flowers_connection_error_block_becomes_one_plain_line():
    block = ('\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n'
             '\x1b[91mERROR \x1b[0m:     Exit Code: 305\n'
             'Failed to initialize the connection to the SuperLink.\n'
             '[code: 2004] Failed to activate SuperNode.\n'
             'The SuperNode could not establish a connection to the SuperLink.\n'
             '\n'
             'For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>\n'
             '\x1b[92mINFO \x1b[0m:      SuperNode terminated gracefully.\n')
    said, out = {'at': None, 'connection_error': None}, io.BytesIO()
    _relay_output(FakeSuperNode(block), said, out)
    relayed = out.getvalue().decode()
    assert 'Exit Code' not in relayed and 'For more information' not in relayed and 'Failed to' not in relayed
    assert 'Starting Flower SuperNode' in relayed and said['at'] is not None  # the rest is copied as before
    assert said['connection_error'] == '[code: 2004] Failed to activate SuperNode.'
    assert connection_problem('10.0.0.1:9092', said['connection_error']) == (
        "server 10.0.0.1:9092 does not accept this site's key (yet): it is still starting, or the key is not among "
        "its --auth-keys")
    assert connection_problem('h:1', 'Connection refused') == 'server h:1 not reachable yet (Connection refused)'


def test_the_end_of_a_server_run_says_who_stopped_it_and_how_to_resume():
    assert status_sentence('7', 'finished:completed') == 'run 7 finished:completed'
    mine = status_sentence('7', 'finished:stopped', interrupted='SIGTERM')
    assert 'stopped by this fednnunet_server (SIGTERM)' in mine and '--continue resumes' in mine
    outside = status_sentence('7', 'finished:stopped')
    assert 'stopped from outside this command (flwr stop 7' in outside and '--continue resumes' in outside
    failed = status_sentence('7', 'finished:failed', 'RuntimeError: round 3: only 1 site(s) answered')
    assert 'stopped on an error (RuntimeError: round 3: only 1 site(s) answered)' in failed
