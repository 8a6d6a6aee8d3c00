"""Command-line entry points, following nnU-Net's conventions (-d -c -f -p -pl -np -chk -device ...).

Every argument is checked while it is parsed, before torch or nnU-Net is imported (fednnunet.cli_args): ``--help``
and a wrong argument answer at once, and nothing is written before an error."""
import os
import time

from fednnunet import method_names
from fednnunet.cli_args import (FedArgumentParser, add_device_argument, add_run_start_arguments,
                                add_schedule_arguments, check_device, device_name, fail, fold, int_at_least, method,
                                methods_epilog, positive_number)
from fednnunet.errors import FederationError
from fednnunet.method_options import (add_method_arguments, check_hyperparameters, hyperparameters_from_args,
                                      strategy_options_from_args)


def _fail(e):
    fail(e)


def _default_num_processes() -> int:
    from nnunetv2.configuration import default_num_processes
    return default_num_processes


def plan_and_preprocess_parser() -> FedArgumentParser:
    parser = FedArgumentParser(
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
    parser.add_argument('-np', type=int_at_least(1), default=None,
                        help='processes per site for fingerprinting and preprocessing (default: nnU-Net\'s)')
    parser.add_argument('-gpu_memory_target', type=positive_number, default=None,
                        help='cap on device memory in GB (> 0); the plan uses min(this, every site\'s gpu_memory_gb)')
    parser.add_argument('-overwrite_plans_name', default=None, help="as nnU-Net's: the name of the plans written")
    parser.add_argument('-overwrite_target_spacing', nargs='+', type=positive_number, default=None,
                        help="as nnU-Net's: the target spacing of 3d_fullres (positive numbers, in mm)")
    parser.add_argument('--no_pp', action='store_true', help='plan only, do not preprocess')
    return parser


def plan_and_preprocess_entry(argv=None):
    args = plan_and_preprocess_parser().parse_args(argv)

    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    from fednnunet.server_data import planning_engine

    num_processes = args.np if args.np is not None else _default_num_processes()
    try:
        for d in args.d:
            federation = Federation.from_raw(d, args.sites)
            engine = planning_engine(SimulationEngine.for_federation(federation, num_processes), federation,
                                     num_processes)
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
    add_device_argument(parser)
    parser.add_argument('-np', type=int_at_least(1), default=1,
                        help='processes per site for prediction/export (default 1: in-process)')
    parser.add_argument('--verbose', action='store_true', help="show the sites' nnU-Net logs on the console")


def _add_model_args(parser, several_folds: bool = False):
    """Which trained model: nnU-Net's -d -c -f -p -chk, and the method that trained it. ``several_folds``: -f takes
    several folds (an ensemble, as nnUNetv2_predict), by default every trained one."""
    parser.add_argument('-d', required=True, help='dataset id or name')
    parser.add_argument('-c', required=True, help='configuration, e.g. 3d_fullres')
    if several_folds:
        parser.add_argument('-f', nargs='+', type=fold, default=None,
                            help="fold(s): 0-4 or all; several are ensembled, as nnU-Net does (default: every "
                                 "trained fold of the model, as nnUNetv2_predict)")
    else:
        parser.add_argument('-f', type=fold, default='0', help='fold: 0-4 or all (default 0)')
    parser.add_argument('--method', type=method(), default='fedavg',
                        help='the method that trained the model (default fedavg; the list is below)')
    parser.add_argument('-p', default='nnUNetPlans',
                        help='plans identifier (default nnUNetPlans; the demo trains with nnUNetCPUPlans)')
    parser.add_argument('-chk', default='checkpoint_final.pth', help='checkpoint name (default checkpoint_final.pth)')


def _trained_by(method: str):
    """(trainer class, whether the method has a global model) for a method name, centralized included."""
    from fednnunet.methods import CENTRALIZED, get_method
    from fednnunet.trainers.centralized import CentralizedTrainer
    if method == CENTRALIZED:
        return CentralizedTrainer, True
    m = get_method(method)
    return m.trainer, m.has_global_model


def _model_base(args, dataset_name: str, command: str) -> str:
    """The results folder of the model asked for (-d -c -p --method); a FederationError that lists the trained
    models and the flags of the closest one when it does not exist."""
    from fednnunet.site_training import results_folder
    from fednnunet.trained_models import missing_model_message
    trainer_class, _ = _trained_by(args.method)
    base = results_folder(dataset_name, trainer_class, args.p, args.c)
    if not os.path.isdir(base):
        asked_fold = args.f[0] if isinstance(args.f, list) else args.f or '0'
        raise FederationError(missing_model_message(
            dataset_name, str(args.d), args.method, args.p, args.c, asked_fold, base, command, args.chk,
            predict=command.startswith('fednnunet_predict'), site=getattr(args, 'site', None)))
    return base


def _dataset_labels(folder: str):
    """dataset.json's labels in a results folder (None if it cannot be read): the table's column names."""
    import json
    try:
        with open(os.path.join(folder, 'dataset.json')) as f:
            return json.load(f).get('labels')
    except (OSError, ValueError, AttributeError):
        return None


def _fold(value: str):
    return value if value == 'all' else int(value)


def train_parser() -> FedArgumentParser:
    parser = FedArgumentParser(
        prog='fednnunet_train',
        description='Federated nnU-Net training: rounds of nnU-Net epochs at every site, merged by the method\'s '
                    'strategy. Results go to nnU-Net\'s layout under nnUNet_results.',
        epilog=methods_epilog())
    parser.add_argument('dataset_name_or_id')
    parser.add_argument('configuration', help='e.g. 3d_fullres, 2d')
    parser.add_argument('fold', nargs='*', type=fold, default=None,
                        help="0-4 or all (default 0); several (e.g. 0 1 2 3 4: the federation's cross-validation, fold "
                             "k being every site's own fold k) train one after the other")
    parser.add_argument('-f', nargs='+', type=fold, default=None, dest='folds', metavar='FOLD',
                        help='the folds, as nnU-Net\'s -f (instead of the positional fold)')
    parser.add_argument('--npz', action='store_true',
                        help="the sites' final validation also saves the class probabilities (.npz, as nnU-Net's "
                             "--npz; they stay at the site): needed to ensemble configurations "
                             "(fednnunet_find_best_configuration)")
    parser.add_argument('--method', type=method(), default='fedavg',
                        help='the training method (default fedavg; the list is below)')
    parser.add_argument('-p', default='nnUNetPlans', help='plans identifier (default nnUNetPlans; the demo uses '
                                                          'nnUNetCPUPlans)')
    add_schedule_arguments(parser)
    add_run_start_arguments(parser, 'resume from the last round checkpoint (nnU-Net\'s --c works too)')
    add_method_arguments(parser)
    parser.add_argument('--state-in-memory', action='store_true',
                        help="simulation: keep sites' states between rounds in memory instead of on disk "
                             "(--continue then needs a run that kept them on disk)")
    parser.add_argument('--no-val', action='store_true', help='skip the final validation at every site')
    parser.add_argument('--centralized-iterations', type=int_at_least(1), default=None,
                        help='--method centralized: training iterations per epoch (default: --local-iterations x '
                             'the number of sites, what all sites train per round together; --local-iterations: '
                             'what one site trains per round, the FednnU-Net paper\'s convention)')
    parser.add_argument('--site-devices', nargs='+', default=None, metavar='SITE=DEVICE',
                        help='one process per site, each on its device (cuda:N, cuda, cpu, cpu:N, mps): sites on '
                             'different devices train at the same time, sites sharing one take turns. Default: '
                             'with CUDA on several GPUs, the sites spread over them; else all sites in this '
                             'process, in turn')
    _add_federation_args(parser)
    return parser


def training_engine(federation, args):
    """The simulation engine for fednnunet_train: one process per site on its device where --site-devices says
    so or this machine has several GPUs (engines.site_processes), else every site in this process."""
    from fednnunet.engines.site_processes import SiteProcessEngine, gpu_site_devices, parse_site_devices
    from fednnunet.engines.simulation import SimulationEngine
    devices = None
    if args.site_devices:
        if args.state_in_memory:
            raise FederationError('--state-in-memory keeps states in this process; with --site-devices every site '
                                  'has its own process')
        devices = parse_site_devices(args.site_devices, federation.site_names)
    elif len(federation.sites) > 1 and not args.state_in_memory and device_name(args.device) in ('auto', 'cuda'):
        import torch
        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            devices = gpu_site_devices(federation.site_names, torch.cuda.device_count())
    if devices is None:
        return SimulationEngine.for_federation(federation, args.np, device=device_name(args.device),
                                               state_in_memory=args.state_in_memory, verbose=args.verbose)
    groups = {}
    for site, device in devices.items():
        groups.setdefault(device, []).append(site)
    print('fednnunet: one process per site; ' + '; '.join(f"{', '.join(s)} on {d}" for d, s in groups.items()),
          flush=True)
    return SiteProcessEngine(federation, devices, args.np, verbose=args.verbose)


def train_entry(argv=None):
    args = train_parser().parse_args(argv)
    check_device(args.device)
    if args.fold and args.folds:
        _fail('give the folds either as the positional fold or with -f, not both')
    folds = list(dict.fromkeys(args.folds or args.fold or ['0']))  # in the order given, each once
    for k, f in enumerate(folds):
        if len(folds) > 1:
            print(f'fednnunet: fold {f} ({k + 1} of {len(folds)})', flush=True)
        args.fold = f
        train_fold(args)


def train_fold(args):
    """One fold's training (every site's fold ``args.fold``), then its final validation table."""
    try:
        hyperparameters = hyperparameters_from_args(args)
        strategy_options = strategy_options_from_args(args, args.method)
        if args.centralized_iterations is not None and args.method != method_names.CENTRALIZED:
            raise FederationError('--centralized-iterations applies to --method centralized only',
                                  field='--centralized-iterations')
        if args.npz and args.method == method_names.CENTRALIZED:
            raise FederationError("--npz applies to the federated methods (the centralized baseline's sites measure "
                                  "with fednnunet_evaluate)", field='--npz')
    except (ValueError, FederationError) as e:
        _fail(e)

    from fednnunet.evaluation import format_table
    from fednnunet.federation import Federation

    engine = None
    try:
        federation = Federation.from_raw(args.dataset_name_or_id, args.sites)
        engine = training_engine(federation, args)
        if args.method == method_names.CENTRALIZED:
            if hyperparameters or len(strategy_options) > 1:
                raise FederationError(f'{sorted(hyperparameters) + sorted(set(strategy_options) - {"weighting"})} do '
                                      f'not apply to --method centralized')
            result = run_centralized(engine, federation, args)
        else:
            check_hyperparameters(args.method, hyperparameters)
            from fednnunet.training_server import FederatedTraining, TrainingConfig
            config = TrainingConfig(federation.dataset_name, args.configuration, _fold(args.fold), args.method, args.p,
                                    args.rounds, args.local_iterations, args.val_iterations, args.seed,
                                    hyperparameters, strategy_options, validate=not args.no_val,
                                    save_probabilities=args.npz)
            from fednnunet.server_data import public_set_worker
            server_data = public_set_worker(federation.server, federation.dataset_name, args.np,
                                            device=device_name(args.device), verbose=args.verbose)
            result = FederatedTraining(engine, config, server_data=server_data).run(
                continue_training=args.continue_training, overwrite=args.overwrite)
    except (FederationError, NotImplementedError, ValueError, FileNotFoundError) as e:
        _fail(e)
    finally:
        if engine is not None:
            engine.close()  # (site processes end; in-process sites' trainers are closed already)
    print(f"results: {result['results_folder']}")
    if result.get('final_validation'):
        print(format_table(result['final_validation'], f"{args.method}: final validation, fold {args.fold}",
                           labels=_dataset_labels(result['results_folder'])))


def run_centralized(engine, federation, args) -> dict:
    """The pooled baseline, then every site measures the model on its own validation cases."""
    from fednnunet.centralized import train_centralized
    from fednnunet.evaluation import pooled_summary
    from fednnunet.site_training import resolve_device, results_folder
    from fednnunet.trainers.centralized import CentralizedTrainer
    from fednnunet.wire import Message
    trainer = train_centralized(federation.dataset_name, federation.site_names, args.configuration, _fold(args.fold),
                                args.p, args.rounds, args.local_iterations, args.val_iterations, args.seed,
                                resolve_device(device_name(args.device)), args.continue_training,
                                iterations_per_epoch=args.centralized_iterations)
    result = {'method': 'centralized', 'results_folder': trainer.output_folder_base, 'final_validation': None}
    if not args.no_val:
        replies = engine.ask_all(Message('evaluate', {
            'results_folder_name': os.path.basename(results_folder(federation.dataset_name, CentralizedTrainer, args.p,
                                                                  args.configuration)),
            'model': 'global', 'checkpoint': 'checkpoint_final.pth', 'fold': _fold(args.fold)}))
        result['final_validation'] = pooled_summary({s: r.config['summary'] for s, r in replies.items()})
        from fednnunet.jsonio import write_json
        # as the federated methods' federated_summary.json: the same numbers, next to nnU-Net's checkpoints
        write_json(os.path.join(trainer.output_folder, 'centralized_summary.json'), result)
    return result


def evaluate_parser() -> FedArgumentParser:
    parser = FedArgumentParser(
        prog='fednnunet_evaluate',
        description='Every site predicts its own validation cases with the trained model and measures them '
                    '(nnU-Net\'s metrics + HD95); prints per-site Dice/HD95 and the pooled Dice (exact, from summed '
                    'TP/FP/FN) and writes them to JSON.',
        epilog=methods_epilog())
    _add_model_args(parser)
    parser.add_argument('--model', choices=['auto', 'global', 'site'], default='auto',
                        help="global: the merged model; site: each site's personalized model; auto: global where the "
                             "method has one, else site")
    parser.add_argument('-o', default=None, help='JSON output file (default: in the results fold folder)')
    _add_federation_args(parser)
    return parser


def evaluate_entry(argv=None):
    args = evaluate_parser().parse_args(argv)
    check_device(args.device)

    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.evaluation import format_table, pooled_summary
    from fednnunet.federation import Federation
    from fednnunet.jsonio import write_json
    from fednnunet.wire import Message

    try:
        federation = Federation.from_raw(args.d, args.sites)
        _, has_global = _trained_by(args.method)
        model = args.model if args.model != 'auto' else ('global' if has_global else 'site')
        if model == 'global' and not has_global:
            raise FederationError(f'{args.method} keeps parts of the model at the sites and has no global model; '
                                  f'use --model site', field='--model')
        base = _model_base(args, federation.dataset_name, 'fednnunet_evaluate')
        engine = SimulationEngine.for_federation(federation, args.np, device=device_name(args.device),
                                                 verbose=args.verbose)
        replies = engine.ask_all(Message('evaluate', {
            'results_folder_name': os.path.basename(base), 'model': model, 'checkpoint': args.chk,
            'fold': _fold(args.f)}))
    except (FederationError, NotImplementedError, ValueError) as e:
        _fail(e)
    pooled = pooled_summary({s: r.config['summary'] for s, r in replies.items()})
    out = args.o or os.path.join(base, f'fold_{args.f}', f'evaluation_{model}_{os.path.splitext(args.chk)[0]}.json')
    write_json(out, {'method': args.method, 'model': model, 'checkpoint': args.chk, **pooled})
    print(format_table(pooled, f'{args.method} ({model} model, {args.chk}), fold {args.f}',
                       labels=_dataset_labels(base)))
    print(f'written to {out}')


def predict_parser() -> FedArgumentParser:
    parser = FedArgumentParser(
        prog='fednnunet_predict',
        description="Predicts new scans with nnU-Net's predictor and a federated model: the global model, or with "
                    "--site a site's personalized model (its local layers loaded).",
        epilog=methods_epilog())
    parser.add_argument('-i', required=True, help='input folder (nnU-Net naming: CASE_XXXX.ending, XXXX the channel)')
    parser.add_argument('-o', required=True, help='output folder')
    _add_model_args(parser, several_folds=True)
    parser.add_argument('--site', default=None, help="use this site's personalized model")
    add_device_argument(parser)
    parser.add_argument('-npp', type=int_at_least(0), default=0,
                        help='processes for pre/postprocessing (default 0: in-process)')
    parser.add_argument('--disable_tta', action='store_true', help='no mirroring at test time (as nnU-Net)')
    parser.add_argument('--save_probabilities', action='store_true', help='also write the softmax (as nnU-Net)')
    parser.add_argument('-prev_stage_predictions', default=None,
                        help="a cascade stage (3d_cascade_fullres): the folder of the previous stage's predictions of "
                             "the same cases (as nnU-Net)")
    return parser


def predict_entry(argv=None):
    args = predict_parser().parse_args(argv)
    check_device(args.device)

    from fednnunet.federation import dataset_name_from_id, load_json
    from fednnunet.inference import handles_missing_channels, input_files, load_predictor, predict_cases
    from fednnunet.method_names import trainer_name_of
    from fednnunet.site_training import resolve_device
    from fednnunet.trained_models import sites_with_model, trained_folds

    try:
        dataset_name = dataset_name_from_id(args.d)
        _, has_global = _trained_by(args.method)
        base = _model_base(args, dataset_name, 'fednnunet_predict -i IN -o OUT')
        if args.site is None and not has_global:
            raise FederationError(f'{args.method} keeps parts of the model at the sites; choose a site\'s '
                                  f'personalized model with --site', field='--site')
        model_folder = base if args.site is None else os.path.join(base, 'sites', args.site)
        folds = args.f or trained_folds(model_folder, args.chk)
        if args.site is not None:
            missing = [f for f in folds if args.site not in sites_with_model(base, f, args.chk)]
            if missing or not folds:
                trained = sites_with_model(base, (folds or ['0'])[0], args.chk)
                what = (', '.join(f'fold_{f}/{args.chk}' for f in missing) if missing else
                        f'fold with {args.chk}')
                start = (f"site {args.site!r} has no {what} (was its training finished?)"
                         if os.path.isdir(model_folder) else f'unknown site {args.site!r}')
                raise FederationError(f"{start}; sites with a trained model: {', '.join(trained) or 'none'}")
        if not folds:
            raise FederationError(f'{base} holds no fold with {args.chk} (was the training finished?)', field='-f')
        dataset_json = load_json(os.path.join(model_folder, 'dataset.json'), what='dataset.json')
        lists = input_files(args.i, dataset_json, handles_missing_channels(trainer_name_of(args.method)))
        predictor = load_predictor(model_folder, [_fold(f) for f in folds], args.chk,
                                   resolve_device(device_name(args.device)),
                                   use_mirroring=not args.disable_tta, allow_tqdm=True)
        ending = predictor.dataset_json['file_ending']
        cases = [os.path.basename(files[0])[:-len(ending) - 5] for files in lists]
        predict_cases(predictor, lists, [os.path.join(args.o, c) for c in cases], args.npp, args.save_probabilities,
                      args.prev_stage_predictions)
    except (FederationError, NotImplementedError, ValueError) as e:
        _fail(e)
    print(f"{len(cases)} case(s) predicted into {args.o} (fold(s) {', '.join(folds)}"
          f"{', ensembled' if len(folds) > 1 else ''})")


def demo_data_entry(argv=None):
    parser = FedArgumentParser(prog='fednnunet_demo_data',
                               description='Builds the demo federation (brain tissue, MNI152 anatomy from nilearn, '
                                           'simulated scanners per site) as an nnU-Net raw dataset.')
    parser.add_argument('-d', type=int_at_least(1), default=None, help='dataset id (default 501)')
    parser.add_argument('--size', type=int_at_least(16), default=64,
                        help='voxels along the longest axis (>= 16; default 64)')
    parser.add_argument('--seed', type=int_at_least(0), default=0, help='seed of the demo data (>= 0; default 0)')
    parser.add_argument('--test-sites', action='store_true', help='the small 3-site federation used by the tests')
    parser.add_argument('--overwrite', action='store_true', help='replace the dataset folder if it exists')
    parser.add_argument('--site', default=None,
                        help="only this site's cases, with a sites.json that lists only itself: one hospital's own "
                             "nnUNet_raw, for trying the deployment guide on one machine")
    parser.add_argument('--lesion', action='store_true',
                        help='the demo with a small class: every subject also has one small white-matter lesion '
                             '(label 3, ~0.03-0.25 %% of the brain); dataset 503 FedBrainLesionDemo unless -d is given')
    parser.add_argument('--labelled-per-site', type=int_at_least(1), default=None, metavar='N',
                        help='semi-supervised demo: at every site only the first N cases keep their labels, the '
                             'others become its unlabelled cases (imagesTrUnlabelled/); dataset 504 '
                             'FedBrainSemiDemo unless -d is given')
    parser.add_argument('--public-set', action='store_true',
                        help='semi-supervised, model-heterogeneous demo: a labelled public set at the server from a '
                             'scanner of its own, one site with few training labels, the others none (every site '
                             'keeps labelled validation-only cases for measurement), a network per participant; '
                             'dataset 505 FedBrainPublicSetDemo unless -d is given')
    parser.add_argument('--multimodal', action='store_true',
                        help='multimodal demo: T1, T2 and FLAIR contrasts, white-matter lesions visible in FLAIR '
                             'only, sites with different contrasts (A all three, B T1+T2, C T1+FLAIR, D T1) and '
                             'per-site, per-contrast intensity drift, held-out test cases with every contrast in '
                             'imagesTs/labelsTs; dataset 506 FedBrainMultimodalDemo unless -d is given')
    args = parser.parse_args(argv)
    from fednnunet import demo
    sites = demo.TEST_SITES if args.test_sites else demo.DEFAULT_SITES
    chosen = [flag for flag, on in (('--lesion', args.lesion), ('--labelled-per-site', args.labelled_per_site),
                                    ('--public-set', args.public_set), ('--multimodal', args.multimodal)) if on]
    if len(chosen) > 1:
        _fail(f'{" and ".join(chosen)} are different demos; choose one')
    if args.multimodal:
        from fednnunet import demo_multimodal as mm
        try:
            folder = mm.build_multimodal_federation(
                args.d if args.d is not None else mm.MULTIMODAL_DATASET_ID, size=args.size, seed=args.seed,
                sites=mm.TEST_MULTIMODAL_SITES if args.test_sites else mm.MULTIMODAL_SITES, overwrite=args.overwrite,
                only_site=args.site, test_per_site=1 if args.test_sites else mm.TEST_PER_SITE)
        except (FileExistsError, ValueError, FederationError) as e:
            _fail(str(e).replace('pass overwrite=True', 'pass --overwrite'))
        print(f'demo federation written to {folder}')
        return
    default_id, name = ((demo.LESION_DATASET_ID, demo.LESION_DATASET_NAME) if args.lesion else
                        (demo.SEMI_SUPERVISED_DATASET_ID, demo.SEMI_SUPERVISED_DATASET_NAME)
                        if args.labelled_per_site else
                        (demo.PUBLIC_SET_DATASET_ID, demo.PUBLIC_SET_DATASET_NAME) if args.public_set else
                        (demo.DEMO_DATASET_ID, demo.DEMO_DATASET_NAME))
    public = {}
    if args.public_set:
        public = dict(public_set=demo.TEST_PUBLIC_SCANNER, few_labels=1, validation_per_site=1) if args.test_sites \
            else dict(public_set=demo.PUBLIC_SCANNER)
    try:
        folder = demo.build_demo_federation(args.d if args.d is not None else default_id, name=name, size=args.size,
                                            seed=args.seed, sites=sites, overwrite=args.overwrite,
                                            only_site=args.site, lesion=args.lesion,
                                            labelled_per_site=args.labelled_per_site, **public)
    except (FileExistsError, ValueError, FederationError) as e:
        _fail(str(e).replace('pass overwrite=True', 'pass --overwrite'))
    print(f'demo federation written to {folder}')


def _ensure_nnunet_paths(workdir: str) -> list:
    """The demo works out of the box: nnU-Net's three folders default to <workdir>/nnUNet_*. Returns the
    variables it set."""
    set_here = []
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        if not os.environ.get(var):
            os.environ[var] = os.path.join(os.path.abspath(workdir), var)
            set_here.append(var)
        os.makedirs(os.environ[var], exist_ok=True)
    return set_here


def demo_parser() -> FedArgumentParser:
    parser = FedArgumentParser(prog='fednnunet_demo',
                               description='The whole path on the bundled demo federation: build the data, '
                                           'negotiate plans (CPU preset), preprocess at every site, train '
                                           'federated rounds, predict every site\'s validation cases and print '
                                           'the per-site Dice table; then the commands to go on with.',
                               epilog=methods_epilog())
    parser.add_argument('--workdir', default='demo_workdir',
                        help='where nnUNet_raw/preprocessed/results go unless those variables are set')
    parser.add_argument('--size', type=int_at_least(16), default=64,
                        help='voxels along the longest axis (>= 16; default 64)')
    parser.add_argument('--seed', type=int_at_least(0), default=0, help='seed of the demo data (>= 0; default 0)')
    parser.add_argument('-c', default='3d_fullres', help='configuration to train (default 3d_fullres)')
    parser.add_argument('--methods', nargs='+', type=method(), default=['fedavg'],
                        help='methods to train and compare (default fedavg; e.g. local fedavg centralized)')
    add_schedule_arguments(parser, rounds=10, local_iterations=50, val_iterations=10, seed=None)
    add_device_argument(parser)
    parser.add_argument('-np', type=int_at_least(1), default=1, help='processes per site for preprocessing')
    parser.add_argument('--full', action='store_true',
                        help="nnU-Net's whole pipeline instead: 2d and 3d_fullres, each trained on all 5 folds of the "
                             "federation's cross-validation (--npz) with the first method, "
                             "fednnunet_find_best_configuration, then a new scan predicted as its "
                             "inference_instructions.txt says (see documentation/pipeline.md; 10 trainings: use a "
                             "small --rounds on a CPU)")
    return parser


FULL_CONFIGURATIONS = ['2d', '3d_fullres']


def demo_full(args, federation, plans: str, device: list, t0: float):
    """fednnunet_demo --full: both configurations on the five folds, find_best_configuration, and a new scan (site
    A's first case, as a new hospital scan would come) predicted and postprocessed as the instructions say."""
    import shutil
    from fednnunet import demo
    from fednnunet.cli_pipeline import find_best_configuration_entry, run_instructions
    m = args.methods[0]
    for c in FULL_CONFIGURATIONS:
        t1 = time.time()
        print(f'[demo] {c}, folds 0-4 with {m}: {args.rounds} rounds x {args.local_iterations} iterations per site')
        train_entry([str(demo.DEMO_DATASET_ID), c, '0', '1', '2', '3', '4', '--npz', '--method', m, '-p', plans,
                     '--rounds', str(args.rounds), '--local-iterations', str(args.local_iterations),
                     '--val-iterations', str(args.val_iterations), '--overwrite'] + device)
        print(f'[demo] {c} done in {time.time() - t1:.1f} s')
    find_best_configuration_entry([str(demo.DEMO_DATASET_ID), '-c'] + FULL_CONFIGURATIONS + ['-p', plans,
                                                                                            '--method', m])
    from nnunetv2.paths import nnUNet_results
    text = open(os.path.join(str(nnUNet_results), federation.dataset_name, 'inference_instructions.txt')).read()
    site = federation.sites[federation.site_names[0]]
    scans = os.path.join(os.path.abspath(args.workdir), 'new_scans')
    shutil.rmtree(scans, ignore_errors=True)
    os.makedirs(scans)
    for f in site.image_files(site.cases[0]):
        shutil.copy(f, scans)
    final = run_instructions(text, scans, os.path.join(os.path.abspath(args.workdir), 'predictions'), device)
    print(f'[demo] a new scan predicted as inference_instructions.txt says: {final}')
    print(f'[demo] total {time.time() - t0:.1f} s')


def demo_next_steps(dataset_id: int, raw_folder: str, configuration: str, plans: str, methods, site: str,
                    workdir: str, device=None, exported=()) -> str:
    """The commands to run after the demo, with the -d/-c/-p it trained with: predict a folder with the global
    model, evaluate, predict with a site's personalized model (if a personalized method was trained)."""
    model = f'-d {dataset_id} -c {configuration} -p {plans}'
    dev = f' -device {device}' if device else ''
    has_global = {m: _trained_by(m)[1] for m in methods}
    lines = ['[demo] next steps (copy and paste):']
    if exported:
        lines.append('  export ' + ' '.join(f'{v}={os.environ[v]}' for v in exported))
    images = os.path.join(raw_folder, 'imagesTr')
    global_method = next((m for m in methods if has_global[m]), None)
    if global_method:
        lines.append(f'  fednnunet_predict -i {images} -o {os.path.join(workdir, "predictions_" + global_method)} '
                     f'{model} --method {global_method}{dev}')
    first = global_method or methods[0]
    lines.append(f'  fednnunet_evaluate {model} --method {first}{dev}')
    personal = next((m for m in methods if not has_global[m]), None)
    if personal:
        lines.append(f'  fednnunet_predict -i {images} -o {os.path.join(workdir, f"predictions_{personal}_{site}")} '
                     f'{model} --method {personal} --site {site}{dev}')
    lines.append(f"  (-i: any folder of CASE_0000.nii.gz scans; {images} holds the demo's own)")
    return '\n'.join(lines)


def demo_entry(argv=None):
    args = demo_parser().parse_args(argv)
    check_device(args.device)
    exported = _ensure_nnunet_paths(args.workdir)
    os.environ.setdefault('nnUNet_n_proc_DA', '0')

    from fednnunet import demo
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    from fednnunet.plan_and_preprocess import plan_and_preprocess
    from fednnunet.server_data import planning_engine

    t0 = time.time()
    try:
        folder = demo.build_demo_federation(demo.DEMO_DATASET_ID, size=args.size, seed=args.seed, overwrite=True)
        print(f'[demo] federation written to {folder} ({time.time() - t0:.1f} s)')
        federation = Federation.from_folder(folder)
        summary = plan_and_preprocess(planning_engine(SimulationEngine.for_federation(federation, args.np), federation,
                                                      args.np), federation.dataset_name,
                                      FULL_CONFIGURATIONS if args.full else [args.c], 'nnUNetPlannerCPU')
    except (FederationError, FileExistsError, ValueError) as e:
        _fail(e)
    print(f"[demo] plans '{summary['plans_identifier']}' negotiated by sites {list(summary['sites'])} and "
          f"preprocessed ({time.time() - t0:.1f} s)")
    device = ['-device', args.device] if args.device else []
    if args.full:
        return demo_full(args, federation, summary['plans_identifier'], device, t0)
    for m in args.methods:
        t1 = time.time()
        print(f'[demo] training {m}: {args.rounds} rounds x {args.local_iterations} iterations per site')
        train_entry([str(demo.DEMO_DATASET_ID), args.c, '0', '--method', m, '-p', summary['plans_identifier'],
                     '--rounds', str(args.rounds), '--local-iterations', str(args.local_iterations),
                     '--val-iterations', str(args.val_iterations), '--overwrite'] + device)
        print(f'[demo] {m} done in {time.time() - t1:.1f} s')
    print(f'[demo] total {time.time() - t0:.1f} s; results under {os.environ["nnUNet_results"]}')
    print(demo_next_steps(demo.DEMO_DATASET_ID, folder, args.c, summary['plans_identifier'], args.methods,
                          federation.site_names[0], os.path.abspath(args.workdir), args.device, exported))
