"""Which sites exist, which cases each holds, and where each site's files live.

A federation is a normal nnU-Net raw dataset (``$nnUNet_raw/DatasetXXX_Name`` with ``dataset.json``,
``imagesTr``, ``labelsTr``) plus ``sites.json``, which assigns every training case to exactly one
site. See documentation/data_contract.md.

A :class:`Site` only ever builds paths for its own cases: every file a site touches comes from
:meth:`Site.image_files` / :meth:`Site.label_file`, which refuse a case of another site.
"""
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from fednnunet.errors import FederationError
from fednnunet.planners.site_networks import check_network

SITES_FILE = 'sites.json'
UNLABELLED_IMAGES_FOLDER = 'imagesTrUnlabelled'
_SITE_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')
_SITE_KEYS = {'cases', 'unlabelled', 'validation', 'channels', 'gpu_memory_gb', 'raw_folder', 'network'}
#: the name under which the server's own labelled public set takes part (sites.json ``server``); no site may take it
SERVER_DATA = 'server'
_SERVER_KEYS = {'cases', 'gpu_memory_gb', 'raw_folder', 'network'}


def dataset_name_from_id(dataset_name_or_id) -> str:
    """nnU-Net's lookup of ``DatasetXXX_Name``, with an error a user can act on."""
    try:
        return maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:
        raise FederationError(f"dataset {dataset_name_or_id!r} was not found under nnUNet_raw="
                              f"{nnUNet_raw!r}, nnUNet_preprocessed or nnUNet_results ({e})",
                              field='dataset id') from None


def server_folder(dataset_name: str) -> str:
    """Where the server keeps the merged fingerprint, the negotiated dataset.json and the plans.

    This is nnU-Net's own preprocessed dataset folder, so stock tools find the plans there."""
    return os.path.join(str(nnUNet_preprocessed), dataset_name)


def site_folder(dataset_name: str, site_name: str) -> str:
    """A site's own nnU-Net preprocessed dataset folder (plans, splits, preprocessed cases).

    On a real federation this folder lives on the site's machine; in simulation all sites share one
    disk, each under its own folder. The server's public set (:data:`SERVER_DATA`) has its folder beside the sites'
    (``sites/server/``), on the server's disk."""
    return os.path.join(server_folder(dataset_name), 'sites', site_name)


def load_json(path: str, site: Optional[str] = None, what: str = 'json') -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FederationError(f"{path} does not exist", site=site, field=what) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FederationError(f"{path} is not valid JSON ({e})", site=site, field=what) from None


