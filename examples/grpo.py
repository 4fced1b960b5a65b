"""GRPO with TRL's unmodified ``GRPOTrainer`` on a fastft model, rewarded by plain Python functions.

    python examples/grpo.py                             # fastft's embedded tiny Llama, on a CPU in about a minute
    python examples/grpo.py --model unsloth/Qwen2.5-0.5B-Instruct --steps 200 --output-dir grpo-out

The only fastft lines are the two that load the model and add LoRA adapters; the dataset, the config, the reward
functions and the trainer are TRL's conventions. The prompts are the arithmetic questions of fastft's embedded
instruction data ("What is 209 - 19?"), each with its answer in an ``answer`` column that TRL hands to the reward
functions as a keyword argument. Two rewards, summed by TRL:

- ``correct_answer``: 1 when the last number of the completion is the answer (verifiable: no reward model);
- ``digits``: the share of the completion's characters that are digits, capped at 1 (a shaped reward, so a model
  that starts from random weights, as the embedded one does, also gets a signal to climb).

For each prompt TRL samples ``--num-generations`` completions, normalises their rewards within the group into
advantages, and takes a clipped policy-gradient step with a KL penalty (``beta``) against the reference: the
policy with its adapters disabled.
"""

from __future__ import annotations

import argparse
import os

# On a CPU: bitsandbytes (imported by PEFT) brings a second OpenMP runtime next to torch's; with the default
# (spinning) wait policy the two fight over the cores and every op waits a time slice (a 25x slowdown on 2 cores).
# Must be set before torch starts its threads; harmless on a GPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import re

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from fastft import FastModel

ARITHMETIC = ("addition", "subtraction", "multiplication", "division")


def load_model(name: str | None, max_seq_length: int, rank: int):
    """(model, tokenizer): ``name`` from the hub or a folder, or fastft's embedded tiny Llama; LoRA on top."""
    if name:
        model, tokenizer = FastModel.from_pretrained(name, max_seq_length=max_seq_length)
    else:  # random weights, its own tokenizer: no download
        from fastft.bench.assets import default_model, default_tokenizer

        model, tokenizer = default_model(seed=0), default_tokenizer()
    model = FastModel.get_peft_model(model, r=rank, lora_alpha=rank, use_gradient_checkpointing="unsloth")
    return model, tokenizer


def arithmetic_prompts() -> Dataset:
    """Conversational prompts of the embedded arithmetic questions, with the number that answers each."""
    from fastft.bench.assets import default_examples

    rows = []
    for e in default_examples():
        if e["task"] in ARITHMETIC:
            answer = re.findall(r"\d+", e["response"])[-1]  # "... The answer is 190."
            rows.append({"prompt": [{"role": "user", "content": e["prompt"]}], "answer": answer})
    return Dataset.from_list(rows)


def _text(completion) -> str:
    """A completion as text: conversational completions are a list with one assistant message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correct_answer(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's last number is the expected answer, else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"\d+", _text(completion))
        rewards.append(1.0 if numbers and numbers[-1] == expected else 0.0)
    return rewards


def digits(completions, **kwargs) -> list[float]:
    """The share of characters that are digits (0 for an empty completion): a dense signal towards numbers."""
    texts = [_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else 0.0 for t in texts]


class PrintLogs(TrainerCallback):
    """One line per step: the loss, the mean total reward and each reward function's mean."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            parts = [f"step {state.global_step:4d}", f"loss {logs['loss']:+.4f}", f"reward {logs.get('reward', 0):.3f}"]
            parts += [f"{k.split('/')[1]} {v:.3f}" for k, v in logs.items() if k.startswith("rewards/") and "mean" in k]
            print("  ".join(parts))


def main(argv: list[str] | None = None) -> GRPOTrainer:
    """Parse ``argv``, train, print one line per step; returns the trainer (its ``state.log_history``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local folder (default: fastft's embedded tiny Llama)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--output-dir", default="outputs/grpo", help="where TRL writes (nothing is saved by default)")
    parser.add_argument("--num-generations", type=int, default=4, help="completions sampled per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=2, help="prompts per step")
    parser.add_argument("--max-completion-length", type=int, default=24, help="tokens generated per completion")
    parser.add_argument("--learning-rate", type=float, help="default 5e-3 for the embedded model, 1e-5 otherwise")
    parser.add_argument("--save", action="store_true", help="save the LoRA adapters to --output-dir at the end")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, 256 + args.max_completion_length, rank=16)
    dtype = model.get_input_embeddings().weight.dtype  # fp32 on a CPU; bf16/fp16 on a GPU
    config = GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,  # completions per step
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate or (5e-3 if args.model is None else 1e-5),
        lr_scheduler_type="constant",
        beta=0.04,  # KL penalty against the reference (the adapters disabled)
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
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[correct_answer, digits],
        args=config,
        train_dataset=arithmetic_prompts(),
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
