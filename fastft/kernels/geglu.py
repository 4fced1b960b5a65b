"""GeGLU: ``out = gelu(gate) * up``, the gated activation in the MLP of Gemma (tanh GELU) and others.

Forward, per element, with Phi / phi the standard normal CDF / density::

    approximate="none":  gelu(g) = g * Phi(g),   Phi(g) = (1 + erf(g / sqrt 2)) / 2      (ACT2FN["gelu"])
    approximate="tanh":  gelu(g) = g * (1 + tanh(k(g))) / 2,  k(g) = sqrt(2/pi) (g + 0.044715 g^3)
                                 = g * s,  s = sigmoid(2 k(g))      (ACT2FN["gelu_pytorch_tanh"], Gemma)
    out = gelu(g) * u

The tanh form uses the identity (1 + tanh(y)) / 2 = sigmoid(2y), so no tanh is ever evaluated: the
sigmoid is built from exp(-|.|) and stays finite for any input. transformers computes
``act_fn(gate) * up`` in the input dtype (two roundings); here everything is fp32, rounded once.

Backward, with dy = dL/d out:

    d up   = dy * gelu(g)
    d gate = dy * u * gelu'(g)

    exact:  gelu'(g) = Phi(g) + g * phi(g),           phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
    tanh:   gelu'(g) = (1 + tanh(k)) / 2 + g * (1 - tanh(k)^2) / 2 * k'(g)
                     = s + g * 2 s (1 - s) * k'(g)    since 1 - tanh(k)^2 = 4 s (1 - s) with s = sigmoid(2k)
            k'(g)    = sqrt(2/pi) (1 + 3 * 0.044715 g^2)

Saved for backward: ``gate`` and ``up`` only (the caller's tensors or views of them). gelu(gate) is
recomputed in the backward kernel instead of being kept (transformers' MLP keeps it, one more
``intermediate_size`` tensor per token).

Layout, launch heuristics, validation and the fused gate_up support are shared with :mod:`swiglu`
(same grid of rows x column blocks, a row stride per input, contiguous last dimension).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._math import normal_cdf_pdf, sigmoid_pair
from fastft.kernels._spec import AuditCase, Ptr
from fastft.kernels.swiglu import (
    _TRITON_DTYPES,
    _as_rows,
    _check_gated_inputs,
    _compute_dtype,
    _launch_config,
    _launch_gated_backward,
    _launch_gated_forward,
)

_APPROXIMATIONS = ("none", "tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_KAPPA = 0.044715
# Where |g| >= 100, s (1 - s) = sigmoid(2k) sigmoid(-2k) is exactly 0 in fp32 (2|k| > 7e4 while exp
# underflows past 104), so capping g^2 in k'(g) changes nothing but keeps k' finite for |g| > 1.8e19,
# where g^2 would overflow and turn 0 * inf into nan.
_G2_CAP = 1.0e4


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """The semantics, as transformers computes it (``ACT2FN["gelu"]`` or ``["gelu_pytorch_tanh"]``, times up)."""
    return torch.nn.functional.gelu(gate, approximate=approximate) * up


# --------------------------------------------------------------------------------------------------------
# Triton kernels (grid: rows x column blocks, as in swiglu.py). APPROXIMATE_TANH picks the GELU at compile
# time, so each launch carries only its own formula.
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _geglu_forward_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_cols,
    gate_row_stride,
    up_row_stride,
    APPROXIMATE_TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The row index is promoted to int64 before it multiplies a stride: row * stride overflows int32 once
    # a tensor holds more than 2^31 elements.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if APPROXIMATE_TANH:
        inner = 0.7978845608028654 * gate * (1.0 + 0.044715 * gate * gate)  # k(g) = sqrt(2/pi)(g + 0.044715 g^3)
        cdf, _ = sigmoid_pair(2.0 * inner)  # (1 + tanh(k)) / 2
    else:
        cdf, _ = normal_cdf_pdf(gate)
    out = gate * cdf * up
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_backward_kernel(
    gate_ptr,
    up_ptr,
    dout_ptr,
    dgate_ptr,
    dup_ptr,
    n_cols,
    gate_row_stride,
    up_row_stride,
    dout_row_stride,
    APPROXIMATE_TANH: tl.constexpr,
    COMPUTE_DGATE: tl.constexpr,
    COMPUTE_DUP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # d up = dy * gelu(g); d gate = dy * u * gelu'(g), gelu' as derived in the module docstring.
    row = tl.program_id(0).to(tl.int64)  # int64: see the forward kernel
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if APPROXIMATE_TANH:
        inner = 0.7978845608028654 * gate * (1.0 + 0.044715 * gate * gate)
        cdf, one_minus_cdf = sigmoid_pair(2.0 * inner)  # s and 1 - s, both without cancellation
        g2 = tl.minimum(gate * gate, 1.0e4)  # _G2_CAP: keeps k' finite where s (1 - s) is exactly 0 anyway
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g2)
        dgelu = cdf + gate * (2.0 * cdf * one_minus_cdf) * dinner
    else:
        cdf, pdf = normal_cdf_pdf(gate)
        dgelu = cdf + gate * pdf  # pdf is exactly 0 where g^2 overflows, so no inf * 0
    if COMPUTE_DUP:
        dup = dout * (gate * cdf)
        tl.store(dup_ptr + row * n_cols + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DGATE:
        up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dgate = dout * up * dgelu
        tl.store(dgate_ptr + row * n_cols + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Host side: launchers and the torch path.
# --------------------------------------------------------------------------------------------------------


def _geglu_forward_triton(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return _launch_gated_forward(_geglu_forward_kernel, gate, up, APPROXIMATE_TANH=approximate == "tanh")


def _geglu_backward_triton(
    gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor, approximate: str, need_dgate: bool, need_dup: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return _launch_gated_backward(
        _geglu_backward_kernel, gate, up, dout, need_dgate, need_dup, APPROXIMATE_TANH=approximate == "tanh"
    )


def _gelu_and_derivative_torch(g: torch.Tensor, approximate: str, derivative: bool):
    """(gelu(g), gelu'(g) or None) in g's dtype (fp32 or float64): the kernel's formulas in PyTorch."""
    if approximate == "tanh":
        inner = _SQRT_2_OVER_PI * g * (1.0 + _KAPPA * g * g)
        cdf = torch.sigmoid(2.0 * inner)
        if not derivative:
            return g * cdf, None
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _KAPPA * (g * g).clamp_(max=_G2_CAP))
        return g * cdf, cdf + g * (2.0 * cdf * torch.sigmoid(-2.0 * inner)) * dinner
    # Phi(g) = erfc(-g / sqrt 2) / 2 stays accurate in the lower tail, where (1 + erf) / 2 (and ndtr) cancel.
    cdf = 0.5 * torch.special.erfc(g * -_INV_SQRT_2)
    if not derivative:
        return g * cdf, None
    return g * cdf, cdf + g * (torch.exp(-0.5 * g * g) * _INV_SQRT_2PI)


