"""Benchmark shapes and input builders, shared by the kernel benchmarks and the end-to-end ones.

The audit shapes are Llama-3-8B at 8192 tokens in bf16 (hidden 4096, intermediate 14336, vocabulary 128256,
head_dim 128, 32 query / 8 kv heads) plus Gemma's vocabulary of 262144 (final-logit softcap 30) for the
losses; :func:`fastft.kernels.audit` compiles the kernels at the same shapes, so the bytes models in the
kernels' ``audit_cases()`` apply to these inputs as they are. On a machine without a GPU the benchmarks run
the torch path at :data:`CPU_LLAMA3_8B` (fewer tokens, same widths, so a bytes model scales with the token
count) and a smaller head for the fused linear cross-entropy, whose (V, H) matmuls a CPU cannot afford.

Every builder returns the tensors a training step hands the op, as leaves with ``requires_grad`` set
where a fine-tuning step needs the gradient; activations have the layouts transformers produces (q and k
are transposed views of the projection output).

It ships in ``fastft.bench`` because the installed benchmarks (``python -m fastft.bench gpu``, the kernel
benchmark) build their inputs from it; ``benchmarks/shapes.py`` re-exports it for the scripts there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The sizes one decoder layer and its loss work on, for ``tokens`` tokens (batch 1 x sequence)."""

    name: str
    tokens: int
    hidden: int
    intermediate: int
    vocab: int
    head_dim: int
    n_heads: int
    n_kv_heads: int


LLAMA3_8B = ModelShape(
    "llama3-8b", tokens=8192, hidden=4096, intermediate=14336, vocab=128256, head_dim=128, n_heads=32, n_kv_heads=8
)
GEMMA_VOCAB = 262144
GEMMA_SOFTCAP = 30.0

# Without a GPU: the same widths at 64 tokens (the torch path, seconds instead of minutes).
CPU_LLAMA3_8B = dataclasses.replace(LLAMA3_8B, name="llama3-8b@64tok", tokens=64)
# The fused linear cross-entropy multiplies by the whole (V, H) head three times; on a CPU a smaller head.
CPU_SMALL_HEAD = dataclasses.replace(LLAMA3_8B, name="small-head@64tok", tokens=64, hidden=1024, vocab=16384)

DTYPE = torch.bfloat16
IGNORE_INDEX = -100


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shape_for(device: torch.device) -> ModelShape:
    """The shape the benchmarks use on ``device``: the audit shape on a GPU, a reduced one on a CPU."""
    return LLAMA3_8B if device.type == "cuda" else CPU_LLAMA3_8B


def _leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().requires_grad_(requires_grad)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def rms_norm_inputs(s: ModelShape, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0) -> dict:
    """x (tokens, hidden) and a trainable weight (hidden,): a full fine-tune's decoder RMSNorm."""
    g = _generator(device, seed)
    x = torch.randn(s.tokens, s.hidden, device=device, dtype=dtype, generator=g)
    weight = 1 + 0.1 * torch.randn(s.hidden, device=device, dtype=dtype, generator=g)
    return {"x": _leaf(x), "weight": _leaf(weight)}


def rms_norm_gated_inputs(s: ModelShape, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0) -> dict:
    """x and gate (tokens, heads, head_dim) and a trainable weight (head_dim,): the per-head gated output norm of
    a Qwen3-Next linear-attention layer (``norm(core_attn_out, z)``), with the shape's query heads as value heads."""
    g = _generator(device, seed)
    shape = (s.tokens, s.n_heads, s.head_dim)
    x = torch.randn(shape, device=device, dtype=dtype, generator=g)
    gate = torch.randn(shape, device=device, dtype=dtype, generator=g)
    weight = 1 + 0.1 * torch.randn(s.head_dim, device=device, dtype=dtype, generator=g)
    return {"x": _leaf(x), "gate": _leaf(gate), "weight": _leaf(weight)}


