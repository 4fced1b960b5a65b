"""``shard(model)``: PyTorch FSDP2 (``fully_shard``) on a fastft model, one unit per decoder layer plus the root.

FSDP2 keeps each parameter as a DTensor sharded along dim 0 across the mesh; before a unit's forward (and again
before its backward) it all-gathers the unit's parameters into plain tensors, registers those on the modules,
and frees them afterwards (``reshard_after_forward=True``) or keeps them until backward (``False``). So every
fastft computation inside a module's forward sees ordinary tensors: the fused LoRA Functions (which save the
base weight W, A and B for backward by reference: FSDP2 frees and re-gathers the *storage* of those same
tensor objects, so the saved references hold valid values again when backward runs), the fused
linear cross-entropy (inside the causal LM's forward, i.e. inside the root unit), and offloaded checkpointing
(non-reentrant; the recomputation runs after FSDP2's pre-backward all-gather). Gradients land on the unsharded
parameters and FSDP2 reduce-scatters them (averaged over ranks) into the sharded ``.grad``.

The one computation outside every ``forward`` is the RL log-prob head (:func:`fastft.rl.heads.causal_log_probs`
calls the backbone and reads ``lm_head.weight`` itself): :func:`shard` registers a root method for it with
``register_fsdp_forward_method``, so it runs under the root unit's all-gather and gradient reduction too.

Layout: the decoder layers are found structurally (instances of the classes in ``_no_split_modules``, which
fastft's class swaps keep by name), each gets ``fully_shard``; then the root (the PEFT model or the causal
LM) gets one unit holding the embeddings, the final norm and the head. LoRA must be added *before*
sharding (PEFT replaces modules, and FSDP2 only manages the parameters present when ``fully_shard`` ran).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from fastft.distributed.trainer import forbid_ddp
from fastft.models.patch import causal_lm
from fastft.rl.heads import LOG_PROBS_METHOD  # the root method fastft.rl.heads.run_in_root runs through


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "fastft.distributed.shard: no torch.distributed process group is initialised. Launch with "
            "`torchrun --nproc_per_node N train.py` (or `accelerate launch`) and call "
            "torch.distributed.init_process_group() (backend 'nccl' on CUDA, 'gloo' on CPU) before shard()."
        )


def _refuse_wrapped(model: nn.Module) -> None:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, DataParallel)):
        raise TypeError(
            f"fastft.distributed.shard: the model is already wrapped in {type(model).__name__}; pass the model "
            "itself (model.module) and choose one engine: shard() (FSDP2) or DistributedDataParallel, not both."
        )
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "FullyShardedDataParallel" or "_fsdp_wrapped_module" in dict(module.named_children()):
            raise TypeError(
                f"fastft.distributed.shard: {name or 'the model'} is wrapped in FSDP1 (FullyShardedDataParallel); "
                "pass the unwrapped model: shard() applies FSDP2 (fully_shard) itself."
            )
        if isinstance(module, FSDPModule):
            raise TypeError(
                f"fastft.distributed.shard: {name or 'the model'} is already sharded (fully_shard was applied). "
                "Call shard() once, on the unsharded model; add LoRA adapters (FastModel.get_peft_model) before "
                "sharding, not after."
            )


def _refuse_unsupported_weights(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise ValueError(
                f"fastft.distributed.shard: parameter {name} is on the meta device (not materialised). Load real "
                "weights first (from_pretrained without device_map='meta'/low_cpu_mem_usage leftovers, or "
                "model.to_empty(device=...) followed by loading a state dict), then shard."
            )
        kind = type(param).__name__
        if kind in ("Params4bit", "Int8Params"):
            raise NotImplementedError(
                f"fastft.distributed.shard: {name} is a bitsandbytes {kind} weight. FSDP2 shards parameters along "
                "dim 0 as DTensors, which drops the packed layout and its quant_state, so quantised bases cannot "
                "be sharded. Either use DDP (torch.nn.parallel.DistributedDataParallel(model): the frozen "
                "4-bit base is replicated, only LoRA gradients are synchronised), or load the base in bf16 "
                "(load_in_4bit=False) and shard that."
            )


def _mixed_precision(value: MixedPrecisionPolicy | torch.dtype | None) -> MixedPrecisionPolicy:
    if value is None:
        return MixedPrecisionPolicy()
    if isinstance(value, MixedPrecisionPolicy):
        return value
    if isinstance(value, torch.dtype) and value.is_floating_point:
        # Compute in `value`, reduce gradients in fp32 (the sharded master parameters stay in their own dtype).
        return MixedPrecisionPolicy(param_dtype=value, reduce_dtype=torch.float32)
    raise TypeError(
        f"fastft.distributed.shard: mixed_precision must be None, a floating torch.dtype (e.g. torch.bfloat16) or "
        f"a torch.distributed.fsdp.MixedPrecisionPolicy, got {value!r}."
    )


def _default_mesh(model: nn.Module) -> dist.DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    backend = str(dist.get_backend()).lower()
    param = next(model.parameters(), None)
    device_type = param.device.type if param is not None else "cpu"
    if "nccl" in backend:
        device_type = "cuda"  # FSDP2 moves CPU-loaded parameters to this process's GPU
    elif device_type == "cuda" and "gloo" in backend and "cuda" not in backend:
        raise ValueError(
            "fastft.distributed.shard: the model is on CUDA but the process group's backend is gloo; "
            "init_process_group('nccl') for GPUs (or pass mesh=...)."
        )
    return init_device_mesh(device_type, (dist.get_world_size(),))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (or a PEFT model around one), in order.

    Instances of the classes named in the model's ``_no_split_modules`` (what transformers and accelerate treat
    as the unit not to split); failing that, the children of the longest ``nn.ModuleList`` of one class.
    """
    root = causal_lm(model)
    names = set(getattr(root, "_no_split_modules", None) or ())
    found = [m for m in root.modules() if type(m).__name__ in names and m is not root]
    # Nested matches (a block inside a block) would make FSDP units overlap: keep the outermost.
    inner = {id(sub) for m in found for sub in m.modules() if sub is not m}
    found = [m for m in found if id(m) not in inner]
    if found:
        return found
    lists = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len({type(c) for c in m}) == 1]
    if lists:
        return list(max(lists, key=len))
    raise ValueError(
        f"fastft.distributed.shard: found no decoder layers in {type(root).__name__} (no _no_split_modules classes "
        "and no nn.ModuleList of blocks); apply torch.distributed.fsdp.fully_shard to its blocks yourself."
    )


