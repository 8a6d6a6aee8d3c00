"""``fednnunet_server`` and ``fednnunet_site``: fednnunet on Flower, one command per machine.

Server machine (holds no images)::

    fednnunet_server -d 501 --method fedavg --rounds R [--sites A B C] [--tls-dir DIR | --insecure]
                     [--auth-keys A.pub B.pub ...] [--min-sites N] [--round-timeout S] [--continue | --overwrite]

starts a Flower SuperLink (``flower-superlink``, runtime dependency installation disabled) on the loopback and
fednnunet's Fleet-only proxy on the public port (fednnunet.fleet_proxy), registers the sites' public keys when
SuperNode authentication is on, writes the fednnunet Flower app and runs it with ``flwr run`` (logs streamed);
the exit status follows the run. ``--superlink HOST:PORT`` uses a SuperLink that is already running instead.

Each hospital (its own nnUNet_raw with only its own cases)::

    fednnunet_site --site A -d 501 --server HOST:PORT [--tls-dir DIR | --insecure] [--auth-key KEY] [-device cuda]

checks the site's data (and that an explicit -device exists on the machine), then becomes a Flower SuperNode
(``flower-supernode``, process isolation) with ``--node-config`` ``site-id``/``dataset``/``device``, whose
ClientApps fednnunet's launcher starts after checking the run's app bundle (fednnunet.app_pinning). See
documentation/deployment.md.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional, Tuple

from fednnunet.child_processes import end_processes
from fednnunet.cli_args import (FedArgumentParser, add_device_argument, add_run_start_arguments,
                                add_schedule_arguments, address, check_device, device_name, fail, fold, int_at_least,
                                method, methods_epilog, number_at_least, port, positive_number, pull_interval,
                                heartbeat_interval)
from fednnunet.log_lines import stamped
from fednnunet.method_options import add_method_arguments, hyperparameters_from_args, strategy_options_from_args

DEFAULT_PORT = 9092
CONNECTION = 'fednnunet'
TLS_FILES = {'ca': 'ca.crt', 'cert': 'server.pem', 'key': 'server.key'}
#: what fednnunet_server prints at its start, before the folder of its logs
WORK_DIR_SAYS = "Flower's logs (SuperLink, Fleet proxy) and files (app, FLWR_HOME) are in"


class CliError(RuntimeError):
    pass


def _fail(text: str, code: int = 2):
    fail(text, code)


def flower_executable(name: str) -> str:
    """A Flower command from this environment (next to this Python first, then PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    found = shutil.which(name)
    if found:
        return found
    raise CliError(f"'{name}' was not found: install Flower with pip install 'fednnunet[flower]'")


def flower_env(flwr_home: Optional[str] = None) -> dict:
    """The environment for Flower's processes: this environment's bin first on PATH (the SuperLink and SuperNode
    start flwr-serverapp / flwr-clientapp by name), no runtime dependency installation, no telemetry (Flower
    reports usage events to telemetry.flower.ai by default; hospitals' machines have no business calling out, and
    offline it only adds threads), private FLWR_HOME."""
    env = dict(os.environ)
    env.setdefault('FLWR_TELEMETRY_ENABLED', '0')
    bindir = os.path.dirname(sys.executable)
    env['PATH'] = bindir + os.pathsep + env.get('PATH', '')
    env['FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION'] = '1'
    # how often a SuperNode's/SuperLink's executor looks for a new ClientApp/ServerApp to start (Flower: 1 s); every
    # fednnunet message starts a ClientApp, so a shorter wait saves most of a second per message
    env.setdefault('FLWR_SUPEREXEC_TASK_POLL_INTERVAL', '0.1')
    env.setdefault('PYTHONUNBUFFERED', '1')
    if flwr_home:
        env['FLWR_HOME'] = flwr_home
    return env


def free_port(host: str = '127.0.0.1') -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, process: Optional[subprocess.Popen] = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise CliError(f'the process exited with status {process.returncode} before {host}:{port} opened')
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise CliError(f'{host}:{port} did not open within {timeout:.0f} s')


def tls_files(tls_dir: str, need_server: bool) -> dict:
    """The certificate files in a folder made by scripts/make_test_certs.sh (or your own, same names)."""
    files = {k: os.path.abspath(os.path.join(tls_dir, v)) for k, v in TLS_FILES.items()}
    ca_keys = ca_private_keys(tls_dir)
    if ca_keys:
        raise CliError(f'--tls-dir {tls_dir} holds the private key of a certificate authority ({", ".join(ca_keys)}): '
                       f'whoever has it can sign certificates the whole federation trusts. Move it off this machine '
                       f'(scripts/make_test_certs.sh writes it to a folder of its own, <dir>.ca-key)')
    wanted = ('ca', 'cert', 'key') if need_server else ('ca',)
    absent = [files[k] for k in wanted if not os.path.isfile(files[k])]
    if absent:
        raise CliError(f'--tls-dir {tls_dir}: missing {absent} (make them with scripts/make_test_certs.sh, or put '
                       f'your own CA certificate as ca.crt{", server certificate as server.pem and key as server.key" if need_server else ""})')
    return files


def ca_private_keys(tls_dir: str) -> List[str]:
    """Files in ``tls_dir`` that hold a private key other than the server's own (server.key): ca.key, or any
    file whose text starts a PEM private key. A TLS folder is what the server and the sites carry around; the
    CA's key must not be in it."""
    found = []
    for name in sorted(os.listdir(tls_dir)) if os.path.isdir(tls_dir) else []:
        path = os.path.join(tls_dir, name)
        if name == TLS_FILES['key'] or not os.path.isfile(path):
            continue
        if name == 'ca.key':
            found.append(name)
            continue
        try:
            with open(path, 'rb') as f:
                head = f.read(4096)
        except OSError:
            continue
        if b'-----BEGIN' in head and b'PRIVATE KEY-----' in head:
            found.append(name)
    return found


def _security_args(parser):
    parser.add_argument('--tls-dir', default=None,
                        help='folder with ca.crt (and, on the server, server.pem + server.key): TLS for every '
                             'connection (scripts/make_test_certs.sh makes test certificates)')
    parser.add_argument('--insecure', action='store_true',
                        help='plain-text connections (no TLS). Only for tests on one machine or a trusted network; '
                             'must be asked for explicitly')
    parser.add_argument('--no-supernode-auth', action='store_true',
                        help='allow SuperNodes without authentication keys on an address that is not the loopback '
                             '(then any machine that reaches the server may claim to be a site); must be asked for '
                             'explicitly and is logged loudly')


def is_loopback(host: str) -> bool:
    return host in ('localhost', '::1') or host.startswith('127.')


def _check_security(args, host: str, authenticated: bool):
    """TLS or an explicit --insecure; and off the loopback, SuperNode authentication or an explicit
    --no-supernode-auth. Either opt-out is said loudly."""
    if args.insecure and args.tls_dir:
        raise CliError('--insecure and --tls-dir exclude each other')
    if not args.insecure and not args.tls_dir:
        raise CliError('give --tls-dir DIR (TLS; see scripts/make_test_certs.sh and documentation/deployment.md) or, '
                       'for a test on a trusted network only, --insecure')
    if authenticated and args.no_supernode_auth:
        raise CliError('--no-supernode-auth and SuperNode keys exclude each other')
    if not is_loopback(host) and not authenticated and not args.no_supernode_auth:
        raise CliError(f'{host} is not the loopback: SuperNode authentication is required there (the server\'s '
                       f'--auth-keys SITE=KEY.pub ..., each site\'s --auth-key KEY; scripts/make_test_certs.sh makes '
                       f'them), or give --no-supernode-auth explicitly')
    if args.insecure and not is_loopback(host):
        print(f'fednnunet: WARNING: INSECURE: plain-text connections to/from {host} (--insecure): anyone on the '
              f'network can read and change every message', file=sys.stderr, flush=True)
    if args.no_supernode_auth:
        print(f'fednnunet: WARNING: NO SUPERNODE AUTHENTICATION on {host} (--no-supernode-auth): any machine that '
              f'reaches the server can claim to be a site', file=sys.stderr, flush=True)


# ============================================================================================ server

def server_parser() -> argparse.ArgumentParser:
    p = FedArgumentParser(
        prog='fednnunet_server',
        description='The fednnunet server over Flower: starts a SuperLink, waits for the sites (fednnunet_site), '
                    'negotiates the plans, triggers preprocessing, trains in federated rounds, has every site '
                    'validate and store its final model. Holds no images.',
        epilog=methods_epilog(centralized=False))
    p.add_argument('-d', required=True, help='dataset id or name (every site must hold it)')
    p.add_argument('--phase', choices=['all', 'plan', 'train', 'find_best'], default=None,
                   help='plan: fingerprint, plans, preprocessing; train: rounds on existing plans; all (default; '
                        'with --continue: train); find_best: after every fold is trained (--npz), nnU-Net\'s '
                        'find_best_configuration over the sites\' cross-validation (fednnunet_find_best_configuration '
                        'over Flower; -p, --method, --find-best-configurations, --find-best-folds)')
    p.add_argument('-c', default='3d_fullres', help='configuration to train (default 3d_fullres)')
    p.add_argument('--preprocess-configurations', nargs='+', default=None, metavar='CONFIGURATION',
                   help='configurations to preprocess at every site when planning (default: the -c configuration), '
                        'e.g. 2d 3d_fullres')
    p.add_argument('-f', '--fold', type=fold, default='0', help='fold 0-4 or all (default 0)')
    p.add_argument('-pl', default='ExperimentPlanner', help='planner (nnU-Net\'s, or nnUNetPlannerCPU)')
    p.add_argument('-p', default=None, help='plans identifier for --phase train (default nnUNetPlans; with planning: '
                                            'the planner\'s)')
    p.add_argument('-gpu_memory_target', type=positive_number, default=None,
                   help='cap on device memory in GB (> 0); the plan uses min(this, every site\'s gpu_memory_gb)')
    p.add_argument('-overwrite_plans_name', default=None, help="as nnU-Net's: the name of the plans written")
    p.add_argument('--method', type=method(centralized=False), default='fedavg',
                   help='the training method (default fedavg; the list is below)')
    add_schedule_arguments(p)
    add_method_arguments(p)
    p.add_argument('--no-val', action='store_true', help='skip the final validation at every site')
    p.add_argument('--npz', action='store_true', help="the sites' final validation also saves the class probabilities "
                                                      "(nnU-Net's --npz; they stay at the sites)")
    p.add_argument('--find-best-configurations', nargs='+', default=None, metavar='CONFIGURATION',
                   help='--phase find_best: the configurations to choose from (default 2d 3d_fullres 3d_lowres '
                        '3d_cascade_fullres; those not in the plans are skipped)')
    p.add_argument('--find-best-folds', nargs='+', type=fold, default=None, metavar='FOLD',
                   help='--phase find_best: the folds (default 0 1 2 3 4)')
    p.add_argument('--disable_ensembling', action='store_true',
                   help='--phase find_best: no ensembles of two configurations')
    p.add_argument('--server-data', default=None, metavar='SITES_JSON',
                   help="the server's labelled public set: a sites.json (or the raw folder holding one) on the "
                        "server's disk whose 'server' entry lists it; planned as one more participant, and trained on "
                        "with --server-iterations (documentation/methods/server_training.md)")
    add_run_start_arguments(p, "resume after the last completed round (federated_round_latest.pth); nnU-Net's --c "
                               "works too")
    p.add_argument('--sites', nargs='+', default=None,
                   help='the federation\'s sites; the server waits for all of them (recommended). Default: the sites '
                        'that connect before the first round')
    p.add_argument('--min-sites', type=int_at_least(1), default=None,
                   help='a round goes on when at least this many sites answer (default: all). Planning always needs '
                        'every site')
    p.add_argument('--round-timeout', type=positive_number, default=86400.0,
                   help='seconds a site has for one round (or fingerprinting/preprocessing) before the round goes on '
                        'without it (default 86400; Flower\'s strategies drop a site after 3600)')
    p.add_argument('--straggler-grace', type=number_at_least(0), default=600.0,
                   help='with --min-sites: once that many sites have answered a round, wait this many seconds more '
                        'for the others, then go on without them (their late update is not used; they rejoin the '
                        'next round). Default 600')
    p.add_argument('--wait-for-sites', type=positive_number, default=600.0,
                   help='seconds to wait for the sites to connect at the start (default 600)')
    p.add_argument('--identify-timeout', type=positive_number, default=300.0,
                   help='seconds a newly connected site has to say who it is (default 300)')
    p.add_argument('--settle-seconds', type=number_at_least(0), default=15.0,
                   help='without --sites: start once no new site has connected for this long (default 15)')
    _security_args(p)
    p.add_argument('--auth-keys', '--auth-key', dest='auth_keys', nargs='+', default=None,
                   metavar='[SITE=]PUBLIC_KEY',
                   help="SuperNode authentication: each site's public key (OpenSSH ECDSA, e.g. keys/A.pub from "
                        "scripts/make_test_certs.sh), as SITE=PATH or PATH (the site is then the file's name without "
                        ".pub). Only SuperNodes holding a matching private key connect, and a site's name is bound "
                        "to its key: a node claiming another site is refused")
    p.add_argument('--host', default='0.0.0.0', help='address the SuperLink listens on (default 0.0.0.0)')
    p.add_argument('--port', type=port, default=DEFAULT_PORT,
                   help=f'the SuperLink\'s port (one HTTP(S) port for sites and control; default {DEFAULT_PORT})')
    p.add_argument('--superlink', type=address, default=None, metavar='HOST:PORT',
                   help='use a SuperLink that is already running (started with flower-superlink '
                        '--disable-runtime-dependency-installation) instead of starting one')
    p.add_argument('--work-dir', default=None,
                   help='where the Flower app, FLWR_HOME and the SuperLink log go (default: a new temporary folder)')
    p.add_argument('--write-app', metavar='DIR', default=None,
                   help='only write the Flower app folder (for flwr run yourself) and the run config to DIR; exit')
    return p


def run_config_from_args(args) -> dict:
    try:
        hyper = hyperparameters_from_args(args)
        strategy_options = strategy_options_from_args(args, args.method)
    except ValueError as e:
        raise CliError(str(e)) from None
    phase = args.phase or ('train' if args.continue_training else 'all')
    keys = site_keys(args.auth_keys) if args.auth_keys else {'paths': {}, 'digests': {}}
    config = {
        'dataset': str(args.d), 'phase': phase, 'configuration': args.c, 'fold': str(args.fold),
        'planner': args.pl, 'plans': args.p or '', 'plans-name': args.overwrite_plans_name or '',
        'gpu-memory-target': float(args.gpu_memory_target or 0.0), 'method': args.method, 'rounds': args.rounds,
        'local-iterations': args.local_iterations, 'val-iterations': args.val_iterations, 'seed': args.seed,
        'hyperparameters': json.dumps(hyper), 'weighting': args.weighting, 'validate': not args.no_val,
        'npz': bool(args.npz),
        'server-optimizer': json.dumps({k: v for k, v in strategy_options.items() if k != 'weighting'}),
        'continue': bool(args.continue_training), 'overwrite': bool(args.overwrite),
        'configurations': ' '.join(args.preprocess_configurations or [args.c]), 'sites': ' '.join(args.sites or []),
        'min-sites': int(args.min_sites or 0), 'round-timeout': float(args.round_timeout),
        'straggler-grace': float(args.straggler_grace),
        'identify-timeout': float(args.identify_timeout), 'wait-for-sites': float(args.wait_for_sites),
        'settle-seconds': float(args.settle_seconds),
        'site-keys': json.dumps(keys['digests']),
        'server-data': os.path.abspath(args.server_data) if args.server_data else '',
        'find-best-configurations': ' '.join(args.find_best_configurations or []),
        'find-best-folds': ' '.join(args.find_best_folds or ['0', '1', '2', '3', '4']),
        'disable-ensembling': bool(args.disable_ensembling),
    }
    if args.auth_keys and args.sites:
        unkeyed = sorted(set(args.sites) - set(keys['paths']))
        if unkeyed:
            raise CliError(f'--auth-keys has no key for site(s) {unkeyed} of --sites')
    if phase in ('train', 'find_best') and not args.p:
        config['plans'] = 'nnUNetPlans'
    return config


def write_flower_config(flwr_home: str, address: str, ca_file: Optional[str]) -> str:
    """$FLWR_HOME/config.toml with one SuperLink connection named 'fednnunet' (Flower >= 1.41 keeps connections
    there, not in the app's pyproject.toml)."""
    os.makedirs(flwr_home, exist_ok=True)
    lines = ['[superlink]', f'default = "{CONNECTION}"', '', f'[superlink.{CONNECTION}]', f'address = "{address}"']
    lines += [f'root-certificates = {json.dumps(ca_file)}'] if ca_file else ['insecure = true']
    path = os.path.join(flwr_home, 'config.toml')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


def _local_address(host: str, port: int) -> str:
    return f"{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{port}"


def start_superlink(args, env: dict, log_path: str, tls: Optional[dict], host: str, port: int) -> subprocess.Popen:
    cmd = [flower_executable('flower-superlink'), '--host', host, '--port', str(port),
           '--disable-runtime-dependency-installation']
    if tls:
        cmd += ['--ssl-ca-certfile', tls['ca'], '--ssl-certfile', tls['cert'], '--ssl-keyfile', tls['key']]
    else:
        cmd += ['--insecure']
    if args.auth_keys:
        cmd += ['--enable-supernode-auth']
    return _start_logged(cmd, env, log_path)


def _start_logged(cmd: List[str], env: dict, log_path: str) -> subprocess.Popen:
    log = open(log_path, 'ab')
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    return process


def start_fleet_proxy(args, env: dict, log_path: str, tls: Optional[dict], superlink_port: int) -> subprocess.Popen:
    """The public port: Flower's Fleet API only (fednnunet.fleet_proxy), forwarding to the loopback SuperLink."""
    cmd = [sys.executable, '-m', 'fednnunet.fleet_proxy', '--listen', f'{args.host}:{args.port}',
           '--target', f"{'https' if tls else 'http'}://127.0.0.1:{superlink_port}"]
    if tls:
        cmd += ['--ca-file', tls['ca'], '--certfile', tls['cert'], '--keyfile', tls['key']]
    return _start_logged(cmd, env, log_path)


def _flwr(args: List[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([flower_executable('flwr')] + args, env=env, text=True, capture_output=True, **kw)


def site_keys(entries: List[str]) -> dict:
    """--auth-keys SITE=PATH or PATH -> {site: path}; each site once, each file readable as a public key."""
    from fednnunet.engines.flower import public_key_digest
    keys, digests = {}, {}
    for entry in entries:
        site, sep, path = entry.partition('=')
        if not sep:
            path, site = entry, os.path.basename(entry)[:-len('.pub')] if entry.endswith('.pub') else ''
        if not site or not re.match(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$', site):
            raise CliError(f'--auth-keys {entry}: name the site (SITE=PATH, or a file named SITE.pub)')
        if site in keys:
            raise CliError(f'--auth-keys: two keys for site {site!r}')
        if not os.path.isfile(path):
            raise CliError(f'--auth-keys: {path} does not exist')
        try:
            digest = public_key_digest(open(path, 'rb').read())
        except (ValueError, TypeError) as e:
            raise CliError(f'--auth-keys: {path} is not a public key ({e})') from None
        same = [s for s, d in digests.items() if d == digest]
        if same:
            raise CliError(f'--auth-keys: {path} is the same key as site {same[0]!r}')
        keys[site], digests[site] = path, digest
    return {'paths': keys, 'digests': digests}


def register_keys(keys: dict, env: dict, timeout: float = 60.0):
    """Registers every site's key at the SuperLink, named by its site (Flower's node name; informative only: the
    server binds sites to key digests)."""
    for site, key in keys.items():
        deadline = time.time() + timeout
        while True:
            done = _flwr(['supernode', 'register', os.path.abspath(key), CONNECTION, '--name', site], env)
            if done.returncode == 0:
                print(f'fednnunet_server: registered the SuperNode key of site {site} ({key})', flush=True)
                break
            if time.time() > deadline:
                raise CliError(f'could not register {key}: {done.stdout.strip()} {done.stderr.strip()}')
            time.sleep(1.0)


def run_status(run_id: str, env: dict) -> Tuple[Optional[str], str]:
    """The run's Flower status (``finished:stopped`` ...) and Flower's status details; (None, '') if unknown."""
    done = _flwr(['ls', CONNECTION, '--run-id', run_id, '--format', 'json'], env)
    try:
        runs = json.loads(done.stdout)['runs']
        status, text = (runs[0]['status'], str(runs[0].get('status-details') or '')) if runs else (None, '')
    except (ValueError, KeyError, IndexError, TypeError):
        status, text = None, ''
    return status, text


def status_sentence(run_id: Optional[str], status: Optional[str], details: str = '',
                    interrupted: Optional[str] = None) -> str:
    """What the operator reads at the end: how the run ended, who ended it and what to do next."""
    resume = 'the last completed round is saved: the same command with --continue resumes from it'
    if status == 'finished:completed' and not interrupted:
        return f'run {run_id} finished:completed'
    if interrupted:
        return (f'run {run_id} {status or "state unknown"}: stopped by this fednnunet_server ({interrupted}); '
                f'{resume}')
    if status == 'finished:stopped':
        return (f'run {run_id} finished:stopped: stopped from outside this command (flwr stop {run_id} through '
                f'the Control API, which listens on this machine only){": " + details if details else ""}; '
                f'{resume}')
    if status == 'finished:failed':
        return (f'run {run_id} finished:failed: the server stopped on an error ({details or "see the lines above"}); '
                f'{resume} once it is fixed')
    status = status or 'state unknown (the SuperLink did not answer)'
    return f'run {run_id}: {status}' + (f': {details}' if details else '')


def run_app(app_dir: str, run_config_file: str, env: dict) -> int:
    """flwr run with the logs streamed to this terminal; returns 0 if the run completed."""
    cmd = [flower_executable('flwr'), 'run', app_dir, CONNECTION, '--run-config', run_config_file, '--stream']
    run_id, interrupted, details = None, None, ''
    try:
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1)
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if run_id is None:
                m = re.search(r'Successfully started run (\d+)', line)
                if m:
                    run_id = m.group(1)
        process.wait()
        if run_id is None:
            print('fednnunet_server: the run did not start (see above)', file=sys.stderr, flush=True)
            return 1
        status, details = _final_status(run_id, env)
    except KeyboardInterrupt as e:
        interrupted = str(e) or 'Ctrl-C'
        if run_id:
            print(f'fednnunet_server: stopping run {run_id} ({interrupted})', flush=True)
            _flwr(['stop', run_id, CONNECTION], env)
        status, details = run_status(run_id, env) if run_id else (None, '')
    print(f'fednnunet_server: {stamped(status_sentence(run_id, status, details, interrupted))}', flush=True)
    return 0 if status == 'finished:completed' and not interrupted else 1


def _final_status(run_id: str, env: dict) -> Tuple[Optional[str], str]:
    """The run's status once it has finished. The log stream ends with the run; if it ended early (a lost
    connection), the logs are followed again (flwr log) until the run finishes."""
    unreachable = 0
    while True:
        status = None
        for _ in range(10):  # the status may lag the end of the stream by a moment
            status, details = run_status(run_id, env)
            if status and status.startswith('finished'):
                return status, details
            time.sleep(1)
        if status is None:
            unreachable += 1
            if unreachable >= 3:
                return None, ''
            continue
        print(f'fednnunet_server: run {run_id} is {status}; following its logs again', flush=True)
        subprocess.run([flower_executable('flwr'), 'log', run_id, CONNECTION, '--stream'], env=env)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def check_server_args(parser, args):
    """What argparse cannot say by itself, said as it says it (before anything starts)."""
    phase = args.phase or ('train' if args.continue_training else 'all')
    if phase == 'all' and args.preprocess_configurations and args.c not in args.preprocess_configurations:
        parser.error(f"-c {args.c} must be one of --preprocess-configurations "
                     f"({' '.join(args.preprocess_configurations)}): it is trained right after preprocessing")
    if args.preprocess_configurations and phase in ('train', 'find_best'):
        parser.error(f'--preprocess-configurations applies to planning (--phase plan or all), not to --phase {phase}')
    if phase != 'find_best' and (args.find_best_configurations or args.find_best_folds or args.disable_ensembling):
        parser.error('--find-best-configurations, --find-best-folds and --disable_ensembling apply to --phase '
                     'find_best')
    if phase == 'find_best' and args.continue_training:
        parser.error('--continue resumes a training; --phase find_best trains nothing')


def server_entry(argv=None):
    parser = server_parser()
    args = parser.parse_args(argv)
    check_server_args(parser, args)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the run and the SuperLink, as Ctrl-C does
    try:
        sys.exit(run_server_command(args))
    except CliError as e:
        _fail(str(e))


def run_server_command(args) -> int:
    from fednnunet.flower_app import run_config_toml, write_app
    config = run_config_from_args(args)
    if args.write_app:
        write_app(args.write_app)
        with open(os.path.join(args.write_app, 'run_config.toml'), 'w') as f:
            f.write(run_config_toml(config))
        print(f'wrote {args.write_app}/pyproject.toml and run_config.toml; run it with\n'
              f'  flwr run {args.write_app} <connection> --run-config {args.write_app}/run_config.toml --stream')
        return 0
    if config['phase'] != 'plan':
        from fednnunet.flower_app import check_method
        try:
            check_method(config['method'], json.loads(config['hyperparameters']) if config['phase'] != 'find_best'
                         else {})
        except Exception as e:  # noqa: BLE001 - an unknown method or hyper-parameter, said before anything starts
            raise CliError(str(e)) from None
    _check_security(args, args.superlink.rsplit(':', 1)[0] if args.superlink else args.host, bool(args.auth_keys))
    tls = tls_files(args.tls_dir, need_server=args.superlink is None) if args.tls_dir else None
    work = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix='fednnunet_server_')
    os.makedirs(work, exist_ok=True)
    print(f'fednnunet_server: {WORK_DIR_SAYS} {work}' + ('' if args.work_dir else
          ' (a new temporary folder: --work-dir keeps them in a folder of your choice)'), flush=True)
    flwr_home = os.path.join(work, 'flwr_home')
    env = flower_env(flwr_home)
    # fednnunet's own SuperLink listens on the loopback only; the public port is the Fleet-only proxy in front of it
    superlink_port = free_port() if args.superlink is None else None
    address = args.superlink or f'127.0.0.1:{superlink_port}'
    write_flower_config(flwr_home, address, tls['ca'] if tls else None)
    app_dir = write_app(os.path.join(work, 'app'))
    run_config_file = os.path.join(work, 'run_config.toml')
    with open(run_config_file, 'w') as f:
        f.write(run_config_toml(config))
    from fednnunet.app_pinning import own_app_bundle_hash
    print(f'fednnunet_server: app bundle {own_app_bundle_hash()} (a site runs only the bundle of its own '
          f'fednnunet: fednnunet_site --print-app-hash shows it)', flush=True)

    superlink = proxy = None
    try:
        if args.superlink is None:
            log_path = os.path.join(work, 'superlink.log')
            superlink = start_superlink(args, env, log_path, tls, '127.0.0.1', superlink_port)
            try:
                wait_for_port('127.0.0.1', superlink_port, 60.0, superlink)
            except CliError as e:
                raise CliError(f'the SuperLink did not start ({e}); its log: {log_path}\n' + _tail(log_path)) from None
            proxy_log = os.path.join(work, 'fleet_proxy.log')
            proxy = start_fleet_proxy(args, env, proxy_log, tls, superlink_port)
            try:
                wait_for_port(_local_address(args.host, args.port).rsplit(':', 1)[0], args.port, 60.0, proxy)
            except CliError as e:
                raise CliError(f'the public port did not open ({e}); its log: {proxy_log}\n' +
                               _tail(proxy_log)) from None
            print(f'fednnunet_server: sites connect to {args.host}:{args.port} '
                  f"({'TLS' if tls else 'INSECURE, no TLS'}{', SuperNode authentication' if args.auth_keys else ''}; "
                  f"Flower's Fleet API only), the SuperLink listens on 127.0.0.1:{superlink_port}; logs: {log_path}, "
                  f'{proxy_log}', flush=True)
        if args.auth_keys:
            register_keys(site_keys(args.auth_keys)['paths'], env)
        return run_app(app_dir, run_config_file, env)
    finally:
        end_processes([proxy, superlink], 15.0)


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-n:])
    except OSError:
        return ''


