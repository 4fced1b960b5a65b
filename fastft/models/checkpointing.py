"""Gradient checkpointing of decoder layers, optionally with the kept layer inputs offloaded to host memory.

Checkpointing trades compute for memory: a checkpointed decoder layer keeps none of its internal activations
(attention inputs, MLP intermediates: tens of ``batch x seq x hidden`` tensors per layer) and recomputes them in
backward. What it must keep is its *input*, one ``batch x seq x hidden`` tensor per layer. ``"offload"`` mode moves
that input too: a device-to-host copy in forward (into pinned memory, queued on the compute stream without making
the host wait) and a host-to-device copy in backward just before the layer is recomputed. The device then holds no
per-layer activation at all between forward and backward; the price is the two copies, which take their turn on the
compute stream (``2 x batch x seq x hidden x bytes`` per layer over the host link).

:func:`offloaded_checkpoint` is built on PyTorch's *non-reentrant* checkpoint (``torch.utils.checkpoint`` with
``use_reentrant=False``), not on a reentrant ``autograd.Function`` that re-runs the layer and calls backward inside
its own backward. The forward graph is the real one; only its saved tensors are dropped and recomputed on demand.
Hence:

- gradients are those of the uncheckpointed graph, computed by the same backward nodes from bitwise the same
  recomputed values (same inputs, same RNG state, same autocast state);
- parameters inside the layer get their gradients even when no layer input requires grad (LoRA on a frozen
  embedding), without ``enable_input_require_grads`` and without a dummy input that requires grad;
- gradients arrive through autograd's ordinary ``AccumulateGrad`` in the one backward pass, never written to
  ``.grad`` by hand and never inside a nested backward: DDP's and FSDP2's gradient hooks fire as usual, and
  ``torch.autograd.grad(loss, params)`` works (reentrant checkpointing refuses it; so does this module when asked
  for ``use_reentrant=True``).

:func:`set_checkpointing` applies a mode to a model (plain transformers or PEFT-wrapped). Each
``GradientCheckpointingLayer`` instance gets a dynamic subclass whose ``_gradient_checkpointing_func`` is a
property: transformers (and Trainer / TRL calling ``gradient_checkpointing_enable`` later) still set and clear it,
but in offload mode the property keeps answering :func:`offloaded_checkpoint`. Swapping the instance's class rather
than assigning ``forward`` on the library class matters: transformers 5.24 (not 5.17) wraps each layer class's
``forward`` in ``__init_subclass__``, so a ``forward`` assigned to the class afterwards silently drops checkpointing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers < 4.52: decoder layers have no common checkpointing base class
    GradientCheckpointingLayer = None

CheckpointingMode = Literal["none", "standard", "offload"]

# What users type (Unsloth's and transformers' spellings) -> the mode it means.
_MODE_ALIASES: dict[object, CheckpointingMode] = {
    False: "none",
    "none": "none",
    True: "standard",
    "standard": "standard",
    "unsloth": "offload",
    "offload": "offload",
}

# Instance attributes the dynamic subclass keeps (in the instance ``__dict__``).
_MODE_ATTR = "_fastft_checkpointing_mode"
_HF_FUNC_ATTR = "_fastft_hf_checkpointing_func"
_SEGMENT_ATTR = "_fastft_segment_checkpointing_func"

# What transformers sets by default (``gradient_checkpointing_kwargs={"use_reentrant": False}``).
_standard_checkpoint = functools.partial(checkpoint, use_reentrant=False)


def normalize_checkpointing_mode(value: bool | str) -> CheckpointingMode:
    """Map a user's ``use_gradient_checkpointing`` value to ``"none"``, ``"standard"`` or ``"offload"``.

    ``False``/``"none"`` turn checkpointing off, ``True``/``"standard"`` checkpoint each decoder layer and keep its
    input on the device, ``"unsloth"``/``"offload"`` (synonyms) also move that input to host memory. Anything else
    raises ``ValueError`` listing the accepted values.
    """
    # bool is checked by type so that 0 and 1 (equal to False and True as dict keys) are not accepted by accident.
    if isinstance(value, bool) or (isinstance(value, str) and value in _MODE_ALIASES):
        return _MODE_ALIASES[value]
    accepted = ", ".join(repr(key) for key in _MODE_ALIASES)
    raise ValueError(f"use_gradient_checkpointing={value!r} is not a checkpointing mode; use one of {accepted}.")


def _on_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host-memory tensor with ``tensor``'s values; ``tensor`` itself (detached, no copy) when already on the host."""
    if _on_host(tensor):
        return tensor.detach()
    # Pinned memory lets the copy be queued on the current stream without the host waiting for it (the host goes
    # on queuing the next layer's kernels). Nothing synchronises: the buffer is only read by the host-to-device
    # copy in backward, queued on the same stream after this one, and once the caller frees the source, the caching
    # allocator reuses its memory only for work queued on that stream after the copy. Other accelerators get a
    # plain blocking copy.
    pinned = tensor.device.type == "cuda"
    host = torch.empty_like(tensor, device="cpu", pin_memory=pinned)
    host.copy_(tensor.detach(), non_blocking=pinned)
    return host


