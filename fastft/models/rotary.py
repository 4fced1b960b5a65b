"""The rotary-embedding functions transformers' attention code calls, and fastft's kernel for each convention.

Attention modules call their rotary function as a global of their modeling module (``apply_rotary_pos_emb``,
``apply_rotary_pos_emb_interleave``, ``apply_rotary_emb``). Conventions differ between families: rotate-half
with optional partial rotary (Llama, Qwen, Phi), interleaved pairs (GLM, Cohere, Ernie), interleaved pairs
written back as halves (DeepSeek-V3's MLA and its copies), half-width tables (gpt-oss), complex frequencies
(DeepSeek-V2, Llama 4), one tensor at a time (Gemma 4). Each convention here is a drop-in function with the
transformers signature and a generator of probe inputs in its table layout; :func:`recognise` runs the
module's function and each candidate on the same random inputs and takes the first that agrees (up to a couple
of roundings). :func:`install` then wraps that module global once: inside the forward of an attention instance
fastft patched (a context variable says so) the wrapper runs the convention's kernel, everywhere else the
original, with the same arguments. A call the kernel does not take (another ``unsqueeze_dim``, a table it
refuses with ``ValueError``) runs the original too.
"""

from __future__ import annotations

import contextvars
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from fastft.kernels.rope import rope
from fastft.kernels.rope_interleaved import (
    cohere_apply_rotary_pos_emb,
    deepseek_apply_rotary_pos_emb_interleave,
    deepseek_v2_apply_rotary_emb,
    ernie4_5_apply_rotary_pos_emb,
    glm_apply_rotary_pos_emb,
    gpt_oss_apply_rotary_pos_emb,
)

FUNCTION_NAMES = (
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_interleave",
    "apply_rotary_emb",
    "apply_rotary_pos_emb_vision",  # Qwen2-VL / 2.5-VL / 3-VL and GLM-4V vision towers
)

ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("fastft_rope_active", default=False)


def _rotate_half(q, k, cos, sin, unsqueeze_dim=1):
    if unsqueeze_dim == 0 and cos.dim() == 2 and q.dim() == 4:
        # Pixtral's vision tower: one (patches, D) table for every image of the batch
        return rope(q, k, cos.unsqueeze(0), sin.unsqueeze(0))
    if unsqueeze_dim != 1:
        raise ValueError("fastft.kernels.rope takes heads-first q/k (unsqueeze_dim=1)")
    return rope(q, k, cos, sin)


def _rotate_half_tokens_first(q, k, cos, sin):
    """Qwen-VL vision towers' ``apply_rotary_pos_emb_vision``: q/k are (patches, heads, D), cos/sin (patches, D),
    rotated in fp32 and returned in q's dtype. The kernel reads the same storage as a (1, heads, patches, D) view
    (no copy) and computes in fp32 with one rounding, as transformers does here."""
    if q.dim() != 3 or k.dim() != 3 or cos.dim() != 2:
        raise ValueError("the vision rotary takes (patches, heads, head_dim) q/k and (patches, head_dim) cos/sin")
    q_out, k_out = rope(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), cos[None], sin[None])
    return q_out[0].transpose(0, 1), k_out[0].transpose(0, 1)


def _rotate_half_one(x, cos, sin, unsqueeze_dim=1):
    """Gemma 4's one-tensor form: x's heads rotated with a one-head k beside them (a sliver of extra work).
    Gemma 4 calls it on heads-last (B, T, H, D) tensors (``unsqueeze_dim=2``), its vision tower once per image axis
    on a slice of the head: the kernel reads them through a transposed view."""
    if x.dim() != 4 or unsqueeze_dim not in (1, 2):
        raise ValueError("fastft.kernels.rope takes (B, H, T, D) or, with unsqueeze_dim=2, (B, T, H, D) tensors")
    if unsqueeze_dim == 2:
        heads_first = x.transpose(1, 2)
        return rope(heads_first, heads_first[:, :1], cos, sin)[0].transpose(1, 2)
    return rope(x, x[:, :1], cos, sin)[0]