# ============================================================================================ site

def site_parser() -> argparse.ArgumentParser:
    p = FedArgumentParser(
        prog='fednnunet_site',
        description='One hospital in a fednnunet federation over Flower: checks the site\'s data, then runs a Flower '
                    'SuperNode that answers the server (fingerprint, preprocessing, training rounds, validation). '
                    'Images never leave this machine.')
    p.add_argument('--site', required=True, help="this site's name in its sites.json")
    p.add_argument('-d', required=True, help='dataset id or name (under $nnUNet_raw)')
    p.add_argument('--server', required=True, type=address, metavar='HOST:PORT', help="the server's SuperLink address")
    _security_args(p)
    p.add_argument('--auth-key', default=None, metavar='PRIVATE_KEY',
                   help="this site's private key (OpenSSH ECDSA; its .pub goes to the server's --auth-keys)")
    add_device_argument(p)
    p.add_argument('-np', type=int_at_least(1), default=None,
                   help="processes for fingerprinting/preprocessing (default nnU-Net's)")
    p.add_argument('--local-port', type=port, default=None,
                   help='port of the SuperNode\'s local API on 127.0.0.1 (default: a free one)')
    p.add_argument('--max-wait-time', type=positive_number, default=None,
                   help='give up after this many seconds without the server (default: keep trying)')
    p.add_argument('--pull-interval', type=pull_interval, default=0.2, metavar='SECONDS',
                   help="at most this many seconds between the SuperNode's requests for the next message "
                        "(0.05 s in the 3 s after a reply; Flower's own: 3; default 0.2, between 0.05 and 3; its "
                        "local looks for the ClientApp's reply: every 0.02 s; see fednnunet.supernode_runner)")
    p.add_argument('--heartbeat-interval', type=heartbeat_interval, default=30.0, metavar='SECONDS',
                   help="seconds between the SuperNode's heartbeats (Flower's 30; 10-1800): a site that dies is "
                        "declared gone after two intervals without one")
    p.add_argument('--verbose', action='store_true', help="the site's nnU-Net logs in the SuperNode's output")
    p.add_argument('--print-app-hash', action=_PrintAppHash, nargs=0,
                   help='print the sha256 of the app bundle this site runs (its own fednnunet\'s; any other bundle '
                        'is refused) and exit')
    return p


