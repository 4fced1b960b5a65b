"""DeepSpeed ZeRO-3 and fastft's output heads: gather the partitioned ``lm_head`` weight for a direct read.

Under ZeRO-3 every parameter is partitioned to an empty tensor (``numel 0``) between uses and gathered only by the
pre-forward hook of the module that owns it. fastft's fused linear cross-entropy and its log-prob head read
``lm_head.weight`` directly without calling the ``lm_head`` module, so its hook never fires and the kernels would
see an empty weight. :func:`gathered_head` gathers it for the duration of the read
(``deepspeed.zero.GatheredParameters``, as TRL's ``maybe_gather_lm_head_ctx`` does); the read must happen inside
the model's forward (fastft's loss runs in the causal LM's forward), so ZeRO-3's gradient hooks stay armed.

Supported: a frozen head (LoRA training; the kernels need the weight only in the forward, where the hidden-state
gradient is computed). Refused: a trainable head under ZeRO-3 (full fine-tuning, ``modules_to_save=["lm_head"]``):
its gradient would be written into the gathered copy, which ZeRO-3 re-partitions on exit. DeepSpeed is not a
dependency: without it no parameter is a ZeRO-3 parameter and :func:`gathered_head` is a null context.
"""

from __future__ import annotations

import contextlib

import torch


def is_zero3_param(tensor: object) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter (what ``deepspeed.zero.partition_parameters.is_zero_param``
    tests: ZeRO-3 gives each partitioned parameter a ``ds_id``)."""
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "ds_id")


def gathered_head(weight: torch.Tensor, bias: torch.Tensor | None = None) -> contextlib.AbstractContextManager:
    """A context in which the head's ``weight`` (and ``bias``) hold their full values; a null context without ZeRO-3.

    Raises NotImplementedError for a trainable ZeRO-3 head (see the module docstring), naming the ways out.
    """
    params = [p for p in (weight, bias) if p is not None and is_zero3_param(p)]
    if not params:
        return contextlib.nullcontext()
    if any(p.requires_grad for p in params):
        raise NotImplementedError(
            "fastft: the output head (lm_head) is trainable and partitioned by DeepSpeed ZeRO-3; fastft's fused loss "
            "and log-prob head read its weight directly and cannot hand its gradient back to ZeRO-3. Freeze the head "
            "(LoRA without modules_to_save=['lm_head']), load with fastft.patch(model, fused_loss=False) to use "
            "transformers' own head, or shard with FSDP2 (fastft.distributed.shard) instead of ZeRO-3."
        )
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # By identity: a tied head shares the embedding's parameter, and it may be gathered already (AVAILABLE), in
    # which case gathering again and re-partitioning on exit would collide with the embedding's own use.
    todo = {id(p): p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE}
    if not todo:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(todo.values()))
