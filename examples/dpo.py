"""DPO with TRL's unmodified ``DPOTrainer`` on a fastft model.

    python examples/dpo.py                              # fastft's embedded tiny Llama, on a CPU in about a minute
    python examples/dpo.py --model unsloth/Llama-3.2-1B-Instruct --steps 100 --output-dir dpo-out

The only fastft lines are the two that load the model and add LoRA adapters; the dataset, the config and the
trainer are TRL's. Preference pairs come from fastft's embedded instruction data: ``chosen`` is the real response,
``rejected`` the same response corrupted (its last number changed, or its words shuffled), so even a model trained
from random weights learns to tell them apart: watch the reward margin grow. The reference model is the policy with
its adapters disabled (TRL's default for a PEFT model), so no second copy of the weights is loaded.
"""

from __future__ import annotations

import argparse
import os

# On a CPU: bitsandbytes (imported by PEFT) brings a second OpenMP runtime next to torch's; with the default
# (spinning) wait policy the two fight over the cores and every op waits a time slice (a 25x slowdown on 2 cores).
# Must be set before torch starts its threads; harmless on a GPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random
import re

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer

from fastft import FastModel


def load_model(name: str | None, max_seq_length: int, rank: int):
    """(model, tokenizer): ``name`` from the hub or a folder, or fastft's embedded tiny Llama; LoRA on top."""
    if name:
        model, tokenizer = FastModel.from_pretrained(name, max_seq_length=max_seq_length)
    else:  # random weights, its own tokenizer: no download
        from fastft.bench.assets import default_model, default_tokenizer

        model, tokenizer = default_model(seed=0), default_tokenizer()
    model = FastModel.get_peft_model(model, r=rank, lora_alpha=rank, use_gradient_checkpointing="unsloth")
    return model, tokenizer


def corrupt(response: str, rng: random.Random) -> str:
    """A worse answer: the last number off by a few, or (no number) the words in a shuffled order."""
    numbers = list(re.finditer(r"\d+", response))
    if numbers:
        last = numbers[-1]
        wrong = int(last.group()) + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        return response[: last.start()] + str(abs(wrong)) + response[last.end() :]
    words = response.split()
    shuffled = words[:]
    while len(words) > 1 and shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def preference_dataset(n: int | None = None, seed: int = 0) -> Dataset:
    """Conversational preference pairs (``prompt``, ``chosen``, ``rejected``) from the embedded examples."""
    from fastft.bench.assets import default_examples

    rng = random.Random(seed)
    rows = []
    for example in default_examples()[:n]:
        rows.append(
            {
                "prompt": [{"role": "user", "content": example["prompt"]}],
                "chosen": [{"role": "assistant", "content": example["response"]}],
                "rejected": [{"role": "assistant", "content": corrupt(example["response"], rng)}],
            }
        )
    return Dataset.from_list(rows)


class PrintLogs(TrainerCallback):
    """One line per step: the loss and the reward margin (policy vs reference, chosen minus rejected)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            margin = logs.get("rewards/margins", float("nan"))
            accuracy = logs.get("rewards/accuracies", float("nan"))
            print(
                f"step {state.global_step:4d}  loss {logs['loss']:.4f}  margin {margin:+.4f}  accuracy {accuracy:.2f}"
            )


def main(argv: list[str] | None = None) -> DPOTrainer:
    """Parse ``argv``, train, print one line per step; returns the trainer (its ``state.log_history``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local folder (default: fastft's embedded tiny Llama)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--output-dir", default="outputs/dpo", help="where TRL writes (nothing is saved by default)")
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per prompt + response")
    parser.add_argument("--learning-rate", type=float, help="default 5e-3 for the embedded model, 5e-5 otherwise")
    parser.add_argument("--save", action="store_true", help="save the LoRA adapters to --output-dir at the end")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, args.max_length, rank=16)
    dtype = model.get_input_embeddings().weight.dtype  # fp32 on a CPU; bf16/fp16 on a GPU
    config = DPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate or (5e-3 if args.model is None else 5e-5),
        lr_scheduler_type="constant",
        beta=0.1,
        max_length=args.max_length,
        gradient_checkpointing=False,  # fastft checkpoints (and offloads) each layer already
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    dataset = preference_dataset()
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[PrintLogs()]
    )
    trainer.remove_callback(PrinterCallback)  # PrintLogs prints one line per step instead of the whole dict
    trainer.train()
    if args.save:
        model.save_pretrained_merged(args.output_dir, tokenizer, save_method="lora")
    return trainer


if __name__ == "__main__":
    main()
