"""The trainer's hyperparameters: names exactly as the experiment log, validated with pydantic.

`load_params(raw)` turns the free-form `[trainer.params]` table (or a `--params` JSON/TOML file) into
`Params`. Numbered learning-rate segments `lr_cosine_max_k` / `lr_T_half_k` (k = 1, 2, ...) are
collected into `cosine_segments`; the baseline run's `lr_T_half` is an alias of `lr_T_half_1`.
Float-valued keys also accept a plain arithmetic string such as `"1 * 20 / 80"` (the log's
bubbliiiing row). Every mistake raises `ParamsError` with one line naming the key.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


class ParamsError(ValueError):
    """A user mistake in the parameters; its message is one line naming the key and the fix."""


_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _eval_arith(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval_arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval_arith(node.left), _eval_arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval_arith(node.operand))
    raise ValueError("only numbers and + - * / ** are allowed")


def _arith(value: Any) -> Any:
    """Evaluate an arithmetic string like '1 * 20 / 80' to a float; other values pass through."""
    if isinstance(value, str):
        try:
            return _eval_arith(ast.parse(value.strip(), mode="eval"))
        except (SyntaxError, ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"not a number or arithmetic expression: {value!r} ({exc})") from exc
    return value


Num = Annotated[float, BeforeValidator(_arith)]


class FaultSpec(BaseModel):
    """FAULT INJECTION (demo/tests only): make attempt `attempt` fail on purpose at (epoch, step)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["nan", "crash", "hang", "cpu_oom", "cuda_error", "gpu_oom", "amp_overflow"]
    epoch: int = Field(0, ge=0)
    step: int = Field(0, ge=0)
    attempt: int = Field(0, ge=0)
    # Several processes (torchrun): the global rank it fires in; None: every rank.
    rank: int | None = Field(None, ge=0)


class CosineSegment(BaseModel):
    """One cosine half-period: the LR falls from `lr_max` to 0 over `t_half` epochs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lr_max: float = Field(ge=0)
    t_half: float = Field(gt=0)


class LossWeights(BaseModel):
    """The loss knobs (their meaning: trainer/loss.py and docs/trainer.md); what `yolo_loss` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lambda_scale_1: Num = 1.0
    lambda_scale_2: Num = 1.0
    lambda_scale_4: Num = 1.0
    lambda_coord: Num = 10.0
    lambda_noobj: Num = 1.0
    lambda_obj: Num = 10.0
    lambda_class: Num = 10.0
    lambda_prior: Num = 0.1
    epoch_prior: int = Field(60, ge=0)
    IoU_thres: Num = Field(0.7, ge=0, le=1)
    scale_coord: bool = True
    eps: Num = Field(1e-6, gt=0)
    no_obj_v3: bool = True

    @property
    def lambda_scale(self) -> tuple[float, float, float]:
        """The weights of the stride-32, 16 and 8 levels, in the detector's output order."""
        return (self.lambda_scale_1, self.lambda_scale_2, self.lambda_scale_4)


