"""A private, single-member etcd server for `baton up` and for tests.

Each server gets free loopback ports and a fresh temporary folder (data in `data/`, the server's output in
`etcd.log`), so two clusters on one host never collide. `stop()` removes the folder; `restart()` keeps ports
and data, as a crashed-and-restarted etcd would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from baton.cluster.orphans import supervise_command

_SETUP_HINT = (
    "the etcd server binary was not found on PATH; run the README's set-up (`make venv` installs it, "
    "or `apt-get install -y etcd-server`)"
)


def free_port(host: str = "127.0.0.1") -> int:
    # The port is free when we ask; another process could take it before it is bound (EtcdServer.start()
    # survives that by retrying with new ports).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cleanup(proc_box: list, root: str) -> None:
    # Runs at stop() or, if the owner forgot, at garbage collection / interpreter exit (weakref.finalize).
    if proc_box and proc_box[0] is not None:
        _terminate(proc_box[0], 5.0)
    shutil.rmtree(root, ignore_errors=True)


class EtcdServer:
    """`with EtcdServer() as etcd: ... etcd.url ...`, or `start()` / `stop()` explicitly."""

    def __init__(self, *, start_timeout: float = 15.0, stop_timeout: float = 5.0, name: str = "baton") -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.name = name
        self.client_port = 0
        self.peer_port = 0
        self.root: Path | None = None
        # A one-slot box, shared with the finalizer, so it always sees the current process.
        self._proc_box: list[subprocess.Popen | None] = [None]
        self._finalizer: weakref.finalize | None = None

    # -- properties ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def pid(self) -> int | None:
        proc = self._proc_box[0]
        return proc.pid if proc is not None else None

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "server not started"
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "server not started"
        return self.root / "etcd.log"

    def running(self) -> bool:
        proc = self._proc_box[0]
        return proc is not None and proc.poll() is None

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> EtcdServer:
        if self.running():
            raise RuntimeError("etcd server already running")
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError(_SETUP_HINT)
        self.root = Path(tempfile.mkdtemp(prefix="baton-etcd-"))
        self._finalizer = weakref.finalize(self, _cleanup, self._proc_box, str(self.root))
        try:
            # Free ports can be taken between probing and binding: try fresh ones a few times.
            for attempt in range(3):
                shutil.rmtree(self.data_dir, ignore_errors=True)  # no half-made member from a failed try
                self.client_port, self.peer_port = free_port(), free_port()
                if self._launch(binary, first=True, last_try=attempt == 2):
                    return self
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")

    def restart(self) -> None:
        """Stop the process and start it again on the same ports and data (its keys and leases survive)."""
        self.kill_process()
        self.relaunch()

    def relaunch(self) -> None:
        """Start the server again on its ports and data after its process ended (`kill_process`)."""
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError(_SETUP_HINT)
        if self.running():
            raise RuntimeError("etcd server already running")
        self._launch(binary, first=False, last_try=True)

    def kill_process(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """End the server process (SIGTERM, then SIGKILL after stop_timeout) but keep ports and data."""
        proc = self._proc_box[0]
        if proc is None:
            return
        if sig == signal.SIGTERM:
            _terminate(proc, self.stop_timeout)
        else:
            if proc.poll() is None:
                proc.send_signal(sig)
            proc.wait(self.stop_timeout)

    def stop(self) -> None:
        """End the server and remove its folder. Safe to call twice."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc_box[0] is not None:
            _terminate(self._proc_box[0], self.stop_timeout)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------------
    def _command(self, binary: str) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"baton-{os.getpid()}-{self.client_port}",
            # One member has no peers to hear from: a short election timeout makes a restart serve in well
            # under a second instead of 1-2 s. It also lowers etcd's minimum lease TTL (1.5 election
            # timeouts, rounded up) from 2 s to 1 s.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
        ]

    def _launch(self, binary: str, *, first: bool, last_try: bool) -> bool:
        with open(self.log_path, "ab") as log:
            log.write(f"--- {' '.join(self._command(binary))}\n".encode())
            log.flush()
            # Own session: a Ctrl-C meant for `baton up` must not kill etcd before nodes revoke their leases.
            # Under a supervisor: if this process is SIGKILLed, etcd stops and its folder goes all the same.
            proc = subprocess.Popen(
                supervise_command(self._command(binary), remove=[str(self.root)]), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._proc_box[0] = proc
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._healthy():
                return True
            try:
                # Doubles as the poll interval and as the check that etcd did not exit (e.g. port taken).
                proc.wait(0.02)
            except subprocess.TimeoutExpired:
                continue
            if first and not last_try:
                return False  # try again with other ports
            raise RuntimeError(f"etcd exited with status {proc.returncode}; log:\n{self._log_tail()}")
        _terminate(proc, self.stop_timeout)
        raise TimeoutError(f"etcd not healthy after {self.start_timeout:.0f} s; log:\n{self._log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as r:
                return r.status == 200 and b'"true"' in r.read()
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"
