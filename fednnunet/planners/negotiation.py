"""Plan negotiation: sites describe themselves, the server checks they agree and runs nnU-Net's planner.

The server holds no images. nnU-Net's ``ExperimentPlanner`` (and every subclass: ResEnc presets, the
CPU preset) plans from ``dataset_fingerprint.json`` and ``dataset.json`` alone, except that it looks
at the raw folder for three things: ``dataset.json``, the training file list (only to open one example
image for the reader/writer) and an optional ``splits_final.json``. The server therefore runs the
unmodified planner against a data-free stand-in raw folder, and answers the reader/writer question with
the class every site found for its own files.
"""
import contextlib
import json
import os
import tempfile
from typing import List, Optional, Sequence, Tuple, Type

import nnunetv2
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                     recursive_find_reader_writer_by_name)
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

import fednnunet
from fednnunet.errors import FederationError
from fednnunet.federation import Site, check_gpu_memory, server_folder
from fednnunet.jsonio import write_json
from fednnunet.planners.site_networks import check_network

# What every site must agree on. A mismatch names the site and the field.
AGREED_FIELDS = ('fednnunet_version', 'nnunetv2_version', 'labels', 'channel_names', 'file_ending',
                 'regions_class_order', 'reader_writer')
NNUNET_DEFAULT_GPU_MEMORY_GB = 8.0
#: the most cases a site may declare of each kind (a count beyond it is not a count a site can hold)
MAX_CASES_PER_SITE = 10 ** 7


def describe_site(site: Site) -> dict:
    """What a site tells the server before planning: its dataset.json view, reader and constraints."""
    dj = site.dataset_json
    if site.labelled:
        first_case = site.labelled[0]
        example = site.image_files(first_case)[0]
    else:  # a site with unlabelled cases only
        first_case = site.unlabelled[0]
        example = site.unlabelled_image_files(first_case)[0]
    try:
        reader = determine_reader_writer_from_dataset_json(dj, example, verbose=False)
    except RuntimeError as e:
        raise FederationError(f'no nnU-Net reader can open {example} ({e})', site=site.name, case=first_case,
                              field='images') from None
    declared = dict(dj)
    declared.pop('dataset', None)  # explicit file paths are the site's own business
    return {
        'site': site.name,
        'fednnunet_version': fednnunet.__version__,
        'nnunetv2_version': nnunetv2_version(),
        'num_cases': len(site.cases),
        'num_unlabelled': len(site.unlabelled),
        'num_validation': len(site.validation),
        'labels': dj.get('labels'),
        'channel_names': site.channel_names,
        'declared_channels': ([site.channel_names[c] for c in site.present_channels] if site.channels is not None
                              else None),
        'file_ending': site.file_ending,
        'regions_class_order': dj.get('regions_class_order'),
        'reader_writer': reader.__name__,
        'gpu_memory_gb': site.gpu_memory_gb,
        'network': site.network,
        'dataset_json': declared,
    }


def nnunetv2_version() -> str:
    from importlib.metadata import version
    return version('nnunetv2')


def negotiate(descriptions: Sequence[dict], gpu_memory_gb: Optional[float] = None) -> dict:
    """Checks that all sites agree; returns the negotiated dataset.json and constraints.

    The plan uses the smallest device memory any site declares (and the command line's, if given)."""
    if not descriptions:
        raise FederationError('no site to plan for')
    for d in descriptions:
        for f in ('num_cases', 'num_unlabelled', 'num_validation'):
            n = d.get(f, 0)
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_CASES_PER_SITE:
                raise FederationError(f'{f} {repr(n)[:40]} is not a count of cases', site=d.get('site'), field=f)
    for d in descriptions:
        check_gpu_memory(d.get('gpu_memory_gb'), d.get('site'))
        check_network(d.get('network'), d.get('site'))
    ref = descriptions[0]
    for d in descriptions[1:]:
        for f in AGREED_FIELDS:
            if d[f] != ref[f]:
                raise FederationError(f"{d[f]!r} differs from site '{ref['site']}' ({ref[f]!r}); all sites must "
                                      f"agree on {f}", site=d['site'], field=f)
    channel_list = [ref['channel_names'][k] for k in sorted(ref['channel_names'], key=int)]
    if not any(d['num_cases'] for d in descriptions):
        raise FederationError('no site has a labelled training case; nnU-Net plans from labelled cases, so at least '
                              'one site needs some', field='cases')
    present = {d['site']: site_channels(d, channel_list) for d in descriptions}
    for i, name in enumerate(channel_list):
        if not any(name in present[d['site']] for d in descriptions if d['num_cases']):
            raise FederationError(f"channel {i} ({name}) is at no participant with a labelled training case: its "
                                  f"intensities cannot be fingerprinted, so nnU-Net cannot normalise it",
                                  field='channels')
    declared_memory = [d['gpu_memory_gb'] for d in descriptions if d['gpu_memory_gb'] is not None]
    if gpu_memory_gb is not None:
        declared_memory.append(gpu_memory_gb)
    memory = min(declared_memory) if declared_memory else None
    dataset_json = dict(ref['dataset_json'])
    dataset_json['numTraining'] = int(sum(d['num_cases'] for d in descriptions))
    index = {name: k for k, name in ref['channel_names'].items()}
    return {
        'dataset_json': dataset_json,
        # {participant: the dataset.json channel indices it has}
        'site_channels': {s: [index[n] for n in names] for s, names in present.items()},
        'reader_writer': ref['reader_writer'],
        'gpu_memory_target_gb': memory,
        'sites': {d['site']: {'num_cases': d['num_cases'], 'num_unlabelled': d.get('num_unlabelled', 0),
                              'num_validation': d.get('num_validation', 0), 'gpu_memory_gb': d['gpu_memory_gb'],
                              **({'network': d['network']} if d.get('network') is not None else {}),
                              **({'channels': present[d['site']]} if present[d['site']] != channel_list else {})}
                  for d in descriptions},
    }