class _PrintAppHash(argparse.Action):
    """--print-app-hash: prints and exits, like --version (no other argument needed)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from fednnunet.app_pinning import own_app_bundle_hash
        print(own_app_bundle_hash())
        parser.exit()


def site_node_config(args, dataset_name: str, num_processes: int) -> dict:
    """What the SuperNode's --node-config and the site daemon are told about the site."""
    return {'site-id': args.site, 'dataset': dataset_name, 'device': device_name(args.device),
            'num-processes': int(num_processes), 'verbose': bool(args.verbose)}


def daemon_command(node_config: dict, socket_path: str) -> List[str]:
    """The site's long-lived process (fednnunet.site_daemon) for this node config."""
    cmd = [sys.executable, '-m', 'fednnunet.site_daemon', '--socket', socket_path, '--site', node_config['site-id'],
           '-d', node_config['dataset'], '--device', node_config['device'], '-np', str(node_config['num-processes']),
           '--parent-pid', str(os.getpid())]
    return cmd + (['--verbose'] if node_config['verbose'] else [])


class SiteDaemonProcess:
    """fednnunet.site_daemon as a child of fednnunet_site, started again if it ends (its trainer is then rebuilt
    from the site's round state on disk)."""

    def __init__(self, cmd: List[str], env: dict):
        self.cmd, self.env = cmd, env
        self.process: Optional[subprocess.Popen] = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._keep_running, daemon=True, name='fednnunet-site-daemon')

    def start(self):
        self._launch()
        self._thread.start()

    def _launch(self):
        self.process = subprocess.Popen(self.cmd, env=self.env)

    def _keep_running(self):
        while not self._stopping.wait(1.0):
            if self.process.poll() is not None and not self._stopping.is_set():
                print(f'fednnunet_site: the site daemon exited (status {self.process.returncode}); starting it '
                      f'again (its trainer is rebuilt from the round state on disk)', file=sys.stderr, flush=True)
                self._launch()

    def stop(self, timeout: float = 60.0):
        self._stopping.set()
        end_processes([self.process], timeout)  # it writes its last round state on SIGTERM


