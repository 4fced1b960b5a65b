"""Grouped GEMMs over expert-sorted rows: the building blocks of :mod:`fastft.kernels.moe_experts`.

Rows are (token, slot) pairs sorted by expert (:func:`route`): expert e owns sorted rows
``[offsets[e], offsets[e + 1])``. Two GEMM shapes cover every matmul of the MoE forward and backward:

- :func:`grouped_mm` (row GEMM): for each sorted row p of expert e,
  ``out[p'] = scale_p * gate(x[p''] W_e^T + b_e + s (x[p''] A_e^T) B_e^T)`` where the input row p'' is p or
  (``gather``) the pair's token, the output row p' is p or (``scatter``) the pair index t K + k, W_e is a
  logical (N, K) matrix given by any strided (E, N, K) view, and the gate (optional) folds 2 N' GEMM
  columns into N' outputs (or applies an activation to N outputs). The LoRA term reuses the loaded x tile:
  ``x A_e^T`` is a few more columns in the same K loop, then one (BM, r) x (r, BN) product in the epilogue.
- :func:`grouped_wgrad` (weight-gradient GEMM): ``out[e] = s sum_{p in e} (scale_p L[p])^T R[p]``, a
  reduction over the expert's rows, into any strided (E, M, N) view (so a gradient is written directly in
  its parameter's storage layout).

Each has a Triton implementation and a torch one (a loop over experts, with one host sync for the offsets);
both share :func:`route`. The gate's forward and hand-derived backward live here too (:func:`gate_backward`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastft.kernels._dispatch import triton_interpreted
from fastft.kernels._math import normal_cdf_pdf, sigmoid_pair
from fastft.kernels._spec import AuditCase, Ptr


class GateSpec(NamedTuple):
    """The gate between the two GEMMs (see :mod:`fastft.kernels.moe_experts`)."""

    act: str
    gated: bool = True
    interleaved: bool = False
    alpha: float = 1.702
    limit: float | None = None


class LoRAFactors(NamedTuple):
    """Per-expert factors for a logical (E, N, K) weight: A (E, r, K), B (E, N, r), any strides."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


class Routing(NamedTuple):
    """Pairs sorted by expert, computed on device without a host sync.

    ``order`` (S,) int32: the pair index t K + k of each sorted row; ``token`` (S,): its token; ``expert``
    (S,): its expert; ``offsets`` (E + 1,) int32: expert e owns sorted rows [offsets[e], offsets[e + 1]).
    """

    order: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    num_experts: int


