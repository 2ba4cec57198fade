"""OSError -> (exit code, one line): what a failed file operation means for the user and the fix.

Shared by the CLI (its last net around `start`) and the watchdog, so a full disk reads the same
wherever it is noticed.
"""

from __future__ import annotations

import errno

from supervisor.exits import EXIT_PAUSED, EXIT_USAGE

# Conditions the user can clear without touching run.toml: a run pauses (exit 75) and the same
# command continues it once they are cleared.
_PASSING: dict[int, str] = {
    errno.ENOSPC: "free disk space on that filesystem (or set another run_dir)",
    errno.EDQUOT: "free space within your disk quota (or set another run_dir)",
    errno.EROFS: "remount the filesystem read-write (or set another run_dir)",
    errno.EACCES: "fix the permissions of that path (or set another run_dir)",
    errno.EPERM: "fix the permissions of that path (or set another run_dir)",
    errno.EIO: "the device reported an I/O error: check the disk (dmesg)",
}
_OTHER_FIX = "check that path and run_dir in run.toml"


def describe_os_error(exc: OSError, doing: str) -> tuple[int, str]:
    """(exit code, one line without a trailing newline) for `exc` raised while `doing` (a verb: "write").

    Exit 75 (paused) for ENOSPC, EDQUOT, EROFS, EACCES, EPERM and EIO, which may pass; 2 for the rest.
    The line reads `cannot <doing> <filename>: <strerror>; <fix>` and holds nothing but the path.
    """
    if exc.errno in _PASSING:
        code, fix = EXIT_PAUSED, f"{_PASSING[exc.errno]}, then run the same command again"
    else:
        code, fix = EXIT_USAGE, _OTHER_FIX
    what = f"{doing} {_one_line(str(exc.filename))}" if exc.filename is not None else doing
    reason = exc.strerror or (str(exc) if str(exc) else type(exc).__name__)
    return code, f"cannot {what}: {_one_line(reason)}; {fix}"


def _one_line(text: str) -> str:
    """`text` fit for a single line: a path with a newline in it is shown quoted."""
    return repr(text) if "\n" in text or "\r" in text else text