def site_channels(description: dict, channel_list: List[str]) -> List[str]:
    """The channel names a participant's description declares it has (a subset of dataset.json's, in its order;
    every channel if it declares none). A description is data from the network: checked here."""
    declared = description.get('declared_channels')
    if declared is None:
        return list(channel_list)
    if len(set(channel_list)) != len(channel_list):
        raise FederationError(f"declares channels, but dataset.json's channel names {channel_list} are not unique",
                              site=description.get('site'), field='channels')
    if not isinstance(declared, list) or not declared or len(declared) > len(channel_list) or \
            not all(isinstance(n, str) and n in channel_list for n in declared) or len(set(declared)) != len(declared):
        raise FederationError(f"declares channels {str(declared)[:200]}; a site's channels are some of dataset.json's "
                              f"{channel_list}, each once", site=description.get('site'), field='channels')
    return [n for n in channel_list if n in declared]


def find_planner_class(name: str) -> Type[ExperimentPlanner]:
    """``-pl NAME``: nnU-Net's planners first (as nnUNetv2_plan_experiment does), then fednnunet's."""
    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], 'experiment_planning'), name,
                                      current_module='nnunetv2.experiment_planning')
    if cls is None:
        cls = recursive_find_python_class(os.path.join(fednnunet.__path__[0], 'planners'), name,
                                          current_module='fednnunet.planners')
    if cls is None:
        raise FederationError(f'no experiment planner named {name!r} in nnunetv2.experiment_planning or '
                              f'fednnunet.planners', field='-pl')
    return cls


def federated_planner_class(base: Type[ExperimentPlanner], reader_writer: str) -> Type[ExperimentPlanner]:
    """``base`` unchanged except that the reader/writer is the one all sites use (no image is opened).

    The subclass keeps the base's name, so plans.json records the planner that did the planning."""

    def determine_reader_writer(self):
        return recursive_find_reader_writer_by_name(reader_writer)

    return type(base.__name__, (base,), {'determine_reader_writer': determine_reader_writer,
                                         '__module__': __name__, '__doc__': base.__doc__})


@contextlib.contextmanager
def data_free_raw_dataset(dataset_name: str, dataset_json: dict):
    """Points nnUNet_raw at a stand-in holding only the negotiated dataset.json, for as long as the
    planner runs. Its ``dataset`` entry is empty, so nnU-Net lists no image folder.

    Also: nnU-Net 2.8.1's memory estimate calls ``torch.set_num_threads(get_allowed_n_proc_DA())``, which
    crashes under ``nnUNet_n_proc_DA=0`` (single-threaded augmentation, as tests use); planning runs with
    at least one thread."""
    previous = os.environ.get('nnUNet_raw')
    previous_da = os.environ.get('nnUNet_n_proc_DA')
    if previous_da is not None and previous_da.strip() == '0':
        os.environ['nnUNet_n_proc_DA'] = '1'
    with tempfile.TemporaryDirectory(prefix='fednnunet_planning_') as root:
        folder = os.path.join(root, dataset_name)
        os.makedirs(folder)
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump({**dataset_json, 'dataset': {}}, f)
        os.environ['nnUNet_raw'] = root
        try:
            yield
        finally:
            for var, value in (('nnUNet_raw', previous), ('nnUNet_n_proc_DA', previous_da)):
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value


def plan_federation(dataset_name: str, negotiation: dict, fingerprint: dict, planner_name: str = 'ExperimentPlanner',
                    plans_name: Optional[str] = None, overwrite_target_spacing: Optional[List[float]] = None,
                    preprocessor_name: str = 'DefaultPreprocessor') -> Tuple[dict, str]:
    """Runs nnU-Net's planner on the merged fingerprint. Writes, in the server's nnU-Net preprocessed folder,
    dataset_fingerprint.json, dataset.json and the plans; returns (plans, plans identifier)."""
    out = server_folder(dataset_name)
    planner = federated_planner_class(find_planner_class(planner_name), negotiation['reader_writer'])
    os.makedirs(out, exist_ok=True)
    fingerprint_file = os.path.join(out, 'dataset_fingerprint.json')
    write_json(fingerprint_file, fingerprint)  # nnU-Net's planner reads it from there
    try:
        with data_free_raw_dataset(dataset_name, negotiation['dataset_json']):
            plans, plans_identifier = plan_experiment_dataset(dataset_name, planner,
                                                              negotiation['gpu_memory_target_gb'], preprocessor_name,
                                                              overwrite_target_spacing, plans_name)
    except BaseException:
        os.remove(fingerprint_file)  # no server output that looks like a finished planning
        raise
    # the planner copied the stand-in dataset.json; the negotiated one is the real contract
    write_json(os.path.join(out, 'dataset.json'), negotiation['dataset_json'])
    return plans, plans_identifier
