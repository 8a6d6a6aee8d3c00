"""The Flower engine: the same messages as the simulation engine, carried by Flower (SuperLink / SuperNodes).

It implements the engine contract of :mod:`fednnunet.engines.simulation` over a Flower ``Grid`` (inside a
ServerApp), so that ``plan_and_preprocess`` and ``FederatedTraining`` run unchanged:

- ``site_names``: the federation's sites (``sites`` if given, else the sites that connected at the start);
- ``ask(requests) -> replies``: the replies of the sites that answered, in the order asked; ``missing`` holds
  ``{site: reason}`` for the others: not connected, no reply within ``round_timeout``, SuperNode gone, or the
  site's own error (e.g. a FederationError: its text reaches the server unchanged);
- ``ask_all(message)``; ``bytes_sent`` / ``bytes_received`` per site.

This module only converts types. A fednnunet :class:`~fednnunet.wire.Message` becomes a Flower ``RecordDict``
with a ConfigRecord ``fednnunet`` (``kind`` + the config as a JSON string) and an ArrayRecord ``arrays`` holding
one Flower ``Array`` ``wire``: all the message's arrays in fednnunet's wire encoding (:mod:`fednnunet.wire`: a
JSON header naming every array's dtype, shape and offset, then the raw bytes; only bool/int/uint/float dtypes),
as numpy uint8 (``np.save`` with ``allow_pickle=False``). On arrival the Array and every array in it are checked
(dtype, shape, size). Nothing is pickled. One Array rather than one per numpy array: Flower moves each Array as
an object of its own, one request each, which made a message with a U-Net's arrays take seconds.

Sites are Flower nodes. Node ids are not site names and change when a SuperNode restarts, so the engine asks
every node it has not seen yet who it is (``identify``: site name, dataset, fednnunet/flwr/nnU-Net versions)
and keeps a map site -> node; a site whose versions differ from the server's is refused with an error that
names the site and both versions.

Bytes are counted as the size of the fednnunet wire encoding of each message (``bytes_sent`` /
``bytes_received``, as the simulation engine counts them) and, separately, as Flower's payload (the npy bytes of
every Array + the ConfigRecord strings: ``flower_bytes_sent`` / ``flower_bytes_received``). Flower's own framing
(HTTP, protobuf, 5 MiB chunks) is not counted; Flower also sends an array whose bytes equal another's only once.
"""
import json
import re
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
from flwr.app import Array, ArrayRecord, ConfigRecord, Message as FlowerMessage, RecordDict

from fednnunet.errors import FederationError
from fednnunet.federation import check_site_name
from fednnunet.site_worker import MESSAGE_KINDS, software_versions
from fednnunet.wire import Message, WireError, checked_arrays, decode, encode, encoded_size

CONFIG_RECORD = 'fednnunet'
ARRAY_RECORD = 'arrays'
#: the one Array of a message's ArrayRecord: the message's arrays in fednnunet's wire encoding
WIRE_ARRAY = 'wire'
ARRAYS_KIND = 'arrays'
FORMAT = 'fednnunet-flower-2'  # 2: all arrays in one Array (fednnunet's wire encoding)
ERROR_KIND = '__error__'
#: versions that must equal the server's at every site
CHECKED_VERSIONS = ('fednnunet_version', 'flwr_version', 'nnunetv2_version')
_NPY_STYPE = 'numpy.ndarray'
# Flower's error codes (flwr.common.constant.ErrorCode)
_NODE_UNAVAILABLE = 5


# ------------------------------------------------------------------------------------------- type conversion

def message_type(kind: str) -> str:
    """Flower's message type for a fednnunet kind: ``train.fit``, ``evaluate.finish``, ``query.describe``, ..."""
    category = {'fit': 'train', 'finish': 'evaluate', 'evaluate': 'evaluate'}.get(kind, 'query')
    return f'{category}.{kind}'