def site_setup(args, superexec_secret_file: str) -> Tuple[List[str], dict]:
    """Checks the site's data and device; returns the SuperNode's command line (Flower's flower-supernode, its
    idle wait between pulls --pull-interval: fednnunet.supernode_runner) and the node config. Process
    isolation, so that the SuperNode starts no ClientApp itself; this site's launcher
    (app_pinning.PinnedClientAppLauncher, holding ``superexec_secret_file``) starts each, after checking the run's
    app bundle, and each hands its message to the site's daemon (fednnunet.site_daemon)."""
    _check_security(args, args.server.rsplit(':', 1)[0], bool(args.auth_key))
    check_device(args.device)
    from fednnunet.errors import FederationError
    from fednnunet.federation import Federation
    try:
        federation = Federation.from_raw(args.d, only_sites=[args.site])
    except FederationError as e:
        raise CliError(str(e)) from None
    site = federation.sites[args.site]
    num_processes = args.np
    if num_processes is None:
        from nnunetv2.configuration import default_num_processes
        num_processes = default_num_processes
    node_config = site_node_config(args, federation.dataset_name, num_processes)
    for key, value in node_config.items():
        if isinstance(value, str) and ('"' in value or "'" in value):
            raise CliError(f'{key} {value!r}: quotes are not allowed in names')
    node_config_text = ' '.join(f'{k}={json.dumps(v)}' for k, v in node_config.items())
    flower_executable('flower-supernode')  # Flower is installed (else a clear error)
    cmd = [sys.executable, '-m', 'fednnunet.supernode_runner', '--pull-interval', str(args.pull_interval),
           '--heartbeat-interval', str(args.heartbeat_interval), '--',
           '--superlink', args.server, '--node-config', node_config_text,
           '--host', '127.0.0.1', '--port', str(args.local_port or free_port()), '--isolation', 'process',
           '--superexec-auth-secret-file', superexec_secret_file]
    if args.tls_dir:
        cmd += ['--root-certificates', tls_files(args.tls_dir, need_server=False)['ca']]
    else:
        cmd += ['--insecure']
    if args.auth_key:
        if not os.path.isfile(args.auth_key):
            raise CliError(f'--auth-key {args.auth_key} does not exist')
        cmd += ['--auth-supernode-private-key', os.path.abspath(args.auth_key)]
    if args.max_wait_time:
        cmd += ['--max-wait-time', str(args.max_wait_time)]
    print(f"fednnunet_site: site '{args.site}' of {federation.dataset_name} ({len(site.cases)} cases), device "
          f"{args.device or 'cuda if available, else cpu'}, server {args.server} "
          f"({'TLS' if args.tls_dir else 'INSECURE, no TLS'}"
          f"{', authenticated' if args.auth_key else ''})", flush=True)
    return cmd, node_config


