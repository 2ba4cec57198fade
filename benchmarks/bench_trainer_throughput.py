"""Training throughput (images/s) of the detector: forward + loss + backward + SGD step on random
images with synthetic boxes, at 416 px and at the demo size, on the CPU; on CUDA also with AMP and
channels_last. Data loading is excluded (see bench_trainer_learning for end-to-end figures).

    python benchmarks/bench_trainer_throughput.py [--sizes 416 96] [--batch 8] [--steps 5] [--repeats 3]
                                                  [--no-cpu] [--gpu-batch 64]

Each figure is the median of --repeats measurements; on CUDA the four combinations of AMP and
channels_last are measured side by side, with their ratio to plain fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from trainer.loss import LossWeights, yolo_loss
from trainer.model import Detector, level_anchors


def measure(size: int, batch: int, steps: int, device: str, amp: bool, channels_last: bool, neck: int) -> float:
    torch.manual_seed(0)
    dev = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = Detector(20, neck).to(dev, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    anchors = level_anchors().to(dev)
    x = torch.rand(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
    gt = torch.tensor([[b, b % 20, 0.3 + 0.1 * (b % 4), 0.5, 0.2 + 0.05 * (b % 3), 0.3] for b in range(batch)])
    done, t0 = 0, 0.0
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            out = model(x)
        loss, _ = yolo_loss(out, gt, anchors, LossWeights(), 0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        done += batch if i >= 2 else 0
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def median_rate(repeats: int, *args: object) -> float:
    return statistics.median(measure(*args) for _ in range(repeats))  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[416, 96])
    ap.add_argument("--batch", type=int, default=8, help="CPU batch size")
    ap.add_argument("--gpu-batch", type=int, default=64, help="CUDA batch size")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--neck", type=int, nargs="+", default=[256, 64], help="neck_channels per size")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU figures")
    args = ap.parse_args()
    necks = args.neck + [args.neck[-1]] * (len(args.sizes) - len(args.neck))
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"cuda={torch.cuda.is_available()}, median of {args.repeats}")  # fmt: skip
    print("device  size  neck  batch  amp    channels_last  img/s    vs fp32")
    if not args.no_cpu:
        for size, neck in zip(args.sizes, necks, strict=True):
            r = median_rate(args.repeats, size, args.batch, args.steps, "cpu", False, False, neck)
            print(f"cpu     {size:4d}  {neck:4d}  {args.batch:5d}  False  False          {r:7.1f}", flush=True)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        torch.backends.cudnn.benchmark = True
        bs, steps = args.gpu_batch, max(args.steps, 20)
        for size, neck in zip(args.sizes, necks, strict=True):
            base = 0.0
            for amp, cl in ((False, False), (False, True), (True, False), (True, True)):
                r = median_rate(args.repeats, size, bs, steps, "cuda", amp, cl, neck)
                base = base or r
                print(f"cuda    {size:4d}  {neck:4d}  {bs:5d}  {amp!s:5}  {cl!s:5}          {r:7.1f}  "
                      f"x{r / base:4.2f}  ({name})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