def to_record_dict(message: Message, array_cache: Optional[dict] = None, **extra_config) -> RecordDict:
    """A fednnunet Message as Flower records: the config as JSON in a ConfigRecord, all arrays together as one
    Flower Array (uint8: fednnunet's wire encoding, :mod:`fednnunet.wire`). One Array, not one per numpy array:
    Flower moves every Array (and every 5 MiB chunk of one) as an object of its own, with a request each, and
    that cost 1.3-1.9 s per message for a tiny U-Net's 30 arrays here (0.07 s for a message without arrays).
    ``extra_config``: plain values for Flower's side only (e.g. timings), not part of the fednnunet message.
    ``array_cache``: a dict shared by the messages of one request, so that the same arrays sent to several sites
    are encoded once (Flower uploads objects with the same content id once anyway)."""
    arrays = checked_arrays(message)
    config = ConfigRecord({'format': FORMAT, 'kind': message.kind,
                           'config': json.dumps(message.config, allow_nan=True), **extra_config})
    if not arrays:
        return RecordDict({CONFIG_RECORD: config})
    key = tuple((name, id(message.arrays[name])) for name in arrays)
    cached = array_cache.get(key) if array_cache is not None else None
    if cached is not None and all(a is message.arrays[n] for n, a in cached[0].items()):
        blob = cached[1]
    else:
        blob = Array(np.frombuffer(encode(Message(ARRAYS_KIND, {}, arrays)), dtype=np.uint8))
        if array_cache is not None:
            array_cache[key] = ({n: message.arrays[n] for n in arrays}, blob)  # kept: ids cannot be reused
    return RecordDict({CONFIG_RECORD: config, ARRAY_RECORD: ArrayRecord({WIRE_ARRAY: blob})})


def _config_record(content: RecordDict) -> ConfigRecord:
    if CONFIG_RECORD not in content or not isinstance(content[CONFIG_RECORD], ConfigRecord):
        raise WireError('not a fednnunet message: no fednnunet ConfigRecord')
    record = content[CONFIG_RECORD]
    if record.get('format') != FORMAT:
        raise WireError(f"unknown fednnunet message format {record.get('format')!r} (expected {FORMAT!r}): "
                        f"are the server and the site running the same fednnunet version?")
    return record


def from_record_dict(content: RecordDict) -> Message:
    """The fednnunet Message in Flower records; checks every array's dtype and shape (never unpickles)."""
    record = _config_record(content)
    if record['kind'] == ERROR_KIND:
        raise WireError('this record is an error reply, not a message: ' + error_text(content))
    try:
        config = json.loads(record['config'])
    except (TypeError, json.JSONDecodeError) as e:
        raise WireError(f'corrupt message config: {e}') from None
    arrays = {}
    records = content.get(ARRAY_RECORD)
    if records is not None:
        if not isinstance(records, ArrayRecord) or set(records) - {WIRE_ARRAY}:
            raise WireError(f'unexpected arrays {sorted(set(records) - {WIRE_ARRAY})[:5]}: a fednnunet message '
                            f'carries its arrays in one {WIRE_ARRAY!r} array')
        array = records.get(WIRE_ARRAY)
        if array is not None:
            if array.stype != _NPY_STYPE or array.dtype != 'uint8' or len(array.shape) != 1:
                raise WireError(f'the {WIRE_ARRAY!r} array is {array.stype} {array.dtype}{tuple(array.shape)}; '
                                f'expected numpy uint8 bytes')
            try:
                blob = array.numpy()  # np.load(..., allow_pickle=False)
            except ValueError as e:
                raise WireError(f'the {WIRE_ARRAY!r} array refused: {e}') from None
            if blob.dtype != np.uint8 or tuple(blob.shape) != tuple(array.shape):
                raise WireError(f'the {WIRE_ARRAY!r} array does not match its header ({blob.dtype}{blob.shape})')
            inner = decode(blob.tobytes())  # checks every array's name, dtype, shape and size
            if inner.kind != ARRAYS_KIND or inner.config:
                raise WireError(f'the {WIRE_ARRAY!r} array holds a {inner.kind!r} message, not arrays')
            arrays = inner.arrays
    return Message(kind=record['kind'], config=config, arrays=arrays)


