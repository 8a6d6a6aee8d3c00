"""The commands after training, as nnU-Net has them: ``fednnunet_find_best_configuration`` (nnU-Net's
``nnUNetv2_find_best_configuration``, federated: only counts leave the sites), ``fednnunet_ensemble`` and
``fednnunet_apply_postprocessing`` (nnU-Net's ensembling and postprocessing of prediction folders, the latter from
the decision's JSON file, never from a pickle). See documentation/pipeline.md."""
import os

from fednnunet.cli_args import FedArgumentParser, fail, fold, int_at_least, method, methods_epilog
from fednnunet.errors import FederationError

DEFAULT_CONFIGURATIONS = ['2d', '3d_fullres', '3d_lowres', '3d_cascade_fullres']


def find_best_configuration_parser() -> FedArgumentParser:
    parser = FedArgumentParser(
        prog='fednnunet_find_best_configuration',
        description="nnU-Net's choice of the best configuration or ensemble of two, and of its postprocessing, from "
                    "the federation's cross-validation (every site's own folds, trained with fednnunet_train ... "
                    "--npz): each site merges, ensembles and postprocesses its own predictions and sends per label "
                    "only a Dice sum, a case count and TP/FP/FN sums; the server decides with nnU-Net's rules and "
                    "writes nnU-Net's inference_information.json, inference_instructions.txt and postprocessing "
                    "files.",
        epilog=methods_epilog(centralized=False))
    parser.add_argument('dataset_name_or_id')
    parser.add_argument('-c', nargs='+', default=list(DEFAULT_CONFIGURATIONS),
                        help=f"configurations (default: {' '.join(DEFAULT_CONFIGURATIONS)}; those not in the plans "
                             f"are skipped, as nnU-Net does)")
    parser.add_argument('-p', nargs='+', default=['nnUNetPlans'], help='plans identifiers (default nnUNetPlans)')
    parser.add_argument('--method', nargs='+', type=method(centralized=False), default=['fedavg'],
                        help="the methods that trained the models (nnU-Net's -tr; default fedavg)")
    parser.add_argument('-f', nargs='+', type=fold, default=['0', '1', '2', '3', '4'],
                        help='folds (default 0 1 2 3 4)')
    parser.add_argument('--disable_ensembling', action='store_true', help='no ensembles of two configurations')
    parser.add_argument('-np', type=int_at_least(1), default=1, help='processes per site (default 1)')
    parser.add_argument('--sites', nargs='+', default=None, help='only these sites (default: every site)')
    return parser


def trained_models(dataset_name: str, methods, plans_identifiers, configurations, folds, log=print) -> list:
    """The candidate models, in nnU-Net's order (method, configuration, plans): a configuration that the plans do not
    have is skipped (said, as nnU-Net does); one that they have but that was not trained (all folds asked) is an
    error, as in nnU-Net."""
    from fednnunet.best_configuration import Model
    from fednnunet.federation import server_folder
    from fednnunet.federation import load_json
    from fednnunet.method_names import trainer_name_of
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    models = []
    for m in methods:
        for c in configurations:
            for p in plans_identifiers:
                plans_file = os.path.join(server_folder(dataset_name), p + '.json')
                if not os.path.isfile(plans_file):
                    raise FederationError(f'no plans {p} in {server_folder(dataset_name)}', field='-p')
                plans = load_json(plans_file)
                if c not in plans['configurations']:
                    log(f'configuration {c} is not in the plans {p}: skipped')
                    continue
                model = Model(m, trainer_name_of(m), p, c, PlansManager(plans).get_configuration(c).previous_stage_name)
                folder = os.path.join(str(nnUNet_results), dataset_name, model.name)
                # the server's summary of a finished federated training of that fold
                missing = [f for f in folds if not os.path.isfile(os.path.join(folder, f'fold_{f}',
                                                                               'federated_summary.json'))]
                if missing:
                    raise FederationError(f"{model.name} is not trained for fold(s) {', '.join(missing)} ({folder}): "
                                          f"train every fold with fednnunet_train {dataset_name} {c} "
                                          f"{' '.join(folds)} -p {p} --method {m} --npz", field='-c')
                models.append(model)
    return models


