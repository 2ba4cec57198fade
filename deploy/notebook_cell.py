# Bootstrap cell for a Kaggle or Google Colab notebook (or any Jupyter): paste this whole file into
# ONE cell and run it. It finds out where it runs and reads your credentials from that platform's
# secret store.
#
# Before the first run:
#   1. Kaggle: Settings > Internet on (pip, the bucket and Kaggle's secret store all need it), and a
#      GPU accelerator if you train for real. Colab: Runtime > Change runtime type: a GPU.
#   2. Secrets: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary
#      keys) of your S3-compatible bucket. Kaggle: Add-ons > Secrets, attached to this notebook.
#      Colab: the key icon (Secrets) in the left bar, with "Notebook access" on. Elsewhere: the
#      kernel's environment.
#   3. Edit the two lines marked EDIT below.
#
# Re-run this same cell, in this session or a new one, to continue the run: the supervisor takes
# the ledger and the last verified checkpoint from the bucket. It pauses by itself (exit 75)
# 15 minutes before the 12-hour limit (Kaggle: from the container's start, Colab: from the VM's
# boot; set [platform] session_limit_s for other limits). Stop the cell to pause earlier.
# docs/deploy.md has more.
import os
import signal
import subprocess
import sys
from pathlib import Path

# EDIT: where pip finds this project (a fork, a tag, a private mirror...). A clone on this disk (an
# offline mirror) is "train-supervisor[trainer] @ git+file://localhost/path/to/clone": pip refuses the
# host-less git+file:///path ("Invalid requirement"), so this cell rewrites that form to localhost.
# [trainer] brings what the demo's reference detector imports (the platform's torch is kept); without
# it pip installs the torch-free watchdog alone, enough for a trainer of your own.
PACKAGE = "train-supervisor[trainer] @ git+https://github.com/YOUR-ACCOUNT/train-supervisor.git"


def detect_platform(env=os.environ):
    """"kaggle", "colab" or "jupyter" (any other kernel), from what each platform sets."""
    if "KAGGLE_KERNEL_RUN_TYPE" in env or Path("/kaggle/working").is_dir():
        return "kaggle"
    if "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env:
        return "colab"
    return "jupyter"


PLATFORM = detect_platform()
# /kaggle/working survives as a Kaggle notebook's output; Colab's /content is lost with the VM. The
# bucket is what a new session resumes from, everywhere.
WORK_DIR = {"kaggle": Path("/kaggle/working"), "colab": Path("/content")}.get(PLATFORM, Path.cwd())
SECRETS_HELP = {
    "kaggle": "add it under Add-ons > Secrets and attach it to this notebook (Internet must be on)",
    "colab": "add it with the key icon (Secrets) in the left bar and switch on its Notebook access",
}.get(PLATFORM, "set it in the environment of the notebook's kernel")


def read_platform_secrets(names):
    """The values of the secrets among `names` this notebook may read, by name; others are left out."""
    found = {}
    if PLATFORM == "kaggle":
        from kaggle_secrets import UserSecretsClient  # only exists inside Kaggle kernels

        client = UserSecretsClient()
        lookup = client.get_secret
    elif PLATFORM == "colab":
        from google.colab import userdata  # asks the browser tab, so only in the kernel, never a subprocess

        lookup = userdata.get
    else:
        lookup = os.environ.__getitem__
    for name in names:
        try:
            found[name] = lookup(name)
        except Exception:  # not attached, no notebook access, no internet...: the caller names what is missing
            pass
    return found


PLACEHOLDER = "YOUR-"
REQUIRED_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRETS = ("AWS_SESSION_TOKEN",)
# The demo of the repository's run.toml (a detector on synthetic shapes) with [storage] added.
# Replace it with your own run; keep `name` and [storage] url to continue the same run later.
RUN_TOML = """
name = "demo"
epochs = 7

[trainer]
command = ["python", "-m", "trainer"]

[trainer.params]
data_root = "data/shapes"
synthetic_images = 800
synthetic_size = 96
output_scale_S = 3
num_epoch = 7
batch_size_train = 8
batch_size_test = 32
multi_scale_epoch = 0
neck_channels = 64
pretrained = false
num_workers = 1
mix_precision = false
lr_linear_max = 0.02
lr_warmup_epoch = 1
lr_cosine_max_1 = 0.02
lr_T_half_1 = 6
lambda_coord = 2.0
lambda_obj = 2.0
lambda_class = 2.0
lambda_prior = 0.1
epoch_prior = 1
random_ratio = 0.3
test_pr_after_epoch = 0
inject_fault = { kind = "nan", epoch = 3, step = 10, attempt = 0 }   # DEMO: one NaN restart; delete

[seeds]
pool = [29, 28, 31, 30, 37]

[watch]
heartbeat_timeout_s = 300
memory_limit = "90%"
disk_min_free = "500MiB"

[checkpoints]
keep_last = 2
keep_best = 1
best_metric = "AP50"

[storage]
url = "s3://YOUR-BUCKET/train-supervisor"   # EDIT: your bucket (and a prefix)
# endpoint_url = "https://<account>.r2.cloudflarestorage.com"   # for anything but AWS S3
# region = "auto"
"""
EXIT_MEANING = {
    0: "completed: every epoch has a verified checkpoint",
    1: "gave up: the report below says why; change the run before starting it again",
    2: (
        "did not start: run.toml, the bucket or its credentials, or the run is driven by another "
        "supervisor (the line above names it and when its lease expires)"
    ),
    75: (
        "paused (stopped, session time limit or preemption): run this cell again, here or in a new "
        "session, to continue from the bucket"
    ),
}


