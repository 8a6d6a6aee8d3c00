"""The simulation with one long-lived process per site, so that sites on different devices train at the same time.

The default simulation engine (:mod:`fednnunet.engines.simulation`) runs every site in one process, one after the
other, on one device. On a machine with several GPUs that leaves all but one idle. This engine starts one site
process per site (fednnunet's site daemon, :mod:`fednnunet.site_daemon`: the same SiteWorker, keeping its trainer
and nnU-Net's augmentation workers across rounds) and gives each site a device. Sites on different devices are
asked at the same time; sites that share a device take turns on it, in the order asked. Messages cross a Unix
socket (in a folder only this user can enter) in fednnunet's wire format, exactly what the in-process simulation
sends; a site's error is raised here with its type and text, the first site's in the order asked.

Devices: ``cuda:N`` (the site's process sees only GPU N: CUDA_VISIBLE_DEVICES), ``cuda``, ``mps``, ``cpu``, and
``cpu:N`` (the CPU, as a group of its own: sites on ``cpu:0`` and ``cpu:1`` train at the same time, each with its
share of the cores; sites on ``cpu`` take turns). :func:`gpu_site_devices` spreads sites over the GPUs.
"""
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

from fednnunet.child_processes import end_processes
from fednnunet.errors import FederationError
from fednnunet.site_daemon import DaemonUnavailable, ask_daemon, daemon_folder
from fednnunet.site_training import CPU_THREADS_VARIABLE
from fednnunet.wire import Message, encoded_size

#: errors a site raises that the commands report plainly (the rest keep their type name, see remote_error)
SITE_ERRORS = {'FederationError': FederationError, 'ValueError': ValueError,
               'NotImplementedError': NotImplementedError, 'FileNotFoundError': FileNotFoundError}
DEVICE = re.compile(r'^(cpu|cuda|mps)(?::(\d{1,3}))?$')


def parse_site_devices(specs: List[str], sites: List[str]) -> Dict[str, str]:
    """``--site-devices A=cuda:0 B=cuda:1 ...``: every site named once, each with a device of the form above."""
    devices = {}
    for spec in specs:
        site, sep, device = spec.partition('=')
        if not sep or site not in sites:
            raise FederationError(f"--site-devices {spec!r}: expected SITE=DEVICE with SITE one of {sites}")
        if site in devices:
            raise FederationError(f'--site-devices names site {site!r} twice')
        if not DEVICE.match(device) or device.startswith('mps:'):
            raise FederationError(f"--site-devices {spec!r}: the device must be cuda, cuda:N, cpu, cpu:N or mps",
                                  site=site)
        devices[site] = device
    missing = [s for s in sites if s not in devices]
    if missing:
        raise FederationError(f'--site-devices gives no device for site(s) {missing}')
    return devices


def gpu_site_devices(sites: List[str], num_gpus: int) -> Dict[str, str]:
    """Sites spread over ``num_gpus`` GPUs in turn (site i on GPU i mod num_gpus)."""
    return {site: f'cuda:{i % num_gpus}' for i, site in enumerate(sites)}


class SiteProcessEngine:
    """The engine contract of :mod:`fednnunet.engines.simulation`, with every site in its own process."""

    def __init__(self, federation, site_devices: Dict[str, str], num_processes: int = 1, verbose: bool = False,
                 start_timeout: float = 300.0):
        self.devices = dict(site_devices)
        self.bytes_sent: Dict[str, int] = {s: 0 for s in federation.sites}
        self.bytes_received: Dict[str, int] = {s: 0 for s in federation.sites}
        self.missing: Dict[str, str] = {}
        #: (site, message kind, start, end) of every message, in the order they ended
        self.timeline: List[tuple] = []
        self._sites = list(federation.sites)
        self._folder_context = daemon_folder()
        self.folder = self._folder_context.__enter__()
        self.sockets = {s: os.path.join(self.folder, f'site_{i}.sock') for i, s in enumerate(self._sites)}
        self.processes: Dict[str, subprocess.Popen] = {}
        cpu_groups = {d for d in self.devices.values() if d.startswith('cpu')}
        try:
            for site in self._sites:
                self.processes[site] = self._start(federation.dataset_name, site, num_processes, verbose,
                                                   max(1, (os.cpu_count() or 1) // max(1, len(cpu_groups))))
            self._wait_until_listening(start_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def site_names(self):
        return list(self._sites)

    def _start(self, dataset: str, site: str, num_processes: int, verbose: bool, cpu_threads: int):
        kind, _, index = self.devices[site].partition(':')
        env = dict(os.environ)
        if kind == 'cuda' and index:
            env['CUDA_VISIBLE_DEVICES'] = index
        if kind == 'cpu':
            env[CPU_THREADS_VARIABLE] = str(cpu_threads)
        from fednnunet.flower_cli import daemon_command  # the same site daemon fednnunet_site starts
        cmd = daemon_command({'site-id': site, 'dataset': dataset, 'device': kind, 'num-processes': num_processes,
                              'verbose': verbose}, self.sockets[site])
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def _wait_until_listening(self, timeout: float):
        deadline = time.time() + timeout
        for site, p in self.processes.items():
            while not os.path.exists(self.sockets[site]):
                if p.poll() is not None:
                    raise FederationError(f'the site process ended at its start (status {p.returncode}); see its '
                                          f'output above', site=site)
                if time.time() > deadline:
                    raise FederationError(f'the site process did not start within {timeout:.0f} s', site=site)
                time.sleep(0.1)

    def ask(self, requests: Dict[str, Message]) -> Dict[str, Message]:
        """Each site's request; sites on different devices at the same time, sites sharing one in turn."""
        self.missing = {}
        groups: Dict[str, List[str]] = {}
        for site in requests:
            groups.setdefault(self.devices[site], []).append(site)
        replies: Dict[str, Message] = {}
        errors: Dict[str, BaseException] = {}

        def run_group(sites):
            for site in sites:
                try:
                    replies[site] = self._ask_one(site, requests[site])
                except BaseException as e:  # noqa: B036 - raised below, in the order asked
                    errors[site] = e
                    return  # the sites after it on this device are not asked (as in the in-process simulation)
        if len(groups) == 1:
            run_group(next(iter(groups.values())))
        else:
            with ThreadPoolExecutor(len(groups), thread_name_prefix='fednnunet-device') as threads:
                list(threads.map(run_group, groups.values()))
        for site in requests:
            if site in errors:
                raise errors[site]
        return {site: replies[site] for site in requests}

    def _ask_one(self, site: str, message: Message) -> Message:
        self.bytes_sent[site] += encoded_size(message)
        started = time.time()
        try:
            reply = ask_daemon(self.sockets[site], message)
        except DaemonUnavailable as e:
            raise FederationError(f'the site process is gone: {e}', site=site) from None
        except RuntimeError as e:
            known = SITE_ERRORS.get(type(e).__name__)  # the site's own check: the same error type here
            if known is not None:
                raise known(str(e)) from None
            raise
        finally:
            self.timeline.append((site, message.kind, started, time.time()))
        self.bytes_received[site] += encoded_size(reply)
        return reply

    def ask_all(self, message: Message) -> Dict[str, Message]:
        return self.ask({s: message for s in self._sites})

    def close(self, timeout: float = 120.0):
        """Ends the site processes (each writes its last round state first) and removes their sockets."""
        end_processes(self.processes.values(), timeout)
        if self._folder_context is not None:
            context, self._folder_context = self._folder_context, None
            context.__exit__(None, None, None)