@dataclass(frozen=True)
class Convention:
    """A rotary convention: fastft's drop-in function and how to build probe inputs in its table layout."""

    name: str
    fast: Callable
    inputs: Callable[[int, int, torch.dtype, torch.device], tuple]


def _angles(width: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(2, 5, width, generator=gen, dtype=torch.float64) * 6.28


def _qk(head_dim: int, dtype, device, gen, heads_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    shape_q, shape_k = (
        ((2, 5, 3, head_dim), (2, 5, 1, head_dim)) if heads_last else ((2, 3, 5, head_dim), (2, 1, 5, head_dim))
    )
    return (
        torch.randn(shape_q, generator=gen).to(device, dtype),
        torch.randn(shape_k, generator=gen).to(device, dtype),
    )


def _llama_table(head_dim: int, rot: int, dtype, device) -> tuple:
    """q, k and ``cat(freqs, freqs)`` tables of width ``rot`` (Llama's, GLM's, DeepSeek's layout)."""
    gen = torch.Generator().manual_seed(1234)
    q, k = _qk(head_dim, dtype, device, gen)
    a = _angles(rot // 2, gen)
    cos, sin = torch.cat((a.cos(), a.cos()), -1), torch.cat((a.sin(), a.sin()), -1)
    return q, k, cos.to(device, dtype), sin.to(device, dtype)


def _pair_table(head_dim: int, rot: int, dtype, device) -> tuple:
    """Cohere's ``repeat_interleave(freqs, 2)`` tables over the whole head."""
    gen = torch.Generator().manual_seed(1234)
    q, k = _qk(head_dim, dtype, device, gen)
    a = _angles(head_dim // 2, gen).repeat_interleave(2, -1)
    return q, k, a.cos().to(device, dtype), a.sin().to(device, dtype)


def _half_table(head_dim: int, rot: int, dtype, device) -> tuple:
    """gpt-oss's half-width tables (one angle per rotated pair of halves)."""
    gen = torch.Generator().manual_seed(1234)
    q, k = _qk(head_dim, dtype, device, gen)
    a = _angles(head_dim // 2, gen)
    return q, k, a.cos().to(device, dtype), a.sin().to(device, dtype)


def _complex_table(head_dim: int, rot: int, dtype, device, heads_last: bool = False) -> tuple:
    """DeepSeek-V2's (heads-first q/k) and Llama 4's (heads-last) ``(B, T, D/2)`` complex frequencies."""
    gen = torch.Generator().manual_seed(1234)
    q, k = _qk(head_dim, dtype, device, gen, heads_last=heads_last)
    a = _angles(head_dim // 2, gen).float()
    return q, k, torch.polar(torch.ones_like(a), a).to(device)


def _complex_heads_last(xq, xk, freqs_cis):
    """Llama 4's ``apply_rotary_emb``: DeepSeek-V2's on (B, T, H, D) tensors (read through transposed views)."""
    q, k = deepseek_v2_apply_rotary_emb(xq.transpose(1, 2), xk.transpose(1, 2), freqs_cis)
    return q.transpose(1, 2), k.transpose(1, 2)


def _one_tensor(head_dim: int, rot: int, dtype, device) -> tuple:
    q, _, cos, sin = _llama_table(head_dim, head_dim, dtype, device)
    return q, cos, sin


def _tokens_first(head_dim: int, rot: int, dtype, device) -> tuple:
    """Vision towers' (patches, heads, D) q/k with (patches, D) tables."""
    q, k, cos, sin = _llama_table(head_dim, head_dim, dtype, device)
    return q[0].transpose(0, 1), k[0].transpose(0, 1), cos[0], sin[0]


CONVENTIONS = (
    Convention("rotate-half", _rotate_half, _llama_table),
    Convention("interleaved (GLM)", glm_apply_rotary_pos_emb, _llama_table),
    Convention("interleaved in fp32 (Ernie)", ernie4_5_apply_rotary_pos_emb, _llama_table),
    Convention("interleaved (Cohere)", cohere_apply_rotary_pos_emb, _pair_table),
    Convention("interleaved to halves (MLA)", deepseek_apply_rotary_pos_emb_interleave, _llama_table),
    Convention("half-width tables (gpt-oss)", gpt_oss_apply_rotary_pos_emb, _half_table),
    Convention("complex frequencies", deepseek_v2_apply_rotary_emb, _complex_table),
    Convention(
        "complex frequencies, heads last", _complex_heads_last, functools.partial(_complex_table, heads_last=True)
    ),
    Convention("rotate-half, one tensor", _rotate_half_one, _one_tensor),
    Convention("rotate-half, tokens first in fp32 (Qwen-VL vision)", _rotate_half_tokens_first, _tokens_first),
)


def _agree(got: object, want: object) -> bool:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    if len(got) != len(want) or not all(isinstance(t, torch.Tensor) for t in (*got, *want)):
        return False
    for a, b in zip(got, want):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        tol = 4 * torch.finfo(a.dtype).eps
        if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
            return False
    return True


def recognise(
    function: Callable, head_dim: int, rot: int, dtype: torch.dtype, device: torch.device
) -> Convention | None:
    """The convention whose fastft function computes what ``function`` computes (checked numerically)."""
    if head_dim % 2 or rot % 2 or not 0 < rot <= head_dim:
        return None
    for convention in CONVENTIONS:
        inputs = convention.inputs(head_dim, rot, dtype, device)
        with torch.no_grad():
            try:
                want = function(*inputs)
                got = convention.fast(*inputs)
            except Exception:  # noqa: BLE001, S112 - inputs of another layout: not this convention
                continue
        if _agree(got, want):
            return convention
    return None


def rotary_functions(attention_class: type) -> dict[str, Callable]:
    """The rotary functions (by global name) of the modeling module an attention class is defined in."""
    home = sys.modules.get(attention_class.__module__)
    found = {}
    for name in FUNCTION_NAMES:
        function = getattr(home, name, None)
        if callable(function):
            found[name] = getattr(function, "__wrapped__", function) if getattr(function, "_fastft", None) else function
    return found


def install(attention_class: type, name: str, convention: Convention) -> None:
    """Wrap the module global ``name`` of ``attention_class``'s modeling module (once) to run ``convention``'s
    kernel inside patched attention forwards."""
    home = sys.modules[attention_class.__module__]
    original = getattr(home, name)
    if getattr(original, "_fastft", None) is not None:
        return

    def dispatch(*args, **kwargs):
        if ACTIVE.get():
            try:
                return convention.fast(*args, **kwargs)
            except (ValueError, TypeError):  # a call this kernel does not take: transformers' own
                pass
        return original(*args, **kwargs)

    dispatch._fastft = convention
    dispatch.__wrapped__ = original
    dispatch.__doc__ = original.__doc__
    dispatch.__name__ = getattr(original, "__name__", name)
    setattr(home, name, dispatch)


# ------------------------------------------------------------------------------------------------ rotary tables


@dataclass(frozen=True)
class TableLayout:
    """How a multimodal rotary embedding module builds its cos/sin tables (:mod:`fastft.kernels.mrope`): per table
    column the position axis and the index into the module's ``inv_freq``. ``kind`` is "text" (positions (A, B, T)
    or (B, T), tables (B, T, 2H) in x's dtype) or "vision" (positions (N, A), fp32 tables (N, 2H))."""

    kind: str
    n_axes: int
    axis: torch.Tensor
    freq_index: torch.Tensor
    cast: bool = True  # the tables come back in x's dtype (the text models) rather than fp32 (the vision towers)


# The frequency layouts ``recomposition_frequencies`` takes: the language model's (axes, batch, seq, F) and the
# vision tower's (patches, axes, F).
_TABLE_KINDS = (("text", (3, 1, 1), 0), ("vision", (1, 2), 1))


def table_layout(module: nn.Module) -> TableLayout | None:
    """The column map of a Qwen-VL-style rotary embedding (an ``inv_freq`` buffer and a
    ``recomposition_frequencies`` method that gathers per-axis frequencies into the table), learned by running that
    method on frequencies that encode (axis, index) in their values; None for any other module."""
    recompose = getattr(module, "recomposition_frequencies", None)
    inv_freq = getattr(module, "inv_freq", None)
    rope_type = str(getattr(module, "rope_type", "default"))
    if not callable(recompose) or not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1:
        return None
    if "dynamic" in rope_type or rope_type == "longrope":
        return None  # frequencies that change with the sequence length: transformers' forward keeps them right
    width = inv_freq.shape[0]
    for kind, lead, axis_dim in _TABLE_KINDS:
        n_axes = lead[axis_dim]
        codes = (torch.arange(n_axes, dtype=torch.float64)[:, None] * width + torch.arange(width)).reshape(
            *lead[:axis_dim], n_axes, *lead[axis_dim + 1 :], width
        )
        try:
            out = recompose(codes.clone())
        except Exception:  # noqa: BLE001, S112 - another layout: try the next
            continue
        if not isinstance(out, torch.Tensor) or out.numel() % 2:
            continue
        out = out.reshape(-1)
        half = out.numel() // 2
        first = out[:half]
        valid = torch.equal(first, out[half:]) and bool((first >= 0).all()) and bool((first < n_axes * width).all())
        if valid and torch.equal(first, first.round()):
            index = first.long()
            return TableLayout(kind, n_axes, index // width, index % width)
    return None


def table_positions(layout: TableLayout, position_ids: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """``position_ids`` as the (axes, tokens) the kernel reads and the leading shape of the tables, or None for a
    call the layout does not describe (transformers' forward runs it)."""
    if layout.kind == "vision":
        if position_ids.dim() != 2 or position_ids.shape[1] != layout.n_axes:
            return None
        return position_ids.transpose(0, 1), (position_ids.shape[0],)
    if position_ids.dim() == 2:
        position_ids = position_ids[None]
    if position_ids.dim() != 3 or position_ids.shape[0] not in (1, layout.n_axes):
        return None
    position_ids = position_ids.expand(layout.n_axes, -1, -1)
    return position_ids.flatten(1), tuple(position_ids.shape[1:])


def _probe_positions(layout: TableLayout, gen: torch.Generator) -> torch.Tensor:
    if layout.kind == "vision":
        return torch.randint(0, 64, (37, layout.n_axes), generator=gen)
    return torch.randint(0, 4096, (layout.n_axes, 2, 19), generator=gen)


def probe_table(module: nn.Module, layout: TableLayout, fast: Callable) -> TableLayout | None:
    """``layout`` (with whether the tables come back in x's dtype) when ``fast(module, x, position_ids)`` computes
    what the module's forward computes on random positions, else None."""
    inv_freq = module.inv_freq
    if inv_freq.is_meta:
        return layout
    gen = torch.Generator().manual_seed(1234)
    positions = _probe_positions(layout, gen).to(inv_freq.device)
    shape = (*positions.shape[1:], 1) if layout.kind == "text" else (positions.shape[0], 1)
    with torch.no_grad():
        try:
            low = module(torch.zeros(shape, dtype=torch.bfloat16, device=inv_freq.device), positions)
            layout = replace(layout, cast=low[0].dtype == torch.bfloat16)
            x = torch.zeros(shape, dtype=torch.float32, device=inv_freq.device)
            want, got = module(x, positions), fast(module, layout, x, positions)
        except Exception:  # noqa: BLE001 - not callable as the layout says: leave it
            return None
    tol = 8 * torch.finfo(torch.float32).eps  # cos/sin of the same fp32 angles by two libraries
    agree = all(
        isinstance(g, torch.Tensor) and g.shape == w.shape and g.dtype == w.dtype and torch.allclose(g, w, atol=tol)
        for g, w in zip(got, want, strict=True)
    )
    return layout if agree else None