@dataclass(frozen=True)
class Site:
    """One hospital: a name, the nnU-Net raw folder holding its images, and its cases: labelled training cases
    (``cases``), unlabelled ones (``unlabelled``) and labelled cases held out for validation only (``validation``)."""
    name: str
    raw_folder: str
    cases: Tuple[str, ...]
    unlabelled: Tuple[str, ...] = ()
    validation: Tuple[str, ...] = ()
    channels: Optional[Tuple[str, ...]] = None
    gpu_memory_gb: Optional[float] = None
    #: the network it trains in model-heterogeneous methods (fednnunet.planners.site_networks), None: the shared one
    network: Optional[str] = None
    _dataset_json: dict = field(default=None, repr=False, compare=False)

    @property
    def dataset_json(self) -> dict:
        """The site's own view of dataset.json (its raw folder's file)."""
        if self._dataset_json is None:
            object.__setattr__(self, '_dataset_json',
                               load_json(os.path.join(self.raw_folder, 'dataset.json'), self.name, 'dataset.json'))
        return self._dataset_json

    @property
    def channel_names(self) -> Dict[str, str]:
        dj = self.dataset_json
        if 'channel_names' in dj:
            return dj['channel_names']
        if 'modality' in dj:
            return dj['modality']
        raise FederationError("dataset.json has neither 'channel_names' nor 'modality'", site=self.name,
                              field='channel_names')

    @property
    def present_channels(self) -> List[str]:
        """The dataset.json channel indices ('0', '1', ...) this site has images of, in channel order: every channel,
        or those its sites.json ``channels`` names (a subset of dataset.json's channel names; the site's other
        channels are missing at every one of its cases)."""
        all_channels = sorted(self.channel_names, key=int)
        if self.channels is None:
            return all_channels
        index = {self.channel_names[c]: c for c in all_channels}
        if len(index) != len(all_channels):
            raise FederationError(f"dataset.json's channel names {[self.channel_names[c] for c in all_channels]} are "
                                  f"not unique, so 'channels' cannot say which ones the site has", site=self.name,
                                  field='channels')
        unknown = [n for n in self.channels if n not in index]
        if unknown or not self.channels or len(set(self.channels)) != len(self.channels):
            raise FederationError(f"'channels' {list(self.channels)[:10]} must name each of the site's channels once, "
                                  f"from dataset.json's {[self.channel_names[c] for c in all_channels]}", site=self.name,
                                  field='channels')
        return sorted((index[n] for n in self.channels), key=int)

    @property
    def missing_channels(self) -> List[str]:
        """dataset.json's channel indices this site has no images of."""
        return [c for c in sorted(self.channel_names, key=int) if c not in self.present_channels]

    @property
    def file_ending(self) -> str:
        try:
            return self.dataset_json['file_ending']
        except KeyError:
            raise FederationError("dataset.json has no 'file_ending'", site=self.name, field='file_ending') from None

    def _check_own(self, case: str, allowed: Iterable[str]):
        if case not in allowed:
            raise FederationError('this case does not belong to this site; a site only reads its own cases',
                                  site=self.name, case=case)

    @property
    def labelled(self) -> Tuple[str, ...]:
        """Every labelled case of the site: its training cases, then its validation-only cases."""
        return self.cases + self.validation

    def image_files(self, case: str) -> List[str]:
        """Paths of the case's channel files, following nnU-Net's naming (``case_XXXX.ending``)."""
        self._check_own(case, self.labelled)
        explicit = self.dataset_json.get('dataset')
        if explicit is not None:
            try:
                files = explicit[case]['images']
            except KeyError:
                raise FederationError("dataset.json's 'dataset' has no images for this case", site=self.name,
                                      case=case, field='dataset') from None
            return [self._resolve(f) for f in files]
        return [os.path.join(self.raw_folder, 'imagesTr', f'{case}_{int(c):04d}{self.file_ending}')
                for c in self.present_channels]

    def label_file(self, case: str) -> str:
        self._check_own(case, self.labelled)
        explicit = self.dataset_json.get('dataset')
        if explicit is not None:
            try:
                return self._resolve(explicit[case]['label'])
            except KeyError:
                raise FederationError("dataset.json's 'dataset' has no label for this case", site=self.name,
                                      case=case, field='dataset') from None
        return os.path.join(self.raw_folder, 'labelsTr', f'{case}{self.file_ending}')

    def unlabelled_image_files(self, case: str) -> List[str]:
        self._check_own(case, self.unlabelled)
        return [os.path.join(self.raw_folder, UNLABELLED_IMAGES_FOLDER, f'{case}_{int(c):04d}{self.file_ending}')
                for c in self.present_channels]

    def _resolve(self, path: str) -> str:
        path = os.path.expandvars(path)
        return path if os.path.isabs(path) else os.path.abspath(os.path.join(self.raw_folder, path))

    def check_files_exist(self):
        """Every file of every own case exists (no reading): a missing file names site, case and field."""
        for case in self.labelled:
            for ch, f in zip(self.present_channels, self.image_files(case)):
                if not os.path.isfile(f):
                    raise FederationError(f'image file {f} is missing', site=self.name, case=case,
                                          field=f'channel {ch} ({self.channel_names[ch]})')
            if not os.path.isfile(self.label_file(case)):
                raise FederationError(f'label file {self.label_file(case)} is missing', site=self.name, case=case,
                                      field='label')
        for case in self.unlabelled:
            for ch, f in zip(self.present_channels, self.unlabelled_image_files(case)):
                if not os.path.isfile(f):
                    raise FederationError(f'unlabelled image file {f} is missing', site=self.name, case=case,
                                          field=f'channel {ch}')


