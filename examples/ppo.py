"""PPO with fastft's ``PPOTrainer`` (TRL removed its own) on a fastft model, rewarded by a Python function.

    python examples/ppo.py                              # fastft's embedded tiny Llama, on a CPU in 1-2 minutes
    python examples/ppo.py --model unsloth/Llama-3.2-1B-Instruct --steps 200 --output-dir ppo-out --save

The prompts are fastft's embedded instructions as conversations (TRL's ``"prompt"`` column). The toy reward is the
share of digits among a completion's characters. On the embedded model (random weights) the default 20 iterations
show the loop running (scores, KL to the reference, losses), not a trained model: the score moves little in that
budget; give a real model more ``--steps``. The policy is a LoRA model; its value head trains alongside the
adapters, and the reference for the KL penalty is the same model with its adapters disabled (no second copy of the
weights). Reward functions follow
TRL's convention (``f(prompts, completions, completion_ids=..., **columns) -> list[float]``), so GRPO reward
functions work unchanged; a reward model (a ``*ForSequenceClassification``) can be passed in ``reward_funcs`` too.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from fastft import FastModel
from fastft.rl.ppo_config import PPOConfig
from fastft.rl.ppo_trainer import PPOTrainer


def load_model(name: str | None, max_seq_length: int, rank: int):
    """(model, tokenizer): ``name`` from the hub or a folder, or fastft's embedded tiny Llama; LoRA on top."""
    if name:
        model, tokenizer = FastModel.from_pretrained(name, max_seq_length=max_seq_length)
    else:  # random weights, its own tokenizer: no download
        from fastft.bench.assets import default_model, default_tokenizer

        model, tokenizer = default_model(seed=0), default_tokenizer()
    model = FastModel.get_peft_model(model, r=rank, lora_alpha=rank, use_gradient_checkpointing=False)
    return model, tokenizer


def digit_share(completions: list, **kwargs) -> list[float]:
    """The toy reward: the fraction of a completion's characters that are digits (conversational completions)."""
    texts = [completion[0]["content"] for completion in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


def prompt_dataset(n: int | None = None) -> Dataset:
    """Conversational prompts (``prompt`` = one user turn) from the embedded instruction data."""
    from fastft.bench.assets import default_examples

    return Dataset.from_list([{"prompt": [{"role": "user", "content": e["prompt"]}]} for e in default_examples()[:n]])


class PrintLogs(TrainerCallback):
    """One line per PPO iteration: the mean score, the KL to the reference, the losses."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "objective/scores" in logs:
            print(
                f"step {state.global_step:4d}  score {logs['objective/scores']:.3f}  kl {logs['objective/kl']:+.4f}  "
                f"policy loss {logs['loss/policy_avg']:+.4f}  value loss {logs['loss/value_avg']:.4f}"
            )


def main(argv: list[str] | None = None) -> PPOTrainer:
    """Parse ``argv``, train, print one line per iteration; returns the trainer (its ``state.log_history``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local folder (default: fastft's embedded tiny Llama)")
    parser.add_argument("--steps", type=int, default=20, help="PPO iterations (rollout + update; default 20)")
    parser.add_argument("--output-dir", default="outputs/ppo", help="where the run writes (nothing unless --save)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per mini-batch (default 8)")
    parser.add_argument("--completion-length", type=int, default=8, help="tokens sampled per completion")
    parser.add_argument("--learning-rate", type=float, help="default 5e-3 for the embedded model, 1e-5 otherwise")
    parser.add_argument("--save", action="store_true", help="save the adapters and the value head at the end")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, max_seq_length=512, rank=16)
    dtype = model.get_input_embeddings().weight.dtype  # fp32 on a CPU; bf16/fp16 on a GPU
    config = PPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        num_mini_batches=2,
        num_ppo_epochs=2,
        max_completion_length=args.completion_length,
        temperature=1.0,
        kl_coef=0.02,
        learning_rate=args.learning_rate or (5e-3 if args.model is None else 1e-5),
        lr_scheduler_type="constant",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = PPOTrainer(
        model=model,
        reward_funcs=digit_share,
        args=config,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
        callbacks=[PrintLogs()],
    )
    trainer.remove_callback(PrinterCallback)  # PrintLogs prints one line per iteration instead of the whole dict
    trainer.train()
    if args.save:
        trainer.save_model(args.output_dir)  # adapter_model.safetensors + value_head.safetensors + tokenizer
    return trainer


if __name__ == "__main__":
    main()
