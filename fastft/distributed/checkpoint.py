"""Checkpoints of a distributed fastft run: sharded (``torch.distributed.checkpoint``) and exported (one process).

:func:`save_sharded` / :func:`load_sharded` write and read a DCP checkpoint folder: every rank writes its own
shards of the model (and optimizer) state in parallel, and DCP reshards on load, so a run saved on N ranks
resumes on M ranks, or in one process into an unsharded model of the same architecture. Keys are the
model's own names (``get_model_state_dict``: no FSDP/DDP prefixes), so the same folder serves FSDP2, DDP
and single-process models.

:func:`export` turns a (sharded or replicated) run into what a single process loads with no distributed
code: a PEFT adapter folder (``PeftModel.from_pretrained``) or a merged safetensors checkpoint
(``AutoModelForCausalLM.from_pretrained``). FSDP2 parameters are gathered to full tensors on rank 0's host
memory (one collective all ranks join; the other ranks hold nothing), put in place of the sharded ones on
rank 0 for the time of the save, and written by the same code a single-process run uses
(:meth:`fastft.FastModel.save_pretrained_merged`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

_EXPORT_METHODS = ("lora", "merged_16bit")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (whose ``state_dict`` keys carry a ``module.`` prefix the export must not have)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write ``model`` (and ``optimizer``) to the DCP folder ``path``, each rank its own shards; all ranks call it.

    ``model`` is FSDP2-sharded (:func:`fastft.distributed.shard`), DDP-wrapped or plain; the whole state is
    saved (a LoRA run's frozen base included, so the folder restores the run without the original weights).
    """
    dcp.save(_state(model, optimizer), checkpoint_id=os.fspath(path))


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a :func:`save_sharded` folder into ``model`` (and ``optimizer``) in place; all ranks call it.

    The model must have the same architecture (and adapters) as the saved one, but not the same sharding: DCP
    reads each rank's part of every tensor, so a 2-rank checkpoint loads on 4 ranks or, without a process group,
    into an unsharded model in one process. Create the optimizer over the model's (sharded) parameters first.
    """
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


@contextlib.contextmanager
def _full_parameters(model: nn.Module) -> Iterator[bool]:
    """Inside: on rank 0, ``model``'s FSDP2 parameters replaced by full host tensors; yields whether this rank
    writes. A collective: every rank must enter. The sharded parameters are put back on exit."""
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        yield not _distributed() or dist.get_rank() == 0
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Registered parameters become the sharded DTensors (they are the unsharded tensors between a
            # forward and its backward): state_dict's FSDP2 pre-hooks then change nothing under the swap below.
            module.reshard()
    # Full tensors on rank 0's host only (cpu_offload: the other ranks get an empty dict).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        yield False
        return
    replaced: dict[int, torch.Tensor] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for prefix, module in model.named_modules(remove_duplicate=False):
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                key = f"{prefix}.{name}" if prefix else name
                if id(param) not in replaced:
                    if key not in full:
                        continue
                    replaced[id(param)] = nn.Parameter(full[key], requires_grad=param.requires_grad)
                swapped.append((module, name, param))
                module._parameters[name] = replaced[id(param)]  # tied weights: one full tensor for both
        yield True
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def export(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: object | None = None,
    save_method: str = "lora",
) -> None:
    """Write a distributed run as a single-process checkpoint under ``path``; every rank calls it, rank 0 writes.

    ``save_method="lora"``: the adapter folder of PEFT's ``save_pretrained`` (``adapter_config.json`` and
    ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained(base, path)``.
    ``"merged_16bit"``: ``W + scaling * B @ A`` merged into every LoRA layer, in the model's dtype, as a
    plain transformers safetensors checkpoint (``AutoModelForCausalLM.from_pretrained(path)``). ``model`` is
    FSDP2-sharded (its parameters are gathered to rank 0's host memory for the save), DDP-wrapped or plain;
    ``tokenizer`` is saved alongside unless None. The model is unchanged and may keep training.
    """
    from fastft.models.fast_model import FastModel

    if save_method not in _EXPORT_METHODS:
        raise ValueError(
            f"fastft.distributed.export: save_method={save_method!r} is not one of {_EXPORT_METHODS}; for a 4-bit "
            "merged checkpoint, export merged_16bit and load it with load_in_4bit=True."
        )
    model = _unwrap(model)
    with _full_parameters(model) as writer:
        if writer:
            FastModel.save_pretrained_merged(model, tokenizer, path, save_method=save_method)
    if _distributed():
        dist.barrier()  # the files exist for every rank when export returns