def _log_probs_forward(self: nn.Module, compute, *tensors: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """``compute(*tensors)`` under the root unit's FSDP2 forward hooks (all-gather before, gradient hooks after).

    Returns a tuple of tensors: FSDP2 attaches its pre-backward hook to the tensors of the output."""
    return compute(*tensors)


def shard(
    model: nn.Module,
    mesh: dist.DeviceMesh | None = None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    mixed_precision: MixedPrecisionPolicy | torch.dtype | None = None,
) -> nn.Module:
    """Shard ``model`` (a fastft-patched causal LM or PEFT model) with FSDP2 across ``mesh``; returns it.

    ``fully_shard`` is applied to every decoder layer, then to the root, in place (the module classes become
    ``FSDP<Name>``; parameters become DTensors). ``mesh`` defaults to a 1-D mesh over the whole world on the
    process group's device type (CUDA for NCCL, CPU for gloo). ``reshard_after_forward=False`` keeps each
    layer's gathered parameters from forward to backward (ZeRO-2-like: more memory, one all-gather less).
    ``cpu_offload=True`` keeps sharded parameters, gradients and optimizer state in host memory
    (``CPUOffloadPolicy``; the optimizer then steps on the CPU). ``mixed_precision`` is a
    ``MixedPrecisionPolicy`` or a dtype (compute in it, reduce gradients in fp32). Call it after
    ``FastModel.get_peft_model`` and before creating the optimizer. Raises if no process group is initialised,
    if the model is already wrapped (DDP, FSDP1, fully_shard), or holds meta or bitsandbytes weights.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastft.distributed.shard expects a torch.nn.Module, got {type(model).__name__}")
    _require_process_group()
    _refuse_wrapped(model)
    _refuse_unsupported_weights(model)
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(
            f"fastft.distributed.shard: reshard_after_forward must be a bool, got {reshard_after_forward!r}"
        )
    mesh = mesh if mesh is not None else _default_mesh(model)
    # Pinned host memory (asynchronous host<->device copies) needs an accelerator; on a CPU mesh the policy
    # still runs (the optimizer steps on host tensors either way), which keeps one script testable on CPU ranks.
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if cpu_offload else OffloadPolicy()
    options = {"mesh": mesh, "mp_policy": _mixed_precision(mixed_precision), "offload_policy": offload}
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    # The root's parameters are needed again right at the start of backward (the head): FSDP2 keeps the root
    # unsharded after forward whatever is passed here.
    fully_shard(model, reshard_after_forward=reshard_after_forward, **options)
    setattr(model, LOG_PROBS_METHOD, _log_probs_forward.__get__(model))
    register_fsdp_forward_method(model, LOG_PROBS_METHOD)
    # A trainer that would wrap this model in DDP (the HF Trainer on CPU ranks, or without an FSDP plugin) now
    # fails with a message naming fastft.distributed.prepare_trainer instead of DDP's mixed Tensor/DTensor error.
    return forbid_ddp(model)