def site_launcher(supernode_cmd: List[str], secret_file: str, env: dict, socket_path: str, site: str):
    """The SuperExec of the site's SuperNode (app_pinning.PinnedClientAppLauncher, a thread of this process): its
    idle wait between looks for a task is Flower's SuperExec setting of ``env`` (flower_env), and its ClientApps
    hand their message to the site daemon at ``socket_path``."""
    from fednnunet.app_pinning import PinnedClientAppLauncher, own_app_bundle_hash
    from fednnunet.site_daemon import SITE_VARIABLE, SOCKET_VARIABLE
    runtime_api = f"127.0.0.1:{supernode_cmd[supernode_cmd.index('--port') + 1]}"
    return PinnedClientAppLauncher(runtime_api, secret_file, own_app_bundle_hash(),
                                   poll_seconds=float(env['FLWR_SUPEREXEC_TASK_POLL_INTERVAL']),
                                   env={SOCKET_VARIABLE: socket_path, SITE_VARIABLE: site})


def site_entry(argv=None):
    args = site_parser().parse_args(argv)
    from fednnunet.app_pinning import superexec_secret
    from fednnunet.site_daemon import daemon_folder
    with superexec_secret() as secret_file, daemon_folder() as folder:
        try:
            cmd, node_config = site_setup(args, secret_file)
        except CliError as e:
            _fail(str(e))
        env = flower_env(os.environ.get('FLWR_HOME'))
        socket_path = os.path.join(folder, 'site.sock')
        daemon = SiteDaemonProcess(daemon_command(node_config, socket_path), env)
        daemon.start()
        launcher = site_launcher(cmd, secret_file, env, socket_path, args.site)
        print(f'fednnunet_site: this site runs only the app bundle of its own fednnunet, '
              f'{launcher.expected_hash}', flush=True)
        launcher.start()
        try:
            code = supervise_supernode(cmd, env, args.max_wait_time, server=args.server)
        finally:
            launcher.stop()
            daemon.stop()
    sys.exit(code)


