"""The server's side of ``fednnunet_plan_and_preprocess``: describe -> fingerprint -> plan -> preprocess.

Each phase is a round of plain-data messages through an engine (in-process simulation or Flower):

1. ``describe``: every site reports its dataset.json view, reader/writer, case count and device memory;
   the server checks they agree (:func:`fednnunet.planners.negotiation.negotiate`).
2. ``fingerprint``: every site runs nnU-Net's per-case analysis with the pooled per-case sample budget
   and returns moments and per-case geometry.
3. ``count_leq`` (a few rounds): the exact federated order-statistic search for median/percentiles;
   then ``release_fingerprint``: sites delete their private sample.
4. The server runs nnU-Net's planner on the merged fingerprint (no images) -> one plans.json.
5. ``preprocess``: every site preprocesses its own cases with those plans.

Nothing is written on the server before every site's fingerprint has arrived, so bad input at any site
stops the run with that site's error and no server output.
"""
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from fednnunet.federation import server_folder
from fednnunet.fingerprint import check_site_fingerprint, merge_site_fingerprints, samples_per_case
from fednnunet.jsonio import write_json
from fednnunet.log_lines import stamped
from fednnunet.parallel import close_pool
from fednnunet.planners.negotiation import negotiate, plan_federation
from fednnunet.planners.site_networks import add_site_networks
from fednnunet.wire import Message

NNUNET_DEFAULT_CONFIGURATIONS = ('2d', '3d_fullres', '3d_lowres')


def ask_every_site(engine, message: Message) -> Dict[str, Message]:
    """Planning needs every site: a site that does not answer stops the run, named."""
    replies = engine.ask_all(message)
    if engine.missing:
        raise RuntimeError(f'{message.kind}: no reply from site(s) ' +
                           ', '.join(f"'{s}' ({why})" for s, why in sorted(engine.missing.items())))
    return replies


def ask_sites(engine, requests: Dict[str, Message]) -> Dict[str, Message]:
    """As ask_every_site, with a message of its own for each site."""
    replies = engine.ask(requests)
    if engine.missing:
        raise RuntimeError(f'{next(iter(requests.values())).kind}: no reply from site(s) ' +
                           ', '.join(f"'{s}' ({why})" for s, why in sorted(engine.missing.items())))
    return replies


def discard_site_fingerprints(engine):
    """After a failed planning: every site deletes its fingerprint and its private intensity sample (best effort: a
    site that cannot be reached keeps its files, and says so in its own log when it is asked next)."""
    try:
        engine.ask_all(Message('release_fingerprint', {'discard': True}))
    except Exception:  # noqa: BLE001 - the planning's own error is the one to report
        pass


def say(text: str):
    """The planning's progress, one timestamped line per phase (the server's log reads as it goes)."""
    print(stamped(text), flush=True)