def find_best(engine, dataset_name: str, methods, plans_identifiers, configurations, folds,
              allow_ensembling: bool = True, log=print) -> dict:
    """The federated find_best_configuration over ``engine`` (simulation or Flower): the trained candidate models,
    then :class:`fednnunet.best_configuration.BestConfiguration` (per-site choices too where a method has no global
    model). Returns nnU-Net's inference information (and the instructions' text)."""
    from fednnunet.best_configuration import BestConfiguration
    from fednnunet.cli_args import FOLDS
    from fednnunet.methods import get_method
    from fednnunet.server_input import identifier
    folds = list(dict.fromkeys(str(f) for f in folds))
    for f in folds:  # (they name folders; over Flower they come from the run config)
        if f not in FOLDS:
            raise FederationError(f'{f!r} is not a fold (0-4 or all)', field='-f')
    for name in list(plans_identifiers) + list(configurations):
        identifier(name, 'plans or configuration')
    models = trained_models(dataset_name, list(dict.fromkeys(methods)), list(dict.fromkeys(plans_identifiers)),
                            list(dict.fromkeys(configurations)), folds, log)
    per_site = any(not get_method(m.method).has_global_model for m in models)
    return BestConfiguration(engine, dataset_name, models, [f if f == 'all' else int(f) for f in folds],
                             allow_ensembling, per_site, log=log).run()


def print_best(info: dict):
    print('\n***All results:***')
    for k, v in info['all_results'].items():
        print(f'{k}: {v}')
    best = info['best_model_or_ensemble']
    print(f"\n*Best*: {' + '.join(m['configuration'] for m in best['selected_model_or_models'])}: "
          f"{best['result_on_crossval_pre_pp']} (pooled Dice {best['pooled_dice_pre_pp']:.4f}); after postprocessing "
          f"{best['result_on_crossval_post_pp']} ({', '.join(best['postprocessing_fns']) or 'no postprocessing'})\n")
    print(info['instructions'], flush=True)


def find_best_configuration_entry(argv=None):
    args = find_best_configuration_parser().parse_args(argv)
    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation, dataset_name_from_id
    engine = None
    try:
        dataset_name = dataset_name_from_id(args.dataset_name_or_id)
        federation = Federation.from_raw(args.dataset_name_or_id, args.sites)
        engine = SimulationEngine.for_federation(federation, args.np, device='cpu')
        info = find_best(engine, dataset_name, args.method, args.p, args.c, args.f, not args.disable_ensembling)
    except (FederationError, ValueError, FileNotFoundError) as e:
        fail(e)
    finally:
        if engine is not None:
            engine.close()
    print_best(info)


def ensemble_parser() -> FedArgumentParser:
    parser = FedArgumentParser(
        prog='fednnunet_ensemble',
        description="nnU-Net's ensembling of prediction folders (nnUNetv2_ensemble): the mean of their class "
                    "probabilities (.npz, from fednnunet_predict --save_probabilities), then nnU-Net's "
                    "segmentation.")
    parser.add_argument('-i', nargs='+', required=True, help='the prediction folders (at least two)')
    parser.add_argument('-o', required=True, help='output folder')
    parser.add_argument('-np', type=int_at_least(1), default=1, help='processes (default 1)')
    parser.add_argument('--save_npz', action='store_true', help='also save the averaged probabilities')
    return parser


def ensemble_entry(argv=None):
    args = ensemble_parser().parse_args(argv)
    if len(args.i) < 2:
        fail('fednnunet_ensemble: -i needs at least two prediction folders')
    for folder in args.i:
        if not os.path.isdir(folder) or not any(f.endswith('.npz') for f in os.listdir(folder)):
            fail(f'-i {folder}: no .npz class probabilities (predict with fednnunet_predict --save_probabilities)')
        for needed in ('dataset.json', 'plans.json'):
            if not os.path.isfile(os.path.join(folder, needed)):
                fail(f'-i {folder}: no {needed} (a fednnunet_predict output folder has one)')
    from nnunetv2.ensembling.ensemble import ensemble_folders
    try:
        ensemble_folders(args.i, args.o, args.save_npz, args.np)
    except AssertionError as e:
        fail(f'fednnunet_ensemble: {e}')
    # nnU-Net's ensembling writes dataset.json only; the first folder's plans.json goes beside it, so that the
    # ensemble folder postprocesses as a prediction folder does (fednnunet_apply_postprocessing -i)
    import shutil
    if not os.path.isfile(os.path.join(args.o, 'plans.json')):
        shutil.copy(os.path.join(args.i[0], 'plans.json'), os.path.join(args.o, 'plans.json'))
    print(f'ensemble of {len(args.i)} folders written to {args.o}')


