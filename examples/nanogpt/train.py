"""A nanoGPT-style training script: a small character-level GPT on a generated text, CPU, seconds.

Written for this repository in the conventions of karpathy/nanoGPT's train.py, so that its run.toml is
the one a nanoGPT user writes: config by `--key=value`, `--init_from=scratch|resume`, one checkpoint
file `out_dir/ckpt.pt` overwritten at an eval when the val loss improved (or always, with
`--always_save_checkpoint=True`), `iter_num` in it, `step N: train loss X, val loss Y` at evals and
`iter N: loss X, time Yms` every `log_interval` iterations. It knows nothing of the supervisor.

    python train.py --max_iters=300                      # by hand
    python train.py --max_iters=600 --init_from=resume   # go on from out/ckpt.pt
"""

import math
import os
import random
import sys
import time
from ast import literal_eval

import torch
from torch import nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# default config values
out_dir = "out"
eval_interval = 50
log_interval = 10
eval_iters = 20
always_save_checkpoint = False  # if True, save after every eval, not only when the val loss improved
init_from = "scratch"  # 'scratch' or 'resume'
seed = 1337  # nanoGPT hard-codes torch.manual_seed(1337); a key lets a restart draw other batches
batch_size = 16
block_size = 32
n_layer = 2
n_head = 2
n_embd = 48
learning_rate = 3e-3
max_iters = 300
weight_decay = 0.1
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
warmup_iters = 20
lr_decay_iters = 300
min_lr = 3e-4
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
for arg in sys.argv[1:]:  # nanoGPT's configurator, in short: --key=value overrides a default above
    assert arg.startswith("--") and "=" in arg, f"expected --key=value, got {arg!r}"
    key, val = arg[2:].split("=", 1)
    assert key in config_keys, f"unknown config key {key!r}"
    try:
        val = literal_eval(val)
    except (SyntaxError, ValueError):
        pass  # a string
    assert type(val) is type(globals()[key]), f"{key}: expected a {type(globals()[key]).__name__}, got {val!r}"
    print(f"Overriding: {key} = {val}")
    globals()[key] = val
config = {k: globals()[k] for k in config_keys}

# data: a generated text (the same for every run), characters as tokens, 90/10 split
_rng = random.Random(42)
_words = (["the cat", "a dog", "the old man", "my sister", "a small bird", "the king"],
          ["sat on", "ran to", "looked at", "jumped over", "sang to", "dreamt of"],
          ["the mat", "the park", "a tall tree", "the moon", "the river", "the castle"])  # fmt: skip
text = "".join(f"{_rng.choice(_words[0])} {_rng.choice(_words[1])} {_rng.choice(_words[2])}.\n" for _ in range(2000))
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
train_data, val_data = data[: int(0.9 * len(data))], data[int(0.9 * len(data)) :]


def get_batch(split):
    d = train_data if split == "train" else val_data
    ix = torch.randint(len(d) - block_size, (batch_size,))
    return torch.stack([d[i : i + block_size] for i in ix]), torch.stack([d[i + 1 : i + 1 + block_size] for i in ix])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in self.c_attn(self.ln_1(x)).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block() for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)
iter_num = 0
best_val_loss = 1e9
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=len(chars))
model = GPT(len(chars))
print(f"number of parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)
if init_from == "resume":
    print(f"Resuming training from {out_dir}")
    checkpoint = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    iter_num = checkpoint["iter_num"]
    best_val_loss = checkpoint["best_val_loss"]
    checkpoint = None


@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ["train", "val"]:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            losses[k] = model(*get_batch(split))[1].item()
        out[split] = losses.mean()
    model.train()
    return out


def get_lr(it):  # linear warmup, then cosine decay to min_lr
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * (it - warmup_iters) / (lr_decay_iters - warmup_iters))) * (
        learning_rate - min_lr)  # fmt: skip


def injected_fault(loss, it):
    """Test hook for tests/test_examples.py, not part of nanoGPT: EXAMPLE_FAULTS="nan@70 hang@160 stall@230"
    turns the loss of that iteration NaN, hangs silently, or stalls (two lines a second, for a kill -9).
    Each fires once per run (a marker file in out_dir). EXAMPLE_STEP_S: each iteration takes that much longer."""
    time.sleep(float(os.environ.get("EXAMPLE_STEP_S", "0")))
    for fault in os.environ.get("EXAMPLE_FAULTS", "").split():
        kind, _, at = fault.partition("@")
        marker = os.path.join(out_dir, f"fired-{fault}")
        if int(at) == it and not os.path.exists(marker):
            open(marker, "w").close()
            print(f"injecting {kind} at iter {it}", flush=True)
            loss = loss * float("nan") if kind == "nan" else loss
            while kind in ("hang", "stall"):
                time.sleep(0.5)
                if kind == "stall":
                    print(f"stalled at iter {it}", flush=True)
    return loss


X, Y = get_batch("train")
t0 = time.time()
while True:
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if iter_num % eval_interval == 0:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if losses["val"] < best_val_loss or always_save_checkpoint:
            best_val_loss = losses["val"]
            if iter_num > 0:
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss,
                              "config": config}  # fmt: skip
                print(f"saving checkpoint to {out_dir}")
                torch.save(checkpoint, os.path.join(out_dir, "ckpt.pt"))
    logits, loss = model(X, Y)
    loss = injected_fault(loss, iter_num)
    X, Y = get_batch("train")  # the next batch, while (on a GPU) this step runs
    loss.backward()
    if grad_clip != 0.0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t1 = time.time()
    dt, t0 = t1 - t0, t1
    if iter_num % log_interval == 0:
        print(f"iter {iter_num}: loss {loss.item():.4f}, time {dt * 1000:.2f}ms")
    iter_num += 1
    if iter_num > max_iters:
        break