def export_secrets(found):
    """Put the credentials in os.environ, which the supervisor inherits; False if one is missing."""
    present = {name: found[name] for name in REQUIRED_SECRETS + OPTIONAL_SECRETS if found.get(name)}
    missing = [name for name in REQUIRED_SECRETS if name not in present]
    if missing:
        print(f"missing secret {', '.join(missing)}: {SECRETS_HELP}")
        return False
    os.environ.update(present)
    # Names only: a notebook's output is saved with it, and shared or published with it.
    print(f"credentials set from the secret store: {', '.join(present)} (values not shown)")
    return True


def stream(argv, cwd):
    """Run argv, echoing its output into the cell as it comes; its exit status (-N: killed by N).

    It gets its own session so that stopping the cell reaches it as exactly one SIGTERM (the
    supervisor pauses gracefully); stopping the cell again sends another (the trainer dies now).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    while True:
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
            return proc.wait()
        except KeyboardInterrupt:
            print("cell stopped: asking the supervisor to pause (stop again to kill the trainer now)", flush=True)
            proc.send_signal(signal.SIGTERM)


def pip_requirement(package):
    """`package` as pip takes it: a local git URL needs a host (git+file://localhost/path), and pip
    refuses git+file:///path with "Invalid requirement", so that form is rewritten (one line says so)."""
    fixed = package.replace("git+file:///", "git+file://localhost/")
    if fixed != package:
        print("PACKAGE: pip refuses git+file:///path, installing from git+file://localhost/path instead")
    return fixed


def main(read_secrets=read_platform_secrets, package=PACKAGE, work_dir=WORK_DIR, run_toml=RUN_TOML):
    """Install, start or continue the run, show its report; the exit status of `supervisor start`."""
    unedited = [what for what, text in (("PACKAGE", package), ("RUN_TOML", run_toml)) if PLACEHOLDER in text]
    if unedited:  # before anything is written or installed
        print(f"edit the {' and '.join(unedited)} lines marked EDIT in this cell first ({PLACEHOLDER}... placeholders)")
        return 2
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "run.toml"
    # Written every time, so the text in this cell is the run; the same text continues the same run.
    config.write_text(run_toml, encoding="utf-8")
    if not export_secrets(read_secrets(REQUIRED_SECRETS + OPTIONAL_SECRETS)):
        return 2
    python = sys.executable
    package = pip_requirement(package)
    if stream([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", package], work_dir) != 0:
        print(f"pip could not install {package!r}: see its output above")
        return 2
    code = stream([python, "-m", "supervisor", "start", str(config)], work_dir)
    meaning = EXIT_MEANING.get(code, "the supervisor itself was killed: run this cell again to continue")
    print(f"\nsupervisor start exited {code}: {meaning}\n", flush=True)
    show_report(config, work_dir)
    return code


def show_report(config, work_dir):
    """The run's record: as markdown with its plot inline in a notebook (the package pip just installed into this
    kernel's interpreter), else the plain text of `supervisor report`."""
    try:
        import importlib

        importlib.invalidate_caches()  # installed after this kernel started
        from supervisor import report

        report.show(str(config))
    except Exception:  # noqa: BLE001 - an older package without show(): the text is as good a record
        stream([sys.executable, "-m", "supervisor", "report", str(config)], work_dir)


if __name__ == "__main__":
    exit_code = main()
    if exit_code not in (0, 75):
        # An error, not a quiet end, so a "Save & Run All" version that did not train shows as failed.
        raise SystemExit(f"ended with exit status {exit_code}: see the lines above")
