"""The pydantic models of run.toml: the only place that knows its keys.

`load_config(path)` returns a validated `RunConfig` or raises `ConfigError` whose lines each name a
key by its dotted path and say what is expected. Every number is finite; durations have bounds
where a larger value is surely a mistake (a week for timeouts). Keys whose names look like secrets
are refused anywhere in the file (`secret_problems`, the one place that knows those names).
The `[storage]` table is `supervisor.store.settings.StorageSettings`.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from supervisor.faults import Fault
from supervisor.protocol import (
    DEFAULT_CHECKPOINT_PATTERN,
    DEFAULT_STEP_PATTERN,
    DEFAULT_STEP_RUN_PATTERN,
    checkpoint_regex,
)
from supervisor.recordcfg import EarlyStopRule, InitConfig, RecordConfig
from supervisor.store.settings import StorageSettings

PLACEHOLDERS = (
    "seed", "load_epoch", "start_epoch", "epochs", "run_dir", "checkpoint_dir",
    "attempt", "batch_divisor", "load_path", "params", "python", "start_step", "load_step", "steps",
)  # fmt: skip
# Placeholders that mean nothing in a run counted in steps (`steps = N`) or in epochs (`epochs = N`).
EPOCH_ONLY = ("load_epoch", "start_epoch", "epochs")
STEP_ONLY = ("steps",)
# In a command: `{name}` is a placeholder, `{{` and `}}` write a literal brace, `${...}` (a shell variable)
# and braces around anything but a name (awk's `{print $1}`) are left alone.
PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\$\{[^{}]*\}|\{(\w+)\}")
# Placeholders that tell a script where to resume from (a zero-code command without one restarts from scratch).
RESUME_PLACEHOLDERS = ("load_path", "load_epoch", "start_epoch", "start_step", "load_step")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
          "tib": 1024**4}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
MAX_CONFIG_BYTES = 1 << 20  # a run.toml is a few KiB; more is a wrong path (a checkpoint, /dev/zero)

WEEK = 7 * 86400.0
# Durations: finite (every model refuses inf/nan), and a timeout or grace over a week is a typo.
Timeout = Annotated[float, Field(gt=0, le=WEEK)]
Grace = Annotated[float, Field(ge=0, le=WEEK)]

# Key names that hold secrets, anywhere in run.toml, case-insensitive: *_KEY and a bare `key`
# (api_key, WANDB_API_KEY; a bare key most often names an API key, and a refused name costs a
# rename while a leaked secret cannot be taken back), *_KEY_ID and access keys, *TOKEN* except
# tokens/tokenizer* (max_tokens, TOKENIZERS_PARALLELISM are settings), *SECRET*, *PASSWORD*,
# *PASSWD*, *CREDENTIAL*.
_SECRET_NAME = re.compile(
    r"(?:^|[_-])key$|apikey|_key_id$|access_?key|token(?!s|iz)|secret|passw(?:or)?d|credential", re.IGNORECASE
)
# ... unless the name says its value is a location (AWS_SHARED_CREDENTIALS_FILE, token_path).
_LOCATION_NAME = re.compile(r"[_-](?:file|path|dir)$", re.IGNORECASE)


class ConfigError(ValueError):
    """run.toml is unreadable or invalid; `problems` holds one line per mistake."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def parse_size(value: Any, what: str) -> int | float:
    """Bytes from an int, '20GiB', '512MB'; a fraction in (0, 1] from '90%' (returned as float)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 20GiB or 90%, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"expected a positive number of bytes, got {value}")
        return value
    if isinstance(value, str):
        s = value.strip()
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                pct = -1.0
            if not 0 < pct <= 100:
                raise ValueError(f"expected a percentage in (0, 100], got {value!r}")
            return pct / 100.0
        m = _SIZE.match(s)
        if m and m.group(2).lower() in _UNITS:
            size = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if math.isfinite(size):  # hundreds of digits overflow to inf
                return int(size)
    raise ValueError(f"expected {what}: bytes, 20GiB, 512MB, or a percentage such as 90%")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def placeholder_names(text: str) -> list[str]:
    """The placeholders `text` uses ({{, }} and ${...} are not placeholders)."""
    return [m.group(1) for m in PLACEHOLDER_RE.finditer(text) if m.group(1)]


def fill_placeholders(text: str, values: dict[str, str]) -> str:
    """`text` with its placeholders replaced by `values`, `{{`/`}}` by single braces, `${...}` kept."""

    def one(m: re.Match[str]) -> str:
        token = m.group(0)
        if token in ("{{", "}}"):
            return token[0]
        if m.group(1) is None:
            return token  # ${VAR}: the shell's
        return values.get(m.group(1), token)

    return PLACEHOLDER_RE.sub(one, text)


def _check_placeholders(values: list[str]) -> list[str]:
    for text in values:
        for name in placeholder_names(text):
            if name not in PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {{{name}}}; known: {', '.join(PLACEHOLDERS)} (write {{{{ and "
                                 "}} for a literal brace)")  # fmt: skip
    return values


def _split_args(v: Any) -> Any:
    if isinstance(v, str):
        import shlex

        v = shlex.split(v)
    return v


class TrainerConfig(_Strict):
    command: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    # The trainer's working directory, relative to run.toml's folder (default: that folder).
    cwd: str | None = None
    mode: Literal["protocol", "zero-code"] = "protocol"
    # Appended to `command` (and added to `env`) on a fresh start / on a resume from a checkpoint.
    fresh_args: list[str] = Field(default_factory=list)
    resume_args: list[str] = Field(default_factory=list)
    fresh_env: dict[str, str] = Field(default_factory=dict)
    resume_env: dict[str, str] = Field(default_factory=dict)
    # Several processes (docs/distributed.md): "torchrun" runs the command under torch.distributed.run, its
    # own restarts off; the supervisor decides every restart of the whole group.
    launcher: Literal["none", "torchrun"] = "none"
    nproc_per_node: Annotated[int, Field(ge=1, le=1024)] | Literal["gpu", "cpu", "auto"] = 1
    nnodes: Annotated[int, Field(ge=1, le=4096)] = 1
    node_rank: Annotated[int, Field(ge=0)] = 0
    rdzv_endpoint: str | None = None
    rdzv_backend: str = "c10d"
    local_addr: str | None = None  # torchrun --local-addr: this node's address as the others reach it
    # Several nodes: how long the leader waits for a node's report that the attempt ended there (then the node
    # is lost: a `session lost` of the attempt), and how long a follower waits for the leader's next attempt.
    node_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    join_timeout_s: Annotated[float, Field(gt=0)] = 900.0

    @model_validator(mode="after")
    def _launcher(self) -> TrainerConfig:
        torchrun_keys = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "local_addr",
                         "node_timeout_s", "join_timeout_s")
        if self.launcher != "torchrun":
            if given := [k for k in torchrun_keys if k in self.model_fields_set]:
                raise ValueError(f"trainer.{given[0]}: only with trainer.launcher = \"torchrun\"; add it or remove "
                                 f"{', '.join(given)}")  # fmt: skip
            return self
        if self.node_rank >= self.nnodes:
            raise ValueError(f"trainer.node_rank: {self.node_rank} is not below nnodes = {self.nnodes} (ranks count "
                             "from 0)")  # fmt: skip
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("trainer.rdzv_endpoint: several nodes meet at one address, the leader's (node_rank 0) "
                             "host:port, e.g. rdzv_endpoint = \"10.0.0.1:29400\" on every node")  # fmt: skip
        if self.nnodes > 1 and self.mode != "protocol":
            raise ValueError("trainer.mode: several nodes need protocol mode (rank 0 announces its checkpoints, "
                             "which its node passes to the leader); zero-code runs one node (nnodes = 1)")  # fmt: skip
        if self.nnodes > 1 and self.rdzv_backend != "c10d":
            raise ValueError("trainer.rdzv_backend: several nodes under the supervisor use \"c10d\" (each attempt "
                             "is a new rendezvous at rdzv_endpoint)")  # fmt: skip
        return self

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        v = _split_args(v)
        if isinstance(v, list) and not v:
            raise ValueError("expected a non-empty command (list of strings or a string)")
        return v

    @field_validator("fresh_args", "resume_args", mode="before")
    @classmethod
    def _split_extra(cls, v: Any) -> Any:
        return _split_args(v)

    @field_validator("command", "fresh_args", "resume_args")
    @classmethod
    def _placeholders(cls, v: list[str]) -> list[str]:
        return _check_placeholders(v)

    @field_validator("env", "fresh_env", "resume_env")
    @classmethod
    def _env_placeholders(cls, v: dict[str, str]) -> dict[str, str]:
        _check_placeholders(list(v.values()))
        return v

    def texts(self, resume: bool | None = None) -> list[str]:
        """Every string a placeholder may be in: command and env, plus the fresh and/or resume extras."""
        out = [*self.command, *self.env.values()]
        if resume in (None, False):
            out += [*self.fresh_args, *self.fresh_env.values()]
        if resume in (None, True):
            out += [*self.resume_args, *self.resume_env.values()]
        return out


class SeedsConfig(_Strict):
    pool: list[int] = Field(default_factory=lambda: [29, 28, 31, 30, 37, 32, 33, 47, 36])

    @field_validator("pool")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("expected distinct seeds")
        if any(s < 0 for s in v):
            raise ValueError("expected non-negative seeds")
        return v


class RestartConfig(_Strict):
    max_restarts: Annotated[int, Field(ge=0)] = 20
    per_fault: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    rollback_after: Annotated[int, Field(ge=1)] = 2
    halve_batch_on_gpu_oom: bool = True
    max_batch_divisor: Annotated[int, Field(ge=1)] = 8
    backoff_initial_s: Grace = 1.0
    backoff_max_s: Grace = 60.0
    backoff_jitter: Annotated[float, Field(ge=0, le=1)] = 0.25
    no_progress_limit: Annotated[int, Field(ge=1)] = 5
    early_failure_limit: Annotated[int, Field(ge=1)] = 3

    @field_validator("per_fault")
    @classmethod
    def _faults(cls, v: dict[str, int]) -> dict[str, int]:
        known = {f.value for f in Fault}
        for key in v:
            if key not in known:
                raise ValueError(f"unknown fault {key!r}; known: {', '.join(sorted(known))}")
        return v


class WatchConfig(_Strict):
    heartbeat_timeout_s: Timeout = 600.0
    startup_timeout_s: Timeout | None = None
    memory_limit: int | float | None = None
    disk_min_free: int | float | None = None
    # The watch loop's period: under 10 ms it only burns a core that the trainer needs.
    poll_interval_s: Annotated[float, Field(ge=0.01, le=5)] = 0.1
    stop_grace_s: Grace = 30.0
    cuda_error_grace_s: Grace = 5.0
    tail_lines: Annotated[int, Field(ge=1)] = 200
    # A training loss: `loss=0.5`, `loss: 0.5`, `loss 0.5` (not `val loss`, `eval_loss`, `test loss`: metrics).
    loss_regex: str = (r"(?<!val )(?<!val_)(?<!eval )(?<!eval_)(?<!test )(?<!test_)\bloss\b\s*[=:]?\s*"
                       r"(?P<loss>[-+]?(?:nan|inf(?:inity)?|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))")
    nan_regex: str | None = None
    epoch_regex: str = r"\bepoch\b\s*[=: ]\s*(?P<epoch>\d+)"
    # Zero-code runs counted in steps: the optimizer step a line speaks of (`step 250`, `iter 250:`, `step=250`).
    step_regex: str = r"\b(?:step|iter(?:ation)?)\b\s*[=:# ]?\s*(?P<step>\d+)"
    # Zero-code: each named group of each regex is an eval metric of the current epoch/step (best_metric).
    metric_regex: list[str] = Field(default_factory=list)

    @field_validator("metric_regex", mode="before")
    @classmethod
    def _metric_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("metric_regex")
    @classmethod
    def _metric_groups(cls, v: list[str]) -> list[str]:
        for text in v:
            try:
                compiled = re.compile(text)
            except re.error as exc:
                raise ValueError(f"expected a regular expression ({exc}): {text!r}") from None
            if not compiled.groupindex:
                raise ValueError(f"expected named groups, e.g. 'val loss (?P<val_loss>[0-9.]+)', in {text!r}")
        return v

    @field_validator("memory_limit", "disk_min_free", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return None if v is None else parse_size(v, "a size")

    @field_validator("loss_regex", "nan_regex", "epoch_regex", "step_regex")
    @classmethod
    def _regex(cls, v: str | None, info: Any) -> str | None:
        if v is not None:
            try:
                compiled = re.compile(v)
            except re.error as exc:
                raise ValueError(f"expected a regular expression ({exc})") from None
            group = {"loss_regex": "loss", "epoch_regex": "epoch", "step_regex": "step"}.get(info.field_name)
            if group and group not in compiled.groupindex:
                raise ValueError(f"expected a named group (?P<{group}>...) in {v!r}")
        return v


class CheckpointsConfig(_Strict):
    keep_last: Annotated[int, Field(ge=1)] = 3
    keep_best: Annotated[int, Field(ge=0)] = 1
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"
    # The checkpoint file names: with {epoch} in a run of epochs, {step} in a run of steps (default per unit).
    pattern: str = ""
    # Zero-code: the ONE file a script overwrites with its checkpoint (relative to the trainer's cwd); each
    # complete save is copied into the checkpoint dir under `pattern`, and put back here before a resume.
    file: str | None = None
    # An exit 0 before the last epoch's/step's checkpoint is verified: false completes the run with the newest
    # verified checkpoint as the final one (scripts whose last save is optional); true diagnoses it as `incomplete`.
    require_last: bool = True
    settle_s: Grace = 2.0
    # Mid-epoch checkpoints (asked for before a pause, or every `every_s`): `{epoch}` and `{step}`.
    step_pattern: str = DEFAULT_STEP_PATTERN
    # Ask for a mid-epoch checkpoint when this much training time passed since the last checkpoint;
    # "auto": choose the interval from measured save and upload costs so they stay under auto_overhead.
    every_s: float | Literal["auto"] | None = None
    auto_overhead: Annotated[float, Field(gt=0, le=0.5)] = 0.035

    @field_validator("every_s", mode="before")
    @classmethod
    def _every(cls, v: Any) -> Any:
        if v is None or v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (1 <= v <= WEEK):
            raise ValueError(f"expected seconds between 1 and {WEEK:.0f}, or \"auto\" (got {v!r})")
        return float(v)

    @field_validator("file")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or v.endswith(("/", "\\")) or "\0" in v):
            raise ValueError(f"expected the path of the script's checkpoint file, e.g. \"out/ckpt.pt\" (got {v!r})")
        return v

    @field_validator("step_pattern")
    @classmethod
    def _step_pattern(cls, v: str) -> str:
        try:
            filled = v.format(epoch=0, step=1, checkpoint_dir="d", run_dir="d")
            ok = filled != v.format(epoch=0, step=2, checkpoint_dir="d", run_dir="d") and filled != v.format(
                epoch=1, step=1, checkpoint_dir="d", run_dir="d")  # fmt: skip
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"expected a file pattern with {{epoch}} and {{step}} placeholders ({exc})") from None
        if not ok:
            raise ValueError("expected a file pattern with both {epoch} and {step} placeholders")
        return v


def _pattern_problem(pattern: str, field: str) -> str | None:
    """Why `pattern` cannot name the checkpoints of a run counted in `field` ("epoch"/"step"), or None."""
    other, a = ("step", "an") if field == "epoch" else ("epoch", "a")
    example = "epoch-{epoch:04d}.pt" if field == "epoch" else "step-{step:08d}.pt"
    try:
        filled = pattern.format(**{field: 0}, checkpoint_dir="d", run_dir="d")
        if filled == pattern.format(**{field: 1}, checkpoint_dir="d", run_dir="d"):
            return (f"expected a file pattern with {a} {{{field}}} placeholder, e.g. {example!r}; a script that "
                    "overwrites one checkpoint file: [checkpoints] file = \"out/ckpt.pt\" (zero-code mode)")
        checkpoint_regex(pattern.replace("{checkpoint_dir}", "d").replace("{run_dir}", "d"), field)
    except KeyError as exc:
        hint = f" ({{{other}}} belongs to a run counted in {other}s)" if exc.args[0] == other else ""
        return f"expected a file pattern with {a} {{{field}}} placeholder (unknown placeholder {{{exc.args[0]}}}{hint})"
    except (ValueError, IndexError) as exc:
        return f"expected a file pattern with {a} {{{field}}} placeholder ({exc})"
    return None


class PlatformConfig(_Strict):
    session_limit_s: Annotated[float, Field(gt=0)] | None = None
    # Pause at least this long before the session limit; the deadline plan asks for more when the measured
    # step, save and upload times need it.
    stop_margin_s: Annotated[float, Field(ge=0)] = 120.0
    # How long the process that sends us SIGTERM waits before SIGKILL (docker stop: 10 s, Kubernetes: 30 s);
    # None: unknown, the pause takes stop_grace_s and drain_timeout_s as configured.
    sigterm_grace_s: Annotated[float, Field(gt=0, le=WEEK)] | None = None
    # Upload speed to assume before one was measured (bytes per second, e.g. "20MB"), for the plan.
    upload_speed: int | float | None = None
    detect: Literal["auto", "generic", "kaggle", "colab"] = "auto"
    spot: Literal["off", "auto", "aws", "gcp", "azure"] = "auto"
    # Each poll is a request to the metadata service; notices come at most 2 min ahead (AWS), so a
    # slower poll could never see one in time.
    notice_poll_s: Annotated[float, Field(ge=0.1, le=120)] = 5.0
    metadata_url: str | None = None
    # Seconds from a spot notice to the machine's end when the notice names no time; default the cloud's
    # (AWS 120, GCP 30, Azure 30).
    notice_window_s: Annotated[float, Field(gt=0, le=3600)] | None = None

    @field_validator("upload_speed", mode="before")
    @classmethod
    def _speed(cls, v: Any) -> Any:
        if v is None:
            return None
        speed = parse_size(v, "bytes per second, e.g. 20MB")
        if isinstance(speed, float):
            raise ValueError("expected bytes per second such as 20MB, not a percentage")
        return speed

    @model_validator(mode="after")
    def _margin(self) -> PlatformConfig:
        if self.session_limit_s is not None and self.stop_margin_s >= self.session_limit_s:
            raise ValueError(
                f"platform.stop_margin_s: {self.stop_margin_s:g} s is not less than session_limit_s "
                f"{self.session_limit_s:g} s, so the run would pause as soon as it starts; lower stop_margin_s"
            )
        return self


class RunConfig(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    # The run's length and unit: epochs, or optimizer steps (exactly one of the two).
    epochs: Annotated[int, Field(ge=1)] | None = None
    steps: Annotated[int, Field(ge=1)] | None = None
    run_dir: str = "runs/{name}"
    trainer: TrainerConfig
    seeds: SeedsConfig = Field(default_factory=SeedsConfig)
    restart: RestartConfig = Field(default_factory=RestartConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    storage: StorageSettings | None = None
    platform: PlatformConfig = Field(default_factory=PlatformConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
    init: InitConfig | None = None
    early_stop: list[EarlyStopRule] = Field(default_factory=list)
    # Where run.toml lives; relative paths resolve against it. Set by load_config, not by users.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v in (".", ".."):  # runs/{name} would be the runs folder or its parent, not a run's own folder
            raise ValueError("expected a run name, not '.' or '..'")
        return v

    @model_validator(mode="after")
    def _unit(self) -> RunConfig:
        if (self.epochs is None) == (self.steps is None):
            if self.epochs is None:
                raise ValueError("epochs: required key is missing (or `steps = N` for a run counted in optimizer "
                                 "steps)")  # fmt: skip
            raise ValueError("steps: a run counts epochs or steps, not both; remove `epochs` or `steps`")
        field = "step" if self.steps is not None else "epoch"
        c = self.checkpoints
        if not c.pattern:
            pattern = DEFAULT_STEP_RUN_PATTERN if field == "step" else DEFAULT_CHECKPOINT_PATTERN
            object.__setattr__(self, "checkpoints", c.model_copy(update={"pattern": pattern}))
            c = self.checkpoints
        if (why := _pattern_problem(c.pattern, field)) is not None:
            raise ValueError(f"checkpoints.pattern: {why}")
        if field == "epoch" and c.step_pattern.format(epoch=0, step=1, checkpoint_dir="d", run_dir="d") == (
                c.pattern.format(epoch=0, checkpoint_dir="d", run_dir="d")):  # fmt: skip
            raise ValueError("checkpoints.step_pattern: names the same file as checkpoints.pattern; make them differ")
        wrong = STEP_ONLY if field == "epoch" else EPOCH_ONLY
        for name in {n for text in self.trainer.texts() for n in placeholder_names(text)} & set(wrong):
            instead = ("{steps}, {start_step}, {load_step}" if field == "step"
                       else "{epochs}, {start_epoch}, {load_epoch}")  # fmt: skip
            raise ValueError(f"trainer: {{{name}}} means nothing in a run counted in {field}s; use {instead}")
        if c.file is not None and self.trainer.mode != "zero-code":
            raise ValueError("checkpoints.file: only for trainer.mode = \"zero-code\" (a protocol trainer announces "
                             "its checkpoints); remove it or set the mode")  # fmt: skip
        if self.init is not None:
            if (self.init.step is not None) != (field == "step"):
                raise ValueError(f"init: this run counts {field}s: give the parent's checkpoint as `{field} = ...`")
            if self.init.from_run == self.name:
                raise ValueError("init.from_run: names this run itself; name the run to start from")
        for rule in self.early_stop:
            if rule.at is not None and rule.at >= self.span:
                raise ValueError(f"early_stop: at = {rule.at} is past the run's last {field} ({self.span - 1})")
        if self.trainer.nnodes > 1 and self.storage is None:
            raise ValueError("storage: several nodes agree on every attempt through the run's store; give every "
                             "node the same [storage] url (s3://bucket/prefix, or file:// on a shared filesystem)")
        return self

    @property
    def unit(self) -> str:
        """"epochs" or "steps": what the run counts, and what checkpoints, restart rows and reports speak in."""
        return "steps" if self.steps is not None else "epochs"

    @property
    def span(self) -> int:
        """How many checkpoint positions the run has: epochs 0..epochs-1, or steps 1..steps (key 0 unused).
        The run is complete once position span - 1 is verified."""
        return self.steps + 1 if self.steps is not None else self.epochs  # type: ignore[operator]

    def resume_warnings(self) -> list[str]:
        """Why restarts of a zero-code command may not do what the restart table says (empty in protocol mode,
        where the trainer reads SUPERVISOR_SEED and SUPERVISOR_LOAD_PATH)."""
        t = self.trainer
        if t.mode != "zero-code":
            return []
        out = []
        used = {n for text in t.texts() for n in placeholder_names(text)}
        if "seed" not in used:
            out.append("trainer: the command never receives {seed} (e.g. --seed={seed}): unless the script reads "
                       "SUPERVISOR_SEED, the seed column of the restart table records seeds it never used")  # fmt: skip
        resumes = {n for text in t.texts(resume=True) for n in placeholder_names(text)} & set(RESUME_PLACEHOLDERS)
        if not resumes and self.checkpoints.file is None and not t.resume_args and not t.resume_env:
            out.append("trainer: the command never receives a resume point ({load_path}, {start_epoch}, ...; or "
                       "[checkpoints] file with resume_args): unless the script finds its checkpoint by itself, every "
                       "restart trains from scratch")  # fmt: skip
        return out

    def resolved_run_dir(self) -> Path:
        path = Path(self.run_dir.replace("{name}", self.name)).expanduser()
        return (path if path.is_absolute() else self.base_dir / path).resolve()


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _secret_hint(path: str, key: str) -> str:
    """Where a secret named `key` at dotted `path` belongs instead of run.toml."""
    if path.startswith("storage."):
        return (
            "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the supervisor's environment or the platform's "
            "secret store, or name a profile of a credentials file (~/.aws/credentials) with [storage] profile"
        )
    if path.startswith("trainer.env."):
        return (
            f"export {key} in the supervisor's environment instead (attempts inherit it), e.g. from the "
            "platform's secret store"
        )
    return (
        "keep it in the supervisor's environment (attempts inherit it) or the platform's secret store and read "
        "it from there; if it holds no secret, rename the key"
    )


def secret_problems(raw: Any, prefix: str = "") -> list[str]:
    """One line per key of a parsed run.toml, at any depth, whose name looks like a secret.

    Each line names the dotted key (never its value) and where the secret belongs instead.
    """
    problems = []
    if isinstance(raw, list):
        for i, item in enumerate(raw):
            problems += secret_problems(item, f"{prefix}[{i}]")
        return problems
    if not isinstance(raw, dict):
        return problems
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if _SECRET_NAME.search(str(key)) and not _LOCATION_NAME.search(str(key)):
            problems.append(f"{path}: secrets do not belong in run.toml; {_secret_hint(path, str(key))}")
        else:
            problems += secret_problems(value, path)
    return problems


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(x for x in err["loc"] if x not in ("function-after[_split(), list[str]]",))
    where = _dotted(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key; remove it or check its spelling"
    if kind == "missing":
        return f"{where}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if where == "(top level)" and re.match(r"[a-z_.]+: ", msg):  # a model check names its key (RunConfig._unit)
        return msg
    if msg.startswith((f"{where}: ", f"{where}.")):  # the message names its key already (StorageSettings)
        return msg
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "finite_number":
        msg = f"{msg} (got {err.get('input')!r})"
    return f"{where}: {msg}"


def parse_config(raw: dict[str, Any], base_dir: Path, path: Path) -> RunConfig:
    """Validate a parsed run.toml table; ConfigError lists every problem, one line each."""
    problems = secret_problems(raw)
    try:
        cfg = RunConfig.model_validate({**raw, "base_dir": base_dir})
    except ValidationError as exc:
        reported = {p.split(":", 1)[0] for p in problems}
        for err in exc.errors():
            line = _format_error(err)
            if line.split(":", 1)[0] not in reported:
                problems.append(line)
        cfg = None
    if problems:
        raise ConfigError(path, problems)
    assert cfg is not None
    return cfg


def _read_text(path: Path) -> str:
    """The text of run.toml, or ConfigError with one line saying why it cannot be had."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(path, ["file not found; pass the path of a run.toml"]) from None
    except IsADirectoryError:
        raise ConfigError(path, ["is a directory; pass the path of the run.toml file"]) from None
    except PermissionError as exc:
        raise ConfigError(path, [f"cannot read it ({exc.strerror}); make it readable or run as its owner"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"cannot read it ({exc.strerror or exc}); pass the path of a run.toml"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, ["larger than 1 MiB, so not a run.toml; pass the path of a run.toml"])
    if b"\0" in data:
        raise ConfigError(path, ["not UTF-8 text: it holds NUL bytes (a binary file?); pass the path of a run.toml"])
    try:
        return data.decode("utf-8-sig")  # -sig: a byte-order mark from a Windows editor is harmless
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} is not "
                                 "UTF-8; save run.toml as UTF-8 text"]) from None  # fmt: skip


def load_config(path: str | Path) -> RunConfig:
    """Read and validate run.toml at `path`; ConfigError (one line per problem) if it cannot be used."""
    path = Path(path)
    text = _read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        reason = " ".join(str(exc).split())  # one line, whatever the parser's message holds
        raise ConfigError(path, [f"not valid TOML: {reason}"]) from None
    return parse_config(raw, path.resolve().parent, path)
