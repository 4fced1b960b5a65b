"""Multimodal rotary tables (M-RoPE): the cos/sin of Qwen2-VL / Qwen2.5-VL / Qwen3-VL's sectioned rotary embedding and
of their vision towers' 2-D rotary, computed from integer positions in one launch.

Forward. A rotary table of half-width ``H`` has, for each token ``n`` and column ``j < H``, one position axis
``a(j)`` (temporal / height / width in the language model; height / width in the vision tower) and one inverse
frequency ``f(j)``::

    angle[n, j] = fp32(pos[a(j), n]) * f(j)                     (one fp32 rounding each, as transformers)
    cos[n, j] = cos[n, j + H] = cos(angle[n, j]) * s             sin likewise; s = the attention scaling

The column map ``(a, f)`` holds every layout transformers uses:

- Qwen2-VL / 2.5-VL (``mrope_section = [t, h, w]``): ``a(j)`` is the section ``j`` falls in, ``f(j) = inv_freq[j]``;
- Qwen3-VL (interleaved): ``a(j) = 1`` for ``j % 3 == 1, j < 3 h``, ``2`` for ``j % 3 == 2, j < 3 w``, else ``0``;
- the vision towers (axial 2-D, ``H/2`` frequencies per image axis): ``a(j) = j // (H/2)``, ``f(j) = inv_freq[j % (H/2)]``.

fastft learns the map from the rotary module's own ``recomposition_frequencies`` run on an index tensor
(:mod:`fastft.models`), so no family's layout is written here. transformers computes the angles of all ``A`` axes
for every column, (A, N, H) fp32, their cos and sin, gathers the sections and concatenates twice: about
``(3 A + 4) N H`` fp32 temporaries per call. This kernel reads the ``A N`` positions once and writes the two tables.

Applying the tables to q and k is :func:`fastft.kernels.rope` (the rotation of M-RoPE *is* RoPE's
``apply_rotary_pos_emb`` on these tables, in transformers as here): same numerics, rope's kernel and its
hand-derived backward, no second rotation kernel. The vision towers' ``apply_rotary_pos_emb_vision`` (tokens-first
q/k, fp32) runs the same kernel through a transposed view (:mod:`fastft.models.rotary`).

Backward: none. Positions are integers and the inverse frequencies a buffer (transformers' tables never require
grad); the function refuses a frequency tensor that requires grad. Nothing is saved.

Rounding: the angle is computed exactly as transformers computes it (int -> fp32, one fp32 multiply); cos and sin
of it to a couple of fp32 ulp (reduction by pi/2 in float64, fp32 polynomials: ``_sincos``), times the scaling,
rounded once to the output dtype. transformers' libm cos/sin of the same angle agree to an ulp or two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase, Ptr

_MAX_AXES = 4
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def mrope_tables_reference(
    positions: torch.Tensor, axis: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The semantics in PyTorch (transformers' formula with the gather written out): ``positions`` (A, N) integers,
    ``axis`` (H,) integers in [0, A), ``inv_freq`` (H,) the frequency of each column; returns cos, sin (N, 2H)."""
    angle = positions[axis.long()].transpose(0, 1).to(inv_freq.dtype) * inv_freq  # (N, H)
    emb = torch.cat((angle, angle), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _sincos(angle):
    """(sin, cos) of fp32 ``angle``, a couple of fp32 ulp, with no local memory (libdevice's sinf/cosf keep a stack
    array for their large-argument reduction, which the compile audit sees as spills).

    Reduction in float64: ``angle = k pi/2 + r``, |r| <= pi/4 (fp32 angles are exact in float64; r is off by
    about 1e-16 |angle|, far below an fp32 ulp of the result for any position a model reaches). Then Cephes' fp32
    minimax polynomials on [-pi/4, pi/4] and the quadrant ``k mod 4`` picks and signs them."""
    x = angle.to(tl.float64)
    k = tl.floor(x * 0.6366197723675814 + 0.5)  # round(x * 2/pi)
    r = (x - k * 1.5707963267948966).to(tl.float32)
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    quadrant = k.to(tl.int64) & 3
    sin = tl.where(quadrant == 0, sin_r, tl.where(quadrant == 1, cos_r, tl.where(quadrant == 2, -sin_r, -cos_r)))
    cos = tl.where(quadrant == 0, cos_r, tl.where(quadrant == 1, -sin_r, tl.where(quadrant == 2, -cos_r, sin_r)))
    return sin, cos


@triton.jit
def _mrope_table_kernel(
    pos_ptr,
    axis_ptr,
    freq_ptr,
    cos_ptr,
    sin_ptr,
    n_rows,
    pos_stride_a,
    pos_stride_n,
    scale,
    HALF: tl.constexpr,
    N_AXES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Traffic: each program reads its BLOCK_N tokens' positions on every axis once (A coalesced loads of BLOCK_N
    # integers), the column map once (H int32 + H fp32, cached across programs), and writes BLOCK_N rows of both
    # tables (each value twice: columns j and j + H). The axis of each column is selected in registers.
    # Rows are int64 before they multiply a stride (N x 2H overflows int32 past 2^31 table elements).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < n_rows
    col_mask = cols < HALF
    axis = tl.load(axis_ptr + cols, mask=col_mask, other=0)
    freq = tl.load(freq_ptr + cols, mask=col_mask, other=0.0)
    pos = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for a in tl.static_range(N_AXES):
        p = tl.load(pos_ptr + a * pos_stride_a + rows * pos_stride_n, mask=row_mask, other=0).to(tl.float32)
        pos = tl.where((axis == a)[None, :], p[:, None], pos)
    angle = pos * freq[None, :]
    sin, cos = _sincos(angle)
    c = (cos * scale).to(cos_ptr.dtype.element_ty)
    s = (sin * scale).to(sin_ptr.dtype.element_ty)
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows[:, None] * (2 * HALF) + cols[None, :]
    tl.store(cos_ptr + offsets, c, mask=mask)
    tl.store(cos_ptr + offsets + HALF, c, mask=mask)
    tl.store(sin_ptr + offsets, s, mask=mask)
    tl.store(sin_ptr + offsets + HALF, s, mask=mask)


def _launch_config(half: int) -> dict[str, int]:
    """About 2048 half-table elements per program (BLOCK_N rows of the padded half-width), 8 per thread over 8 warps:
    4096 per program over 4 warps spills on sm90 (an int64 offset, the angle and both tables live per element)."""
    block_h = triton.next_power_of_2(half)
    return {"BLOCK_N": max(1, min(64, 2048 // block_h)), "BLOCK_H": block_h, "num_warps": 8}


def _mrope_triton(positions, axis, inv_freq, scale, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n_axes, n_rows = positions.shape
    half = axis.shape[0]
    cos = torch.empty((n_rows, 2 * half), dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    if n_rows == 0:
        return cos, sin
    config = _launch_config(half)
    grid = (triton.cdiv(n_rows, config["BLOCK_N"]),)
    _mrope_table_kernel[grid](
        positions,
        axis.to(torch.int32).contiguous(),
        inv_freq.to(torch.float32).contiguous(),
        cos,
        sin,
        n_rows,
        positions.stride(0),
        positions.stride(1),
        float(scale),
        HALF=half,
        N_AXES=n_axes,
        **config,
    )
    return cos, sin


def _check_inputs(positions, axis, inv_freq, dtype) -> None:
    for name, x in (("positions", positions), ("axis", axis), ("inv_freq", inv_freq)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"mrope_tables: {name} must be a torch.Tensor, got {type(x).__name__}")
    if positions.dim() != 2 or positions.is_floating_point() or positions.dtype == torch.bool:
        raise ValueError(
            f"mrope_tables: positions must be (axes, tokens) integers, got {tuple(positions.shape)} {positions.dtype}; "
            "flatten transformers' (3, batch, seq) position ids with .flatten(1)"
        )
    if not 1 <= positions.shape[0] <= _MAX_AXES:
        raise ValueError(f"mrope_tables: 1 to {_MAX_AXES} position axes are supported, got {positions.shape[0]}")
    if axis.dim() != 1 or axis.is_floating_point() or inv_freq.shape != axis.shape or not inv_freq.is_floating_point():
        raise ValueError(
            f"mrope_tables: axis (H,) integers and inv_freq (H,) floats describe the H table columns, got axis "
            f"{tuple(axis.shape)} {axis.dtype} and inv_freq {tuple(inv_freq.shape)} {inv_freq.dtype}"
        )
    if axis.numel() == 0:
        raise ValueError("mrope_tables: the table has no columns (axis and inv_freq are empty)")
    if int(axis.min()) < 0 or int(axis.max()) >= positions.shape[0]:
        raise ValueError(
            f"mrope_tables: axis values must index the {positions.shape[0]} position axes, got "
            f"{int(axis.min())}..{int(axis.max())}"
        )
    if len({positions.device, axis.device, inv_freq.device}) != 1:
        raise ValueError(
            f"mrope_tables: positions, axis and inv_freq must be on one device, got {positions.device}, "
            f"{axis.device}, {inv_freq.device}"
        )
    if inv_freq.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "mrope_tables: gradients with respect to inv_freq are not computed (rotary frequencies are a buffer); "
            "pass inv_freq.detach(), or use mrope_tables_reference"
        )
    if dtype not in (*_OUT_DTYPES, torch.float64):
        raise ValueError(f"mrope_tables: dtype must be float32, bfloat16, float16 or float64, got {dtype}")


def mrope_tables(
    positions: torch.Tensor,
    axis: torch.Tensor,
    inv_freq: torch.Tensor,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (N, 2H) of a multimodal rotary embedding from integer ``positions`` (A, N), the position
    axis ``axis[j]`` and inverse frequency ``inv_freq[j]`` of each of the H columns, and the attention ``scale``.

    Equals transformers' Qwen2-VL / 2.5-VL / 3-VL rotary embeddings (text and vision) given their column map (see
    the module docstring), to an ulp or two of fp32. CUDA tensors (or CPU under ``TRITON_INTERPRET=1``) run the
    Triton kernel, others :func:`mrope_tables_reference`; float64 always runs the reference. Not differentiable
    (nothing in it is trainable)."""
    _check_inputs(positions, axis, inv_freq, dtype)
    if dtype == torch.float64 or not use_triton(inv_freq):
        return mrope_tables_reference(positions, axis, inv_freq.to(torch.float64 if dtype == torch.float64 else
                                                                    torch.float32), scale, dtype)  # fmt: skip
    return _mrope_triton(positions, axis, inv_freq, scale, dtype)


# ----------------------------------------------------------------------------------------------------------
# Compile audit
# ----------------------------------------------------------------------------------------------------------


def audit_cases() -> list[AuditCase]:
    """The language model's tables at Qwen2.5-VL-7B (head_dim 128: H = 64, 3 axes, a batch of 8192 tokens) and the
    vision tower's (head_dim 80: H = 40, 2 axes, 4096 patches), bf16 and fp32 tables.

    Bytes: read the int64 positions once (A N 8) and the column map (8 H), write both tables (2 N 2H elements)."""
    cases = []
    for name, n_rows, half, n_axes, dtype, size in (
        ("text", 8192, 64, 3, "bf16", 2),
        ("vision", 4096, 40, 2, "fp32", 4),
    ):
        config = _launch_config(half)
        num_warps = config.pop("num_warps")
        args = {
            "pos_ptr": Ptr("i64"), "axis_ptr": Ptr("i32"), "freq_ptr": Ptr("fp32"),
            "cos_ptr": Ptr(dtype), "sin_ptr": Ptr(dtype),
            "n_rows": n_rows, "pos_stride_a": n_rows, "pos_stride_n": 1, "scale": 1.0,
        }  # fmt: skip
        constexprs = {"HALF": half, "N_AXES": n_axes, **config}
        cases.append(
            AuditCase(
                name=f"mrope_tables[{name}]",
                kernel=_mrope_table_kernel,
                args={**args, **constexprs},
                constexprs=constexprs,
                num_warps=num_warps,
                shape=f"N={n_rows} H={half} axes={n_axes} {dtype} tables",
                min_bytes=8 * n_axes * n_rows + 8 * half + 2 * n_rows * 2 * half * size,
            )
        )
    return cases