def _to_device(host: torch.Tensor, device: torch.device, requires_grad: bool) -> torch.Tensor:
    """The recompute input: ``host`` back on ``device``, a fresh leaf that requires grad iff the original did.

    ``requires_grad`` must match the original input: autograd saves tensors only for ops that record a node, and
    the recomputation has to save exactly what the original forward saved.
    """
    on_device = host.to(device, non_blocking=host.is_pinned())
    return on_device.detach().requires_grad_(requires_grad)


def offloaded_checkpoint(
    function: Callable[..., Any], *args: Any, use_reentrant: bool | None = None, **kwargs: Any
) -> Any:
    """Run ``function(*args, **kwargs)`` without keeping its activations, holding its tensor ``args`` in host memory.

    Usable as a transformers ``_gradient_checkpointing_func``. Each tensor in ``args`` (the hidden states a decoder
    layer receives) is kept on the host until backward: copied into pinned memory without blocking on CUDA, kept as
    is (no copy) when already on the CPU. Backward copies it back, recomputes ``function`` with grad enabled under
    the forward's RNG and autocast state (dropout masks repeat exactly), and backpropagates through the forward's
    own graph, so gradients equal those without checkpointing. ``kwargs`` (rotary cos/sin, attention masks: shared
    by all layers) stay where they are, by reference. Returns what ``function`` returns (a tensor or a tuple).
    Without grad enabled it simply calls ``function``. ``use_reentrant`` exists for callers that pass torch's
    checkpoint options: only ``False`` (or omitted) is accepted.
    """
    if use_reentrant:
        raise ValueError(
            "offloaded_checkpoint(use_reentrant=True) is not supported: offloaded checkpointing is non-reentrant, "
            "which is what lets torch.autograd.grad and layers whose inputs need no grad work. Omit use_reentrant "
            "or pass use_reentrant=False."
        )
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)

    is_tensor = [isinstance(arg, torch.Tensor) for arg in args]
    host_args = [_to_host(arg) if tensor else arg for arg, tensor in zip(args, is_tensor, strict=True)]
    # One empty (0-byte) tensor per tensor argument, on that argument's device. Passed to torch's checkpoint, they
    # make it record that device's RNG and autocast state (it looks at the device of its tensor arguments, and the
    # host copies are on the CPU), and they tell the recompute where each input goes back to.
    markers = [arg.new_empty(0) if tensor else None for arg, tensor in zip(args, is_tensor, strict=True)]
    requires_grad = [tensor and arg.requires_grad for arg, tensor in zip(args, is_tensor, strict=True)]
    # The forward runs on the caller's own tensors (so the graph links to them); the list then lets them go, so a
    # device input's memory is freed as soon as the caller drops it. Every later call is a recomputation.
    first_call = [args]

    def run(*saved: Any) -> Any:
        if first_call:
            return function(*first_call.pop(), **kwargs)
        count = len(saved) // 2
        inputs = [
            _to_device(host, marker.device, grad) if tensor else host
            for host, marker, grad, tensor in zip(saved[count:], saved[:count], requires_grad, is_tensor, strict=True)
        ]
        return function(*inputs, **kwargs)

    # torch's checkpoint saves its tensor arguments for the recomputation through the saved-tensor hooks: here the
    # markers (0 bytes) and the host copies, so a SavedTensorMeter sees the host bytes and nothing on the device.
    return checkpoint(run, *markers, *host_args, use_reentrant=False, preserve_rng_state=True)