def apply_postprocessing_parser() -> FedArgumentParser:
    parser = FedArgumentParser(
        prog='fednnunet_apply_postprocessing',
        description="nnU-Net's postprocessing of a prediction folder (nnUNetv2_apply_postprocessing), as "
                    "fednnunet_find_best_configuration decided it: the decision is read from its "
                    "postprocessing.json (only nnU-Net's remove-all-but-the-largest-component steps, only the "
                    "dataset's labels; no pickle is read).")
    parser.add_argument('-i', required=True, help='input folder (predictions)')
    parser.add_argument('-o', required=True, help='output folder')
    parser.add_argument('-pp_json', required=True, help="the decision's postprocessing.json")
    parser.add_argument('-plans_json', default=None,
                        help="plans.json (default: the input folder's, as fednnunet_predict writes it)")
    parser.add_argument('-dataset_json', default=None, help="dataset.json (default: the input folder's)")
    parser.add_argument('-np', type=int_at_least(1), default=1, help='processes (default 1)')
    return parser


def apply_postprocessing_entry(argv=None):
    args = apply_postprocessing_parser().parse_args(argv)
    plans_file = args.plans_json or os.path.join(args.i, 'plans.json')
    dataset_file = args.dataset_json or os.path.join(args.i, 'dataset.json')
    for path, flag in ((args.pp_json, '-pp_json'), (plans_file, '-plans_json'), (dataset_file, '-dataset_json')):
        if not os.path.isfile(path):
            fail(f'{flag} {path}: no such file')
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing_to_folder
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from fednnunet.crossval import POSTPROCESSING_FUNCTIONS, read_postprocessing_json
    from fednnunet.federation import load_json
    try:
        dataset_json = load_json(dataset_file, what='-dataset_json')
        plans = load_json(plans_file, what='-plans_json')
        chain = read_postprocessing_json(args.pp_json, PlansManager(plans).get_label_manager(dataset_json))
    except FederationError as e:
        fail(e)
    apply_postprocessing_to_folder(args.i, args.o, [POSTPROCESSING_FUNCTIONS[s['function']] for s in chain],
                                   [{'labels_or_regions': s['labels_or_regions']} for s in chain], plans,
                                   dataset_json, args.np)
    steps = ', '.join(f"{s['function']} {s['labels_or_regions']}" for s in chain)
    print(f"postprocessed into {args.o}: {steps or 'no step (the decision keeps the predictions as they are)'}")


def instruction_commands(text: str) -> list:
    """The fednnunet commands of an inference_instructions.txt, in order, each as an argument list."""
    import shlex
    return [shlex.split(line) for line in text.splitlines() if line.startswith('fednnunet_')]


def run_instructions(text: str, input_folder: str, output_root: str, extra_predict_args=()) -> str:
    """Runs the commands of an inference_instructions.txt on ``input_folder`` (INPUT_FOLDER), with every
    OUTPUT_FOLDER... under ``output_root``; returns the final folder (the postprocessed one)."""
    from fednnunet.cli import predict_entry
    entries = {'fednnunet_predict': predict_entry, 'fednnunet_ensemble': ensemble_entry,
               'fednnunet_apply_postprocessing': apply_postprocessing_entry}
    final = None
    for cmd in instruction_commands(text):
        if cmd[0] not in entries:
            raise FederationError(f'{cmd[0]} is not a command of the instructions', field='instructions')
        argv = [input_folder if a == 'INPUT_FOLDER' else
                os.path.join(output_root, a) if a.startswith('OUTPUT_FOLDER') else a for a in cmd[1:]]
        entries[cmd[0]](argv + (list(extra_predict_args) if cmd[0] == 'fednnunet_predict' else []))
        final = argv[argv.index('-o') + 1]
    return final
