"""Edges of run.toml and of `start` before a run begins, through the real CLI: numbers that are
not finite or out of bounds, secrets by name, unreadable config files, a trainer command that
cannot run, a store that does not answer, a run dir that cannot be written. Each ends in one line
(exit 2, or 75 for what may pass), never a traceback, never a secret."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import FAKE, cli, write_run

from supervisor.config import load_config
from supervisor.oserrors import describe_os_error
from supervisor.platforms import detect
from supervisor.store.settings import StorageSettings

INF, NAN = float("inf"), float("nan")


def refused(out: subprocess.CompletedProcess, code: int = 2) -> list[str]:
    """The stderr lines of a refusal: exit `code`, no traceback."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stderr.strip().splitlines()


def run_dir_exists(toml: Path) -> bool:
    return (toml.parent / "runs").exists()


def with_run_dir(toml: Path, run_dir: str) -> Path:
    """`toml` with a top-level run_dir (write_run writes none)."""
    toml.write_text(f"run_dir = {run_dir!r}\n" + toml.read_text())
    return toml


# -- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sections, key, want",
    [
        ({"watch": {"stop_grace_s": INF}}, "watch.stop_grace_s", "finite number (got inf)"),
        ({"watch": {"poll_interval_s": 1e-9}}, "watch.poll_interval_s", "greater than or equal to 0.01"),
        ({"watch": {"poll_interval_s": 6.0}}, "watch.poll_interval_s", "less than or equal to 5"),
        ({"watch": {"heartbeat_timeout_s": NAN}}, "watch.heartbeat_timeout_s", "finite number (got nan)"),
        ({"watch": {"heartbeat_timeout_s": 1e9}}, "watch.heartbeat_timeout_s", "less than or equal to 604800"),
        ({"watch": {"startup_timeout_s": INF}}, "watch.startup_timeout_s", "finite number"),
        ({"watch": {"cuda_error_grace_s": -1.0}}, "watch.cuda_error_grace_s", "greater than or equal to 0"),
        ({"watch": {"memory_limit": "9" * 400 + "GiB"}}, "watch.memory_limit", "expected a size"),
        ({"restart": {"backoff_max_s": INF}}, "restart.backoff_max_s", "finite number"),
        ({"checkpoints": {"settle_s": NAN}}, "checkpoints.settle_s", "finite number"),
        ({"storage": {"url": "file:///tmp/x", "lease_ttl_s": 1e-9}}, "storage.lease_ttl_s", "expected 1 to 86400"),
        ({"storage": {"url": "file:///tmp/x", "drain_timeout_s": INF}}, "storage.drain_timeout_s", "finite number"),
        ({"platform": {"notice_poll_s": 0.01}}, "platform.notice_poll_s", "greater than or equal to 0.1"),
        ({"platform": {"session_limit_s": INF}}, "platform.session_limit_s", "finite number"),
        ({"platform": {"stop_margin_s": NAN}}, "platform.stop_margin_s", "finite number"),
        ({"platform": {"session_limit_s": 100.0}}, "platform.stop_margin_s", "not less than session_limit_s"),
    ],
)  # fmt: skip
def test_numbers_must_be_finite_and_within_bounds(tmp_path, sections, key, want):
    toml = write_run(tmp_path, **sections)
    (line,) = refused(cli("validate", str(toml)))
    assert f"{toml}: {key}: " in line and want in line, line


def test_numbers_at_their_bounds_are_accepted(tmp_path):
    toml = write_run(tmp_path, watch={"poll_interval_s": 0.01, "heartbeat_timeout_s": 604800.0},
                     storage={"url": f"file://{tmp_path}/store", "lease_ttl_s": 1.0},
                     platform={"notice_poll_s": 0.1, "session_limit_s": 60.0, "stop_margin_s": 0.0})  # fmt: skip
    out = cli("validate", str(toml))
    assert out.returncode == 0, out.stderr


# -- secrets ------------------------------------------------------------------------------------


