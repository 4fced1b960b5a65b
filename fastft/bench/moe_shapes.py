"""Mixture-of-experts benchmark shapes and input builders (the routed experts of one layer).

:data:`QWEN3_30B_A3B` (hidden 2048, expert intermediate 768, 128 experts, top-8) and :data:`GPT_OSS_20B` (hidden
2880, intermediate 2880, 32 experts, top-4, biases, interleaved clamped SwiGLU, transposed stacks) at 8192 tokens
are the audit shapes of :func:`fastft.kernels.grouped_matmul.audit_cases`; :data:`SAVED_BYTES` is the shape the
saved-for-backward comparison is quoted at (``benchmarks/moe_saved_bytes.py``); :data:`CPU_QWEN3` a reduced one
for machines without a GPU. Routing is what a softmax top-k router produces on random logits (normalised top-k
probabilities, distinct experts per token), so experts receive uneven numbers of tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer's routed experts at ``tokens`` tokens."""

    name: str
    tokens: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    gpt_oss: bool = False  # biases, interleaved gate/up, clamped SwiGLU (alpha 1.702, limit 7), transposed stacks


QWEN3_30B_A3B = MoEShape("qwen3-30b-a3b", tokens=8192, hidden=2048, intermediate=768, experts=128, top_k=8)
GPT_OSS_20B = MoEShape("gpt-oss-20b", tokens=8192, hidden=2880, intermediate=2880, experts=32, top_k=4, gpt_oss=True)
SAVED_BYTES = MoEShape("saved-bytes", tokens=256, hidden=2048, intermediate=768, experts=16, top_k=8)
# Without a GPU (and in the GPU suite's dry run): Qwen3-30B-A3B's proportions at 1/8 width, 16 experts, top-8,
# 64 tokens; the kernel benchmark's float64 accuracy pass copies every stack, and a CPU has seconds for it.
CPU_QWEN3 = dataclasses.replace(
    QWEN3_30B_A3B, name="qwen3-30b-a3b/8@64tok/16e", tokens=64, hidden=256, intermediate=96, experts=16
)


def moe_kwargs(shape: MoEShape) -> dict:
    """The keyword arguments of :func:`fastft.kernels.moe_experts.moe_experts` for ``shape``'s family."""
    if shape.gpt_oss:
        return {"act": "gpt_oss", "transposed": True, "interleaved": True, "alpha": 1.702, "limit": 7.0}
    return {"act": "silu"}


def moe_inputs(
    shape: MoEShape,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    *,
    train_experts: bool = True,
) -> dict:
    """hidden (T, H) and router weights that need gradients, top_k_index, the expert stacks (+ biases for gpt-oss)
    in transformers' layouts; the stacks require grad when ``train_experts`` (full fine-tuning)."""
    g = torch.Generator(device=device).manual_seed(seed)
    T, H, I, E, K = shape.tokens, shape.hidden, shape.intermediate, shape.experts, shape.top_k
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    logits = torch.randn(T, E, device=device, dtype=torch.float32, generator=g)
    probs, index = torch.topk(logits.softmax(-1), K, dim=-1)
    weights = (probs / probs.sum(-1, keepdim=True)).to(dtype)
    gate_up = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=g) / H**0.5
    down = torch.randn(E, H, I, device=device, dtype=dtype, generator=g) / I**0.5
    if shape.gpt_oss:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    out = {
        "hidden": hidden.requires_grad_(True),
        "top_k_index": index,
        "top_k_weights": weights.requires_grad_(True),
        "gate_up": gate_up.requires_grad_(train_experts),
        "down": down.requires_grad_(train_experts),
    }
    if shape.gpt_oss:
        out["gate_up_bias"] = (0.1 * torch.randn(E, 2 * I, device=device, dtype=dtype, generator=g)).requires_grad_(
            train_experts
        )
        out["down_bias"] = (0.1 * torch.randn(E, H, device=device, dtype=dtype, generator=g)).requires_grad_(
            train_experts
        )
    return out
