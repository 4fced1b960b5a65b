"""ORPO with fastft's memory-lean ``ORPOTrainer`` (TRL's objective, config and datasets, no full logits).

    python examples/orpo.py                              # fastft's embedded tiny Llama, on a CPU in about a minute
    python examples/orpo.py --model unsloth/Llama-3.2-1B-Instruct --steps 100 --output-dir orpo-out

ORPO (odds-ratio preference optimisation) needs no reference model: one loss teaches the chosen answers (their
negative log-likelihood) and pushes their odds above the rejected ones'. ``fastft.rl.ORPOTrainer`` is TRL's
``trl.experimental.orpo.ORPOTrainer`` with one method replaced: it scores tokens from the hidden states in chunks,
so the (batch, seq, vocab) logits TRL keeps for backward never exist. Take an ORPO script written for TRL, change
the import and the two lines that load the model, and it runs unchanged.

Preference pairs come from fastft's embedded instruction data: ``chosen`` is the real response, ``rejected`` the
same words in a shuffled order (or, for a one-word answer, another prompt's answer). Even from random weights the
model learns to prefer the real ones: watch the log-odds and the reward accuracy rise.
"""

from __future__ import annotations

import argparse
import os

# On a CPU: bitsandbytes (imported by PEFT) brings a second OpenMP runtime next to torch's; with the default
# (spinning) wait policy the two fight over the cores. Must be set before torch starts its threads; harmless on a GPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from fastft import FastModel
from fastft.rl.orpo import ORPOConfig, ORPOTrainer


def load_model(name: str | None, max_seq_length: int, rank: int):
    """(model, tokenizer): ``name`` from the hub or a folder, or fastft's embedded tiny Llama; LoRA on top."""
    if name:
        model, tokenizer = FastModel.from_pretrained(name, max_seq_length=max_seq_length)
    else:  # random weights and the embedded tokenizer: no download
        from fastft.bench.assets import default_model, default_tokenizer

        model, tokenizer = default_model(seed=0), default_tokenizer()
    model = FastModel.get_peft_model(model, r=rank, lora_alpha=rank, use_gradient_checkpointing="unsloth")
    return model, tokenizer


def preference_pairs(seed: int = 0) -> Dataset:
    """Conversational (``prompt``, ``chosen``, ``rejected``) rows: the real response against a scrambled one."""
    from fastft.bench.assets import default_examples

    rng = random.Random(seed)
    examples = default_examples()
    rows = []
    for i, example in enumerate(examples):
        words = example["response"].split()
        scrambled = words[:]
        while len(set(words)) > 1 and scrambled == words:
            rng.shuffle(scrambled)
        rejected = " ".join(scrambled) if scrambled != words else examples[(i + 1) % len(examples)]["response"]
        rows.append(
            {
                "prompt": [{"role": "user", "content": example["prompt"]}],
                "chosen": [{"role": "assistant", "content": example["response"]}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return Dataset.from_list(rows)


class PrintLogs(TrainerCallback):
    """One line per step: the loss, its NLL part, the log odds ratio term and the reward accuracy."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(
                f"step {state.global_step:4d}  loss {logs['loss']:.4f}  nll {logs.get('nll_loss', float('nan')):.4f}"
                f"  log-odds {logs.get('log_odds_chosen', float('nan')):+.4f}"
                f"  accuracy {logs.get('rewards/accuracies', float('nan')):.2f}"
            )


def main(argv: list[str] | None = None) -> ORPOTrainer:
    """Parse ``argv``, train, print one line per step; returns the trainer (its ``state.log_history``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local folder (default: fastft's embedded tiny Llama)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--output-dir", default="outputs/orpo", help="where TRL writes (nothing is saved by default)")
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per prompt + response")
    parser.add_argument("--beta", type=float, default=0.5, help="weight of the odds-ratio term (TRL's default 0.1)")
    parser.add_argument("--learning-rate", type=float, help="default 5e-3 for the embedded model, 8e-6 otherwise")
    parser.add_argument("--save", action="store_true", help="save the LoRA adapters to --output-dir at the end")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, args.max_length, rank=16)
    dtype = model.get_input_embeddings().weight.dtype  # fp32 on a CPU; bf16/fp16 on a GPU
    config = ORPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate or (5e-3 if args.model is None else 8e-6),
        lr_scheduler_type="constant",
        beta=args.beta,
        max_length=args.max_length,
        remove_unused_columns=False,  # TRL's pair collator needs every column (it says so if left True)
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = ORPOTrainer(
        model=model,
        args=config,
        train_dataset=preference_pairs(),
        processing_class=tokenizer,
        callbacks=[PrintLogs()],
    )
    trainer.remove_callback(PrinterCallback)  # PrintLogs prints one line per step instead of the whole dict
    trainer.train()
    if args.save:
        model.save_pretrained_merged(args.output_dir, tokenizer, save_method="lora")
    return trainer


if __name__ == "__main__":
    main()