def layer_norm_inputs(s: ModelShape, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0) -> dict:
    """x (tokens, hidden) and a trainable weight and bias (hidden,): a full fine-tune's decoder nn.LayerNorm."""
    g = _generator(device, seed)
    x = torch.randn(s.tokens, s.hidden, device=device, dtype=dtype, generator=g)
    weight = 1 + 0.1 * torch.randn(s.hidden, device=device, dtype=dtype, generator=g)
    bias = 0.1 * torch.randn(s.hidden, device=device, dtype=dtype, generator=g)
    return {"x": _leaf(x), "weight": _leaf(weight), "bias": _leaf(bias)}


def rope_inputs(s: ModelShape, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0) -> dict:
    """q (1, Hq, T, D) and k (1, Hk, T, D) as transposed views of the projections, cos/sin (1, T, D)."""
    g = _generator(device, seed)
    q = torch.randn(1, s.tokens, s.n_heads, s.head_dim, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(1, s.tokens, s.n_kv_heads, s.head_dim, device=device, dtype=dtype, generator=g).transpose(1, 2)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, s.head_dim, 2, device=device, dtype=torch.float32) / s.head_dim))
    angles = torch.outer(torch.arange(s.tokens, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)[None]
    return {"q": _leaf(q), "k": _leaf(k), "cos": emb.cos().to(dtype), "sin": emb.sin().to(dtype)}


def rope_interleaved_inputs(s: ModelShape, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0) -> dict:
    """q (1, Hq, T, D) and k (1, Hk, T, D) as transposed views, cos/sin (1, T, D/4): one angle per pair for the
    first D/2 columns (GLM-4's partial rotary, ``partial_rotary_factor`` 0.5; the rest passes through)."""
    g = _generator(device, seed)
    q = torch.randn(1, s.tokens, s.n_heads, s.head_dim, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(1, s.tokens, s.n_kv_heads, s.head_dim, device=device, dtype=dtype, generator=g).transpose(1, 2)
    rotary_dim = s.head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(torch.arange(s.tokens, device=device, dtype=torch.float32), inv_freq)[None]
    return {"q": _leaf(q), "k": _leaf(k), "cos": angles.cos().to(dtype), "sin": angles.sin().to(dtype)}


def gated_mlp_inputs(s: ModelShape, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0) -> dict:
    """gate and up (tokens, intermediate): the two projection outputs a SwiGLU/GeGLU MLP multiplies."""
    g = _generator(device, seed)
    shape = (s.tokens, s.intermediate)
    return {
        "gate": _leaf(torch.randn(shape, device=device, dtype=dtype, generator=g)),
        "up": _leaf(torch.randn(shape, device=device, dtype=dtype, generator=g)),
    }


def ungated_mlp_inputs(s: ModelShape, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0) -> dict:
    """x (tokens, intermediate): the up projection output a non-gated MLP (GPT-2, Phi, Nemotron) activates."""
    g = _generator(device, seed)
    return {"x": _leaf(2 * torch.randn(s.tokens, s.intermediate, device=device, dtype=dtype, generator=g))}


def _labels(tokens: int, vocab: int, device: torch.device, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    ignored = torch.rand(tokens, device=device, generator=g) < 0.05  # padding / prompt tokens
    return labels.masked_fill(ignored, IGNORE_INDEX)


def cross_entropy_inputs(
    s: ModelShape, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0, vocab: int | None = None
) -> dict:
    """logits (tokens, vocab) that need a gradient and int64 labels, 5% of them ``IGNORE_INDEX``."""
    g = _generator(device, seed)
    vocab = vocab or s.vocab
    logits = 4 * torch.randn(s.tokens, vocab, device=device, dtype=dtype, generator=g)
    return {"logits": _leaf(logits), "labels": _labels(s.tokens, vocab, device, g)}


def fused_linear_cross_entropy_inputs(
    s: ModelShape, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0, train_head: bool = False
) -> dict:
    """hidden (tokens, hidden), the lm_head weight (vocab, hidden) (frozen, as in LoRA, unless
    ``train_head``) and labels."""
    g = _generator(device, seed)
    hidden = torch.randn(s.tokens, s.hidden, device=device, dtype=dtype, generator=g)
    weight = torch.randn(s.vocab, s.hidden, device=device, dtype=dtype, generator=g) / s.hidden**0.5
    return {
        "hidden": _leaf(hidden),
        "weight": _leaf(weight, train_head),
        "labels": _labels(s.tokens, s.vocab, device, g),
    }
