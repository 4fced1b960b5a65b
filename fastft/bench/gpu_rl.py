"""The GPU suite's RL parts (:mod:`fastft.bench.gpu`): the log-prob head against TRL's, and one GRPO loss step.

- ``logprob_head``: per-token log-probs and entropy of ``hidden @ W.T`` for 8192 tokens, hidden 4096, vocabulary
  128256 (Llama-3.1-8B's head), bf16, the head frozen (LoRA / reference), forward (log-probs + entropy) and backward
  (from the log-probs, as GRPO and DPO use them; the entropy is logged, not trained). Contenders: fastft's
  :func:`~fastft.kernels.logprob_head.linear_log_probs`; TRL's ``trl.kernels.ChunkedLogProbFunction`` (what TRL's
  fused LM head runs; "not installed" without trl); and ``pytorch``, the full (N, V) logits with ``log_softmax`` and a
  gather. Per contender: forward / backward milliseconds (median, CUDA events), the peak memory beyond the inputs
  (``max_memory_allocated``), and the largest error of log-probs and entropy against float64 on the first 256 rows.
- ``grpo_loss_step``: one GRPO loss step at the same head dimensions, 8 completions x 1024 tokens: the policy's
  log-probs with grad, the reference's without (``no_grad``, other hidden states, same head), the clipped surrogate
  (epsilon 0.2) with per-sequence advantages plus beta 0.04 times the k3 KL estimate, the token mean, and backward
  into the policy's hidden states. Contenders: ``fastft`` (``linear_log_probs``), ``trl`` (its chunked function) and
  ``full logits`` (plain ``hidden @ W.T``, ``log_softmax``, gather). Step milliseconds and peak memory.

``dry_run`` runs both at tiny shapes on the CPU (fastft's torch path). No part here needs a model or transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastft.kernels.logprob_head import linear_log_probs


@dataclass(frozen=True)
class HeadDims:
    """Tokens scored, hidden size and vocabulary of the head; GRPO splits the tokens into completions."""

    hidden: int = 4096
    vocab: int = 128256
    completions: int = 8
    completion_len: int = 1024

    @property
    def tokens(self) -> int:
        return self.completions * self.completion_len


LLAMA31_8B_HEAD = HeadDims()
TINY_HEAD = HeadDims(hidden=64, vocab=1000, completions=2, completion_len=16)
CONTENDERS = ("fastft", "trl", "pytorch")
ERROR_ROWS = 256  # rows checked against float64 (a (256, V) float64 matrix: 262 MB at V = 128256)
GRPO_EPSILON, GRPO_BETA = 0.2, 0.04


def _device(spec: dict) -> torch.device:
    return torch.device("cpu" if spec["dry_run"] else "cuda")


def _trl_function() -> Any | None:
    """TRL's ``ChunkedLogProbFunction`` and its vocabulary chunk, or None when trl is not importable."""
    if importlib.util.find_spec("trl") is None:
        return None
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction


def _trl_chunk() -> int:
    """The vocabulary chunk TRL's fused head passes (``trl.trainer.utils``, which needs accelerate and datasets; a
    machine with only the trl wheel gets TRL 1.16's value)."""
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError:
        return 32768
    return _CHUNKED_LOGPROB_CHUNK_SIZE


def _head_fn(contender: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]:
    """``(hidden, weight, labels) -> (log_probs, entropy)`` of a contender (fp32 outputs, labels' shape)."""
    if contender == "fastft":

        def fastft(h, w, y):
            out = linear_log_probs(h, w, y, entropy=True)
            return out.log_probs, out.entropy

        return fastft
    if contender == "trl":
        function, chunk = _trl_function(), _trl_chunk()

        def trl(h, w, y):
            out = function.apply(h, w, None, y, 1.0, chunk, None, 1.0, ("log_probs", "entropy"))
            return out[0], out[1]

        return trl

    def pytorch(h, w, y):  # what a plain model does: (N, V) logits, upcast, log_softmax, gather
        logp = torch.log_softmax((h @ w.t()).float(), dim=-1)
        return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    return pytorch