def federated_fingerprint(engine, gpu_memory_gb: Optional[float] = None, log: Callable[[str], None] = say) -> dict:
    """Phases 1-3. Returns {'negotiation', 'fingerprint', 'site_fingerprints', 'count_rounds'}."""
    t0 = time.time()
    descriptions = ask_every_site(engine, Message('describe'))
    # a description names its site as the engine knows it (a site cannot speak for another, or for the server)
    negotiation = negotiate([{**descriptions[s].config, 'site': s} for s in engine.site_names], gpu_memory_gb)
    n_total = negotiation['dataset_json']['numTraining']
    log(f'planning: {len(descriptions)} site(s) agree on the dataset ({n_total} cases in all); every site '
        f'fingerprints its own cases')
    request = Message('fingerprint', {'reader_writer': negotiation['reader_writer'],
                                      'num_samples_per_case': samples_per_case(n_total)})
    fingerprints = ask_every_site(engine, request)
    # a site is asked about the channels it has (sites.json 'channels'), and knows nothing of the others
    site_channels = negotiation['site_channels']
    site_fps = [check_site_fingerprint(r.config, s, site_channels[s], negotiation['sites'][s]['num_cases'])
                for s, r in fingerprints.items()]
    log(f'planning: every site fingerprinted its cases ({time.time() - t0:.1f} s into planning); merging the '
        f'intensity statistics (exact order statistics by count queries)')

    rounds = {'n': 0}

    def count_leq(thresholds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        rounds['n'] += 1
        replies = ask_sites(engine, {s: Message('count_leq', arrays={c: t for c, t in thresholds.items() if c in own})
                                     for s, own in site_channels.items()})
        return {c: sum(r.arrays[c] for s, r in replies.items() if c in site_channels[s]) for c in thresholds}

    fingerprint = merge_site_fingerprints(site_fps, count_leq)
    ask_every_site(engine, Message('release_fingerprint'))
    log(f"planning: fingerprint merged ({rounds['n']} count rounds, {time.time() - t0:.1f} s in all)")
    return {'negotiation': negotiation, 'fingerprint': fingerprint, 'site_fingerprints': site_fps,
            'count_rounds': rounds['n']}


def plan_and_preprocess(engine, dataset_name: str, configurations: Sequence[str] = NNUNET_DEFAULT_CONFIGURATIONS,
                        planner_name: str = 'ExperimentPlanner', gpu_memory_gb: Optional[float] = None,
                        plans_name: Optional[str] = None, overwrite_target_spacing: Optional[List[float]] = None,
                        preprocess: bool = True, log: Callable[[str], None] = say) -> dict:
    """Runs all phases; returns a summary that is also written to <server folder>/federation/negotiation_<plans>.json."""
    t0 = time.time()
    try:
        fp = federated_fingerprint(engine, gpu_memory_gb, log)
        t_fingerprint = time.time() - t0
        log(f'planning: {planner_name} plans the merged fingerprint')
        plans, plans_identifier = plan_federation(dataset_name, fp['negotiation'], fp['fingerprint'], planner_name,
                                                  plans_name, overwrite_target_spacing)
    except BaseException:
        discard_site_fingerprints(engine)  # nothing of a failed planning stays at the sites
        raise
    t_plan = time.time() - t0 - t_fingerprint
    log(f"planning: plans '{plans_identifier}' written ({t_plan:.1f} s)")
    plans_file = os.path.join(server_folder(dataset_name), plans_identifier + '.json')
    with open(plans_file) as f:
        plans = json.load(f)  # exactly what nnU-Net wrote, JSON-clean
    networks = None
    wishes = {s: {'network': d.get('network'), 'gpu_memory_gb': d.get('gpu_memory_gb')}
              for s, d in fp['negotiation']['sites'].items()}
    if any(w['network'] is not None for w in wishes.values()):
        # per-site networks: one configuration per capacity, inheriting from the negotiated one (nnU-Net's format)
        plans, networks = add_site_networks(plans, fp['negotiation']['dataset_json'], wishes)
        write_json(plans_file, plans, indent=4)
        log('planning: per-site networks: ' + '; '.join(
            f"{s} {', '.join(sorted(set(c.values())))}" for s, c in sorted(networks.items())))

    summary = {
        'dataset_name': dataset_name, 'planner': planner_name, 'plans_identifier': plans_identifier,
        'sites': fp['negotiation']['sites'], 'gpu_memory_target_gb': fp['negotiation']['gpu_memory_target_gb'],
        'reader_writer': fp['negotiation']['reader_writer'], 'order_statistic_rounds': fp['count_rounds'],
        'seconds': {'fingerprint': t_fingerprint, 'plan': t_plan}, 'preprocessed': {},
        'networks': networks,
    }
    if preprocess:
        wanted = [c for c in configurations if c in plans['configurations']]
        for c in configurations:
            if c not in wanted:
                print(f'INFO: configuration {c} is not in the plans {plans_identifier}; skipping it (as nnU-Net does).')
        t1 = time.time()
        log(f"preprocessing: every site preprocesses {', '.join(wanted) or 'nothing'} with plans '{plans_identifier}'")
        reports = ask_every_site(engine, Message('preprocess', {'plans': plans, 'dataset_json': fp['negotiation']['dataset_json'],
                                                        'configurations': wanted}))
        summary['seconds']['preprocess'] = time.time() - t1
        log(f"preprocessing: done at every site ({summary['seconds']['preprocess']:.1f} s)")
        summary['preprocessed'] = {c: sorted(reports) for c in wanted}
    write_json(os.path.join(server_folder(dataset_name), 'federation', f'negotiation_{plans_identifier}.json'), summary,
               indent=2)
    close_pool()  # simulated sites share this process's pool of workers; a planning's work ends here
    return summary
