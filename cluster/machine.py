"""`baton launch`: runs one machine's share of a cluster's placement, and follows the placement as it changes.

It reads the placement from etcd (`placement_store`), starts the machine's nodes and router as `baton node` /
`baton router` processes, and watches the placement key. On every change, `reconcile` (pure: what runs,
what should) says which processes to stop, to restart and to start:
  node added             start it
  node removed           SIGTERM (it leaves etcd, drains its running work, exits), SIGKILL past its stop timeout
  node changed           the same stop, then a start with the new settings (a role, tp, GPU, port, model or
                         option change: anything in its command line)
Stops come first and run together, starts after, so two nodes may swap GPUs or ports in one change. When the
machine's assignment or the whole placement goes, or on SIGINT/SIGTERM, it stops what it started (router
first) and exits 0.

Processes are started as `baton up` starts them (launch.py): their own session, `--parent-pid` (nothing
outlives this process, even SIGKILLed), one log per process in the log folder, and from the main thread, the
one that runs the event loop (a child's parent-death signal fires when the thread that forked it ends).

GPUs: a node on `cuda` gets `CUDA_VISIBLE_DEVICES` set to its GPU ids, and `--device cuda`: the engine puts
rank r on cuda:r, the r-th visible GPU, so a node's ids need not be contiguous. Every rank of a node sees all of
the node's GPUs, which NCCL needs for peer-to-peer copies between them. A node does not see other nodes' GPUs:
a KV transfer over the pair channel between two nodes of one machine then goes through host memory (NCCL's
shared-memory transport) rather than peer-to-peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aetcd

from baton.common.grpc_server import SHUTDOWN_GRACE_S
from baton.common.loops import retrying
from baton.cluster.placement import ROUTER, Placement, PlacementError
from baton.cluster.placement_store import PlacementWatch

log = logging.getLogger("launch")

START_RETRY_S = 60.0  # how long start-up keeps trying to reach etcd
KILL_MARGIN_S = 5.0  # past a process's own deadline (drain + SHUTDOWN_GRACE_S), SIGKILL


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One process to run: `python -m baton.cluster.cli <args>` with `env` added. Two specs that differ in
    anything mean a restart."""
    name: str  # the node's name, or ROUTER
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    stop_timeout: float = SHUTDOWN_GRACE_S + KILL_MARGIN_S  # from SIGTERM to SIGKILL
    # A node that follows the placement (--follow-placement): the role it starts in. It changes role in place
    # when the placement gives it another, so a change of this alone restarts nothing.
    role: str = ""

    def command(self) -> tuple[str, ...]:
        return self.args + (("--role", self.role) if self.role else ())

    def settings(self) -> ProcessSpec:
        """What a change of restarts the process: everything but the role it follows by itself."""
        return dataclasses.replace(self, role="")


@dataclass(frozen=True, slots=True)
class MachineFiles:
    """This machine's copies of the cluster's secrets, as `baton launch` was given them ("": not given). The
    placement says which the cluster uses (options auth, tls, mtls); each machine has its own paths."""
    secret: str = ""  # --cluster-secret-file: nodes answer members only; routers call them as one
    tls_cert: str = ""  # --tls-cert/--tls-key: the router's public fronts (options.tls)
    tls_key: str = ""
    mtls_cert: str = ""  # --mtls-cert/--mtls-key/--mtls-ca: members over mutual TLS (options.mtls)
    mtls_key: str = ""
    mtls_ca: str = ""


