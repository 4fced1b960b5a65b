"""The gated LoRA MLP over sequence tiles: no ``(tokens x intermediate)`` tensor for the whole sequence.

Same formula and the same numbers as :func:`fastft.kernels.lora.lora_mlp` (whose docstring gives the forward,
the hand-derived backward and the dtypes); the rows of x are independent in a token-wise MLP, so the N rows are
cut into tiles of ``T`` rows and each tile runs the untiled pieces (``_group_forward``, the fused activation
kernels, ``_group_backward``) on its own rows:

    forward, per tile t:   gate_t, up_t = P_g(x_t), P_u(x_t);  h_t = act(gate_t) * up_t;  y_t = P_d(h_t)
    backward, per tile t:  gate_t, up_t, h_t and the (T, r) products s x_t A^T, s h_t A_d^T recomputed from x_t;
                           dh_t, d gate_t, d up_t, dx_t as in lora_mlp;  dW += g_t^T x_t ... (sums over tiles)

Saved for backward: x only (and the parameters, which cost nothing). Not saved: gate, up (2 N I elements in
lora_mlp) and the (N, r) LoRA products; each is recomputed one tile at a time, so backward repeats the gate/up
GEMMs (2 N H I multiply-adds, one third of the MLP's forward) and the activation.

Transient memory, per tile (s the itemsize, I the intermediate size, H the hidden size): gate, up, h, dh,
d gate, d up (6 T I s at most, fewer as each is released), y_t / dx_t (T H s) and the LoRA products; plus the
whole-sequence output y (forward) or dx (backward), which any MLP returns.

Gradients across tiles: dx is per row, so each tile writes its own rows (exactly the untiled values up to the
GEMM's blocking). Parameter gradients are sums over rows: each tile's contribution (computed as in lora_mlp, in
the parameter's dtype) is added into one fp32 accumulator per gradient, cast to the parameter's dtype at the end.
With fp32 tensors (and fp32 LoRA adapters over any base) the result differs from the untiled GEMM's sum only by
fp32 rounding of the partial sums (relative ~1e-6 per tile added); a bf16/fp16 base weight trained in full gets
each tile's partial gradient rounded to its dtype once before the fp32 sum (one extra rounding per tile).

Dropout on an adapter draws one mask over the whole input, which tiling cannot reproduce tile by tile without
keeping it (N x H bytes): with dropout the untiled Function runs (same numbers as PEFT, its memory).

Tile size: the ``tile_tokens`` argument; otherwise on CUDA the largest multiple of 256 rows whose transients take
at most 1/8 of the device's free memory (at least 256 rows, at most 16384), on other devices ``hidden`` rows
(the tile's (T, I) buffers are then the size of one (I, H) weight).
"""

from __future__ import annotations

import torch

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase
from fastft.kernels.lora import (
    _TRITON_DTYPES,
    Activation,
    LoRAMLPFunction,
    LoRAProjection,
    _activation_kernels,
    _group,
    _group_backward,
    _group_forward,
    _group_saved,
    _mlp_inputs,
    _needs,
)

_MIN_TILE, _MAX_TILE, _FREE_SHARE = 256, 16384, 8