def test_secret_names_are_refused_anywhere_by_dotted_key_never_by_value(tmp_path):
    values = {f"V{i}": f"s3cr3tValue{i}xyz" for i in range(9)}
    toml = write_run(
        tmp_path,
        trainer={"env": {"WANDB_API_KEY": values["V0"], "MY_API_KEY": values["V1"], "HF_TOKEN": values["V2"],
                         "CUDA_VISIBLE_DEVICES": "0"}},
        params={"db": {"host": "h", "password": values["V3"]}, "runs": [{"auth_token": values["V4"]}],
                "wandb": {"key": values["V5"]}},
        storage={"url": "s3://bucket/p", "secret_access_key": values["V6"]},
        platform={"detect": "generic", "Client_Secret": values["V7"]},
    )  # fmt: skip
    expected = {
        "trainer.env.WANDB_API_KEY", "trainer.env.MY_API_KEY", "trainer.env.HF_TOKEN", "trainer.params.db.password",
        "trainer.params.runs[0].auth_token", "trainer.params.wandb.key", "storage.secret_access_key",
        "platform.Client_Secret",
    }  # fmt: skip
    for verb in ("validate", "start"):
        out = cli(verb, str(toml))
        lines = refused(out)
        named = {line.split(": ")[1] for line in lines}
        assert named == expected, lines
        assert all("secrets do not belong in run.toml" in line for line in lines)
        for value in values.values():
            assert value not in out.stdout + out.stderr
        assert not run_dir_exists(toml)
    by_key = {line.split(": ")[1]: line for line in lines}
    assert "export WANDB_API_KEY in the supervisor's environment" in by_key["trainer.env.WANDB_API_KEY"]
    assert "AWS_SECRET_ACCESS_KEY" in by_key["storage.secret_access_key"]
    assert "credentials file" in by_key["storage.secret_access_key"]
    assert "secret store" in by_key["trainer.params.db.password"]


def test_names_that_only_resemble_secrets_pass(tmp_path):
    toml = write_run(
        tmp_path,
        trainer={"env": {"TOKENIZERS_PARALLELISM": "false", "AWS_SHARED_CREDENTIALS_FILE": "/creds/file"}},
        params={"max_tokens": 4096, "tokenizer": "bpe", "keyboard": 1, "token_path": "/run/token"},
    )  # fmt: skip
    out = cli("validate", str(toml))
    assert out.returncode == 0, out.stderr


# -- [storage] is one model ---------------------------------------------------------------------


def test_storage_table_is_the_storage_settings_model(tmp_path):
    toml = write_run(tmp_path, storage={"url": f"file://{tmp_path}/store/", "multipart_threshold": "8MiB"})
    cfg = load_config(toml)
    assert isinstance(cfg.storage, StorageSettings)
    assert cfg.storage.url == f"file://{tmp_path}/store" and cfg.storage.multipart_threshold == 8 * 2**20
    assert cfg.storage == StorageSettings(url=f"file://{tmp_path}/store", multipart_threshold=8 * 2**20)
    with pytest.raises(ValueError):
        cfg.storage.lease_ttl_s = 5.0  # frozen
    for bad in (dict(lease_ttl_s=0.5), dict(lease_ttl_s=INF), dict(drain_timeout_s=NAN), dict(bogus=1)):
        with pytest.raises(ValueError):
            StorageSettings(url="s3://b/p", **bad)
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, supervisor.store.settings; print('boto3' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert imported.stdout.strip() == "False"


def test_credentials_in_the_storage_url_are_refused_without_echo(tmp_path):
    toml = write_run(tmp_path, storage={"url": "s3://AKIAEXAMPLE:PlainSecret123@bucket/p"})
    out = cli("validate", str(toml))
    (line,) = refused(out)
    assert "storage.url: must not hold credentials" in line
    assert "PlainSecret123" not in out.stdout + out.stderr


# -- the config file itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, want",
    [
        (b"\x7fELF\x02\x01\x01\x00\x00\x00garbage", "not UTF-8 text: it holds NUL bytes"),
        (b'name = "caf\xe9"\nepochs = 2\n', "not UTF-8 text: byte 0xe9 at offset 11"),
        (bytes(range(128, 256)), "not UTF-8 text"),
    ],
)
def test_binary_config_is_one_line(tmp_path, data, want):
    toml = tmp_path / "run.toml"
    toml.write_bytes(data)
    for verb in ("validate", "start"):
        (line,) = refused(cli(verb, str(toml)))
        assert line.startswith(f"{toml}: ") and want in line, line
    assert not run_dir_exists(toml)