#: an absolute path (POSIX or Windows): its folders are the site's business, its file name may stay
_ABSOLUTE_PATH = re.compile(r'(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[^\s/\\\'"(),:;]+[/\\])+')


class ImpostorNode(FederationError):
    """A SuperNode that claims a site whose key it does not hold, or a name no site may have."""


def public_key_digest(public_key: bytes) -> str:
    """sha256 of a public key's DER SubjectPublicKeyInfo: the same key in PEM (Flower's NodeInfo.public_key), DER or
    OpenSSH form (a site's ``.pub`` file) gives the same digest."""
    import hashlib
    from cryptography.hazmat.primitives.serialization import (Encoding, PublicFormat, load_der_public_key,
                                                              load_pem_public_key, load_ssh_public_key)
    data = bytes(public_key).strip()
    loader = (load_pem_public_key if data.startswith(b'-----BEGIN') else
              load_ssh_public_key if data.split(b' ', 1)[0].startswith((b'ecdsa-', b'ssh-')) else load_der_public_key)
    key = loader(data)
    return hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def without_paths(text: str) -> str:
    """``text`` with the folders of every absolute path removed (``/data/site/imagesTr/A_001_0000.nii.gz`` ->
    ``.../A_001_0000.nii.gz``): the site, case, field and file name tell the server what is wrong, the site's own
    log keeps the whole path."""
    return _ABSOLUTE_PATH.sub('.../', text)


def error_record(error: BaseException, site: Optional[str] = None, **extra_config) -> RecordDict:
    """What a site sends when a request failed: the error's type and text without the folders of its paths (the
    traceback and the full text stay in the site's log: file paths are the site's business)."""
    return RecordDict({CONFIG_RECORD: ConfigRecord({
        'format': FORMAT, 'kind': ERROR_KIND, 'error_type': type(error).__name__,
        'error': without_paths(str(error)), 'site': site or '', **extra_config})})


def is_error(content: RecordDict) -> bool:
    return _config_record(content)['kind'] == ERROR_KIND


def error_text(content: RecordDict) -> str:
    record = content[CONFIG_RECORD]
    return f"{record['error_type']}: {record['error']}"


def flower_payload_size(content: RecordDict) -> int:
    """Flower's payload: the npy bytes of every Array (once per distinct content, as Flower sends them) + the
    keys and string values of the ConfigRecords."""
    size = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            size += sum(len(a.data) for a in {a.object_id: a for a in record.values()}.values())
            size += sum(len(k) for k in record)
        elif isinstance(record, ConfigRecord):
            size += sum(len(k) + len(str(v)) for k, v in record.items())
    return size


# ------------------------------------------------------------------------------------------- the engine

