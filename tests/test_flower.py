"""fednnunet over Flower.

Fast tests (no processes): the type conversion fednnunet Message <-> Flower records (exact arrays, no pickle) and
the FlowerEngine's logic over an in-process grid that carries every message through Flower's own object encoding.

Slow tests (real processes on 127.0.0.1: a SuperLink, SuperNodes, flwr run; free ports, a temporary FLWR_HOME):
every phase over Flower with TLS + SuperNode authentication gives the simulation's weights; a SuperNode killed in a
round is survived, named, and its site rejoins.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import fednnunet
import pytest

flwr = pytest.importorskip('flwr', reason="Flower is not installed (pip install -e '.[flower]' or '.[test]')")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message as FlowerMessage, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402

from fednnunet.engines.flower import (FlowerEngine, error_record, from_record_dict, handle_site_message,  # noqa: E402
                                      message_type, to_record_dict)
from fednnunet.errors import FederationError  # noqa: E402
from fednnunet.federation import Federation, server_folder  # noqa: E402
from fednnunet.site_worker import MESSAGE_KINDS, SiteWorker, software_versions  # noqa: E402
from fednnunet.wire import Message, WireError, encode, encoded_size  # noqa: E402

from conftest import DATASET_ID, DATASET_NAME, point_nnunet_folder  # noqa: E402
from test_site_channels import two_channel_raw  # noqa: E402,F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = 'nnUNetCPUPlans'
FAST = ['--rounds', '2', '--local-iterations', '3', '--val-iterations', '2']


# ============================================================================ type conversion (no processes)

def _transported(content: RecordDict) -> RecordDict:
    """What the other side gets: the records through Flower's object encoding (deflate -> bytes -> inflate)."""
    record = RecordDict(dict(content))
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    return inflate_object_from_contents(record.object_id, contents)


ALL_DTYPES = ['float16', 'float32', 'float64', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32',
              'uint64', 'bool', '>f4', '>i8']


