"""Nothing a command starts may outlive it, even when it is SIGKILLed.

Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`) does it, set in the child. It must not be set from
`Popen(preexec_fn=...)` in a threaded parent (running Python between fork and exec there can deadlock), so
each kind of child sets it itself:
- Baton's own processes (nodes, the router) call `die_with_parent` first thing in `main`;
- a foreign binary (the etcd server) runs under a supervisor (`supervise_command`, then `main`), a small single-threaded Python process that
  dies with its parent, takes its child down with it, and, when it was the parent that died, removes the
  folders it was given (etcd's temporary data), which the dead parent can no longer do.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1
# The signal a supervisor gets when its parent dies: distinct from SIGTERM, which means "stop the child, keep
# its folders" (the parent restarting etcd on the same data, say).
PARENT_DIED = signal.SIGUSR1


def _prctl_pdeathsig(sig: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """This process gets `sig` when the thread that started it ends; if the parent is already gone (it died
    between our fork and this call), `sig` comes at once."""
    _prctl_pdeathsig(sig)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def unblock_stop_signals() -> None:
    # A child inherits its parent's signal mask through exec: `baton up` blocks SIGINT/SIGTERM while it runs.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def supervise_command(cmd: list[str], *, remove: list[str] | None = None) -> list[str]:
    """The command line that runs `cmd` under a supervisor tied to this process (see `main`)."""
    extra = [part for path in remove or [] for part in ("--remove", path)]
    return [sys.executable, "-m", "baton.cluster.orphans", "--parent-pid", str(os.getpid()), *extra, "--", *cmd]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run a command that dies with this process's parent")
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--remove", action="append", default=[], help="folder to remove if the parent dies")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    unblock_stop_signals()
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, PARENT_DIED):
        signal.signal(sig, lambda s, _f: received.append(s))
    die_with_parent(args.parent_pid, PARENT_DIED)
    # This process has no threads, so Python between fork and exec is safe here: the child dies with us
    # even if we are SIGKILLed.
    child = subprocess.Popen(cmd, preexec_fn=lambda: _prctl_pdeathsig(signal.SIGKILL))
    while child.poll() is None:
        if received:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(5.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            break
        try:
            child.wait(0.2)  # signal handlers run between waits
        except subprocess.TimeoutExpired:
            pass
    if PARENT_DIED in received:
        for path in args.remove:
            shutil.rmtree(path, ignore_errors=True)
    return child.returncode if child.returncode is not None and child.returncode >= 0 else 0


if __name__ == "__main__":
    sys.exit(main())
