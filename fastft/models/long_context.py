"""Long-context training: the MLP over sequence tiles, and fewer layer inputs kept in host memory.

:func:`set_long_context` switches a patched model (plain transformers or PEFT-wrapped, after :func:`fastft.patch`)
to the memory layout long sequences need:

- **tiled MLP** (``tiled_mlp``): every fused gated MLP runs :func:`fastft.kernels.tiled_mlp.tiled_lora_mlp`, so no
  ``(tokens x intermediate)`` tensor exists for the whole sequence, in forward or in backward; gate and up are
  recomputed per tile in backward (a third of the MLP's forward FLOPs). ``True`` picks the tile from free memory,
  an int is the rows per tile. An MLP whose input comes straight from a fastft RMSNorm (Llama's
  ``post_attention_layernorm``, Gemma's ``pre_feedforward_layernorm``) applies that norm itself, tile by tile, so
  the normalised ``(tokens x hidden)`` tensor is not kept for backward either (the norm's input, the residual
  stream, is). The same losses and gradients up to fp32 rounding of the per-tile partial sums of the parameter
  gradients.
- **input norm fused into q/k/v** (on with ``tiled_mlp``): attention whose input is a fastft RMSNorm's output
  (Llama's ``input_layernorm``) runs :func:`fastft.kernels.normed_qkv.normed_lora_qkv`, which keeps the norm's
  input for backward instead of the normalised rows and recomputes them there: one ``(tokens x hidden)`` tensor
  less per layer, bitwise the same gradients.
- **every k-th layer input** (``keep_every=k``): offloaded checkpointing keeps each decoder layer's input in host
  memory, ``tokens x hidden x 2`` bytes per layer (256 GiB for a million tokens of Llama-3-8B). With ``k > 1`` only
  the inputs of layers ``0, k, 2k, ...`` are kept (offloaded as before); in backward, the first layer of a segment
  to be recomputed (its last) replays the segment's earlier layers without grad from the kept input, parking their
  outputs in host memory until their own backward (at most ``k - 1`` of them, one segment at a time). Host memory:
  ``ceil(L / k) + k - 1`` layer inputs instead of ``L`` (``k ~ sqrt(L)`` is the least: 11 instead of 32 for
  Llama-3-8B). Recompute: each layer that is not a segment start runs its forward once more (the replay), so a
  step does ``(1 - 1/k)`` extra layer forwards per layer, about +25% of a checkpointed step's layer FLOPs
  (forward 1 + recompute 1 + backward 2). Each replayed layer runs under its own forward's RNG and autocast
  state, so the values are bitwise those of the forward and gradients do not change.
  :func:`keep_every_for` picks ``k`` from the host memory there is.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastft.models.checkpointing import _SEGMENT_ATTR, _to_device, _to_host, set_checkpointing
from fastft.models.layers import FastGatedMLP, FastRMSNorm

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers < 4.52
    GradientCheckpointingLayer = None

_TILE_ATTR = "_fastft_mlp_tile"
_TAG_ATTR = "_fastft_tag_output"


def set_long_context(model: nn.Module, tiled_mlp: bool | int = True, keep_every: int = 1) -> dict[str, int]:
    """Switch ``model`` to the long-context layout (module docstring); returns ``{"tiled_mlp": count, "keep_every":
    k, "kept_inputs": layers whose input is kept}``.

    ``tiled_mlp``: ``True`` (tile rows from free memory), a positive int (rows per tile) or ``False`` (untiled,
    back to :func:`fastft.kernels.lora.lora_mlp`). The model must have been patched (:func:`fastft.patch` or
    ``FastModel``): the MLPs fastft left on transformers' code are not tiled and not counted. ``keep_every``: keep
    every k-th decoder layer input (1: every input, plain offloaded checkpointing); ``k > 1`` turns on offloaded
    checkpointing (:func:`fastft.models.checkpointing.set_checkpointing`) if it is not on. Calling it again
    replaces the settings.
    """
    if isinstance(tiled_mlp, bool):
        tile = 0 if tiled_mlp else None
    elif isinstance(tiled_mlp, int) and tiled_mlp > 0:
        tile = tiled_mlp
    else:
        raise ValueError(
            f"set_long_context: tiled_mlp must be True (tile from free memory), False or a positive number of rows "
            f"per tile, got {tiled_mlp!r}."
        )
    mlps = [m for m in model.modules() if isinstance(m, FastGatedMLP)]
    if tile is not None and not mlps:
        raise ValueError(
            f"set_long_context(tiled_mlp={tiled_mlp!r}) found no fused gated MLP in {type(model).__name__}: patch the "
            "model first (fastft.patch(model) or FastModel.from_pretrained), or pass tiled_mlp=False."
        )
    if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
        raise ValueError(
            f"set_long_context: keep_every must be a positive int (1 keeps every layer input), got {keep_every!r}."
        )
    layers = _checkpointed_layers(model)
    if keep_every > 1:
        if not layers:
            raise ValueError(
                f"set_long_context(keep_every={keep_every}) found no transformers GradientCheckpointingLayer in "
                f"{type(model).__name__}; decoder layers of recent transformers are. Pass keep_every=1."
            )
        if any(layer.__dict__.get("_fastft_checkpointing_mode") != "offload" for layer in layers):
            set_checkpointing(model, "offload")
    segments = _Segments(keep_every)
    for index, layer in enumerate(layers):
        if keep_every > 1:
            layer.__dict__[_SEGMENT_ATTR] = functools.partial(_segment_checkpoint, segments, index)
        else:
            layer.__dict__.pop(_SEGMENT_ATTR, None)
    for mlp in mlps:
        if tile is None:
            mlp.__dict__.pop(_TILE_ATTR, None)
        else:
            mlp.__dict__[_TILE_ATTR] = tile
    for norm in (m for m in model.modules() if isinstance(m, FastRMSNorm)):
        if tile is None:
            norm.__dict__.pop(_TAG_ATTR, None)
        else:
            norm.__dict__[_TAG_ATTR] = True
    kept = math.ceil(len(layers) / keep_every)
    return {"tiled_mlp": len(mlps) if tile is not None else 0, "keep_every": keep_every, "kept_inputs": kept}


def keep_every_for(layers: int, tokens: int, hidden: int, host_bytes: float, itemsize: int = 2) -> int:
    """The smallest ``k`` whose kept and parked layer inputs, ``(ceil(layers / k) + k - 1) x tokens x hidden x
    itemsize`` bytes, fit in ``host_bytes``; ``ValueError`` when no ``k`` does (even ``k ~ sqrt(layers)``)."""
    per_input = tokens * hidden * itemsize
    for k in range(1, layers + 1):
        if (math.ceil(layers / k) + k - 1) * per_input <= host_bytes:
            return k
    least = min(math.ceil(layers / k) + k - 1 for k in range(1, layers + 1))
    raise ValueError(
        f"keep_every_for: even the fewest layer inputs in host memory ({least} of {per_input / 2**30:.2f} GiB) "
        f"exceed {host_bytes / 2**30:.2f} GiB; use fewer tokens per step or more host memory."
    )


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    if GradientCheckpointingLayer is None:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class _Segments:
    """The layers' shared state: ``k`` and the pass in progress (a new one starts when layer 0 runs), held weakly:
    a pass lives as long as the autograd graph of one of its layers (whose recompute closures hold it)."""

    def __init__(self, keep_every: int) -> None:
        self.keep_every = keep_every
        self.current: Callable[[], _Pass | None] = lambda: None


class _Pass:
    """One forward's record of its layers: how to replay each one, the kept inputs, the parked replay outputs."""

    def __init__(self, keep_every: int) -> None:
        self.keep_every = keep_every
        self.replays: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.kept: dict[int, torch.Tensor] = {}  # host copies of the segment starts' inputs
        self.parked: dict[int, torch.Tensor] = {}  # host copies of replayed inputs, until their layer's backward

    def input_of(self, index: int, device: torch.device, requires_grad: bool) -> torch.Tensor:
        """Layer ``index``'s input on ``device`` for its recompute: kept, parked, or replayed from its segment."""
        if index in self.kept:  # a segment start: recomputed after the rest of its segment, its last use
            return _to_device(self.kept.pop(index), device, requires_grad)
        if index not in self.parked:
            start = index - index % self.keep_every
            hidden = _to_device(self.kept[start], device, False)
            with torch.no_grad():
                for j in range(start, index):
                    hidden = self.replays[j](hidden)
                    if j + 1 < index:
                        self.parked[j + 1] = _to_host(hidden)
            return hidden.detach().requires_grad_(requires_grad)
        return _to_device(self.parked.pop(index), device, requires_grad)


