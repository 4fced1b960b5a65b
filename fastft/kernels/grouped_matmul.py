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

from fastft.kernels._math import normal_cdf_pdf, sigmoid_pair


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


def _grouped_mm_torch(x, routing: Routing, weight, *, gather=False, bias=None, lora=None, gate=None,
                      row_scale=None, scatter=False, out_dtype=None):
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
        acc = xe @ weight[e].to(cd).T
        if bias is not None:
            acc = acc + bias[e].to(cd)
        if lora is not None:
            acc = acc + lora.scaling * ((xe @ lora.A[e].to(cd).T) @ lora.B[e].to(cd).T)
        if gate is not None:
            acc = _gate_torch(acc, gate)
        if row_scale is not None:
            acc = acc * row_scale[a:b, None].to(cd)
        if scatter:
            out[order[a:b]] = acc.to(out.dtype)
        else:
            out[a:b] = acc.to(out.dtype)
    return out


def _grouped_wgrad_torch(left, right, routing: Routing, out, *, left_gather=False, right_gather=False,
                         left_scale=None, scaling=1.0):
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
            le = le * left_scale[a:b, None].to(cd)
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


# The Triton kernels replace this in the next commit; until then every call takes the torch path.
_TRITON_OPS = _TORCH_OPS
