"""Routed mixture-of-experts experts: grouped GEMMs over expert-sorted rows, fused gate, LoRA inside the matmuls.

Layouts (those of transformers 5.25's ``@use_experts_implementation`` experts modules, see
``transformers/integrations/moe.py``), with T tokens, H hidden, I intermediate, E experts, K = top-k::

    hidden          (T, H)          top_k_index (T, K) integer in [0, E)      top_k_weights (T, K) float
    gate_up         (E, 2I, H)      transposed=True: (E, H, 2I)   (gpt-oss, ``is_transposed``)
                    ungated experts (``has_gate=False``, the ``up_proj`` parameter): (E, I, H) / (E, H, I)
    down            (E, H, I)       transposed=True: (E, I, H)
    gate_up_bias    (E, 2I) or None (ungated: (E, I))             down_bias (E, H) or None   (gpt-oss)

The 2I output columns of gate_up are ``[gate | up]`` halves (``is_concatenated=True``, Qwen3-MoE, Mixtral,
DeepSeek...) or interleaved ``gate0, up0, gate1, up1, ...`` (``interleaved=True``, gpt-oss).

Forward, for every (token t, slot k) pair p with expert e = top_k_index[t, k] and weight w = top_k_weights[t, k]
(``Wgu_e``, ``Wd_e`` the logical (out, in) matrices, whatever the storage layout)::

    gu_p = x_t Wgu_e^T + bgu_e + s_gu (x_t Agu_e^T) Bgu_e^T                (2I,)
    h_p  = gate(gu_p)                                                      (I,)
    y_t  = sum_k w_p (h_p Wd_e^T + bd_e + s_d (h_p Ad_e^T) Bd_e^T)          (H,)

gate(): ``act(g) * u`` with act in {"silu", "gelu_tanh", "gelu"}; with ``limit`` (DeepSeek-V4, GLM-5-next)
g is first clamped to (-inf, limit] and u to [-limit, limit]. ``act="gpt_oss"``: g, u clamped the same
way (limit=7 in gpt-oss), ``h = (u + 1) * g * sigmoid(alpha g)``. Ungated experts (``gated=False``):
``h = act(gu)`` with act in {"silu", "gelu_tanh", "gelu", "relu", "relu2"}.

LoRA (:class:`MoELoRA`): PEFT's ``target_parameters`` adapters on ``gate_up_proj`` / ``down_proj``, per
expert, in the orientation of the logical (out, in) matrix: ``A (E, r, in)``, ``B (E, out, r)``; the effective
weight is ``W_e + s B_e A_e`` (PEFT's ``get_delta_weight``), but neither it nor any (E, out, in) delta is ever
formed: ``x A_e^T`` (a few more columns in the same K loop as the base GEMM) and its product with B_e are
added inside the grouped GEMMs. :func:`peft_factors` turns PEFT's ``lora_A.weight (E r, in)`` and
``lora_B.weight (out, r E)`` into these views without copying. Only active adapters are passed; a disabled
adapter (``disable_adapter()``) is simply ``lora=None``. For the interleaved layout, B's output rows are in
the parameter's own (interleaved) order, as PEFT's.

Dtypes: hidden, gate_up, down and the biases share one dtype (bf16/fp16/fp32, float64 on the torch path);
top_k_weights and the LoRA factors may be any float dtype (gradients come back in each tensor's dtype). GEMMs
accumulate in fp32; gu and the gate are computed in fp32 and h is rounded once to the hidden dtype (transformers
rounds gu to it first: one rounding more); the per-pair outputs ``w_p y_p`` are summed over k in fp32 and rounded
once, as transformers' ``grouped_mm`` path. A LoRA A enters its GEMM rounded to the hidden dtype (PEFT's
ParamWrapper casts both factors to the parameter's dtype); the (rows, r) product meets B in fp32. Under
``torch.autocast`` the GEMM operands are cast to the autocast dtype first, as ``F.linear`` would be.

How (the Triton path, :mod:`fastft.kernels.grouped_matmul`): the T K pairs are sorted by expert on device
(stable argsort, bincount, cumsum; no host sync), so each expert's rows are contiguous; a fixed-size grid of
row tiles (at most ``ceil(TK / BM) + E``) maps each tile to its expert through a small device table. Forward
is two launches: gate/up GEMM gathering the token rows, + bias + LoRA + gate, writing h (TK, I) in sorted
order; down GEMM + bias + LoRA, times w, written back in (t, k) order; a sum over k gives y.

Backward, with g_t = dL/dy_t, for each pair (sorted order)::

    gh_p  = g_t Wd_e + s_d (g_t Bd_e) Ad_e                (I,)  dL/dh_p divided by w_p
    dw_p  = gh_p . h_p + g_t . bd_e                        router-weight gradient
    dh_p  = w_p gh_p;  dgu_p = gate'(gu_p) dh_p            (2I,) (product rule through the clamps/act)
    dx_t  = sum_k [dgu_p Wgu_e + s_gu (dgu_p Bgu_e) Agu_e]
    dWd_e = sum_p (w_p g_t)^T h_p      dbd_e = sum_p w_p g_t        dWgu_e = sum_p dgu_p^T x_t    dbgu_e = sum_p dgu_p
    dBd_e = s_d sum_p (w_p g_t)^T (h_p Ad_e^T)   dAd_e = s_d sum_p (w_p g_t Bd_e)^T h_p   (the same for gu, with
    x_t for h_p and dgu_p for w_p g_t)

Saved for backward: hidden (the caller's tensor, no copy), top_k_index and top_k_weights (T K elements each),
and the parameters (no memory of their own). Nothing of size TK x H or TK x I is kept: the expert sort is
redone (a few TK-element integer ops) and gu is recomputed by one grouped GEMM, as cheap as one forward GEMM
and far smaller than keeping gu, h and the down GEMM's input per pair (which transformers' eager and
grouped_mm paths keep, each several TK x I and TK x H tensors). Transient in backward: gu (TK, 2I) fp32,
gh (TK, I) fp32, h and dgu in the hidden dtype, the per-pair dx (TK, H) fp32 and (TK, r) LoRA products.

Weight gradients are computed only when asked (a frozen expert stack gets no (E, out, in) buffer); with LoRA
only A and B get gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastft.kernels import grouped_matmul as gm
from fastft.kernels._dispatch import use_triton

GATED_ACTS = ("silu", "gelu_tanh", "gelu", "gpt_oss")
UNGATED_ACTS = ("silu", "gelu_tanh", "gelu", "relu", "relu2")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class MoELoRA:
    """Active LoRA factors on the experts, per expert, for the logical (out, in) weight of each projection.

    ``gate_up_A (E, r, H)``, ``gate_up_B (E, 2I, r)`` (ungated: ``(E, I, r)``), ``down_A (E, r_d, I)``,
    ``down_B (E, H, r_d)``; the effective weight is ``W_e + scaling * B_e @ A_e``. Either projection may be
    absent (both factors None). Strided views are fine (see :func:`peft_factors`).
    """

    gate_up_A: torch.Tensor | None = None
    gate_up_B: torch.Tensor | None = None
    gate_up_scaling: float = 1.0
    down_A: torch.Tensor | None = None
    down_B: torch.Tensor | None = None
    down_scaling: float = 1.0


def peft_factors(lora_A_weight: torch.Tensor, lora_B_weight: torch.Tensor, num_experts: int):
    """PEFT ``ParamWrapper`` weights -> ``(A (E, r, in), B (E, out, r))`` views, no copy.

    PEFT keeps ``lora_A.weight`` as (r * E, in) (expert-major) and ``lora_B.weight`` as (out, r * E) (expert
    minor), see ``ParamWrapper.get_delta_factors``; gradients flow back to them through the views.
    """
    rank_e, in_features = lora_A_weight.shape
    out_features = lora_B_weight.shape[0]
    if rank_e % num_experts or lora_B_weight.shape[1] != rank_e:
        raise ValueError(
            f"peft_factors: lora_A.weight {tuple(lora_A_weight.shape)} and lora_B.weight "
            f"{tuple(lora_B_weight.shape)} are not (r*{num_experts}, in) and (out, r*{num_experts})"
        )
    r = rank_e // num_experts
    A = lora_A_weight.view(num_experts, r, in_features)
    B = lora_B_weight.view(out_features, r, num_experts).permute(2, 0, 1)
    return A, B


# ------------------------------------------------------------------------------------------ reference


def _act_reference(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "gelu":
        return F.gelu(x)
    if act == "relu":
        return F.relu(x)
    return torch.square(F.relu(x))  # relu2


def _gate_reference(gu, *, act, gated, interleaved, alpha, limit):
    if not gated:
        return _act_reference(gu, act)
    if interleaved:
        gate, up = gu[..., ::2], gu[..., 1::2]
    else:
        gate, up = gu.chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    if act == "gpt_oss":
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return _act_reference(gate, act) * up


def moe_experts_reference(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    *,
    act: str = "silu",
    gated: bool = True,
    transposed: bool = False,
    interleaved: bool = False,
    alpha: float = 1.702,
    limit: float | None = None,
    lora: MoELoRA | None = None,
) -> torch.Tensor:
    """The semantics in plain differentiable PyTorch (an expert loop, like transformers' eager experts).

    Everything is computed in hidden's dtype (top-k weights and LoRA factors are cast to it); with float64
    inputs it is the exact formula of the module docstring, the oracle of the tests.
    """
    dtype = hidden.dtype
    lora = lora or MoELoRA()
    out = torch.zeros_like(hidden)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        w_gu = gate_up[e].T if transposed else gate_up[e]  # (out, in)
        w_d = down[e].T if transposed else down[e]
        if lora.gate_up_A is not None:
            w_gu = w_gu + lora.gate_up_scaling * (lora.gate_up_B[e].to(dtype) @ lora.gate_up_A[e].to(dtype))
        if lora.down_A is not None:
            w_d = w_d + lora.down_scaling * (lora.down_B[e].to(dtype) @ lora.down_A[e].to(dtype))
        gu = hidden[tok] @ w_gu.T
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e]
        h = _gate_reference(gu, act=act, gated=gated, interleaved=interleaved, alpha=alpha, limit=limit)
        y = h @ w_d.T
        if down_bias is not None:
            y = y + down_bias[e]
        out = out.index_add(0, tok, y * top_k_weights[tok, slot, None].to(dtype))
    return out


# ------------------------------------------------------------------------------------------ checks


class _Config(NamedTuple):
    """Everything the autograd Function needs besides tensors (hashable)."""

    gate: gm.GateSpec
    transposed: bool
    gu_scaling: float
    d_scaling: float
    triton: bool


def _shape(t) -> str:
    return str(tuple(t.shape))


def _check(
    hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, act, gated, transposed, limit, lora
) -> None:
    def fail(msg: str):
        raise ValueError(f"moe_experts: {msg}")

    for name, t in (
        ("hidden", hidden),
        ("top_k_index", top_k_index),
        ("top_k_weights", top_k_weights),
        ("gate_up", gate_up),
        ("down", down),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"moe_experts: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        fail(f"hidden must be (tokens, hidden) 2-D, got shape {_shape(hidden)}; flatten batch and sequence first")
    if hidden.dtype not in _FLOAT_DTYPES:
        fail(f"hidden has dtype {hidden.dtype}; use float32, bfloat16, float16 or float64")
    T, H = hidden.shape
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T:
        fail(f"top_k_index must be (tokens={T}, top_k), got shape {_shape(top_k_index)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype.is_complex or top_k_index.dtype == torch.bool:
        fail(f"top_k_index must be an integer tensor (the router's topk indices), got {top_k_index.dtype}")
    if top_k_weights.shape != top_k_index.shape:
        fail(f"top_k_weights must have top_k_index's shape {_shape(top_k_index)}, got {_shape(top_k_weights)}")
    if not top_k_weights.dtype.is_floating_point:
        fail(f"top_k_weights must be floating point, got {top_k_weights.dtype}")
    if gate_up.dim() != 3 or down.dim() != 3:
        fail(f"gate_up and down must be 3-D (experts, ., .) stacks, got {_shape(gate_up)} and {_shape(down)}")
    E = gate_up.shape[0]
    if down.shape[0] != E:
        fail(f"gate_up has {E} experts but down has {down.shape[0]}")
    for name, t in (("gate_up", gate_up), ("down", down)):
        if t.dtype != hidden.dtype:
            fail(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; cast hidden to the weights' dtype")
    gu_out, gu_in = (gate_up.shape[2], gate_up.shape[1]) if transposed else (gate_up.shape[1], gate_up.shape[2])
    d_out, d_in = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    layout = "(E, H, out)" if transposed else "(E, out, H)"
    if gu_in != H or d_out != H:
        fail(
            f"hidden size {H} does not match gate_up {_shape(gate_up)} / down {_shape(down)} "
            f"(layout {layout}; pass transposed={not transposed} if the stacks are stored the other way)"
        )
    if gu_out != (2 * d_in if gated else d_in):
        fail(f"gate_up's output size {gu_out} is not {'2 x ' if gated else ''}down's input size {d_in} (gated={gated})")
    for name, b, n in (("gate_up_bias", gate_up_bias, gu_out), ("down_bias", down_bias, H)):
        if b is not None and (b.shape != (E, n) or b.dtype != hidden.dtype):
            fail(f"{name} must be ({E}, {n}) of dtype {hidden.dtype}, got {_shape(b)} {b.dtype}")
    acts = GATED_ACTS if gated else UNGATED_ACTS
    if act not in acts:
        fail(f"act={act!r} is not one of {acts} (gated={gated})")
    if limit is not None and not gated:
        fail("limit (the clamped SwiGLU of gpt-oss / DeepSeek-V4) needs gated experts")
    if limit is not None and not limit > 0:
        fail(f"limit must be positive, got {limit}")
    devices = {t.device for t in (hidden, top_k_index, top_k_weights, gate_up, down)}
    if len(devices) != 1:
        fail(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if lora is not None:
        for proj, A, B, n_out, n_in in (
            ("gate_up", lora.gate_up_A, lora.gate_up_B, gu_out, H),
            ("down", lora.down_A, lora.down_B, H, d_in),
        ):
            if (A is None) != (B is None):
                fail(f"lora.{proj}_A and lora.{proj}_B must be given together")
            if A is None:
                continue
            if (
                A.dim() != 3
                or B.dim() != 3
                or A.shape[0] != E
                or B.shape[0] != E
                or A.shape[2] != n_in
                or B.shape[1] != n_out
                or A.shape[1] != B.shape[2]
            ):
                fail(
                    f"lora.{proj}_A {_shape(A)} / lora.{proj}_B {_shape(B)} must be (E={E}, r, {n_in}) and "
                    f"(E={E}, {n_out}, r); peft_factors() builds them from PEFT's lora_A/lora_B weights"
                )
            if not (A.dtype.is_floating_point and B.dtype.is_floating_point) or A.device != hidden.device:
                fail(f"lora.{proj} factors must be floating point tensors on {hidden.device}")


def _check_index_range(top_k_index: torch.Tensor, num_experts: int) -> None:
    # One host sync: the only data-dependent check. An index outside [0, E) would read another expert's rows
    # of memory in the kernel (or the tile table would drop the pair silently).
    if top_k_index.numel() and bool(((top_k_index < 0) | (top_k_index >= num_experts)).any()):
        bad = top_k_index[(top_k_index < 0) | (top_k_index >= num_experts)][0].item()
        raise ValueError(
            f"moe_experts: top_k_index holds {bad}, outside [0, {num_experts}) for {num_experts} experts "
            "(expert-parallel sentinels are not supported; route to local experts only)"
        )


# ------------------------------------------------------------------------------------------ autograd


def _views(gate_up, down, transposed):
    """The logical (E, out, in) views of both stacks (free; strides carry the storage layout)."""
    if transposed:
        return gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up, down


class MoEExpertsFunction(torch.autograd.Function):
    """Forward and hand-derived backward of :func:`moe_experts` (see the module docstring)."""

    @staticmethod
    def forward(
        ctx, cfg: _Config, hidden, top_k_index, top_k_weights, gate_up, down, gu_bias, d_bias, gu_A, gu_B, d_A, d_B
    ):
        ops = gm.ops(cfg.triton)
        T, K = top_k_index.shape
        E = gate_up.shape[0]
        acc = gm._compute_dtype(hidden.dtype)  # fp32 (float64 for float64 inputs)
        w_gu, w_d = _views(gate_up, down, cfg.transposed)
        routing = gm.route(top_k_index, E, triton=cfg.triton)
        w_sorted = top_k_weights.reshape(-1)[routing.order]
        lora_gu = gm.LoRAFactors(gu_A, gu_B, cfg.gu_scaling) if gu_A is not None else None
        lora_d = gm.LoRAFactors(d_A, d_B, cfg.d_scaling) if d_A is not None else None
        h = ops.grouped_mm(
            hidden, routing, w_gu, gather=True, bias=gu_bias, lora=lora_gu, gate=cfg.gate, out_dtype=hidden.dtype
        )
        y_pairs = ops.grouped_mm(
            h, routing, w_d, bias=d_bias, lora=lora_d, row_scale=w_sorted, scatter=True, out_dtype=acc
        )
        out = y_pairs.view(T, K, hidden.shape[1]).sum(dim=1).to(hidden.dtype)
        ctx.cfg = cfg
        ctx.save_for_backward(hidden, top_k_index, top_k_weights, gate_up, down, gu_bias, d_bias, gu_A, gu_B, d_A, d_B)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Autocast may be on around .backward() (the forward's own ops had it off): keep it off here too.
        with torch.autocast(grad_out.device.type, enabled=False):
            return MoEExpertsFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        cfg = ctx.cfg
        hidden, top_k_index, top_k_weights, gate_up, down, gu_bias, d_bias, gu_A, gu_B, d_A, d_B = ctx.saved_tensors
        needs = ctx.needs_input_grad
        ops = gm.ops(cfg.triton)
        T, K = top_k_index.shape
        E = gate_up.shape[0]
        dtype = hidden.dtype
        acc = gm._compute_dtype(dtype)
        g = grad_out.contiguous().to(dtype)
        w_gu, w_d = _views(gate_up, down, cfg.transposed)
        routing = gm.route(top_k_index, E, triton=cfg.triton)
        w_sorted = top_k_weights.reshape(-1)[routing.order]
        lora_gu = gm.LoRAFactors(gu_A, gu_B, cfg.gu_scaling) if gu_A is not None else None
        lora_d = gm.LoRAFactors(d_A, d_B, cfg.d_scaling) if d_A is not None else None

        # Recompute gu (TK, 2I) fp32: the only (TK x I)-sized thing the backward needs that was not saved.
        gu = ops.grouped_mm(hidden, routing, w_gu, gather=True, bias=gu_bias, lora=lora_gu, out_dtype=acc)
        # gh = g_t Wd_e (+ s (g_t Bd_e) Ad_e): the down GEMM transposed; LoRA roles swap (A' = B^T, B' = A^T).
        lora_d_t = gm.LoRAFactors(d_B.transpose(1, 2), d_A.transpose(1, 2), cfg.d_scaling) if d_A is not None else None
        gh = ops.grouped_mm(g, routing, w_d.transpose(1, 2), gather=True, lora=lora_d_t, out_dtype=acc)
        h, dgu, dw = ops.gate_backward(gu, gh, w_sorted, cfg.gate, dtype)
        del gu, gh
        d_router = None
        if needs[3]:
            if d_bias is not None:  # dw_p += g_t . bd_e
                dw = dw + (g.to(acc) @ d_bias.to(acc).T).gather(1, top_k_index.long()).reshape(-1)[routing.order]
            d_router = torch.empty(T * K, dtype=acc, device=g.device)
            d_router[routing.order.long()] = dw
            d_router = d_router.view(T, K).to(top_k_weights.dtype)

        grads_w = {}
        # Down projection: left operand w_p g_t (gathered, scaled), right operand h_p.
        if needs[5]:
            d_down = torch.empty_like(down)
            ops.grouped_wgrad(
                g, h, routing, _views(d_down, d_down, cfg.transposed)[1], left_gather=True, left_scale=w_sorted
            )
            grads_w["down"] = d_down
        if needs[7]:
            grads_w["d_bias"] = ops.segment_sum(g, routing, gather=True, row_scale=w_sorted).to(d_bias.dtype)
        if lora_d is not None and (needs[10] or needs[11]):
            if needs[11]:  # dBd_e = s sum (w g)^T (h Ad^T)
                ha = ops.grouped_mm(h, routing, d_A, out_dtype=acc)
                dB = torch.empty(d_B.shape, dtype=acc, device=g.device)
                ops.grouped_wgrad(g, ha, routing, dB, left_gather=True, left_scale=w_sorted, scaling=cfg.d_scaling)
                grads_w["d_B"] = dB.to(d_B.dtype)
            if needs[10]:  # dAd_e = s sum (w g Bd)^T h
                gb = ops.grouped_mm(g, routing, d_B.transpose(1, 2), gather=True, row_scale=w_sorted, out_dtype=acc)
                dA = torch.empty(d_A.shape, dtype=acc, device=g.device)
                ops.grouped_wgrad(gb, h, routing, dA, scaling=cfg.d_scaling)
                grads_w["d_A"] = dA.to(d_A.dtype)
        del h

        d_hidden = None
        if needs[1]:
            lora_gu_t = (
                gm.LoRAFactors(gu_B.transpose(1, 2), gu_A.transpose(1, 2), cfg.gu_scaling) if gu_A is not None else None
            )
            dx_pairs = ops.grouped_mm(dgu, routing, w_gu.transpose(1, 2), lora=lora_gu_t, scatter=True, out_dtype=acc)
            d_hidden = dx_pairs.view(T, K, hidden.shape[1]).sum(dim=1).to(dtype)
            del dx_pairs
        if needs[4]:
            d_gate_up = torch.empty_like(gate_up)
            ops.grouped_wgrad(dgu, hidden, routing, _views(d_gate_up, d_gate_up, cfg.transposed)[0], right_gather=True)
            grads_w["gate_up"] = d_gate_up
        if needs[6]:
            grads_w["gu_bias"] = ops.segment_sum(dgu, routing).to(gu_bias.dtype)
        if lora_gu is not None and (needs[8] or needs[9]):
            if needs[9]:  # dBgu_e = s sum dgu^T (x Agu^T)
                xa = ops.grouped_mm(hidden, routing, gu_A, gather=True, out_dtype=acc)
                dB = torch.empty(gu_B.shape, dtype=acc, device=g.device)
                ops.grouped_wgrad(dgu, xa, routing, dB, scaling=cfg.gu_scaling)
                grads_w["gu_B"] = dB.to(gu_B.dtype)
            if needs[8]:  # dAgu_e = s sum (dgu Bgu)^T x
                db_ = ops.grouped_mm(dgu, routing, gu_B.transpose(1, 2), out_dtype=acc)
                dA = torch.empty(gu_A.shape, dtype=acc, device=g.device)
                ops.grouped_wgrad(db_, hidden, routing, dA, right_gather=True, scaling=cfg.gu_scaling)
                grads_w["gu_A"] = dA.to(gu_A.dtype)
        return (
            None,
            d_hidden,
            None,
            d_router,
            grads_w.get("gate_up"),
            grads_w.get("down"),
            grads_w.get("gu_bias"),
            grads_w.get("d_bias"),
            grads_w.get("gu_A"),
            grads_w.get("gu_B"),
            grads_w.get("d_A"),
            grads_w.get("d_B"),
        )


def moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    *,
    act: str = "silu",
    gated: bool = True,
    transposed: bool = False,
    interleaved: bool = False,
    alpha: float = 1.702,
    limit: float | None = None,
    lora: MoELoRA | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Routed experts of one MoE layer, ``(T, H) -> (T, H)`` (layouts and formula in the module docstring).

    ``act``/``gated``/``interleaved``/``alpha``/``limit`` select the gate; ``transposed`` the storage of the
    stacks (transformers' ``is_transposed``); ``lora`` the active adapters on the experts. Gradients flow to
    hidden, top_k_weights, the stacks, biases and LoRA factors that require them. ``validate=True`` checks
    every shape/dtype and that all indices lie in [0, E) before any kernel runs (the range check is one host
    sync; ``validate=False`` skips it, for callers that guarantee it). CUDA tensors (or CPU tensors under
    ``TRITON_INTERPRET=1``) run the Triton kernels, others the torch path with the same backward.
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # As F.linear under torch.autocast (an HF Trainer with bf16=True on an fp32 model): the GEMM operands are
        # cast to the autocast dtype (autograd ops, so fp32 masters get fp32 gradients) and the Function runs with
        # autocast off. The router weights multiply outputs elementwise (no autocast there): left as they are.
        low = torch.get_autocast_dtype(device_type)

        def cast(t):
            return (
                t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            )

        hidden, gate_up, down, gate_up_bias, down_bias = map(cast, (hidden, gate_up, down, gate_up_bias, down_bias))
        if lora is not None:
            lora = MoELoRA(
                cast(lora.gate_up_A),
                cast(lora.gate_up_B),
                lora.gate_up_scaling,
                cast(lora.down_A),
                cast(lora.down_B),
                lora.down_scaling,
            )
    _check(
        hidden, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, act, gated, transposed, limit, lora
    )
    if validate:
        _check_index_range(top_k_index, gate_up.shape[0])
    lora = lora or MoELoRA()
    cfg = _Config(
        gate=gm.GateSpec(
            act=act,
            gated=gated,
            interleaved=interleaved,
            alpha=float(alpha),
            limit=None if limit is None else float(limit),
        ),
        transposed=transposed,
        gu_scaling=float(lora.gate_up_scaling),
        d_scaling=float(lora.down_scaling),
        triton=use_triton(hidden) and hidden.dtype != torch.float64,
    )
    with torch.autocast(device_type, enabled=False):
        return MoEExpertsFunction.apply(
            cfg,
            hidden,
            top_k_index,
            top_k_weights,
            gate_up,
            down,
            gate_up_bias,
            down_bias,
            lora.gate_up_A,
            lora.gate_up_B,
            lora.down_A,
            lora.down_B,
        )


# ------------------------------------------------------------------------------------------ models


def bytes_and_flops(
    tokens: int,
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    *,
    itemsize: int = 2,
    rank: int = 0,
    full: bool = True,
    bias: bool = False,
) -> dict[str, int]:
    """Bytes and FLOPs of one :func:`moe_experts` call (gated experts), forward and backward.

    ``rank``: LoRA rank on both projections (0: none); ``full``: expert weights get gradients (full
    fine-tuning) or not (LoRA on a frozen base). Bytes are what this implementation's launches must move at
    the least (every expert receives tokens at these shapes): weights once per GEMM, activations per pair;
    the (TK, I) intermediates it writes and reads back between launches are counted, since the design keeps
    them in memory between kernels (not between forward and backward). FLOPs count 2 per multiply-add.
    """
    T, H, I, E, K, s = tokens, hidden, intermediate, experts, top_k, itemsize
    S = T * K
    w_gu, w_d = E * 2 * I * H * s, E * H * I * s
    lora_w = E * rank * (H + 2 * I + I + H) * s
    fwd_bytes = (
        S * H * s
        + w_gu
        + S * I * s  # gate/up: gathered x rows, weights, write h
        + S * I * s
        + w_d
        + S * H * 4
        + S * H * 4  # down: read h, weights, write fp32 pairs; the k-sum reads them
        + T * H * s
        + lora_w
        + (E * (3 * I + H) * s if bias else 0)
    )
    bwd_bytes = (
        S * H * s
        + w_gu
        + S * 2 * I * 4  # recompute gu (fp32)
        + S * H * s
        + w_d
        + S * I * 4  # gh
        + S * 3 * I * 4
        + S * I * s
        + S * 2 * I * s  # gate backward: read gu, gh; write h, dgu
        + S * 2 * I * s
        + w_gu
        + 2 * S * H * 4
        + T * H * s  # dx per pair (fp32), the k-sum, dx
        + (S * H * s + S * I * s + w_d + S * 2 * I * s + S * H * s + w_gu if full else 0)  # dW_d, dW_gu
        + 4 * lora_w
    )
    gemm = 2 * S * H * I  # one (S, H) x (H, I) product
    fwd_flops = 3 * gemm + 2 * S * rank * (2 * H + 3 * I) * 2 if rank else 3 * gemm
    bwd_flops = (2 + 1 + 2 + (3 if full else 0)) * gemm  # recompute gu (2), gh (1), dx (2), dW (3)
    if rank:
        bwd_flops += 2 * S * rank * (2 * H + 3 * I) * 6
    return {"fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes, "fwd_flops": fwd_flops, "bwd_flops": bwd_flops}
