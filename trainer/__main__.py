"""`python -m trainer`: one training attempt.

Under the supervisor everything comes from the SUPERVISOR_* environment (parameters from the JSON
file at SUPERVISOR_PARAMS). Alone: `python -m trainer --params run.toml [--seed K] [--load-epoch E
[--start-step S]] [--epochs N] [--checkpoint-dir DIR]`.

Exit codes: 0 done, or stopped on request (a checkpoint request with stop, or SIGTERM: the
checkpoint was written and announced first), 1 crash, 2 bad parameters/data/usage, 3 non-finite
loss (the NaN was reported as a step event first).

Under torchrun (WORLD_SIZE > 1) every process runs this; ranks other than 0 log warnings and errors only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from supervisor.client import ChecksumMismatch, NonFiniteLoss, Supervised
from trainer.data import DataError
from trainer.params import ParamsError, load_params, read_params_file

log = logging.getLogger("trainer")

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainer", description="ResNet18 YOLOv3-style VOC detector")
    ap.add_argument("--params", type=Path, help="JSON or TOML parameter file (default: $SUPERVISOR_PARAMS)")
    ap.add_argument("--seed", type=int, help="seed (default: $SUPERVISOR_SEED or 0)")
    ap.add_argument("--load-epoch", type=int, help="resume from this epoch's checkpoint (-1: fresh)")
    ap.add_argument("--start-step", type=int, default=None,
                    help="with --load-epoch E: resume from the checkpoint S optimizer steps into epoch E")  # fmt: skip
    ap.add_argument("--epochs", type=int, help="number of epochs (default: $SUPERVISOR_EPOCHS or num_epoch)")
    ap.add_argument("--checkpoint-dir", type=Path, help="default: $SUPERVISOR_CHECKPOINT_DIR or ./checkpoints")
    ap.add_argument("--events", type=Path, help="append protocol events to this file")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


def _supervised(args: argparse.Namespace) -> Supervised:
    sup = Supervised.from_env()
    changes: dict[str, object] = {}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.load_epoch is not None:
        step = max(0, args.start_step or 0)
        start = args.load_epoch if step else args.load_epoch + 1
        changes.update(load_epoch=args.load_epoch, start_epoch=start, start_step=step, load_path=None)
    elif args.start_step is not None:
        raise ValueError("--start-step needs --load-epoch")
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.checkpoint_dir is not None:
        changes["checkpoint_dir"] = args.checkpoint_dir
    if args.events is not None:
        changes["events_path"] = args.events
    return dataclasses.replace(sup, **changes)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    if os.environ.get("RANK", "0") not in ("", "0"):  # torchrun: rank 0 tells the story, the others their trouble
        level = max(level, logging.WARNING)
    logging.basicConfig(
        level=level,
        format="%(asctime)s trainer %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    try:
        sup = _supervised(args)
        raw = read_params_file(args.params) if args.params else sup.params
        params = load_params(raw)
    except (ParamsError, json.JSONDecodeError, OSError, ValueError) as exc:
        log.error("bad parameters: %s", exc)
        return EXIT_BAD_INPUT
    from trainer.train import run  # imports torch: after the parameters are known to be good

    try:
        result = run(params, sup)
    except NonFiniteLoss as exc:
        log.error("%s: ending this attempt (exit %d)", exc, EXIT_NONFINITE)
        return EXIT_NONFINITE
    except (DataError, ChecksumMismatch, ParamsError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    if "stopped" not in result:
        log.info("done")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
