"""LayerNorm with a hand-derived backward that returns gradients for the input, the weight and the bias.

Forward, for a row ``x`` of length ``H`` (computed in fp32, or float64 for float64 inputs)::

    mean = mean_i(x_i)                             one scalar per row
    rstd = 1 / sqrt(mean_i((x_i - mean)^2) + eps)  one scalar per row (biased variance, as torch)
    n_i  = (x_i - mean) * rstd                     the normalised row
    y_i  = (offset + w_i) * n_i + b_i              w_i = 1 without a weight, b_i = 0 without a bias

This is ``torch.nn.functional.layer_norm`` over the last dim. Which transformers module is which call:

- ``nn.LayerNorm`` (GPT-2, GPT-J, GPT-NeoX, GPT-BigCode/StarCoder, StarCoder2, Phi-1/1.5/2 and their q/k
  layernorms, Persimmon, StableLM, Falcon, BLOOM, MPT, OPT, CodeGen, BioGPT, XGLM):
  ``layer_norm(x, m.weight, m.bias, m.eps)``; ``weight`` is None for ``elementwise_affine=False`` (OPT's
  ``layer_norm_elementwise_affine=False``), ``bias`` is None for ``bias=False`` (StarCoder2's
  ``use_bias=False``, StableLM's per-head q/k norms, which take one call per head with that head's weight).
- ``CohereLayerNorm`` (also Cohere2, Cohere2-MoE, CohereCompass): ``layer_norm(x, m.weight, None,
  m.variance_epsilon)``, for the 1-D weight of the hidden-state norms. Their q/k norms hold a 2-D
  ``(heads, head_dim)`` weight, one row per head; this function takes a weight of shape ``(H,)`` only.
- ``OlmoLayerNorm``: ``layer_norm(x, None, None, 1e-5)`` (no parameters; its forward hard-codes eps 1e-5).
- ``NemotronLayerNorm1P``: ``layer_norm(x, m.weight, m.bias, m.eps, offset=1.0)``.

Where the result is rounded. Every one of these computes the mean, the variance, ``n``, the weight multiply
and the bias add in fp32 and rounds once, to x's dtype, at the end: ``OlmoLayerNorm`` and ``CohereLayerNorm``
by casting x to fp32 and the result back; ``nn.LayerNorm`` because torch's native kernel accumulates 16-bit
inputs in fp32 (its "opmath" type) and writes its result in x's dtype. So does this function: the result
dtype is always x's (bf16 x with an fp32 weight gives bf16, as ``F.layer_norm`` and Cohere do), whatever the
weight's and bias' dtypes. One rounding happens earlier: Nemotron forms ``self.weight + 1.0`` as a tensor op
in the *weight's* dtype, so ``offset + w`` is rounded to the weight's dtype before it multiplies ``n`` (a
bf16 weight near 0 becomes a bf16 value near 1, losing its low bits exactly as in transformers).
Float64 inputs are computed in float64 (Olmo and Cohere would round them through fp32), so the reference is
its own exact oracle.

Backward. With ``g_i = dL/dn_i = dy_i * (offset + w_i)`` and, from the two row statistics,
``d n_i / d x_j = rstd * (delta_ij - 1/H - n_i n_j / H)`` (the ``-1/H`` from the mean, the ``n_i n_j / H``
from ``d rstd / d x_j = -rstd^3 (x_j - mean) / H``, the mean's own term there summing to zero)::

    dL/dx_j = sum_i g_i * rstd * (delta_ij - 1/H - n_i n_j / H)
            = rstd * (g_j - mean_i(g_i) - n_j * mean_i(g_i * n_i))
    dL/dw_i = sum over rows of dy_i * n_i        (d(offset + w)/dw = 1; the rounding of offset + w is a
                                                  cast, whose derivative autograd takes as the identity)
    dL/db_i = sum over rows of dy_i

``dw`` and ``db`` are accumulated per program in fp32 over a contiguous range of rows and the partial sums
are added in a second, deterministic step (no atomics). A weight or bias that does not require grad skips
its accumulator and its buffer entirely (LoRA freezes both).

Saved for backward: the input ``x`` (alive anyway: it is the residual stream), the weight (a parameter; not
the bias, which the backward never reads) and two fp32 scalars per row, the mean and the inverse std
(float64 for float64 inputs). Never the normalised output: the backward recomputes ``n = (x - mean) * rstd``
on the fly, one subtract and one multiply per element.

Not handled here: ``torch.autocast``. Under autocast ``nn.LayerNorm`` runs in fp32 and returns fp32
(``layer_norm`` is on autocast's fp32 list); this function does not consult autocast, so a caller that
patches a model run under autocast must cast x to fp32 itself to get the same result dtype.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase, Ptr

# LayerNorm tiles rows exactly as RMSNorm does (one row, or a tile of narrow rows, per program; the same
# backward grid of partial weight-gradient rows); one copy of those heuristics serves both kernels.
from fastft.kernels.rms_norm import (
    _MAX_FUSED_COLS,
    _TRITON_DTYPES,
    _as_rows,
    _backward_grid,
    _launch_config,
    _multiprocessor_count,
)

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _offset_weight(weight: torch.Tensor | None, offset: float) -> torch.Tensor | None:
    # NemotronLayerNorm1P's ``self.weight + 1.0``: a tensor op, so the sum is rounded to the weight's dtype.
    return weight + offset if weight is not None and offset != 0 else weight


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    offset: float = 0.0,
) -> torch.Tensor:
    """Plain differentiable PyTorch LayerNorm: the semantics :func:`layer_norm` implements (module docstring).

    ``torch.nn.functional.layer_norm`` on x's dtype when the parameters share it (what ``nn.LayerNorm`` runs);
    with mixed dtypes, which ``F.layer_norm`` rejects, on x and parameters cast to fp32 (Olmo's and Cohere's
    way), the result cast back to x's dtype. Both compute in fp32 and round once.
    """
    weight = _offset_weight(weight, offset)
    shape = (x.shape[-1],)
    if all(p is None or p.dtype == x.dtype for p in (weight, bias)):
        return F.layer_norm(x, shape, weight, bias, eps)
    compute = torch.promote_types(x.dtype, torch.float32)
    weight, bias = (None if p is None else p.to(compute) for p in (weight, bias))
    return F.layer_norm(x.to(compute), shape, weight, bias, eps).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels. Each program owns a tile of ROWS rows x BLOCK_SIZE columns (BLOCK_SIZE = the row width rounded
# up to a power of two, so a row is one masked, vectorised load); see rms_norm's _launch_config.
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_forward_kernel(
    y_ptr,
    x_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    y_row_stride,
    x_row_stride,
    n_rows,
    n_cols,
    eps,
    offset,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # Memory traffic: read x, w and b once, write y and two fp32 scalars (mean, rstd) per row. The row stays in
    # registers between the two reductions, so the variance is the exact two-pass mean((x - mean)^2).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_SIZE)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    # Promote the row index to int64 before multiplying by the stride: rows * stride overflows int32 once a
    # tensor holds 2^31 elements (e.g. 262144 rows of 8192).
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # Masked columns load as 0: they add nothing to the sum; divide by the true width.
    mean = tl.sum(x, axis=1) / n_cols
    # ... but x - mean is not 0 there: zero it before it enters the variance.
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        # offset + w rounded to the weight's dtype, as Nemotron's `weight + 1.0` (a no-op for offset 0).
        w = (offset + w).to(w_ptr.dtype.element_ty).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # One rounding, to y's (= x's) dtype, at the end.
    tl.store(y_ptr + rows64[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_backward_kernel(
    dx_ptr,
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dw_partial_ptr,
    db_partial_ptr,
    dx_row_stride,
    dy_row_stride,
    x_row_stride,
    n_rows,
    n_cols,
    offset,
    tiles_per_program,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
):
    # Program p walks tiles [p * tiles_per_program, (p + 1) * tiles_per_program) of ROWS rows each.
    #   n    = (x - mean) * rstd                          (recomputed, never saved)
    #   g    = dy * (offset + w)                          (gradient reaching the normalised row; dy without w)
    #   dx   = rstd * (g - mean(g) - n * mean(g * n))     (two row reductions)
    #   dw  += dy * n,  db += dy                          (fp32 registers; summed over rows, written once)
    # Memory traffic: read x, dy, mean, rstd, write dx; plus one fp32 row each of partial dw and db per
    # program, which the host adds up across programs. w is re-read for every tile (from L1/L2 after the
    # first), not held across the loop: registers, as in rms_norm's backward.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    # Elementwise accumulators, reduced across their rows once at the end (a per-tile reduction over rows
    # would move the result through shared memory on every tile).
    dw_acc = tl.zeros([ROWS, BLOCK_SIZE], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_SIZE], dtype=tl.float32)

    for i in range(tiles_per_program):
        rows = (pid * tiles_per_program + i) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        # int64 before the stride multiply: int32 overflows past 2^31 elements.
        rows64 = rows.to(tl.int64)
        dy = tl.load(dy_ptr + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        # Masked columns give n = -mean * rstd, not 0; everything n meets there is multiplied by dy = 0.
        normed = (x - mean[:, None]) * rstd[:, None]
        # dw and db first, so dy dies as soon as g is formed. Rows past the end loaded dy = 0: they add nothing.
        if COMPUTE_DW:
            dw_acc += dy * normed
        if COMPUTE_DB:
            db_acc += dy
        if COMPUTE_DX:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                w = (offset + w).to(w_ptr.dtype.element_ty).to(tl.float32)  # the forward's rounded offset + w
                g = dy * w[None, :]
            else:
                g = dy
            mean_g = tl.sum(g, axis=1) / n_cols
            mean_gn = tl.sum(g * normed, axis=1) / n_cols
            dx = (g - mean_g[:, None] - normed * mean_gn[:, None]) * rstd[:, None]
            tl.store(
                dx_ptr + rows64[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
            )

    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(db_partial_ptr + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------------------------
# Host launchers (Triton) and the torch path (same math, for devices without Triton and for float64).
# --------------------------------------------------------------------------------------------------------------


def _layer_norm_forward_triton(
    x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    block, rows, num_warps = _launch_config(n_cols)
    y = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    # A missing weight or bias gets a placeholder pointer; its load is compiled away by the constexpr flag.
    _layer_norm_forward_kernel[(triton.cdiv(n_rows, rows),)](
        y,
        x2,
        weight.contiguous() if weight is not None else x2,  # indexed by column; a no-op for a parameter
        bias.contiguous() if bias is not None else x2,
        mean,
        rstd,
        y.stride(0),
        x2.stride(0),
        n_rows,
        n_cols,
        float(eps),
        float(offset),
        BLOCK_SIZE=block,
        ROWS=rows,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        num_warps=num_warps,
    )
    return y, mean, rstd


def _layer_norm_backward_triton(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dx: bool,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dw in fp32, db in fp32); the caller casts dw and db to the parameters' dtypes."""
    n_rows, n_cols = x2.shape
    block, rows, num_warps = _launch_config(n_cols)
    programs, tiles_per_program = _backward_grid(n_rows, rows, num_warps, _multiprocessor_count(x2.device))
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device) if compute_dx else None
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if compute_dw else None
    db_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if compute_db else None
    # Unused outputs get a placeholder pointer; their stores are compiled away by the constexpr flags.
    _layer_norm_backward_kernel[(programs,)](
        dx if compute_dx else x2,
        dy2,
        x2,
        weight.contiguous() if weight is not None else x2,
        mean,
        rstd,
        dw_partial if compute_dw else rstd,
        db_partial if compute_db else rstd,
        dx.stride(0) if compute_dx else 0,
        dy2.stride(0),
        x2.stride(0),
        n_rows,
        n_cols,
        float(offset),
        tiles_per_program,
        BLOCK_SIZE=block,
        ROWS=rows,
        HAS_WEIGHT=weight is not None,
        COMPUTE_DX=compute_dx,
        COMPUTE_DW=compute_dw,
        COMPUTE_DB=compute_db,
        num_warps=num_warps,
    )
    # Second step of the dw / db reductions: a fixed-order sum over programs (deterministic).
    dw = dw_partial.sum(0) if compute_dw else None
    db = db_partial.sum(0) if compute_db else None
    return dx, dw, db


