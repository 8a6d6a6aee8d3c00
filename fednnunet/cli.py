"""Command-line entry points, following nnU-Net's conventions (-d -c -pl -np ...)."""
import argparse
import os
import sys
import time

from fednnunet.errors import FederationError


def _fail(e: Exception):
    print(f'fednnunet: error: {e}', file=sys.stderr)
    sys.exit(2)


def _default_num_processes() -> int:
    from nnunetv2.configuration import default_num_processes
    return default_num_processes


def plan_and_preprocess_entry(argv=None):
    parser = argparse.ArgumentParser(
        prog='fednnunet_plan_and_preprocess',
        description='Federated nnU-Net planning: every site fingerprints its own cases, the server merges the '
                    'fingerprints exactly and runs nnU-Net\'s planner once, every site preprocesses locally.')
    parser.add_argument('-d', nargs='+', required=True, help='dataset id(s) or name(s), as for nnU-Net')
    parser.add_argument('-c', nargs='+', default=['2d', '3d_fullres', '3d_lowres'],
                        help='configurations to preprocess (default: 2d 3d_fullres 3d_lowres; missing ones are '
                             'skipped as nnU-Net does)')
    parser.add_argument('-pl', default='ExperimentPlanner',
                        help="experiment planner: nnU-Net's (ExperimentPlanner, nnUNetPlannerResEncM/L/XL, ...) or "
                             "fednnunet's CPU preset (nnUNetPlannerCPU)")
    parser.add_argument('--sites', nargs='+', default=None, help='only these sites of sites.json (default: all)')
    parser.add_argument('-np', type=int, default=None,
                        help='processes per site for fingerprinting and preprocessing (default: nnU-Net\'s)')
    parser.add_argument('-gpu_memory_target', type=float, default=None,
                        help='cap on device memory in GB; the plan uses min(this, every site\'s gpu_memory_gb)')
    parser.add_argument('-overwrite_plans_name', default=None)
    parser.add_argument('-overwrite_target_spacing', nargs='+', type=float, default=None)
    parser.add_argument('--no_pp', action='store_true', help='plan only, do not preprocess')
    args = parser.parse_args(argv)

    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    from fednnunet.plan_and_preprocess import plan_and_preprocess

    num_processes = args.np if args.np is not None else _default_num_processes()
    try:
        for d in args.d:
            federation = Federation.from_raw(d, args.sites)
            engine = SimulationEngine.for_federation(federation, num_processes)
            t0 = time.time()
            summary = plan_and_preprocess(engine, federation.dataset_name, args.c, args.pl, args.gpu_memory_target,
                                          args.overwrite_plans_name, args.overwrite_target_spacing,
                                          preprocess=not args.no_pp)
            print(f"{federation.dataset_name}: plans '{summary['plans_identifier']}' negotiated by "
                  f"{len(summary['sites'])} sites in {time.time() - t0:.1f} s "
                  f"(order-statistic rounds: {summary['order_statistic_rounds']})")
    except FederationError as e:
        _fail(e)


def demo_data_entry(argv=None):
    parser = argparse.ArgumentParser(prog='fednnunet_demo_data',
                                     description='Builds the demo federation (brain tissue, MNI152 anatomy from '
                                                 'nilearn, simulated scanners per site) as an nnU-Net raw dataset.')
    parser.add_argument('-d', type=int, default=None, help='dataset id (default 501)')
    parser.add_argument('--size', type=int, default=64, help='voxels along the longest axis (default 64)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--test-sites', action='store_true', help='the small 3-site federation used by the tests')
    parser.add_argument('--overwrite', action='store_true')
    args = parser.parse_args(argv)
    from fednnunet import demo
    sites = demo.TEST_SITES if args.test_sites else demo.DEFAULT_SITES
    folder = demo.build_demo_federation(args.d if args.d is not None else demo.DEMO_DATASET_ID, size=args.size,
                                        seed=args.seed, sites=sites, overwrite=args.overwrite)
    print(f'demo federation written to {folder}')


def _ensure_nnunet_paths(workdir: str):
    """The demo works out of the box: nnU-Net's three folders default to <workdir>/nnUNet_*."""
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        if not os.environ.get(var):
            os.environ[var] = os.path.join(os.path.abspath(workdir), var)
        os.makedirs(os.environ[var], exist_ok=True)


def demo_entry(argv=None):
    parser = argparse.ArgumentParser(prog='fednnunet_demo',
                                     description='The whole path on the bundled demo federation: build the data, '
                                                 'negotiate plans (CPU preset) and preprocess at every site.')
    parser.add_argument('--workdir', default='demo_workdir',
                        help='where nnUNet_raw/preprocessed/results go unless those variables are set')
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('-np', type=int, default=2)
    args = parser.parse_args(argv)
    _ensure_nnunet_paths(args.workdir)

    from fednnunet import demo
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    from fednnunet.plan_and_preprocess import plan_and_preprocess

    t0 = time.time()
    try:
        folder = demo.build_demo_federation(demo.DEMO_DATASET_ID, size=args.size, seed=args.seed, overwrite=True)
        print(f'[demo] federation written to {folder} ({time.time() - t0:.1f} s)')
        federation = Federation.from_folder(folder)
        engine = SimulationEngine.for_federation(federation, args.np)
        summary = plan_and_preprocess(engine, federation.dataset_name, ['2d', '3d_fullres'], 'nnUNetPlannerCPU')
    except FederationError as e:
        _fail(e)
    print(f"[demo] plans '{summary['plans_identifier']}' negotiated by sites {list(summary['sites'])}; "
          f"preprocessed {summary['preprocessed']}; total {time.time() - t0:.1f} s")
