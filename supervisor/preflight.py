"""Checks that the trainer can be launched at all, made before a run writes anything.

A command that cannot be found would otherwise fail every attempt the same way, each burning a
seed and a restart, until the run gives up; `validate` and `start` say so at once instead.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from supervisor.attempt import build_argv
from supervisor.config import RunConfig

_PLACEHOLDER = re.compile(r"\{\w+\}")
_PYTHON = re.compile(r"python[0-9.]*")


def command_problems(cfg: RunConfig) -> list[str]:
    """One line per reason the trainer command cannot be run as configured; [] when it can.

    The command is filled as an attempt fills it (a leading python runs this interpreter);
    parts still holding a placeholder ({seed}, {load_path}, ...) are not checked. A first word with
    a slash resolves against the trainer's cwd, others against the PATH attempts get (that of
    [trainer] env if it sets one). For python, a first argument naming a .py script must exist.
    """
    cwd = cfg.base_dir / (cfg.trainer.cwd or ".")
    if not cwd.is_dir():
        what = "does not exist" if not cwd.exists() else "is not a directory"
        return [f"trainer.cwd: {str(cwd)!r} {what}; create it or fix [trainer] cwd"]
    argv = build_argv(cfg, {"python": sys.executable})
    program = argv[0]
    if _PLACEHOLDER.search(program):
        return []
    problems = []
    if "/" in program:
        path = cwd / program  # execvp expands no ~, so neither do we
        if not path.exists():
            problems.append(f"trainer.command: {program!r} does not exist (looked in {cwd}); fix the path")
        elif not path.is_file():
            problems.append(f"trainer.command: {program!r} is not a file; give the path of a program")
        elif not os.access(path, os.X_OK):
            problems.append(f"trainer.command: {program!r} is not executable; chmod +x it or run it through "
                            "its interpreter (e.g. bash script.sh)")  # fmt: skip
    else:
        given = cfg.trainer.env.get("PATH")
        # The trainer's exec resolves relative PATH entries (and an empty one) against its own cwd.
        entries = (given if given is not None else os.environ.get("PATH", os.defpath)).split(os.pathsep)
        search = os.pathsep.join(str(cwd / entry) for entry in entries)
        if shutil.which(program, path=search) is None:
            where = "the PATH set in [trainer] env" if given is not None else "PATH"
            problems.append(f"trainer.command: {program!r} was not found on {where}; check the spelling or "
                            "give its full path")  # fmt: skip
    script = argv[1] if _PYTHON.fullmatch(Path(program).name) and len(argv) > 1 else ""
    checkable = script.endswith(".py") and not script.startswith("-") and not _PLACEHOLDER.search(script)
    if checkable and not (cwd / script).is_file():
        problems.append(f"trainer.command: script {script!r} does not exist (looked in {cwd}); fix its path or "
                        "[trainer] cwd")  # fmt: skip
    return problems