def test_directory_or_unreadable_config_is_one_line(tmp_path):
    for verb in ("validate", "start"):
        (line,) = refused(cli(verb, str(tmp_path)))
        assert "is a directory; pass the path of the run.toml file" in line
    if os.geteuid() == 0:
        return  # root reads any file: the unreadable case cannot be made here
    toml = write_run(tmp_path)
    toml.chmod(0)
    (line,) = refused(cli("validate", str(toml)))
    assert "cannot read it (Permission denied)" in line


def test_a_byte_order_mark_is_harmless(tmp_path):
    toml = write_run(tmp_path)
    toml.write_bytes(b"\xef\xbb\xbf" + toml.read_bytes())
    assert cli("validate", str(toml)).returncode == 0


def test_dot_names_are_refused(tmp_path):
    toml = write_run(tmp_path, name="..")
    (line,) = refused(cli("validate", str(toml)))
    assert "name: expected a run name, not '.' or '..'" in line


# -- the trainer command ------------------------------------------------------------------------


def test_a_command_that_does_not_exist_stops_validate_and_start_before_anything_is_written(tmp_path):
    toml = write_run(tmp_path, command=["trainr-no-such-program", "--epochs", "{epochs}"])
    for verb in ("validate", "start"):
        (line,) = refused(cli(verb, str(toml)))
        assert line == (f"{toml}: trainer.command: 'trainr-no-such-program' was not found on PATH; "
                        "check the spelling or give its full path")  # fmt: skip
    assert not run_dir_exists(toml)  # no run dir, so no ledger and no attempt burnt a seed


def _script(path: Path, mode: int) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "command, trainer, setup, want",
    [
        (["./train.sh"], {}, None, "'./train.sh' does not exist (looked in"),
        (["./train.sh"], {}, lambda d: _script(d / "train.sh", 0o644), "'./train.sh' is not executable; chmod +x"),
        (["./sub"], {}, lambda d: (d / "sub").mkdir(), "'./sub' is not a file"),
        (["python", "missing.py", "--x"], {}, None, "script 'missing.py' does not exist"),
        (["python3", "sub/missing.py"], {}, None, "script 'sub/missing.py' does not exist"),
        (["python", str(FAKE)], {"cwd": "nowhere"}, None, "trainer.cwd: "),
        (["mytool"], {"env": {"PATH": "/nonexistent-bin"}}, None, "not found on the PATH set in [trainer] env"),
    ],
)  # fmt: skip
def test_command_problems_are_named(tmp_path, command, trainer, setup, want):
    if setup:
        setup(tmp_path)
    toml = write_run(tmp_path, command=command, trainer=trainer)
    (line,) = refused(cli("validate", str(toml)))
    assert f"{toml}: trainer." in line and want in line, line


@pytest.mark.parametrize(
    "command, trainer",
    [
        (["./train.sh", "{seed}"], {}),
        (["{run_dir}/bin/train", "--seed", "{seed}"], {}),  # a placeholder in argv[0]: not checkable
        (["python", "-m", "trainer"], {}),
        (["python3.11", "-u", "missing.py"], {}),  # the script is not the next argument
        (["python", "{run_dir}/train.py"], {}),
        (["mytool"], "PATH"),
        (["mytool"], "RELATIVE PATH"),  # resolved against the trainer's cwd, as its exec does
        (["sh", "-c", "exit 0"], {}),
    ],
)  # fmt: skip
def test_commands_that_can_run_pass(tmp_path, command, trainer):
    _script(tmp_path / "train.sh", 0o755)
    if trainer in ("PATH", "RELATIVE PATH"):
        (tmp_path / "bin").mkdir()
        _script(tmp_path / "bin" / "mytool", 0o755)
        trainer = {"env": {"PATH": str(tmp_path / "bin") if trainer == "PATH" else "bin"}}
    toml = write_run(tmp_path, command=command, trainer=trainer)
    out = cli("validate", str(toml))
    assert out.returncode == 0, out.stderr


# -- stores and disks at start ------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _aws_env(tmp_path: Path) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "AKIAFAKEFAKE", "AWS_SECRET_ACCESS_KEY": "NotARealSecretButKeepItOut123",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials")}  # fmt: skip