class FlowerEngine:
    """The engine contract over a Flower ``Grid``.

    sites: the federation's sites; the engine waits up to ``wait_for_sites`` seconds for all of them. Without
        it, the federation is the set of sites connected once ``min_sites`` (default 1) are there and no new
        one has come for ``settle_seconds``.
    round_timeout: seconds the engine waits for the replies to one request (a training round, preprocessing...);
        a site slower than that is missing from the round (Flower's own strategies drop sites after an hour).
    identify_timeout: seconds a new SuperNode has to say who it is.
    site_keys: {site: public_key_digest of the site's SuperNode key} (from the server's ``--auth-keys``): a node
        is that site only if it authenticated with that key; a node that claims a site whose key it does not hold
        is refused, whatever its key. None (no SuperNode authentication): a node's word is taken.
    straggler_grace: with ``min_sites``, a training round waits this many seconds more once ``min_sites`` sites
        have answered, then goes on without the others (stragglers: missing from the round, their late update is
        never read). Without ``min_sites`` every round waits for every site. Flower runs one ClientApp per run
        at a time on a node, so a site still working on a request it did not answer in time would only queue the
        next one: it is not sent a new request until its late reply has come (and been thrown away), then it
        rejoins; after ``round_timeout`` without that reply, or on a new SuperNode, it is asked again anyway
        (as is a site whose request ran into the round timeout itself).
    dataset: the dataset the server was started for (id or name); every site must hold that one.
    """

    def __init__(self, grid, sites: Optional[Sequence[str]] = None, min_sites: Optional[int] = None,
                 round_timeout: float = 86400.0, identify_timeout: float = 300.0, wait_for_sites: float = 600.0,
                 settle_seconds: float = 15.0, dataset=None, log: Callable[[str], None] = None,
                 poll_interval: float = 0.1, max_poll_interval: float = 0.25, liveness_interval: float = 20.0,
                 straggler_grace: float = 600.0, site_keys: Optional[Dict[str, str]] = None):
        self.grid = grid
        self.straggler_grace = float(straggler_grace)
        self.site_keys = dict(site_keys) if site_keys else None
        self.expected = sorted(sites) if sites else None
        self.min_sites = min_sites
        self.round_timeout = float(round_timeout)
        self.identify_timeout = float(identify_timeout)
        self.wait_for_sites = float(wait_for_sites)
        self.settle_seconds = float(settle_seconds)
        self.dataset = dataset
        self.log = log or (lambda text: print(f'[fednnunet flower] {text}', flush=True))
        self.poll_interval, self.max_poll_interval = poll_interval, max_poll_interval
        self.liveness_interval = liveness_interval
        self.versions = software_versions()
        self.dataset_name: Optional[str] = None
        self.members: Optional[List[str]] = list(self.expected) if self.expected else None
        self.site_node: Dict[str, int] = {}        # site -> its current node id
        self.node_site: Dict[int, str] = {}        # every node id identified so far -> site
        self.refused: Dict[int, str] = {}          # node id -> why it is not used
        self.identities: Dict[str, dict] = {}
        self.missing: Dict[str, str] = {}
        #: site -> (message id, node id, since): a request the site did not answer in time (see straggler_grace)
        self.unanswered: Dict[str, tuple] = {}
        self.bytes_sent: Dict[str, int] = {s: 0 for s in self.members or []}
        self.bytes_received: Dict[str, int] = {s: 0 for s in self.members or []}
        self.flower_bytes_sent: Dict[str, int] = dict(self.bytes_sent)
        self.flower_bytes_received: Dict[str, int] = dict(self.bytes_sent)
        #: one entry per request: kind, wall seconds, per site bytes and the site's handler seconds
        self.message_log: List[dict] = []
        self._group = 0

    # -------------------------------------------------------------- contract
    @property
    def site_names(self) -> List[str]:
        if self.members is None:
            raise RuntimeError('FlowerEngine.connect() has not run yet')
        return list(self.members)

    def ask_all(self, message: Message) -> Dict[str, Message]:
        return self.ask({s: message for s in self.site_names})

    def ask(self, requests: Dict[str, Message], timeout: Optional[float] = None) -> Dict[str, Message]:
        """Sends each site its request; returns the replies of the sites that answered, in the order asked."""
        self.missing = {}
        timeout = self.round_timeout if timeout is None else timeout
        self._discover(strict=False)
        t0 = time.time()
        kind = next(iter(requests.values())).kind if requests else ''
        entry = {'kind': kind, 'started': t0, 'sites': {}}
        outgoing, cache = [], {}
        busy = self._still_busy(list(requests))
        for site, message in requests.items():
            node = self.site_node.get(site)
            if node is None:
                self.missing[site] = 'not connected'
                continue
            if site in busy:
                self.missing[site] = busy[site]
                continue
            content = to_record_dict(message, cache)
            size, flower_size = encoded_size(message), flower_payload_size(content)
            self._count(site, size, flower_size, sent=True)
            entry['sites'][site] = {'bytes_sent': size, 'flower_bytes_sent': flower_size,
                                    'array_bytes_sent': message.nbytes}
            outgoing.append((site, FlowerMessage(content, node, message_type(message.kind),
                                                 ttl=timeout + 600.0, group_id=f'{kind}-{self._group}')))
        self._group += 1
        quorum = self.min_sites if self.min_sites and kind == 'fit' else None
        raw = self._send_and_receive(outgoing, timeout, what=kind, quorum=quorum)
        replies = {}
        for site in requests:
            if site not in raw:
                continue
            content, pulled_at = raw[site]
            try:
                if is_error(content):
                    self.missing[site] = error_text(content)
                    continue
                reply = from_record_dict(content)
            except WireError as e:
                self.missing[site] = f'unreadable reply: {e}'
                continue
            size, flower_size = encoded_size(reply), flower_payload_size(content)
            self._count(site, size, flower_size, sent=False)
            record = content[CONFIG_RECORD]
            entry['sites'][site].update({'bytes_received': size, 'flower_bytes_received': flower_size,
                                         'array_bytes_received': reply.nbytes,
                                         'reply_seconds': pulled_at - t0,
                                         'handler_seconds': record.get('handler_seconds'),
                                         'process_seconds': record.get('process_seconds')})
            replies[site] = reply
        entry['seconds'] = time.time() - t0
        entry['missing'] = dict(self.missing)
        self.message_log.append(entry)
        if self.missing:
            self.log(f'{kind}: no reply from ' + ', '.join(f"site '{s}' ({why})" for s, why in
                                                          sorted(self.missing.items())))
        return replies

    # -------------------------------------------------------------- sites and nodes
    def connect(self) -> List[str]:
        """Waits for the federation's sites (see the class doc); returns the site names."""
        deadline = time.time() + self.wait_for_sites
        needed = self.min_sites or 1
        last_count, last_change = -1, time.time()
        told = 0.0
        while True:
            self._discover(strict=True)
            have = sorted(self.site_node)
            if len(have) != last_count:
                last_count, last_change = len(have), time.time()
            if self.expected:
                if set(self.expected) <= set(have):
                    break
            elif len(have) >= needed and time.time() - last_change >= self.settle_seconds:
                self.members = have
                break
            if time.time() >= deadline:
                if self.expected:
                    absent = sorted(set(self.expected) - set(have))
                    if len(set(have) & set(self.expected)) >= (self.min_sites or len(self.expected)):
                        self.log(f'site(s) {absent} did not connect within {self.wait_for_sites:.0f} s; going on '
                                 f'with {have} (--min-sites {self.min_sites})')
                        break
                    raise FederationError(f'site(s) {absent} did not connect within {self.wait_for_sites:.0f} s '
                                          f'(connected: {have or "none"}); start fednnunet_site there, or check '
                                          f'the address, certificates and auth keys', field='sites')
                if len(have) >= needed:
                    self.members = have
                    break
                raise FederationError(f'only {len(have)} site(s) connected within {self.wait_for_sites:.0f} s '
                                      f'({have or "none"}), {needed} needed', field='sites')
            if time.time() - told > 30:
                waiting = sorted(set(self.expected) - set(have)) if self.expected else f'at least {needed} site(s)'
                self.log(f'connected: {have or "none"}; waiting for {waiting}')
                told = time.time()
            time.sleep(1.0)
        for s in self.members:
            self.bytes_sent.setdefault(s, 0)
            self.bytes_received.setdefault(s, 0)
            self.flower_bytes_sent.setdefault(s, 0)
            self.flower_bytes_received.setdefault(s, 0)
        self.log(f'federation: {self.members} (dataset {self.dataset_name}; fednnunet '
                 f"{self.versions['fednnunet_version']}, flwr {self.versions['flwr_version']}, nnU-Net "
                 f"{self.versions['nnunetv2_version']})")
        return self.site_names

    def _discover(self, strict: bool):
        """Identifies SuperNodes not seen before; forgets nodes that went offline. strict: a site that cannot
        start or runs other versions stops the run (at the start); else it is logged and left out."""
        online = set(int(n) for n in self.grid.get_node_ids())
        # which node serves each site: the newest identified node of the site that is online. A node that missed
        # heartbeats and came back keeps its id (and its site); a restarted SuperNode has a new id (identified below)
        previous, self.site_node = self.site_node, {}
        for node, site in self.node_site.items():  # in the order identified
            if node in online:
                self.site_node[site] = node
        for site, node in previous.items():
            if site not in self.site_node:
                self.log(f"site '{site}' went offline (SuperNode {node})")
        for site, node in self.site_node.items():
            if site not in previous:
                self.log(f"site '{site}' is back (SuperNode {node})")
        new = sorted(n for n in online if n not in self.node_site and n not in self.refused)
        if not new:
            return
        node_keys = self._node_key_digests() if self.site_keys is not None else {}
        outgoing = [(n, FlowerMessage(to_record_dict(Message('identify')), n, message_type('identify'),
                                      ttl=self.identify_timeout + 600.0, group_id='identify')) for n in new]
        raw = self._send_and_receive(outgoing, self.identify_timeout, what='identify')
        for node in new:
            if node not in raw:
                # not refused for good: it is asked again next time
                self.log(f'SuperNode {node} did not say who it is within {self.identify_timeout:.0f} s')
                continue
            content, _ = raw[node]
            try:
                if is_error(content):
                    record = content[CONFIG_RECORD]
                    raise FederationError(f'could not start: {error_text(content)}', site=record.get('site') or
                                          f'(SuperNode {node})')
                identity = from_record_dict(content).config
                if self.members is not None and identity.get('site') not in self.members:
                    # another federation's site, or one left out on purpose: not an error, but said
                    self.refused[node] = (f"site '{identity.get('site')}' is not one of the federation's sites "
                                          f"{self.members}")
                    self.log(f'SuperNode {node} ignored: {self.refused[node]}')
                    continue
                self._check_key(node, identity.get('site'), node_keys.get(node))
                self._check_identity(node, identity)
            except ImpostorNode as e:  # refused and logged; it never stops the federation (even at the start)
                self.refused[node] = str(e)
                self.log(f'SECURITY: SuperNode {node} refused: {e}')
                continue
            except (FederationError, WireError) as e:
                self.refused[node] = str(e)
                if strict:
                    raise FederationError(str(e)) from None
                self.log(f'SuperNode {node} refused: {e}')
                continue
            site = identity['site']
            self.node_site[node] = site
            self.identities[site] = identity
            old = self.site_node.get(site)
            if old is not None and old != node:
                self.log(f"site '{site}' is now SuperNode {node} (was {old}; a SuperNode that restarts gets a new "
                         f"id)")
            elif old is None:
                self.log(f"site '{site}' connected (SuperNode {node}, device {identity.get('device')})")
            self.site_node[site] = node

    def _node_key_digests(self) -> Dict[int, str]:
        """{node id: digest of the public key it authenticated with}, from the SuperLink (Flower's NodeInfo)."""
        out = {}
        for info in self.grid.get_nodes():
            if getattr(info, 'public_key', b''):
                out[int(info.node_id)] = public_key_digest(info.public_key)
        return out

    def _check_key(self, node: int, site: str, digest: Optional[str]):
        """With SuperNode authentication a site's name is bound to its key: the node must hold the claimed site's."""
        if self.site_keys is None:
            return
        if site not in self.site_keys or digest != self.site_keys[site]:
            holder = next((s for s, d in self.site_keys.items() if d == digest), None)
            held = f"the key of site '{holder}'" if holder else 'a key that belongs to no site'
            raise ImpostorNode(f"SuperNode {node} says it is site '{site}' but holds {held}; refused (a site's "
                               f"name is bound to its --auth-keys key)", site=site, field='site-id')

    def _check_identity(self, node: int, identity: dict):
        site = identity.get('site')
        if not site:
            raise FederationError(f'SuperNode {node} did not name its site', field='site-id')
        try:  # a name names folders and log entries, and the server's public set's name is no site's: refused, and
            check_site_name(site)  # never a reason to stop the federation
        except FederationError as e:
            raise ImpostorNode(f'SuperNode {node}: {e}', site=str(site)[:100], field='site-id') from None
        wrong = [k for k in CHECKED_VERSIONS if identity.get(k) != self.versions.get(k)]
        if wrong:
            raise FederationError(
                'runs ' + ', '.join(f"{k.replace('_version', '')} {identity.get(k)}" for k in wrong) +
                '; the server runs ' + ', '.join(f"{k.replace('_version', '')} {self.versions.get(k)}" for k in wrong) +
                ': install the same versions at every site and at the server', site=site, field='versions')
        name = identity.get('dataset_name')
        if not _same_dataset(name, self.dataset):
            raise FederationError(f'holds dataset {name}, the server was started for {self.dataset}', site=site,
                                  field='dataset')
        if self.dataset_name is None:
            self.dataset_name = name
        elif name != self.dataset_name:
            raise FederationError(f'holds dataset {name}, the other sites {self.dataset_name}', site=site,
                                  field='dataset')
        other = self.site_node.get(site)
        if other is not None and other != node and other in self.node_site:
            # two live SuperNodes claim the same site: the newer one wins (a restarted SuperNode), said loudly
            self.log(f"WARNING: SuperNodes {other} and {node} both say they are site '{site}'; using {node}")

    # -------------------------------------------------------------- transport
    def _send_and_receive(self, outgoing: list, timeout: float, what: str, quorum: Optional[int] = None) -> dict:
        """Pushes (key, FlowerMessage) pairs, pulls replies until all came or ``timeout`` (or, with ``quorum``, the
        straggler grace after ``quorum`` replies); returns {key: (content, time pulled)}; keys without a reply get
        a reason in self.missing (sites) or are absent."""
        if not outgoing:
            return {}
        keys = [k for k, _ in outgoing]
        ids = list(self.grid.push_messages([m for _, m in outgoing]))
        pending: Dict[str, object] = {}
        nodes: Dict[object, int] = {}
        for key, (_, message), mid in zip(keys, outgoing, ids):
            if mid:
                pending[mid] = key
                nodes[key] = message.metadata.dst_node_id
            else:
                self._missing(key, 'the SuperLink did not accept the message')
        got: Dict[object, tuple] = {}
        deadline = round_deadline = time.time() + timeout
        stragglers_cut = False  # the straggler grace, not the round timeout, ends the wait
        interval, last_liveness = self.poll_interval, time.time()
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                if reply.has_error():
                    error = reply.error
                    why = (f'SuperNode gone ({error.reason})' if error.code == _NODE_UNAVAILABLE else
                           f'Flower error {error.code}: {error.reason}')
                    self._missing(key, why)
                    if isinstance(key, str) and self.site_node.get(key) == nodes[key] and \
                            error.code == _NODE_UNAVAILABLE:
                        del self.site_node[key]
                    continue
                got[key] = (reply.content, time.time())
                interval = self.poll_interval
            if not pending:
                break
            now = time.time()
            if quorum is not None and not stragglers_cut and len(got) >= quorum and \
                    now + self.straggler_grace < round_deadline:
                stragglers_cut, deadline = True, now + self.straggler_grace
            if now >= deadline:
                for mid, key in pending.items():
                    if stragglers_cut and isinstance(key, str):  # (after a whole round timeout: asked again)
                        self.unanswered[key] = (mid, nodes[key], now)
                    self._missing(key, f'straggler: no reply {self.straggler_grace:.0f} s after --min-sites {quorum} '
                                       f'sites had answered (--straggler-grace); its late update is not used'
                                  if stragglers_cut else f'no reply within {timeout:.0f} s' +
                                  (' (--round-timeout)' if isinstance(key, str) else ''))
                break
            if now - last_liveness >= self.liveness_interval:
                last_liveness = now
                online = set(int(n) for n in self.grid.get_node_ids())
                for mid, key in list(pending.items()):
                    if nodes[key] not in online:
                        del pending[mid]
                        self._missing(key, f'SuperNode {nodes[key]} went offline during {what}')
                        if isinstance(key, str) and self.site_node.get(key) == nodes[key]:
                            del self.site_node[key]
            time.sleep(min(interval, max(0.0, deadline - time.time())))
            interval = min(interval * 1.5, self.max_poll_interval)
        return got

    def _still_busy(self, sites: List[str]) -> Dict[str, str]:
        """{site: why} for the sites still working on a request they did not answer in time. A late reply that
        has come since is pulled and thrown away (never read): that site is free again."""
        waiting = {entry[0]: site for site, entry in self.unanswered.items() if site in sites}
        if waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                self.unanswered.pop(waiting.get(reply.metadata.reply_to_message_id), None)
        busy, now = {}, time.time()
        for site in sites:
            if site not in self.unanswered:
                continue
            _, node, since = self.unanswered[site]
            if self.site_node.get(site) != node or now - since > self.round_timeout:
                del self.unanswered[site]  # a new SuperNode, or the old request is given up: ask again
                continue
            busy[site] = (f'still busy with a request it did not answer in time ({now - since:.0f} s ago); not '
                          f'sent this one (Flower runs one ClientApp at a time per site)')
        return busy

    def _missing(self, key, why: str):
        if isinstance(key, str):
            self.missing[key] = why

    def _count(self, site: str, size: int, flower_size: int, sent: bool):
        if sent:
            self.bytes_sent[site] = self.bytes_sent.get(site, 0) + size
            self.flower_bytes_sent[site] = self.flower_bytes_sent.get(site, 0) + flower_size
        else:
            self.bytes_received[site] = self.bytes_received.get(site, 0) + size
            self.flower_bytes_received[site] = self.flower_bytes_received.get(site, 0) + flower_size


