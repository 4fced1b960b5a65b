"""HF / TRL trainers on a model sharded with FSDP2 (:func:`fastft.distributed.shard`): ``prepare_trainer``.

The trap. A model sharded before the trainer sees it (the way fastft shards: LoRA first, then ``fully_shard`` per
decoder layer and at the root) must not be wrapped again. The HF Trainer hands it to
``accelerate.Accelerator.prepare(model, optimizer)``, and accelerate picks the wrapper from its distributed type:

- On CPU ranks (gloo) the type is ``MULTI_CPU`` whatever the configuration: accelerate upgrades a run to
  ``DistributedType.FSDP`` only from the GPU-like types (``accelerate/state.py``, ``AcceleratorState.__init__``:
  the ``ACCELERATE_USE_FSDP`` / ``fsdp_plugin`` branch sits under ``elif self.distributed_type in [MULTI_GPU,
  ...]``), so ``TrainingArguments(fsdp="full_shard", fsdp_config={"fsdp_version": 2})`` or an FSDP accelerate
  config silently trains with DDP. ``Accelerator.prepare_model`` then runs
  ``torch.nn.parallel.DistributedDataParallel(model)`` (the ``MULTI_CPU`` branch), whose ``_sync_module_states``
  broadcast fails on the DTensor parameters: ``aten.cat.default got mixed torch.Tensor and DTensor``.
- On GPUs without an FSDP plugin the type is ``MULTI_GPU``: ``prepare_model`` refuses DTensor parameters with a
  message about ``device_map='auto'``. With accelerate's FSDP2 plugin (``fsdp_version: 2``), ``fsdp2_prepare_model``
  returns a model whose root is already an ``FSDPModule`` as it is (``accelerate/utils/fsdp_utils.py``): that path
  takes a pre-sharded model.

The supported way: ``prepare_trainer(trainer)`` after building the trainer and before ``trainer.train()``. Where
accelerate would wrap the model in DDP, it has ``Accelerator.prepare_model`` prepare this model with its documented
``evaluation_mode=True`` and ``device_placement=False``: mixed-precision autocast and ``torch.compile`` as
configured, no DDP, no move (the call transformers itself makes for models it shards at load time). No
TrainingArguments or accelerate setting does this on CPU. Everything else stays the trainer's: the optimizer is
built over the sharded DTensor parameters (each rank steps its own shard), FSDP2 reduce-scatters and averages the
gradients in backward (so DDP's all-reduce is not needed; the trainer's loss scaling by the number of processes
assumes exactly that average), and ``accelerator.clip_grad_norm_`` clips with the norm of the DTensor gradients,
which is reduced across shards. ``trainer.save_model`` goes through :func:`fastft.distributed.checkpoint.export`
(every rank takes part in the gather, rank 0 writes a PEFT adapter folder, or the full model without PEFT). ``generate`` is registered as an FSDP2
forward method, so GRPO's generation runs on gathered parameters.

Without ``prepare_trainer``, :func:`forbid_ddp` (which :func:`shard` should call) makes any
``DistributedDataParallel(model)`` raise a clear error naming the way out, instead of DDP's own message.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("fastft")

_DDP_MESSAGE = (
    "fastft: this model is sharded with FSDP2 (fastft.distributed.shard / fully_shard); wrapping it in "
    "DistributedDataParallel as well fails (DDP broadcasts and all-reduces whole tensors, FSDP2 already "
    "reduce-scatters the gradients of its DTensor shards). A HF/TRL trainer does this wrap on CPU ranks even with "
    "fsdp=... or an FSDP accelerate config (accelerate selects FSDP only on GPUs). Call "
    "fastft.distributed.prepare_trainer(trainer) after building the trainer and before trainer.train(); or, for "
    "plain DDP, do not shard the model."
)


class _RefuseDDP:
    """Stands in for a module's ``_ddp_params_and_buffers_to_ignore``: DDP reads it first, and this raises."""

    def __iter__(self):
        raise TypeError(_DDP_MESSAGE)

    def __repr__(self) -> str:
        return "<fastft: DistributedDataParallel refused on an FSDP2-sharded model>"


def forbid_ddp(model: nn.Module) -> nn.Module:
    """Make ``DistributedDataParallel(model)`` raise a TypeError that names :func:`prepare_trainer`; returns model.

    ``DistributedDataParallel.__init__`` reads ``module._ddp_params_and_buffers_to_ignore`` (the names
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` sets) before anything else touches the
    parameters; an FSDP2-sharded model gets an object there whose iteration raises. Nothing but DDP reads it.
    """
    model._ddp_params_and_buffers_to_ignore = _RefuseDDP()
    return model