def test_message_roundtrip_through_flower_records_is_exact():
    rng = np.random.RandomState(0)
    arrays = {f'a_{np.dtype(d).str}': (rng.randn(3, 4, 2) * 100).astype(d) for d in ALL_DTYPES}
    arrays.update({'scalar': np.array(3.5, dtype=np.float32), 'empty': np.zeros((0, 3), np.int16),
                   'transposed': np.arange(12, dtype=np.float64).reshape(3, 4).T,
                   'encoder.stages.0.0.convs.0.conv.weight': rng.randn(8, 1, 3, 3, 3).astype(np.float32),
                   'same_a': np.zeros(5, np.float32), 'same_b': np.zeros(5, np.float32)})
    config = {'round': 3, 'keys': ['a', 'b'], 'nested': {'x': 1.5, 'y': None, 'nan': float('nan')}, 'text': 'é ✓'}
    message = Message('fit', config, arrays)
    back = from_record_dict(_transported(to_record_dict(message)))
    assert back.kind == 'fit'
    assert json.dumps(back.config, allow_nan=True) == json.dumps(config, allow_nan=True)
    assert list(back.arrays) == list(arrays)
    for name, a in arrays.items():
        b = back.arrays[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert b.tobytes() == np.asarray(a, order='C').tobytes(), name
    assert encoded_size(message) == len(encode(message))


def test_configs_and_arrays_that_are_not_plain_data_are_refused():
    with pytest.raises(WireError, match='not plain JSON'):
        to_record_dict(Message('x', {'obj': object()}))
    with pytest.raises(WireError, match='only numeric arrays'):
        to_record_dict(Message('x', arrays={'o': np.array([object()], dtype=object)}))
    with pytest.raises(WireError, match='only numeric arrays'):
        to_record_dict(Message('x', arrays={'s': np.array(['text'])}))


def test_arriving_records_are_checked_and_never_unpickled():
    from flwr.app import Array
    import io
    import struct
    good = to_record_dict(Message('x', arrays={'a': np.arange(4, dtype=np.float32)}))
    assert list(good['arrays']) == ['wire']  # every array of a message travels in one Flower Array

    def with_arrays(arrays):
        return RecordDict({'fednnunet': good['fednnunet'], 'arrays': ArrayRecord(arrays)})

    def blob(data: bytes):
        return Array(np.frombuffer(data, dtype=np.uint8))
    # a pickled object array, forged into a Flower Array: np.load(allow_pickle=False) refuses it
    buffer = io.BytesIO()
    np.save(buffer, np.array([{'evil': 1}], dtype=object), allow_pickle=True)
    forged = Array(dtype='object', shape=(1,), stype='numpy.ndarray', data=buffer.getvalue())
    for arrays, says in (({'wire': forged}, 'expected numpy uint8'), ({'a': forged}, 'unexpected arrays'),
                         ({'wire': good['arrays']['wire'], 'extra': good['arrays']['wire']}, 'unexpected arrays')):
        with pytest.raises(WireError, match=says):
            from_record_dict(_transported(with_arrays(arrays)))
    # an Array header that lies about its data
    lying = Array(dtype='uint8', shape=(3,), stype='numpy.ndarray', data=good['arrays']['wire'].data)
    with pytest.raises(WireError, match='does not match'):
        from_record_dict(with_arrays({'wire': lying}))
    # inside the one Array: an object dtype, a size that does not match the shape, not fednnunet's encoding
    inner = encode(Message('arrays', {}, {'a': np.arange(4, dtype=np.float32)}))
    head_len = struct.unpack('<Q', inner[16:24])[0]
    header = inner[24:24 + head_len]
    for changed, says in ((header.replace(b'"<f4"', b'"|O8"'), 'refused'),
                          (header.replace(b'[4]', b'[5]'), 'does not match its shape')):
        forged_inner = inner[:16] + struct.pack('<Q', len(changed)) + changed + inner[24 + head_len:]
        with pytest.raises(WireError, match=says):
            from_record_dict(with_arrays({'wire': blob(forged_inner)}))
    with pytest.raises(WireError, match='bad magic'):
        from_record_dict(with_arrays({'wire': blob(b'not a fednnunet message')}))
    with pytest.raises(WireError, match='not arrays'):
        from_record_dict(with_arrays({'wire': blob(encode(Message('fit', {'round': 1})))}))
    # not a fednnunet message / another format version
    with pytest.raises(WireError, match='not a fednnunet message'):
        from_record_dict(RecordDict({'config': ConfigRecord({'lr': 0.1})}))
    other = RecordDict({'fednnunet': ConfigRecord({'format': 'fednnunet-flower-0', 'kind': 'x', 'config': '{}'})})
    with pytest.raises(WireError, match='same fednnunet version'):
        from_record_dict(other)


def test_every_site_message_kind_has_a_clientapp_handler(demo_raw):
    from fednnunet.flower_app import client_app
    worker = SiteWorker(Federation.from_raw(DATASET_ID).sites['A'], DATASET_NAME, device='cpu')
    assert set(worker.handlers) == set(MESSAGE_KINDS)
    assert set(client_app._registered_funcs) == {message_type(k) for k in MESSAGE_KINDS}
    assert message_type('fit') == 'train.fit' and message_type('finish') == 'evaluate.finish'
    assert message_type('count_leq') == 'query.count_leq'
    identity = worker.handle(Message('identify')).config
    assert identity['site'] == 'A' and identity['dataset_name'] == DATASET_NAME
    assert identity['flwr_version'] == flwr.__version__ and identity['fednnunet_version'] == fednnunet.__version__


def test_the_app_declares_no_dependency_and_every_run_config_key(tmp_path):
    import tomllib
    from fednnunet.flower_app import RUN_CONFIG_DEFAULTS, run_config_toml, write_app
    from fednnunet.flower_cli import run_config_from_args, server_parser
    project = tomllib.loads((__import__('pathlib').Path(write_app(str(tmp_path))) / 'pyproject.toml').read_text())
    assert project['project']['dependencies'] == []
    assert project['tool']['flwr']['app']['components'] == {'serverapp': 'fednnunet.flower_app:server_app',
                                                            'clientapp': 'fednnunet.flower_app:client_app'}
    assert project['tool']['flwr']['app']['config'] == RUN_CONFIG_DEFAULTS
    args = server_parser().parse_args(['-d', '501', '--method', 'fedprox', '--mu', '0.1', '--rounds', '7',
                                       '--min-sites', '2', '--round-timeout', '7200', '--sites', 'A', 'B',
                                       '--insecure'])
    config = tomllib.loads(run_config_toml(run_config_from_args(args)))
    assert config['rounds'] == 7 and config['min-sites'] == 2 and config['round-timeout'] == 7200.0
    assert config['sites'] == 'A B' and json.loads(config['hyperparameters']) == {'mu': 0.1}
    assert {k: type(v) for k, v in config.items()} == {k: type(RUN_CONFIG_DEFAULTS[k]) for k in config}


def test_no_connection_without_tls_or_an_explicit_insecure(capsys):
    from fednnunet.flower_cli import server_entry, site_entry
    with pytest.raises(SystemExit):
        server_entry(['-d', '501'])
    assert '--tls-dir' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        site_entry(['--site', 'A', '-d', '501', '--server', '127.0.0.1:1'])
    assert '--insecure' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # checked before a SuperLink starts
        server_entry(['-d', '501', '--insecure', '--method', 'fedavg', '--hp', 'mu=0.1'])
    assert '--mu is not a hyper-parameter of fedavg' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        server_entry(['-d', '501', '--insecure', '--method', 'centralized'])
    assert 'does not run over Flower' in capsys.readouterr().err


# ============================================================================ the engine over an in-process grid

@pytest.fixture
def task_identity():
    """Flower messages record the run and node they come from; outside a Flower process we say it."""
    from flwr.supercore.task_identity import TaskIdentity
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


class InProcessGrid:
    """A Flower grid whose nodes answer in this process. Every message and reply crosses Flower's object
    encoding. nodes: {node id: handler(RecordDict) -> RecordDict | 'silent' | 'gone' | ('late', RecordDict)}; a
    late reply arrives when deliver_late() is called."""

    def __init__(self, nodes):
        self.nodes = dict(nodes)
        self.replies = {}
        self.late = {}
        self.sent = []

    def deliver_late(self):
        self.replies.update(self.late)
        self.late = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__['_message_id'] = message.object_id
            contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
            arrived = inflate_object_from_contents(message.object_id, contents)
            arrived.metadata.__dict__['_message_id'] = message.object_id
            self.sent.append(message)
            handler = self.nodes.get(message.metadata.dst_node_id)
            answer = 'gone' if handler is None else handler(arrived.content)
            if answer == 'gone':
                reply = FlowerMessage(Error(code=5, reason='node is offline'), reply_to=arrived)
            elif answer == 'silent':
                reply = None
            elif isinstance(answer, tuple) and answer[0] == 'late':
                self.late[message.object_id] = FlowerMessage(_transported(answer[1]), reply_to=arrived)
                reply = None
            else:
                reply = FlowerMessage(_transported(answer), reply_to=arrived)
            if reply is not None:
                self.replies[message.object_id] = reply
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def site_node(worker_factory, site='', versions=None, fail_on=None):
    """A node handler that runs a SiteWorker as the ClientApp does."""
    def handle(content):
        request = from_record_dict(content)
        if fail_on and request.kind == fail_on:
            return error_record(FederationError('label file holds values [3.0] that dataset.json does not '
                                                'declare', site=site, case=f'{site}_000', field='labels'), site)
        reply = handle_site_message(worker_factory, content, site)
        if versions and request.kind == 'identify':
            identity = from_record_dict(reply)
            identity.config.update(versions)
            return to_record_dict(identity)
        return reply
    return handle


def _workers(federation):
    return {name: (lambda s=site: SiteWorker(s, federation.dataset_name, 1, device='cpu'))
            for name, site in federation.sites.items()}


def test_planning_over_flower_records_equals_simulation(demo_raw, fresh_preprocessed, task_identity):
    """Every planning message (describe, fingerprint, count_leq, release, preprocess) through the Flower engine and
    Flower's encoding gives the simulation's fingerprint and plans; replies come in the order asked."""
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    federation = Federation.from_raw(DATASET_ID)
    plan_and_preprocess(SimulationEngine.for_federation(federation), DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU',
                        preprocess=False)
    with open(os.path.join(server_folder(DATASET_NAME), PLANS + '.json')) as f:
        simulated = json.load(f)
    with open(os.path.join(server_folder(DATASET_NAME), 'dataset_fingerprint.json')) as f:
        simulated_fp = json.load(f)

    workers = _workers(federation)
    grid = InProcessGrid({30 + i: site_node(workers[s], s) for i, s in enumerate(['C', 'A', 'B'])})
    engine = FlowerEngine(grid, sites=['A', 'B', 'C'], dataset=DATASET_ID, log=lambda t: None)
    assert engine.connect() == ['A', 'B', 'C'] and engine.dataset_name == DATASET_NAME
    assert engine.site_node == {'C': 30, 'A': 31, 'B': 32}
    assert engine.identities['A']['flwr_version'] == software_versions()['flwr_version']
    summary = plan_and_preprocess(engine, DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU', preprocess=False)
    with open(os.path.join(server_folder(DATASET_NAME), PLANS + '.json')) as f:
        assert json.load(f) == simulated
    with open(os.path.join(server_folder(DATASET_NAME), 'dataset_fingerprint.json')) as f:
        assert json.load(f) == simulated_fp
    assert sorted(summary['sites']) == ['A', 'B', 'C']
    assert [m['kind'] for m in engine.message_log][:2] == ['describe', 'fingerprint']
    assert all(engine.bytes_sent[s] > 0 and engine.bytes_received[s] > 0 for s in 'ABC')
    replies = engine.ask({s: Message('identify') for s in ['B', 'C', 'A']})
    assert list(replies) == ['B', 'C', 'A'] and [r.config['site'] for r in replies.values()] == ['B', 'C', 'A']
    # arrays sent to several sites are encoded once, as one Flower object (same id: uploaded once)
    state = {'w': np.ones((4, 4), np.float32)}
    grid.sent.clear()
    engine.ask({s: Message('identify', {'round': i}, state) for i, s in enumerate('AB')})
    a, b = (m.content['arrays']['wire'] for m in grid.sent)
    assert a.data is b.data and a.object_id == b.object_id
    assert grid.sent[0].content['fednnunet'].object_id != grid.sent[1].content['fednnunet'].object_id


def test_a_site_with_other_versions_is_a_clear_error(demo_raw, task_identity):
    federation = Federation.from_raw(DATASET_ID)
    workers = _workers(federation)
    grid = InProcessGrid({1: site_node(workers['A'], 'A'),
                          2: site_node(workers['B'], 'B', versions={'flwr_version': '1.0.0'})})
    engine = FlowerEngine(grid, sites=['A', 'B'], log=lambda t: None)
    with pytest.raises(FederationError) as e:
        engine.connect()
    mine = software_versions()['flwr_version']
    assert "site 'B'" in str(e.value) and 'flwr 1.0.0' in str(e.value) and f'flwr {mine}' in str(e.value)


def test_a_node_with_a_name_no_site_may_have_is_refused_and_the_others_go_on(demo_raw, task_identity):
    """'server' (the server's public set) or a path as a site name: the node is refused, named in the log; the
    federation starts with the others."""
    federation = Federation.from_raw(DATASET_ID)
    workers = _workers(federation)
    grid = InProcessGrid({1: site_node(workers['A'], 'A'), 2: site_node(workers['B'], 'B', versions={'site': 'server'}),
                          3: site_node(workers['C'], 'C', versions={'site': '../C'})})
    logged = []
    engine = FlowerEngine(grid, log=logged.append)
    assert engine.connect() == ['A']
    assert sorted(engine.refused) == [2, 3] and "'server' is the name of the server's public set" in engine.refused[2]
    assert any('SECURITY' in line and 'SuperNode 3' in line for line in logged)


def test_site_errors_timeouts_and_lost_nodes_are_missing_with_the_reason(demo_raw, task_identity):
    from fednnunet.plan_and_preprocess import ask_every_site
    federation = Federation.from_raw(DATASET_ID)
    workers = _workers(federation)
    behaviour = {'C': None}

    def node_c(content):
        if behaviour['C']:
            return behaviour['C']
        return site_node(workers['C'], 'C')(content)

    grid = InProcessGrid({1: site_node(workers['A'], 'A'), 2: site_node(workers['B'], 'B', fail_on='describe'),
                          3: node_c})
    logged = []
    engine = FlowerEngine(grid, sites=['A', 'B', 'C'], min_sites=2, round_timeout=0.5, log=logged.append)
    engine.connect()
    # planning needs every site: the site's own error text reaches the user
    with pytest.raises(RuntimeError) as e:
        ask_every_site(engine, Message('describe'))
    assert "'B' (FederationError: site 'B', case 'B_000', field 'labels': label file holds values" in str(e.value)

    behaviour['C'] = 'silent'
    replies = engine.ask({s: Message('identify') for s in 'ABC'})
    assert list(replies) == ['A', 'B'] and engine.missing == {'C': 'no reply within 0 s (--round-timeout)'}
    assert any("site 'C' (no reply" in line for line in logged)

    behaviour['C'] = 'gone'
    engine.ask({s: Message('identify') for s in 'ABC'})
    assert engine.missing['C'].startswith('SuperNode gone') and 'C' not in engine.site_node

    # C's node misses its heartbeats (offline for Flower), then heartbeats again: Flower keeps its node id, and
    # C is back in the next request without being asked who it is again
    del grid.nodes[3]
    engine.ask({s: Message('identify') for s in 'ABC'})
    assert engine.missing == {'C': 'not connected'}
    behaviour['C'] = None
    grid.nodes[3] = node_c
    replies = engine.ask({s: Message('identify') for s in 'ABC'})
    assert list(replies) == ['A', 'B', 'C'] and engine.site_node['C'] == 3 and not engine.missing
    assert any("site 'C' is back (SuperNode 3)" in line for line in logged)

    # C's SuperNode restarts: a new node id, identified on the next request; the old one is gone
    del grid.nodes[3]
    grid.nodes[9] = node_c
    replies = engine.ask({s: Message('identify') for s in 'ABC'})
    assert list(replies) == ['A', 'B', 'C'] and engine.site_node['C'] == 9 and not engine.missing
    assert any("site 'C' connected (SuperNode 9" in line for line in logged)


def test_a_node_claiming_a_site_whose_key_it_does_not_hold_is_refused(demo_raw, task_identity):
    """A site's name is bound to its --auth-keys key: registered site B (its own key) claiming to be A is refused,
    as is an unknown key claiming A; the real A keeps its place, with no "newer wins" replacement."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from flwr.proto.node_pb2 import NodeInfo
    from fednnunet.engines.flower import public_key_digest
    federation = Federation.from_raw(DATASET_ID)
    workers = _workers(federation)
    keys = {name: ec.generate_private_key(ec.SECP384R1()).public_key() for name in ('A', 'B', 'mallory')}
    pem = {n: k.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo) for n, k in keys.items()}
    ssh = {n: k.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) for n, k in keys.items()}
    assert public_key_digest(pem['A']) == public_key_digest(ssh['A']) != public_key_digest(pem['B'])

    def claiming(site):  # a node that answers every request as `site`
        return site_node(workers[site], site)

    class KeyedGrid(InProcessGrid):
        def __init__(self, nodes, node_keys):
            super().__init__(nodes)
            self.node_keys = node_keys

        def get_nodes(self):
            return [NodeInfo(node_id=n, public_key=self.node_keys[n]) for n in self.nodes]

    grid = KeyedGrid({1: claiming('A'), 2: claiming('B'), 3: claiming('A'), 4: claiming('A')},
                     {1: pem['A'], 2: pem['B'], 3: pem['B'], 4: pem['mallory']})
    logged = []
    engine = FlowerEngine(grid, sites=['A', 'B'], log=logged.append,
                          site_keys={s: public_key_digest(ssh[s]) for s in 'AB'})
    engine.connect()
    assert engine.site_node == {'A': 1, 'B': 2}
    assert "holds the key of site 'B'" in engine.refused[3] and 'belongs to no site' in engine.refused[4]
    assert not any('is now SuperNode' in line or 'both say they are' in line for line in logged)
    assert set(engine.ask({s: Message('identify') for s in 'AB'})) == {'A', 'B'}
    # without SuperNode authentication (no keys) a node's word is all there is: documented, and said in the log
    open_engine = FlowerEngine(KeyedGrid({1: claiming('A'), 2: claiming('B')}, {1: b'', 2: b''}), sites=['A', 'B'],
                               log=lambda text: None)
    open_engine.connect()
    assert open_engine.site_node == {'A': 1, 'B': 2}


def test_a_straggler_is_dropped_after_the_grace_period_once_the_quorum_answered(demo_raw, task_identity):
    """--min-sites 2 and a grace of 1 s: a live site that does not answer a training round holds it for the grace
    period only (not the round timeout of 60 s) and is missing with the reason. While it still works on that
    request (Flower runs one ClientApp per site at a time) it is sent nothing new; once its late reply has come
    (thrown away unread) it rejoins."""
    federation = Federation.from_raw(DATASET_ID)
    workers = _workers(federation)
    behaviour = {'C': None}
    seen = []

    def node(site):
        def handle(content):
            request = from_record_dict(content)
            seen.append((site, request.kind))
            if request.kind == 'fit':  # an answer of the right kind is all the engine needs here
                update = to_record_dict(Message('update', {'round': request.config['round']}))
                if site == 'C' and behaviour['C'] == 'late':
                    return 'late', update
            if site == 'C' and behaviour['C'] and request.kind in ('fit', 'describe'):
                return behaviour['C']
            if request.kind == 'fit':
                return update
            return site_node(workers[site], site)(content)
        return handle

    grid = InProcessGrid({1: node('A'), 2: node('B'), 3: node('C')})
    engine = FlowerEngine(grid, sites=['A', 'B', 'C'], min_sites=2, round_timeout=60.0, straggler_grace=1.0,
                          log=lambda text: None)
    engine.connect()
    behaviour['C'] = 'late'
    t0 = time.time()
    replies = engine.ask({s: Message('fit', {'round': 0}) for s in 'ABC'})
    assert time.time() - t0 < 10, 'the round waited for the straggler beyond the grace period'
    assert list(replies) == ['A', 'B'] and engine.missing['C'].startswith('straggler: no reply 1 s after')
    # round 1: C is still at its round 0; nothing is queued behind it
    fits_to_c = sum(1 for m in grid.sent if m.metadata.dst_node_id == 3)
    behaviour['C'] = None
    replies = engine.ask({s: Message('fit', {'round': 1}) for s in 'ABC'})
    assert list(replies) == ['A', 'B'] and engine.missing['C'].startswith('still busy with a request it did not')
    assert sum(1 for m in grid.sent if m.metadata.dst_node_id == 3) == fits_to_c
    # its late round-0 update comes; it is thrown away, and C answers round 2
    grid.deliver_late()
    replies = engine.ask({s: Message('fit', {'round': 2}) for s in 'ABC'})
    assert list(replies) == ['A', 'B', 'C'] and not engine.missing
    assert from_record_dict(grid.sent[-1].content).config['round'] == 2 and not grid.replies
    # planning (and every other request) still waits for every site, up to the round timeout
    behaviour['C'] = 'silent'
    quick = FlowerEngine(grid, sites=['A', 'B', 'C'], min_sites=2, round_timeout=1.5, straggler_grace=0.1,
                         log=lambda text: None)
    quick.connect()
    t0 = time.time()
    quick.ask({s: Message('describe') for s in 'ABC'})
    assert time.time() - t0 >= 1.4 and quick.missing['C'].startswith('no reply within')
    # without --min-sites no round ends early
    full = FlowerEngine(grid, sites=['A', 'B', 'C'], round_timeout=1.5, straggler_grace=0.1, log=lambda text: None)
    full.connect()
    t0 = time.time()
    full.ask({s: Message('fit', {'round': 2}) for s in 'ABC'})
    assert time.time() - t0 >= 1.4 and full.missing['C'].startswith('no reply within')


def test_without_a_site_list_the_federation_is_who_connected(demo_raw, task_identity):
    federation = Federation.from_raw(DATASET_ID)
    workers = _workers(federation)
    grid = InProcessGrid({5: site_node(workers['B'], 'B'), 6: site_node(workers['A'], 'A')})
    engine = FlowerEngine(grid, settle_seconds=0.0, dataset='Dataset999_Other', log=lambda t: None)
    with pytest.raises(FederationError, match='the server was started for Dataset999_Other'):
        engine.connect()
    engine = FlowerEngine(grid, settle_seconds=0.0, dataset=DATASET_NAME, log=lambda t: None)
    assert engine.connect() == ['A', 'B']
    grid.nodes[7] = site_node(workers['C'], 'C')  # not a member: refused, said in the log
    engine.ask_all(Message('identify'))
    assert 7 in engine.refused and 'not one of the federation' in engine.refused[7]
    engine = FlowerEngine(grid, sites=['A', 'B'], log=lambda t: None)  # an extra site is no error at the start
    assert engine.connect() == ['A', 'B'] and 7 in engine.refused


# ============================================================================ real processes (slow)

def _env(**paths):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in paths.items()})
    env.update({'nnUNet_n_proc_DA': '0', 'nnUNet_def_n_proc': '1', 'PYTHONUNBUFFERED': '1'})
    return env


class Processes:
    """Every process started here runs in its own session and is killed with its whole group at the end."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs = {}

    def start(self, name, args, env):
        log = open(os.path.join(self.log_dir, f'{name}.log'), 'ab')
        proc = subprocess.Popen([sys.executable, '-m', 'fednnunet.flower_cli'] + args, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=self.log_dir)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name):
        with open(os.path.join(self.log_dir, f'{name}.log'), errors='replace') as f:
            return f.read()

    def kill(self, name, sig=signal.SIGKILL):
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait()

    def wait_for(self, name, text, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.log(name):
                return
            time.sleep(0.5)
        raise AssertionError(f'{text!r} did not appear in {name}.log within {timeout} s:\n{self.log(name)[-3000:]}')

    def close(self):
        for name in list(self.procs):
            proc = self.procs[name]
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: SuperNode/SuperLink children included
            except ProcessLookupError:
                pass
            proc.wait()
        self.procs = {}


@pytest.fixture
def processes(tmp_path):
    p = Processes(str(tmp_path))
    yield p
    p.close()


def _free_port():
    from fednnunet.flower_cli import free_port
    return free_port()


def _weights(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=False)['network_weights']


def _fedavg_fold(results_root):
    return os.path.join(results_root, DATASET_NAME, f'FedAvgTrainer__{PLANS}__3d_fullres', 'fold_0')


@pytest.fixture(scope='module')
def two_site_simulation(demo_raw, tmp_path_factory):
    """The reference: sites A and B planned and trained (fedavg, 2 rounds x 3 iterations) by the simulation
    engine."""
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    from fednnunet.training_server import FederatedTraining, TrainingConfig
    root = tmp_path_factory.mktemp('flower_reference')
    with pytest.MonkeyPatch.context() as mp:
        for var in ('nnUNet_preprocessed', 'nnUNet_results'):
            os.makedirs(root / var)
            point_nnunet_folder(mp, var, root / var)
        federation = Federation.from_raw(DATASET_ID, only_sites=['A', 'B'])
        engine = SimulationEngine.for_federation(federation, 1, device='cpu')
        plan_and_preprocess(engine, DATASET_NAME, ['3d_fullres'], 'nnUNetPlannerCPU')
        config = TrainingConfig(DATASET_NAME, '3d_fullres', 0, 'fedavg', PLANS, rounds=2, local_iterations=3,
                                val_iterations=2, validate=False)
        FederatedTraining(engine, config).run()
    return {'weights': _weights(os.path.join(_fedavg_fold(root / 'nnUNet_results'), 'checkpoint_final.pth')),
            'plans': json.load(open(root / 'nnUNet_preprocessed' / DATASET_NAME / f'{PLANS}.json'))}


def _own_raw_folder(demo_raw, site, target):
    """A hospital's nnUNet_raw: dataset.json, its own cases only, and a sites.json that lists only itself."""
    federation = Federation.from_folder(str(demo_raw), only_sites=[site])
    own = target / DATASET_NAME
    for sub in ('imagesTr', 'labelsTr'):
        (own / sub).mkdir(parents=True)
    shutil.copy(os.path.join(demo_raw, 'dataset.json'), own / 'dataset.json')
    cases = federation.sites[site].cases
    for case in cases:
        for f in federation.sites[site].image_files(case):
            shutil.copy(f, own / 'imagesTr')
        shutil.copy(federation.sites[site].label_file(case), own / 'labelsTr')
    with open(own / 'sites.json', 'w') as f:
        json.dump({'sites': {site: {'cases': list(cases)}}}, f)


@pytest.mark.slow
def test_every_phase_over_flower_with_tls_and_auth_equals_simulation(demo_raw, two_site_simulation, tmp_path,
                                                                     processes):
    """Two hospitals, each with only its own cases on its own 'disk', and a server that holds no images: the
    fingerprint, plans, preprocessing, 2 fedavg rounds, validation and the final models all go over Flower
    (TLS + SuperNode authentication, certificates from scripts/make_test_certs.sh). The server is stopped after
    round 0 and resumed. Same weights as simulation. A SuperNode whose key the server did not register never gets
    in, even under a member's name."""
    certs = tmp_path / 'certs'
    subprocess.run(['bash', os.path.join(REPO, 'scripts', 'make_test_certs.sh'), str(certs), '--sites', 'A', 'B',
                    'intruder'], check=True, capture_output=True)
    port = _free_port()
    flwr_home = tmp_path / 'flwr_home'
    for site in 'AB':
        hospital = tmp_path / f'hospital_{site}'
        _own_raw_folder(demo_raw, site, hospital / 'nnUNet_raw')
        env = _env(nnUNet_raw=hospital / 'nnUNet_raw', nnUNet_preprocessed=hospital / 'nnUNet_preprocessed',
                   nnUNet_results=hospital / 'nnUNet_results', FLWR_HOME=hospital / 'flwr_home')
        processes.start(f'site_{site}', ['site', '--site', site, '-d', str(DATASET_ID), '--server',
                                         f'127.0.0.1:{port}', '--tls-dir', str(certs), '--auth-key',
                                         str(certs / 'keys' / site), '-device', 'cpu', '-np', '1'], env)
        if site == 'A':
            processes.start('intruder', ['site', '--site', 'A', '-d', str(DATASET_ID), '--server',
                                         f'127.0.0.1:{port}', '--tls-dir', str(certs), '--auth-key',
                                         str(certs / 'keys' / 'intruder'), '-device', 'cpu', '-np', '1'],
                            dict(env, FLWR_HOME=str(tmp_path / 'intruder_home')))
    server = tmp_path / 'server'
    server_env = _env(nnUNet_raw=server / 'nnUNet_raw', nnUNet_preprocessed=server / 'nnUNet_preprocessed',
                      nnUNet_results=server / 'nnUNet_results', FLWR_HOME=flwr_home)
    server_args = ['-d', str(DATASET_ID), '-c', '3d_fullres', '--method', 'fedavg', *FAST, '--sites', 'A', 'B',
                   '--host', '127.0.0.1', '--port', str(port), '--tls-dir', str(certs), '--auth-keys',
                   str(certs / 'keys' / 'A.pub'), str(certs / 'keys' / 'B.pub'), '--wait-for-sites', '180']
    processes.start('server', ['server', *server_args, '-pl', 'nnUNetPlannerCPU', '--work-dir', str(server / 'w1')],
                    server_env)
    # the server is stopped after round 0 (Ctrl-C / SIGTERM: the run and its SuperLink stop) and resumed with
    # --continue on a new SuperLink; the sites' SuperNodes find it by themselves
    round_log = os.path.join(_fedavg_fold(server / 'nnUNet_results'), 'federation_log.json')
    from fednnunet.flower_cli import wait_for_port
    wait_for_port('127.0.0.1', port, 120, processes.procs['server'])
    # a site (it holds the CA certificate) uses Flower's Control API on the server's port: its own app bundle, a key
    # of its own, stopping the run. The port serves the Fleet API only; the server's run goes on
    from fednnunet.flower_app import write_app
    from fednnunet.flower_cli import flower_env, write_flower_config
    attacker = flower_env(str(tmp_path / 'attacker_home'))
    write_flower_config(attacker['FLWR_HOME'], f'127.0.0.1:{port}', str(certs / 'ca.crt'))
    flwr = os.path.join(os.path.dirname(sys.executable), 'flwr')
    own_app = write_app(str(tmp_path / 'attacker_app'))
    for command in ([flwr, 'run', own_app, 'fednnunet'],
                    [flwr, 'supernode', 'register', str(certs / 'keys' / 'intruder.pub'), 'fednnunet'],
                    [flwr, 'ls', 'fednnunet']):
        done = subprocess.run(command, env=attacker, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        assert '403' in done.stdout + done.stderr or 'Forbidden' in done.stdout + done.stderr or \
            'only the Fleet API' in done.stdout + done.stderr, (command, done.stdout[-2000:], done.stderr[-2000:])
    assert processes.procs['server'].poll() is None
    assert 'refused POST /v1/control/' in open(server / 'w1' / 'fleet_proxy.log').read()
    deadline = time.time() + 600
    while not os.path.isfile(round_log) and processes.procs['server'].poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.kill(processes.procs['server'].pid, signal.SIGTERM)
    assert processes.procs['server'].wait(timeout=120) == 1, processes.log('server')[-5000:]
    assert 'stopping run' in processes.log('server')
    # who stopped it and what to do next, in plain words
    assert re.search(r'run \d+ finished:stopped: stopped by this fednnunet_server \(SIGTERM\); the last completed '
                     r'round is saved: the same command with --continue resumes', processes.log('server')), \
        processes.log('server')[-3000:]
    processes.start('server_resumed', ['server', *server_args, '-p', PLANS, '--continue', '--work-dir',
                                       str(server / 'w2')], server_env)
    assert processes.procs['server_resumed'].wait(timeout=900) == 0, processes.log('server_resumed')[-5000:]
    log = processes.log('server') + processes.log('server_resumed')
    from fednnunet.flower_cli import WORK_DIR_SAYS
    assert f"{WORK_DIR_SAYS} {server / 'w1'}" in processes.log('server')  # where its logs are, said at the start
    assert 'finished:completed' in log and "site 'A' connected" in log and "site 'B' connected" in log
    assert re.search(r'continuing at round (\d) of 0-1 \(\1 round\(s\) were completed\)', log)
    assert re.search(r'round 1 \(of 0-1\) in [0-9.]+ s: pooled pseudo Dice [0-9.]+ \(EMA [0-9.]+\); A loss ', log)
    assert 'planning: every site fingerprinted its cases' in log and 'preprocessing: done at every site' in log
    assert [r['round'] for r in json.load(open(round_log))] == [0, 1]
    # the intruder (an unregistered key claiming site A) was refused by the SuperLink, again and again, and never
    # ran a ClientApp; site A was identified once per server (no second node ever answered as A)
    intruder = processes.log('intruder')
    # ... said plainly, without Flower's exit-code block
    assert re.search(r"server 127.0.0.1:\d+ does not accept this site's key \(yet\).*; retrying in \d+ s", intruder), \
        intruder[-3000:]
    assert 'Exit Code: 305' not in intruder
    assert 'Start `flwr-clientapp`' not in intruder and 'starting a checked ClientApp' not in intruder
    # the sites ran every ClientApp through their pinned launcher (app_pinning), which accepted fednnunet's bundle
    for site in 'AB':
        assert 'starting a checked ClientApp' in processes.log(f'site_{site}')
        assert 'refused app bundle' not in processes.log(f'site_{site}')
    assert processes.log('server').count("site 'A' connected") == 1
    assert processes.log('server_resumed').count("site 'A' connected") == 1
    assert 'is now SuperNode' not in log, 'a second node answered as a site'

    # the plans were negotiated over Flower and equal the simulation's; the server has no raw data
    with open(server / 'nnUNet_preprocessed' / DATASET_NAME / f'{PLANS}.json') as f:
        assert json.load(f) == two_site_simulation['plans']
    assert not (server / 'nnUNet_raw').exists()
    # the same global weights as the simulation engine, same seed
    flower = _weights(os.path.join(_fedavg_fold(server / 'nnUNet_results'), 'checkpoint_final.pth'))
    reference = two_site_simulation['weights']
    assert set(flower) == set(reference)
    for key in reference:
        np.testing.assert_allclose(flower[key].numpy(), reference[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=key)
    # every site got its final model in nnU-Net's results layout on its own disk, and validated it
    for site in 'AB':
        site_fold = os.path.join(tmp_path / f'hospital_{site}' / 'nnUNet_results', DATASET_NAME,
                                 f'FedAvgTrainer__{PLANS}__3d_fullres', 'sites', site, 'fold_0')
        assert os.path.isfile(os.path.join(site_fold, 'checkpoint_final.pth'))
        assert os.path.isfile(os.path.join(site_fold, 'validation', 'summary.json'))
        # the site's daemon kept its trainer from round 0 to the final model, across the server's restart: one
        # build per site (a ClientApp process per message would have built one per round and one to finish), or
        # a second one when the site had already trained round 1 before the first server stopped: the resumed
        # server asks for round 1 again, and the site rebuilds its trainer from its state after round 0
        assert 'daemon ready' in processes.log(f'site_{site}')
        from fednnunet.site_training import TRAINER_BUILT
        builds = [line.split(': ', 1)[1].strip() for line in open(os.path.join(site_fold, 'training_log.txt'))
                  if TRAINER_BUILT in line]
        assert builds[0] == f'{TRAINER_BUILT} for round 0, kept for the next rounds', builds
        assert builds[1:] in ([], [f'{TRAINER_BUILT} for round 1 from its state after 1 round(s), kept for the '
                                   f'next rounds']), builds
        # no empty folder is left at the site (nnU-Net's default fold folder, the released fingerprint's)
        empty = [root for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')
                 for root, dirs, files in os.walk(tmp_path / f'hospital_{site}' / var) if not dirs and not files]
        assert empty == [], empty
        # one line per round in the site's log, with its loss and the pseudo Dice of the model it received
        assert re.search(rf"site '{site}': round 1: 3 iterations in [0-9.]+ s, train loss -?[0-9.]+, val loss "
                         rf"-?[0-9.]+, pseudo Dice of the received model [0-9.]+", processes.log(f'site_{site}'))
    summary = json.load(open(os.path.join(_fedavg_fold(server / 'nnUNet_results'), 'federated_summary.json')))
    assert set(summary['final_validation']['per_site']) == {'A', 'B'}
    messages = json.load(open(os.path.join(_fedavg_fold(server / 'nnUNet_results'), 'flower_messages.json')))
    # the resumed run's messages: the sites' readiness, round 1 and the final models (round 0 was the first server's)
    assert [m['kind'] for m in messages['messages']] == ['check_training', 'fit', 'finish']
    assert messages['identities']['A']['fednnunet_version'] == software_versions()['fednnunet_version']


@pytest.mark.slow
def test_a_supernode_killed_in_a_round_is_survived_named_and_rejoins(planned, tmp_path, processes):
    """Three sites, --min-sites 2, 3 rounds: site C's fednnunet_site (SuperNode, site daemon with its kept trainer,
    ClientApp) is killed (SIGKILL) while it trains round 1. Round 1 merges A and B and names C; C's site is started
    again (a new node id, a new daemon), and in round 2 it resumes from the state its killed trainer left on disk
    after round 0, and stores its final model. The sites' heartbeat every 10 s (--heartbeat-interval): C is
    declared gone within about 20 s of its death."""
    port = _free_port()
    results = tmp_path / 'nnUNet_results'
    results.mkdir()
    env = _env(nnUNet_results=results, FLWR_HOME=tmp_path / 'flwr_home')
    site_args = {s: ['site', '--site', s, '-d', str(DATASET_ID), '--server', f'127.0.0.1:{port}', '--insecure',
                     '-device', 'cpu', '-np', '1', '--heartbeat-interval', '10'] for s in 'ABC'}
    attack_path = tmp_path / 'attacker_python'
    attack_path.mkdir()
    (attack_path / 'sitecustomize.py').write_text(ATTACKING_SITE)
    mark = tmp_path / 'c_is_in_round_1'
    for s in 'ABC':
        # C's first site is busy with round 1 until it is killed (whatever the machine's speed)
        extra = dict(PYTHONPATH=str(attack_path), FEDNNUNET_TEST_ATTACK='hang',
                     FEDNNUNET_TEST_MARK=str(mark)) if s == 'C' else {}
        processes.start(f'site_{s}', site_args[s], dict(env, FLWR_HOME=str(tmp_path / f'home_{s}'), **extra))
    processes.start('server', ['server', '-d', str(DATASET_ID), '--phase', 'train', '-p', PLANS, '-c', '3d_fullres',
                               '--method', 'fedavg', '--rounds', '3', '--local-iterations', '3', '--val-iterations',
                               '2', '--no-val', '--sites', 'A', 'B', 'C', '--min-sites', '2',
                               '--insecure', '--host', '127.0.0.1', '--port', str(port), '--wait-for-sites', '180',
                               '--work-dir', str(tmp_path / 'server_work')], env)
    deadline = time.time() + 300
    while not mark.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert mark.exists(), processes.log('site_C')[-3000:]
    processes.kill('site_C')  # in round 1, before it answered
    processes.start('site_C_again', site_args['C'], dict(env, FLWR_HOME=str(tmp_path / 'home_C2')))
    assert processes.procs['server'].wait(timeout=900) == 0, processes.log('server')[-5000:]

    fold = _fedavg_fold(results)
    rounds = json.load(open(os.path.join(fold, 'federation_log.json')))
    assert set(rounds[0]['sites']) == {'A', 'B', 'C'}
    assert set(rounds[1]['sites']) == {'A', 'B'} and set(rounds[1]['missing_sites']) == {'C'}
    assert 'SuperNode' in rounds[1]['missing_sites']['C']
    # the killed site's new process resumed from the state its kept trainer had written after round 0
    assert set(rounds[2]['sites']) == {'A', 'B', 'C'} and rounds[2]['sites']['C']['state_from_round'] == 1
    training_log = open(os.path.join(fold, 'training_log.txt')).read()
    assert "round 1: no update from site 'C'" in training_log
    assert "no update from site 'C'" in processes.log('server')
    assert os.path.isfile(os.path.join(fold, 'checkpoint_final.pth'))
    for s in 'ABC':
        assert os.path.isfile(os.path.join(os.path.dirname(fold), 'sites', s, 'fold_0', 'checkpoint_final.pth'))


def test_off_the_loopback_supernode_authentication_is_required_unless_turned_off_loudly(capsys):
    from fednnunet.flower_cli import CliError, _check_security, server_parser, site_parser
    server = server_parser().parse_args(['-d', '501', '--tls-dir', 'certs'])
    with pytest.raises(CliError, match='0.0.0.0 is not the loopback: SuperNode authentication is required'):
        _check_security(server, server.host, authenticated=False)
    _check_security(server, server.host, authenticated=True)
    _check_security(server, '127.0.0.1', authenticated=False)  # tests on one machine
    loud = server_parser().parse_args(['-d', '501', '--insecure', '--no-supernode-auth'])
    _check_security(loud, loud.host, authenticated=False)
    err = capsys.readouterr().err
    assert 'WARNING: INSECURE' in err and 'WARNING: NO SUPERNODE AUTHENTICATION' in err
    site = site_parser().parse_args(['--site', 'A', '-d', '501', '--server', '10.1.2.3:9092', '--tls-dir', 'c'])
    with pytest.raises(CliError, match='10.1.2.3 is not the loopback'):
        _check_security(site, '10.1.2.3', authenticated=False)
    with pytest.raises(CliError, match='exclude each other'):
        _check_security(loud, loud.host, authenticated=True)


def test_the_public_port_serves_the_fleet_api_only():
    """fednnunet_server's public port (fednnunet.fleet_proxy) forwards SuperNode requests (with their signed
    node-authentication headers) to the loopback SuperLink and refuses Flower's Control and Runtime APIs: a site that
    holds the CA certificate cannot start its own app bundle, register keys or stop the run from there."""
    import asyncio
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    from fednnunet.fleet_proxy import create_app
    seen = []

    async def superlink(request):
        seen.append((request.method, request.url.path, request.headers.get('x-flwr-signature'), await request.body()))
        return Response(b'reply:' + await request.body(), headers={'x-upstream': 'yes'})

    upstream = Starlette(routes=[Route('/{path:path}', superlink, methods=['GET', 'POST'])])
    proxy = create_app('http://superlink', client=httpx.AsyncClient(transport=httpx.ASGITransport(upstream),
                                                                     base_url='http://superlink'),
                       log=lambda text: None)

    async def call(method, path, body=b''):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(proxy), base_url='http://server') as c:
            return await c.request(method, path, content=body, headers={'x-flwr-signature': 'sig'})

    async def scenario():
        ok = await call('POST', '/v1/fleet/pull-messages', b'\x00\x01')
        assert ok.status_code == 200 and ok.content == b'reply:\x00\x01' and ok.headers['x-upstream'] == 'yes'
        assert seen == [('POST', '/v1/fleet/pull-messages', 'sig', b'\x00\x01')]
        for path in ('/v1/control/start-run', '/v1/control/register-node', '/v1/control/stop-run',
                     '/v1/runtime/acquire-task', '/docs', '/', '/v1/fleet/../control/start-run'):
            refused = await call('POST', path)
            assert refused.status_code == 403 and 'only the Fleet API' in refused.json()['detail'], path
        assert len(seen) == 1  # nothing but the Fleet request reached the SuperLink
    asyncio.run(scenario())


#: loaded by a malicious site's Python (its own PYTHONPATH): once fednnunet.site_training is imported, its round
#: handler is wrapped. A site owns its machine and may run any code; these are the attacks such a site mounts.
ATTACKING_SITE = '''
import importlib.abc, importlib.machinery, os, sys, time

ATTACK = os.environ.get('FEDNNUNET_TEST_ATTACK', '')


def attacked(module):
    real_fit = module.fit

    def fit(worker, message):
        r = int(message.config['round'])
        if ATTACK == 'hang' and r == 1:
            # busy with round 1 and never done with it: the test kills this SuperNode while it hangs here
            open(os.environ['FEDNNUNET_TEST_MARK'], 'w').close()
            time.sleep(3600)
        reply = real_fit(worker, message)
        arrays = dict(reply.arrays)
        first = sorted(k for k, a in arrays.items() if a.dtype.kind == 'f')[0]
        if ATTACK == 'poison':
            if r == 0:
                arrays[first] = arrays[first].copy()
                arrays[first].flat[0] = float('nan')
            elif r == 1:
                arrays['backdoor.weight'] = arrays[first].copy()
            else:
                arrays[first] = arrays[first][None]  # one more axis
        elif ATTACK == 'straggle' and r == 0:
            # late for round 0 and still at it when round 1 starts: it answers 3 s after the server has logged
            # round 0 (the server shares this test machine's disk)
            import json
            deadline = time.time() + 600
            while time.time() < deadline:
                try:
                    with open(os.environ['FEDNNUNET_TEST_ROUND_LOG']) as f:
                        if len(json.load(f)) >= 1:
                            break
                except (OSError, ValueError):
                    pass
                time.sleep(0.2)
            time.sleep(3)
            open(os.environ['FEDNNUNET_TEST_MARK'], 'w').close()
        elif ATTACK == 'wait_for_straggler' and r == 1:
            # an honest site that is slow in round 1: it answers once the straggler has sent its late round-0
            # update (and 5 s for it to reach the SuperLink), so round 2 never starts before that update is in,
            # however fast this machine trains round 1
            deadline = time.time() + 600
            while time.time() < deadline and not os.path.exists(os.environ['FEDNNUNET_TEST_MARK']):
                time.sleep(0.2)
            time.sleep(5)
        return type(reply)(reply.kind, reply.config, arrays=arrays)
    module.fit = fit


class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != 'fednnunet.site_training':
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            attacked(module)
        spec.loader.exec_module = exec_module
        return spec


if ATTACK:
    sys.meta_path.insert(0, Hook())
'''


@pytest.mark.slow
def test_a_poisoning_site_a_straggler_and_an_impostor_with_a_registered_key_do_not_stop_the_run(planned, tmp_path,
                                                                                              processes):
    """Real SuperLink and SuperNodes (TLS, SuperNode authentication), --min-sites 1, three rounds. Site B sends a
    NaN in round 0, an extra key in round 1, a wrongly shaped array in round 2: dropped every round with the
    reason. Site C holds its round-0 update until 3 s after the server has logged round 0: dropped once the
    quorum answered and the grace period (10 s) passed; still busy with it when round 1 starts, it is sent nothing
    (Flower would queue it); its late update is thrown away and it trains round 2 again (site A, honest, answers
    round 1 only after C's late update is out, so round 2 cannot start before it however fast round 1 is). A fourth SuperNode holds a registered key (site D's) and
    says it is A: refused, it never trains. The run completes with a finite global model."""
    certs = tmp_path / 'certs'
    subprocess.run(['bash', os.path.join(REPO, 'scripts', 'make_test_certs.sh'), str(certs), '--sites', 'A', 'B',
                    'C', 'D'], check=True, capture_output=True)
    attack_path = tmp_path / 'attacker_python'
    attack_path.mkdir()
    (attack_path / 'sitecustomize.py').write_text(ATTACKING_SITE)
    port = _free_port()
    results = tmp_path / 'nnUNet_results'
    results.mkdir()
    env = _env(nnUNet_results=results)

    def site(name, claims, key, **extra):
        processes.start(name, ['site', '--site', claims, '-d', str(DATASET_ID), '--server', f'127.0.0.1:{port}',
                               '--tls-dir', str(certs), '--auth-key', str(certs / 'keys' / key), '-device', 'cpu',
                               '-np', '1'], dict(env, FLWR_HOME=str(tmp_path / f'home_{name}'), **extra))
    mark = str(tmp_path / 'straggler_answered')
    site('site_A', 'A', 'A', PYTHONPATH=str(attack_path), FEDNNUNET_TEST_ATTACK='wait_for_straggler',
         FEDNNUNET_TEST_MARK=mark)
    site('site_B', 'B', 'B', PYTHONPATH=str(attack_path), FEDNNUNET_TEST_ATTACK='poison')
    site('site_C', 'C', 'C', PYTHONPATH=str(attack_path), FEDNNUNET_TEST_ATTACK='straggle',
         FEDNNUNET_TEST_ROUND_LOG=os.path.join(_fedavg_fold(results), 'federation_log.json'),
         FEDNNUNET_TEST_MARK=mark)
    site('impostor', 'A', 'D')
    processes.start('server', ['server', '-d', str(DATASET_ID), '--phase', 'train', '-p', PLANS, '-c', '3d_fullres',
                               '--method', 'fedavg', '--rounds', '3', '--local-iterations', '2', '--val-iterations',
                               '1', '--no-val', '--sites', 'A', 'B', 'C', '--min-sites', '1', '--straggler-grace',
                               '10', '--host', '127.0.0.1', '--port', str(port), '--tls-dir', str(certs),
                               '--auth-keys', *[f'{s}={certs / "keys" / s}.pub' for s in 'ABCD'],
                               '--wait-for-sites', '240', '--work-dir', str(tmp_path / 'server_work')], env)
    assert processes.procs['server'].wait(timeout=1200) == 0, processes.log('server')[-5000:]

    fold = _fedavg_fold(results)
    rounds = json.load(open(os.path.join(fold, 'federation_log.json')))
    assert [r['round'] for r in rounds] == [0, 1, 2]
    for r, why in zip(rounds, ('holds NaN or infinite values', "unexpected ['backdoor.weight']",
                               'has shape')):
        assert 'B' not in r['sites'] and why in r['missing_sites']['B'], (r['round'], r['missing_sites'])
    assert set(rounds[0]['sites']) == {'A'} and rounds[0]['missing_sites']['C'].startswith('straggler: no reply 10 s')
    assert set(rounds[1]['sites']) == {'A'} and rounds[1]['missing_sites']['C'].startswith('still busy with a request')
    assert set(rounds[2]['sites']) == {'A', 'C'}, rounds[2]['missing_sites']
    server_log = processes.log('server')
    assert "says it is site 'A' but holds the key of site 'D'; refused" in server_log, server_log[-4000:]
    assert 'train.fit' not in processes.log('impostor')
    assert processes.log('server').count("site 'A' connected") == 1
    final = _weights(os.path.join(fold, 'checkpoint_final.pth'))
    assert all(np.isfinite(t.numpy()).all() for t in final.values())
    assert set(final) == set(_weights(os.path.join(os.path.dirname(fold), 'sites', 'A', 'fold_0',
                                                   'checkpoint_final.pth')))


def test_the_flower_server_plans_and_trains_with_its_public_set(raw_copy, task_identity):
    """run config server-data: the server's public set (site C's cases) is planned as a participant and, with
    server_iterations, trained on after every merge, as in simulation."""
    from fednnunet.flower_app import run_server
    from fednnunet.federation import SERVER_DATA, site_folder
    spec = json.load(open(raw_copy / 'sites.json'))
    spec['server'] = {'cases': spec['sites'].pop('C')['cases']}
    json.dump(spec, open(raw_copy / 'sites.json', 'w'))
    federation = Federation.from_raw(DATASET_ID)
    workers = _workers(federation)
    grid = InProcessGrid({1: site_node(workers['A'], 'A'), 2: site_node(workers['B'], 'B')})
    engine = FlowerEngine(grid, sites=['A', 'B'], dataset=DATASET_ID, log=lambda t: None)
    result = run_server(grid, {'dataset': str(DATASET_ID), 'planner': 'nnUNetPlannerCPU', 'rounds': 1,
                               'local-iterations': 1, 'val-iterations': 1, 'validate': False,
                               'server-optimizer': json.dumps({'server_iterations': 2}),
                               'server-data': str(raw_copy / 'sites.json'), 'sites': 'A B'}, engine=engine)
    assert result['planning']['sites'][SERVER_DATA]['num_cases'] == 2
    assert os.path.isfile(os.path.join(site_folder(DATASET_NAME, SERVER_DATA), 'splits_final.json'))
    log = json.load(open(os.path.join(result['training']['results_folder'], 'fold_0', 'federation_log.json')))
    assert np.isfinite(log[0]['server']['train_loss']) and sorted(log[0]['sites']) == ['A', 'B']


def test_hssf_over_flower_plans_a_network_per_party_and_exchanges_predictions(raw_copy, task_identity):
    """hssf through the Flower engine and Flower's encoding: the planning gives each party its own network (A plain,
    B with unlabelled cases only a residual encoder, the server's public set the wide one); the bank reaches each
    site once, the server's predictions reach the sites after the warm-up (their refinement KL is computed) and the
    sites' reach the server's trainer (its rectification KL is computed); every party keeps an nnU-Net checkpoint of
    its own network and there is no global model."""
    import glob
    import torch
    from fednnunet.flower_app import run_server
    from fednnunet.federation import SERVER_DATA
    from test_unlabelled_sites import _unlabel
    spec = json.load(open(raw_copy / 'sites.json'))
    for case in spec['sites']['B']['cases']:
        _unlabel(raw_copy, case)
    spec['sites']['B'] = {'unlabelled': spec['sites']['B']['cases'], 'network': 'resenc'}
    spec['server'] = {'cases': spec['sites'].pop('C')['cases'], 'network': 'resenc_wide'}
    json.dump(spec, open(raw_copy / 'sites.json', 'w'))
    federation = Federation.from_raw(DATASET_ID)
    workers = _workers(federation)
    grid = InProcessGrid({1: site_node(workers['A'], 'A'), 2: site_node(workers['B'], 'B')})
    engine = FlowerEngine(grid, sites=['A', 'B'], dataset=DATASET_ID, log=lambda t: None)
    result = run_server(grid, {'dataset': str(DATASET_ID), 'planner': 'nnUNetPlannerCPU', 'method': 'hssf',
                               'rounds': 2, 'local-iterations': 1, 'val-iterations': 1, 'validate': False,
                               'hyperparameters': json.dumps({'warmup_rounds': 1, 'public_patches': 2}),
                               'server-data': str(raw_copy / 'sites.json'), 'sites': 'A B'}, engine=engine)
    base = result['training']['results_folder']
    configurations = {p: torch.load(os.path.join(base, 'sites', p, 'fold_0', 'checkpoint_final.pth'),
                                    map_location='cpu', weights_only=True)['init_args']['configuration']
                      for p in ('A', 'B', SERVER_DATA)}
    assert configurations == {'A': '3d_fullres', 'B': '3d_fullres_resenc', SERVER_DATA: '3d_fullres_resenc_wide'}
    assert not os.path.isfile(os.path.join(base, 'fold_0', 'checkpoint_final.pth'))

    def log_of(party):
        return ''.join(open(f).read() for f in glob.glob(os.path.join(base, 'sites', party, 'fold_0',
                                                                      'training_log*.txt')))
    for site in ('A', 'B'):
        assert re.search(r'round 1: .*rf_kl \d', log_of(site)) and 'rf_kl' not in log_of(site).split('round 1:')[0]
    assert re.search(r'round 1: .*pseudo_label_loss \d|round 1: .*fp_loss \d', log_of('B'))
    assert re.search(r'round 1: .*rc_kl \d', log_of(SERVER_DATA)), log_of(SERVER_DATA)[-2000:]
    log = json.load(open(os.path.join(base, 'fold_0', 'federation_log.json')))
    sent = [r['bytes_to_sites']['A'] for r in log]
    assert sent[0] != sent[1] and min(sent) > 0  # the bank, then the server's predictions


@pytest.mark.slow
@pytest.mark.extended  # 70 s; hssf over Flower's encoding: test_hssf_over_flower_plans_a_network_per_party
def test_hssf_between_real_processes_each_party_on_its_own_disk(demo_raw, tmp_path, processes):
    """hssf over a real SuperLink and SuperNodes (TLS, SuperNode authentication), every party with only its own
    data on its own disk: hospital A with its labelled cases (the plain U-Net), hospital B with unlabelled images
    only (its sites.json asks for a residual encoder), the server with a labelled public set (--server-data, the
    wide residual encoder). Planning, preprocessing and 2 rounds (1 warm-up) go over Flower. Each party keeps an
    nnU-Net checkpoint of its own network; predictions travel in both directions after the warm-up (the sites'
    refinement and the server's rectification KL are computed); no weights and no global model."""
    import glob
    import torch
    from fednnunet.federation import SERVER_DATA, UNLABELLED_IMAGES_FOLDER
    certs = tmp_path / 'certs'
    subprocess.run(['bash', os.path.join(REPO, 'scripts', 'make_test_certs.sh'), str(certs), '--sites', 'A', 'B'],
                   check=True, capture_output=True)
    pooled = Federation.from_folder(str(demo_raw))
    port = _free_port()
    for site in 'AB':
        hospital = tmp_path / f'hospital_{site}'
        _own_raw_folder(demo_raw, site, hospital / 'nnUNet_raw')
        if site == 'B':  # B never had labels: its images are unlabelled ones
            own = hospital / 'nnUNet_raw' / DATASET_NAME
            (own / UNLABELLED_IMAGES_FOLDER).mkdir()
            for f in os.listdir(own / 'imagesTr'):
                os.replace(own / 'imagesTr' / f, own / UNLABELLED_IMAGES_FOLDER / f)
            shutil.rmtree(own / 'labelsTr')
            (own / 'imagesTr').rmdir()
            json.dump({'sites': {'B': {'unlabelled': list(pooled.sites['B'].cases), 'network': 'resenc'}}},
                      open(own / 'sites.json', 'w'))
        env = _env(nnUNet_raw=hospital / 'nnUNet_raw', nnUNet_preprocessed=hospital / 'nnUNet_preprocessed',
                   nnUNet_results=hospital / 'nnUNet_results', FLWR_HOME=hospital / 'flwr_home')
        processes.start(f'site_{site}', ['site', '--site', site, '-d', str(DATASET_ID), '--server',
                                         f'127.0.0.1:{port}', '--tls-dir', str(certs), '--auth-key',
                                         str(certs / 'keys' / site), '-device', 'cpu', '-np', '1'], env)
    # the server's public set: site C's cases, on the server's disk only
    public = tmp_path / 'server' / 'public_set'
    for sub in ('imagesTr', 'labelsTr'):
        (public / sub).mkdir(parents=True)
    for case in pooled.sites['C'].cases:
        for f in pooled.sites['C'].image_files(case):
            shutil.copy(f, public / 'imagesTr')
        shutil.copy(pooled.sites['C'].label_file(case), public / 'labelsTr')
    shutil.copy(os.path.join(demo_raw, 'dataset.json'), public / 'dataset.json')
    json.dump({'server': {'cases': list(pooled.sites['C'].cases), 'network': 'resenc_wide'}},
              open(public / 'sites.json', 'w'))
    server = tmp_path / 'server'
    server_env = _env(nnUNet_raw=server / 'nnUNet_raw', nnUNet_preprocessed=server / 'nnUNet_preprocessed',
                      nnUNet_results=server / 'nnUNet_results', FLWR_HOME=server / 'flwr_home')
    processes.start('server', ['server', '-d', str(DATASET_ID), '-c', '3d_fullres', '-pl', 'nnUNetPlannerCPU',
                               '--method', 'hssf', '--rounds', '2', '--local-iterations', '1', '--val-iterations', '1',
                               '--no-val', '--hp', 'warmup_rounds=1', 'public_patches=2', '--server-data',
                               str(public / 'sites.json'), '--sites', 'A', 'B', '--host', '127.0.0.1', '--port',
                               str(port), '--tls-dir', str(certs), '--auth-keys', str(certs / 'keys' / 'A.pub'),
                               str(certs / 'keys' / 'B.pub'), '--wait-for-sites', '180', '--work-dir',
                               str(server / 'work')], server_env)
    assert processes.procs['server'].wait(timeout=1200) == 0, processes.log('server')[-5000:]
    assert 'finished:completed' in processes.log('server')

    def fold(party_results, party):
        return os.path.join(party_results, DATASET_NAME, f'HSSFTrainer__{PLANS}__3d_fullres', 'sites', party,
                            'fold_0')
    folds = {'A': fold(tmp_path / 'hospital_A' / 'nnUNet_results', 'A'),
             'B': fold(tmp_path / 'hospital_B' / 'nnUNet_results', 'B'),
             SERVER_DATA: fold(server / 'nnUNet_results', SERVER_DATA)}
    checkpoints = {p: torch.load(os.path.join(f, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
                   for p, f in folds.items()}
    assert {p: c['init_args']['configuration'] for p, c in checkpoints.items()} == \
        {'A': '3d_fullres', 'B': '3d_fullres_resenc', SERVER_DATA: '3d_fullres_resenc_wide'}
    assert all(np.isfinite(t.numpy()).all() for c in checkpoints.values() for t in c['network_weights'].values())
    # three different networks (the wide one has the residual encoder's names with more features)
    shapes = {p: frozenset((k, tuple(t.shape)) for k, t in c['network_weights'].items())
              for p, c in checkpoints.items()}
    assert len(set(shapes.values())) == 3
    base = os.path.join(server / 'nnUNet_results', DATASET_NAME, f'HSSFTrainer__{PLANS}__3d_fullres')
    assert os.path.isfile(os.path.join(base, 'fold_0', 'federated_summary.json'))
    assert not os.path.isfile(os.path.join(base, 'fold_0', 'checkpoint_final.pth'))  # no global model

    def log_of(party):
        return ''.join(open(f).read() for f in glob.glob(os.path.join(folds[party], 'training_log*.txt')))
    for site in 'AB':
        assert re.search(r'round 1: .*rf_kl \d', log_of(site)), log_of(site)[-2000:]
        assert 'rf_kl' not in log_of(site).split('round 1:')[0]  # the warm-up round has no KL
    assert re.search(r'round 1: .*pseudo_label_loss \d|round 1: .*fp_loss \d', log_of('B')), log_of('B')[-2000:]
    assert re.search(r'round 1: .*rc_kl \d', log_of(SERVER_DATA)), log_of(SERVER_DATA)[-2000:]
    # every site holds the server's plans; no file of the public set is anywhere on a hospital's disk
    plans = json.load(open(server / 'nnUNet_preprocessed' / DATASET_NAME / f'{PLANS}.json'))
    for site in 'AB':
        hospital = tmp_path / f'hospital_{site}'
        assert json.load(open(hospital / 'nnUNet_preprocessed' / DATASET_NAME / 'sites' / site /
                              f'{PLANS}.json')) == plans
        names = [f for _, _, files in os.walk(hospital) for f in files]
        assert not [f for f in names for c in pooled.sites['C'].cases if f.startswith(c)]
        assert [f for f in names if f.startswith(pooled.sites[site].cases[0])]  # (its own are)
    log = json.load(open(os.path.join(base, 'fold_0', 'federation_log.json')))
    sent = [r['bytes_to_sites']['A'] for r in log]
    assert sent[0] != sent[1] and min(sent) > 0  # the public patches' bank, then the server's predictions
    # no empty results folder is left at a party (nnU-Net's trainer of B's own network made one)
    empty = [root for party in ('hospital_A', 'hospital_B', 'server') for root, dirs, files in
             os.walk(tmp_path / party / 'nnUNet_results') if not dirs and not files]
    assert empty == [], empty


def test_fedmm_over_flower_sends_each_modality_encoder_only_to_its_sites(two_channel_raw, task_identity):
    """fedmm through the Flower engine and Flower's encoding, planning included: site B (T1 only) is never sent T2's
    encoder and never sends it, C (T2 only) likewise T1's; A gets both; the global model is stored."""
    from fednnunet.flower_app import run_server
    federation = Federation.from_raw(DATASET_ID)
    workers = _workers(federation)
    replies = {}

    def recording(site, node):
        def handle(content):
            reply = node(content)
            replies.setdefault(site, []).append(set(from_record_dict(reply).arrays))
            return reply
        return handle
    grid = InProcessGrid({i: recording(s, site_node(workers[s], s)) for i, s in enumerate('ABC', 1)})
    engine = FlowerEngine(grid, sites=['A', 'B', 'C'], dataset=DATASET_ID, log=lambda t: None)
    result = run_server(grid, {'dataset': str(DATASET_ID), 'planner': 'nnUNetPlannerCPU', 'method': 'fedmm',
                               'rounds': 2, 'local-iterations': 1, 'val-iterations': 1, 'validate': False,
                               'sites': 'A B C'}, engine=engine)
    sent = {}
    for message in grid.sent:
        site = 'ABC'[int(message.metadata.dst_node_id) - 1]
        sent.setdefault(site, set()).update(from_record_dict(message.content).arrays)
    for site, lacks in (('B', 'encoders.1.'), ('C', 'encoders.0.')):
        keys = sent[site] | set().union(*replies[site])
        assert [k for k in keys if k.startswith('encoders.')] and not [k for k in keys if k.startswith(lacks)], site
    assert [k for k in sent['A'] if k.startswith('encoders.1.')] and [k for k in sent['A'] if k.startswith('encoders.0.')]
    base = result['training']['results_folder']
    assert os.path.isfile(os.path.join(base, 'fold_0', 'checkpoint_final.pth'))
