"""Rotary position embedding (RoPE) for query and key heads, in one launch, with a hand-derived backward.

Forward (transformers' ``apply_rotary_pos_emb``, rotate-half convention): for one head row ``x`` of width
``D`` at token ``t`` of batch row ``b``, with ``c = cos[b, t]`` and ``s = sin[b, t]`` of width ``R`` (the
rotary dim, ``R == D`` for Llama; ``R < D`` for partial-rotary models such as Phi):

    y[:R] = x[:R] * c + rotate_half(x[:R]) * s,      rotate_half(z) = cat(-z2, z1)   (z1, z2 = halves of z)
    y[R:] = x[R:]                                     (pass-through)

Written per half (``h = R / 2``; indices ``1`` = ``[:h]``, ``2`` = ``[h:R]``):

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2

Any rope scaling (llama3, linear, dynamic, yarn, attention factor) is already folded into cos/sin by the
model's rotary embedding module, so the kernel never sees position ids or frequencies.

Backward: ``y`` is linear in ``x``, ``y = M x`` with the per-token matrix ``M = [[C1, -S1], [S2, C2]]``
(diagonal blocks), so ``dx = M^T dy = [[C1, S2], [-S1, C2]] dy``:

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1

i.e. ``dx = dy * c + rotate_half^T(dy * s)`` with ``rotate_half^T(z) = cat(z2, -z1)``. For transformers'
cos/sin (``c1 = c2 = cos θ``, ``s1 = s2 = sin θ``, up to the attention factor) that is the rotation of
``dy`` by ``-θ``; the formulas above hold for any cos/sin, so nothing about their structure is assumed.
The pass-through columns get ``dx[R:] = dy[R:]``. The backward needs only cos and sin: **cos and sin are
the only tensors saved** (never q, k or the outputs). The forward and backward are the same kernel with
the sine terms swapped and negated (``BACKWARD`` constexpr): ``y1 = x1 c1 + x2 sa``, ``y2 = x2 c2 + x1 sb``
with ``(sa, sb) = (-s1, s2)`` forward and ``(s2, -s1)`` backward.

Layout and traffic: one program per (token, batch row) loads that token's cos/sin once (fp32 in registers)
and rotates all ``Hq`` query heads and then all ``Hk`` key heads, in tiles of ``[heads, R/2]`` per half.
q and k are read through their strides (transformers hands over ``proj(x).view(B, T, H, D).transpose(1, 2)``,
where the heads of one token are one contiguous run), so no copy is made; every byte of q, k, cos, sin is
read once and every byte of the outputs written once. cos/sin cost ``2 T R`` elements per launch against
``2 T (Hq + Hk) D`` for q/k in and out (2.4% at Llama-3-8B shapes); a program per (token, head) would
re-read them ``Hq + Hk`` times. For Llama-3-8B all 32 query heads of a token are one tile (8 KiB of bf16
loaded at once, no loop), which keeps many bytes in flight per program; wider models loop over head tiles.
Arithmetic is fp32, rounded once to the output dtype (transformers rounds three times in the input dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase, Ptr


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (Llama; Phi-style partial rotary when ``cos.shape[-1] < D``)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        x1, x2 = x_rot[..., : rotary_dim // 2], x_rot[..., rotary_dim // 2 :]
        rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((rotated, x_pass), dim=-1)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _rope_rotate_heads(
    x_ptr,
    out_ptr,
    n_heads,
    x_stride_h,
    out_stride_h,
    c1,
    c2,
    sa,
    sb,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PASS: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rotate ``n_heads`` head rows of one token: x_ptr/out_ptr point at head 0, column 0 of that token."""
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    pass_cols = tl.arange(0, BLOCK_PASS)[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[:, None]
        head_mask = heads < n_heads
        mask = head_mask & (cols < HALF)
        # int64 head index: heads * stride can pass 2**31 for (B, H, T, D)-contiguous tensors with long T.
        heads = heads.to(tl.int64)
        x_row = x_ptr + heads * x_stride_h
        out_row = out_ptr + heads * out_stride_h
        x1 = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1 + x2 * sa
        y2 = x2 * c2 + x1 * sb
        tl.store(out_row + cols, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_row + HALF + cols, y2.to(out_ptr.dtype.element_ty), mask=mask)
        if PASS > 0:
            # Partial rotary: the columns past the rotary dim are copied unchanged (forward and backward).
            pass_mask = head_mask & (pass_cols < PASS)
            x_pass = tl.load(x_row + 2 * HALF + pass_cols, mask=pass_mask, other=0.0)
            tl.store(out_row + 2 * HALF + pass_cols, x_pass, mask=pass_mask)


@triton.jit
def _rope_kernel(
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
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PASS: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """One program per (token, batch row): cos/sin loaded once, then all query heads and all key heads.

    Forward (BACKWARD=False) writes q_out/k_out from q/k; backward (BACKWARD=True) writes dq/dk from
    dq_out/dk_out through the same pointers (see the module docstring for the algebra).
    """
    # int64 before multiplying by strides: token * stride_t overflows int32 for long sequences and batches.
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    # cos_stride_b is 0 when all batch rows share positions (cos of batch 1 broadcast over B).
    cs = b * cos_stride_b + t * cos_stride_t
    c1 = tl.load(cos_ptr + cs + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cs + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cs + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cs + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        sa = s2
        sb = -s1
    else:
        sa = -s1
        sb = s2
    _rope_rotate_heads(
        q_ptr + b * q_stride_b + t * q_stride_t,
        q_out_ptr + b * q_out_stride_b + t * q_out_stride_t,
        n_heads_q,
        q_stride_h,
        q_out_stride_h,
        c1,
        c2,
        sa,
        sb,
        HALF,
        BLOCK_HALF,
        PASS,
        BLOCK_PASS,
        BLOCK_HQ,
    )
    _rope_rotate_heads(
        k_ptr + b * k_stride_b + t * k_stride_t,
        k_out_ptr + b * k_out_stride_b + t * k_out_stride_t,
        n_heads_k,
        k_stride_h,
        k_out_stride_h,
        c1,
        c2,
        sa,
        sb,
        HALF,
        BLOCK_HALF,
        PASS,
        BLOCK_PASS,
        BLOCK_HK,
    )


# ----------------------------------------------------------------------------------------------------------
# Launch heuristics and host launchers
# ----------------------------------------------------------------------------------------------------------

# Elements of one half-tile ([heads, R/2]) a program holds at once. 2048 fp32 values per half is 32 per
# thread at 4 warps: enough bytes in flight per program (8 KiB of bf16 q for Llama-3-8B, all 32 heads at
# once) without spilling; wider models loop over head tiles.
_MAX_HALF_TILE = 2048


def _launch_config(head_dim: int, rotary_dim: int, n_heads_q: int, n_heads_k: int) -> dict[str, int]:
    """Block sizes and warps for one launch; shared by the launcher and :func:`audit_cases` (and by
    :mod:`fastft.kernels.rope_interleaved`, whose tiles have the same shape)."""
    half, n_pass = rotary_dim // 2, head_dim - rotary_dim
    block_half = triton.next_power_of_2(half)
    max_heads = max(1, _MAX_HALF_TILE // block_half)
    block_hq = min(triton.next_power_of_2(max(n_heads_q, 1)), max_heads)
    block_pass = triton.next_power_of_2(n_pass) if n_pass else 1
    # Warps from the width of the query tile (both halves plus pass-through): at least 32 elements per
    # thread (four 128-bit bf16 accesses), so a small model's few heads run one or two warps instead of
    # idle lanes; at most 4 warps, which the Llama-3-8B tile (32 heads x 128) fills exactly.
    tile = block_hq * (2 * block_half + (block_pass if n_pass else 0))
    num_warps = 4 if tile >= 4096 else 2 if tile >= 2048 else 1
    # The key tile gets at least 8 elements per thread per half, so its accesses stay 128-bit wide too
    # (8 kv heads x 64 over 128 threads would be 64-bit); the extra rows are masked and move no bytes.
    min_rows_k = max(1, 8 * 32 * num_warps // block_half)
    block_hk = min(max(triton.next_power_of_2(max(n_heads_k, 1)), min_rows_k), max_heads)  # k may be absent
    return {
        "HALF": half,
        "BLOCK_HALF": block_half,
        "PASS": n_pass,
        "BLOCK_PASS": block_pass,
        "BLOCK_HQ": block_hq,
        "BLOCK_HK": block_hk,
        "num_warps": num_warps,
    }


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernel addresses the head dim as unit stride (128-bit accesses); anything else is copied once.
    # An expanded gradient (e.g. of ``out.sum()``) has stride 0 there and lands here too.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    backward: bool,
) -> None:
    """Launch the kernel: q_out, k_out = rotate(q, k) (``backward``: by the transposed rotation)."""
    batch, n_heads_q, seq_len, head_dim = q.shape
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    config = _launch_config(head_dim, cos.shape[-1], n_heads_q, k.shape[1])
    num_warps = config.pop("num_warps")
    _rope_kernel[(seq_len, batch)](
        q, k, q_out, k_out, cos, sin,
        n_heads_q, k.shape[1],
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        BACKWARD=backward,
        num_warps=num_warps,
        **config,
    )  # fmt: skip


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, backward: bool) -> None:
    """Torch path of the same formulas, fp32 arithmetic (fp64 for fp64), written into ``out``."""
    compute = torch.promote_types(x.dtype, torch.float32)
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    c, s = cos.unsqueeze(1).to(compute), sin.unsqueeze(1).to(compute)
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    x1, x2 = x[..., :half].to(compute), x[..., half:rotary_dim].to(compute)
    sa, sb = (s2, -s1) if backward else (-s1, s2)
    out[..., :half] = x1 * c1 + x2 * sa
    out[..., half:rotary_dim] = x2 * c2 + x1 * sb
    out[..., rotary_dim:] = x[..., rotary_dim:]


def _rope_apply(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    triton_path: bool,
    backward: bool,
) -> None:
    if q_out.numel() == 0 and k_out.numel() == 0:
        return
    if triton_path:
        _rope_triton(q, k, cos, sin, q_out, k_out, backward)
    else:
        _rotate_torch(q, cos, sin, q_out, backward)
        _rotate_torch(k, cos, sin, k_out, backward)


def _empty_like_layout(shape: torch.Size, stride: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(shape, stride, dtype=like.dtype, device=like.device)


class RopeFunction(torch.autograd.Function):
    """Autograd wrapper: saves cos and sin only; the outputs keep the memory layout of q and k."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, triton_path: bool):
        # empty_like keeps q's layout when q is dense (e.g. (B, T, H, D) memory behind a (B, H, T, D) view),
        # so the gradient can be produced in the layout the projection's backward reads without a copy.
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _rope_apply(q, k, cos, sin, q_out, k_out, triton_path, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.layouts = (q_out.shape, q_out.stride(), k_out.shape, k_out.stride())
        ctx.triton_path = triton_path
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        q_shape, q_stride, k_shape, k_stride = ctx.layouts
        dq, dk = _empty_like_layout(q_shape, q_stride, dq_out), _empty_like_layout(k_shape, k_stride, dk_out)
        _rope_apply(dq_out, dk_out, cos, sin, dq, dk, ctx.triton_path, backward=True)
        return dq, dk, None, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"rope: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"rope: {name} has dtype {x.dtype}; q, k, cos and sin must be floating point tensors")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"rope: q and k must be (batch, heads, seq_len, head_dim), got q {tuple(q.shape)} and k "
            f"{tuple(k.shape)}; transformers' layout is proj(x).view(B, T, H, D).transpose(1, 2)"
        )
    if q.dtype != k.dtype:
        raise ValueError(f"rope: q ({q.dtype}) and k ({k.dtype}) must have the same dtype")
    if cos.dtype != sin.dtype:
        raise ValueError(f"rope: cos ({cos.dtype}) and sin ({sin.dtype}) must have the same dtype")
    if len({x.device for x in (q, k, cos, sin)}) != 1:
        raise ValueError(f"rope: q, k, cos, sin must be on one device, got {q.device}, {k.device}, {cos.device}, "
                         f"{sin.device}")  # fmt: skip
    (batch, n_heads_q, seq_len, head_dim), n_heads_k = q.shape, k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(
            f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seq_len and head_dim "
            "(dims 0, 2 and 3 of (batch, heads, seq_len, head_dim))"
        )
    if n_heads_k == 0 or n_heads_q % n_heads_k:
        raise ValueError(
            f"rope: the query heads ({n_heads_q}, q {tuple(q.shape)}) must be a multiple of the key heads "
            f"({n_heads_k}, k {tuple(k.shape)}) for grouped-query attention"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
        raise ValueError(
            f"rope: cos/sin must be (1 or batch, seq_len, rotary_dim) = (1 or {batch}, {seq_len}, <= {head_dim}) "
            f"as transformers' rotary embedding returns them, got {tuple(cos.shape)} for q {tuple(q.shape)}; "
            "pass them without unsqueezing the head dim"
        )
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(
            f"rope: the rotary dim (cos/sin last dim, {rotary_dim}, cos {tuple(cos.shape)}) must be even and in "
            f"(0, head_dim = {head_dim}] (q {tuple(q.shape)})"
        )
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise NotImplementedError(
            "rope: gradients with respect to cos/sin are not computed; pass cos.detach(), sin.detach() "
            "(transformers' rotary embeddings never require grad), or use rope_reference"
        )


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embeddings to query and key heads: transformers' ``apply_rotary_pos_emb``.

    ``q`` is (B, Hq, T, D) and ``k`` is (B, Hk, T, D) with Hk dividing Hq (any strides with a unit-stride
    last dim, e.g. transformers' transposed projection views, are read in place); ``cos`` and ``sin`` are
    (1 or B, T, R) exactly as a transformers rotary embedding module returns them (rope scaling folded in;
    batch 1 = positions shared by all rows, batch B = per-row positions as in packed sequences). ``R < D``
    rotates the first R columns of each head and passes the rest through (Phi-style partial rotary).
    Arithmetic is fp32 (fp64 for fp64 inputs, which take the torch path), outputs have q's dtype and layout.
    The backward rotates the gradients by -θ and saves only cos and sin. GLM's interleaved convention
    (rotate pairs (2i, 2i+1)) is a different formula and is not what this computes.
    """
    _check_inputs(q, k, cos, sin)
    triton_path = use_triton(q) and q.dtype != torch.float64
    return RopeFunction.apply(q, k, cos, sin, triton_path)


# ----------------------------------------------------------------------------------------------------------
# Compile audit
# ----------------------------------------------------------------------------------------------------------


def audit_cases() -> list[AuditCase]:
    """Forward and backward launches at Llama-3-8B shapes: B=1, T=8192, 32 query / 8 kv heads, D=128, bf16.

    q and k are transformers' views ``proj(x).view(B, T, H, D).transpose(1, 2)``: strides (T*H*D, D, H*D, 1);
    outputs (and, in the backward, incoming gradients) share that layout. Bytes: read q, k, cos, sin once,
    write the two outputs once.
    """
    batch, seq_len, n_heads_q, n_heads_k, head_dim, elem = 1, 8192, 32, 8, 128, 2
    config = _launch_config(head_dim, head_dim, n_heads_q, n_heads_k)
    num_warps = config.pop("num_warps")
    q_strides = (seq_len * n_heads_q * head_dim, head_dim, n_heads_q * head_dim)
    k_strides = (seq_len * n_heads_k * head_dim, head_dim, n_heads_k * head_dim)
    args: dict[str, object] = {
        "q_ptr": Ptr("bf16"), "k_ptr": Ptr("bf16"), "q_out_ptr": Ptr("bf16"), "k_out_ptr": Ptr("bf16"),
        "cos_ptr": Ptr("bf16"), "sin_ptr": Ptr("bf16"),
        "n_heads_q": n_heads_q, "n_heads_k": n_heads_k,
        "cos_stride_b": 0, "cos_stride_t": head_dim,
    }  # fmt: skip
    for prefix, strides in (("q", q_strides), ("k", k_strides), ("q_out", q_strides), ("k_out", k_strides)):
        args.update({f"{prefix}_stride_b": strides[0], f"{prefix}_stride_h": strides[1],
                     f"{prefix}_stride_t": strides[2]})  # fmt: skip
    qk_elems = batch * seq_len * (n_heads_q + n_heads_k) * head_dim
    min_bytes = elem * (2 * qk_elems + 2 * seq_len * head_dim)
    shape = f"B={batch} T={seq_len} Hq={n_heads_q} Hk={n_heads_k} D={head_dim} bf16, q/k transposed views"
    return [
        AuditCase(
            name=f"rope_{direction}",
            kernel=_rope_kernel,
            args=args,
            constexprs={**config, "BACKWARD": direction == "backward"},
            num_warps=num_warps,
            shape=shape,
            min_bytes=min_bytes,
        )
        for direction in ("forward", "backward")
    ]
