"""LoRA projections with hand-written backward: one linear, attention's q/k/v trio, and the gated MLP.

Forward of one projection (PEFT's ``lora.Linear.forward``), x (N, in), W (out, in), b (out,), A (r, in),
B (out, r), scaling s, optional dropout mask D (scaled by 1/(1-p)) on the adapter input::

    y = x W^T + b + s (u A^T) B^T,      u = cast(x, A.dtype) (* D with lora dropout)

Dtypes, as PEFT: the base GEMM runs in x's dtype (x, W, b share it), the adapter path in A's dtype (PEFT keeps
adapters in fp32 over a bf16/fp16 base, ``autocast_adapter_dtype=True``), and the fp32 LoRA term is added to
the rounded base output and rounded once to x's dtype. Here s multiplies the (N, r) product ``xa = u A^T``
before B (the same value up to one fp32 rounding), and the sum is formed in place in the base output.

    lora_qkv:  q, k, v = three projections of one x
    lora_mlp:  gate = P_g(x), up = P_u(x) (or [gate | up] = P_gu(x), Phi-3), h = act(gate) * up, y = P_d(h)

Backward, with g = dL/dy (N, out) and gBs = s (g B) (N, r)::

    dx = g W + gBs A   (+ the same for every projection that reads x, accumulated into ONE (N, in) buffer)
    dW = g^T x         db = sum_rows g        dB = s g^T xa = g^T (s xa)        dA = gBs^T u

With dropout, d u = gBs A flows to x through the mask: dx += (gBs A) * D. MLP: the down projection's backward
gives dh (above, with x = h); the fused activation kernels of swiglu.py / geglu.py turn (gate, up, dh) into
d gate, d up; the gate/up projections' backward takes those (for Phi-3's fused layout, the two blocks of rows
of W_gu and B_gu, so d [gate | up] is never concatenated). dW_d = g^T h and dA_d = gBs_d^T h need h, which is
not saved: it is recomputed by the same forward activation kernel (bit-identical to the forward's h; one
memory-bound pass reading gate and up, writing h, cheaper than keeping N x intermediate bytes; the backward
kernels do not emit h, and d up = dh * act(gate) does not give it without a division by dh).

Saved for backward, each only when a requested gradient needs it (a frozen W gets no (out, in) buffer):
x (once, for dW and dA; never a copy), s xa (N, r) per adapter (for dB), the parameters W, A, B (no memory)
and, per dropout adapter, its bool mask D (N x in bytes; u = cast(x) * D is recomputed). lora_mlp adds gate
and up (the projection outputs, pre-activation) and nothing else of size N x intermediate: h, act(gate),
their fp32 upcasts and the fp32 copy of x that PEFT's lora_A keeps are never saved. A quantized base weight
(any object with ``.dequantize()`` and ``.shape``, e.g. a 4-bit wrapper) is dequantized in forward and
again in backward (only if dx is needed) and dropped after each GEMM.

Transient buffers with fp32 adapters over a bf16/fp16 base (as PEFT, which also keeps some of them): the
fp32 upcast of x for ``x A^T`` (forward) and for dA (backward), the fp32 LoRA term (N, out) before it is
added into the base output, one upcast gradient block (N, out) at a time for g B and dB, and the fp32
(N, in) LoRA part of dx. They live for one step of the computation, not from forward to backward.

Autocast: as F.linear under ``torch.autocast`` (an HF Trainer with fp16/bf16 on an fp32 model): every
floating tensor other than float64 is cast to the autocast dtype before the autograd Function (the casts
are autograd ops, so fp32 master weights get fp32 gradients), and the Function runs with autocast off.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase
from fastft.kernels.geglu import (
    _geglu_backward_torch,
    _geglu_backward_triton,
    _geglu_forward_torch,
    _geglu_forward_triton,
    geglu_reference,
)
from fastft.kernels.swiglu import (
    _TRITON_DTYPES,
    _swiglu_backward_torch,
    _swiglu_backward_triton,
    _swiglu_forward_torch,
    _swiglu_forward_triton,
    swiglu_reference,
)

Activation = Literal["swiglu", "geglu_tanh", "geglu"]
_ACTIVATIONS = ("swiglu", "geglu_tanh", "geglu")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Rows per block of the LoRA parts' x-sized fp32 work when the adapters' dtype differs from x's (fp32 adapters on a
# bf16 model): the copy of x in the adapter dtype and the fp32 product s xa B^T in forward, dA and the LoRA part of
# dx in backward. Blocked, none of them exists for the whole sequence (a fixed 1024-row transient instead of a
# tokens-sized one); each row's values are those of the unblocked GEMM.
_LORA_BACKWARD_ROWS = 1024


class QuantizedWeight(Protocol):
    """A base weight stored compressed (e.g. 4-bit): ``dequantize()`` gives the dense (out, in) tensor."""

    shape: Sequence[int]

    def dequantize(self) -> torch.Tensor: ...


@dataclass
class LoRAProjection:
    """One linear projection with an optional LoRA adapter: ``x W^T + b + scaling * (drop(x) A^T) B^T``.

    ``weight`` is the base (out, in) tensor, or a :class:`QuantizedWeight` (never trained, dequantized on use).
    ``lora_A`` (r, in) and ``lora_B`` (out, r) are both None when no adapter is active. ``dropout`` is the
    adapter's dropout probability when it is in training mode (0 in eval mode or without dropout); the mask
    is drawn inside, with ``torch.native_dropout`` on ``x`` cast to A's dtype, the call (and so the random
    numbers) of PEFT's ``nn.Dropout``. Any of weight, bias, lora_A, lora_B may require grad.
    """

    weight: torch.Tensor | QuantizedWeight
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    dropout: float = 0.0


class _Spec(NamedTuple):
    """What the autograd Functions need of a projection besides its tensors."""

    out_features: int
    in_features: int
    quantized: QuantizedWeight | None  # None: the weight is a tensor passed through autograd
    rank: int  # 0: no adapter
    scaling: float
    dropout: float


# ------------------------------------------------------------------------------------------ references


def _dense_weight(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return weight
    dense = weight.dequantize()
    return dense if dense.dtype == dtype else dense.to(dtype)


def lora_linear_reference(x: torch.Tensor, proj: LoRAProjection) -> torch.Tensor:
    """PEFT's LoRA Linear forward op for op, in plain differentiable PyTorch (test oracle and documentation).

    ``result = F.linear(x, W, b)``; with an adapter ``x = x.to(A.dtype)``, ``result = result +
    B(A(dropout(x))) * scaling`` and ``result.to(result's dtype)``; dropout is ``F.dropout(training=True)``.
    """
    result = F.linear(x, _dense_weight(proj.weight, x.dtype), proj.bias)
    if proj.lora_A is None:
        return result
    u = x.to(proj.lora_A.dtype)
    if proj.dropout:
        u = F.dropout(u, proj.dropout, training=True)
    return (result + F.linear(F.linear(u, proj.lora_A), proj.lora_B) * proj.scaling).to(result.dtype)


def lora_mlp_reference(
    x: torch.Tensor,
    gate: LoRAProjection,
    up: LoRAProjection | None,
    down: LoRAProjection,
    activation: Activation,
) -> torch.Tensor:
    """The MLP of three (or, with ``up=None``, two: Phi-3's gate_up) PEFT LoRA Linears, as transformers runs it."""
    gate_out = lora_linear_reference(x, gate)
    gate_out, up_out = gate_out.chunk(2, dim=-1) if up is None else (gate_out, lora_linear_reference(x, up))
    if activation == "swiglu":
        h = swiglu_reference(gate_out, up_out)
    else:
        h = geglu_reference(gate_out, up_out, "tanh" if activation == "geglu_tanh" else "none")
    return lora_linear_reference(h, down)


# ------------------------------------------------------------------------------------------ forward and backward
# "A group": projections that read the same input x2 (N, in). Each has params (W or None, b, A, B).


def _dense(spec: _Spec, weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) base weight: the tensor itself, or the quantized weight dequantized now (transient)."""
    if spec.quantized is None:
        return weight
    dense = _dense_weight(spec.quantized, dtype)
    if tuple(dense.shape) != (spec.out_features, spec.in_features):
        raise ValueError(
            f"lora: weight.dequantize() returned shape {tuple(dense.shape)} but weight.shape is "
            f"{(spec.out_features, spec.in_features)}; dequantize() must return the dense (out, in) weight."
        )
    return dense


def _add_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """out += left @ right; in out's buffer when dtypes agree, else the product (fp32 adapters) is added in place
    to the low-precision out, which computes the sum in fp32 and rounds it once."""
    if left.dtype == out.dtype:
        out.addmm_(left, right)
    else:  # in row blocks: the fp32 product (and add_'s fp32 copies of out) never exist for all rows
        for lo in range(0, out.shape[0], _LORA_BACKWARD_ROWS):
            rows = slice(lo, lo + _LORA_BACKWARD_ROWS)
            out[rows].add_(torch.mm(left[rows], right))


def _apply_mask(t: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """t * D with D = mask / (1 - p): native_dropout's forward, and its backward."""
    return t.mul(mask).mul_(0.0 if p >= 1.0 else 1.0 / (1.0 - p))


def _group_forward(x2: torch.Tensor, specs: Sequence[_Spec], params: Sequence[tuple]) -> tuple[list, list, list]:
    """Outputs (N, out) of each projection, and per adapter s * xa (N, r) and its dropout mask (or None)."""
    outs = []
    for spec, (weight, bias, _, _) in zip(specs, params, strict=True):
        dense = _dense(spec, weight, x2.dtype)  # a dequantized weight lives only for this GEMM
        outs.append(torch.addmm(bias, x2, dense.t()) if bias is not None else torch.mm(x2, dense.t()))
        del dense
    scaled_xa, masks = [None] * len(specs), [None] * len(specs)
    lora = [i for i, spec in enumerate(specs) if spec.rank]
    if not lora:
        return outs, scaled_xa, masks
    lora_dtype = params[lora[0]][2].dtype  # PEFT casts x to the adapter dtype (a copy only if it differs)
    # Adapters without dropout read x itself: one GEMM against [A_1; A_2; ...] reads x once for all of them; with
    # another dtype, x is cast one block of rows at a time (no whole-sequence copy of x in the adapter dtype).
    plain = [i for i in lora if not specs[i].dropout]
    if plain:
        a_cat = torch.cat([params[i][2] for i in plain]) if len(plain) > 1 else params[plain[0]][2]
        if x2.dtype == lora_dtype:
            xa = torch.mm(x2, a_cat.t())
        else:
            xa = x2.new_empty(x2.shape[0], a_cat.shape[0], dtype=lora_dtype)
            for lo in range(0, x2.shape[0], _LORA_BACKWARD_ROWS):
                rows = slice(lo, lo + _LORA_BACKWARD_ROWS)
                torch.mm(x2[rows].to(lora_dtype), a_cat.t(), out=xa[rows])
        for i, block in zip(plain, xa.split([specs[i].rank for i in plain], dim=1), strict=True):
            scaled_xa[i] = block.mul_(specs[i].scaling)
    x_lora = x2.to(lora_dtype) if any(specs[i].dropout for i in lora) else None  # dropout masks all of x
    for i in lora:  # masks drawn in projection order, as PEFT's modules draw them
        if specs[i].dropout:
            u, masks[i] = torch.native_dropout(x_lora, specs[i].dropout, True)
            scaled_xa[i] = torch.mm(u, params[i][2].t()).mul_(specs[i].scaling)
            del u
    del x_lora
    for i in lora:
        _add_product(outs[i], scaled_xa[i], params[i][3].t())
    return outs, scaled_xa, masks


def _group_saved(specs, params, scaled_xa, masks, need_x: bool, needs) -> list:
    """Per projection (W, A, B, s xa, mask), each only if a requested gradient uses it (None otherwise)."""
    saved = []
    for spec, (weight, _, a, b), sxa, mask, (_, _, need_a, need_b) in zip(specs, params, scaled_xa, masks, needs):
        lora = spec.rank > 0
        saved += [
            weight if need_x and spec.quantized is None else None,
            a if lora and need_x else None,
            b if lora and (need_x or need_a) else None,
            sxa if lora and need_b else None,
            mask if lora and (need_x or need_a) else None,
        ]
    return saved


def _group_backward(x2, specs, saved, grads, need_x: bool, needs, dtype: torch.dtype) -> tuple:
    """dx (or None) and per projection (dW, db, dA, dB). ``grads[i]`` is the output gradient of projection i as
    column blocks (one, or d gate and d up of a fused gate_up), each paired with the rows of W and B it uses."""
    dx, results, gbs = None, [], [None] * len(specs)
    for i, (spec, pieces, (need_w, need_b, need_a, need_bb)) in enumerate(zip(specs, grads, needs)):
        weight, a, b, sxa, _ = saved[5 * i : 5 * i + 5]
        starts = [0, *itertools.accumulate(g.shape[1] for g in pieces)]
        rows = [slice(lo, hi) for lo, hi in itertools.pairwise(starts)]
        if need_x:  # base part of dx: every block of every projection into one buffer
            dense = _dense(spec, weight, dtype)
            for g, r in zip(pieces, rows):
                dx = torch.mm(g, dense[r]) if dx is None else dx.addmm_(g, dense[r])
            del dense
        grad_w = x2.new_empty(spec.out_features, spec.in_features) if need_w else None
        grad_bias = pieces[0].new_empty(spec.out_features) if need_b else None
        grad_lora_b = sxa.new_empty(spec.out_features, spec.rank) if need_bb else None
        for g, r in zip(pieces, rows):
            if grad_w is not None:
                torch.mm(g.t(), x2, out=grad_w[r])
            if grad_bias is not None:
                torch.sum(g, dim=0, out=grad_bias[r])
            if spec.rank and (need_x or need_a or need_bb):
                # Upcast g (fp32 adapters) one block of rows at a time: no fp32 copy of the whole output gradient.
                lora_dtype = (sxa if b is None else b).dtype
                step = g.shape[0] if g.dtype == lora_dtype else _LORA_BACKWARD_ROWS
                first_piece = gbs[i] is None
                if first_piece and (need_x or need_a):
                    gbs[i] = g.new_empty(g.shape[0], spec.rank, dtype=lora_dtype)
                for lo in range(0, g.shape[0], max(step, 1)):
                    block = slice(lo, lo + step)
                    g_lora = g[block].to(lora_dtype)
                    if need_x or need_a:
                        if first_piece:
                            torch.mm(g_lora, b[r], out=gbs[i][block])
                        else:
                            gbs[i][block].addmm_(g_lora, b[r])
                    if grad_lora_b is not None:  # s g^T xa, summed over the blocks
                        if lo == 0:
                            torch.mm(g_lora.t(), sxa[block], out=grad_lora_b[r])
                        else:
                            grad_lora_b[r].addmm_(g_lora.t(), sxa[block])
                    del g_lora
                if grad_lora_b is not None and g.shape[0] == 0:
                    grad_lora_b[r].zero_()
        if gbs[i] is not None:
            gbs[i].mul_(spec.scaling)
        results.append([grad_w, grad_bias, None, grad_lora_b])
    # dA = gBs^T u and the LoRA part of dx = gBs A (through the mask with dropout).
    lora = [i for i, spec in enumerate(specs) if gbs[i] is not None]
    dropped = [i for i in lora if specs[i].dropout and needs[i][2]]
    x_lora = x2.to(gbs[dropped[0]].dtype) if dropped else None
    plain = [i for i in lora if not specs[i].dropout]
    if plain:  # adapters that read x itself: one GEMM pair for all of them, as in the forward
        gbs_cat = torch.cat([gbs[i] for i in plain], dim=1) if len(plain) > 1 else gbs[plain[0]]
        need_a = any(needs[i][2] for i in plain)
        a_cat = None
        if need_x:
            a_cat = torch.cat([saved[5 * i + 1] for i in plain]) if len(plain) > 1 else saved[5 * plain[0] + 1]
        # Blocks of rows: the adapter-dtype (fp32) copy of x for dA and the fp32 LoRA part of dx exist for one
        # block at a time, not for the whole sequence (dA sums the blocks in fp32).
        grad_a_cat = None
        for lo in range(0, gbs_cat.shape[0], _LORA_BACKWARD_ROWS):
            rows = slice(lo, lo + _LORA_BACKWARD_ROWS)
            if need_a:
                part = torch.mm(gbs_cat[rows].t(), x2[rows].to(gbs_cat.dtype))
                grad_a_cat = part if grad_a_cat is None else grad_a_cat.add_(part)
            if a_cat is not None:
                _add_product(dx[rows], gbs_cat[rows], a_cat)
        if need_a and grad_a_cat is None:  # no rows: dA is zero
            grad_a_cat = gbs_cat.new_zeros(gbs_cat.shape[1], x2.shape[1])
        if grad_a_cat is not None:
            for i, grad_a in zip(plain, grad_a_cat.split([specs[i].rank for i in plain]), strict=True):
                results[i][2] = grad_a if needs[i][2] else None
    for i in lora:
        if specs[i].dropout:
            a, mask, p = saved[5 * i + 1], saved[5 * i + 4], specs[i].dropout
            if needs[i][2]:
                results[i][2] = torch.mm(gbs[i].t(), _apply_mask(x_lora, mask, p))
            if need_x:
                dx.add_(_apply_mask(torch.mm(gbs[i], a), mask, p))
    return dx, results


def _needs(needs_input_grad: Sequence[bool], first: int, count: int) -> list[tuple[bool, ...]]:
    return [tuple(needs_input_grad[first + 4 * k : first + 4 * k + 4]) for k in range(count)]


def _group(tensors: Sequence, count: int) -> list[tuple]:
    return [tuple(tensors[4 * k : 4 * k + 4]) for k in range(count)]


class LoRAProjectionsFunction(torch.autograd.Function):
    """Projections sharing one input (lora_linear: one; lora_qkv: three): x saved once, dx in one buffer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, specs: tuple[_Spec, ...], *tensors: torch.Tensor | None):
        params = _group(tensors, len(specs))
        needs = _needs(ctx.needs_input_grad, 2, len(specs))
        need_x = ctx.needs_input_grad[0]
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            outs, scaled_xa, masks = _group_forward(x2, specs, params)
        keep_x = any(n[0] or (spec.rank and n[2]) for spec, n in zip(specs, needs))
        ctx.save_for_backward(x if keep_x else None, *_group_saved(specs, params, scaled_xa, masks, need_x, needs))
        ctx.specs, ctx.needs, ctx.x_shape, ctx.dtype = specs, needs, x.shape, x.dtype
        # 2-D outputs: the callers reshape them outside the Function, so that the results are ordinary views
        # the model may modify in place (a view created inside a custom Function may not be).
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor):
        x, *saved = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
        grads = [[g.reshape(-1, g.shape[-1])] for g in grad_outputs]
        with torch.autocast(grad_outputs[0].device.type, enabled=False):
            dx, results = _group_backward(x2, ctx.specs, saved, grads, ctx.needs_input_grad[0], ctx.needs, ctx.dtype)
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return dx, None, *(grad for result in results for grad in result)


def _activation_kernels(activation: str, triton: bool) -> tuple[Callable, Callable]:
    """(forward(gate, up) -> h, backward(gate, up, dh, need_dgate, need_dup) -> (d gate, d up)) of the kernels."""
    if activation == "swiglu":
        if triton:
            return _swiglu_forward_triton, _swiglu_backward_triton
        return _swiglu_forward_torch, _swiglu_backward_torch
    approximate = "tanh" if activation == "geglu_tanh" else "none"
    forward, backward = (
        (_geglu_forward_triton, _geglu_backward_triton) if triton else (_geglu_forward_torch, _geglu_backward_torch)
    )
    return (
        lambda gate, up: forward(gate, up, approximate),
        lambda gate, up, dh, need_dgate, need_dup: backward(gate, up, dh, approximate, need_dgate, need_dup),
    )


class LoRAMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) with LoRA on each projection; saves x, gate, up and (N, r) intermediates."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, specs: tuple[_Spec, ...], activation: str, *tensors: torch.Tensor | None):
        n_in = len(specs) - 1  # gate and up, or the fused gate_up
        in_params, (down_params,) = _group(tensors, n_in), _group(tensors[4 * n_in :], 1)
        in_needs, (down_needs,) = _needs(ctx.needs_input_grad, 3, n_in), _needs(ctx.needs_input_grad, 3 + 4 * n_in, 1)
        need_x = ctx.needs_input_grad[0]
        need_act = need_x or any(any(n) for n in in_needs)  # d gate / d up are needed
        need_h = down_needs[0] or (specs[-1].rank > 0 and down_needs[2])  # backward recomputes h
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            in_outs, in_sxa, in_masks = _group_forward(x2, specs[:n_in], in_params)
            gate, up = in_outs[0].chunk(2, dim=-1) if n_in == 1 else in_outs
            ctx.triton = use_triton(gate) and gate.dtype in _TRITON_DTYPES
            h = _activation_kernels(activation, ctx.triton)[0](gate, up)
            (y,), down_sxa, down_masks = _group_forward(h, specs[n_in:], [down_params])
            del h
        keep_x = any(n[0] or (spec.rank and n[2]) for spec, n in zip(specs[:n_in], in_needs))
        keep_gate_up = need_act or need_h
        ctx.save_for_backward(
            x if keep_x else None,
            *(in_outs if keep_gate_up else [None] * n_in),
            *_group_saved(specs[:n_in], in_params, in_sxa, in_masks, need_x, in_needs),
            *_group_saved(specs[n_in:], [down_params], down_sxa, down_masks, need_act, [down_needs]),
        )
        ctx.specs, ctx.activation, ctx.x_shape, ctx.dtype = specs, activation, x.shape, x.dtype
        ctx.in_needs, ctx.down_needs, ctx.need_act, ctx.need_h = in_needs, down_needs, need_act, need_h
        return y  # 2-D; reshaped by lora_mlp outside the Function (see LoRAProjectionsFunction.forward)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        specs, n_in = ctx.specs, len(ctx.specs) - 1
        x, *rest = ctx.saved_tensors
        in_outs, in_saved, down_saved = rest[:n_in], rest[n_in : 6 * n_in], rest[6 * n_in :]
        gate, up = in_outs if n_in == 2 else (None, None) if in_outs[0] is None else in_outs[0].chunk(2, dim=-1)
        act_forward, act_backward = _activation_kernels(ctx.activation, ctx.triton)
        g = grad_y.reshape(-1, grad_y.shape[-1])
        with torch.autocast(grad_y.device.type, enabled=False):
            # Down projection: its input h is recomputed (not saved) only if dW_d or dA_d needs it.
            h = act_forward(gate, up) if ctx.need_h else None
            dh, (down_grads,) = _group_backward(
                h, specs[n_in:], down_saved, [[g]], ctx.need_act, [ctx.down_needs], ctx.dtype
            )
            del h
            dx, in_grads = None, [[None] * 4 for _ in range(n_in)]
            if ctx.need_act:
                dgate, dup = act_backward(gate, up, dh, True, True)
                del dh
                pieces = [[dgate, dup]] if n_in == 1 else [[dgate], [dup]]
                x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
                need_x = ctx.needs_input_grad[0]
                dx, in_grads = _group_backward(x2, specs[:n_in], in_saved, pieces, need_x, ctx.in_needs, ctx.dtype)
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return dx, None, None, *(grad for result in (*in_grads, down_grads) for grad in result)


# ------------------------------------------------------------------------------------------ checks and entry points


def _check_projection(op: str, name: str, proj: object, in_features: int, x: torch.Tensor) -> _Spec:
    """Validate one projection against its input (x's dtype and device; ``in_features`` columns)."""
    if not isinstance(proj, LoRAProjection):
        raise TypeError(f"{op}: {name} must be a LoRAProjection, got {type(proj).__name__}.")
    weight = proj.weight
    quantized = not isinstance(weight, torch.Tensor)
    if quantized and not (hasattr(weight, "dequantize") and hasattr(weight, "shape")):
        raise TypeError(
            f"{op}: {name}.weight must be a torch.Tensor or an object with .dequantize() and .shape (a quantized "
            f"weight), got {type(weight).__name__}."
        )
    if len(weight.shape) != 2:
        raise ValueError(f"{op}: {name}.weight must be (out_features, in_features), got shape {tuple(weight.shape)}.")
    out_features, weight_in = (int(d) for d in weight.shape)
    if weight_in != in_features:
        what = "the intermediate size (gate/up out_features)" if name == "down" else "x.shape[-1]"
        raise ValueError(
            f"{op}: {name}.weight is {(out_features, weight_in)} but its input has {in_features} features "
            f"({what}); pass the matching weight or input."
        )
    if not quantized and weight.dtype != x.dtype:
        hint = (
            " A uint8/int weight looks quantized: wrap it in an object whose .dequantize() returns the dense weight."
            if not weight.is_floating_point()
            else ""
        )
        raise TypeError(
            f"{op}: {name}.weight is {weight.dtype} but x is {x.dtype}; the base GEMM runs in one dtype, as F.linear: "
            f"cast x (x.to({weight.dtype})) or run under torch.autocast.{hint}"
        )
    tensors = [("weight", weight)] if not quantized else []
    if proj.bias is not None:
        if not isinstance(proj.bias, torch.Tensor) or tuple(proj.bias.shape) != (out_features,):
            shape = tuple(proj.bias.shape) if isinstance(proj.bias, torch.Tensor) else type(proj.bias).__name__
            raise ValueError(f"{op}: {name}.bias must be None or shape ({out_features},), got {shape}.")
        if proj.bias.dtype != x.dtype:
            raise TypeError(f"{op}: {name}.bias is {proj.bias.dtype} but x is {x.dtype}; cast it to {x.dtype}.")
        tensors.append(("bias", proj.bias))
    a, b = proj.lora_A, proj.lora_B
    if (a is None) != (b is None):
        raise ValueError(f"{op}: {name}.lora_A and {name}.lora_B must both be tensors or both None (no adapter).")
    rank = 0
    if a is not None:
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise TypeError(f"{op}: {name}.lora_A and lora_B must be torch.Tensors.")
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or rank < 1 or tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise ValueError(
                f"{op}: {name}.lora_A must be (r, {in_features}) and lora_B ({out_features}, r) with r >= 1, got "
                f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}."
            )
        if a.dtype != b.dtype or a.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{op}: {name}.lora_A ({a.dtype}) and lora_B ({b.dtype}) must share one floating dtype (float32 as "
                "PEFT keeps adapters, or the base dtype); cast them, e.g. lora_B.to(lora_A.dtype)."
            )
        tensors += [("lora_A", a), ("lora_B", b)]
    for label, t in tensors:
        if t.device != x.device:
            raise ValueError(f"{op}: {name}.{label} is on {t.device} but x is on {x.device}; move them to one device.")
    scaling = proj.scaling
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TypeError(f"{op}: {name}.scaling must be a finite Python number (lora_alpha / r), got {scaling!r}.")
    dropout = proj.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"{op}: {name}.dropout must be a probability in [0, 1] (0 in eval mode), got {dropout!r}.")
    return _Spec(out_features, in_features, weight if quantized else None, rank, float(scaling), float(dropout))


def _prepare(op: str, x: object, projs: dict[str, LoRAProjection | None]) -> tuple[torch.Tensor, dict]:
    """Check x; under autocast cast x and every projection tensor to the autocast dtype (as F.linear does)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() == 0:
        raise TypeError(
            f"{op}: x must be a float32/bfloat16/float16/float64 tensor (..., in_features), got "
            f"{getattr(x, 'dtype', type(x).__name__)} with shape {tuple(getattr(x, 'shape', ()))}."
        )
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(x.device.type)

        def cast(t):  # autocast casts every floating tensor but float64; the casts are autograd ops
            return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _TRITON_DTYPES else t

        x = cast(x)
        projs = {
            name: replace(p, weight=cast(p.weight), bias=cast(p.bias), lora_A=cast(p.lora_A), lora_B=cast(p.lora_B))
            if isinstance(p, LoRAProjection)
            else p
            for name, p in projs.items()
        }
    return x, projs


def _flat(projs: Sequence[LoRAProjection]) -> list[torch.Tensor | None]:
    return [
        t for p in projs for t in (p.weight if isinstance(p.weight, torch.Tensor) else None, p.bias, p.lora_A, p.lora_B)
    ]


def _check_adapter_dtypes(op: str, projs: dict[str, LoRAProjection]) -> None:
    dtypes = {name: p.lora_A.dtype for name, p in projs.items() if p.lora_A is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(
            f"{op}: the adapters must share one dtype, got {dtypes}; cast them all (PEFT keeps them in float32)."
        )


def lora_linear(x: torch.Tensor, proj: LoRAProjection) -> torch.Tensor:
    """``x W^T + b + scaling * (dropout(x) A^T) B^T`` with PEFT's numbers and a hand-written backward.

    ``x`` is (..., in_features) in the base weight's dtype; the result is (..., out_features) in that dtype.
    The adapter path runs in the adapters' dtype (fp32 for PEFT over a bf16 base) and is added to the base
    output before one rounding. Autograd keeps x (only if dW or dA is needed), the (N, r) product for dB and,
    with dropout, a bool mask; never a copy of x, never a dequantized weight. Gradients are computed for
    exactly the tensors that require them (full fine-tuning included). Under ``torch.autocast`` it behaves
    as ``F.linear``: everything runs in the autocast dtype.
    """
    x, projs = _prepare("lora_linear", x, {"proj": proj})
    spec = _check_projection("lora_linear", "proj", projs["proj"], x.shape[-1], x)
    (out,) = LoRAProjectionsFunction.apply(x, (spec,), *_flat([projs["proj"]]))
    return out.view(*x.shape[:-1], spec.out_features)


def lora_qkv(
    x: torch.Tensor, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention projections q, k, v of one input ``x`` as one autograd Function.

    Each is :func:`lora_linear` (same semantics, any output widths, e.g. grouped-query k and v). x is saved
    once for the three, the adapters without dropout share one GEMM over x (forward and backward), and
    backward accumulates the six contributions to dx into one (N, in) buffer. A fused qkv_proj (Phi-3) is a
    single projection: call :func:`lora_linear` and split its output.
    """
    x, projs = _prepare("lora_qkv", x, {"q": q, "k": k, "v": v})
    specs = tuple(_check_projection("lora_qkv", name, p, x.shape[-1], x) for name, p in projs.items())
    _check_adapter_dtypes("lora_qkv", projs)
    outs = LoRAProjectionsFunction.apply(x, specs, *_flat(list(projs.values())))
    q_out, k_out, v_out = (out.view(*x.shape[:-1], spec.out_features) for out, spec in zip(outs, specs))
    return q_out, k_out, v_out


def _mlp_inputs(
    op: str, x: torch.Tensor, gate: LoRAProjection, up: LoRAProjection | None, down: LoRAProjection, activation: str
) -> tuple[torch.Tensor, tuple[_Spec, ...], list[torch.Tensor | None]]:
    """Check a gated MLP's arguments (autocast casts applied): x, the specs (gate[, up], down), the flat tensors."""
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"{op}: activation must be one of {_ACTIVATIONS} (silu; tanh GELU as gelu_pytorch_tanh; exact GELU), "
            f"got {activation!r}."
        )
    named = {"gate": gate, "down": down} if up is None else {"gate": gate, "up": up, "down": down}
    x, projs = _prepare(op, x, named)
    gate_spec = _check_projection(op, "gate", projs["gate"], x.shape[-1], x)
    if up is None:
        if gate_spec.out_features % 2:
            raise ValueError(
                f"{op}: with up=None, gate is the fused gate_up projection and needs an even out_features "
                f"([gate | up]), got {gate_spec.out_features}; pass up separately otherwise."
            )
        in_specs, intermediate = (gate_spec,), gate_spec.out_features // 2
    else:
        up_spec = _check_projection(op, "up", projs["up"], x.shape[-1], x)
        if up_spec.out_features != gate_spec.out_features:
            raise ValueError(
                f"{op}: gate and up must have the same out_features (intermediate size), got "
                f"{gate_spec.out_features} and {up_spec.out_features}."
            )
        in_specs, intermediate = (gate_spec, up_spec), gate_spec.out_features
    down_spec = _check_projection(op, "down", projs["down"], intermediate, x)
    _check_adapter_dtypes(op, projs)
    return x, (*in_specs, down_spec), _flat(list(projs.values()))