def supervise_supernode(cmd: List[str], env: dict, max_wait_time: Optional[float] = None,
                        exit_grace: float = 15.0, server: str = 'the server') -> int:
    """Runs the SuperNode and starts it again when it exits on its own: a SuperNode gives up when the SuperLink
    refuses it (e.g. a restarted SuperLink does not know its node yet, or its key is not registered yet) or is gone
    for long; a site should stay available until it is stopped (Ctrl-C / SIGTERM). Returns the exit status.

    Flower 1.41's SuperNode can say it terminated and then never exit (two threads giving up at once interrupt
    its shutdown handler); a SuperNode still alive ``exit_grace`` seconds after saying so is killed with the
    processes it started (its SuperExec and ClientApps) and started again."""
    stopping = {'signal': None}
    process = {'p': None}

    def forward(signum, _frame):
        # Ctrl-C or a group-wide SIGTERM reaches the SuperNode too (same process group); a second signal during its
        # shutdown can leave it hanging, so it is forwarded only if the SuperNode is still running 3 s later
        if stopping['signal'] is None:
            stopping['signal'], stopping['at'] = signum, time.time()

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    backoff, down_since = 2.0, None
    try:
        while True:
            started = time.time()
            # same process group as this command: whoever stops fednnunet_site's group stops the SuperNode too
            p = process['p'] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            said_terminated = {'at': None, 'connection_error': None}
            reader = threading.Thread(target=_relay_output, args=(p, said_terminated), daemon=True)
            reader.start()
            while p.poll() is None:
                time.sleep(0.5)
                if said_terminated['at'] is not None and time.time() - said_terminated['at'] > exit_grace:
                    print(f'fednnunet_site: the SuperNode said it terminated but is still running after '
                          f'{exit_grace:.0f} s; killing it', file=sys.stderr, flush=True)
                    _kill_tree(p.pid)
                if stopping['signal'] is not None:
                    waited = time.time() - stopping['at']
                    if waited > 30:
                        _kill_tree(p.pid)  # asked to stop 30 s ago
                    elif waited > 3 and not stopping.get('forwarded'):
                        stopping['forwarded'] = True
                        p.send_signal(stopping['signal'])
            code = p.wait()
            reader.join(5.0)
            if stopping['signal'] is not None:
                return 0
            if time.time() - started > 120:  # it had been working: start over with a short wait
                backoff, down_since = 2.0, None
            down_since = down_since or started
            if max_wait_time is not None and time.time() - down_since > max_wait_time:
                print(f'fednnunet_site: the SuperNode keeps exiting (status {code}); giving up after '
                      f'{max_wait_time:.0f} s (--max-wait-time)', file=sys.stderr, flush=True)
                return 1
            if said_terminated['connection_error']:  # Flower's exit-code block, said plainly
                print('fednnunet_site: ' + stamped(f"{connection_problem(server, said_terminated['connection_error'])}"
                                                  f"; retrying in {backoff:.0f} s"), flush=True)
            elif code == 0:  # it gave up on its SuperLink by itself: the server stopped, or restarted without its node
                print('fednnunet_site: ' + stamped(f'the SuperNode ended (the server went away or restarted); '
                                                  f'starting it again in {backoff:.0f} s'), flush=True)
            else:
                print(f'fednnunet_site: the SuperNode exited (status {code}); starting it again in {backoff:.0f} s '
                      f'(is the server up, and this site\'s key registered there?)', file=sys.stderr, flush=True)
            deadline = time.time() + backoff
            while time.time() < deadline and stopping['signal'] is None:
                time.sleep(0.2)
            if stopping['signal'] is not None:
                return 0
            backoff = min(backoff * 2, 30.0)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if process['p'] is not None:
            try:
                process['p'].wait(30.0)
            except subprocess.TimeoutExpired:
                _kill_tree(process['p'].pid)