def _geglu_forward_torch(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    compute = _compute_dtype(gate.dtype)
    gelu, _ = _gelu_and_derivative_torch(gate.to(compute), approximate, derivative=False)
    return (gelu * up.to(compute)).to(gate.dtype)


def _geglu_backward_torch(
    gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor, approximate: str, need_dgate: bool, need_dup: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    compute = _compute_dtype(gate.dtype)
    dy = dout.to(compute)
    gelu, dgelu = _gelu_and_derivative_torch(gate.to(compute), approximate, derivative=need_dgate)
    dup = (dy * gelu).to(up.dtype) if need_dup else None
    dgate = (dy * up.to(compute) * dgelu).to(gate.dtype) if need_dgate else None
    return dgate, dup


class GeGLUFunction(torch.autograd.Function):
    """gelu(gate) * up with a fused forward and a fused, hand-derived backward; saves only gate and up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
        gate_rows, up_rows = _as_rows(gate), _as_rows(up)
        # The backward runs where the forward ran, whatever backend context it is called in.
        ctx.triton = use_triton(gate) and gate.dtype in _TRITON_DTYPES
        forward = _geglu_forward_triton if ctx.triton else _geglu_forward_torch
        out = forward(gate_rows, up_rows, approximate)
        ctx.save_for_backward(gate_rows, up_rows)
        ctx.approximate, ctx.shape = approximate, gate.shape
        return out  # flat; reshaped outside the Function, so the caller may change it in place

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        gate_rows, up_rows = ctx.saved_tensors
        need_dgate, need_dup = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        backward = _geglu_backward_triton if ctx.triton else _geglu_backward_torch
        dgate, dup = backward(gate_rows, up_rows, _as_rows(dout), ctx.approximate, need_dgate, need_dup)
        return (
            dgate.view(ctx.shape) if dgate is not None else None,
            dup.view(ctx.shape) if dup is not None else None,
            None,
        )


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: Literal["tanh", "none"] = "tanh") -> torch.Tensor:
    """GeGLU activation ``gelu(gate) * up`` with fused Triton forward/backward kernels.

    ``approximate`` follows ``torch.nn.functional.gelu``: ``"tanh"`` (the default, as Gemma's
    ``"gelu_pytorch_tanh"`` — the form GeGLU models use) or ``"none"``, the exact erf GELU (transformers' ``"gelu"``). ``gate`` and ``up``
    have the same shape ``(..., intermediate_size)`` and dtype (float32, bfloat16, float16; float64 runs the
    torch path in float64), and may be the halves of a fused projection (``gate_up.chunk(2, dim=-1)``), read in
    place. The result is computed in fp32 and rounded once. Autograd saves only ``gate`` and ``up``; the
    activation is recomputed in the backward pass. CUDA tensors run the Triton kernels, CPU tensors an
    equivalent torch path (or the interpreted kernels under ``TRITON_INTERPRET=1``).
    """
    _check_gated_inputs("geglu", gate, up)
    if approximate not in _APPROXIMATIONS:
        raise ValueError(
            f"geglu: approximate must be 'none' (exact erf GELU, transformers' 'gelu') or 'tanh' "
            f"(transformers' 'gelu_pytorch_tanh'), got {approximate!r}."
        )
    return GeGLUFunction.apply(gate, up, approximate).view(gate.shape)


def audit_cases() -> list[AuditCase]:
    """Forward and backward, for each GELU, at Llama-3-8B's MLP shape: 8192 x 14336, bf16, contiguous."""
    n_rows, n_cols, element_bytes = 8192, 14336, 2
    block, num_warps = _launch_config(n_cols)
    tensor_bytes = n_rows * n_cols * element_bytes
    shape = f"{n_rows}x{n_cols} bf16"
    cases = []
    for approximate in ("tanh", "none"):
        tanh = approximate == "tanh"
        forward_constexprs = {"APPROXIMATE_TANH": tanh, "BLOCK": block}
        cases.append(
            AuditCase(
                name=f"geglu_forward[{approximate}]",
                kernel=_geglu_forward_kernel,
                args={
                    "gate_ptr": Ptr("bf16"),
                    "up_ptr": Ptr("bf16"),
                    "out_ptr": Ptr("bf16"),
                    "n_cols": n_cols,
                    "gate_row_stride": n_cols,
                    "up_row_stride": n_cols,
                    **forward_constexprs,
                },
                constexprs=forward_constexprs,
                num_warps=num_warps,
                shape=shape,
                min_bytes=3 * tensor_bytes,  # read gate, up; write out
            )
        )
        backward_constexprs = {"APPROXIMATE_TANH": tanh, "COMPUTE_DGATE": True, "COMPUTE_DUP": True, "BLOCK": block}
        cases.append(
            AuditCase(
                name=f"geglu_backward[{approximate}]",
                kernel=_geglu_backward_kernel,
                args={
                    "gate_ptr": Ptr("bf16"),
                    "up_ptr": Ptr("bf16"),
                    "dout_ptr": Ptr("bf16"),
                    "dgate_ptr": Ptr("bf16"),
                    "dup_ptr": Ptr("bf16"),
                    "n_cols": n_cols,
                    "gate_row_stride": n_cols,
                    "up_row_stride": n_cols,
                    "dout_row_stride": n_cols,
                    **backward_constexprs,
                },
                constexprs=backward_constexprs,
                num_warps=num_warps,
                shape=shape,
                min_bytes=5 * tensor_bytes,  # read gate, up, dy; write d gate, d up
            )
        )
    return cases
