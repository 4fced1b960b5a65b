"""RMSNorm with a hand-derived backward that returns gradients for the input and the weight.

Forward, for a row ``x`` of length ``H`` (computed in fp32, or float64 for float64 inputs)::

    rstd = 1 / sqrt(mean(x_i^2) + eps)          one scalar per row
    n_i  = x_i * rstd                            the normalised row
    y_i  = (offset + w_i) * n_i

Where the result is rounded follows transformers exactly, because the two families differ:

- ``offset == 0`` is ``LlamaRMSNorm`` (also Mistral, Qwen2/3, Phi-3, ...): ``n`` is rounded to x's dtype
  *before* the multiplication by the weight, and the result dtype is the type promotion of x's and the
  weight's dtypes (bf16 x with an fp32 weight gives an fp32 result).
- any other offset is ``GemmaRMSNorm`` (``offset=1.0``): ``n * (offset + w.float())`` is computed in fp32
  and rounded to x's dtype once, at the end; the result dtype is always x's.

Float64 inputs are computed in float64 (transformers computes them in fp32), so the reference is its own
exact oracle.

Backward. With ``g_i = dL/dn_i = dy_i * (offset + w_i)`` and ``d rstd / d x_j = -rstd^3 x_j / H``::

    dL/dx_j = g_j * rstd + sum_i g_i x_i * (-rstd^3 x_j / H)
            = rstd * (g_j - n_j * mean_i(g_i * n_i))
    dL/dw_i = sum over rows of dy_i * n_i

The rounding of ``n`` in the Llama form is a cast, whose derivative autograd takes as the identity; the
backward uses the unrounded fp32 ``n`` (the exact derivative of the formula). ``dw`` is accumulated per
program in fp32 over a contiguous range of rows and the partial sums are added in a second, deterministic
step (no atomics). A frozen weight (``requires_grad=False``) skips that work and its buffer entirely.

Saved for backward: the input ``x`` (alive anyway: it is the residual stream), the weight (a parameter),
and one inverse rms per row in fp32 (float64 for float64 inputs). Never the normalised output: the
backward recomputes ``n = x * rstd`` on the fly, which costs one multiply per element.
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import torch
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase, Ptr

# dtypes the Triton kernels take (for x and for the weight); anything else (float64) runs the torch path.
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# The kernels hold a whole row (or a tile of rows) in registers. Past this width the registers spill, so
# wider rows (no transformer in use has one) run the torch path, which is correct at any width.
_MAX_FUSED_COLS = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Plain differentiable PyTorch RMSNorm: the semantics :func:`rms_norm` implements (see module docstring).

    For fp32/bf16/fp16 inputs it performs the same operations, in the same dtypes, as transformers'
    ``LlamaRMSNorm`` (``offset == 0``) and ``GemmaRMSNorm`` (``offset == 1``).
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.to(compute))).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels. Each program owns a tile of ROWS rows x BLOCK_SIZE columns (BLOCK_SIZE = the row width rounded
# up to a power of two, so a row is one masked, vectorised load). Wide rows use ROWS = 1; narrow rows (e.g. the
# 128-wide q/k norms of Qwen3 and Gemma 3) pack several rows per program so each program still moves a few KB.
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_forward_kernel(
    y_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    y_row_stride,
    x_row_stride,
    n_rows,
    n_cols,
    eps,
    offset,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
):
    # Memory traffic: read x and w once, write y and one fp32 rstd per row. Everything else is in registers.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_SIZE)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    # Promote the row index to int64 before multiplying by the stride: rows * stride overflows int32 once a
    # tensor holds 2^31 elements (e.g. 262144 rows of 8192).
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)

    # Masked columns load as 0 and add nothing to the sum of squares; divide by the true width.
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = x * rstd[:, None]
    if CAST_BEFORE_WEIGHT:
        # Llama: round the normalised row to x's dtype, then multiply by the weight. The product of two
        # 16-bit floats is exact in fp32, so rounding it once to y's dtype equals PyTorch's result.
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    else:
        # Gemma: multiply by (offset + w) in fp32 and round to y's (= x's) dtype once.
        y = normed * (offset + w)[None, :]
    tl.store(y_ptr + rows64[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_backward_kernel(
    dx_ptr,
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dw_partial_ptr,
    dx_row_stride,
    dy_row_stride,
    x_row_stride,
    n_rows,
    n_cols,
    offset,
    tiles_per_program,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    # Program p walks tiles [p * tiles_per_program, (p + 1) * tiles_per_program) of ROWS rows each.
    #   n    = x * rstd                         (recomputed, never saved)
    #   g    = dy * (offset + w)                (gradient reaching the normalised row)
    #   dx   = rstd * (g - n * mean(g * n))     (one row reduction)
    #   dw  += dy * n                           (fp32 registers; summed over rows and written once at the end)
    # Memory traffic: read x, dy, rstd, write dx; plus one fp32 row of partial dw per program, which the host
    # adds up across programs. w is re-read for every tile: after the first tile it comes from L1/L2, and not
    # holding it across the loop frees registers (108 -> ~75 per thread at H=4096; at H=16384, where 32 warps
    # cap a thread at 64 registers, spills fall from ~100-130 bytes to 0 on sm80 and 8 on sm90).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    # Accumulate dw elementwise over the tile and reduce across its rows once at the end: a per-iteration
    # reduction over rows would move the result through shared memory (a layout change) on every tile.
    dw_acc = tl.zeros([ROWS, BLOCK_SIZE], dtype=tl.float32)

    for i in range(tiles_per_program):
        rows = (pid * tiles_per_program + i) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        # int64 before the stride multiply: int32 overflows past 2^31 elements.
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]
        # dw first, so dy dies as soon as g is formed (fewer fp32 rows live at once).
        if COMPUTE_DW:
            # Rows past the end loaded dy = 0 and add nothing.
            dw_acc += dy * normed
        if COMPUTE_DX:
            w = offset + tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            g = dy * w[None, :]
            mean_gn = tl.sum(g * normed, axis=1) / n_cols
            dx = (g - normed * mean_gn[:, None]) * rstd[:, None]
            tl.store(
                dx_ptr + rows64[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
            )

    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------------------------
# Launch heuristics and host launchers.
# --------------------------------------------------------------------------------------------------------------

# A program's tile holds about this many elements: one 4096-wide row, or 32 rows of 128.
_TILE_ELEMENTS = 4096
_MAX_ROWS_PER_PROGRAM = 64
# Elements of the tile each thread holds: 16 bf16 values = two 128-bit loads per tensor per thread.
_ELEMENTS_PER_THREAD = 16


def _launch_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_SIZE, ROWS per tile, num_warps) for rows of ``n_cols`` elements; used by both kernels.

    H=4096 -> (4096, 1, 8); H=8192 -> (8192, 1, 16); H=16384 -> (16384, 1, 32); H=128 -> (128, 32, 8).
    """
    block = triton.next_power_of_2(n_cols)
    rows = max(1, min(_MAX_ROWS_PER_PROGRAM, _TILE_ELEMENTS // block))
    num_warps = max(1, min(32, block * rows // (32 * _ELEMENTS_PER_THREAD)))
    return block, rows, num_warps


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another; a few keep the partial-dw path exercised


def _backward_grid(n_rows: int, rows_per_tile: int, num_warps: int, sm_count: int) -> tuple[int, int]:
    """(number of programs, tiles per program) for the backward kernel.

    Enough programs for a couple of resident CTAs per SM (a serial row loop hides its load latency through
    other CTAs), but few enough that the fp32 partial-dw buffer (programs x H) stays a few percent of the
    bytes the kernel moves anyway: 2 CTAs/SM at 8 warps, 1 at 16 or more.
    """
    n_tiles = triton.cdiv(n_rows, rows_per_tile)
    programs = min(n_tiles, sm_count * max(1, 16 // num_warps))
    tiles_per_program = triton.cdiv(n_tiles, programs)
    return triton.cdiv(n_tiles, tiles_per_program), tiles_per_program


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A 2-D (rows, n_cols) view of ``t`` whose last dim is contiguous, copying only when no such view exists.

    A strided slice (e.g. ``h[..., :H]`` of a wider buffer) keeps its row stride and is not copied.
    """
    if t.stride(-1) == 1 or n_cols == 1:
        try:
            return t.view(-1, n_cols)
        except RuntimeError:  # the leading dims do not collapse into one stride
            pass
    return t.contiguous().view(-1, n_cols)


def _rms_norm_forward_triton(
    x2: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    block, rows, num_warps = _launch_config(n_cols)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    _rms_norm_forward_kernel[(triton.cdiv(n_rows, rows),)](
        y,
        x2,
        weight.contiguous(),  # the kernel indexes the weight by column; a no-op for a parameter
        rstd,
        y.stride(0),
        x2.stride(0),
        n_rows,
        n_cols,
        float(eps),
        float(offset),
        BLOCK_SIZE=block,
        ROWS=rows,
        CAST_BEFORE_WEIGHT=offset == 0,
        num_warps=num_warps,
    )
    return y, rstd


def _rms_norm_backward_triton(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dx: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    n_rows, n_cols = x2.shape
    block, rows, num_warps = _launch_config(n_cols)
    programs, tiles_per_program = _backward_grid(n_rows, rows, num_warps, _multiprocessor_count(x2.device))
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device) if compute_dx else None
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if compute_dw else None
    # Unused outputs get a placeholder pointer; their stores are compiled away by the constexpr flags.
    _rms_norm_backward_kernel[(programs,)](
        dx if compute_dx else x2,
        dy2,
        x2,
        weight.contiguous(),
        rstd,
        partial if compute_dw else rstd,
        dx.stride(0) if compute_dx else 0,
        dy2.stride(0),
        x2.stride(0),
        n_rows,
        n_cols,
        float(offset),
        tiles_per_program,
        BLOCK_SIZE=block,
        ROWS=rows,
        COMPUTE_DX=compute_dx,
        COMPUTE_DW=compute_dw,
        num_warps=num_warps,
    )
    # Second step of the dw reduction: a fixed-order sum over programs (deterministic).
    dw = partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


def _rms_norm_forward_torch(
    x2: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    compute = torch.promote_types(x2.dtype, torch.float32)
    xf = x2.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    normed = xf * rstd[:, None]
    if offset == 0:
        y = weight * normed.to(x2.dtype)
    else:
        y = normed * (offset + weight.to(compute))
    return y.to(out_dtype), rstd


def _rms_norm_backward_torch(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dx: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    compute = rstd.dtype
    normed = x2.to(compute) * rstd[:, None]
    dyf = dy2.to(compute)
    dx = dw = None
    if compute_dx:
        g = dyf * (offset + weight.to(compute))
        dx = ((g - normed * (g * normed).mean(-1, keepdim=True)) * rstd[:, None]).to(x2.dtype)
    if compute_dw:
        dw = (dyf * normed).sum(0).to(weight.dtype)
    return dx, dw


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    # Llama multiplies weight * normed.to(x.dtype): type promotion. Gemma casts back to x's dtype.
    return torch.promote_types(x.dtype, weight.dtype) if offset == 0 else x.dtype


def _runs_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        use_triton(x)
        and x.numel() > 0
        and x.dtype in _TRITON_DTYPES
        and weight.dtype in _TRITON_DTYPES
        and x.shape[-1] <= _MAX_FUSED_COLS
    )


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: picks the Triton or torch implementation, saves x, weight and the per-row rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        n_cols = x.shape[-1]
        triton_path = _runs_triton(x, weight)
        forward = _rms_norm_forward_triton if triton_path else _rms_norm_forward_torch
        x2 = _as_rows(x, n_cols) if triton_path else x.reshape(-1, n_cols)
        y, rstd = forward(x2, weight, eps, offset, _output_dtype(x, weight, offset))
        # Save the caller's x (not a contiguous copy, which would be a second live tensor).
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        ctx.triton_path = triton_path
        return y  # 2-D; the caller reshapes it outside the Function (a view made here could not be changed in place)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        compute_dx, compute_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_cols = x.shape[-1]
        if ctx.triton_path:
            dx, dw = _rms_norm_backward_triton(
                _as_rows(dy, n_cols), _as_rows(x, n_cols), weight, rstd, ctx.offset, compute_dx, compute_dw
            )
        else:
            dx, dw = _rms_norm_backward_torch(
                dy.reshape(-1, n_cols), x.reshape(-1, n_cols), weight, rstd, ctx.offset, compute_dx, compute_dw
            )
        return (dx.view(x.shape) if dx is not None else None), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim: ``x * rsqrt(mean(x**2, -1) + eps) * (offset + weight)``.

    ``x`` has shape ``(..., H)`` and ``weight`` shape ``(H,)``. ``offset=0`` reproduces transformers'
    ``LlamaRMSNorm`` (normalised value rounded to x's dtype before the weight multiply; result dtype promoted
    with the weight's), any other offset ``GemmaRMSNorm`` (``offset=1``: weight applied in fp32, result in x's
    dtype). Gradients flow to ``x`` and to ``weight`` (skipped when it does not require grad); autograd keeps
    only ``x``, ``weight`` and one fp32 inverse rms per row. CUDA tensors run fused Triton kernels; other
    devices, float64 and rows wider than 65536 run a torch path with the same hand-written backward.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"rms_norm expects tensors for x and weight, got {type(x).__name__} and {type(weight).__name__}"
        )
    for name, t in (("x", x), ("weight", weight)):
        if not t.is_floating_point():
            raise TypeError(
                f"rms_norm: {name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                f"got {t.dtype}; convert it with .float() or .to(torch.bfloat16)"
            )
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have at least one dimension (..., H), got a 0-d tensor")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(
            f"rms_norm: weight must have shape (H,) = ({x.shape[-1]},) to match the last dim of x "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}; move both to one device")
    for name, value, hint in (("eps", eps, "typically 1e-6 or 1e-5"), ("offset", offset, "0.0 Llama, 1.0 Gemma")):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"rms_norm: {name} must be a Python number ({hint}), got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"rms_norm: {name} must be finite ({hint}), got {value!r}")
    if eps < 0:
        raise ValueError(f"rms_norm: eps must be >= 0 (typically 1e-6 or 1e-5), got {eps!r}")
    return RMSNormFunction.apply(x, weight, float(eps), float(offset)).view(x.shape)


# --------------------------------------------------------------------------------------------------------------
# Compile audit.
# --------------------------------------------------------------------------------------------------------------

_AUDIT_SM_COUNT = 132  # H100 / H200: sets the backward grid and so the partial-dw bytes in the bytes model


def _audit_forward(name: str, n_rows: int, n_cols: int, dtype: str = "bf16", offset: float = 0.0) -> AuditCase:
    block, rows, num_warps = _launch_config(n_cols)
    size = 2 if dtype in ("bf16", "fp16") else 4
    return AuditCase(
        name=name,
        kernel=_rms_norm_forward_kernel,
        args={
            "y_ptr": Ptr(dtype),
            "x_ptr": Ptr(dtype),
            "w_ptr": Ptr(dtype),
            "rstd_ptr": Ptr("fp32"),
            "y_row_stride": n_cols,
            "x_row_stride": n_cols,
            "n_rows": n_rows,
            "n_cols": n_cols,
            "eps": 1e-6,
            "offset": offset,
            "BLOCK_SIZE": block,
            "ROWS": rows,
            "CAST_BEFORE_WEIGHT": offset == 0,
        },
        constexprs={"BLOCK_SIZE": block, "ROWS": rows, "CAST_BEFORE_WEIGHT": offset == 0},
        num_warps=num_warps,
        shape=f"x ({n_rows}, {n_cols}) {dtype}, offset {offset}",
        # read x and w, write y and the fp32 rstd
        min_bytes=2 * n_rows * n_cols * size + n_cols * size + 4 * n_rows,
    )


def _audit_backward(name: str, n_rows: int, n_cols: int, dtype: str = "bf16", compute_dw: bool = True) -> AuditCase:
    block, rows, num_warps = _launch_config(n_cols)
    programs, tiles_per_program = _backward_grid(n_rows, rows, num_warps, _AUDIT_SM_COUNT)
    size = 2 if dtype in ("bf16", "fp16") else 4
    flags = {"BLOCK_SIZE": block, "ROWS": rows, "COMPUTE_DX": True, "COMPUTE_DW": compute_dw}
    return AuditCase(
        name=name,
        kernel=_rms_norm_backward_kernel,
        args={
            "dx_ptr": Ptr(dtype),
            "dy_ptr": Ptr(dtype),
            "x_ptr": Ptr(dtype),
            "w_ptr": Ptr(dtype),
            "rstd_ptr": Ptr("fp32"),
            "dw_partial_ptr": Ptr("fp32"),
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
        shape=f"x ({n_rows}, {n_cols}) {dtype}, {programs} programs, dw {'on' if compute_dw else 'off'}",
        # read x, dy, rstd and w (from DRAM once; the re-reads per tile hit cache); write dx and the dw partials
        min_bytes=3 * n_rows * n_cols * size
        + 4 * n_rows
        + n_cols * size
        + (4 * programs * n_cols if compute_dw else 0),
    )


def audit_cases() -> list[AuditCase]:
    """Forward and backward at the audit shapes: Llama-3-8B hidden (8192 x 4096 bf16), a 70B-wide row
    (8192 x 8192), and the per-head q/k norm of Qwen3 / Gemma 3 (8192 tokens x 32 heads x 128)."""
    tokens, hidden, wide, head_dim, heads = 8192, 4096, 8192, 128, 32
    return [
        _audit_forward("rms_norm_forward_llama3_8b", tokens, hidden),
        _audit_backward("rms_norm_backward_llama3_8b", tokens, hidden),
        _audit_backward("rms_norm_backward_llama3_8b_frozen_weight", tokens, hidden, compute_dw=False),
        _audit_forward("rms_norm_forward_gemma_offset1", tokens, hidden, offset=1.0),
        _audit_forward("rms_norm_forward_h8192", tokens, wide),
        _audit_backward("rms_norm_backward_h8192", tokens, wide),
        _audit_forward("rms_norm_forward_qk_norm_128", tokens * heads, head_dim),
        _audit_backward("rms_norm_backward_qk_norm_128", tokens * heads, head_dim),
    ]
