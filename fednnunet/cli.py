"""Command-line entry points, following nnU-Net's conventions (-d -c -pl -np ...)."""
import argparse
import os
import sys
import time

from fednnunet.errors import FederationError
from fednnunet.method_options import add_method_arguments, check_hyperparameters, hyperparameters_from_args


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


def _add_federation_args(parser):
    parser.add_argument('--sites', nargs='+', default=None, help='only these sites of sites.json (default: all)')
    parser.add_argument('-device', default='cuda', choices=['cuda', 'cpu', 'mps'],
                        help="as nnU-Net's; without CUDA fednnunet falls back to the CPU with a notice")
    parser.add_argument('-np', type=int, default=1,
                        help='processes per site for prediction/export (default 1: in-process)')
    parser.add_argument('--verbose', action='store_true', help="show the sites' nnU-Net logs on the console")


def _add_model_args(parser):
    """Which trained model: nnU-Net's -d -c -f -p -chk, and the method that trained it."""
    parser.add_argument('-d', required=True, help='dataset id or name')
    parser.add_argument('-c', required=True, help='configuration')
    parser.add_argument('-f', default='0', help='fold (default 0)')
    parser.add_argument('--method', default='fedavg', help='the method that trained the model (default fedavg)')
    parser.add_argument('-p', default='nnUNetPlans', help='plans identifier')
    parser.add_argument('-chk', default='checkpoint_final.pth', help='checkpoint name')


def _trained_by(method: str):
    """(trainer class, whether the method has a global model) for a method name, centralized included."""
    from fednnunet.methods import CENTRALIZED, get_method
    from fednnunet.trainers.centralized import CentralizedTrainer
    if method == CENTRALIZED:
        return CentralizedTrainer, True
    m = get_method(method)
    return m.trainer, m.has_global_model


def _fold(value: str):
    return value if value == 'all' else int(value)


def train_entry(argv=None):
    from fednnunet.methods import CENTRALIZED, METHODS, PLANNED
    parser = argparse.ArgumentParser(
        prog='fednnunet_train',
        description='Federated nnU-Net training: rounds of nnU-Net epochs at every site, merged by the method\'s '
                    'strategy. Results go to nnU-Net\'s layout under nnUNet_results.')
    parser.add_argument('dataset_name_or_id')
    parser.add_argument('configuration', help='e.g. 3d_fullres, 2d')
    parser.add_argument('fold', nargs='?', default='0', help='0-4 or all (default 0)')
    parser.add_argument('--method', default='fedavg', help=f'one of {sorted(METHODS) + [CENTRALIZED]} '
                                                           f'(planned: {sorted(PLANNED)})')
    parser.add_argument('-p', default='nnUNetPlans', help='plans identifier (default nnUNetPlans; the demo uses '
                                                          'nnUNetCPUPlans)')
    parser.add_argument('--rounds', type=int, default=1000, help="federated rounds (nnU-Net's epochs; default 1000)")
    parser.add_argument('--local-iterations', type=int, default=250,
                        help="nnU-Net iterations per site and round (nnU-Net's epoch; default 250)")
    parser.add_argument('--val-iterations', type=int, default=50,
                        help="nnU-Net validation iterations per site and round (default 50)")
    parser.add_argument('--seed', type=int, default=12345)
    parser.add_argument('--continue', dest='continue_training', action='store_true',
                        help='resume from the last round checkpoint')
    add_method_arguments(parser)
    parser.add_argument('--state-in-memory', action='store_true',
                        help="simulation: keep sites' states between rounds in memory instead of on disk "
                             "(--continue then needs a run that kept them on disk)")
    parser.add_argument('--no-val', action='store_true', help='skip the final validation at every site')
    _add_federation_args(parser)
    args = parser.parse_args(argv)

    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.evaluation import format_table
    from fednnunet.federation import Federation

    try:
        hyperparameters = hyperparameters_from_args(args)
    except ValueError as e:
        _fail(e)
    try:
        federation = Federation.from_raw(args.dataset_name_or_id, args.sites)
        engine = SimulationEngine.for_federation(federation, args.np, device=args.device,
                                                 state_in_memory=args.state_in_memory, verbose=args.verbose)
        if args.method == CENTRALIZED:
            if hyperparameters:
                raise FederationError(f'{sorted(hyperparameters)} do not apply to --method centralized')
            result = run_centralized(engine, federation, args)
        else:
            check_hyperparameters(args.method, hyperparameters)
            from fednnunet.training_server import FederatedTraining, TrainingConfig
            config = TrainingConfig(federation.dataset_name, args.configuration, _fold(args.fold), args.method, args.p,
                                    args.rounds, args.local_iterations, args.val_iterations, args.seed,
                                    hyperparameters, {'weighting': args.weighting}, validate=not args.no_val)
            result = FederatedTraining(engine, config).run(continue_training=args.continue_training)
    except (FederationError, NotImplementedError, ValueError, FileNotFoundError) as e:
        _fail(e)
    print(f"results: {result['results_folder']}")
    if result.get('final_validation'):
        print(format_table(result['final_validation'], f"{args.method}: final validation, fold {args.fold}"))