def route(top_k_index: torch.Tensor, num_experts: int, *, triton: bool = False) -> Routing:
    """Sort the T K (token, slot) pairs by expert (stable, so equal experts keep token order)."""
    K = top_k_index.shape[1]
    ids = top_k_index.reshape(-1).long()
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return Routing(
        order=order.to(torch.int32),
        token=(order // K).to(torch.int32),
        expert=ids[order].to(torch.int32),
        offsets=offsets,
        counts=counts,
        num_experts=num_experts,
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------ gate (torch)


def _act_torch(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return torch.nn.functional.silu(x)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if act == "gelu":
        return torch.nn.functional.gelu(x)
    if act == "relu":
        return torch.relu(x)
    return torch.square(torch.relu(x))


def _gate_torch(gu: torch.Tensor, spec: GateSpec) -> torch.Tensor:
    if not spec.gated:
        return _act_torch(gu, spec.act)
    if spec.interleaved:
        gate, up = gu[..., ::2], gu[..., 1::2]
    else:
        gate, up = gu.chunk(2, dim=-1)
    if spec.limit is not None:
        gate = gate.clamp(max=spec.limit)
        up = up.clamp(min=-spec.limit, max=spec.limit)
    if spec.act == "gpt_oss":
        return (up + 1) * (gate * torch.sigmoid(gate * spec.alpha))
    return _act_torch(gate, spec.act) * up


def _gate_backward_torch(gu, gh, w_sorted, spec: GateSpec, dtype):
    # The torch path differentiates the elementwise gate with autograd (the Triton kernel holds the
    # hand-derived formulas and is tested against this).
    with torch.enable_grad():
        gu_ = gu.detach().requires_grad_(True)
        h_full = _gate_torch(gu_, spec)
        h = h_full.detach().to(dtype)
        dw = (gh * h.to(gh.dtype)).sum(-1)
        dh = gh * w_sorted.to(gh.dtype)[:, None]
        (dgu,) = torch.autograd.grad(h_full, gu_, dh)
    return h, dgu.to(dtype), dw


# ------------------------------------------------------------------------------------------ torch path


def _grouped_mm_torch(
    x,
    routing: Routing,
    weight,
    *,
    gather=False,
    bias=None,
    lora=None,
    gate=None,
    row_scale=None,
    scatter=False,
    out_dtype=None,
):
    cd = _compute_dtype(x.dtype)
    rows = x[routing.token.long()] if gather else x
    S = routing.order.numel()
    n_out = weight.shape[1]
    if gate is not None and gate.gated:
        n_out //= 2
    out = torch.zeros(S, n_out, dtype=out_dtype or x.dtype, device=x.device)
    offs = routing.offsets.tolist()
    order = routing.order.long()
    for e in range(routing.num_experts):
        a, b = offs[e], offs[e + 1]
        if a == b:
            continue
        xe = rows[a:b].to(cd)
        # As the kernel: the weight (and LoRA A) rounded to x's dtype, products accumulated in cd.
        acc = xe @ weight[e].to(x.dtype).to(cd).T
        if bias is not None:
            acc = acc + bias[e].to(cd)
        if lora is not None:
            acc = acc + lora.scaling * ((xe @ lora.A[e].to(x.dtype).to(cd).T) @ lora.B[e].to(cd).T)
        if gate is not None:
            acc = _gate_torch(acc, gate)
        if row_scale is not None:
            acc = acc * row_scale[a:b, None].to(cd)
        if scatter:
            out[order[a:b]] = acc.to(out.dtype)
        else:
            out[a:b] = acc.to(out.dtype)
    return out


def _grouped_wgrad_torch(
    left, right, routing: Routing, out, *, left_gather=False, right_gather=False, left_scale=None, scaling=1.0
):
    cd = _compute_dtype(left.dtype)
    tok = routing.token.long()
    L = left[tok] if left_gather else left
    R = right[tok] if right_gather else right
    offs = routing.offsets.tolist()
    for e in range(routing.num_experts):
        a, b = offs[e], offs[e + 1]
        if a == b:
            out[e].zero_()
            continue
        le = L[a:b].to(cd)
        if left_scale is not None:
            le = (le * left_scale[a:b, None].to(cd)).to(left.dtype).to(cd)  # rounded as the kernel
        out[e].copy_(scaling * (le.T @ R[a:b].to(cd)))
    return out


def _segment_sum_torch(x, routing: Routing, *, gather=False, row_scale=None):
    cd = _compute_dtype(x.dtype)
    rows = (x[routing.token.long()] if gather else x).to(cd)
    if row_scale is not None:
        rows = rows * row_scale[:, None].to(cd)
    out = torch.zeros(routing.num_experts, x.shape[1], dtype=cd, device=x.device)
    return out.index_add_(0, routing.expert.long(), rows)


_TORCH_OPS = SimpleNamespace(
    grouped_mm=_grouped_mm_torch,
    grouped_wgrad=_grouped_wgrad_torch,
    gate_backward=_gate_backward_torch,
    segment_sum=_segment_sum_torch,
)


def ops(use_triton: bool) -> SimpleNamespace:
    """The implementation set: Triton kernels or the torch path (same signatures, same results)."""
    return _TRITON_OPS if use_triton else _TORCH_OPS


# ------------------------------------------------------------------------------------------ Triton

_ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "gpt_oss": 3, "relu": 4, "relu2": 5}
_GATE_NONE, _GATE_GATED, _GATE_ACT = 0, 1, 2
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _act_fwd_bwd(x, ACT: tl.constexpr):
    """``(act(x), act'(x))`` in fp32: silu, gelu_tanh, gelu (erf), relu, relu2 (ACT codes as _ACT_CODES)."""
    if ACT == 0:  # silu = x s(x); d = s (1 + x (1 - s))
        s, one_minus_s = sigmoid_pair(x)
        return x * s, s * (1.0 + x * one_minus_s)
    elif ACT == 1:  # x p, p = (1 + tanh u) / 2 = s(2u), u = c (x + 0.044715 x^3); d = p + 2 x p (1 - p) u'
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        p, one_minus_p = sigmoid_pair(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        return x * p, p + 2.0 * x * p * one_minus_p * du
    elif ACT == 2:  # x Phi(x); d = Phi + x phi
        cdf, pdf = normal_cdf_pdf(x)
        return x * cdf, cdf + x * pdf
    elif ACT == 4:
        return tl.maximum(x, 0.0), tl.where(x > 0.0, 1.0, 0.0)
    else:  # relu2: relu(x)^2; d = 2 relu(x)
        r = tl.maximum(x, 0.0)
        return r * r, 2.0 * r


@triton.jit
def _gate_fwd_bwd(g, u, ACT: tl.constexpr, HAS_LIMIT: tl.constexpr, limit, alpha):
    """``(h, dh/dg, dh/du)`` of the gated unit on fp32 tiles, through the clamps (torch's clamp passes the
    gradient where the input lies inside the closed interval)."""
    if HAS_LIMIT:
        g_in = g <= limit
        u_in = (u >= -limit) & (u <= limit)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    if ACT == 3:  # gpt-oss: h = (u + 1) g s(alpha g); dh/dg = (u + 1) s (1 + alpha g (1 - s)); dh/du = g s
        s, one_minus_s = sigmoid_pair(alpha * g)
        glu = g * s
        h = (u + 1.0) * glu
        dg = (u + 1.0) * s * (1.0 + alpha * g * one_minus_s)
        du = glu
    else:
        a, da = _act_fwd_bwd(g, ACT)
        h = a * u
        dg = da * u
        du = a
    if HAS_LIMIT:
        dg = tl.where(g_in, dg, 0.0)
        du = tl.where(u_in, du, 0.0)
    return h, dg, du


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """``acc + a @ b``. DOT_F32 (only under the interpreter): Triton 3.9's interpreter multiplies bf16 tiles
    as raw integers, so they are widened first; bf16 x bf16 products are exact in fp32, so the result is
    what a GPU's bf16 MMA with fp32 accumulation computes."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _grouped_mm_kernel(
    x_ptr,
    stride_xm,
    stride_xk,
    token_ptr,
    order_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    w_ptr,
    stride_we,
    stride_wn,
    stride_wk,
    bias_ptr,
    stride_be,
    stride_bn,
    a_ptr,
    stride_ae,
    stride_ar,
    stride_ak,
    b_ptr,
    stride_bbe,
    stride_bbn,
    stride_bbr,
    scale_ptr,
    out_ptr,
    stride_om,
    stride_on,
    N,
    K,
    R,
    scaling,
    limit,
    alpha,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    GATE: tl.constexpr,
    ACT: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    # One (BM rows of one expert) x (BN output columns) tile. Memory traffic: the x rows (gathered by token
    # when GATHER) once per column tile, the expert's weight columns once per row tile, the output once.
    # With GATE == 1 the tile holds BN gate and BN up columns (two accumulators) and writes BN gated outputs,
    # so the (rows, 2N) pre-activation never reaches memory. LoRA: x A^T rides in the same K loop.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:  # a slot of the fixed-size grid with no tile behind it
        return
    row_start = tl.load(tile_start_ptr + pid_m)
    row_end = tl.load(tile_end_ptr + pid_m)
    rows = row_start + tl.arange(0, BM)
    mask_m = rows < row_end
    if GATHER:
        src = tl.load(token_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)  # int64 before multiplying by strides: rows * stride can pass 2^31
    cols = pid_n * BN + tl.arange(0, BN)
    mask_n = cols < N
    if GATE == 1:
        if INTERLEAVED:
            gcols = 2 * cols
            ucols = 2 * cols + 1
        else:
            gcols = cols
            ucols = cols + N
    else:
        gcols = cols
        ucols = cols
    e64 = expert.to(tl.int64)
    w_base = w_ptr + e64 * stride_we
    x_rows = x_ptr + src[:, None] * stride_xm
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    acc_r = tl.zeros((BM, BR), dtype=tl.float32)
    ranks = tl.arange(0, BR)
    mask_r = ranks < R
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        mask_k = ks < K
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(
            w_base + gcols[None, :] * stride_wn + ks[:, None] * stride_wk,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc_g = _dot(x, wg.to(x.dtype), acc_g, PREC, DOT_F32)
        if GATE == 1:
            wu = tl.load(
                w_base + ucols[None, :] * stride_wn + ks[:, None] * stride_wk,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc_u = _dot(x, wu.to(x.dtype), acc_u, PREC, DOT_F32)
        if HAS_LORA:
            a = tl.load(
                a_ptr + e64 * stride_ae + ranks[None, :] * stride_ar + ks[:, None] * stride_ak,
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )
            acc_r = _dot(x, a.to(x.dtype), acc_r, PREC, DOT_F32)
    if HAS_LORA:
        # + s (x A^T) B^T: (BM, r) x (r, BN) in fp32 (r is small, the fp32 product costs nothing).
        xa = acc_r * scaling
        b_base = b_ptr + e64 * stride_bbe + ranks[:, None] * stride_bbr
        bg = tl.load(b_base + gcols[None, :] * stride_bbn, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc_g = tl.dot(xa, bg.to(tl.float32), acc_g, input_precision="ieee")
        if GATE == 1:
            bu = tl.load(b_base + ucols[None, :] * stride_bbn, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc_u = tl.dot(xa, bu.to(tl.float32), acc_u, input_precision="ieee")
    if HAS_BIAS:
        bias_base = bias_ptr + e64 * stride_be
        acc_g += tl.load(bias_base + gcols * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATE == 1:
            acc_u += tl.load(bias_base + ucols * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATE == 1:
        out, _dg, _du = _gate_fwd_bwd(acc_g, acc_u, ACT, HAS_LIMIT, limit, alpha)
    elif GATE == 2:
        out, _d = _act_fwd_bwd(acc_g, ACT)
    else:
        out = acc_g
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    if SCATTER:
        dst = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    else:
        dst = rows.to(tl.int64)
    tl.store(
        out_ptr + dst[:, None] * stride_om + cols[None, :] * stride_on,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _grouped_wgrad_kernel(
    l_ptr,
    stride_lm,
    stride_lk,
    r_ptr,
    stride_rm,
    stride_rk,
    token_ptr,
    offsets_ptr,
    scale_ptr,
    out_ptr,
    stride_oe,
    stride_om,
    stride_on,
    M,
    N,
    scaling,
    L_GATHER: tl.constexpr,
    R_GATHER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # out[e] tile (BM, BN) = s sum over the expert's rows p of (scale_p L[p])^T R[p]. Traffic: the expert's
    # rows of L (BM columns) and R (BN columns) once per output tile, the tile once. An expert with no row
    # writes zeros (its gradient is zero, not stale memory).
    expert = tl.program_id(0)
    pid = tl.program_id(1)
    n_tiles_n = tl.cdiv(N, BN)
    ms = (pid // n_tiles_n) * BM + tl.arange(0, BM)
    ns = (pid % n_tiles_n) * BN + tl.arange(0, BN)
    mask_m = ms < M
    mask_n = ns < N
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for p0 in range(row_start, row_end, BK):
        ps = p0 + tl.arange(0, BK)
        mask_p = ps < row_end
        if L_GATHER:
            lsrc = tl.load(token_ptr + ps, mask=mask_p, other=0).to(tl.int64)
        else:
            lsrc = ps.to(tl.int64)
        if R_GATHER:
            rsrc = tl.load(token_ptr + ps, mask=mask_p, other=0).to(tl.int64)
        else:
            rsrc = ps.to(tl.int64)
        lt = tl.load(
            l_ptr + lsrc[None, :] * stride_lm + ms[:, None] * stride_lk,
            mask=mask_m[:, None] & mask_p[None, :],
            other=0.0,
        )  # (BM, BK): L^T
        r = tl.load(
            r_ptr + rsrc[:, None] * stride_rm + ns[None, :] * stride_rk,
            mask=mask_p[:, None] & mask_n[None, :],
            other=0.0,
        )  # (BK, BN)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + ps, mask=mask_p, other=0.0).to(tl.float32)
            lt = (lt.to(tl.float32) * scale[None, :]).to(lt.dtype)
        if UPCAST:
            acc = tl.dot(lt.to(tl.float32), r.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = _dot(lt, r, acc, PREC, DOT_F32)
    acc = acc * scaling
    tl.store(
        out_ptr + expert.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _gate_backward_kernel(
    gu_ptr,
    stride_gum,
    gh_ptr,
    stride_ghm,
    scale_ptr,
    h_ptr,
    stride_hm,
    dgu_ptr,
    stride_dgum,
    dw_ptr,
    S,
    N,
    limit,
    alpha,
    GATE: tl.constexpr,
    ACT: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    # Elementwise over BM rows, looping over the N gated columns: reads gu (the recomputed pre-activation,
    # fp32) and gh (dL/dh / w, fp32), writes h (rounded as in forward), dgu = gate'(gu) w gh and the
    # router-weight gradient dw = gh . h (a row reduction, so a program owns whole rows).
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    mask_m = rows < S
    r64 = rows.to(tl.int64)
    w = tl.load(scale_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
    dw = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, N, BN):
        cols = c0 + tl.arange(0, BN)
        mask = mask_m[:, None] & (cols < N)[None, :]
        if GATE == 1:
            if INTERLEAVED:
                gcols = 2 * cols
                ucols = 2 * cols + 1
            else:
                gcols = cols
                ucols = cols + N
        else:
            gcols = cols
            ucols = cols
        gh = tl.load(gh_ptr + r64[:, None] * stride_ghm + cols[None, :], mask=mask, other=0.0)
        g = tl.load(gu_ptr + r64[:, None] * stride_gum + gcols[None, :], mask=mask, other=0.0)
        if GATE == 1:
            u = tl.load(gu_ptr + r64[:, None] * stride_gum + ucols[None, :], mask=mask, other=0.0)
            h, dg, du = _gate_fwd_bwd(g, u, ACT, HAS_LIMIT, limit, alpha)
        else:
            h, dg = _act_fwd_bwd(g, ACT)
            du = dg
        h_low = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + r64[:, None] * stride_hm + cols[None, :], h_low, mask=mask)
        dw += tl.sum(gh * h_low.to(tl.float32), axis=1)
        dh = gh * w[:, None]
        tl.store(
            dgu_ptr + r64[:, None] * stride_dgum + gcols[None, :], (dg * dh).to(dgu_ptr.dtype.element_ty), mask=mask
        )
        if GATE == 1:
            tl.store(
                dgu_ptr + r64[:, None] * stride_dgum + ucols[None, :], (du * dh).to(dgu_ptr.dtype.element_ty), mask=mask
            )
    tl.store(dw_ptr + rows, dw, mask=mask_m)


# Launch heuristics. On a GPU: 64-row tiles (an expert in a 30B-A3B-size step gets hundreds of rows),
# 64 columns (two fp32 accumulators of 64x64 plus LoRA's 64xBR fit a 4-warp CTA's registers), K steps
# of 32 (64 for 16-bit inputs would double the smem stages). Under the interpreter each program costs
# Python overhead, so tiles are as large as the test shapes allow.
_BM = 64
_BN = 64
_BK = 32
_GATE_BM = 16
_GATE_BN = 128


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would miss the 1e-5 contract); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _tile_table(routing: Routing, block_m: int):
    """(expert, first row, end row) of each BM-row tile, -1 for the unused slots of the fixed-size grid.

    The grid has ceil(S / BM) + E slots, an upper bound of sum_e ceil(n_e / BM), so no count leaves the
    device; everything here is a handful of E- and grid-sized tensor ops.
    """
    E = routing.num_experts
    S = routing.order.numel()
    device = routing.order.device
    tiles = (routing.counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    slots = torch.arange(triton.cdiv(S, block_m) + E, device=device)
    expert = torch.searchsorted(ends, slots, right=True)
    ec = expert.clamp(max=E - 1)
    offsets = routing.offsets.long()
    start = offsets[ec] + (slots - (ends[ec] - tiles[ec])) * block_m
    end = offsets[ec + 1]
    expert = torch.where(expert < E, expert, -1)
    return expert.to(torch.int32), start.to(torch.int32), end.to(torch.int32), slots.numel()


def _grouped_mm_triton(
    x,
    routing: Routing,
    weight,
    *,
    gather=False,
    bias=None,
    lora=None,
    gate=None,
    row_scale=None,
    scatter=False,
    out_dtype=None,
):
    S = routing.order.numel()
    n_gemm, K = weight.shape[1], weight.shape[2]
    gate_mode = _GATE_NONE if gate is None else (_GATE_GATED if gate.gated else _GATE_ACT)
    N = n_gemm // 2 if gate_mode == _GATE_GATED else n_gemm
    out = torch.empty(S, N, dtype=out_dtype or x.dtype, device=x.device)
    if S == 0 or N == 0:
        return out
    if K == 0:
        return _grouped_mm_torch(
            x,
            routing,
            weight,
            gather=gather,
            bias=bias,
            lora=lora,
            gate=gate,
            row_scale=row_scale,
            scatter=scatter,
            out_dtype=out_dtype,
        )
    tile_expert, tile_start, tile_end, n_slots = _tile_table(routing, _BM)
    dummy = out
    A = lora.A if lora is not None else dummy.new_empty((1, 1, 1))
    B = lora.B if lora is not None else dummy.new_empty((1, 1, 1))
    r = lora.A.shape[1] if lora is not None else 0
    b = bias if bias is not None else dummy.new_empty((1, 1))
    grid = (n_slots, triton.cdiv(N, _BN))
    _grouped_mm_kernel[grid](
        x,
        x.stride(0),
        x.stride(1),
        routing.token,
        routing.order,
        tile_expert,
        tile_start,
        tile_end,
        weight,
        weight.stride(0),
        weight.stride(1),
        weight.stride(2),
        b,
        b.stride(0),
        b.stride(1),
        A,
        A.stride(0),
        A.stride(1),
        A.stride(2),
        B,
        B.stride(0),
        B.stride(1),
        B.stride(2),
        row_scale if row_scale is not None else dummy,
        out,
        out.stride(0),
        out.stride(1),
        N,
        K,
        r,
        float(lora.scaling) if lora is not None else 1.0,
        float(gate.limit) if gate is not None and gate.limit is not None else 0.0,
        float(gate.alpha) if gate is not None else 1.0,
        GATHER=gather,
        SCATTER=scatter,
        HAS_BIAS=bias is not None,
        HAS_LORA=lora is not None,
        HAS_SCALE=row_scale is not None,
        GATE=gate_mode,
        ACT=_ACT_CODES[gate.act] if gate is not None else 0,
        INTERLEAVED=bool(gate is not None and gate.interleaved),
        HAS_LIMIT=bool(gate is not None and gate.limit is not None),
        PREC=_prec(x.dtype),
        DOT_F32=triton_interpreted(),
        BM=_BM,
        BN=_BN,
        BK=_BK,
        BR=_rank_block(r),
    )
    return out


def _grouped_wgrad_triton(
    left, right, routing: Routing, out, *, left_gather=False, right_gather=False, left_scale=None, scaling=1.0
):
    E, M, N = out.shape
    if M == 0 or N == 0:
        return out
    grid = (E, triton.cdiv(M, _BM) * triton.cdiv(N, _BN))
    _grouped_wgrad_kernel[grid](
        left,
        left.stride(0),
        left.stride(1),
        right,
        right.stride(0),
        right.stride(1),
        routing.token,
        routing.offsets,
        left_scale if left_scale is not None else out,
        out,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        M,
        N,
        float(scaling),
        L_GATHER=left_gather,
        R_GATHER=right_gather,
        HAS_SCALE=left_scale is not None,
        UPCAST=left.dtype != right.dtype,
        PREC=_prec(left.dtype),
        DOT_F32=triton_interpreted(),
        BM=_BM,
        BN=_BN,
        BK=_BK,
    )
    return out


def _gate_backward_triton(gu, gh, w_sorted, spec: GateSpec, dtype):
    S, N = gh.shape
    h = torch.empty(S, N, dtype=dtype, device=gh.device)
    dgu = torch.empty(gu.shape, dtype=dtype, device=gh.device)
    dw = torch.empty(S, dtype=torch.float32, device=gh.device)
    if S == 0:
        return h, dgu, dw
    _gate_backward_kernel[(triton.cdiv(S, _GATE_BM),)](
        gu,
        gu.stride(0),
        gh,
        gh.stride(0),
        w_sorted,
        h,
        h.stride(0),
        dgu,
        dgu.stride(0),
        dw,
        S,
        N,
        float(spec.limit) if spec.limit is not None else 0.0,
        float(spec.alpha),
        GATE=_GATE_GATED if spec.gated else _GATE_ACT,
        ACT=_ACT_CODES[spec.act],
        INTERLEAVED=spec.interleaved,
        HAS_LIMIT=spec.limit is not None,
        BM=_GATE_BM,
        BN=_GATE_BN,
    )
    return h, dgu, dw


_TRITON_OPS = SimpleNamespace(
    grouped_mm=_grouped_mm_triton,
    grouped_wgrad=_grouped_wgrad_triton,
    gate_backward=_gate_backward_triton,
    segment_sum=_segment_sum_torch,  # (E, N) bias gradients: one index_add, no host sync
)


# ------------------------------------------------------------------------------------------ audit


def _audit_shape(tag: str, H: int, I: int, E: int, K: int, *, gpt_oss: bool) -> list[AuditCase]:
    cases = []
    T, r = 8192, 16
    S = T * K
    S // _BM + E
    common = {
        "token_ptr": Ptr("i32"),
        "order_ptr": Ptr("i32"),
        "tile_expert_ptr": Ptr("i32"),
        "tile_start_ptr": Ptr("i32"),
        "tile_end_ptr": Ptr("i32"),
        "R": r,
        "scaling": 2.0,
        "limit": 7.0,
        "alpha": 1.702,
        "BM": _BM,
        "BN": _BN,
        "BK": _BK,
        "BR": _rank_block(r),
        "PREC": "tf32",
        "DOT_F32": False,
    }
    # logical (E, N, K) weight strides: HF layout (E, out, in) -> (out*in, in, 1); gpt-oss (E, in, out)
    gu_strides = (2 * I * H, 1, 2 * I) if gpt_oss else (2 * I * H, H, 1)
    d_strides = (H * I, 1, H) if gpt_oss else (H * I, I, 1)

    def mm(name, N, Kd, w_strides, *, gather, scatter, bias, scale, gate, lora, x_cols, out_dtype, out_cols, min_bytes):
        flags = {
            "GATHER": gather,
            "SCATTER": scatter,
            "HAS_BIAS": bias,
            "HAS_LORA": lora,
            "HAS_SCALE": scale,
            "GATE": gate,
            "ACT": 3 if gpt_oss else 0,
            "INTERLEAVED": gpt_oss,
            "HAS_LIMIT": gpt_oss,
        }
        args = dict(
            common,
            **flags,
            x_ptr=Ptr("bf16"),
            stride_xm=x_cols,
            stride_xk=1,
            w_ptr=Ptr("bf16"),
            stride_we=w_strides[0],
            stride_wn=w_strides[1],
            stride_wk=w_strides[2],
            bias_ptr=Ptr("bf16"),
            stride_be=N * (2 if gate == 1 else 1),
            stride_bn=1,
            a_ptr=Ptr("bf16"),
            stride_ae=r * Kd,
            stride_ar=Kd,
            stride_ak=1,
            b_ptr=Ptr("bf16"),
            stride_bbe=N * r,
            stride_bbn=r,
            stride_bbr=1,
            scale_ptr=Ptr("bf16"),
            out_ptr=Ptr(out_dtype),
            stride_om=out_cols,
            stride_on=1,
            N=N,
            K=Kd,
        )
        constexprs = {k: args[k] for k in (*flags, "PREC", "DOT_F32", "BM", "BN", "BK", "BR")}
        cases.append(
            AuditCase(
                name=f"moe_{name}_{tag}",
                kernel=_grouped_mm_kernel,
                args=args,
                constexprs=constexprs,
                num_warps=4,
                num_stages=3,
                shape=f"T={T} H={H} I={I} E={E} K={K} bf16",
                min_bytes=min_bytes,
            )
        )

    lora_gu = E * r * (H + 2 * I) * 2
    lora_d = E * r * (I + H) * 2
    mm(
        "gate_up_fwd",
        I,
        H,
        gu_strides,
        gather=True,
        scatter=False,
        bias=gpt_oss,
        scale=False,
        gate=1,
        lora=True,
        x_cols=H,
        out_dtype="bf16",
        out_cols=I,
        min_bytes=S * H * 2 + E * 2 * I * H * 2 + lora_gu + S * I * 2,
    )
    mm(
        "down_fwd",
        H,
        I,
        d_strides,
        gather=False,
        scatter=True,
        bias=gpt_oss,
        scale=True,
        gate=0,
        lora=True,
        x_cols=I,
        out_dtype="fp32",
        out_cols=H,
        min_bytes=S * I * 2 + E * H * I * 2 + lora_d + S * 2 + S * H * 4,
    )
    mm(
        "gate_up_recompute",
        2 * I,
        H,
        gu_strides,
        gather=True,
        scatter=False,
        bias=gpt_oss,
        scale=False,
        gate=0,
        lora=True,
        x_cols=H,
        out_dtype="fp32",
        out_cols=2 * I,
        min_bytes=S * H * 2 + E * 2 * I * H * 2 + lora_gu + S * 2 * I * 4,
    )
    mm(
        "down_dgrad",
        I,
        H,
        (d_strides[0], d_strides[2], d_strides[1]),
        gather=True,
        scatter=False,
        bias=False,
        scale=False,
        gate=0,
        lora=True,
        x_cols=H,
        out_dtype="fp32",
        out_cols=I,
        min_bytes=S * H * 2 + E * H * I * 2 + lora_d + S * I * 4,
    )
    mm(
        "gate_up_dgrad",
        H,
        2 * I,
        (gu_strides[0], gu_strides[2], gu_strides[1]),
        gather=False,
        scatter=True,
        bias=False,
        scale=False,
        gate=0,
        lora=True,
        x_cols=2 * I,
        out_dtype="fp32",
        out_cols=H,
        min_bytes=S * 2 * I * 2 + E * 2 * I * H * 2 + lora_gu + S * H * 4,
    )
    wgrad = {
        "l_ptr": Ptr("bf16"),
        "r_ptr": Ptr("bf16"),
        "token_ptr": Ptr("i32"),
        "offsets_ptr": Ptr("i32"),
        "scale_ptr": Ptr("bf16"),
        "out_ptr": Ptr("bf16"),
        "scaling": 1.0,
        "UPCAST": False,
        "PREC": "tf32",
        "DOT_F32": False,
        "BM": _BM,
        "BN": _BN,
        "BK": _BK,
    }
    wconst = ("L_GATHER", "R_GATHER", "HAS_SCALE", "UPCAST", "PREC", "DOT_F32", "BM", "BN", "BK")
    # dW_down (E, H, I) = sum (w g)^T h: g gathered by token and scaled, h sorted
    args = dict(
        wgrad,
        stride_lm=H,
        stride_lk=1,
        stride_rm=I,
        stride_rk=1,
        stride_oe=d_strides[0],
        stride_om=d_strides[1],
        stride_on=d_strides[2],
        M=H,
        N=I,
        L_GATHER=True,
        R_GATHER=False,
        HAS_SCALE=True,
    )
    cases.append(
        AuditCase(
            name=f"moe_down_wgrad_{tag}",
            kernel=_grouped_wgrad_kernel,
            args=args,
            constexprs={k: args[k] for k in wconst},
            num_warps=4,
            num_stages=3,
            shape=f"T={T} H={H} I={I} E={E} K={K} bf16",
            min_bytes=S * H * 2 + S * 2 + S * I * 2 + E * H * I * 2,
        )
    )
    # dW_gate_up (E, 2I, H) = sum dgu^T x: dgu sorted, x gathered
    args = dict(
        wgrad,
        stride_lm=2 * I,
        stride_lk=1,
        stride_rm=H,
        stride_rk=1,
        stride_oe=gu_strides[0],
        stride_om=gu_strides[1],
        stride_on=gu_strides[2],
        M=2 * I,
        N=H,
        L_GATHER=False,
        R_GATHER=True,
        HAS_SCALE=False,
    )
    cases.append(
        AuditCase(
            name=f"moe_gate_up_wgrad_{tag}",
            kernel=_grouped_wgrad_kernel,
            args=args,
            constexprs={k: args[k] for k in wconst},
            num_warps=4,
            num_stages=3,
            shape=f"T={T} H={H} I={I} E={E} K={K} bf16",
            min_bytes=S * 2 * I * 2 + S * H * 2 + E * 2 * I * H * 2,
        )
    )
    gb = {
        "gu_ptr": Ptr("fp32"),
        "stride_gum": 2 * I,
        "gh_ptr": Ptr("fp32"),
        "stride_ghm": I,
        "scale_ptr": Ptr("bf16"),
        "h_ptr": Ptr("bf16"),
        "stride_hm": I,
        "dgu_ptr": Ptr("bf16"),
        "stride_dgum": 2 * I,
        "dw_ptr": Ptr("fp32"),
        "S": S,
        "N": I,
        "limit": 7.0,
        "alpha": 1.702,
        "GATE": 1,
        "ACT": 3 if gpt_oss else 0,
        "INTERLEAVED": gpt_oss,
        "HAS_LIMIT": gpt_oss,
        "BM": _GATE_BM,
        "BN": _GATE_BN,
    }
    cases.append(
        AuditCase(
            name=f"moe_gate_backward_{tag}",
            kernel=_gate_backward_kernel,
            args=gb,
            constexprs={k: gb[k] for k in ("GATE", "ACT", "INTERLEAVED", "HAS_LIMIT", "BM", "BN")},
            num_warps=4,
            num_stages=1,
            shape=f"S={S} I={I}",
            min_bytes=S * (2 * I * 4 + I * 4 + 2 + I * 2 + 2 * I * 2 + 4),
        )
    )
    return cases


def audit_cases() -> list[AuditCase]:
    """The grouped kernels at Qwen3-30B-A3B's expert shape (H 2048, I 768, E 128, top-8) and gpt-oss-20b's
    (H 2880, I 2880, E 32, top-4, biases, interleaved clamped SwiGLU, transposed stacks), 8192 tokens, bf16,
    LoRA rank 16 on every GEMM. ``min_bytes``: each launch's own reads and writes (weights once, rows once)."""
    cases = [
        *_audit_shape("qwen3_30b_a3b", 2048, 768, 128, 8, gpt_oss=False),
        *_audit_shape("gpt_oss_20b", 2880, 2880, 32, 4, gpt_oss=True),
    ]
    # Six launches, 12 rows, to keep the suite's audit time down: each kernel in its heaviest variant. The
    # variants left out differ only by flag flips of these and were audited once (2026-12-05, triton 3.9, sm80
    # / sm90 regs, 0 spills each): gate_up_recompute 128/96, down_dgrad 140/96,
    # gate_up_wgrad 96/58, gate_backward_qwen3 96/101, down_fwd_gpt_oss 128/128.
    keep = {
        "moe_gate_up_fwd_gpt_oss_20b",  # GATE=1 + LoRA + bias + interleaved clamped SwiGLU: the most registers
        "moe_down_fwd_qwen3_30b_a3b",  # row scale, scatter (un-permute), fp32 out, LoRA
        "moe_gate_up_dgrad_qwen3_30b_a3b",  # transposed-role weight, scatter, LoRA with swapped factors
        "moe_down_wgrad_qwen3_30b_a3b",  # gathered, scaled left operand
        "moe_gate_backward_gpt_oss_20b",  # clamped gate derivative, router-weight reduction
        "moe_gate_up_fwd_qwen3_30b_a3b",  # SiLU gate, 128 experts
    }
    return [c for c in cases if c.name in keep]