class _CheckpointedLayer:
    """Placed in front of a decoder layer's class by :func:`set_checkpointing` (see the module docstring)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Looked up at call time: a forward assigned to the library class later is still the one that runs, and
        # still inside this class's checkpoint. transformers 5.24 wraps this method when the subclass is created;
        # the wrapper it finds on the library class then does not checkpoint a second time (only the instance's
        # outermost forward checkpoints). 4.5x and 5.17 checkpoint in ``__call__`` instead.
        return super().forward(*args, **kwargs)

    @property
    def _gradient_checkpointing_func(self) -> Callable[..., Any]:
        if self.__dict__.get(_MODE_ATTR) == "offload":
            # fastft.models.long_context.set_long_context(keep_every=k) keeps every k-th layer input only.
            return self.__dict__.get(_SEGMENT_ATTR) or offloaded_checkpoint
        return self.__dict__.get(_HF_FUNC_ATTR) or _standard_checkpoint

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, function: Callable[..., Any]) -> None:
        # transformers' _set_gradient_checkpointing lands here: remember its function for "standard" mode.
        self.__dict__[_HF_FUNC_ATTR] = function


_checkpointed_classes: dict[type, type] = {}


def _checkpointed_class(base: type) -> type:
    """The dynamic subclass of ``base`` (one per class): same name, so reprs and error messages read as before."""
    cls = _checkpointed_classes.get(base)
    if cls is None:
        cls = type(
            base.__name__, (_CheckpointedLayer, base), {"__module__": __name__, "__qualname__": base.__qualname__}
        )
        _checkpointed_classes[base] = cls
    return cls


def _swap_class(layer: nn.Module) -> None:
    if isinstance(layer, _CheckpointedLayer):
        return
    recorded = layer.__dict__.pop("_gradient_checkpointing_func", None)
    layer.__class__ = _checkpointed_class(type(layer))
    if recorded is not None:
        layer._gradient_checkpointing_func = recorded


def _enable_hf_checkpointing(model: PreTrainedModel) -> None:
    # Newer transformers (5.24 here) call it activation_checkpointing_enable; the old name warns there.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _disable_hf_checkpointing(model: PreTrainedModel) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def set_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """Checkpoint every decoder layer of ``model`` in ``mode``: ``"none"``, ``"standard"`` or ``"offload"``.

    ``model`` is a transformers model or a PEFT model around one; ``mode`` also takes the spellings of
    :func:`normalize_checkpointing_mode`. Every ``GradientCheckpointingLayer`` gets its class swapped once (see the
    module docstring), and the model's own ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``
    (``use_reentrant=False``) or ``..._disable`` is called, so ``is_gradient_checkpointing`` and Trainer see the
    truth; ``config.use_cache`` is set to ``False`` while checkpointing (a KV cache is never filled in checkpointed
    training). Offload mode survives later ``gradient_checkpointing_enable`` calls; ``gradient_checkpointing_disable``
    still turns checkpointing off. Calling it again with any mode is safe.
    """
    mode = normalize_checkpointing_mode(mode)
    layers = (
        [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
        if GradientCheckpointingLayer is not None
        else []
    )
    if not layers:
        if mode == "none":
            return
        raise ValueError(
            f"set_checkpointing(mode={mode!r}) found no transformers GradientCheckpointingLayer in "
            f"{type(model).__name__} (the decoder layers of recent transformers are). Use the model's own "
            "gradient_checkpointing_enable() for standard checkpointing, or pass use_gradient_checkpointing=False."
        )

    for layer in layers:
        if mode != "none":
            _swap_class(layer)
        if isinstance(layer, _CheckpointedLayer):
            layer.__dict__[_MODE_ATTR] = mode

    # The outermost transformers model (inside a PeftModel: its base model) owns the public switch.
    pretrained = next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)
    if pretrained is not None and pretrained.supports_gradient_checkpointing:
        if mode == "none":
            _disable_hf_checkpointing(pretrained)
        else:
            _enable_hf_checkpointing(pretrained)
            if getattr(pretrained.config, "use_cache", False):
                pretrained.config.use_cache = False
    # Layers the switch did not reach (a bare module list, every_n_layers set earlier) get the flag directly.
    for layer in layers:
        layer.gradient_checkpointing = mode != "none"