def run_centralized(engine, federation, args) -> dict:
    """The pooled baseline, then every site measures the model on its own validation cases."""
    from fednnunet.centralized import train_centralized
    from fednnunet.evaluation import pooled_summary
    from fednnunet.site_training import resolve_device, results_folder
    from fednnunet.trainers.centralized import CentralizedTrainer
    from fednnunet.wire import Message
    trainer = train_centralized(federation.dataset_name, federation.site_names, args.configuration, _fold(args.fold),
                                args.p, args.rounds, args.local_iterations, args.val_iterations, args.seed,
                                resolve_device(args.device), args.continue_training)
    result = {'method': 'centralized', 'results_folder': trainer.output_folder_base, 'final_validation': None}
    if not args.no_val:
        replies = engine.ask_all(Message('evaluate', {
            'results_folder_name': os.path.basename(results_folder(federation.dataset_name, CentralizedTrainer, args.p,
                                                                  args.configuration)),
            'model': 'global', 'checkpoint': 'checkpoint_final.pth', 'fold': _fold(args.fold)}))
        result['final_validation'] = pooled_summary({s: r.config['summary'] for s, r in replies.items()})
    return result


def evaluate_entry(argv=None):
    parser = argparse.ArgumentParser(
        prog='fednnunet_evaluate',
        description='Every site predicts its own validation cases with the trained model and measures them '
                    '(nnU-Net\'s metrics + HD95); prints per-site Dice/HD95 and the pooled Dice (exact, from summed '
                    'TP/FP/FN) and writes them to JSON.')
    _add_model_args(parser)
    parser.add_argument('--model', choices=['auto', 'global', 'site'], default='auto',
                        help="global: the merged model; site: each site's personalized model; auto: global where the "
                             "method has one, else site")
    parser.add_argument('-o', default=None, help='JSON output file (default: in the results fold folder)')
    _add_federation_args(parser)
    args = parser.parse_args(argv)

    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.evaluation import format_table, pooled_summary
    from fednnunet.federation import Federation
    from fednnunet.jsonio import write_json
    from fednnunet.site_training import results_folder
    from fednnunet.wire import Message

    try:
        federation = Federation.from_raw(args.d, args.sites)
        trainer_class, has_global = _trained_by(args.method)
        model = args.model if args.model != 'auto' else ('global' if has_global else 'site')
        if model == 'global' and not has_global:
            raise FederationError(f'{args.method} keeps parts of the model at the sites and has no global model; '
                                  f'use --model site', field='--model')
        engine = SimulationEngine.for_federation(federation, args.np, device=args.device, verbose=args.verbose)
        base = results_folder(federation.dataset_name, trainer_class, args.p, args.c)
        replies = engine.ask_all(Message('evaluate', {
            'results_folder_name': os.path.basename(base), 'model': model, 'checkpoint': args.chk,
            'fold': _fold(args.f)}))
    except (FederationError, NotImplementedError, ValueError) as e:
        _fail(e)
    pooled = pooled_summary({s: r.config['summary'] for s, r in replies.items()})
    out = args.o or os.path.join(base, f'fold_{args.f}', f'evaluation_{model}_{os.path.splitext(args.chk)[0]}.json')
    write_json(out, {'method': args.method, 'model': model, 'checkpoint': args.chk, **pooled})
    print(format_table(pooled, f'{args.method} ({model} model, {args.chk}), fold {args.f}'))
    print(f'written to {out}')