def machine_processes(p: Placement, machine: str, etcd_url: str,
                      files: MachineFiles = MachineFiles()) -> dict[str, ProcessSpec]:
    """What `machine` must run under placement `p`, by name. Its processes reach etcd at `etcd_url` (the URL
    `baton launch` was given: the address that works from this machine). A placement that asks for a secret
    this machine was not given raises PlacementError naming the option and the flag: starting its processes
    without would open a closed cluster, or leave them unable to reach it."""
    m = p.machine(machine)
    if m is None:
        return {}
    o = p.options
    wants = [("auth", o.auth, files.secret, "--cluster-secret-file"),
             ("tls", o.tls and m.router is not None, files.tls_cert, "--tls-cert and --tls-key"),
             ("mtls", o.mtls, files.mtls_cert, "--mtls-cert, --mtls-key and --mtls-ca")]
    for option, wanted, given, flags in wants:
        if wanted and not given:
            raise PlacementError(f"options.{option}", f"the placement asks for {option}: start `baton launch "
                                                      f"--machine {machine}` with {flags}")
    model = ("--model", p.model.path) if p.model.path else ()
    common = ("--etcd", etcd_url, "--cluster", p.cluster) + model
    common += ("--cluster-secret-file", files.secret) if files.secret else ()
    common += ("--mtls-cert", files.mtls_cert, "--mtls-key", files.mtls_key, "--mtls-ca", files.mtls_ca) \
        if o.mtls else ()
    out = {}
    if m.router is not None:
        public = ("--auth",) if o.auth else ()
        public += ("--tls-cert", files.tls_cert, "--tls-key", files.tls_key) if o.tls else ()
        out[ROUTER] = ProcessSpec(ROUTER, ("router", *common, *public, "--host", m.router.host or m.host,
                                           "--port", str(m.router.port), "--http-port", str(m.router.http_port),
                                           *(("--advertise-host", m.advertise_host) if m.advertise_host else ()),
                                           *(("--routing", m.router.routing) if m.router.routing != "kv" else ())))
    engine = ("--device", p.model.device, "--kernels", p.model.kernels, "--kv-path", o.kv_path,
              "--drain-timeout", str(o.drain_timeout))
    engine += ("--dtype", p.model.dtype) if p.model.dtype else ()
    engine += ("--num-kv-blocks", str(o.num_kv_blocks)) if o.num_kv_blocks else ()
    engine += ("--max-num-seqs", str(o.max_num_seqs)) if o.max_num_seqs else ()
    engine += ("--advertise-host", m.advertise_host) if m.advertise_host else ()
    engine += () if o.enable_prefix_caching else ("--no-enable-prefix-caching",)
    in_place = o.role_change == "in_place"
    for n in m.nodes:
        role = ("--follow-placement",) if in_place else ("--role", n.role)
        args = ("node", *role, "--node-id", n.name, "--tp", str(n.tp), "--host", m.host, "--port", str(n.port),
                *common, *engine)
        env: tuple[tuple[str, str], ...] = ()
        if n.threads:
            args += ("--threads", str(n.threads))
            env += (("OMP_NUM_THREADS", str(n.threads)),)
        if p.model.device == "cuda":
            env += (("CUDA_VISIBLE_DEVICES", ",".join(map(str, n.gpus))),)
        out[n.name] = ProcessSpec(n.name, args, env, o.drain_timeout + SHUTDOWN_GRACE_S + KILL_MARGIN_S,
                                  role=n.role if in_place else "")
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    stop: tuple[str, ...] = ()  # running, no longer wanted
    restart: tuple[str, ...] = ()  # running with other settings: stopped (drained), then started again
    start: tuple[str, ...] = ()  # wanted, not running
    rerole: tuple[str, ...] = ()  # running, only its role changed: it changes role in place by itself

    def __bool__(self) -> bool:
        return bool(self.stop or self.restart or self.start or self.rerole)

    def describe(self) -> str:
        parts = [(verb, names) for verb, names in (("stop", self.stop), ("restart", self.restart),
                                                   ("start", self.start), ("change role in place", self.rerole))
                 if names]
        return "; ".join(f"{verb} {', '.join(names)}" for verb, names in parts) or "nothing to do"


def reconcile(running: Mapping[str, ProcessSpec], wanted: Mapping[str, ProcessSpec]) -> Plan:
    """What turns `running` into `wanted` (both by name). Pure: no I/O, no clock."""
    kept = [n for n in running if n in wanted]
    return Plan(stop=tuple(sorted(n for n in running if n not in wanted)),
                restart=tuple(sorted(n for n in kept if running[n].settings() != wanted[n].settings())),
                start=tuple(sorted(n for n in wanted if n not in running)),
                rerole=tuple(sorted(n for n in kept if running[n].settings() == wanted[n].settings()
                                    and running[n].role != wanted[n].role)))


# -- the processes -----------------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class Child:
    spec: ProcessSpec
    proc: subprocess.Popen
    exited: asyncio.Future  # its exit status, set the moment it exits
    terminated: bool = False  # SIGTERM sent: a second one would make a node skip its drain