# Params inherits the loss knobs rather than nesting them so they stay flat keys of [trainer.params]
# and a validation error names the key the user wrote.
class Params(LossWeights):
    """All parameters of one run; see docs/trainer.md for what each one does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # batch & gradient accumulation
    batch_size_train: int = Field(64, ge=1)
    batch_size_test: int = Field(64, ge=1)
    accum_batch_num: int = Field(1, ge=1)
    # epochs
    num_epoch: int = Field(200, ge=1)
    multi_scale_epoch: int = Field(190, ge=0)
    output_scale_S: int = Field(13, ge=1)
    freeze_epoch: int = Field(0, ge=0)
    # optimizer
    weight_decay: Num = Field(5e-4, ge=0)
    momentum: Num = Field(0.9, ge=0, lt=1)
    mix_precision: bool = True
    clip_max_norm: Num | None = Field(20.0, ge=0)
    # learning rate
    lr_linear_max: Num = Field(0.15, ge=0)
    lr_warmup_epoch: Num = Field(30, ge=0)
    cosine_segments: tuple[CosineSegment, ...] = ()
    # evaluation
    conf_thres: Num = Field(0.01, ge=0, le=1)
    conf_ratio_thres: Num = Field(0.05, ge=0, le=1)
    test_pr_after_epoch: int = Field(10, ge=0)
    test_pr_batch_ratio: Num = Field(1.0, gt=0, le=1)
    nms_thres: Num = Field(0.5, gt=0, le=1)
    max_det: int = Field(100, ge=1)
    # augmentation
    random_ratio: Num = Field(0.5, ge=0, le=1)
    # data and model
    data_root: str = "data"
    image_size: int | None = Field(None, ge=32)
    num_workers: int = Field(2, ge=0)
    pretrained: bool = True
    classes: tuple[str, ...] | None = None
    train_sets: tuple[str, ...] = ("VOC2007/trainval", "VOC2012/trainval")
    test_sets: tuple[str, ...] = ("VOC2007/test",)
    neck_channels: int = Field(256, ge=8)
    anchors: tuple[tuple[float, float], ...] | None = None
    # synthetic data generated on first use (demo); 0 = use the data at data_root as it is
    synthetic_images: int = Field(0, ge=0)
    synthetic_size: int | None = Field(None, ge=32)
    synthetic_seed: int = 0
    # runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool | None = None
    # Several processes on CUDA: SyncBatchNorm (batch statistics over the global micro-batch) instead of BN per process.
    sync_bn: bool = False
    amp_skip_limit: int = Field(8, ge=1)
    amp_min_scale: float = Field(1.0, gt=0)
    # One table or a list of them; the discriminator picks the branch by the input's shape so a
    # mistake is reported once, against the branch the user meant.
    inject_fault: (
        Annotated[
            Annotated[FaultSpec, Tag("one")] | Annotated[list[FaultSpec], Tag("many")],
            Discriminator(lambda v: "many" if isinstance(v, list) else "one"),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.image_size is not None and self.image_size != 32 * self.output_scale_S:
            raise ValueError(
                f"image_size {self.image_size} contradicts output_scale_S {self.output_scale_S} "
                f"(the stride-32 grid): use image_size = 32 * output_scale_S = {32 * self.output_scale_S}"
            )
        if self.anchors is not None and len(self.anchors) != 9:
            raise ValueError(f"anchors must list 9 [w, h] pairs (got {len(self.anchors)})")
        return self

    @property
    def input_size(self) -> int:
        """The base input side in pixels (416 at output_scale_S = 13)."""
        return 32 * self.output_scale_S

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.classes is not None:
            return self.classes
        if self.synthetic_images > 0:
            from trainer.synth import CLASSES

            return CLASSES
        return VOC_CLASSES

    def batch_plan(self, divisor: int, world: int = 1) -> tuple[int, int]:
        """(micro-batch size of one process, accumulation steps) under SUPERVISOR_BATCH_DIVISOR `divisor`, with
        `world` processes sharing the global micro-batch `batch_size_train` (it must divide by `world`)."""
        divisor, world = max(1, divisor), max(1, world)
        if self.batch_size_train % world:
            raise ParamsError(
                f"batch_size_train = {self.batch_size_train} is the global batch of the {world} processes "
                f"(WORLD_SIZE): it must be a multiple of {world}"
            )
        return max(1, self.batch_size_train // world // divisor), self.accum_batch_num * divisor


_SEGMENT_KEY = re.compile(r"^(lr_cosine_max|lr_T_half)_(\d+)$")


def _collect_segments(raw: dict[str, Any]) -> dict[str, Any]:
    """Move lr_cosine_max_k / lr_T_half_k (and the lr_T_half alias) into `cosine_segments`."""
    raw = dict(raw)
    if "lr_T_half" in raw:
        if "lr_T_half_1" in raw:
            raise ParamsError("lr_T_half and lr_T_half_1 are both set: keep one (they are aliases)")
        raw["lr_T_half_1"] = raw.pop("lr_T_half")
    maxes: dict[int, Any] = {}
    halves: dict[int, Any] = {}
    for key in list(raw):
        m = _SEGMENT_KEY.match(key)
        if m:
            (maxes if m.group(1) == "lr_cosine_max" else halves)[int(m.group(2))] = raw.pop(key)
    if not maxes and not halves:
        return raw
    ks = sorted(set(maxes) | set(halves))
    if ks != list(range(1, len(ks) + 1)):
        raise ParamsError(f"cosine segments must be numbered 1, 2, 3, ... without gaps (got {ks})")
    segments = []
    for k in ks:
        if k not in halves:
            raise ParamsError(f"lr_cosine_max_{k} is set but lr_T_half_{k} is missing: add lr_T_half_{k}")
        lr_max = maxes.get(k, raw.get("lr_linear_max", 0.15) if k == 1 else None)
        if lr_max is None:
            raise ParamsError(f"lr_T_half_{k} is set but lr_cosine_max_{k} is missing: add lr_cosine_max_{k}")
        try:
            segments.append({"lr_max": _arith(lr_max), "t_half": _arith(halves[k])})
        except ValueError as exc:
            raise ParamsError(f"lr_cosine_max_{k}/lr_T_half_{k}: {exc}") from exc
    raw["cosine_segments"] = segments
    return raw


_UNION_TAGS = ("one", "many")  # inject_fault's branch tags, not keys a user wrote


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in _UNION_TAGS) or "params"
    if err["type"] == "extra_forbidden":
        return f"unknown parameter {loc!r}: remove it or check its spelling (see docs/trainer.md)"
    return f"parameter {loc!r}: {err['msg']} (got {err.get('input')!r})"


def load_params(raw: dict[str, Any]) -> Params:
    """Validate a parameter table; raises ParamsError with one line naming the offending key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"parameters must be a table/object, got {type(raw).__name__}")
    data = _collect_segments(raw)
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(_first_error(exc)) from None
    return params


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML parameter file (TOML may wrap them in [trainer.params])."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"cannot read parameter file {p}: {exc.strerror}") from None
    try:
        if p.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
            data = data.get("trainer", {}).get("params", data) if "trainer" in data else data
        else:
            data = json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ParamsError(f"parameter file {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"parameter file {p} must hold a table/object")
    return data
