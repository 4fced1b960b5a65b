"""Supervised fine-tuning with TRL's unmodified ``SFTTrainer`` on a fastft model.

    python examples/sft.py                              # fastft's embedded tiny Llama, on a CPU in about a minute
    python examples/sft.py --model unsloth/Llama-3.2-1B-Instruct --steps 100 --output-dir sft-out --save

The only fastft lines are the two that load the model and add LoRA adapters; the dataset, the config and the
trainer are TRL's. The data is fastft's embedded instruction set as conversational prompt-completion pairs: TRL
renders them with the tokenizer's chat template and, by default, learns the completion only (the prompt tokens get
no loss). The embedded model starts from random weights, so its loss falls quickly from ln(2048) = 7.6.
"""

from __future__ import annotations

import argparse
import os

# On a CPU: bitsandbytes (imported by PEFT) brings a second OpenMP runtime next to torch's; with the default
# (spinning) wait policy the two fight over the cores and every op waits a time slice (a 25x slowdown on 2 cores).
# Must be set before torch starts its threads; harmless on a GPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

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


def instruction_dataset() -> Dataset:
    """Conversational prompt-completion rows from the embedded instruction data."""
    from fastft.bench.assets import default_examples

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": e["prompt"]}],
                "completion": [{"role": "assistant", "content": e["response"]}],
            }
            for e in default_examples()
        ]
    )


class PrintLogs(TrainerCallback):
    """One line per step: the loss and the share of completion tokens predicted right."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            accuracy = logs.get("mean_token_accuracy", float("nan"))
            print(f"step {state.global_step:4d}  loss {logs['loss']:.4f}  token accuracy {accuracy:.3f}")


def main(argv: list[str] | None = None) -> SFTTrainer:
    """Parse ``argv``, train, print one line per step; returns the trainer (its ``state.log_history``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local folder (default: fastft's embedded tiny Llama)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--output-dir", default="outputs/sft", help="where TRL writes (nothing is saved by default)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per prompt + completion")
    parser.add_argument("--learning-rate", type=float, help="default 2e-3 for the embedded model, 2e-4 otherwise")
    parser.add_argument("--save", action="store_true", help="save the LoRA adapters to --output-dir at the end")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, args.max_length, rank=16)
    dtype = model.get_input_embeddings().weight.dtype  # fp32 on a CPU; bf16/fp16 on a GPU
    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate or (2e-3 if args.model is None else 2e-4),
        lr_scheduler_type="constant",
        max_length=args.max_length,
        completion_only_loss=True,  # the prompt is context, not a target
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
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=instruction_dataset(),
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