def _is_sharded_root(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _check_model(model: Any) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_trainer: trainer.model is {type(model).__name__}, not a torch.nn.Module")
    if not _is_sharded_root(model):
        inner = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
        if inner:
            raise ValueError(
                f"prepare_trainer: {inner[0]} is FSDP2-sharded but the model the trainer holds "
                f"({type(model).__name__}) is not: shard the whole model, root last (fastft.distributed.shard(model) "
                "on the PEFT model), so its embeddings and head are managed too."
            )
        raise ValueError(
            f"prepare_trainer: the trainer's model ({type(model).__name__}) is not sharded with FSDP2. For DDP "
            "pass the unsharded model to the trainer and launch with torchrun (the trainer wraps it in DDP); for "
            "FSDP2 call fastft.distributed.shard(trainer.model) first, then prepare_trainer(trainer)."
        )
    plain = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if plain:
        raise ValueError(
            f"prepare_trainer: {len(plain)} trainable parameters are not managed by FSDP2 (e.g. {plain[0]}): their "
            "gradients would never be averaged across ranks. They were added after sharding; add LoRA adapters "
            "(FastModel.get_peft_model) before fastft.distributed.shard(model)."
        )


def _check_accelerator(trainer: Any) -> bool:
    """Whether accelerate's own FSDP2 path prepares the model (True), or fastft must keep DDP away (False)."""
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ValueError(
            "prepare_trainer: the trainer runs DeepSpeed and the model is sharded with FSDP2; use one engine. Either "
            "drop the DeepSpeed config (torchrun + fastft.distributed.shard + prepare_trainer), or pass the "
            "unsharded model and let DeepSpeed ZeRO-3 partition it (accelerate launch --config_file zero3.yaml)."
        )
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "prepare_trainer: accelerate is configured for FSDP1 (fsdp_version 1), which cannot take a model "
                "already sharded with FSDP2; set fsdp_version: 2 in the accelerate config (or fsdp_config="
                '{"fsdp_version": 2}) or drop the FSDP config.'
            )
        if getattr(plugin, "activation_checkpointing", False):
            raise ValueError(
                "prepare_trainer: the FSDP plugin's activation_checkpointing would checkpoint the layers a second "
                "time; fastft checkpoints (and offloads) each layer itself: set fsdp_activation_checkpointing: false."
            )
        return True
    if trainer.args.fsdp:
        logger.warning(
            "fastft: TrainingArguments.fsdp=%r is ignored by accelerate on %s (it selects FSDP on GPUs only) and "
            "would have meant DDP; prepare_trainer keeps the model's own FSDP2 sharding instead.",
            trainer.args.fsdp,
            kind,
        )
    return False


def _prepare_without_ddp(original, sharded: nn.Module):
    """``Accelerator.prepare_model`` that prepares ``sharded`` for autocast/compile only, others as before."""

    @functools.wraps(original)
    def prepare_model(model, device_placement=None, evaluation_mode=False):
        if model is sharded:
            return original(model, device_placement=False, evaluation_mode=True)
        return original(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    prepare_model._fastft_fsdp2 = True
    return prepare_model


def _save_model(trainer: Any, output_dir: str | None = None, _internal_call: bool = False) -> None:
    """``trainer.save_model`` for an FSDP2 model: every rank gathers, rank 0 writes a single-process checkpoint."""
    import peft

    from fastft.distributed.checkpoint import export

    output_dir = output_dir if output_dir is not None else trainer.args.output_dir
    model = trainer.model
    # A PEFT model: its adapter folder; otherwise the full model as a transformers checkpoint.
    method = "lora" if isinstance(model, peft.PeftModel) else "merged_16bit"
    export(model, output_dir, trainer.processing_class, save_method=method)  # a collective; ends with a barrier
    if trainer.args.should_save:
        torch.save(trainer.args, f"{output_dir}/training_args.bin")
        value_head = getattr(trainer, "value_head", None)  # fastft.rl.PPOTrainer's: replicated, saved as it is
        if value_head is not None:
            value_head.save_pretrained(output_dir)


def prepare_trainer(trainer: Any) -> Any:
    """Make a HF ``Trainer`` (or a TRL trainer) train its FSDP2-sharded model as it is; returns the trainer.

    Call after building the trainer with a model from :func:`fastft.distributed.shard` and before
    ``trainer.train()``. Where accelerate would wrap the model in ``DistributedDataParallel`` (always on CPU ranks,
    and on GPUs without accelerate's FSDP2 plugin) the model is prepared without a wrap instead; with the FSDP2
    plugin (``fsdp_version: 2``) accelerate takes the sharded model itself. The optimizer is built over the DTensor
    shards, FSDP2 averages the gradients, clipping uses the cross-shard norm, ``generate`` runs on gathered
    parameters and ``trainer.save_model`` writes a normal checkpoint (PEFT adapter or full model) from rank 0.
    Raises ValueError if the model is not sharded at its root, has trainable parameters FSDP2 does not manage,
    the trainer runs DeepSpeed or FSDP1, or would save optimizer state per rank (``save_strategy`` other than
    "no" without ``save_only_model=True``: use fastft's DCP checkpoints for resumable runs).
    """
    model = trainer.model
    _check_model(model)
    accelerate_fsdp2 = _check_accelerator(trainer)
    args = trainer.args
    save_strategy = getattr(args.save_strategy, "value", args.save_strategy)
    if not accelerate_fsdp2 and save_strategy != "no" and not args.save_only_model:
        raise ValueError(
            f"prepare_trainer: save_strategy={args.save_strategy!r} would save the optimizer state of rank 0's "
            "shard only. Pass save_only_model=True (the model is gathered and saved at each checkpoint) or "
            "save_strategy='no', and save resumable sharded checkpoints with fastft.distributed's DCP functions."
        )
    accelerator = trainer.accelerator
    if not accelerate_fsdp2 and not getattr(accelerator.prepare_model, "_fastft_fsdp2", False):
        accelerator.prepare_model = _prepare_without_ddp(accelerator.prepare_model, model)
    if hasattr(model, "generate"):
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    trainer.save_model = functools.partial(_save_model, trainer)
    # A forward before training (evaluate, reshard_after_forward=False) may have left parameters gathered;
    # the optimizer must see the shards.
    for module in model.modules():
        if _is_sharded_root(module):
            module.reshard()
    return trainer
