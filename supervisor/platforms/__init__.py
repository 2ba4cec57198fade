"""Where the supervisor runs: detection and the session clock (Kaggle and Colab end sessions at 12 h).

Facts and sources: docs/platforms.md ("Kaggle", "Colab").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

TWELVE_HOURS = 12 * 3600.0


@dataclass(frozen=True)
class Platform:
    name: str
    session_limit_s: float | None
    session_start: float  # unix time the session (container/VM) began

    @property
    def session_end(self) -> float | None:
        """Unix time the session ends, or None when it has no limit."""
        if self.session_limit_s is None:
            return None
        return self.session_start + self.session_limit_s

    def deadline(self, stop_margin_s: float) -> float | None:
        """Unix time at which to pause the run so the checkpoint is safe before the session ends."""
        end = self.session_end
        return None if end is None else end - stop_margin_s


KAGGLE_WORKING = "/kaggle/working"


def detect(
    kind: str = "auto",
    session_limit_s: float | None = None,
    env: dict[str, str] | None = None,
    kaggle_dir: str | Path = KAGGLE_WORKING,
) -> Platform:
    """The platform we run on; an explicit session_limit_s overrides the platform's default.

    Kaggle: KAGGLE_KERNEL_RUN_TYPE in `env`, or `kaggle_dir` (a parameter for tests) is a directory;
    its session starts with the container. Colab: COLAB_RELEASE_TAG or COLAB_GPU; starts at boot.
    """
    env = dict(os.environ if env is None else env)
    now = time.time()
    if kind == "kaggle" or (kind == "auto" and "KAGGLE_KERNEL_RUN_TYPE" in env):
        return _kaggle(session_limit_s, now)
    if kind == "colab" or (kind == "auto" and ("COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env)):
        # A Colab VM lives at most ~12 h; its boot is the best available session start.
        return Platform("colab", session_limit_s or TWELVE_HOURS, psutil.boot_time())
    if kind == "auto" and Path(kaggle_dir).is_dir():
        return _kaggle(session_limit_s, now)
    return Platform("generic", session_limit_s, now)


def _kaggle(session_limit_s: float | None, now: float) -> Platform:
    # Notebooks run in a container started with the session: PID 1's birth is the session start, the
    # same for every `start` in that session (now would restart the 12 h clock each time).
    try:
        start = psutil.Process(1).create_time()
    except psutil.Error:
        start = now
    return Platform("kaggle", session_limit_s or TWELVE_HOURS, start)