def _inputs(dims: HeadDims, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 hidden states (N, H) of unit scale, a frozen head (V, H) of std 0.02 (Llama's init), random labels."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(dims.tokens, dims.hidden, device=device, dtype=torch.bfloat16, generator=g)
    weight = (0.02 * torch.randn(dims.vocab, dims.hidden, device=device, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, dims.vocab, (dims.tokens,), device=device, generator=g)
    return hidden, weight, labels


def _errors(fn: Callable, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Largest |error| of log-probs and entropy against float64 over the first :data:`ERROR_ROWS` rows."""
    h, y = hidden[:ERROR_ROWS], labels[:ERROR_ROWS]
    with torch.no_grad():
        logp64 = torch.log_softmax(h.double() @ weight.double().t(), dim=-1)
        want_logp = logp64.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        want_entropy = -(logp64.exp() * logp64).sum(-1)
        del logp64
        logp, entropy = fn(h, weight, y)
    return {
        "log_probs": (logp.double() - want_logp).abs().max().item(),
        "entropy": (entropy.double() - want_entropy).abs().max().item(),
    }


def _peak_mb(times) -> float | None:
    return None if times.peak_extra_bytes is None else times.peak_extra_bytes / 2**20


def _unavailable(contender: str) -> dict | None:
    if contender == "trl" and _trl_function() is None:
        return {"status": "not installed", "reason": "trl not installed (carry a trl wheel: see fastft/bench/gpu.py)"}
    return None


def _run_contender(contender: str, body: Callable[[], dict], device: torch.device) -> dict:
    blocked = _unavailable(contender)
    if blocked:
        return {"contender": contender, **blocked}
    try:
        return {"contender": contender, "status": "ok", "reason": "", **body()}
    except torch.cuda.OutOfMemoryError as e:
        return {"contender": contender, "status": "OOM", "reason": str(e).splitlines()[0]}
    except Exception as e:  # noqa: BLE001 - a contender's failure is its row; the others still run
        traceback.print_exc()
        return {"contender": contender, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:300]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _speedups(rows: list[dict], key: str) -> None:
    """``x_<contender>``: that contender's time over fastft's (> 1: fastft is faster)."""
    ours = next((r.get(key) for r in rows if r["contender"] == "fastft"), None)
    for row in rows:
        row["vs_fastft"] = row[key] / ours if ours and row.get(key) else None


def part_logprob_head(spec: dict, emit: Callable[[dict], None]) -> dict:
    """The ``logprob_head`` part (module docstring)."""
    from fastft.bench import harness

    device = _device(spec)
    dims = TINY_HEAD if spec["dry_run"] else LLAMA31_8B_HEAD
    results: dict[str, Any] = {"dims": {**dataclasses.asdict(dims), "tokens": dims.tokens}, "rows": []}
    hidden, weight, labels = _inputs(dims, device)
    hidden.requires_grad_(True)
    for contender in CONTENDERS:

        def body(contender: str = contender) -> dict:
            fn = _head_fn(contender)
            times = harness.time_training_step(
                lambda: fn(hidden, weight, labels)[0],  # entropy computed in forward, not trained
                [hidden],
                device,
                warmup=2,
                min_reps=3,
                max_reps=20,
                target_s=0.01 if spec["dry_run"] else 0.5,
            )
            return {
                "fwd_ms": times.fwd_ms,
                "bwd_ms": times.bwd_ms,
                "total_ms": times.total_ms,
                "reps": times.reps,
                "peak_mb": _peak_mb(times),
                "errors": _errors(fn, hidden.detach(), weight, labels),
            }

        results["rows"].append(_run_contender(contender, body, device))
        _speedups(results["rows"], "total_ms")
        emit({"results": results})
    return {"results": results}


def grpo_loss(
    log_probs_fn: Callable, policy_hidden: torch.Tensor, ref_hidden: torch.Tensor, weight, labels, advantages
) -> torch.Tensor:
    """One GRPO loss: clipped surrogate on the ratio to the (detached) old policy plus beta x the k3 KL to the reference.

    ``log_probs_fn(hidden, weight, labels) -> (log_probs, entropy)``; hidden states (N, H) of ``advantages.numel()``
    completions of equal length; token mean over all completions.
    """
    logp = log_probs_fn(policy_hidden, weight, labels)[0]
    with torch.no_grad():
        ref = log_probs_fn(ref_hidden, weight, labels)[0]
    per_token_adv = advantages.repeat_interleave(labels.numel() // advantages.numel())
    ratio = torch.exp(logp - logp.detach())  # old policy = this policy (one update per generation batch)
    clipped = torch.clamp(ratio, 1 - GRPO_EPSILON, 1 + GRPO_EPSILON)
    surrogate = -torch.min(ratio * per_token_adv, clipped * per_token_adv)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    return (surrogate + GRPO_BETA * kl).mean()


def part_grpo_loss_step(spec: dict, emit: Callable[[dict], None]) -> dict:
    """The ``grpo_loss_step`` part (module docstring)."""
    from fastft.bench import harness

    device = _device(spec)
    dims = TINY_HEAD if spec["dry_run"] else LLAMA31_8B_HEAD
    results: dict[str, Any] = {"dims": {**dataclasses.asdict(dims), "tokens": dims.tokens}, "rows": []}
    policy, weight, labels = _inputs(dims, device, seed=0)
    ref = (policy + 0.01 * _inputs(dims, device, seed=1)[0]).detach()  # the reference: slightly other hidden states
    policy.requires_grad_(True)
    advantages = torch.randn(dims.completions, generator=torch.Generator().manual_seed(2)).to(device)
    losses = {}
    for contender in CONTENDERS:

        def body(contender: str = contender) -> dict:
            fn = _head_fn(contender)
            losses[contender] = grpo_loss(fn, policy, ref, weight, labels, advantages).item()
            times = harness.time_training_step(
                lambda: grpo_loss(fn, policy, ref, weight, labels, advantages),
                [policy],
                device,
                warmup=2,
                min_reps=3,
                max_reps=20,
                target_s=0.01 if spec["dry_run"] else 0.5,
            )
            return {
                "step_ms": times.total_ms,
                "fwd_ms": times.fwd_ms,
                "bwd_ms": times.bwd_ms,
                "reps": times.reps,
                "peak_mb": _peak_mb(times),
                "loss": losses[contender],
            }

        row = _run_contender(contender, body, device)
        results["rows"].append({**row, "contender": "full logits" if contender == "pytorch" else contender})
        _speedups(results["rows"], "step_ms")
        emit({"results": results})
    return {"results": results}