class Supervisor:
    """Starts and stops this machine's processes; learns of each exit at once (a pidfd on the event loop)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}

    def running(self) -> dict[str, ProcessSpec]:
        return {name: c.spec for name, c in self.children.items() if not c.exited.done()}

    async def apply(self, plan: Plan, wanted: Mapping[str, ProcessSpec]) -> None:
        for name in plan.rerole:  # the node follows the placement itself; a later restart starts it so
            self.children[name].spec = wanted[name]
        await self.stop(plan.stop + plan.restart)
        for name in plan.restart + plan.start:
            self.start(wanted[name])

    def start(self, spec: ProcessSpec) -> None:
        loop = asyncio.get_running_loop()
        cmd = [sys.executable, "-m", "baton.cluster.cli", *spec.command(), "--parent-pid", str(os.getpid())]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **dict(spec.env)}
        with open(self.log_dir / f"{spec.name}.log", "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
            # Own session: a Ctrl-C meant for `baton launch` reaches only it, and it stops the children in order.
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        exited = loop.create_future()
        child = self.children[spec.name] = Child(spec, proc, exited)
        pidfd = os.pidfd_open(proc.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            code = proc.wait()
            if not child.terminated:
                log.warning("%s exited by itself with status %s (log: %s)", spec.name, code,
                            self.log_dir / f"{spec.name}.log")
            exited.set_result(code)

        loop.add_reader(pidfd, on_exit)
        log.info("started %s (pid %d)", spec.name, proc.pid)

    async def stop(self, names: tuple[str, ...] | list[str]) -> None:
        """SIGTERM (once) to each, then wait for them together; SIGKILL one past its stop timeout."""
        children = [self.children[n] for n in names if n in self.children and not self.children[n].exited.done()]
        for c in children:
            if not c.terminated:
                c.terminated = True
                c.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(self._reap(c) for c in children))

    async def _reap(self, c: Child) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(c.exited), c.spec.stop_timeout)
        except TimeoutError:
            log.warning("%s still running %.0f s after SIGTERM: killing it", c.spec.name, c.spec.stop_timeout)
            c.proc.kill()
            await c.exited
        log.info("stopped %s (status %s)", c.spec.name, c.exited.result())

    async def stop_all(self) -> None:
        # The router first: no new requests while the nodes drain what they run.
        await self.stop([ROUTER] if ROUTER in self.children else [])
        await self.stop([n for n in self.children if n != ROUTER])


# -- the command -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LaunchConfig:
    machine: str
    etcd: str
    cluster: str
    log_dir: str = ""  # "": a fresh temporary folder
    files: MachineFiles = MachineFiles()  # the cluster's secrets on this machine


async def follow(cfg: LaunchConfig, supervisor: Supervisor) -> int:
    """Applies each new placement to this machine until its assignment or the placement is removed."""
    watch = await retrying(lambda: PlacementWatch.start(cfg.etcd, cfg.cluster), (aetcd.ClientError,),
                           START_RETRY_S, "reading the placement")
    try:
        version, seen = 0, False
        while True:
            version, value = await watch.newer(version)
            placement = None
            if value is not None:
                try:
                    placement = Placement.from_json(value)
                except PlacementError as e:  # written by another version of Baton: keep what runs
                    log.error("ignoring a placement this version cannot read: %s", e)
                    continue
            if placement is None or placement.machine(cfg.machine) is None:
                if seen:
                    log.info("%s: stopping everything", "the placement was removed" if placement is None
                             else f"machine {cfg.machine} left the placement")
                    return 0
                log.info("waiting for a placement of cluster %s that names machine %s%s", cfg.cluster, cfg.machine,
                         f" (it names {', '.join(m.name for m in placement.machines)})" if placement else "")
                continue
            seen = True
            try:
                wanted = machine_processes(placement, cfg.machine, cfg.etcd, cfg.files)
            except PlacementError as e:  # this machine lacks a secret the cluster now uses: keep what runs
                log.error("cannot apply placement version %d: %s", version, e)
                continue
            plan = reconcile(supervisor.running(), wanted)
            log.info("placement (version %d): %s", version, plan.describe())
            await supervisor.apply(plan, wanted)
    finally:
        await watch.close()


async def launch(cfg: LaunchConfig, stop: asyncio.Event) -> int:
    log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix=f"baton-{cfg.machine}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"baton: launching machine {cfg.machine} of cluster {cfg.cluster} (etcd {cfg.etcd}, logs in {log_dir})",
          flush=True)
    supervisor = Supervisor(log_dir)
    following = asyncio.create_task(follow(cfg, supervisor))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if following.done():
            return following.result()
        log.info("stop signal: stopping everything")
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        return 0
    finally:
        stopping.cancel()
        await supervisor.stop_all()


def run_launch(cfg: LaunchConfig) -> int:
    """Process entry point. SIGINT/SIGTERM are blocked before any thread exists (`cli.main`) and taken by one
    thread with `sigwait`, as `baton up` does: no handler runs inside half-done work, and a second signal
    cannot interrupt the clean-up."""
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s launch[{cfg.machine}] %(levelname)s %(message)s")
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        stop = asyncio.Event()

        def take_signals() -> None:
            while True:
                signal.sigwait(stops)
                with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting anyway
                    loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=take_signals, name="signals", daemon=True).start()
        return runner.run(launch(cfg, stop))
