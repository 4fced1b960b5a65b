"""One GPU's check of context parallelism's attention: ``python -m fastft.bench.context_parallel [--dry-run]``.

The collectives and the equality of a context-parallel step with one process are tested on CPU ranks
(tests/distributed/test_context_parallel.py); what only a GPU can show is which SDPA kernels the attention blocks of
:mod:`fastft.distributed.context_parallel` reach. Given the gathered K/V of the whole sequence, a rank's attention
is local, so one GPU runs any rank's blocks. At Llama-3-8B's attention shape (32 query heads, 8 K/V heads, head
dim 128, bf16) with ``C`` = 8 ranks of ``S`` = 8192 tokens (``T`` = 65,536):

- ``kernels``: the last rank's block (queries at ``(C-1) S ..``, keys ``0 .. T``, lower-right causal mask) forward
  and backward: time, and peak memory beyond the inputs, next to what a materialised mask (``S x T`` bytes) and the
  math path's scores (``heads x S x T x 2`` bytes) would take; a peak far below both means flash /
  memory-efficient kernels ran with the mask left implicit;
- ``balance``: the slowest rank's attention time with contiguous shards (the last rank: its queries see every key)
  against the head-tail layout (every rank the same work; rank 0's and rank C-1's two chunks both measured);
- ``errors``: at a small shape (fp32 and bf16), the contiguous and head-tail blocks against float64 attention over
  the whole sequence (max abs error of the output and of dq, dk, dv).

Prints one JSON object. ``--dry-run`` runs tiny shapes on the CPU (the test suite does, so the check cannot rot).
The same check is the last part of the one-shot GPU suite (``python -m fastft.bench gpu``, part ``context_parallel``:
:func:`part_context_parallel`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from fastft.bench import harness
from fastft.distributed.context_parallel import attend_block, sequence_order


def _blocks(rank: int, size: int, length: int, balanced: bool) -> list[tuple[slice, int]]:
    """(query slice of the rank's shard, global position of its first query) per attention block."""
    if not balanced:
        return [(slice(0, length), rank * length)]
    half = length // 2
    return [(slice(0, half), rank * half), (slice(half, length), (2 * size - 1 - rank) * half)]


def rank_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rank: int, size: int, balanced: bool
) -> torch.Tensor:
    """One rank's attention output ``[batch, heads, S, dim]`` over the gathered ``keys``/``values`` (sequence
    order), as :func:`fastft.distributed.context_parallel.context_parallel_attention` computes it."""
    outs = [attend_block(query[:, :, part], first, keys, values, None, 0.0, None) for part, first in
            _blocks(rank, size, query.shape[2], balanced)]  # fmt: skip
    return torch.cat(outs, dim=2)


def _time(query, keys, values, rank, size, balanced, device, dry_run) -> dict[str, Any]:
    leaves = [query, keys, values]
    times = harness.time_training_step(
        lambda: rank_attention(query, keys, values, rank, size, balanced), leaves, device,
        warmup=2, min_reps=3, max_reps=20, target_s=0.01 if dry_run else 0.3,
    )  # fmt: skip
    return {"fwd_ms": times.fwd_ms, "bwd_ms": times.bwd_ms, "total_ms": times.total_ms,
            "peak_extra_bytes": times.peak_extra_bytes}  # fmt: skip


