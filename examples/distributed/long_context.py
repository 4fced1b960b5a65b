"""One long sequence split over the processes: context parallelism (fastft.distributed.context_parallel).

    python examples/distributed/long_context.py                                  # one process: the whole sequence
    torchrun --nproc_per_node 2 examples/distributed/long_context.py             # each process: half of it
    torchrun --nproc_per_node 2 examples/distributed/long_context.py --shard     # + FSDP2 over the same processes
    torchrun --nproc_per_node 2 examples/distributed/long_context.py --load-balance    # head-tail layout

A plain training loop (no trainer): LoRA on fastft's embedded tiny Llama (or ``--model``), offloaded checkpointing
and the tiled MLP, one row of ``--tokens`` tokens of the embedded instruction data per step, the same row on every
process. Each process computes the loss of its part of the sequence (its share of the whole row's mean); the
printed loss is their sum, the same on every process and, up to fp32 rounding, the one-process run's. GPUs with
NCCL when CUDA is there, CPU ranks with gloo otherwise (slowly). See the README's "Context parallelism".
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/sft.py: two OpenMP runtimes on a CPU

import torch
import torch.distributed as dist

from fastft import FastModel
from fastft.distributed import context_parallel, shard
from fastft.models.long_context import set_long_context


def init_process_group() -> torch.device:
    """The process group torchrun describes (or a group of one process without it); this process's device."""
    if "RANK" not in os.environ:  # plain `python`: one process
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
            os.environ.setdefault(name, value)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def long_row(tokenizer, tokens: int) -> torch.Tensor:
    """``[1, tokens]`` token ids: the embedded instruction data, one example after another."""
    from fastft.bench.assets import default_examples

    ids: list[int] = []
    for example in default_examples():
        ids += tokenizer(example["prompt"] + " " + example["response"])["input_ids"]
        if len(ids) >= tokens:
            return torch.tensor([ids[:tokens]])
    raise ValueError(f"--tokens {tokens}: the embedded data holds only {len(ids)} tokens")


def main(argv: list[str] | None = None) -> list[float]:
    """Parse ``argv``, train, print one line per step; returns the losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local folder (default: fastft's embedded tiny Llama)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the row (default 4096)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    parser.add_argument("--shard", action="store_true", help="also shard the model with FSDP2 over the processes")
    parser.add_argument(
        "--load-balance", action="store_true", help="head-tail layout: the same attention work per rank"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)

    device = init_process_group()
    if args.model:
        model, tokenizer = FastModel.from_pretrained(args.model, max_seq_length=args.tokens)
    else:  # random weights, its own tokenizer: no download
        from fastft.bench.assets import default_model, default_tokenizer

        model, tokenizer = default_model(seed=0, device=device), default_tokenizer()
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing="offload")
    set_long_context(model, tiled_mlp=True)
    if args.shard:
        shard(model)  # before context_parallel: it sets FSDP2 to sum the gradients over the processes
    cp = context_parallel(model, load_balance=args.load_balance)  # last: the attention becomes "fastft_cp"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    row = long_row(tokenizer, args.tokens).to(device)
    losses = []
    for step in range(1, args.steps + 1):
        inputs = cp.shard_batch({"input_ids": row, "labels": row})
        loss = model(**inputs).loss  # this process's share of the whole row's mean loss
        loss.backward()
        cp.sync_gradients()  # the sum over the processes (FSDP2 already did it when sharded)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(cp.reduce_loss(loss).item())
        print(f"rank {cp.rank}  step {step}  loss {losses[-1]:.5f}  tokens here {inputs['input_ids'].shape[1]}")
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