@dataclass
class Federation:
    """All sites of one dataset, as described by ``sites.json`` in the pooled raw folder; ``server``: the server's own
    labelled public set (sites.json ``server``), as a :class:`Site` named :data:`SERVER_DATA`, or None."""
    dataset_name: str
    raw_folder: str
    sites: Dict[str, Site]
    server: Optional[Site] = None

    @property
    def site_names(self) -> List[str]:
        return list(self.sites)

    @classmethod
    def from_raw(cls, dataset_name_or_id, only_sites: Optional[Sequence[str]] = None) -> 'Federation':
        dataset_name = dataset_name_from_id(dataset_name_or_id)
        raw_folder = os.path.join(str(nnUNet_raw), dataset_name)
        return cls.from_folder(raw_folder, only_sites)

    @classmethod
    def from_folder(cls, raw_folder: str, only_sites: Optional[Sequence[str]] = None) -> 'Federation':
        raw_folder = os.path.abspath(raw_folder)
        sites_file = os.path.join(raw_folder, SITES_FILE)
        if not os.path.isfile(sites_file):
            raise FederationError(f'{sites_file} is missing: a federation needs a sites.json that assigns every '
                                  f'training case to one site (documentation/data_contract.md)', field=SITES_FILE)
        spec = load_json(sites_file, what=SITES_FILE)
        sites = parse_sites(spec, raw_folder)
        federation = cls(os.path.basename(raw_folder), raw_folder, sites, parse_server_data(spec, raw_folder))
        federation.validate_assignment()
        if only_sites:
            unknown = [s for s in only_sites if s not in sites]
            if unknown:
                raise FederationError(f'unknown site(s) {unknown}; sites.json has {list(sites)}', field='--sites')
            federation.sites = {s: sites[s] for s in only_sites}
        for site in federation.sites.values():
            site.check_files_exist()
        if federation.server is not None:
            federation.server.check_files_exist()
        return federation

    def validate_assignment(self):
        """The sites.json contract: every case at exactly one site and in one of its lists, every site with a training
        case (labelled, or unlabelled for semi-supervised methods: the training check refuses an unlabelled-only site
        for the others). Reads no image: only sites.json, dataset.json and the names in the pooled labelsTr (if
        there is one). That some participant has a labelled training case is the planning's check
        (planners.negotiation.negotiate): a hospital's own sites.json over Flower lists that hospital alone, which
        may have unlabelled cases only."""
        owner: Dict[str, str] = {}
        for site in list(self.sites.values()) + ([self.server] if self.server is not None else []):
            for case in site.cases + site.unlabelled + site.validation:
                if case in owner and owner[case] != site.name:
                    raise FederationError(f"case is assigned to two sites: '{owner[case]}' and '{site.name}'",
                                          case=case, field=SITES_FILE)
                if case in owner:
                    raise FederationError('case is listed twice', site=site.name, case=case, field=SITES_FILE)
                owner[case] = site.name
            if site.name != SERVER_DATA and not site.cases and not site.unlabelled:
                raise FederationError("site has no training case: list its labelled cases as 'cases' (or, for a "
                                      "semi-supervised method, its unlabelled ones as 'unlabelled')", site=site.name,
                                      field='cases')
        pooled_labels = os.path.join(self.raw_folder, 'labelsTr')
        pooled_json = os.path.join(self.raw_folder, 'dataset.json')
        if os.path.isdir(pooled_labels) and os.path.isfile(pooled_json):
            ending = load_json(pooled_json, what='dataset.json').get('file_ending', '')
            for f in sorted(os.listdir(pooled_labels)):
                if ending and f.endswith(ending):
                    case = f[:-len(ending)]
                    if case not in owner:
                        raise FederationError('case is in labelsTr but assigned to no site in sites.json',
                                              case=case, field=SITES_FILE)


def parse_sites(spec: dict, raw_folder: str) -> Dict[str, Site]:
    if not isinstance(spec, dict) or not isinstance(spec.get('sites'), dict) or not spec['sites']:
        raise FederationError("sites.json must be an object with a non-empty 'sites' object "
                              "(site name -> {'cases': [...]})", field=SITES_FILE)
    unknown = set(spec) - {'sites', 'server'}
    if unknown:
        raise FederationError(f"unknown top-level key(s) {sorted(unknown)}; sites.json has 'sites' and, optionally, "
                              f"'server'", field=SITES_FILE)
    return {name: _parse_entry(check_site_name(name), entry, raw_folder, _SITE_KEYS) for name, entry in
            spec['sites'].items()}


