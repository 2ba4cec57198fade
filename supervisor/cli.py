"""Verbs: start, validate, status, report, stop. Exit codes: 0 completed, 1 gave up,
2 invalid config / usage / run held by another supervisor, 75 paused (run the same command again).

Every error a user can cause ends in one line on stderr, never a traceback: config problems and a
trainer command that cannot run exit 2 before anything is written; a store that does not answer or
a disk that cannot be written (full, read-only, no permission) exits 75.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from supervisor import __version__
from supervisor.config import ConfigError, RunConfig, load_config
from supervisor.exits import EXIT_PAUSED, EXIT_USAGE


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    sys.stderr.write(f"supervisor: {message}\n")
    return code


def _load_runnable(config: str) -> RunConfig:
    """The validated config, or ConfigError if it is invalid or its trainer command cannot be run."""
    from supervisor.preflight import command_problems

    cfg = load_config(config)
    problems = command_problems(cfg)
    if problems:
        raise ConfigError(Path(config), problems)
    return cfg


def _resolve(target: str) -> tuple[RunConfig | None, Path, str]:
    """RUN may be a run.toml or a run dir; returns (config if known, run dir, run name)."""
    path = Path(target)
    if path.is_dir():
        run_dir = path.resolve()
        cfg = None
        return cfg, run_dir, run_dir.name
    cfg = load_config(path)
    return cfg, cfg.resolved_run_dir(), cfg.name


def _holder(run_dir: Path) -> dict | None:
    from filelock import FileLock, Timeout

    from supervisor.layout import RunLayout, holder_info

    lock_path = RunLayout(run_dir).lock
    if not lock_path.exists():
        return None
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return holder_info(run_dir) or {"pid": None, "host": None}
    lock.release()
    return None


def open_store(cfg: RunConfig):
    """The store run.toml asks for: the run dir itself, or a remote one under [storage]."""
    from supervisor.store.factory import open_store as open_configured

    return open_configured(cfg.storage, cfg.name, cfg.resolved_run_dir())


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load_runnable(args.config)
    length = cfg.epochs if cfg.steps is None else cfg.steps
    print(f"{args.config}: ok (run '{cfg.name}', {length} {cfg.unit}, run dir {cfg.resolved_run_dir()})")
    for line in _plan_warnings(cfg):
        print(f"{args.config}: warning: {line}")
    return 0


def _plan_warnings(cfg: RunConfig) -> list[str]:
    """What the deadline plan can already tell: windows too short for a final save and upload at the costs
    an earlier session of this run measured (or the configured upload speed), and settings without effect."""
    from supervisor import deadline as D
    from supervisor import ledger as L
    from supervisor.watchdog import plan_shortfalls

    out = cfg.resume_warnings()
    if cfg.checkpoints.every_s is not None and cfg.trainer.mode == "zero-code":
        out.append("checkpoints.every_s has no effect in zero-code mode: a script cannot be asked for a checkpoint")
    if cfg.record.trackers:
        from supervisor.trackers import missing_packages

        out += [f"record.trackers: {line} (start refuses to run without it)" for line in missing_packages(
            cfg.record.trackers, cfg.record.mlflow_uri)]  # fmt: skip
    facts = L.read_facts(cfg.resolved_run_dir() / L.LEDGER_NAME)
    return out + plan_shortfalls(cfg, D.Costs.from_plan(L.fold(facts).plan))


def _summary(cfg: RunConfig) -> None:
    """At the end of `start`: the restart table and the best metrics, as the record has them now."""
    from supervisor import report
    from supervisor.layout import RunLayout

    run_dir = cfg.resolved_run_dir()
    if not RunLayout(run_dir).ledger.exists():
        return
    rep = report.build(run_dir, cfg.name, False, cfg.checkpoints.best_metric, cfg.checkpoints.best_mode)
    md = report.to_markdown({**rep, "notes": [], "purpose": "", "params": {}, "param_changes": None,
                             "parent": None, "checkpointing": {}})  # fmt: skip
    keep = [line for line in md.splitlines() if line.startswith(("|", "* max", "* min", "* status", "* early"))]
    sys.stderr.write("\n" + "\n".join(keep) + "\n")


def cmd_start(args: argparse.Namespace) -> int:
    from supervisor.oserrors import describe_os_error
    from supervisor.store import StoreError
    from supervisor.store.backend import TransientStoreError
    from supervisor.watchdog import LockHeld, Watchdog

    cfg = _load_runnable(args.config)  # before the run dir exists: a bad command burns no seed
    try:
        store = open_store(cfg)
        if cfg.trainer.node_rank > 0:  # several nodes: node 0's supervisor leads, this one follows
            from supervisor.follower import Follower

            return Follower(cfg, store, echo=not args.quiet).run()
        code = Watchdog(cfg, store, echo=not args.quiet).run()
        _summary(cfg)
        return code
    except LockHeld as exc:
        return _fail(str(exc))
    except TransientStoreError as exc:
        # Unreachable is a condition that may pass (network, server restarting): a pause, not a mistake.
        where = cfg.storage.describe() if cfg.storage else "the store"
        return _fail(f"store {where} did not answer: {exc}; run the same command again when it answers",
                     EXIT_PAUSED)  # fmt: skip
    except StoreError as exc:
        return _fail(str(exc))
    except OSError as exc:  # the last net: the watchdog handles what it can inside run()
        code, line = describe_os_error(exc, "write")
        return _fail(line, code)


def cmd_status(args: argparse.Namespace) -> int:
    from supervisor import live

    cfg, run_dir, name = _resolve(args.run)
    extra = ({"span": cfg.span, "best_metric": cfg.checkpoints.best_metric, "mode": cfg.checkpoints.best_mode}
             if cfg else {})  # fmt: skip
    if args.watch:
        if args.interval <= 0:
            return _fail("--interval must be more than 0 seconds")
        return live.watch(run_dir, name, lambda: _holder(run_dir), sys.stdout, args.interval, args.count,
                          as_json=args.json, **extra)  # fmt: skip
    out = live.gather(run_dir, name, _holder(run_dir), **extra)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    sys.stdout.write(live.render(out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from supervisor import report
    from supervisor.store import StoreError

    try:
        if args.all:
            return _report_all(args)
        reps = [report.load(target, args.endpoint_url, _holder) for target in [args.run, *(args.compare or [])]]
    except StoreError as exc:
        return _fail(str(exc))
    if failed := next((r for r in reps if isinstance(r, str)), None):
        return _fail(failed)
    if args.compare and args.plot is None:
        return _fail("--compare draws the runs together: give --plot PATH (a .png)")
    if args.plot is not None:
        return _plot(reps, args)  # type: ignore[arg-type]
    sys.stdout.write(report.render(reps[0], args.format))  # type: ignore[arg-type]
    return 0


def _plot(reps: list[dict], args: argparse.Namespace) -> int:
    """report --plot [PATH] (--compare RUN ...): the PNG of one run or of several together."""
    from supervisor import plots

    path = Path(args.plot) if args.plot else Path(f"{reps[0]['name']}.png")
    try:
        out = plots.plot_compare(reps, path) if len(reps) > 1 else plots.plot_run(reps[0], path)
    except RuntimeError as exc:  # matplotlib missing: one line with the extra to install
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc.strerror or exc}")
    print(out)
    return 0


def _report_all(args: argparse.Namespace) -> int:
    """The whole experiment log of a store or a folder: the index table, then every run."""
    from supervisor import record, report
    from supervisor.lineage import Runs

    target = args.run
    if report.is_store_url(target):
        runs = Runs(report.store_settings(target.rstrip("/"), args.endpoint_url))
    elif Path(target).is_dir():
        runs = Runs(folder=Path(target).resolve())
    else:
        runs = Runs.beside(load_config(Path(target)))
    reps = []
    for name in runs.names():
        facts = runs.facts(name)
        if facts:
            running = runs.run_dir(name) is not None and _holder(runs.run_dir(name)) is not None  # type: ignore[arg-type]
            reps.append(report.from_facts(facts, name, running, runs=runs))
    if not reps:
        return _fail(f"no run in {runs.describe()} (no ledger.jsonl in any run folder)")
    reps.sort(key=lambda r: ((r.get("dates") or {}).get("started") or 0, r["name"]))
    if args.format == "json":
        sys.stdout.write(json.dumps({"runs": reps}, indent=2, allow_nan=False, default=str) + "\n")
        return 0
    sys.stdout.write("# Experiment log\n\n" + record.index(reps) + "".join("\n" + report.to_markdown(r) for r in reps))
    return 0


def cmd_note(args: argparse.Namespace) -> int:
    """A line for the run's record: into its ledger now, or through its inbox when a supervisor drives it."""
    from filelock import FileLock, Timeout

    from supervisor import ledger as L
    from supervisor.durable import atomic_write
    from supervisor.layout import RunLayout

    cfg, run_dir, name = _resolve(args.run)
    text = " ".join(args.text).strip()
    if not text:
        return _fail("note: the text is empty; supervisor note RUN \"what you want the record to say\"")
    layout = RunLayout(run_dir)
    if not layout.ledger.exists():
        return _fail(f"{run_dir} holds no run (no ledger.jsonl); pass a run.toml or a run dir")
    lock = FileLock(str(layout.lock))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # a supervisor drives it: the one writer of its ledger takes the note within seconds
        layout.inbox.mkdir(exist_ok=True)
        data = json.dumps({"note": text}).encode()
        atomic_write(layout.inbox / f"note-{time.time_ns()}-{os.getpid()}.json", lambda f: f.write(data))
        print(f"noted for run '{name}' (its supervisor records it within seconds)")
        return 0
    try:
        ledger = L.Ledger(layout.ledger)
        ledger.open()
        ledger.append(L.NOTE, by="user", note=text)
    finally:
        lock.release()
    where = " (the store's copy gets it at the run's next start)" if cfg is not None and cfg.storage else ""
    print(f"noted in {layout.ledger}{where}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from supervisor.layout import RunLayout

    cfg, run_dir, name = _resolve(args.run)
    holder = _holder(run_dir)
    if holder is None:
        print(f"run '{name}' is not running")
        return 0
    RunLayout(run_dir).stop_request.touch()
    pid = holder.get("pid")
    if pid and holder.get("host") == socket.gethostname():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    print(f"asked run '{name}' to pause (supervisor pid {pid} on {holder.get('host')})")
    if args.wait <= 0:
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if _holder(run_dir) is None:
            print(f"run '{name}' paused; `supervisor start` with its run.toml resumes it")
            return 0
        time.sleep(0.2)
    return _fail(f"run '{name}' did not pause within {args.wait:.0f}s; it may still be saving")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supervisor", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"supervisor {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every state transition")
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("start", help="run (or continue) the run described by a run.toml")
    s.add_argument("config")
    s.add_argument("-q", "--quiet", action="store_true", help="do not echo the trainer's output")
    s.set_defaults(func=cmd_start)
    s = sub.add_parser("validate", help="check a run.toml without running anything")
    s.add_argument("config")
    s.set_defaults(func=cmd_validate)
    s = sub.add_parser("status", help="state, attempt, epoch, last loss, last heartbeat age")
    s.add_argument("run", help="run.toml or run dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true", help="refresh the view until the run stops running (Ctrl-C ends it)")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    s.add_argument("--count", type=int, default=None, help="with --watch: stop after N refreshes")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("report", help="the run's record: dates, purpose, notes, params and changes, best metrics "
                       "against baselines, restarts")  # fmt: skip
    s.add_argument("run", help="run.toml, run dir, or a store url of a run (s3://bucket/prefix/NAME)")
    s.add_argument("--format", choices=("md", "json"), default="md")
    s.add_argument("--all", action="store_true", help="RUN is a store url, a runs folder or a run.toml: every run "
                   "there, an index table first")  # fmt: skip
    s.add_argument("--endpoint-url", help="the S3 endpoint of a store url (default: $AWS_ENDPOINT_URL)")
    s.add_argument("--plot", nargs="?", const="", metavar="PATH", help="write a PNG (loss, eval metrics, lr, a "
                   "marker at each restart) to PATH (default: NAME.png); needs the [plots] extra")  # fmt: skip
    s.add_argument("--compare", nargs="+", metavar="RUN", help="more runs drawn with RUN in one --plot")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser("note", help="add a line to the run's record (its notes)")
    s.add_argument("run", help="run.toml or run dir")
    s.add_argument("text", nargs="+", help="the note")
    s.set_defaults(func=cmd_note)

    s = sub.add_parser("stop", help="pause a running run gracefully")
    s.add_argument("run", help="run.toml or run dir")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the pause (0: do not wait)")
    s.set_defaults(func=cmd_stop)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="supervisor: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # boto's INFO lines ("Found credentials in ...") are noise between our one-liners
        for name in ("boto3", "botocore", "s3transfer", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_USAGE
    except OSError as exc:  # status, report, stop: a run dir whose files cannot be read
        from supervisor.oserrors import describe_os_error

        return _fail(describe_os_error(exc, "read")[1])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