#: Flower's exit code for a SuperNode whose connection to the SuperLink failed or was refused
_CONNECTION_EXIT = b'Exit Code: 305'
_GENERIC_CONNECTION_LINES = ('Failed to initialize the connection to the SuperLink.',
                             'The SuperNode could not establish a connection to the SuperLink.')


def _relay_output(process: subprocess.Popen, said: dict, out=None):
    """Copies the SuperNode's output to ours; notes when it says it terminated. Flower's error block for a failed
    connection (``Exit Code: 305`` ... ``For more information, visit: <url>``) is not copied: its reason goes to
    ``said['connection_error']``, which the supervisor says in one plain line with its retry."""
    out = out or sys.stdout.buffer
    block = None
    for line in process.stdout:
        if block is not None:
            if b'For more information, visit' in line:
                said['connection_error'], block = _connection_reason(block), None
            else:
                block.append(line)
            continue
        if _CONNECTION_EXIT in line:
            block = []
            continue
        out.write(line)
        out.flush()
        if b'SuperNode terminated gracefully' in line or b'SuperExec terminated gracefully' in line:
            said['at'] = said['at'] or time.time()
    if block is not None:
        said['connection_error'] = _connection_reason(block)


def _connection_reason(lines: List[bytes]) -> str:
    text = [re.sub(r'\x1b\[[0-9;]*m', '', raw.decode('utf-8', 'replace')).strip() for raw in lines]
    text = [t for t in text if t and t not in _GENERIC_CONNECTION_LINES]
    return ' '.join(text)[:300] or 'the connection failed'


def connection_problem(server: str, reason: str) -> str:
    """The SuperNode's failed connection in an operator's words."""
    if 'Failed to activate SuperNode' in reason:  # Flower's public text for a key its SuperLink does not know
        return (f"server {server} does not accept this site's key (yet): it is still starting, or the key is not "
                f"among its --auth-keys")
    return f'server {server} not reachable yet ({reason})'


def _kill_tree(pid: int):
    """SIGKILL to a process and every process below it (its SuperExec and ClientApps); Linux /proc, elsewhere the
    process alone."""
    children = {}
    try:
        for entry in os.listdir('/proc'):
            if entry.isdigit():
                try:
                    with open(f'/proc/{entry}/stat') as f:
                        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
    except OSError:
        pass
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ('server', 'site'):
        print('usage: python -m fednnunet.flower_cli server|site ...', file=sys.stderr)
        sys.exit(2)
    (server_entry if argv[0] == 'server' else site_entry)(argv[1:])


if __name__ == '__main__':
    main()
