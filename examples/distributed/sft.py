"""Supervised fine-tuning of a fastft model on several processes: DDP, FSDP2 or DeepSpeed ZeRO-3 (TRL's SFTTrainer).

    python examples/distributed/sft.py                                           # one process
    torchrun --nproc_per_node 2 examples/distributed/sft.py                      # DDP (the trainer wraps the model)
    torchrun --nproc_per_node 2 examples/distributed/sft.py --shard              # FSDP2 (fastft.distributed.shard)
    accelerate launch --config_file examples/distributed/fsdp2.yaml examples/distributed/sft.py --shard   # GPUs
    accelerate launch --config_file examples/distributed/zero3.yaml examples/distributed/sft.py          # GPUs

The same script for every engine: the model, the data and TRL's trainer are built as on one GPU; ``--shard`` adds
the two fastft lines that shard the trainer's model with FSDP2 (``shard``) and let the trainer train it as it is
(``prepare_trainer``: no DDP wrap on top). Without ``--shard`` the launcher decides: torchrun or a DDP config gives
DDP, a ZeRO-3 config lets DeepSpeed partition the model. Works on CPU ranks (gloo) as well, slowly. ``--batch-size``
is per process: the global batch is ``batch size x processes``. See examples/distributed/README.md.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/sft.py: two OpenMP runtimes on a CPU

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from fastft import FastModel


def load_model(name: str | None, max_seq_length: int, rank: int, checkpointing: bool | str):
    """(model, tokenizer): ``name`` from the hub or a folder, or fastft's embedded tiny Llama; LoRA on top."""
    if name:
        model, tokenizer = FastModel.from_pretrained(name, max_seq_length=max_seq_length)
    else:  # random weights, its own tokenizer: no download
        from fastft.bench.assets import default_model, default_tokenizer

        model, tokenizer = default_model(seed=0), default_tokenizer()
    model = FastModel.get_peft_model(model, r=rank, lora_alpha=rank, use_gradient_checkpointing=checkpointing)
    return model, tokenizer


def instruction_dataset() -> Dataset:
    """Conversational prompt-completion rows from the embedded instruction data."""
    from fastft.bench.assets import default_examples

    rows = [
        {"prompt": [{"role": "user", "content": e["prompt"]}], "completion": [{"role": "assistant", "content": e["response"]}]}
        for e in default_examples()
    ]  # fmt: skip
    return Dataset.from_list(rows)


class PrintLogs(TrainerCallback):
    """One line per step on the main process: the loss (averaged over all processes) and the gradient norm."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and args.process_index == 0:
            print(f"step {state.global_step:4d}  loss {logs['loss']:.4f}  grad norm {logs.get('grad_norm', 0):.4f}")


def main(argv: list[str] | None = None) -> SFTTrainer:
    """Parse ``argv``, train, print one line per step; returns the trainer (its ``state.log_history``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local folder (default: fastft's embedded tiny Llama)")
    parser.add_argument("--shard", action="store_true", help="shard the model with FSDP2 (fastft.distributed.shard)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--output-dir", default="outputs/sft-distributed", help="where TRL writes")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step and process")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per prompt + completion")
    parser.add_argument("--learning-rate", type=float, help="default 2e-3 for the embedded model, 2e-4 otherwise")
    parser.add_argument("--checkpointing", default="unsloth", help="fastft's layer checkpointing: unsloth/offload/none")
    parser.add_argument("--save", action="store_true", help="save the LoRA adapter to --output-dir at the end")
    args = parser.parse_args(argv)

    checkpointing = False if args.checkpointing == "none" else args.checkpointing
    model, tokenizer = load_model(args.model, args.max_length, rank=16, checkpointing=checkpointing)
    dtype = model.get_input_embeddings().weight.dtype  # fp32 on a CPU; bf16/fp16 on a GPU
    config = SFTConfig(  # creating the config starts the process group under torchrun / accelerate launch
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate or (2e-3 if args.model is None else 2e-4),
        lr_scheduler_type="constant",
        max_length=args.max_length,
        completion_only_loss=True,
        gradient_checkpointing=False,  # fastft checkpoints (and offloads) each layer already
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=1,
        save_strategy="no",  # resumable sharded checkpoints: fastft.distributed's DCP functions
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=instruction_dataset(),
        processing_class=tokenizer,
        callbacks=[PrintLogs()],
    )
    trainer.remove_callback(PrinterCallback)
    if args.shard:
        from fastft.distributed import prepare_trainer, shard

        shard(trainer.model)  # in place; before train() builds the optimizer over the shards
        prepare_trainer(trainer)
    trainer.train()
    if args.save:
        trainer.save_model(args.output_dir)  # every process calls it; the main process writes the adapter
    return trainer


if __name__ == "__main__":
    main()
