"""The process between the watchdog and one trainer attempt; nothing it starts outlives either.

    watchdog --(new session)--> shim --(fork/exec)--> trainer --> DataLoader workers, ...

The shim is a child subreaper, so orphaned descendants are re-parented to it, not to init. It asks
the kernel for SIGUSR2 when the watchdog dies (PR_SET_PDEATHSIG; works even for SIGKILL) and then
kills every descendant. The trainer gets PR_SET_PDEATHSIG=SIGKILL towards the shim as well.
SIGTERM/SIGINT to the shim are forwarded to the trainer. The shim exits with the trainer's status:
the same code, or the same signal re-raised on itself.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
ENV_WATCHDOG_PID = "SUPERVISOR_WATCHDOG_PID"


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:  # pragma: no cover - only on kernels without prctl
        raise OSError(ctypes.get_errno(), "prctl failed")


def _descendants(root: int) -> list[int]:
    """Pids below `root`, read from /proc (psutil would do, but the shim stays tiny)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_descendants(root: int) -> None:
    """SIGKILL every process below `root` and reap what is ours to reap."""
    for _ in range(3):  # a dying process may have forked once more
        pids = _descendants(root)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _reap_all()


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            # Children remain (killed but not yet reaped): wait for them.
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return


def _exit_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        sys.stderr.write("usage: python -m supervisor.shim -- COMMAND [ARGS...]\n")
        os._exit(2)
    me = os.getpid()
    watchdog = int(os.environ.pop(ENV_WATCHDOG_PID, "0") or 0)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)

    def on_watchdog_death(signum: int, frame: object) -> None:
        kill_descendants(me)
        os._exit(128 + signal.SIGKILL)

    signal.signal(signal.SIGUSR2, on_watchdog_death)
    _prctl(PR_SET_PDEATHSIG, signal.SIGUSR2)
    if watchdog and os.getppid() != watchdog:  # the watchdog died before prctl took effect
        os._exit(128 + signal.SIGKILL)

    # Block forwarded signals around fork so none is lost between fork and handler install.
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    pid = os.fork()
    if pid == 0:
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != me:
                os._exit(128 + signal.SIGKILL)
            for sig in (*forwarded, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
            os.execvp(argv[0], argv)
        except OSError as exc:
            sys.stderr.write(f"supervisor: cannot run {argv[0]!r}: {exc.strerror}\n")
            os._exit(127)

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in forwarded:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)

    status = 0
    while True:
        try:
            done, st = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if done == pid:
            status = st
            break
    kill_descendants(me)
    _exit_like(status)


if __name__ == "__main__":
    main(sys.argv[1:])