def _layer_norm_forward_torch(
    x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    compute = torch.promote_types(x2.dtype, torch.float32)
    xf = x2.to(compute)
    mean = xf.mean(-1)
    centred = xf - mean[:, None]
    rstd = torch.rsqrt(centred.pow(2).mean(-1) + eps)
    y = centred * rstd[:, None]
    if weight is not None:
        y = y * _offset_weight(weight, offset).to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x2.dtype), mean, rstd


def _layer_norm_backward_torch(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dx: bool,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    compute = rstd.dtype
    dyf = dy2.to(compute)
    normed = (x2.to(compute) - mean[:, None]) * rstd[:, None] if compute_dx or compute_dw else None
    dx = dw = db = None
    if compute_dx:
        g = dyf * _offset_weight(weight, offset).to(compute) if weight is not None else dyf
        centred_g = g - g.mean(-1, keepdim=True) - normed * (g * normed).mean(-1, keepdim=True)
        dx = (centred_g * rstd[:, None]).to(x2.dtype)
    if compute_dw:
        dw = (dyf * normed).sum(0)
    if compute_db:
        db = dyf.sum(0)
    return dx, dw, db


def _runs_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    return (
        use_triton(x)
        and x.numel() > 0
        and x.dtype in _TRITON_DTYPES
        and all(p is None or p.dtype in _TRITON_DTYPES for p in (weight, bias))
        and x.shape[-1] <= _MAX_FUSED_COLS
    )


class LayerNormFunction(torch.autograd.Function):
    """Autograd wrapper: picks the Triton or torch implementation, saves x, the weight, and per row mean and rstd."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        offset: float,
    ) -> torch.Tensor:
        n_cols = x.shape[-1]
        triton_path = _runs_triton(x, weight, bias)
        forward = _layer_norm_forward_triton if triton_path else _layer_norm_forward_torch
        x2 = _as_rows(x, n_cols) if triton_path else x.reshape(-1, n_cols)
        y, mean, rstd = forward(x2, weight, bias, eps, offset)
        # Save the caller's x (not a contiguous copy, which would be a second live tensor); not the bias.
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.offset = offset
        ctx.triton_path = triton_path
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y  # 2-D; the caller reshapes it outside the Function (a view made here could not be changed in place)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        compute_dx, compute_dw, compute_db = ctx.needs_input_grad[:3]
        n_cols = x.shape[-1]
        if ctx.triton_path:
            rows = (_as_rows(dy, n_cols), _as_rows(x, n_cols))
            backward = _layer_norm_backward_triton
        else:
            rows = (dy.reshape(-1, n_cols), x.reshape(-1, n_cols))
            backward = _layer_norm_backward_torch
        dx, dw, db = backward(*rows, weight, mean, rstd, ctx.offset, compute_dx, compute_dw, compute_db)
        return (
            dx.view(x.shape) if dx is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(ctx.bias_dtype) if db is not None else None,
            None,
            None,
        )


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    offset: float = 0.0,
) -> torch.Tensor:
    """LayerNorm over the last dim: ``(x - mean) / sqrt(var + eps) * (offset + weight) + bias``, as
    ``torch.nn.functional.layer_norm(x, (H,), weight, bias, eps)``.

    ``x`` has shape ``(..., H)``; ``weight`` and ``bias`` shape ``(H,)`` or None (``nn.LayerNorm`` with
    ``elementwise_affine=False`` / ``bias=False``, Cohere's bias-free norm, Olmo's parameter-free one).
    ``offset=1.0`` is Nemotron's ``NemotronLayerNorm1P`` (``offset + weight`` rounded to the weight's dtype, as
    there). Computed in fp32 and rounded once to x's dtype, the result dtype (see the module docstring for
    which transformers module maps to which arguments). Gradients flow to ``x``, ``weight`` and ``bias``
    (each skipped when it does not require grad); autograd keeps only ``x``, ``weight`` and an fp32 mean and
    inverse std per row. CUDA tensors run fused Triton kernels; other devices, float64 and rows wider than
    65536 run a torch path with the same hand-written backward.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm expects a tensor for x, got {type(x).__name__}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"layer_norm: {name} must be a tensor of shape (H,) or None, got {type(t).__name__}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(
                f"layer_norm: {name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                f"got {t.dtype}; convert it with .float() or .to(torch.bfloat16)"
            )
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension (..., H), got a 0-d tensor")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (x.shape[-1],):
            raise ValueError(
                f"layer_norm: {name} must have shape (H,) = ({x.shape[-1]},) to match the last dim of x "
                f"{tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"layer_norm: x is on {x.device} but {name} is on {t.device}; move both to one device")
    for name, value, hint in (("eps", eps, "typically 1e-5"), ("offset", offset, "0.0, or 1.0 for Nemotron")):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(
                f"layer_norm: {name} must be a Python number ({hint}), got {type(value).__name__} {value!r}"
            )
        if not math.isfinite(value):
            raise ValueError(f"layer_norm: {name} must be finite ({hint}), got {value!r}")
    if eps < 0:
        raise ValueError(f"layer_norm: eps must be >= 0 (typically 1e-5), got {eps!r}")
    if offset != 0 and weight is None:
        raise ValueError(
            f"layer_norm: offset={offset!r} shifts the weight, but weight is None; pass the weight or offset=0.0"
        )
    return LayerNormFunction.apply(x, weight, bias, float(eps), float(offset)).view(x.shape)


# --------------------------------------------------------------------------------------------------------------
# Compile audit.
# --------------------------------------------------------------------------------------------------------------

_AUDIT_SM_COUNT = 132  # H100 / H200: sets the backward grid and so the partial dw/db bytes in the bytes model


def _audit_forward(
    name: str, n_rows: int, n_cols: int, dtype: str = "bf16", affine: bool = True, offset: float = 0.0
) -> AuditCase:
    block, rows, num_warps = _launch_config(n_cols)
    size = _BYTES[dtype]
    flags = {"BLOCK_SIZE": block, "ROWS": rows, "HAS_WEIGHT": affine, "HAS_BIAS": affine}
    return AuditCase(
        name=name,
        kernel=_layer_norm_forward_kernel,
        args={
            "y_ptr": Ptr(dtype),
            "x_ptr": Ptr(dtype),
            "w_ptr": Ptr(dtype),
            "b_ptr": Ptr(dtype),
            "mean_ptr": Ptr("fp32"),
            "rstd_ptr": Ptr("fp32"),
            "y_row_stride": n_cols,
            "x_row_stride": n_cols,
            "n_rows": n_rows,
            "n_cols": n_cols,
            "eps": 1e-5,
            "offset": offset,
            **flags,
        },
        constexprs=flags,
        num_warps=num_warps,
        shape=f"x ({n_rows}, {n_cols}) {dtype}, {'weight + bias' if affine else 'no parameters'}, offset {offset}",
        # read x (and w, b), write y and the fp32 mean and rstd
        min_bytes=2 * n_rows * n_cols * size + (2 * n_cols * size if affine else 0) + 8 * n_rows,
    )


def _audit_backward(
    name: str, n_rows: int, n_cols: int, dtype: str = "bf16", affine: bool = True, trainable: bool = True
) -> AuditCase:
    block, rows, num_warps = _launch_config(n_cols)
    programs, tiles_per_program = _backward_grid(n_rows, rows, num_warps, _AUDIT_SM_COUNT)
    size = _BYTES[dtype]
    grads = affine and trainable
    flags = {
        "BLOCK_SIZE": block,
        "ROWS": rows,
        "HAS_WEIGHT": affine,
        "COMPUTE_DX": True,
        "COMPUTE_DW": grads,
        "COMPUTE_DB": grads,
    }
    return AuditCase(
        name=name,
        kernel=_layer_norm_backward_kernel,
        args={
            "dx_ptr": Ptr(dtype),
            "dy_ptr": Ptr(dtype),
            "x_ptr": Ptr(dtype),
            "w_ptr": Ptr(dtype),
            "mean_ptr": Ptr("fp32"),
            "rstd_ptr": Ptr("fp32"),
            "dw_partial_ptr": Ptr("fp32"),
            "db_partial_ptr": Ptr("fp32"),
            "dx_row_stride": n_cols,
            "dy_row_stride": n_cols,
            "x_row_stride": n_cols,
            "n_rows": n_rows,
            "n_cols": n_cols,
            "offset": 0.0,
            "tiles_per_program": tiles_per_program,
            **flags,
        },
        constexprs=flags,
        num_warps=num_warps,
        shape=(
            f"x ({n_rows}, {n_cols}) {dtype}, {programs} programs, "
            + ("dw, db on" if grads else "frozen weight and bias" if affine else "no parameters")
        ),
        # read x, dy, mean, rstd and w (from DRAM once; the re-reads per tile hit cache); write dx and one fp32
        # row each of partial dw and db per program
        min_bytes=3 * n_rows * n_cols * size
        + 8 * n_rows
        + (n_cols * size if affine else 0)
        + (2 * 4 * programs * n_cols if grads else 0),
    )


def audit_cases() -> list[AuditCase]:
    """Forward and backward at the audit shapes: 8192 tokens of a 4096-wide row (OPT-6.7B, StableLM, the bench
    shape), Phi-2's 2560 (not a power of two: a 4096 block, 62% used), Falcon-40B's 8192, Olmo's parameter-free
    norm, the frozen weight and bias of LoRA, and Phi/Persimmon-style per-head q/k layernorms (32 x 64 per token)."""
    tokens, hidden, phi2, wide, head_dim, heads = 8192, 4096, 2560, 8192, 64, 32
    return [
        _audit_forward("layer_norm_forward_h4096", tokens, hidden),
        _audit_backward("layer_norm_backward_h4096", tokens, hidden),
        _audit_backward("layer_norm_backward_h4096_frozen", tokens, hidden, trainable=False),
        _audit_forward("layer_norm_forward_nemotron_offset1", tokens, hidden, offset=1.0),
        _audit_forward("layer_norm_forward_olmo_no_params", tokens, hidden, affine=False),
        _audit_backward("layer_norm_backward_olmo_no_params", tokens, hidden, affine=False),
        _audit_forward("layer_norm_forward_phi2_h2560", tokens, phi2),
        _audit_backward("layer_norm_backward_phi2_h2560", tokens, phi2),
        _audit_forward("layer_norm_forward_h8192", tokens, wide),
        _audit_backward("layer_norm_backward_h8192", tokens, wide),
        _audit_forward("layer_norm_forward_qk_norm_64", tokens * heads, head_dim),
        _audit_backward("layer_norm_backward_qk_norm_64", tokens * heads, head_dim),
    ]