def test_a_store_that_does_not_answer_pauses_start(tmp_path):
    port = _closed_port()
    toml = write_run(tmp_path, storage={"url": "s3://bucket/runs", "endpoint_url": f"http://127.0.0.1:{port}",
                                        "region": "us-east-1", "retry_attempts": 2})  # fmt: skip
    env = _aws_env(tmp_path)
    out = cli("start", str(toml), env=env)
    lines = refused(out, code=75)
    assert lines[-1].startswith(f"supervisor: store s3://bucket/runs at http://127.0.0.1:{port} did not answer")
    assert lines[-1].endswith("run the same command again when it answers")
    assert env["AWS_SECRET_ACCESS_KEY"] not in out.stdout + out.stderr
    assert not (toml.parent / "runs" / "run" / "ledger.jsonl").exists()


def test_a_permanent_store_error_is_exit_2(tmp_path):
    toml = write_run(tmp_path, storage={"url": "s3://bucket/runs", "profile": "no-such-profile"})
    lines = refused(cli("start", str(toml), env=_aws_env(tmp_path)))
    assert "storage.profile 'no-such-profile' names a profile that is not in" in lines[-1]


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("in the way")
    toml = with_run_dir(write_run(tmp_path), "afile/{name}")
    lines = refused(cli("start", str(toml)))
    assert f"{tmp_path}/afile" in lines[-1] and "Not a directory" in lines[-1], lines


def test_a_run_dir_on_a_filesystem_that_refuses_writes_pauses(tmp_path):
    target = Path("/sys/supervisor-test-run")  # sysfs takes no new folders: EPERM (root), EACCES, EROFS
    try:
        target.mkdir()
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.EROFS):
            pytest.skip(f"mkdir in /sys fails with {errno.errorcode.get(exc.errno)} here")
    else:
        target.rmdir()
        pytest.skip("/sys takes new folders here")
    toml = with_run_dir(write_run(tmp_path), f"{target}/{{name}}")
    lines = refused(cli("start", str(toml)), code=75)
    assert f"cannot write {target}" in lines[-1] and "then run the same command again" in lines[-1], lines


@pytest.mark.parametrize(
    "code, exit_code, fix",
    [
        (errno.ENOSPC, 75, "free disk space"),
        (errno.EDQUOT, 75, "disk quota"),
        (errno.EROFS, 75, "remount the filesystem read-write (or set another run_dir)"),
        (errno.EACCES, 75, "fix the permissions"),
        (errno.EPERM, 75, "fix the permissions"),
        (errno.EIO, 75, "I/O error"),
        (errno.ENOTDIR, 2, "check that path and run_dir"),
        (errno.ENAMETOOLONG, 2, "check that path and run_dir"),
    ],
)
def test_describe_os_error(code, exit_code, fix):
    exc = OSError(code, os.strerror(code), "/runs/r/ledger.jsonl")
    got_code, line = describe_os_error(exc, "write")
    assert got_code == exit_code
    assert line.startswith(f"cannot write /runs/r/ledger.jsonl: {os.strerror(code)}; ") and fix in line
    assert "\n" not in line
    assert ("then run the same command again" in line) == (exit_code == 75)


def test_describe_os_error_without_a_filename_or_with_a_newline_in_it():
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device"), "write")[1].startswith(
        "cannot write: No space left on device; free disk space"
    )
    code, line = describe_os_error(OSError(errno.EIO, "I/O error", "a\nb"), "read")
    assert code == 75 and line.startswith("cannot read 'a\\nb': I/O error;") and "\n" not in line
    odd = describe_os_error(OSError("odd"), "write")
    assert odd == (2, "cannot write: odd; check that path and run_dir in run.toml")


def test_status_and_report_of_unreadable_run_files_are_one_line(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "ledger.jsonl").mkdir(parents=True)  # unreadable as a file, even for root
    for args in (("status", str(run_dir)), ("status", str(run_dir), "--json"), ("report", str(run_dir))):
        (line,) = refused(cli(*args))
        assert line.startswith(f"supervisor: cannot read {run_dir}/ledger.jsonl: Is a directory"), line


# -- platforms ----------------------------------------------------------------------------------


def test_kaggle_working_alone_starts_the_clock_with_the_container(tmp_path):
    first = detect("auto", env={}, kaggle_dir=tmp_path)
    again = detect("auto", env={}, kaggle_dir=tmp_path)
    assert first.name == "kaggle" and first.session_limit_s == 12 * 3600
    assert first.session_start == again.session_start == psutil.Process(1).create_time()
    assert detect("auto", env={}, kaggle_dir=tmp_path / "absent").name == "generic"
    assert detect("auto", env={"COLAB_GPU": "1"}, kaggle_dir=tmp_path).name == "colab"
