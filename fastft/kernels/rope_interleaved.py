"""Rotary position embedding on adjacent pairs ("rotate every two", GPT-J / GLM / Cohere / DeepSeek), with partial
rotary, q and k in one launch, a hand-derived backward, and adapters equal to transformers' own functions.

Forward: for one head row ``x`` of width ``D`` at token ``t`` of batch row ``b``, the first ``R`` columns
(the rotary dim, even, ``R <= D``) form ``R / 2`` pairs ``(x[2i], x[2i+1])``, and pair ``i`` is rotated by
the angle ``θ_i`` whose cosine and sine are ``c_i = cos[b, t, i]`` and ``s_i = sin[b, t, i]``:

    y[2i]   = x[2i]   * c_i - x[2i+1] * s_i
    y[2i+1] = x[2i+1] * c_i + x[2i]   * s_i         (i < R/2)
    y[R:]   = x[R:]                                  (pass-through, partial rotary)

**cos/sin convention: one angle per pair.** ``cos``/``sin`` are ``(1 or B, T, W)`` with ``W >= R/2``; column
``i`` (``i < R/2``, read through the tensor's strides) belongs to pair ``i`` and any further columns are not
read. Every transformers table is a zero-copy view of that:

- Llama-style tables ``cat(freqs, freqs)`` of width ``R`` (GLM, GLM-4, DeepSeek-V3 and the models that copy
  its ``apply_rotary_pos_emb_interleave``): pass them as they are with ``rotary_dim=R``, or ``cos[..., :R//2]``;
- GPT-J-style tables ``repeat_interleave(freqs, 2)`` (Cohere, Cohere2): ``cos[..., ::2]`` (column stride 2);
- half-width tables ``freqs`` (gpt-oss): as they are;
- DeepSeek-V2's complex ``freqs_cis``: ``view_as_real(freqs_cis)[..., 0]`` and ``[..., 1]`` (column stride 2).

The same kernel also reads or writes the pairs as halves, ``(x[i], x[R/2 + i])``, the rotate-half
convention, so two more transformers functions are served without a copy: DeepSeek's
``apply_rotary_pos_emb_interleave`` reads pairs interleaved and writes them as halves (its output is
``cat(rotated evens, rotated odds)``), and gpt-oss's ``_apply_rotary_emb`` is rotate-half with half-width
cos/sin, which :mod:`fastft.kernels.rope` cannot read without duplicating the table.

Backward: per pair ``y = M x`` with ``M = [[c, -s], [s, c]]``, so ``dx = M^T dy = [[c, s], [-s, c]] dy``:

    dx[a] = dy[a] * c + dy[b] * s
    dx[b] = dy[b] * c - dy[a] * s

(``a``/``b``: the pair's first and second element, at the positions of the forward's input for ``dx`` and
of its output for ``dy``), the rotation of ``dy`` by ``-θ``; nothing assumes ``c^2 + s^2 = 1`` (an attention
factor folded into cos/sin is fine). The pass-through columns get ``dx[R:] = dy[R:]``. Forward and backward
are one kernel, ``a' = a c + b sa``, ``b' = b c + a sb`` with ``(sa, sb) = (-s, s)`` forward and ``(s, -s)``
backward (``BACKWARD`` constexpr), reading the layout the forward wrote and writing the one it read.
**cos and sin are the only tensors saved** (never q, k or the outputs); the op is out of place, and the
outputs (and input gradients) keep q's and k's memory layout, as in :mod:`fastft.kernels.rope`.

Rounding. :func:`rope_interleaved` computes in fp32 and rounds once to q's dtype (as ``rope`` does). The
adapters round where the transformers function they replace rounds, so their results are bitwise equal to it:

- ``ROUND_EACH_OP`` (GLM, DeepSeek-V3, gpt-oss compute in the tensors' dtype): each product and the sum are
  rounded to the output dtype, which is ``promote_types(q.dtype, cos.dtype)`` as PyTorch's type promotion
  gives. In the backward autograd casts each product's gradient to the input's dtype before summing, so there
  the rounding is to the gradient's (q's) dtype: again "the output dtype" of that launch. A bf16 or fp16
  product of two such values is exact in fp32, so rounding it is what a PyTorch bf16/fp16 op does.
- fp32 math, one final rounding (Cohere, DeepSeek-V2 upcast q and k once with ``.float()`` and cast the
  result back): the plain fp32 formula, forward and backward. Ernie 4.5 upcasts ``q`` and ``rotate_half(q)``
  separately, so its forward is this one while its backward rounds each product's gradient to q's dtype:
  the rounding is chosen per direction.

Both adapter modes launch with ``enable_fp_fusion=False``: PyTorch runs each product and sum as its own
kernel, so a fused multiply-add would differ from it in the last fp32 bit. :func:`rope_interleaved` keeps
fusion (one rounding fewer, more accurate).

Layout and traffic (as in ``rope``): one program per (token, batch row) loads that token's ``R/2`` angles
once and rotates all query heads, then all key heads, in ``[heads, R]`` tiles. An interleaved row is loaded
as one contiguous run (128-bit accesses) and split into its even and odd elements in registers
(``tl.reshape`` + ``tl.split``; ``tl.join`` puts them back), never with stride-2 accesses. Every byte of q,
k, cos and sin is read once and every output byte written once; cos/sin cost ``2 T R/2`` elements against
``2 T (Hq + Hk) D`` for q/k in and out. Pairs in and halves out (DeepSeek) moves the split halves to a
store-friendly layout through 4 KiB of shared memory per program (the audit shows it); storing them from the
split layout instead gave 16-bit stores and a spill on sm90.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase, Ptr
from fastft.kernels.rope import _launch_config


def _resolve_rotary_dim(name: str, head_dim: int, cos: torch.Tensor, rotary_dim: int | None) -> int:
    width = cos.shape[-1]
    rotary_dim = 2 * width if rotary_dim is None else rotary_dim
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool):
        raise TypeError(f"{name}: rotary_dim must be an int or None, got {type(rotary_dim).__name__}")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(
            f"{name}: rotary_dim ({rotary_dim}) must be even and in (0, head_dim = {head_dim}]; it counts the "
            "rotated columns of each head, two per angle"
        )
    if width < rotary_dim // 2:
        raise ValueError(
            f"{name}: cos/sin hold one angle per pair, so rotary_dim = {rotary_dim} needs at least "
            f"{rotary_dim // 2} columns, got cos {tuple(cos.shape)}; pass rotary_dim = 2 * cos.shape[-1] "
            f"= {2 * width} or wider tables"
        )
    return rotary_dim


def rope_interleaved_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair rotation as transformers' GLM writes it (``rotate_half`` on pairs, arithmetic in the inputs'
    dtype), with cos/sin holding one angle per pair (see the module docstring)."""
    rotary_dim = _resolve_rotary_dim("rope_interleaved_reference", q.shape[-1], cos, rotary_dim)
    cos = cos[..., : rotary_dim // 2].repeat_interleave(2, dim=-1).unsqueeze(1)
    sin = sin[..., : rotary_dim // 2].repeat_interleave(2, dim=-1).unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _rope_pairs_heads(
    x_ptr,
    out_ptr,
    n_heads,
    x_stride_h,
    out_stride_h,
    c,
    sa,
    sb,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PASS: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IN_INTERLEAVED: tl.constexpr,
    OUT_INTERLEAVED: tl.constexpr,
    ROUND_EACH_OP: tl.constexpr,
):
    """Rotate ``n_heads`` head rows of one token: x_ptr/out_ptr point at head 0, column 0 of that token.

    Traffic: each head row is read once (an interleaved row as one contiguous run of R elements, split into
    its pairs in registers; a halves row as two runs of R/2) and written once, plus the pass-through columns.
    """
    half_cols = tl.arange(0, BLOCK_HALF)[None, :]
    pair_cols = tl.arange(0, 2 * BLOCK_HALF)[None, :]
    pass_cols = tl.arange(0, BLOCK_PASS)[None, :]
    # Intermediate roundings go to the output's dtype (module docstring, "Rounding").
    out_dtype = out_ptr.dtype.element_ty
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[:, None]
        head_mask = heads < n_heads
        # int64 head index: heads * stride can pass 2**31 for (B, H, T, D)-contiguous tensors with long T.
        heads = heads.to(tl.int64)
        x_row = x_ptr + heads * x_stride_h
        out_row = out_ptr + heads * out_stride_h
        half_mask = head_mask & (half_cols < HALF)
        pair_mask = head_mask & (pair_cols < 2 * HALF)
        if IN_INTERLEAVED:
            x = tl.load(x_row + pair_cols, mask=pair_mask, other=0.0).to(tl.float32)
            xa, xb = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
        else:
            xa = tl.load(x_row + half_cols, mask=half_mask, other=0.0).to(tl.float32)
            xb = tl.load(x_row + HALF + half_cols, mask=half_mask, other=0.0).to(tl.float32)
        if ROUND_EACH_OP:
            # PyTorch in the output dtype: round each product, then the sum (the final store rounds the sum).
            ya = (xa * c).to(out_dtype).to(tl.float32) + (xb * sa).to(out_dtype).to(tl.float32)
            yb = (xb * c).to(out_dtype).to(tl.float32) + (xa * sb).to(out_dtype).to(tl.float32)
        else:
            ya = xa * c + xb * sa
            yb = xb * c + xa * sb
        if OUT_INTERLEAVED:
            y = tl.reshape(tl.join(ya, yb), (BLOCK_H, 2 * BLOCK_HALF))
            tl.store(out_row + pair_cols, y.to(out_dtype), mask=pair_mask)
        else:
            tl.store(out_row + half_cols, ya.to(out_dtype), mask=half_mask)
            tl.store(out_row + HALF + half_cols, yb.to(out_dtype), mask=half_mask)
        if PASS > 0:
            # Partial rotary: the columns past the rotary dim are copied unchanged (forward and backward).
            pass_mask = head_mask & (pass_cols < PASS)
            x_pass = tl.load(x_row + 2 * HALF + pass_cols, mask=pass_mask, other=0.0)
            tl.store(out_row + 2 * HALF + pass_cols, x_pass.to(out_dtype), mask=pass_mask)


@triton.jit
def _rope_interleaved_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    n_heads_q,
    n_heads_k,
    q_stride_b,
    q_stride_h,
    q_stride_t,
    k_stride_b,
    k_stride_h,
    k_stride_t,
    q_out_stride_b,
    q_out_stride_h,
    q_out_stride_t,
    k_out_stride_b,
    k_out_stride_h,
    k_out_stride_t,
    cos_stride_b,
    cos_stride_t,
    cos_stride_col,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PASS: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    IN_INTERLEAVED: tl.constexpr,
    OUT_INTERLEAVED: tl.constexpr,
    ROUND_EACH_OP: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """One program per (token, batch row): the token's R/2 angles loaded once, then all query and key heads.

    Forward (BACKWARD=False) writes q_out/k_out from q/k; backward (BACKWARD=True) writes dq/dk from
    dq_out/dk_out through the same pointers, with the layouts swapped by the host (module docstring).
    """
    # int64 before multiplying by strides: token * stride_t overflows int32 for long sequences and batches.
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    # cos_stride_b is 0 when all batch rows share positions; cos_stride_col is 2 for GPT-J-style tables
    # (cos[..., ::2]) and complex ones, and 1 (a compile-time constant then) otherwise.
    cs = b * cos_stride_b + t * cos_stride_t + cols * cos_stride_col
    c = tl.load(cos_ptr + cs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + cs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        sa = s
        sb = -s
    else:
        sa = -s
        sb = s
    _rope_pairs_heads(
        q_ptr + b * q_stride_b + t * q_stride_t,
        q_out_ptr + b * q_out_stride_b + t * q_out_stride_t,
        n_heads_q,
        q_stride_h,
        q_out_stride_h,
        c,
        sa,
        sb,
        HALF,
        BLOCK_HALF,
        PASS,
        BLOCK_PASS,
        BLOCK_HQ,
        IN_INTERLEAVED,
        OUT_INTERLEAVED,
        ROUND_EACH_OP,
    )
    _rope_pairs_heads(
        k_ptr + b * k_stride_b + t * k_stride_t,
        k_out_ptr + b * k_out_stride_b + t * k_out_stride_t,
        n_heads_k,
        k_stride_h,
        k_out_stride_h,
        c,
        sa,
        sb,
        HALF,
        BLOCK_HALF,
        PASS,
        BLOCK_PASS,
        BLOCK_HK,
        IN_INTERLEAVED,
        OUT_INTERLEAVED,
        ROUND_EACH_OP,
    )


# ----------------------------------------------------------------------------------------------------------
# Launch heuristics and host launchers
# ----------------------------------------------------------------------------------------------------------

# Launch configuration: rope's (a [heads, R] tile per program, the same shape as rope's two halves).


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernel addresses the head dim as unit stride (128-bit accesses); anything else is copied once.
    # An expanded gradient (e.g. of ``out.sum()``) has stride 0 there and lands here too.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


class _Mode(NamedTuple):
    """How one call rotates: pair layouts of the forward's input and output, whether the forward and the
    backward launch round each op (module docstring, "Rounding"), and whether fp fusion is allowed."""

    in_interleaved: bool
    out_interleaved: bool
    round_forward: bool
    round_backward: bool
    fp_fusion: bool


_CORE = _Mode(True, True, False, False, fp_fusion=True)  # rope_interleaved: fp32, one rounding
_GLM = _Mode(True, True, True, True, fp_fusion=False)  # GLM, GLM-4, Moonshine, Helium
_FP32_PAIRS = _Mode(True, True, False, False, fp_fusion=False)  # Cohere, Cohere2, DeepSeek-V2
_ERNIE = _Mode(True, True, False, True, fp_fusion=False)  # Ernie 4.5: rotate_half(q).float() in the backward
_DEEPSEEK = _Mode(True, False, True, True, fp_fusion=False)  # apply_rotary_pos_emb_interleave
_GPT_OSS = _Mode(False, False, True, True, fp_fusion=False)  # rotate-half, half-width tables


def _rope_triton(x, k, cos, sin, x_out, k_out, rotary_dim, in_interleaved, out_interleaved, mode, backward):
    """Launch the kernel: x_out, k_out = rotate(x, k) (``backward``: by the transposed rotation); k may be None."""
    batch, n_heads_q, seq_len, head_dim = x.shape
    x = _last_dim_contiguous(x)
    if k is None:  # one tensor (gpt-oss's _apply_rotary_emb): a key pass over zero heads
        k, k_out, n_heads_k = x, x_out, 0
    else:
        k, n_heads_k = _last_dim_contiguous(k), k.shape[1]
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    config = _launch_config(head_dim, rotary_dim, n_heads_q, n_heads_k)
    num_warps = config.pop("num_warps")
    options = {} if mode.fp_fusion else {"enable_fp_fusion": False}
    _rope_interleaved_kernel[(seq_len, batch)](
        x, k, x_out, k_out, cos, sin,
        n_heads_q, n_heads_k,
        x.stride(0), x.stride(1), x.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        x_out.stride(0), x_out.stride(1), x_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2),
        IN_INTERLEAVED=in_interleaved,
        OUT_INTERLEAVED=out_interleaved,
        ROUND_EACH_OP=mode.round_backward if backward else mode.round_forward,
        BACKWARD=backward,
        num_warps=num_warps,
        **config,
        **options,
    )  # fmt: skip


def _pairs(x: torch.Tensor, rotary_dim: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    return x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim]


def _rotate_torch(x, cos, sin, out, rotary_dim, in_interleaved, out_interleaved, mode, backward) -> None:
    """Torch path of the same formulas and roundings (fp32 arithmetic, fp64 for fp64), written into ``out``."""
    compute = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    c = cos[..., : rotary_dim // 2].unsqueeze(1).to(compute)
    s = sin[..., : rotary_dim // 2].unsqueeze(1).to(compute)
    sa, sb = (s, -s) if backward else (-s, s)
    xa, xb = (part.to(compute) for part in _pairs(x, rotary_dim, in_interleaved))

    round_each_op = mode.round_backward if backward else mode.round_forward

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(out.dtype).to(compute) if round_each_op else t

    out_a, out_b = _pairs(out, rotary_dim, out_interleaved)
    out_a.copy_(rounded(xa * c) + rounded(xb * sa))
    out_b.copy_(rounded(xb * c) + rounded(xa * sb))
    out[..., rotary_dim:] = x[..., rotary_dim:]


def _rope_apply(x, k, cos, sin, x_out, k_out, rotary_dim, mode, triton_path, backward) -> None:
    if x_out.numel() == 0 and (k_out is None or k_out.numel() == 0):
        return
    # The backward reads the layout the forward wrote and writes the one it read.
    layouts = (mode.out_interleaved, mode.in_interleaved) if backward else (mode.in_interleaved, mode.out_interleaved)
    if triton_path:
        _rope_triton(x, k, cos, sin, x_out, k_out, rotary_dim, *layouts, mode, backward)
        return
    for source, target in ((x, x_out), (k, k_out)):
        if source is not None:
            _rotate_torch(source, cos, sin, target, rotary_dim, *layouts, mode, backward)


class RopeInterleavedFunction(torch.autograd.Function):
    """Autograd wrapper: saves cos and sin only; outputs and gradients keep the memory layout of q and k.

    ``k`` may be None (one tensor, gpt-oss's ``_apply_rotary_emb``): then the forward returns one tensor.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, rotary_dim: int, mode: _Mode, out_dtype: torch.dtype, triton_path: bool):
        # empty_like keeps q's layout when q is dense (e.g. (B, T, H, D) memory behind a (B, H, T, D) view), so
        # the gradient can be produced in the layout the projection's backward reads without a copy.
        q_out = torch.empty_like(q, dtype=out_dtype)
        k_out = None if k is None else torch.empty_like(k, dtype=out_dtype)
        _rope_apply(q, k, cos, sin, q_out, k_out, rotary_dim, mode, triton_path, backward=False)
        ctx.save_for_backward(cos, sin)
        # The gradients take the outputs' layout (dense, never with the gaps of a sliced input) and the inputs' dtype.
        ctx.layouts = [(out.shape, out.stride(), x.dtype) for x, out in ((q, q_out), (k, k_out)) if x is not None]
        ctx.rotary_dim, ctx.mode, ctx.triton_path = rotary_dim, mode, triton_path
        return q_out if k is None else (q_out, k_out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk = [torch.empty_strided(shape, stride, dtype=dtype, device=cos.device) for shape, stride, dtype in
                  ctx.layouts] + [None] * (2 - len(ctx.layouts))  # fmt: skip
        dq_out, dk_out = grads if len(grads) == 2 else (grads[0], None)
        _rope_apply(dq_out, dk_out, cos, sin, dq, dk, ctx.rotary_dim, ctx.mode, ctx.triton_path, backward=True)
        return dq, dk, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Input checks and the public functions
# ----------------------------------------------------------------------------------------------------------


def _require_tensors(name: str, **tensors: object) -> None:
    for arg, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(x).__name__}")


def _check_inputs(name: str, q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> None:
    tensors = {"q": q, "k": k, "cos": cos, "sin": sin} if k is not None else {"x": q, "cos": cos, "sin": sin}
    _require_tensors(name, **tensors)
    for arg, x in tensors.items():
        if not x.is_floating_point():
            raise ValueError(f"{name}: {arg} has dtype {x.dtype}; q, k, cos and sin must be floating point tensors")
    if q.dim() != 4 or (k is not None and k.dim() != 4):
        shapes = f"q {tuple(q.shape)}" + (f" and k {tuple(k.shape)}" if k is not None else "")
        raise ValueError(
            f"{name}: q and k must be (batch, heads, seq_len, head_dim), got {shapes}; transformers' layout is "
            "proj(x).view(B, T, H, D).transpose(1, 2)"
        )
    if k is not None and q.dtype != k.dtype:
        raise ValueError(f"{name}: q ({q.dtype}) and k ({k.dtype}) must have the same dtype")
    if cos.dtype != sin.dtype:
        raise ValueError(f"{name}: cos ({cos.dtype}) and sin ({sin.dtype}) must have the same dtype")
    if len({x.device for x in tensors.values()}) != 1:
        devices = ", ".join(f"{arg} on {x.device}" for arg, x in tensors.items())
        raise ValueError(f"{name}: all tensors must be on one device, got {devices}")
    batch, _, seq_len, head_dim = q.shape
    if k is not None and (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(
            f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seq_len and head_dim "
            "(dims 0, 2 and 3 of (batch, heads, seq_len, head_dim))"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"{name}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
        raise ValueError(
            f"{name}: cos/sin must be (1 or batch, seq_len, width) = (1 or {batch}, {seq_len}, ...) for q "
            f"{tuple(q.shape)}, got {tuple(cos.shape)}; pass them without unsqueezing the head dim"
        )
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise NotImplementedError(
            f"{name}: gradients with respect to cos/sin are not computed; pass cos.detach(), sin.detach() "
            "(transformers' rotary embeddings never require grad)"
        )


def _run(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mode: _Mode,
    *,
    rotary_dim: int | None = None,
    llama_table: bool = False,
    full_rotary: bool = False,
    promote: bool = False,
):
    """Check, resolve the rotary dim, dispatch. ``llama_table``: cos/sin are ``cat(freqs, freqs)`` tables of
    width R whose first R/2 columns are the angles; ``full_rotary``: the replaced function has no pass-through
    columns; ``promote``: the outputs take ``promote_types(q, cos)`` as PyTorch's type promotion gives."""
    _check_inputs(name, q, k, cos, sin)
    head_dim = q.shape[-1]
    if llama_table:
        rotary_dim = 2 * (cos.shape[-1] // 2)
    if full_rotary and (rotary_dim or 2 * cos.shape[-1]) != head_dim:
        raise ValueError(
            f"{name}: this function rotates the whole head, so cos/sin {tuple(cos.shape)} must cover head_dim = "
            f"{head_dim} columns (q {tuple(q.shape)}), as the transformers function it replaces requires"
        )
    rotary_dim = _resolve_rotary_dim(name, head_dim, cos, rotary_dim)
    out_dtype = torch.promote_types(q.dtype, cos.dtype) if promote else q.dtype
    # fp64 anywhere: the torch path, which computes in fp64 (the kernel's arithmetic is fp32).
    triton_path = use_triton(q) and torch.float64 not in (q.dtype, cos.dtype, out_dtype)
    return RopeInterleavedFunction.apply(q, k, cos, sin, rotary_dim, mode, out_dtype, triton_path)


def rope_interleaved(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` of the first ``rotary_dim`` columns of every q and k head.

    ``q`` is (B, Hq, T, D) and ``k`` (B, Hk, T, D) (any strides with a unit-stride last dim are read in place);
    ``cos``/``sin`` are (1 or B, T, W) with **one angle per pair**: column ``i`` rotates pair ``i`` (a Llama-style
    ``cat(freqs, freqs)`` table of width R is read as it is with ``rotary_dim=R``; a GPT-J-style repeat-interleaved
    one as ``cos[..., ::2]``). ``rotary_dim`` defaults to ``2 * W``; it must be even and at most D, and columns
    past it pass through unchanged (partial rotary). Arithmetic is fp32, rounded once to q's dtype; outputs keep
    q's and k's layout. The backward rotates by -θ and saves only cos and sin. The ``*_apply_rotary_*``
    functions of this module are the same kernel with transformers' signatures and roundings.
    """
    return _run("rope_interleaved", q, k, cos, sin, _CORE, rotary_dim=rotary_dim)


# ----------------------------------------------------------------------------------------------------------
# Drop-in replacements for transformers' functions (same signature, same result bit for bit)
# ----------------------------------------------------------------------------------------------------------


def _heads_first(name: str, unsqueeze_dim: int, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """(B, H, T, D) views of q/k for transformers' ``unsqueeze_dim`` (1: already so; 2: (B, T, H, D))."""
    if unsqueeze_dim in (1, -3):
        return list(tensors)
    if unsqueeze_dim in (2, -2):
        return [x.transpose(1, 2) if isinstance(x, torch.Tensor) and x.dim() == 4 else x for x in tensors]
    raise ValueError(
        f"{name}: unsqueeze_dim={unsqueeze_dim} is not supported; q and k must be (batch, heads, seq, head_dim) "
        "(unsqueeze_dim=1) or (batch, seq, heads, head_dim) (unsqueeze_dim=2)"
    )


def _heads_back(unsqueeze_dim: int, *outs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return tuple(x.transpose(1, 2) if x is not None and unsqueeze_dim in (2, -2) else x for x in outs)


def glm_apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' GLM / GLM-4 ``apply_rotary_pos_emb`` (Moonshine's is the same function; Helium's too at
    full rotary).

    cos/sin are the ``(B, T, R)`` Llama-style tables of the model's rotary embedding: the first ``R/2``
    columns are the pair angles (transformers repeat-interleaves them), the columns of q/k past ``R`` pass
    through. Arithmetic in ``promote_types(q, cos)``, each product and sum rounded as PyTorch rounds them:
    bit for bit transformers' result, forward and backward.
    """
    name = "glm_apply_rotary_pos_emb"
    q, k = _heads_first(name, unsqueeze_dim, q, k)
    q_out, k_out = _run(name, q, k, cos, sin, _GLM, llama_table=True, promote=True)
    return _heads_back(unsqueeze_dim, q_out, k_out)


def ernie4_5_apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Ernie 4.5 ``apply_rotary_pos_emb``: GLM's tables and pairs over the whole head, computed
    in fp32 (``q.float()``) and cast back to q's dtype once. Its backward rounds each product's gradient to
    q's dtype (``q.float()`` and ``rotate_half(q).float()`` are two casts, each differentiated on its own) and
    sums in that dtype; the adapter does the same: bit for bit transformers' result, forward and backward."""
    name = "ernie4_5_apply_rotary_pos_emb"
    q, k = _heads_first(name, unsqueeze_dim, q, k)
    q_out, k_out = _run(name, q, k, cos, sin, _ERNIE, llama_table=True, full_rotary=True)
    return _heads_back(unsqueeze_dim, q_out, k_out)


def cohere_apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Cohere / Cohere2 ``apply_rotary_pos_emb``: pairs rotated in fp32 and cast to q's dtype.

    cos/sin are the ``(B, T, D)`` tables of ``CohereRotaryEmbedding``, ``repeat_interleave(freqs, 2)``: both
    columns of a pair hold the same angle, and the kernel reads the even ones (``cos[..., ::2]``, a view).
    Bit for bit transformers' result for such tables, forward and backward.
    """
    name = "cohere_apply_rotary_pos_emb"
    _require_tensors(name, cos=cos, sin=sin)
    q, k = _heads_first(name, unsqueeze_dim, q, k)
    if cos.dim() == 0 or cos.shape[-1] % 2:
        raise ValueError(f"{name}: cos/sin must be (B, T, head_dim) repeat-interleaved tables, got {tuple(cos.shape)}")
    q_out, k_out = _run(name, q, k, cos[..., ::2], sin[..., ::2], _FP32_PAIRS, full_rotary=True)
    return _heads_back(unsqueeze_dim, q_out, k_out)


def deepseek_apply_rotary_pos_emb_interleave(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' ``apply_rotary_pos_emb_interleave`` (DeepSeek-V3 and the models that copy it).

    q and k (MLA's rope parts; k may be None, as ``mistral_large4``'s copy allows) hold interleaved pairs; the
    result is ``cat(rotated evens, rotated odds)``: pairs in, halves out. cos/sin are ``(B, T, R)`` Llama-style
    tables whose first ``R/2`` columns are the angles. ``position_ids`` is ignored, as there. Arithmetic in
    ``promote_types(q, cos)``, each op rounded: bit for bit transformers' result, forward and backward.
    """
    del position_ids
    name = "deepseek_apply_rotary_pos_emb_interleave"
    q, k = _heads_first(name, unsqueeze_dim, q, k)
    outs = _run(name, q, k, cos, sin, _DEEPSEEK, llama_table=True, full_rotary=True, promote=True)
    return _heads_back(unsqueeze_dim, *((outs, None) if k is None else outs))


def deepseek_v2_apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' DeepSeek-V2 ``apply_rotary_emb``: pairs as complex numbers times ``freqs_cis`` (B, T, R/2),
    in fp32, cast back to the input dtype. cos and sin are read from ``freqs_cis`` in place (its real and
    imaginary parts, column stride 2). Equal to transformers' result up to how its complex multiply rounds in
    fp32 (see the tests): bit for bit where PyTorch's complex multiply rounds each product, as on CPU."""
    name = "deepseek_v2_apply_rotary_emb"
    _require_tensors(name, freqs_cis=freqs_cis)
    if not freqs_cis.is_complex():
        raise ValueError(f"{name}: freqs_cis must be a complex tensor (B, T, rotary_dim / 2), got {freqs_cis.dtype}")
    table = torch.view_as_real(freqs_cis)
    return _run(name, xq, xk, table[..., 0], table[..., 1], _FP32_PAIRS, full_rotary=True)


def gpt_oss_apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' gpt-oss ``_apply_rotary_emb``: rotate-half on ``torch.chunk`` halves of one tensor.

    ``x`` is (B, H, T, D) with cos/sin (1 or B, 1, T, D/2), or (B, T, H, D) with cos/sin (1 or B, T, 1, D/2):
    the half-width tables already unsqueezed, as gpt-oss's ``apply_rotary_pos_emb`` passes them. Arithmetic in
    ``promote_types(x, cos)``, each op rounded: bit for bit transformers' result, forward and backward.
    """
    name = "gpt_oss_apply_rotary_emb"
    _require_tensors(name, x=x, cos=cos, sin=sin)
    if x.dim() == 4 and cos.dim() == 4 and cos.shape[1] == 1 and cos.shape[2] == x.shape[2]:
        unsqueeze_dim = 1
    elif x.dim() == 4 and cos.dim() == 4 and cos.shape[2] == 1 and cos.shape[1] == x.shape[1]:
        unsqueeze_dim = 2
    else:
        raise ValueError(
            f"{name}: cos must be (1 or B, 1, T, D/2) for x (B, H, T, D) or (1 or B, T, 1, D/2) for x (B, T, H, D), "
            f"got cos {tuple(cos.shape)} and x {tuple(x.shape)}"
        )
    (x,) = _heads_first(name, unsqueeze_dim, x)
    out = _run(name, x, None, cos.squeeze(unsqueeze_dim), sin.squeeze(unsqueeze_dim), _GPT_OSS, full_rotary=True,
               promote=True)  # fmt: skip
    return _heads_back(unsqueeze_dim, out)[0]


def gpt_oss_apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' gpt-oss ``apply_rotary_pos_emb``: :func:`gpt_oss_apply_rotary_emb` on q and k in one launch,
    with the ``(B, T, D/2)`` half-width tables of ``GptOssRotaryEmbedding``."""
    name = "gpt_oss_apply_rotary_pos_emb"
    q, k = _heads_first(name, unsqueeze_dim, q, k)
    q_out, k_out = _run(name, q, k, cos, sin, _GPT_OSS, full_rotary=True, promote=True)
    return _heads_back(unsqueeze_dim, q_out, k_out)


# ----------------------------------------------------------------------------------------------------------
# Compile audit
# ----------------------------------------------------------------------------------------------------------


def _views(seq_len: int, n_heads: int, row: int) -> tuple[int, int, int]:
    """Strides (b, h, t) of ``proj(x).view(B, T, H, row).transpose(1, 2)`` (one batch row)."""
    return seq_len * n_heads * row, row, n_heads * row


def audit_cases() -> list[AuditCase]:
    """Forward and backward launches, bf16, T=8192, at three shapes that together use every layout.

    - ``rope_interleaved_*``: GLM-4-9B-style partial rotary (R=64 of D=128, pairs in and out, fp32 math) at
      Llama-3-8B's head counts (32 query / 8 kv heads): the core function and the GLM/Cohere adapters. q, k and
      the outputs are transformers' views ``proj(x).view(B, T, H, D).transpose(1, 2)``.
    - ``*_deepseek_v3``: MLA's rope parts (128 query heads, one key head, R=64, pairs in, halves out, each op
      rounded): q_rot a slice of the (B, T, 128, 192) query rows, k_rot of the (B, T, 576) compressed kv; the
      outputs (and gradients) are contiguous, as ``empty_like`` makes them for such slices.
    - ``*_gpt_oss``: 64 query / 8 kv heads, D=64, halves in and out, half-width tables, each op rounded.

    The backward reads and writes the outputs' layout. Bytes: read q, k, cos, sin once, write two outputs once
    (cos/sin: R/2 angles per token).
    """
    seq_len, elem = 8192, 2
    cases: list[AuditCase] = []

    def add(suffix, *, heads, head_dim, rotary_dim, q_in, k_in, q_out, k_out, in_il, out_il, round_each_op, shape):
        config = _launch_config(head_dim, rotary_dim, *heads)
        num_warps = config.pop("num_warps")
        min_bytes = elem * (2 * seq_len * sum(heads) * head_dim + 2 * seq_len * rotary_dim // 2)
        for backward in (False, True):
            strides = {"q": q_out, "k": k_out} if backward else {"q": q_in, "k": k_in}
            strides.update({"q_out": q_out, "k_out": k_out})
            args: dict[str, object] = {
                "q_ptr": Ptr("bf16"), "k_ptr": Ptr("bf16"), "q_out_ptr": Ptr("bf16"), "k_out_ptr": Ptr("bf16"),
                "cos_ptr": Ptr("bf16"), "sin_ptr": Ptr("bf16"), "n_heads_q": heads[0], "n_heads_k": heads[1],
                "cos_stride_b": 0, "cos_stride_t": rotary_dim, "cos_stride_col": 1,
            }  # fmt: skip
            for prefix, (b, h, t) in strides.items():
                args.update({f"{prefix}_stride_b": b, f"{prefix}_stride_h": h, f"{prefix}_stride_t": t})
            layouts = (out_il, in_il) if backward else (in_il, out_il)
            cases.append(
                AuditCase(
                    name=f"rope_interleaved_{'backward' if backward else 'forward'}{suffix}",
                    kernel=_rope_interleaved_kernel,
                    args=args,
                    constexprs={
                        **config,
                        "IN_INTERLEAVED": layouts[0],
                        "OUT_INTERLEAVED": layouts[1],
                        "ROUND_EACH_OP": round_each_op,
                        "BACKWARD": backward,
                    },
                    num_warps=num_warps,
                    shape=shape,
                    min_bytes=min_bytes,
                )
            )

    glm_q, glm_k = _views(seq_len, 32, 128), _views(seq_len, 8, 128)
    add("", heads=(32, 8), head_dim=128, rotary_dim=64, q_in=glm_q, k_in=glm_k, q_out=glm_q, k_out=glm_k,
        in_il=True, out_il=True, round_each_op=False,
        shape=f"B=1 T={seq_len} Hq=32 Hk=8 D=128 R=64 bf16, transposed views")  # fmt: skip
    add("_deepseek_v3", heads=(128, 1), head_dim=64, rotary_dim=64, q_in=_views(seq_len, 128, 192),
        k_in=(seq_len * 576, 64, 576), q_out=(128 * seq_len * 64, seq_len * 64, 64), k_out=(seq_len * 64,) * 2 + (64,),
        in_il=True, out_il=False, round_each_op=True,
        shape=f"B=1 T={seq_len} Hq=128 Hk=1 R=64 bf16, MLA rope slices, pairs in, halves out")  # fmt: skip
    oss_q, oss_k = _views(seq_len, 64, 64), _views(seq_len, 8, 64)
    add("_gpt_oss", heads=(64, 8), head_dim=64, rotary_dim=64, q_in=oss_q, k_in=oss_k, q_out=oss_q, k_out=oss_k,
        in_il=False, out_il=False, round_each_op=True,
        shape=f"B=1 T={seq_len} Hq=64 Hk=8 D=64 bf16, halves, half-width cos/sin")  # fmt: skip
    return cases