def _errors(device: torch.device, dtype: torch.dtype, size: int = 4, length: int = 64) -> dict[str, float]:
    """Max abs errors of every rank's blocks (both layouts) against float64 attention over the whole sequence.

    The K/V gradients are the sums over the ranks (what the reduce-scatter forms). Also whether the head-tail
    reordering of the gathered K/V gives the sequence back exactly (``head_tail_order_exact``)."""
    gen = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, dim = size * length, 4, 2, 32
    q = torch.randn(1, heads, tokens, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, tokens, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(1, heads, tokens, dim, generator=gen, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    scores = ref[0] @ ref[1].repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) / dim**0.5
    want = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ ref[2].repeat_interleave(heads // kv_heads, 1)
    want.backward(grad)
    out: dict[str, Any] = {}
    for balanced in (False, True):
        name = "head_tail" if balanced else "contiguous"
        chunks = 2 * size if balanced else size
        width = tokens // chunks
        held = [
            torch.cat([torch.arange(p * width, (p + 1) * width) for p in ([r, chunks - 1 - r] if balanced else [r])])
            for r in range(size)
        ]
        if balanced:  # the all-gather hands the shards over in rank order
            out["head_tail_order_exact"] = torch.equal(sequence_order(k[:, :, torch.cat(held)], size), k)
        keys, values = (t.to(device, dtype).requires_grad_() for t in (k, v))
        errors = {"out": 0.0, "dq": 0.0}
        for rank in range(size):
            local = q[:, :, held[rank]].to(device, dtype).requires_grad_()
            got = rank_attention(local, keys, values, rank, size, balanced)
            got.backward(grad[:, :, held[rank]].to(device, dtype))
            for what, g, w in (("out", got, want[:, :, held[rank]]), ("dq", local.grad, ref[0].grad[:, :, held[rank]])):
                errors[what] = max(errors[what], (g.detach().double().cpu() - w).abs().max().item())
        errors["dk"] = (keys.grad.double().cpu() - ref[1].grad).abs().max().item()
        errors["dv"] = (values.grad.double().cpu() - ref[2].grad).abs().max().item()
        out.update({f"{name}_{what}": value for what, value in errors.items()})
    return out


def run(
    dry_run: bool = False, *, deadline: float | None = None, emit: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """The check's results (module docstring): ``shape``, ``kernels``, ``balance`` and ``errors``.

    ``emit(results)``, when given, receives the results so far after each of the three measurements (the GPU suite
    saves them, so a kill at its budget keeps what was measured); a measurement not started by ``deadline`` (a
    ``time.time()``) is recorded as ``{"skipped": "time budget"}``."""
    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    size, length, heads, kv_heads, dim = (4, 64, 4, 2, 16) if dry_run else (8, 8192, 32, 8, 128)
    tokens = size * length
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_()

    query, keys, values = rand(1, heads, length, dim), rand(1, kv_heads, tokens, dim), rand(1, kv_heads, tokens, dim)
    shape = {"ranks": size, "tokens_per_rank": length, "tokens": tokens, "heads": heads, "kv_heads": kv_heads,
             "head_dim": dim, "dtype": "bfloat16", "device": str(device)}  # fmt: skip
    results: dict[str, Any] = {"shape": shape}

    def kernels() -> dict[str, Any]:
        last = _time(query, keys, values, size - 1, size, False, device, dry_run)
        return {**last, "materialised_mask_bytes": length * tokens, "math_scores_bytes": heads * length * tokens * 2}

    def balance() -> dict[str, Any]:
        return {  # balance runs only if kernels did (a later deadline check): the slowest rank is already timed
            "contiguous_slowest_ms": results["kernels"]["total_ms"],
            "contiguous_rank0_ms": _time(query, keys, values, 0, size, False, device, dry_run)["total_ms"],
            "head_tail_rank0_ms": _time(query, keys, values, 0, size, True, device, dry_run)["total_ms"],
            "head_tail_last_ms": _time(query, keys, values, size - 1, size, True, device, dry_run)["total_ms"],
        }

    def errors() -> dict[str, Any]:
        return {str(t).removeprefix("torch."): _errors(device, t) for t in (torch.float32, torch.bfloat16)}

    for name, measure in (("kernels", kernels), ("balance", balance), ("errors", errors)):
        late = deadline is not None and time.time() > deadline
        results[name] = {"skipped": "time budget"} if late else measure()
        if emit is not None:
            emit(results)
    return results


def part_context_parallel(spec: dict, emit: Callable[[dict], None]) -> dict:
    """The GPU suite's ``context_parallel`` part (:mod:`fastft.bench.gpu`): :func:`run` at the GPU shapes (tiny
    ones on the CPU for ``spec["dry_run"]``) until ``spec["deadline"]``, saving after each measurement."""
    results = run(spec["dry_run"], deadline=spec["deadline"], emit=lambda r: emit({"results": r}))
    return {"results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastft.bench.context_parallel", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.dry_run), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
