"""Parameter names exactly as the experiment log; every mistake is one line naming the key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_helpers import ROOT

from trainer.params import LossWeights, ParamsError, load_params, read_params_file

# The parameter blocks of two runs of the log, verbatim (Python assignment syntax).
BASELINE = """
batch_size_train = 32
batch_size_test = 64
accum_batch_num = 2
num_epoch = 160
multi_scale_epoch = 150
output_scale_S = 13
weight_decay = 0.0005
momentum = 0.9
mix_precision = True
clip_max_norm = 20.0
lambda_scale_1 = 16
lambda_scale_2 = 4
lambda_scale_4 = 1
lambda_coord = 10.0
lambda_noobj = 1.0
lambda_obj = 50.0
lambda_class = 10.0
lambda_prior = 0.1
epoch_prior = 60
IoU_thres = 0.7
scale_coord = True
eps = 1e-6
no_obj_v3 = True
lr_linear_max = 0.5
lr_warmup_epoch = 30
lr_T_half = 130
conf_thres = 0.01
conf_ratio_thres = 0.05
test_pr_after_epoch = 10
test_pr_batch_ratio = 1.0
"""

BUBBLIIIING = """
batch_size_train = 32
batch_size_test = 64
accum_batch_num = 2
num_epoch = 200
freeze_epoch = 0
multi_scale_epoch = 190
output_scale_S = 13
weight_decay = 0.0005
momentum = 0.937
mix_precision = True
clip_max_norm = 20.0
lambda_scale_1 = 0.4
lambda_scale_2 = 1.0
lambda_scale_4 = 4.0
lambda_coord = 0.05
lambda_noobj = 1.0
lambda_obj = 5.0
lambda_class = 1 * 20 / 80
lambda_prior = 0.001
epoch_prior = 60
IoU_thres = 0.5
scale_coord = True
eps = 1e-6
no_obj_v3 = True
lr_linear_max = 0.01
lr_warmup_epoch = 30
lr_cosine_max_1 = 0.01
lr_T_half_1 = 170
random_ratio = 0.5
conf_thres = 0.01
conf_ratio_thres = 0.05
test_pr_after_epoch = 10
test_pr_batch_ratio = 1.0
"""


def from_log(block: str, evaluate: bool = True) -> dict:
    """Turn `k = v` lines into a dict; values as Python literals, or kept as text when not evaluating."""
    out = {}
    for line in block.strip().splitlines():
        k, _, v = (s.strip() for s in line.partition("="))
        out[k] = eval(v, {"__builtins__": {}}, {"True": True, "False": False}) if evaluate else v  # noqa: S307
    return out


def test_baseline_run_parses_with_the_lr_T_half_alias():
    p = load_params(from_log(BASELINE))
    assert p.cosine_segments[0].lr_max == 0.5 and p.cosine_segments[0].t_half == 130
    assert (p.lambda_scale_1, p.lambda_scale_2, p.lambda_scale_4) == (16, 4, 1)
    assert p.input_size == 416
    assert p.batch_plan(1) == (32, 2)
    assert p.batch_plan(2) == (16, 4)  # SUPERVISOR_BATCH_DIVISOR halves the batch, doubles accumulation


def test_bubbliiiing_run_is_expressible_even_with_the_arithmetic_as_text():
    p = load_params(from_log(BUBBLIIIING))
    assert p.lambda_class == pytest.approx(0.25)
    text = from_log(BUBBLIIIING, evaluate=False)
    text = {k: (v if k == "lambda_class" else json.loads(v.replace("True", "true"))) for k, v in text.items()}
    assert text["lambda_class"] == "1 * 20 / 80"
    assert load_params(text) == p


def test_triple_segments_and_gaps():
    p = load_params({"lr_cosine_max_1": 0.5, "lr_T_half_1": 130, "lr_cosine_max_2": 0.5, "lr_T_half_2": 50,
                     "lr_cosine_max_3": 0.25, "lr_T_half_3": 60})  # fmt: skip
    assert [(s.lr_max, s.t_half) for s in p.cosine_segments] == [(0.5, 130), (0.5, 50), (0.25, 60)]
    with pytest.raises(ParamsError, match="without gaps"):
        load_params({"lr_cosine_max_1": 0.5, "lr_T_half_1": 10, "lr_cosine_max_3": 0.1, "lr_T_half_3": 5})
    with pytest.raises(ParamsError, match="lr_T_half_2 is missing"):
        load_params({"lr_cosine_max_1": 0.5, "lr_T_half_1": 10, "lr_cosine_max_2": 0.1})


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"lambda_coordd": 1}, "unknown parameter 'lambda_coordd'"),
        ({"lambda_scale": [1, 1, 1]}, "unknown parameter 'lambda_scale'"),
        ({"IoU_thres": 1.5}, "parameter 'IoU_thres'"),
        ({"epoch_prior": -1}, "parameter 'epoch_prior'"),
        ({"momentum": 1.5}, "'momentum'"),
        ({"lambda_class": "1 / 0"}, "'lambda_class'"),
        ({"lambda_class": "__import__('os')"}, "'lambda_class'"),
        ({"image_size": 400}, "image_size 400 contradicts output_scale_S 13"),
        ({"inject_fault": {"kind": "meteor"}}, "inject_fault.kind'"),
        ({"inject_fault": [{"kind": "nan"}, {"kind": "meteor"}]}, "inject_fault.1.kind'"),
        ({"lr_T_half": 1, "lr_T_half_1": 2}, "aliases"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(raw, needle):
    with pytest.raises(ParamsError) as err:
        load_params(raw)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_params_files_json_and_toml(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"num_epoch": 7}))
    (tmp_path / "run.toml").write_text('name = "x"\n[trainer.params]\nnum_epoch = 9\nlambda_class = "1 * 20 / 80"\n')
    (tmp_path / "plain.toml").write_text("num_epoch = 11\n")
    assert load_params(read_params_file(tmp_path / "p.json")).num_epoch == 7
    p = load_params(read_params_file(tmp_path / "run.toml"))
    assert (p.num_epoch, p.lambda_class) == (9, 0.25)
    assert load_params(read_params_file(tmp_path / "plain.toml")).num_epoch == 11
    with pytest.raises(ParamsError, match="cannot read"):
        read_params_file(tmp_path / "missing.json")


def test_loss_knobs_are_flat_keys_whose_defaults_are_the_losses():
    p = load_params({"lambda_coord": 2.0, "lambda_scale_4": 3, "no_obj_v3": False})
    assert isinstance(p, LossWeights)  # yolo_loss takes the run's Params as they are
    assert (p.lambda_coord, p.lambda_scale, p.no_obj_v3) == (2.0, (1.0, 1.0, 3.0), False)
    defaults = LossWeights()
    assert {k: getattr(load_params({}), k) for k in LossWeights.model_fields} == defaults.model_dump()


def test_classes_default_to_voc_or_the_synthetic_set():
    assert len(load_params({}).class_names) == 20
    assert load_params({"synthetic_images": 10}).class_names[0] == "circle"
    assert load_params({"classes": ["a", "b"]}).class_names == ("a", "b")


def test_cli_rejects_an_unknown_key_with_exit_2(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"lr_linear_maxx": 0.1}))
    proc = subprocess.run([sys.executable, "-m", "trainer", "--params", str(tmp_path / "p.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    lines = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown parameter 'lr_linear_maxx'" in lines[0]
    assert "Traceback" not in proc.stderr
