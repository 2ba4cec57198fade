"""A plain PyTorch training loop that knows nothing of the supervisor.

It counts optimizer steps, evaluates every --eval-every steps and at the last one, and keeps ONE
checkpoint file, <out-dir>/ckpt.pt, overwritten at each eval; --resume goes on from it. That is all
`run-zero-code.toml` needs. `train_supervised.py` is the same script with the few lines of protocol
mode added: `diff train.py train_supervised.py` shows them.

The task: classify 32-dimensional points by the arg-max of a fixed random "teacher" network, with a
small MLP. The data is generated here (no download); a run of 300 steps takes a few seconds on a CPU.

    python train.py --seed 1 --max-steps 300            # by hand
    python train.py --seed 2 --max-steps 300 --resume   # go on from out/ckpt.pt
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--max-steps", type=int, default=300)
parser.add_argument("--eval-every", type=int, default=50)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--out-dir", default="out")
parser.add_argument("--resume", action="store_true", help="go on from <out-dir>/ckpt.pt")
args = parser.parse_args()


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same points for every run: the data does not depend on --seed."""
    teacher = torch.randn(32, 4, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 32, generator=generator)
    return x, (torch.tanh(x) @ teacher).argmax(dim=1)


x_train, y_train = make_data(8192, torch.Generator().manual_seed(1))
x_val, y_val = make_data(2048, torch.Generator().manual_seed(2))

torch.manual_seed(args.seed)
model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
out_dir = Path(args.out_dir)
out_dir.mkdir(parents=True, exist_ok=True)
ckpt_path = out_dir / "ckpt.pt"

step = 0  # optimizer steps done
ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if args.resume else None
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    step = ckpt["step"]
    if ckpt["seed"] == args.seed:  # the same seed: go on exactly; a new one: a new batch order from here
        torch.set_rng_state(ckpt["rng"])
    print(f"resumed at step {step}", flush=True)


def evaluate() -> float:
    model.eval()
    with torch.no_grad():
        val_loss = nn.functional.cross_entropy(model(x_val), y_val).item()
    model.train()
    return val_loss


def injected_faults(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Test hook for tests/test_examples.py, not part of the recipe: delete it in your own script.

    EXAMPLE_FAULTS="nan@70 hang@160 stall@230": at that optimizer step the loss turns NaN, the script
    hangs (silent), or stalls (alive, two lines a second, no progress: for a test to kill -9). Each fires
    once per run: it leaves the marker <out-dir>/fired-<kind>@<step>. EXAMPLE_STEP_S=0.01: each step takes
    that much longer (a bigger model).
    """
    time.sleep(float(os.environ.get("EXAMPLE_STEP_S", "0")))
    for fault in os.environ.get("EXAMPLE_FAULTS", "").split():
        kind, _, at = fault.partition("@")
        marker = out_dir / f"fired-{fault}"
        if int(at) != step or marker.exists():
            continue
        marker.touch()
        print(f"injecting {kind} at step {step}", flush=True)
        if kind == "nan":
            loss = loss * float("nan")
        while kind in ("hang", "stall"):
            time.sleep(0.5)
            if kind == "stall":
                print(f"stalled at step {step}", flush=True)
    return loss


def checkpoint_state() -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "seed": args.seed,
            "rng": torch.get_rng_state()}  # fmt: skip


def save(state: dict) -> Path:
    tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, ckpt_path)  # never a half-written ckpt.pt
    return ckpt_path


while step < args.max_steps:
    t0 = time.perf_counter()
    idx = torch.randint(len(x_train), (args.batch_size,))  # the global generator: its state is checkpointed
    loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
    loss = injected_faults(loss, step + 1)  # test hook, see above
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    step += 1
    if step % 10 == 0:
        print(f"step {step}: loss {loss.item():.4f} ({(time.perf_counter() - t0) * 1000:.1f} ms)", flush=True)
    if step % args.eval_every == 0 or step == args.max_steps:
        val_loss = evaluate()
        print(f"eval step {step}: val_loss {val_loss:.4f}", flush=True)
        path = save(checkpoint_state())
        print(f"checkpoint {path} at step {step}", flush=True)