def lora_mlp(
    x: torch.Tensor,
    gate: LoRAProjection,
    up: LoRAProjection | None,
    down: LoRAProjection,
    activation: Activation,
) -> torch.Tensor:
    """The gated MLP ``down(act(gate(x)) * up(x))`` with LoRA projections, as one autograd Function.

    ``activation`` is "swiglu" (silu; Llama, Mistral, Qwen), "geglu_tanh" (tanh GELU; Gemma) or "geglu" (exact
    erf GELU). ``up=None`` takes Phi-3's fused layout: ``gate`` produces [gate | up] along the last dim. The
    activation is the fused fp32 kernel of swiglu.py / geglu.py (rounded once). Autograd keeps x, the gate and
    up projection outputs and (N, r) LoRA products; the activation output is recomputed in backward, where
    PEFT keeps it (and fp32 copies of x and of it for the adapters).
    """
    x, specs, tensors = _mlp_inputs("lora_mlp", x, gate, up, down, activation)
    y = LoRAMLPFunction.apply(x, specs, activation, *tensors)
    return y.view(*x.shape[:-1], specs[-1].out_features)


def audit_cases() -> list[AuditCase]:
    """None: this module launches no Triton kernel of its own (GEMMs are cuBLAS; the activation kernels are
    swiglu.py's and geglu.py's, audited there).

    Bytes model of lora_mlp's backward beyond a plain MLP backward, per token (s = itemsize, I the intermediate
    size): the recompute of h reads gate and up and writes h (3 I s); the LoRA GEMMs read their (N, in)
    operand (x or h, upcast to the adapter dtype) once per group, not once per adapter.
    """
    return []
