"""Bad run.toml files: one line per mistake naming the dotted key, exit 2, nothing written."""

from __future__ import annotations

import pytest
from conftest import cli, write_run

from supervisor.config import parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ('name = "x"\nepochs = 3\n[trainer]\ncommand = ["python", "t.py"]\nbogus = 1\n',
         ["trainer.bogus: unknown key"]),
        ('name = "x"\nepochs = 0\n[trainer]\ncommand = "python t.py"\n', ["epochs: Input should be greater than"]),
        ('name = "x"\n[trainer]\ncommand = "python t.py"\n', ["epochs: required key is missing"]),
        ('name = "x"\nepochs = 2\n', ["trainer: required key is missing"]),
        ('name = "x"\nepochs = 2\n[trainer]\ncommand = "python t.py {sed}"\n',
         ["trainer.command: unknown placeholder {sed}"]),
        ('name = "x"\nepochs = 2\n[trainer]\ncommand = []\n', ["trainer.command: expected a non-empty command"]),
        ('name = "x"\nepochs = 2\n[trainer]\ncommand = "t"\n[watch]\nmemory_limit = "lots"\n',
         ["watch.memory_limit: expected a size"]),
        ('name = "x"\nepochs = 2\n[trainer]\ncommand = "t"\n[watch]\nmemory_limit = "120%"\n',
         ["watch.memory_limit: expected a percentage"]),
        ('name = "x"\nepochs = 2\n[trainer]\ncommand = "t"\n[seeds]\npool = [1, 1]\n',
         ["seeds.pool: expected distinct"]),
        ('name = "x"\nepochs = 2\n[trainer]\ncommand = "t"\n[restart]\nper_fault = {nann = 1}\n',
         ["restart.per_fault: unknown fault 'nann'"]),
        ('name = "x"\nepochs = 2\n[trainer]\ncommand = "t"\n[checkpoints]\npattern = "model.pt"\n',
         ["checkpoints.pattern: expected a file pattern with an {epoch} placeholder"]),
        ('name = "x"\nepochs = 2\n[trainer]\ncommand = "t"\n[storage]\nurl = "s3://b/p"\n'
         'aws_secret_access_key = "hunter2hunter2"\n', ["storage.aws_secret_access_key: secrets do not belong"]),
        ('name = "x"\nepochs = 2\n[trainer]\ncommand = "t"\n[storage]\nurl = "http://b/p"\n',
         ["storage.url: expected s3://bucket/prefix or file:///absolute/path"]),
        ('name = "x"\nepochs = "two"\n[trainer]\ncommand = "t"\n', ["epochs: Input should be a valid integer"]),
        ('name = "x\nepochs = 2\n', ["not valid TOML"]),
        ('name = "a b"\nepochs = 2\n[trainer]\ncommand = "t"\n', ["name: String should match pattern"]),
    ],
)  # fmt: skip
def test_validate_reports_each_mistake_in_one_line(tmp_path, text, expected):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    for verb in ("validate", "start"):
        out = cli(verb, str(toml))
        assert out.returncode == 2, (verb, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == len(expected), lines
        for line, want in zip(lines, expected, strict=True):
            assert want in line and str(toml) in line
        assert "Traceback" not in out.stderr
        assert "hunter2" not in out.stderr + out.stdout
        assert not (tmp_path / "runs").exists()


def test_several_mistakes_are_all_reported(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('name = "x"\nepochs = -1\nfoo = 2\n[trainer]\ncommand = "t"\n[watch]\nheartbeat_timeout_s = 0\n')
    out = cli("validate", str(toml))
    assert out.returncode == 2
    keys = sorted(line.split(": ")[1] for line in out.stderr.strip().splitlines())
    assert keys == ["epochs", "foo", "watch.heartbeat_timeout_s"]


def test_missing_file_and_good_file(tmp_path):
    out = cli("validate", str(tmp_path / "nope.toml"))
    assert out.returncode == 2 and "file not found" in out.stderr
    good = write_run(tmp_path)
    out = cli("validate", str(good))
    assert out.returncode == 0 and "ok" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_report_of_a_dir_without_run(tmp_path):
    out = cli("report", str(tmp_path))
    assert out.returncode == 2 and "no ledger.jsonl" in out.stderr


def test_usage_errors_exit_2():
    assert cli("frobnicate").returncode == 2
    assert cli("start").returncode == 2


@pytest.mark.parametrize(
    "value, expected",
    [(1024, 1024), ("20GiB", 20 * 2**30), ("512MB", 512 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("90%", 0.9)],
)
def test_parse_size(value, expected):
    assert parse_size(value, "x") == expected