def predict_entry(argv=None):
    parser = argparse.ArgumentParser(
        prog='fednnunet_predict',
        description="Predicts new scans with nnU-Net's predictor and a federated model: the global model, or with "
                    "--site a site's personalized model (its local layers loaded).")
    parser.add_argument('-i', required=True, help='input folder (nnU-Net naming: CASE_XXXX.ending)')
    parser.add_argument('-o', required=True, help='output folder')
    _add_model_args(parser)
    parser.add_argument('--site', default=None, help="use this site's personalized model")
    parser.add_argument('-device', default='cuda', choices=['cuda', 'cpu', 'mps'])
    parser.add_argument('-npp', type=int, default=0, help='processes for pre/postprocessing (0: in-process)')
    parser.add_argument('--disable_tta', action='store_true', help='no mirroring at test time (as nnU-Net)')
    parser.add_argument('--save_probabilities', action='store_true')
    args = parser.parse_args(argv)

    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from fednnunet.federation import dataset_name_from_id
    from fednnunet.inference import load_predictor, predict_cases
    from fednnunet.site_training import resolve_device, results_folder

    try:
        dataset_name = dataset_name_from_id(args.d)
        trainer_class, has_global = _trained_by(args.method)
        base = results_folder(dataset_name, trainer_class, args.p, args.c)
        if args.site is None and not has_global:
            raise FederationError(f'{args.method} keeps parts of the model at the sites; choose a site\'s '
                                  f'personalized model with --site', field='--site')
        model_folder = os.path.join(base, 'sites', args.site) if args.site else base
        predictor = load_predictor(model_folder, _fold(args.f), args.chk, resolve_device(args.device),
                                   use_mirroring=not args.disable_tta, allow_tqdm=True)
        ending = predictor.dataset_json['file_ending']
        lists = create_lists_from_splitted_dataset_folder(args.i, ending)
        if not lists:
            raise FederationError(f'no image named CASE_XXXX{ending} in {args.i}', field='-i')
        cases = [os.path.basename(files[0])[:-len(ending) - 5] for files in lists]
        predict_cases(predictor, lists, [os.path.join(args.o, c) for c in cases], args.npp, args.save_probabilities)
    except (FederationError, NotImplementedError, ValueError) as e:
        _fail(e)
    print(f'{len(cases)} case(s) predicted into {args.o}')


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
                                                 'negotiate plans (CPU preset), preprocess at every site, train '
                                                 'federated rounds, predict every site\'s validation cases and print '
                                                 'the per-site Dice table.')
    parser.add_argument('--workdir', default='demo_workdir',
                        help='where nnUNet_raw/preprocessed/results go unless those variables are set')
    parser.add_argument('--size', type=int, default=64, help='voxels along the longest axis (default 64)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the demo data')
    parser.add_argument('-c', default='3d_fullres', help='configuration to train (default 3d_fullres)')
    parser.add_argument('--methods', nargs='+', default=['fedavg'],
                        help='methods to train and compare (default fedavg; e.g. local fedavg centralized)')
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--local-iterations', type=int, default=50)
    parser.add_argument('--val-iterations', type=int, default=10)
    parser.add_argument('-device', default='cuda', choices=['cuda', 'cpu', 'mps'])
    parser.add_argument('-np', type=int, default=1, help='processes per site for preprocessing')
    args = parser.parse_args(argv)
    _ensure_nnunet_paths(args.workdir)
    os.environ.setdefault('nnUNet_n_proc_DA', '0')

    from fednnunet import demo
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    from fednnunet.plan_and_preprocess import plan_and_preprocess

    t0 = time.time()
    try:
        folder = demo.build_demo_federation(demo.DEMO_DATASET_ID, size=args.size, seed=args.seed, overwrite=True)
        print(f'[demo] federation written to {folder} ({time.time() - t0:.1f} s)')
        federation = Federation.from_folder(folder)
        summary = plan_and_preprocess(SimulationEngine.for_federation(federation, args.np), federation.dataset_name,
                                      [args.c], 'nnUNetPlannerCPU')
    except FederationError as e:
        _fail(e)
    print(f"[demo] plans '{summary['plans_identifier']}' negotiated by sites {list(summary['sites'])} and "
          f"preprocessed ({time.time() - t0:.1f} s)")
    for method in args.methods:
        t1 = time.time()
        print(f'[demo] training {method}: {args.rounds} rounds x {args.local_iterations} iterations per site')
        train_entry([str(demo.DEMO_DATASET_ID), args.c, '0', '--method', method, '-p', summary['plans_identifier'],
                     '--rounds', str(args.rounds), '--local-iterations', str(args.local_iterations),
                     '--val-iterations', str(args.val_iterations), '-device', args.device])
        print(f'[demo] {method} done in {time.time() - t1:.1f} s')
    print(f'[demo] total {time.time() - t0:.1f} s; results under {os.environ["nnUNet_results"]}')