def _same_dataset(name: Optional[str], wanted) -> bool:
    """Does the site's ``DatasetXXX_Name`` match the server's -d (an id, 'XXX', or the full name)?"""
    if wanted is None or wanted == '':
        return True
    if not name:
        return False
    wanted = str(wanted)
    if wanted.isdigit():
        try:
            return convert_dataset_name_to_id(name) == int(wanted)
        except (AssertionError, ValueError):  # not a DatasetXXX_Name
            return False
    return name == wanted


def handle_site_message(worker_factory: Callable[[], object], content: RecordDict, site: str = '') -> RecordDict:
    """The ClientApp's whole job for one message: Flower records -> fednnunet Message -> the site's worker ->
    reply records. An error at the site becomes an error reply (type and text) and its traceback goes to the
    site's own log."""
    return _answer(lambda request: worker_factory().handle(request), content, site)


def handle_via_daemon(socket_path: str, daemon_site: str, content: RecordDict, site: str) -> RecordDict:
    """The ClientApp's job when the site runs fednnunet's site daemon (fednnunet.site_daemon): the message goes to
    the daemon's worker, which keeps the training run's trainer between rounds; the reply (or the site's error)
    comes back as from handle_site_message."""
    from fednnunet.site_daemon import ask_daemon

    def ask(request: Message) -> Message:
        if daemon_site != site:
            raise FederationError(f"this SuperNode is site {site!r} but its site daemon serves {daemon_site!r}",
                                  site=site, field='site-id')
        return ask_daemon(socket_path, request)
    return _answer(ask, content, site)


def _answer(handle: Callable[[Message], Message], content: RecordDict, site: str) -> RecordDict:
    t0 = time.time()
    try:
        reply = handle(from_record_dict(content))
        return to_record_dict(reply, handler_seconds=time.time() - t0)
    except Exception as e:  # noqa: BLE001 - every error goes back to the server, named
        traceback.print_exc()
        return error_record(e, site, handler_seconds=time.time() - t0)


__all__ = ['FlowerEngine', 'to_record_dict', 'from_record_dict', 'error_record', 'message_type',
           'flower_payload_size', 'handle_site_message', 'handle_via_daemon', 'MESSAGE_KINDS']
