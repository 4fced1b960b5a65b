"""Gated RMSNorm (the output norm of Mamba-2 mixers and of gated linear attention) with a hand-derived backward
that returns gradients for the input, the gate and the weight.

Forward, for a row ``x`` of length ``H`` with gate row ``z`` (same shape), split into ``G = H / S`` groups of
``S = group_size`` consecutive columns (``group_size=None``: one group, ``S = H``), computed in fp32 (float64
for float64 inputs), with ``act`` the SiLU ``z * sigma(z)`` or the logistic sigmoid ``sigma(z)``::

    a    = act(z)                                    elementwise, from the gate
    u    = x                 (norm_before_gate=True)
         = x * a             (norm_before_gate=False)
    rstd = 1 / sqrt(mean_{i in group}(u_i^2) + eps)  one scalar per row and group
    n_i  = u_i * rstd                                the normalised value
    t_i  = (offset + w_i) * n_i
    y_i  = t_i * a_i         (norm_before_gate=True)
         = t_i               (norm_before_gate=False)

Where transformers rounds, and so where this file rounds (``weight_in_fp32`` picks the family; the gate is
always cast to fp32 and its activation taken there; the input is cast to fp32 before anything else, except
that gate-first modules multiply x (in its dtype) by the fp32 activation, which PyTorch computes in fp32 on
the exactly widened x: the same numbers):

- ``weight_in_fp32=False`` (Llama-style rounding, ``offset`` must be 0): ``n`` is rounded to x's dtype, then
  multiplied by the weight in the promoted dtype of x and the weight (``weight * n.to(x.dtype)``).

  * gate last (``norm_before_gate=True``): that product, *rounded to the promoted dtype* (bf16 x with a bf16
    weight rounds it to bf16; fp32 or mixed dtypes keep the fp32 product), is multiplied by the fp32
    activation and rounded to x's dtype at the end. The result has x's dtype.
    ``Qwen3NextRMSNormGated``, ``Qwen3_5RMSNormGated``, ``Qwen3_5MoeRMSNormGated``, ``OlmoHybridRMSNormGated``
    (silu), ``Qwen4ExpTextRMSNormGated`` (its configured activation: silu or sigmoid).
  * gate first (``norm_before_gate=False``): the product is the result, in the promoted dtype of x and the
    weight (bf16 x with an fp32 weight gives fp32, as ``LlamaRMSNorm`` does). ``Mamba2RMSNormGated``,
    ``NemotronHRMSNormGated``, ``BambaRMSNormGated``, ``GraniteMoeHybridRMSNormGated``,
    ``Zamba2RMSNormGated`` (silu, ``group_size=module.group_size``).

- ``weight_in_fp32=True`` ("strict fp32 norm"): ``n * (offset + w.float())`` and the gate multiply are done in
  fp32 and the result is rounded to x's dtype once, at the end (the form ``GemmaRMSNorm`` uses for ``offset=1``).
  ``KimiLinearRMSNormGated``, ``BailingHybridRMSNormGated``, ``Glm5NextTextRMSNormGated`` (sigmoid, gate last),
  ``LaraMiniRMSNormGated`` (silu, gate last), ``FalconH1RMSNormGated`` (silu, ``norm_before_gate`` and
  ``group_size = H // n_groups`` from the module).

No gated module in transformers 5.25 offsets its weight; ``offset`` is there for a Gemma-style ``1 + w`` and
requires ``weight_in_fp32=True``. Not covered: the ``gate=None`` calls of the Mamba-2 family's module (a plain,
possibly grouped, RMSNorm) and ``AXK2GatedRMSNorm`` (its gate is an MLP of the normalised output, not an
input). Float64 inputs are computed in float64 (transformers computes them in fp32). The reference's float64
gradients are not an exact oracle for large gates, though: autograd differentiates ``torch.sigmoid`` as
``(1 - s) s``, which cancels to 0 past z ~ 37 even in float64; the tests differentiate a stable sigmoid instead.

Backward. With ``W_i = offset + w_i``, ``a'`` the derivative of the activation (``sigma (1 + z (1 - sigma))``
for SiLU, ``sigma (1 - sigma)`` for the sigmoid; ``1 - sigma`` is computed as ``sigma(-z)``, never by a
subtraction) and the RMSNorm identity (``d rstd / d u_j = -rstd^3 u_j / S`` within a group)::

    for g_i = dL/dn_i:   dL/du_j = rstd * (g_j - n_j * mean_{i in group}(g_i * n_i))

Gate last (``y = W n a``)::

    g_i      = dy_i * a_i * W_i
    dL/dx_j  = rstd * (g_j - n_j * mean(g * n))
    dL/dz_i  = dy_i * W_i * n_i * a'_i
    dL/dw_i  = sum over rows of dy_i * a_i * n_i

Gate first (``y = W n``, ``u = x a``)::

    g_i      = dy_i * W_i
    du_j     = rstd * (g_j - n_j * mean(g * n))
    dL/dx_j  = du_j * a_j
    dL/dz_j  = du_j * x_j * a'_j
    dL/dw_i  = sum over rows of dy_i * n_i

The roundings in the forward are casts, whose derivative autograd takes as the identity; the backward uses
the unrounded fp32 values (the exact derivative of the formula). ``dw`` is accumulated per program in fp32 over
a contiguous range of rows (of one group) and the partial sums are added in a second, deterministic step (no
atomics). A frozen weight (``requires_grad=False``) skips that work and its buffer entirely; so does a gate or
an input that needs no gradient skip its own.

Saved for backward: the input ``x`` and the gate (both alive anyway: they are the outputs of the layer's
projections or scan), the weight (a parameter), and one inverse rms per row and group in fp32 (float64 for
float64 inputs). Never the activation, the gated input or the normalised output: the backward recomputes
``a``, ``u`` and ``n`` from ``x``, ``z`` and ``rstd`` (one ``exp`` and a few multiplies per element).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._math import sigmoid_pair
from fastft.kernels._spec import AuditCase, Ptr
from fastft.kernels.rms_norm import _as_rows, _multiprocessor_count

# dtypes the Triton kernels take (for x, the gate and the weight); anything else (float64) runs the torch path.
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ACTIVATIONS = ("silu", "sigmoid")

# The kernels hold a whole group (or a tile of groups) in registers. Past this width the registers spill, so
# wider groups (no model in use has one) run the torch path, which is correct at any width.
_MAX_FUSED_COLS = 65536
# Groups are the second grid axis, which CUDA caps at 65535 programs; more groups (of a few columns each: no
# model has them) run the torch path.
_MAX_GROUPS = 65535


@dataclass(frozen=True)
class _Variant:
    """Which gated norm: the flags of :func:`rms_norm_gated`, with ``group_size`` resolved to an int."""

    group_size: int
    norm_before_gate: bool
    sigmoid: bool
    weight_in_fp32: bool
    offset: float


def rms_norm_gated_reference(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    offset: float = 0.0,
    norm_before_gate: bool = True,
    group_size: int | None = None,
    activation: str = "silu",
    weight_in_fp32: bool = False,
) -> torch.Tensor:
    """Plain differentiable PyTorch gated RMSNorm: the semantics :func:`rms_norm_gated` implements.

    For fp32/bf16/fp16 inputs it performs the same operations, in the same dtypes, as the transformers module
    each flag combination stands for (module docstring), so its outputs and gradients equal theirs bit for bit.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    z = gate.to(compute)
    a = torch.sigmoid(z) if activation == "sigmoid" else F.silu(z)
    h = x.to(compute)
    if not norm_before_gate:
        h = h * a
    n_cols = x.shape[-1]
    size = n_cols if group_size is None else group_size
    grouped = h.unflatten(-1, (n_cols // size if size else 1, size))
    normed = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    if weight_in_fp32:
        w = weight.to(compute)
        out = normed * (w if offset == 0 else offset + w)
    else:
        out = weight * normed.to(x.dtype)
    if norm_before_gate:
        return (out * a).to(x.dtype)
    return out.to(x.dtype) if weight_in_fp32 else out


# --------------------------------------------------------------------------------------------------------------
# Triton kernels. The grid is (row tiles, groups): program (i, g) owns ROWS rows x the S columns of group g
# (BLOCK_SIZE = S rounded up to a power of two, so a group is one masked, vectorised load). Wide groups use
# ROWS = 1; narrow ones (the 128-wide heads of Qwen3-Next) pack several rows per program. One rstd per (row,
# group), stored at row * G + g.
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_gated_forward_kernel(
    y_ptr,
    x_ptr,
    gate_ptr,
    w_ptr,
    rstd_ptr,
    y_row_stride,
    x_row_stride,
    gate_row_stride,
    n_rows,
    group_size,
    eps,
    offset,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr,
    SIGMOID: tl.constexpr,
    WEIGHT_IN_FP32: tl.constexpr,
    ROUND_PRODUCT: tl.constexpr,
):
    # Memory traffic: read x, the gate and w once, write y and one fp32 rstd per row and group.
    group = tl.program_id(1)
    n_groups = tl.num_programs(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_SIZE)
    cols = group * group_size + offs
    row_mask = rows < n_rows
    col_mask = offs < group_size
    mask = row_mask[:, None] & col_mask[None, :]
    # Promote the row index to int64 before multiplying by the stride: rows * stride overflows int32 once a
    # tensor holds 2^31 elements.
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(gate_ptr + rows64[:, None] * gate_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    sig, _ = sigmoid_pair(z)
    if SIGMOID:
        a = sig
    else:
        a = z * sig
    if not NORM_BEFORE_GATE:
        x = x * a  # Mamba-2 / Falcon-H1 gate first; masked columns stay 0
    # Masked columns add nothing to the sum of squares; divide by the true group width.
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / group_size + eps)
    normed = x * rstd[:, None]
    if WEIGHT_IN_FP32:
        y = normed * (offset + w)[None, :]
    else:
        # Round the normalised value to x's dtype, then multiply by the weight: the product of two 16-bit
        # floats is exact in fp32, so one rounding of it (here, or at the store) equals PyTorch's result.
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
        if ROUND_PRODUCT:
            # Qwen3-Next with w and x of one 16-bit dtype: weight * n is a 16-bit tensor before the gate.
            y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    if NORM_BEFORE_GATE:
        y = y * a
    tl.store(y_ptr + rows64[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows64 * n_groups + group, rstd, mask=row_mask)


@triton.jit
def _rms_norm_gated_backward_kernel(
    dx_ptr,
    dgate_ptr,
    dy_ptr,
    x_ptr,
    gate_ptr,
    w_ptr,
    rstd_ptr,
    dw_partial_ptr,
    dx_row_stride,
    dgate_row_stride,
    dy_row_stride,
    x_row_stride,
    gate_row_stride,
    n_rows,
    n_cols,
    group_size,
    offset,
    tiles_per_program,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr,
    SIGMOID: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DGATE: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    # Program (p, g) walks tiles [p * tiles_per_program, (p + 1) * tiles_per_program) of ROWS rows of group g.
    #   a, a'  = act(z), act'(z)                        (recomputed from the gate, never saved)
    #   n      = u * rstd, u = x or x * a               (recomputed, never saved)
    #   gate last:  dx = rstd (g - n mean(g n)) with g = dy a W;  dz = dy W n a';  dw += dy a n
    #   gate first: du = rstd (g - n mean(g n)) with g = dy W;    dx = du a;  dz = du x a';  dw += dy n
    # Memory traffic: read x, z, dy, rstd, write dx and dz; plus one fp32 row of partial dw per program, which
    # the host adds up across programs. w is re-read for every tile from L1/L2 rather than held in registers.
    pid = tl.program_id(0)
    group = tl.program_id(1)
    n_groups = tl.num_programs(1)
    offs = tl.arange(0, BLOCK_SIZE)
    cols = group * group_size + offs
    col_mask = offs < group_size
    # dw accumulates elementwise over the tile and is reduced across its rows once, at the end.
    dw_acc = tl.zeros([ROWS, BLOCK_SIZE], dtype=tl.float32)

    for i in range(tiles_per_program):
        rows = (pid * tiles_per_program + i) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)  # int64 before the stride multiply: int32 overflows past 2^31 elements
        x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(gate_ptr + rows64[:, None] * gate_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows64 * n_groups + group, mask=row_mask, other=0.0)
        sig, sig_c = sigmoid_pair(z)  # sigma(z) and 1 - sigma(z), each to full relative precision
        if SIGMOID:
            a = sig
            da = sig * sig_c
        else:
            a = z * sig
            da = sig * (1.0 + z * sig_c)
        if NORM_BEFORE_GATE:
            normed = x * rstd[:, None]
            if COMPUTE_DW:
                dw_acc += dy * a * normed  # rows past the end loaded dy = 0 and add nothing
            if COMPUTE_DX or COMPUTE_DGATE:
                w = offset + tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                dyw = dy * w[None, :]
                if COMPUTE_DGATE:
                    dz = dyw * normed * da
                    tl.store(
                        dgate_ptr + rows64[:, None] * dgate_row_stride + cols[None, :],
                        dz.to(dgate_ptr.dtype.element_ty),
                        mask=mask,
                    )
                if COMPUTE_DX:
                    g = dyw * a
                    mean_gn = tl.sum(g * normed, axis=1) / group_size
                    dx = (g - normed * mean_gn[:, None]) * rstd[:, None]
                    tl.store(
                        dx_ptr + rows64[:, None] * dx_row_stride + cols[None, :],
                        dx.to(dx_ptr.dtype.element_ty),
                        mask=mask,
                    )
        else:
            normed = x * a * rstd[:, None]
            if COMPUTE_DW:
                dw_acc += dy * normed
            if COMPUTE_DX or COMPUTE_DGATE:
                w = offset + tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                g = dy * w[None, :]
                mean_gn = tl.sum(g * normed, axis=1) / group_size
                du = (g - normed * mean_gn[:, None]) * rstd[:, None]
                if COMPUTE_DX:
                    tl.store(
                        dx_ptr + rows64[:, None] * dx_row_stride + cols[None, :],
                        (du * a).to(dx_ptr.dtype.element_ty),
                        mask=mask,
                    )
                if COMPUTE_DGATE:
                    tl.store(
                        dgate_ptr + rows64[:, None] * dgate_row_stride + cols[None, :],
                        (du * x * da).to(dgate_ptr.dtype.element_ty),
                        mask=mask,
                    )

    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------------------------
# Launch heuristics and host launchers.
# --------------------------------------------------------------------------------------------------------------

# A program's tile holds about this many elements: one 4096-wide group, or 32 rows of 128.
_TILE_ELEMENTS = 4096
_MAX_ROWS_PER_PROGRAM = 64
# Elements of the tile each thread holds: 16 bf16 values = two 128-bit loads per tensor per thread.
_ELEMENTS_PER_THREAD = 16


def _launch_config(group_size: int) -> tuple[int, int, int]:
    """(BLOCK_SIZE, ROWS per tile, num_warps) for groups of ``group_size`` elements; used by both kernels.

    S=128 -> (128, 32, 8); S=1024 -> (1024, 4, 8); S=4096 -> (4096, 1, 8); S=5120 -> (8192, 1, 16).
    """
    block = triton.next_power_of_2(group_size)
    rows = max(1, min(_MAX_ROWS_PER_PROGRAM, _TILE_ELEMENTS // block))
    num_warps = max(1, min(32, block * rows // (32 * _ELEMENTS_PER_THREAD)))
    return block, rows, num_warps


def _backward_grid(n_rows: int, rows_per_tile: int, num_warps: int, n_groups: int, sm_count: int) -> tuple[int, int]:
    """(programs per group, tiles per program) for the backward kernel, whose grid is (programs, n_groups).

    About two resident CTAs per SM at 8 warps (one at 16 or more) over all groups together, so that the fp32
    partial-dw buffer (programs x H) stays a few percent of the bytes the kernel moves anyway.
    """
    n_tiles = triton.cdiv(n_rows, rows_per_tile)
    programs = min(n_tiles, max(1, sm_count * max(1, 16 // num_warps) // n_groups))
    tiles_per_program = triton.cdiv(n_tiles, programs)
    return triton.cdiv(n_tiles, tiles_per_program), tiles_per_program


def _forward_triton(
    x2: torch.Tensor, g2: torch.Tensor, weight: torch.Tensor, eps: float, v: _Variant, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    n_groups = n_cols // v.group_size
    block, rows, num_warps = _launch_config(v.group_size)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    rstd = torch.empty(n_rows * n_groups, dtype=torch.float32, device=x2.device)
    _rms_norm_gated_forward_kernel[(triton.cdiv(n_rows, rows), n_groups)](
        y,
        x2,
        g2,
        weight.contiguous(),  # the kernel indexes the weight by column; a no-op for a parameter
        rstd,
        y.stride(0),
        x2.stride(0),
        g2.stride(0),
        n_rows,
        v.group_size,
        float(eps),
        v.offset,
        BLOCK_SIZE=block,
        ROWS=rows,
        NORM_BEFORE_GATE=v.norm_before_gate,
        SIGMOID=v.sigmoid,
        WEIGHT_IN_FP32=v.weight_in_fp32,
        # Gate last: weight * n.to(x.dtype) is rounded to x's dtype when that is the promoted dtype (both 16-bit).
        ROUND_PRODUCT=v.norm_before_gate and not v.weight_in_fp32 and weight.dtype == x2.dtype != torch.float32,
        num_warps=num_warps,
    )
    return y, rstd


def _backward_triton(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    g2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    v: _Variant,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    compute_dx, compute_dgate, compute_dw = needs
    n_rows, n_cols = x2.shape
    n_groups = n_cols // v.group_size
    block, rows, num_warps = _launch_config(v.group_size)
    programs, tiles_per_program = _backward_grid(n_rows, rows, num_warps, n_groups, _multiprocessor_count(x2.device))
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device) if compute_dx else None
    dgate = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=x2.device) if compute_dgate else None
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if compute_dw else None
    # Unused outputs get a placeholder pointer; their stores are compiled away by the constexpr flags.
    _rms_norm_gated_backward_kernel[(programs, n_groups)](
        dx if compute_dx else x2,
        dgate if compute_dgate else g2,
        dy2,
        x2,
        g2,
        weight.contiguous(),
        rstd,
        partial if compute_dw else rstd,
        dx.stride(0) if compute_dx else 0,
        dgate.stride(0) if compute_dgate else 0,
        dy2.stride(0),
        x2.stride(0),
        g2.stride(0),
        n_rows,
        n_cols,
        v.group_size,
        v.offset,
        tiles_per_program,
        BLOCK_SIZE=block,
        ROWS=rows,
        NORM_BEFORE_GATE=v.norm_before_gate,
        SIGMOID=v.sigmoid,
        COMPUTE_DX=compute_dx,
        COMPUTE_DGATE=compute_dgate,
        COMPUTE_DW=compute_dw,
        num_warps=num_warps,
    )
    # Second step of the dw reduction: a fixed-order sum over programs (deterministic).
    dw = partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dgate, dw


def _forward_torch(
    x2: torch.Tensor, g2: torch.Tensor, weight: torch.Tensor, eps: float, v: _Variant, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    compute = torch.promote_types(x2.dtype, torch.float32)
    z = g2.to(compute)
    a = torch.sigmoid(z) if v.sigmoid else F.silu(z)
    h = x2.to(compute)
    if not v.norm_before_gate:
        h = h * a
    grouped = h.reshape(n_rows, n_cols // v.group_size, v.group_size)
    rstd = torch.rsqrt(grouped.pow(2).mean(-1) + eps)
    normed = (grouped * rstd[..., None]).reshape(n_rows, n_cols)
    if v.weight_in_fp32:
        w = weight.to(compute)
        y = normed * (w if v.offset == 0 else v.offset + w)
    else:
        y = weight * normed.to(x2.dtype)
    if v.norm_before_gate:
        y = y * a
    return y.to(out_dtype), rstd.reshape(-1)


def _backward_torch(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    g2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    v: _Variant,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    compute_dx, compute_dgate, compute_dw = needs
    compute = rstd.dtype
    n_rows, n_cols = x2.shape
    n_groups = n_cols // v.group_size
    shape = (n_rows, n_groups, v.group_size)
    xf, z, dyf = (t.to(compute).reshape(shape) for t in (x2, g2, dy2))
    r = rstd.view(n_rows, n_groups, 1)
    sig = torch.sigmoid(z)
    a = sig if v.sigmoid else z * sig
    # a' = sigma (1 - sigma) or sigma (1 + z (1 - sigma)), with 1 - sigma as sigma(-z): no cancellation.
    da = sig * torch.sigmoid(-z) if v.sigmoid else sig * (1.0 + z * torch.sigmoid(-z))
    w = (v.offset + weight.to(compute)).view(n_groups, v.group_size)
    dx = dgate = dw = None
    if v.norm_before_gate:
        normed = xf * r
        if compute_dw:
            dw = (dyf * a * normed).sum(0)
        if compute_dgate:
            dgate = dyf * w * normed * da
        if compute_dx:
            g = dyf * a * w
            dx = r * (g - normed * (g * normed).mean(-1, keepdim=True))
    else:
        normed = xf * a * r
        if compute_dw:
            dw = (dyf * normed).sum(0)
        if compute_dx or compute_dgate:
            g = dyf * w
            du = r * (g - normed * (g * normed).mean(-1, keepdim=True))
            dx = du * a if compute_dx else None
            dgate = du * xf * da if compute_dgate else None
    return (
        dx.reshape(n_rows, n_cols).to(x2.dtype) if dx is not None else None,
        dgate.reshape(n_rows, n_cols).to(g2.dtype) if dgate is not None else None,
        dw.reshape(n_cols).to(weight.dtype) if dw is not None else None,
    )


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, v: _Variant) -> torch.dtype:
    # Only the Mamba-2 form (gate first, weight * n.to(x.dtype) last) returns the promoted dtype; every other
    # form ends with a cast to x's dtype.
    if not v.norm_before_gate and not v.weight_in_fp32:
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype


def _runs_triton(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, v: _Variant) -> bool:
    return (
        use_triton(x)
        and x.numel() > 0
        and all(t.dtype in _TRITON_DTYPES for t in (x, gate, weight))
        and v.group_size <= _MAX_FUSED_COLS
        and x.shape[-1] // v.group_size <= _MAX_GROUPS
    )


class RMSNormGatedFunction(torch.autograd.Function):
    """Autograd wrapper: picks the Triton or torch implementation, saves x, gate, weight and the rstd per group."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, v: _Variant
    ) -> torch.Tensor:
        n_rows, n_cols = math.prod(x.shape[:-1]), x.shape[-1]
        triton_path = _runs_triton(x, gate, weight, v)
        if triton_path:
            y, rstd = _forward_triton(
                _as_rows(x, n_cols), _as_rows(gate, n_cols), weight, eps, v, _output_dtype(x, weight, v)
            )
        else:
            y, rstd = _forward_torch(
                x.reshape(n_rows, n_cols), gate.reshape(n_rows, n_cols), weight, eps, v, _output_dtype(x, weight, v)
            )
        # Save the caller's x and gate (not contiguous copies, which would be extra live tensors).
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.variant = v
        ctx.triton_path = triton_path
        return y  # flat; reshaped outside the Function, so the caller may change it in place

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, gate, weight, rstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        n_cols = x.shape[-1]
        if ctx.triton_path:
            rows = [_as_rows(t, n_cols) for t in (dy, x, gate)]
            dx, dgate, dw = _backward_triton(*rows, weight, rstd, ctx.variant, needs)
        else:
            rows = [t.reshape(math.prod(x.shape[:-1]), n_cols) for t in (dy, x, gate)]
            dx, dgate, dw = _backward_torch(*rows, weight, rstd, ctx.variant, needs)
        return (
            dx.view(x.shape) if dx is not None else None,
            dgate.view(gate.shape) if dgate is not None else None,
            dw,
            None,
            None,
        )


def _check_inputs(
    x: object,
    gate: object,
    weight: object,
    eps: object,
    offset: object,
    norm_before_gate: object,
    group_size: object,
    activation: object,
    weight_in_fp32: object,
) -> None:
    """Raise a TypeError/ValueError naming the argument, its value and the way out."""
    for name, t in (("x", x), ("gate", gate), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rms_norm_gated: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"rms_norm_gated: {name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                f"got {t.dtype}; convert it with .float() or .to(torch.bfloat16)"
            )
    if x.dim() == 0:
        raise ValueError("rms_norm_gated: x must have at least one dimension (..., H), got a 0-d tensor")
    if gate.shape != x.shape:
        raise ValueError(
            f"rms_norm_gated: gate must have the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}; "
            "reshape the gate projection's output like x (e.g. z.view_as(x)) before the call"
        )
    n_cols = x.shape[-1]
    if tuple(weight.shape) != (n_cols,):
        raise ValueError(
            f"rms_norm_gated: weight must have shape (H,) = ({n_cols},) to match the last dim of x "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    for name, t in (("gate", gate), ("weight", weight)):
        if t.device != x.device:
            raise ValueError(f"rms_norm_gated: x is on {x.device} but {name} is on {t.device}; move all to one device")
    for name, value, hint in (("eps", eps, "typically 1e-6 or 1e-5"), ("offset", offset, "0.0, or 1.0 for 1 + w")):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(
                f"rms_norm_gated: {name} must be a Python number ({hint}), got {type(value).__name__} {value!r}"
            )
        if not math.isfinite(value):
            raise ValueError(f"rms_norm_gated: {name} must be finite ({hint}), got {value!r}")
    if eps < 0:
        raise ValueError(f"rms_norm_gated: eps must be >= 0 (typically 1e-6 or 1e-5), got {eps!r}")
    for name, value in (("norm_before_gate", norm_before_gate), ("weight_in_fp32", weight_in_fp32)):
        if not isinstance(value, bool):
            raise TypeError(f"rms_norm_gated: {name} must be True or False, got {type(value).__name__} {value!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"rms_norm_gated: activation must be 'silu' or 'sigmoid' (the gates of transformers' gated norms), "
            f"got {activation!r}; for another activation use rms_norm_gated_reference"
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(
                f"rms_norm_gated: group_size must be None or a positive int, got {type(group_size).__name__} "
                f"{group_size!r}"
            )
        if group_size <= 0 or n_cols % group_size:
            raise ValueError(
                f"rms_norm_gated: group_size must be a positive divisor of the last dim of x (H={n_cols}), got "
                f"{group_size}; for a module with n_groups pass group_size=H // n_groups, or None for one group"
            )
    if offset != 0 and not weight_in_fp32:
        raise ValueError(
            f"rms_norm_gated: offset={offset!r} applies the weight as (offset + w) in fp32 (GemmaRMSNorm's form); "
            "pass weight_in_fp32=True with it, or offset=0.0"
        )


def rms_norm_gated(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    offset: float = 0.0,
    norm_before_gate: bool = True,
    group_size: int | None = None,
    activation: str = "silu",
    weight_in_fp32: bool = False,
) -> torch.Tensor:
    """Gated RMSNorm over (groups of) the last dim: ``rmsnorm(x) * (offset + weight) * act(gate)`` or, with
    ``norm_before_gate=False``, ``rmsnorm(x * act(gate)) * (offset + weight)``.

    ``x`` and ``gate`` have shape ``(..., H)``, ``weight`` shape ``(H,)``; ``group_size`` (a divisor of H, or
    None for H) normalises each run of ``group_size`` columns on its own; ``activation`` is "silu" or "sigmoid".
    ``weight_in_fp32=False`` rounds the normalised value to x's dtype before the weight multiply (Qwen3-Next's
    and Mamba-2's modules), ``True`` applies weight and gate in fp32 and rounds once (Kimi-Linear's, Falcon-H1's);
    the module docstring maps every transformers gated norm to its flags. Gradients flow to ``x``, ``gate`` and
    ``weight`` (each skipped when it does not require grad); autograd keeps only ``x``, ``gate``, ``weight`` and
    one fp32 inverse rms per row and group. CUDA tensors run fused Triton kernels; other devices, float64 and
    groups wider than 65536 run a torch path with the same hand-written backward.
    """
    _check_inputs(x, gate, weight, eps, offset, norm_before_gate, group_size, activation, weight_in_fp32)
    variant = _Variant(
        group_size=(x.shape[-1] or 1) if group_size is None else group_size,  # H = 0: one empty group
        norm_before_gate=norm_before_gate,
        sigmoid=activation == "sigmoid",
        weight_in_fp32=weight_in_fp32,
        offset=float(offset),
    )
    return RMSNormGatedFunction.apply(x, gate, weight, float(eps), variant).view(x.shape)


# --------------------------------------------------------------------------------------------------------------
# Compile audit.
# --------------------------------------------------------------------------------------------------------------

_AUDIT_SM_COUNT = 132  # H100 / H200: sets the backward grid and so the partial-dw bytes in the bytes model


def _flags(norm_before_gate: bool, sigmoid: bool) -> dict[str, bool]:
    return {"NORM_BEFORE_GATE": norm_before_gate, "SIGMOID": sigmoid}


def _audit_forward(
    name: str,
    n_rows: int,
    n_cols: int,
    group_size: int,
    *,
    norm_before_gate: bool,
    sigmoid: bool = False,
    weight_in_fp32: bool = False,
) -> AuditCase:
    """A bf16 forward launch (x, gate and weight in bf16): one of the program columns of the (tiles, G) grid."""
    block, rows, num_warps = _launch_config(group_size)
    n_groups = n_cols // group_size
    flags = {
        "BLOCK_SIZE": block,
        "ROWS": rows,
        **_flags(norm_before_gate, sigmoid),
        "WEIGHT_IN_FP32": weight_in_fp32,
        "ROUND_PRODUCT": norm_before_gate and not weight_in_fp32,  # bf16 x and bf16 weight
    }
    return AuditCase(
        name=name,
        kernel=_rms_norm_gated_forward_kernel,
        args={
            "y_ptr": Ptr("bf16"),
            "x_ptr": Ptr("bf16"),
            "gate_ptr": Ptr("bf16"),
            "w_ptr": Ptr("bf16"),
            "rstd_ptr": Ptr("fp32"),
            "y_row_stride": n_cols,
            "x_row_stride": n_cols,
            "gate_row_stride": n_cols,
            "n_rows": n_rows,
            "group_size": group_size,
            "eps": 1e-6,
            "offset": 0.0,
            **flags,
        },
        constexprs=flags,
        num_warps=num_warps,
        shape=(
            f"x, gate ({n_rows}, {n_cols}) bf16, groups of {group_size}, "
            f"{'norm then gate' if norm_before_gate else 'gate then norm'}, {'sigmoid' if sigmoid else 'silu'}"
            f"{', weight in fp32' if weight_in_fp32 else ''}"
        ),
        # read x, gate and w, write y and one fp32 rstd per row and group
        min_bytes=3 * n_rows * n_cols * 2 + n_cols * 2 + 4 * n_rows * n_groups,
    )


def _audit_backward(
    name: str,
    n_rows: int,
    n_cols: int,
    group_size: int,
    *,
    norm_before_gate: bool,
    sigmoid: bool = False,
    compute_dw: bool = True,
) -> AuditCase:
    block, rows, num_warps = _launch_config(group_size)
    n_groups = n_cols // group_size
    programs, tiles_per_program = _backward_grid(n_rows, rows, num_warps, n_groups, _AUDIT_SM_COUNT)
    flags = {
        "BLOCK_SIZE": block,
        "ROWS": rows,
        **_flags(norm_before_gate, sigmoid),
        "COMPUTE_DX": True,
        "COMPUTE_DGATE": True,
        "COMPUTE_DW": compute_dw,
    }
    return AuditCase(
        name=name,
        kernel=_rms_norm_gated_backward_kernel,
        args={
            "dx_ptr": Ptr("bf16"),
            "dgate_ptr": Ptr("bf16"),
            "dy_ptr": Ptr("bf16"),
            "x_ptr": Ptr("bf16"),
            "gate_ptr": Ptr("bf16"),
            "w_ptr": Ptr("bf16"),
            "rstd_ptr": Ptr("fp32"),
            "dw_partial_ptr": Ptr("fp32"),
            "dx_row_stride": n_cols,
            "dgate_row_stride": n_cols,
            "dy_row_stride": n_cols,
            "x_row_stride": n_cols,
            "gate_row_stride": n_cols,
            "n_rows": n_rows,
            "n_cols": n_cols,
            "group_size": group_size,
            "offset": 0.0,
            "tiles_per_program": tiles_per_program,
            **flags,
        },
        constexprs=flags,
        num_warps=num_warps,
        shape=(
            f"x, gate ({n_rows}, {n_cols}) bf16, groups of {group_size}, {programs} x {n_groups} programs, "
            f"{'norm then gate' if norm_before_gate else 'gate then norm'}, dw {'on' if compute_dw else 'off'}"
        ),
        # read x, gate, dy, rstd and w (from DRAM once; the re-reads per tile hit cache); write dx, dgate and the
        # dw partials
        min_bytes=5 * n_rows * n_cols * 2
        + 4 * n_rows * n_groups
        + n_cols * 2
        + (4 * programs * n_cols if compute_dw else 0),
    )


def audit_cases() -> list[AuditCase]:
    """Forward and backward at the audit shapes: Qwen3-Next's per-head gated norm (8192 tokens x 32 value heads
    x 128, norm then gate, silu; Kimi-Linear's sigmoid / fp32-weight form at the same shape), and the Mamba-2
    mixer norm (gate then norm) of Nemotron-H-8B (8192 tokens x 8192, 8 groups of 1024) and of Mamba2-2.7B
    (8192 tokens x 5120, one group: a 5120-wide row in an 8192 block)."""
    tokens, heads, head_dim = 8192, 32, 128
    wide, nemotron_group, mamba2 = 8192, 1024, 5120
    return [
        _audit_forward("rms_norm_gated_forward_qwen3_next", tokens * heads, head_dim, head_dim, norm_before_gate=True),
        _audit_backward(
            "rms_norm_gated_backward_qwen3_next", tokens * heads, head_dim, head_dim, norm_before_gate=True
        ),
        _audit_backward(
            "rms_norm_gated_backward_qwen3_next_frozen_weight",
            tokens * heads,
            head_dim,
            head_dim,
            norm_before_gate=True,
            compute_dw=False,
        ),
        _audit_forward(
            "rms_norm_gated_forward_kimi_sigmoid_fp32_weight",
            tokens * heads,
            head_dim,
            head_dim,
            norm_before_gate=True,
            sigmoid=True,
            weight_in_fp32=True,
        ),
        _audit_backward(
            "rms_norm_gated_backward_kimi_sigmoid",
            tokens * heads,
            head_dim,
            head_dim,
            norm_before_gate=True,
            sigmoid=True,
        ),
        _audit_forward(
            "rms_norm_gated_forward_nemotron_h_grouped", tokens, wide, nemotron_group, norm_before_gate=False
        ),
        _audit_backward(
            "rms_norm_gated_backward_nemotron_h_grouped", tokens, wide, nemotron_group, norm_before_gate=False
        ),
        _audit_forward(
            "rms_norm_gated_forward_gate_first_fp32_weight",
            tokens,
            wide,
            nemotron_group,
            norm_before_gate=False,
            weight_in_fp32=True,
        ),
        _audit_forward("rms_norm_gated_forward_mamba2_2_7b", tokens, mamba2, mamba2, norm_before_gate=False),
        _audit_backward("rms_norm_gated_backward_mamba2_2_7b", tokens, mamba2, mamba2, norm_before_gate=False),
    ]
