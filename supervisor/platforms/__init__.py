"""Where the supervisor runs: detection and the session clock (Kaggle and Colab end sessions at 12 h).

Facts and sources: ../shared/reference/platforms.md sections 1 and 2.
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

    def deadline(self, stop_margin_s: float) -> float | None:
        """Unix time at which to pause the run so the checkpoint is safe before the session ends."""
        if self.session_limit_s is None:
            return None
        return self.session_start + self.session_limit_s - stop_margin_s


def detect(kind: str = "auto", session_limit_s: float | None = None, env: dict[str, str] | None = None) -> Platform:
    """The platform we run on; an explicit session_limit_s overrides the platform's default."""
    env = dict(os.environ if env is None else env)
    now = time.time()
    if kind == "kaggle" or (kind == "auto" and "KAGGLE_KERNEL_RUN_TYPE" in env):
        # Notebooks run in a container started with the session: PID 1's birth is the session start.
        try:
            start = psutil.Process(1).create_time()
        except psutil.Error:
            start = now
        return Platform("kaggle", session_limit_s or TWELVE_HOURS, start)
    if kind == "colab" or (kind == "auto" and ("COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env)):
        # A Colab VM lives at most ~12 h; its boot is the best available session start.
        return Platform("colab", session_limit_s or TWELVE_HOURS, psutil.boot_time())
    if kind == "auto" and Path("/kaggle/working").is_dir():
        return Platform("kaggle", session_limit_s or TWELVE_HOURS, now)
    return Platform("generic", session_limit_s, now)