def tile_rows(tokens: int, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per tile when none is given (module docstring): from free memory on CUDA, ``hidden`` rows elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_row = (6 * intermediate + 2 * hidden) * dtype.itemsize
        rows = free // _FREE_SHARE // per_row // _MIN_TILE * _MIN_TILE
        return int(min(max(rows, _MIN_TILE), _MAX_TILE, max(tokens, 1)))
    return int(min(max(hidden, 1), max(tokens, 1)))


def _scaled_xa(x2: torch.Tensor, spec, params: tuple) -> torch.Tensor | None:
    """s * cast(x) A^T (N, r) of one adapter without dropout (recomputed for dB), None without an adapter."""
    if not spec.rank:
        return None
    a = params[2]
    return torch.mm(x2.to(a.dtype), a.t()).mul_(spec.scaling)


class TiledLoRAMLPFunction(torch.autograd.Function):
    """lora_mlp over tiles of ``tile`` rows; saves x only (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, specs: tuple, activation: str, tile: int, *tensors: torch.Tensor | None):
        n_in = len(specs) - 1
        in_params, (down_params,) = _group(tensors, n_in), _group(tensors[4 * n_in :], 1)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2.new_empty(x2.shape[0], specs[-1].out_features)
        with torch.autocast(x.device.type, enabled=False):
            for lo in range(0, x2.shape[0], tile):
                outs, _, _ = _group_forward(x2[lo : lo + tile], specs[:n_in], in_params)
                gate, up = outs[0].chunk(2, dim=-1) if n_in == 1 else outs
                ctx.triton = use_triton(gate) and gate.dtype in _TRITON_DTYPES
                h = _activation_kernels(activation, ctx.triton)[0](gate, up)
                del outs, gate, up
                (y_tile,), _, _ = _group_forward(h, specs[n_in:], [down_params])
                del h
                y[lo : lo + tile] = y_tile
                del y_tile
        ctx.save_for_backward(x, *tensors)
        ctx.specs, ctx.activation, ctx.tile, ctx.x_shape, ctx.dtype = specs, activation, tile, x.shape, x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        specs, n_in, tile = ctx.specs, len(ctx.specs) - 1, ctx.tile
        x, *tensors = ctx.saved_tensors
        in_params, (down_params,) = _group(tensors, n_in), _group(tensors[4 * n_in :], 1)
        in_needs, (down_needs,) = _needs(ctx.needs_input_grad, 4, n_in), _needs(ctx.needs_input_grad, 4 + 4 * n_in, 1)
        need_x = ctx.needs_input_grad[0]
        need_act = need_x or any(any(n) for n in in_needs)
        # h is recomputed when dW_d, dA_d or dB_d (through s h A_d^T) needs it.
        need_h = down_needs[0] or (specs[-1].rank > 0 and (down_needs[2] or down_needs[3]))
        act_forward, act_backward = _activation_kernels(ctx.activation, ctx.triton)
        x2, g2 = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
        dx = x2.new_empty(x2.shape) if need_x else None
        sums: list[torch.Tensor | None] = [None] * (4 * len(specs))  # accumulators, flat like ``tensors``

        def accumulate(first: int, grads: list) -> None:
            for k, grad in enumerate(grads):
                if grad is not None:
                    if sums[first + k] is None:  # fp32 (float64 stays float64); a fresh tensor of this tile's
                        sums[first + k] = grad.to(torch.promote_types(grad.dtype, torch.float32))
                    else:
                        sums[first + k].add_(grad)

        with torch.autocast(grad_y.device.type, enabled=False):
            for lo in range(0, x2.shape[0], tile):
                x_t, g_t = x2[lo : lo + tile], g2[lo : lo + tile]
                # Recompute this tile's gate and up (and the (T, r) products s x A^T that dB needs).
                outs, in_sxa, in_masks = _group_forward(x_t, specs[:n_in], in_params)
                gate, up = outs[0].chunk(2, dim=-1) if n_in == 1 else outs
                h = act_forward(gate, up) if need_h else None
                down_sxa = [_scaled_xa(h, specs[-1], down_params) if down_needs[3] and h is not None else None]
                down_saved = _group_saved(specs[n_in:], [down_params], down_sxa, [None], need_act, [down_needs])
                dh, (down_grads,) = _group_backward(
                    h, specs[n_in:], down_saved, [[g_t]], need_act, [down_needs], ctx.dtype
                )
                del h, down_sxa, down_saved
                accumulate(4 * n_in, down_grads)
                if need_act:
                    dgate, dup = act_backward(gate, up, dh, True, True)
                    del dh, gate, up, outs
                    pieces = [[dgate, dup]] if n_in == 1 else [[dgate], [dup]]
                    in_saved = _group_saved(specs[:n_in], in_params, in_sxa, in_masks, need_x, in_needs)
                    dx_t, in_grads = _group_backward(x_t, specs[:n_in], in_saved, pieces, need_x, in_needs, ctx.dtype)
                    del pieces, dgate, dup, in_saved
                    for k, grads in enumerate(in_grads):
                        accumulate(4 * k, grads)
                    if dx_t is not None:
                        dx[lo : lo + tile] = dx_t
                    del dx_t
        grads = [None if s is None else s.to(t.dtype) for s, t in zip(sums, tensors, strict=True)]
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return dx, None, None, None, *grads


def tiled_lora_mlp(
    x: torch.Tensor,
    gate: LoRAProjection,
    up: LoRAProjection | None,
    down: LoRAProjection,
    activation: Activation,
    tile_tokens: int | None = None,
) -> torch.Tensor:
    """:func:`fastft.kernels.lora.lora_mlp` run over tiles of ``tile_tokens`` rows (module docstring).

    Same arguments and result as ``lora_mlp``; ``tile_tokens`` (a positive int) is the rows per tile, ``None``
    picks it from free memory (:func:`tile_rows`). Autograd keeps x alone; backward recomputes each tile's gate and
    up. One tile covering every row, or an adapter with dropout, runs ``lora_mlp`` itself (no recompute).
    """
    if tile_tokens is not None and (
        isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1
    ):
        raise ValueError(
            f"tiled_lora_mlp: tile_tokens must be a positive int (rows per tile) or None, got {tile_tokens!r}."
        )
    x, specs, tensors = _mlp_inputs("tiled_lora_mlp", x, gate, up, down, activation)
    tokens = x.numel() // max(x.shape[-1], 1)
    tile = tile_tokens or tile_rows(tokens, x.shape[-1], specs[-1].in_features, x.dtype, x.device)
    if tile >= tokens or any(spec.dropout for spec in specs):
        y = LoRAMLPFunction.apply(x, specs, activation, *tensors)
    else:
        y = TiledLoRAMLPFunction.apply(x, specs, activation, tile, *tensors)
    return y.view(*x.shape[:-1], specs[-1].out_features)


def audit_cases() -> list[AuditCase]:
    """None: the tiles launch lora.py's GEMMs and the swiglu.py / geglu.py kernels, audited there.

    Bytes and FLOPs beyond lora_mlp, per token: the recompute of gate and up reads x and writes 2 I elements
    (2 H I multiply-adds, a third of the MLP's forward FLOPs); gate and up are not written to and read back
    from memory between forward and backward (2 I s bytes saved, 4 I s bytes of traffic avoided).
    """
    return []
