"""A small Hugging Face Trainer script: a one-layer GPT-2 learns to continue counting sequences
(synthetic token ids, a model built from a config: nothing is downloaded; CPU, seconds).

    python train.py --max_steps 60                      # by hand (in this folder): the callback does nothing
    supervisor start examples/transformers/run.toml     # protocol mode

The lines marked `supervisor` are all the supervisor needs: the callback reports the logged loss (a NaN
ends the attempt as `nan`), the evaluations and every checkpoint, serves checkpoint requests, and packs
each checkpoint folder the Trainer writes into one file for the supervisor; `resume_from_checkpoint`
unpacks the one to resume from. There is no zero-code variant: the Trainer's checkpoints are folders,
and zero-code mode snapshots one checkpoint file.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from supervisor.integrations.transformers import SupervisorCallback  # supervisor

VOCAB, LENGTH = 64, 24


class Counting(torch.utils.data.Dataset):
    """Sequences start, start+step, start+2*step, ... (mod VOCAB): the model learns to continue them."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="out")
    args = p.parse_args()

    sup_cb = SupervisorCallback()  # supervisor: steps, evals, checkpoints, requests
    settings = {
        "output_dir": args.output_dir, "max_steps": args.max_steps, "seed": args.seed,
        "per_device_train_batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 5,
        "logging_steps": 5, "eval_strategy": "steps", "eval_steps": 20, "save_steps": 20, "save_total_limit": 2,
        "report_to": [], "use_cpu": True, "dataloader_num_workers": 0, "disable_tqdm": True,
    }  # fmt: skip
    settings.update(sup_cb.training_args())  # supervisor: the run's steps and seed; NaN losses not filtered
    training_args = TrainingArguments(**settings)

    torch.manual_seed(training_args.seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32))
    trainer = Trainer(model=model, args=training_args, train_dataset=Counting(512, 1), eval_dataset=Counting(64, 2),
                      callbacks=[sup_cb])  # supervisor: callbacks=[sup_cb]  # fmt: skip
    resume = sup_cb.resume_from_checkpoint(training_args.output_dir)  # supervisor: None on a fresh start
    trainer.train(resume_from_checkpoint=resume)
    print(f"done: {trainer.state.global_step} steps, eval_loss {trainer.evaluate()['eval_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