def _parse_entry(name: str, entry, raw_folder: str, allowed: set) -> Site:
    """One participant's entry of sites.json (a site's, or the server's public set's) as a :class:`Site`."""
    if not isinstance(entry, dict):
        raise FederationError("the entry must be an object ({'cases': [...]})", site=name, field=SITES_FILE)
    unknown = set(entry) - allowed
    if unknown:
        raise FederationError(f'unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}', site=name,
                              field=SITES_FILE)

    def names(key: str, what: str) -> Tuple[str, ...]:
        values = entry.get(key, [])
        if not isinstance(values, list) or not all(isinstance(c, str) for c in values):
            raise FederationError(f"'{key}' must be a list of {what}", site=name, field=key)
        return tuple(values)

    channels = names('channels', 'channel names') if entry.get('channels') is not None else None
    memory = check_gpu_memory(entry.get('gpu_memory_gb'), name)
    folder = entry.get('raw_folder', raw_folder)
    if not isinstance(folder, str):
        raise FederationError("'raw_folder' must be a path", site=name, field='raw_folder')
    if not os.path.isabs(folder):
        folder = os.path.join(raw_folder, folder)
    return Site(name=name, raw_folder=os.path.abspath(folder), cases=tuple(sorted(names('cases', 'case identifiers'))),
                unlabelled=tuple(sorted(names('unlabelled', 'case identifiers'))),
                validation=tuple(sorted(names('validation', 'case identifiers'))), channels=channels,
                gpu_memory_gb=float(memory) if memory is not None else None,
                network=check_network(entry.get('network'), name))


def check_gpu_memory(memory, participant: Optional[str]) -> Optional[float]:
    """A declared device memory (sites.json, or a site's description): None, or a positive number of GB."""
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or
                               not 0 < memory < 1e6):
        raise FederationError(f'gpu_memory_gb {repr(memory)[:40]} is not a memory size in GB (a positive number)',
                              site=participant, field='gpu_memory_gb')
    return memory


def check_site_name(name) -> str:
    """A site's name: letters, digits, ``_ . -`` (it names folders), and not the server's (:data:`SERVER_DATA`)."""
    if not isinstance(name, str) or len(name) > 100 or not _SITE_NAME.match(name):
        raise FederationError('site names may hold letters, digits, _ . - only (at most 100 characters)',
                              site=str(name)[:100], field='name')
    if name == SERVER_DATA:
        raise FederationError(f"'{SERVER_DATA}' is the name of the server's public set (sites.json 'server'); a site "
                              f"needs another name", site=name, field='name')
    return name


def parse_server_data(spec: dict, raw_folder: str) -> Optional[Site]:
    """sites.json ``server``: the server's own labelled public set ({'cases': [...], 'raw_folder': ...,
    'gpu_memory_gb': ..., 'network': ...}), files laid out as a site's (imagesTr, labelsTr); None without it."""
    entry = spec.get('server') if isinstance(spec, dict) else None
    if entry is None:
        return None
    site = _parse_entry(SERVER_DATA, entry, raw_folder, _SERVER_KEYS)
    if not site.cases:
        raise FederationError("'cases' must be a non-empty list of the public set's labelled case identifiers",
                              site=SERVER_DATA, field='cases')
    if len(set(site.cases)) != len(site.cases):
        twice = sorted({c for c in site.cases if site.cases.count(c) > 1})
        raise FederationError('case is listed twice', site=SERVER_DATA, case=twice[0], field='cases')
    return site


def write_sites_json(raw_folder: str, assignment: Dict[str, dict], server: Optional[dict] = None):
    """Writes sites.json ({site: {'cases': [...], ...}}, and the server's public set if given)."""
    spec = {'sites': assignment}
    if server is not None:
        spec['server'] = server
    with open(os.path.join(raw_folder, SITES_FILE), 'w') as f:
        json.dump(spec, f, indent=2)