def _replay(function: Callable[..., Any], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``function`` (a layer's forward with its keyword arguments bound) under this moment's RNG and autocast state."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))

    def run(hidden: torch.Tensor) -> torch.Tensor:
        devices = [device] if cuda_state is not None else []
        with torch.random.fork_rng(devices=devices), torch.autocast(device.type, autocast[1], enabled=autocast[0]):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
            out = function(hidden)
        return out[0] if isinstance(out, (tuple, list)) else out

    return run


class _Handle:
    """What a layer that is not a segment start passes to torch's checkpoint instead of its input (no bytes)."""

    def __init__(self, run: _Pass, index: int, device: torch.device, requires_grad: bool) -> None:
        self.run, self.index, self.device, self.requires_grad = run, index, device, requires_grad

    def get(self) -> torch.Tensor:
        return self.run.input_of(self.index, self.device, self.requires_grad)


def _segment_checkpoint(
    segments: _Segments, index: int, function: Callable[..., Any], *args: Any, use_reentrant: bool | None = None
) -> Any:
    """The ``_gradient_checkpointing_func`` of layer ``index`` with ``keep_every > 1`` (module docstring)."""
    if use_reentrant:
        raise ValueError("keep_every > 1 checkpointing is non-reentrant; omit use_reentrant or pass False.")
    if not torch.is_grad_enabled():
        return function(*args)
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise TypeError(
            f"set_long_context(keep_every={segments.keep_every}): decoder layer {index} was called with "
            f"{len(args)} positional arguments; segment checkpointing replays layers that take only the hidden "
            "states positionally (every transformers decoder layer does). Use keep_every=1."
        )
    run = segments.current()
    if index == 0 or run is None:
        run = _Pass(segments.keep_every)
        segments.current = weakref.ref(run)
    hidden, grad = args[0], args[0].requires_grad
    run.replays[index] = _replay(function, hidden.device)
    first_call = [hidden]

    def forward(marker: torch.Tensor, saved: Any) -> Any:
        if first_call:  # the forward itself, on the caller's tensor (the graph links to it)
            return function(first_call.pop())
        if isinstance(saved, _Handle):
            return function(saved.get())
        return function(run.input_of(index, marker.device, grad))  # the kept input (``saved``'s values)

    if index % segments.keep_every == 0:
        # Kept in host memory (offloaded), and passed to the checkpoint so that what it saves shows the bytes.
        run.kept[index] = saved = _to_host(hidden)
    else:
        saved = _Handle(run, index, hidden.device, grad)
    return checkpoint(forward, hidden.new_empty(0), saved, use_reentrant=False, preserve_rng_state=True)
