"""Context parallelism: one long sequence split across ranks, attention over all-gathered keys and values.

Each rank of the context-parallel (CP) group holds a contiguous shard of every sequence: with ``C`` ranks and a
sequence of ``T = C * S`` tokens, rank ``r`` holds positions ``r*S .. r*S + S - 1``. Everything in a decoder layer
except attention is per token, so it runs on the shard as it is: fastft's fused LoRA projections, RoPE (from the
global ``position_ids``), norms, the (tiled) MLP and the fused loss all run unchanged on ``S`` tokens. Attention
needs the keys and values of every earlier position: each layer all-gathers K and V along the sequence across the
group (the all-gather style of context parallelism Llama 3's long-context pre-training used; K and V are small
next to Q under GQA) and rank ``r`` attends its ``S`` queries to the first ``(r + 1) * S`` gathered positions with
a causal mask aligned to the lower right (query ``i`` of the shard is global position ``r*S + i`` and sees keys
``0 .. r*S + i``). In backward the gradients of the gathered K and V are reduce-scattered (summed) back to the
ranks that own those positions. So the forward and backward values are those of the whole sequence, up to fp32
rounding of differently ordered sums.

The attention core is registered through transformers' public ``AttentionInterface`` under the name ``"fastft_cp"``
(and a mask function under the same name, which refuses padding masks and non-causal mask patterns: right padding
is dropped by :func:`shard_batch` before the model sees it); the model keeps its own attention forward (fastft's
fused q/k/v LoRA Function and RoPE kernel when patched) and only the call that transformers dispatches through
``config._attn_implementation`` changes. SDPA runs it: on a GPU the causal
lower-right case goes to the flash / memory-efficient kernels (``torch.nn.attention.bias.causal_lower_right``),
on CPU to the math path. Sliding-window layers (Mistral, Qwen, Gemma-3) whose window is shorter than the sequence
are handled with an explicit band mask over the keys the window can reach (``S x (S + window)`` booleans per call,
where transformers' own SDPA path builds ``T x T``); attention-logit softcaps (Gemma-2) are refused.

The all-gather is PyTorch's own ``cplib::flex_cp_allgather`` (the custom op behind its flex-attention context
parallelism: funcol all-gather forward, reduce-scatter backward), or, where the installed torch lacks it, a small
autograd Function doing the same with ``dist.all_gather_into_tensor`` / ``dist.reduce_scatter_tensor``. Both run
on gloo (CPU) and NCCL.

Memory per rank: the activations of ``S = T / C`` tokens (every per-token term of ``fastft plan`` divided by
``C``), plus, inside one attention call, the gathered K and V of that layer for the whole sequence
(``2 x T x kv_heads x head_dim`` elements; under checkpointing the gathered copies are not kept for backward, the
recompute gathers again; without it every layer keeps its own until backward).

Load balancing (``load_balance=True``): with contiguous shards rank ``C - 1`` does ``C`` times the attention work
of rank 0 (its queries see every key). The head-tail layout cuts the sequence into ``2C`` chunks and gives rank
``r`` chunks ``r`` and ``2C - 1 - r``, so every rank has the same causal work; each of its two chunks attends with
its own lower-right causal mask over the gathered K/V, which are first put back in sequence order (one more copy
of them per layer). Not done: ring attention (K/V passed around between ranks instead of gathered, for when one
layer's whole K/V does not fit).

Loss and gradients: :meth:`ContextParallel.shard_batch` shifts the labels over the whole sequence before
splitting and sets ``num_items_in_batch`` to the whole batch's count of labelled tokens, so each rank's loss is its
share of the global mean and the sum of the ranks' losses is the single-process loss. The gradient of that sum is
the sum of the ranks' gradients: :meth:`ContextParallel.sync_gradients` all-reduces (sums) the trainable
gradients over the group; with :func:`fastft.distributed.shard` (FSDP2 over the same ranks) FSDP2's
reduce-scatter does it, with its gradient divide factor set by :func:`context_parallel` so that it sums over the
CP ranks instead of averaging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastft.models.patch import causal_lm, text_config

ATTENTION_NAME = "fastft_cp"
_SPEC_ATTR = "_fastft_context_parallel"
_PREVIOUS_ATTR = "_fastft_attn_before_context_parallel"
_GROUPS: dict[str, dist.ProcessGroup] = {}  # process group name -> group (modules keep only the name: deepcopy-safe)
_FORCE_FALLBACK = False  # tests: use the public-collective Function even where torch has its own op


@dataclass(frozen=True)
class _Spec:
    group_name: str
    rank: int
    size: int
    balanced: bool = False  # head-tail layout (load_balance=True)


# ------------------------------------------------------------------------------------------------ all-gather


def _torch_allgather():
    """PyTorch's own K/V all-gather custom op (forward all-gather, backward reduce-scatter), or None."""
    if _FORCE_FALLBACK:
        return None
    try:  # in torch 2.13 (its flex-attention context parallelism); not in every release pyproject's floor allows
        from torch.distributed.tensor.experimental._context_parallel import flex_cp_allgather
    except ImportError:
        return None
    return flex_cp_allgather


class _AllGatherSequence(torch.autograd.Function):
    """``cat([x_0, ..., x_{C-1}], dim=2)`` of every rank's ``x`` (``[batch, heads, S, head_dim]``); backward sums
    the gathered gradient over the ranks and hands each rank the slice of its own positions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        rows = x.permute(2, 0, 1, 3).contiguous()  # sequence first: the collectives work along dim 0
        out = rows.new_empty((size * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_into_tensor(out, rows, group=group)
        return out.permute(1, 2, 0, 3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        rows = grad.permute(2, 0, 1, 3).contiguous()
        out = rows.new_empty((rows.shape[0] // size, *rows.shape[1:]))
        dist.reduce_scatter_tensor(out, rows, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.permute(1, 2, 0, 3), None


def gather_sequence(
    key: torch.Tensor, value: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """``key`` and ``value`` (``[batch, kv_heads, S, head_dim]``) of every rank of ``group``, concatenated along the
    sequence in rank order; differentiable (backward reduce-scatters the gradients)."""
    op = _torch_allgather()
    if op is not None:
        return op(key.contiguous(), value.contiguous(), 2, dist.distributed_c10d._get_process_group_name(group))
    return _AllGatherSequence.apply(key, group), _AllGatherSequence.apply(value, group)


# ------------------------------------------------------------------------------------------------ attention


def context_parallel_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention of this rank's query shard over the keys and values of the whole sequence (the
    ``"fastft_cp"`` entry of transformers' ``AttentionInterface``; module docstring).

    ``query`` is ``[batch, heads, S, head_dim]``, ``key``/``value`` ``[batch, kv_heads, S, head_dim]`` (this rank's
    positions); returns ``([batch, S, heads, v_head_dim], None)`` as transformers' attention functions do.
    """
    spec = module.__dict__.get(_SPEC_ATTR)
    if spec is None:
        raise RuntimeError(
            f"fastft context parallelism: {type(module).__name__} runs attention '{ATTENTION_NAME}' but was not set up "
            "by fastft.distributed.context_parallel(model); call that on the model (it sets the attention "
            "implementation and the process group together), or set config._attn_implementation back to 'sdpa'."
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"fastft context parallelism: {type(module).__name__} caps its attention logits (softcap "
            f"{kwargs['softcap']}); the context-parallel attention runs SDPA, which has no softcap. Train this model "
            "without context parallelism."
        )
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise NotImplementedError(
            f"fastft context parallelism: {type(module).__name__} attends bidirectionally; only causal (decoder) "
            "attention is split across ranks."
        )
    if attention_mask is not None:
        raise ValueError(
            "fastft context parallelism: the model was given a prepared (4-D) attention mask; context-parallel "
            "attention computes its causal mask from the shard's global positions. Pass no attention_mask (use "
            "ContextParallel.shard_batch)."
        )
    length = query.shape[2]
    if key.shape[2] != length:
        raise ValueError(
            f"fastft context parallelism: {key.shape[2]} keys for {length} queries (a KV cache, as in generation?). "
            "Context parallelism is for training forwards over whole sequences: call cp.close() before generating."
        )
    if spec.balanced and length % 2:
        raise ValueError(
            f"fastft context parallelism (load_balance=True): {length} positions on this rank, not two equal chunks; "
            "prepare the inputs with ContextParallel.shard_batch, which pads to a multiple of 2 x ranks."
        )
    if getattr(module, "layer_idx", None) == 0:
        _check_layout(spec, kwargs.get("position_ids"), length)
    # Every check above runs before the first collective: a refused call raises instead of pairing its all-gather
    # with another one (the other ranks stop on their own check, or torchrun ends them when this rank fails).
    keys, values = gather_sequence(key, value, _GROUPS[spec.group_name])
    window = kwargs.get("sliding_window")
    if not spec.balanced:  # rank r holds positions r*S .. r*S + S - 1: the gathered order is the global order
        out = attend_block(query, spec.rank * length, keys, values, window, dropout, scaling)
        return out.transpose(1, 2).contiguous(), None
    # Head-tail layout: of 2C chunks of S/2 positions, rank r holds chunks r and 2C-1-r (module docstring).
    half, chunks = length // 2, 2 * spec.size
    keys, values = sequence_order(keys, spec.size), sequence_order(values, spec.size)
    outs = [
        attend_block(query[:, :, :half], spec.rank * half, keys, values, window, dropout, scaling),
        attend_block(query[:, :, half:], (chunks - 1 - spec.rank) * half, keys, values, window, dropout, scaling),
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _check_layout(spec: _Spec, positions: object, length: int) -> None:
    """Once per forward (the first layer; one host read of two positions): the shard's position_ids jump where the
    layout says, so inputs split for the other layout (shard_batch's load_balance not the model's) do not run
    silently wrong. Rank ``r`` of the head-tail layout jumps by ``(2C - 1 - 2r) * S/2`` half-way, a contiguous
    shard by ``S/2`` (the same on the last rank: the other ranks catch it)."""
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2 or length < 2 or length % 2:
        return
    half = length // 2
    step = int(positions[0, half] - positions[0, 0])
    balanced = step == (2 * spec.size - 1 - 2 * spec.rank) * half
    contiguous = step == half
    if (spec.balanced and not balanced) or (not spec.balanced and not contiguous):
        raise ValueError(
            f"fastft context parallelism: this rank's position_ids jump by {step} half-way through its {length} "
            f"positions, which is not the {'head-tail' if spec.balanced else 'contiguous'} layout the model was set "
            f"up with (context_parallel(load_balance={spec.balanced})). Split the inputs with the ContextParallel's "
            "own shard_batch, which uses the same layout."
        )


def sequence_order(x: torch.Tensor, size: int) -> torch.Tensor:
    """Gathered ``[batch, heads, T, dim]`` of head-tail shards (rank j: chunks j and 2C-1-j) in sequence order:
    the ranks' first chunks are chunks 0..C-1 in rank order, their second chunks C..2C-1 in reverse rank order."""
    parts = x.unflatten(2, (size, 2, -1))  # [batch, heads, rank, which chunk of the rank, positions, dim]
    ordered = torch.cat([parts[:, :, :, 0], parts[:, :, :, 1].flip(2)], dim=2)
    return ordered.flatten(2, 3)


def attend_block(
    query: torch.Tensor,
    first: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    window: int | None,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of the queries at global positions ``first ..`` over the
    gathered ``keys``/``values`` in sequence order; ``[batch, heads, queries, v_head_dim]``."""
    length = query.shape[2]
    end = first + length  # keys 0 .. end - 1 are visible to some query of the block
    start, mask, causal = 0, None, False
    if window is not None and first + length - 1 >= window:
        # The window binds (some query is further than `window` from key 0): an explicit band mask over the keys
        # the block's queries can reach, [first - window + 1, end). Key j is seen by query i when i - window < j <= i
        # (transformers' sliding_window_overlay and causal mask).
        start = max(0, first - window + 1)
        q_pos = torch.arange(first, end, device=query.device)[:, None]
        k_pos = torch.arange(start, end, device=query.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
    elif first == 0:
        causal = True  # square: SDPA's own (upper-left = lower-right) causal mask
    else:
        from torch.nn.attention.bias import causal_lower_right

        # Query i of the block sees keys 0 .. first + i: the causal mask aligned to the lower-right corner, which
        # SDPA runs in its flash / memory-efficient kernels on GPUs without building the mask.
        mask = causal_lower_right(length, end)
    keys, values = keys[:, :, start:end], values[:, :, start:end]
    # GQA: each group of query heads sharing one K/V head attends in its own SDPA call, so the gathered K/V are
    # never repeated to every query head (the kernels that take a causal mask do not all take enable_gqa).
    heads, kv_heads = query.shape[1], keys.shape[1]
    grouped = query.unflatten(1, (kv_heads, heads // kv_heads))
    outputs = [
        F.scaled_dot_product_attention(
            grouped[:, :, g], keys, values, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling
        )
        for g in range(grouped.shape[2])
    ]
    return outputs[0] if len(outputs) == 1 else torch.stack(outputs, dim=2).flatten(1, 2)


def context_parallel_mask(
    *, attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True, **kwargs
) -> None:
    """The mask function of ``"fastft_cp"`` in transformers' ``AttentionMaskInterface``: no mask (the attention
    builds its own from global positions: None), after refusing what it cannot honour."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "fastft context parallelism: the model was given an attention_mask with zeros (padding); context-parallel "
            "attention splits one sequence per row and builds its own causal mask. Prepare the inputs with "
            "ContextParallel.shard_batch (it accepts right padding whose labels are -100, and drops the mask)."
        )
    if not allow_is_causal_skip:
        raise NotImplementedError(
            "fastft context parallelism: the model asked for a mask other than plain causal (packed sequences in one "
            "row with restarting position_ids, bidirectional image tokens, or a static-cache decode): only plain "
            "causal (and sliding-window) attention is split across ranks."
        )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, context_parallel_mask)


# ------------------------------------------------------------------------------------------------ batches


def shard_batch(
    batch: Mapping[str, torch.Tensor],
    group: dist.ProcessGroup | None = None,
    pad_token_id: int = 0,
    ignore_index: int = -100,
    load_balance: bool = False,
) -> dict[str, torch.Tensor | bool]:
    """This rank's part of ``batch`` (the whole batch, the same on every rank of ``group``): model inputs.

    ``batch`` holds ``input_ids`` (``[rows, T]``) and optionally ``labels`` (unshifted, as for the model),
    ``position_ids`` and an all-ones ``attention_mask``. The labels are shifted over the whole row first, then
    ``input_ids``, the shifted labels and the global ``position_ids`` are split into ``C`` contiguous shards
    (rank ``r`` gets positions ``r*S .. r*S + S - 1``). A length not divisible by ``C`` is padded at the end with
    ``pad_token_id`` and ignored labels (exact: later tokens change nothing before them under a causal mask).
    Returns ``input_ids``, ``position_ids``, ``use_cache=False`` and, with labels, ``labels`` and ``shift_labels``
    (both the shard's shifted labels: transformers' loss and fastft's fused loss read ``shift_labels`` and
    need ``labels`` set) and ``num_items_in_batch`` (labelled tokens of the whole batch, so that each rank's
    loss is its share of the global mean). An ``attention_mask`` may pad the end of rows (right padding) when the
    padding has no label (-100): it is then dropped, exactly; left padding and packed rows (position_ids that
    restart) are refused.

    ``load_balance=True`` (it must match :func:`context_parallel`'s; :meth:`ContextParallel.shard_batch` passes it):
    the head-tail layout, rank ``r`` holding chunks ``r`` and ``2C - 1 - r`` of ``2C`` (padded to a multiple of
    ``2C``), and an all-ones ``attention_mask`` (which keeps transformers from reading the jump in the shard's
    ``position_ids`` as packed sequences).
    """
    group = _group(group, "shard_batch")
    unknown = set(batch) - {"input_ids", "labels", "attention_mask", "position_ids"}
    if unknown:
        raise TypeError(
            f"fastft context parallelism: shard_batch does not know how to split {sorted(unknown)}; it splits "
            "input_ids, labels and position_ids (and checks attention_mask). Pass other model inputs yourself."
        )
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(
            "fastft context parallelism: shard_batch needs input_ids of shape [rows, tokens], got "
            f"{getattr(input_ids, 'shape', input_ids)!r}."
        )
    rows, tokens = input_ids.shape
    labels = batch.get("labels")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        _check_right_padding(mask.bool(), labels, ignore_index)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(tokens, device=input_ids.device).expand(rows, tokens)
    else:
        positions = positions.expand(rows, tokens)
        if tokens > 1 and not bool((positions.diff(dim=-1) == 1).all()):
            raise ValueError(
                "fastft context parallelism: position_ids do not increase by one along each row (several packed "
                "sequences in one row?). Context parallelism splits one sequence per row; give each sequence its "
                "own row, or drop position_ids."
            )
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = 2 * size if load_balance else size
    padded = -(-tokens // chunks) * chunks
    extra = padded - tokens
    shift = None
    if labels is not None:
        shift = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift = F.pad(shift, (0, extra), value=ignore_index)
    if extra:
        input_ids = F.pad(input_ids, (0, extra), value=pad_token_id)
        tail = positions[:, -1:] + torch.arange(1, extra + 1, device=positions.device)
        positions = torch.cat([positions, tail], dim=-1)
    width = padded // chunks
    parts = [rank, chunks - 1 - rank] if load_balance else [rank]

    def local(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, p * width : (p + 1) * width] for p in parts], dim=1)

    out: dict[str, torch.Tensor | bool] = {
        "input_ids": local(input_ids),
        "position_ids": local(positions),
        "use_cache": False,
    }
    if load_balance:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    if shift is not None:
        mine = local(shift)
        out.update(labels=mine, shift_labels=mine, num_items_in_batch=(shift != ignore_index).sum())
    return out


def _check_right_padding(mask: torch.Tensor, labels: torch.Tensor | None, ignore_index: int) -> None:
    """Accept a padding mask that only pads the end of rows, with no label on the padding: under a causal mask no
    real token sees a later one, and no loss term is read from a padding position, so dropping the mask changes
    nothing. Refuse anything else."""
    if not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        raise ValueError(
            "fastft context parallelism: the attention_mask has zeros before ones (left padding, or holes). Padding "
            "is only accepted at the end of rows (padding_side='right', as SFT collators use for training), where a "
            "causal model's real tokens never see it; pad on the right, or pass rows without padding."
        )
    if labels is not None and not bool((labels[~mask] == ignore_index).all()):
        raise ValueError(
            f"fastft context parallelism: some padding positions (attention_mask 0) have labels other than "
            f"{ignore_index}. The padding's attention differs once the mask is dropped, so it must not be learned: "
            f"set labels to {ignore_index} wherever attention_mask is 0 (DataCollatorForLanguageModeling and TRL's "
            "collators do)."
        )


# ------------------------------------------------------------------------------------------------ the switch


def _group(group: dist.ProcessGroup | None, caller: str) -> dist.ProcessGroup:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"fastft context parallelism ({caller}): no torch.distributed process group is initialised. Launch with "
            "`torchrun --nproc_per_node N train.py` and call torch.distributed.init_process_group() (backend 'nccl' "
            "on GPUs, 'gloo' on CPU) first; every rank of the group must receive the same batches."
        )
    return group if group is not None else dist.group.WORLD


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@dataclass
class ContextParallel:
    """What :func:`context_parallel` set up: the group, this rank's place in it, and the step's helpers."""

    model: nn.Module = field(repr=False)
    group: dist.ProcessGroup = field(repr=False)
    rank: int
    size: int
    sharded: bool
    attention_modules: int
    load_balance: bool = False
    _previous: str | None = None

    def shard_batch(self, batch: Mapping[str, torch.Tensor], pad_token_id: int = 0, ignore_index: int = -100) -> dict:
        """:func:`shard_batch` over this group, in this set-up's layout."""
        return shard_batch(batch, self.group, pad_token_id, ignore_index, load_balance=self.load_balance)

    def sync_gradients(self) -> None:
        """Sum the trainable gradients over the group (call after ``backward``, before the optimizer step).

        The sum of the ranks' losses is the whole batch's loss, so its gradient is the sum of the ranks'
        gradients. A model sharded with FSDP2 before :func:`context_parallel` needs nothing: its reduce-scatter
        already summed them (this returns at once)."""
        if self.sharded:
            return
        if _fsdp_modules(self.model):
            raise RuntimeError(
                "fastft context parallelism: the model was sharded (fastft.distributed.shard / fully_shard) after "
                "context_parallel(); FSDP2 then averages the gradients over the ranks instead of summing them over "
                "the context-parallel group. Call shard(model) first, then context_parallel(model)."
            )
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self.group, async_op=True) for g in grads]
        for work in works:
            work.wait()

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The whole batch's loss (the sum of the ranks' losses), detached, the same on every rank: for logging."""
        total = loss.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def close(self) -> None:
        """Back to the attention implementation the model had (e.g. to generate); gradient reduction settings of
        a sharded model stay."""
        root = causal_lm(self.model)
        root.config._attn_implementation = root.__dict__.pop(_PREVIOUS_ATTR, self._previous)
        for module in root.modules():
            module.__dict__.pop(_SPEC_ATTR, None)


def context_parallel(
    model: nn.Module, group: dist.ProcessGroup | None = None, load_balance: bool = False
) -> ContextParallel:
    """Split every sequence of ``model``'s training steps across the ranks of ``group`` (default: all ranks).

    ``model``: a causal LM (plain transformers, fastft-patched, PEFT-wrapped, or sharded with
    :func:`fastft.distributed.shard` over the same ranks; call this last, after patching, adapters and
    sharding). Its attention implementation becomes ``"fastft_cp"`` (module docstring); the rest of the model is
    unchanged. Returns a :class:`ContextParallel`; a step is::

        inputs = cp.shard_batch(batch)         # the same whole batch on every rank
        loss = model(**inputs).loss            # this rank's share of the whole batch's mean loss
        loss.backward()
        cp.sync_gradients()                    # sum over the ranks (no-op when FSDP2-sharded)
        optimizer.step(); optimizer.zero_grad()

    ``load_balance=True``: the head-tail layout (module docstring), which gives every rank the same causal
    attention work, for one more copy of each layer's gathered K/V (put in sequence order).

    Refuses: no process group, composite (multimodal) models, attention-logit softcaps (Gemma-2).
    """
    group = _group(group, "context_parallel")
    root = causal_lm(model)
    config = getattr(root, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(
            f"fastft context parallelism: {type(root).__name__} is not a transformers model (no config); "
            "context_parallel(model) switches a transformers causal LM's attention implementation."
        )
    if text_config(config) is not config:
        raise NotImplementedError(
            f"fastft context parallelism: {type(root).__name__} is a composite (multimodal) model; only text causal "
            "LMs are split across ranks (image tokens would land on one rank's shard)."
        )
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise NotImplementedError(
            f"fastft context parallelism: {config.model_type} caps its attention logits (attn_logit_softcapping="
            f"{softcap}); the context-parallel attention runs SDPA, which has no softcap. Train this model without "
            "context parallelism."
        )
    _register()
    name = dist.distributed_c10d._get_process_group_name(group)
    _GROUPS[name] = group
    spec = _Spec(name, dist.get_rank(group), dist.get_world_size(group), bool(load_balance))
    attention = 0
    from transformers import PreTrainedModel

    for module in root.modules():
        # The modules transformers hands to the attention function: they hold the config (and is_causal).
        if hasattr(module, "config") and not isinstance(module, PreTrainedModel):
            module.__dict__[_SPEC_ATTR] = spec
            attention += hasattr(module, "is_causal")
    if not attention:
        raise ValueError(
            f"fastft context parallelism: found no attention module in {type(root).__name__} (modules holding the "
            "config with an is_causal flag, as transformers' attention classes do)."
        )
    fsdp = _fsdp_modules(model)
    if fsdp:
        # FSDP2 reduce-scatters gradients over all its ranks, dividing by their number; the CP ranks' gradients
        # must be summed, so divide by the data-parallel degree only (1 when CP spans every rank).
        factor = dist.get_world_size() / spec.size
        for module in fsdp:
            # set_reduce_scatter_divide_factor: the same setter's older name (torch releases before the rename).
            set_factor = getattr(module, "set_gradient_divide_factor", None) or module.set_reduce_scatter_divide_factor
            set_factor(factor)
            # A plain SUM reduce-scatter, then a division only when factor != 1 (otherwise FSDP2 asks for NCCL's
            # PREMUL_SUM, which gloo lacks). Older torch without the switch uses PREMUL_SUM (NCCL only).
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    # The implementation to go back to (cp.close()), kept across a second context_parallel() call on the model.
    previous = root.__dict__.setdefault(_PREVIOUS_ATTR, config._attn_implementation)
    config._attn_implementation = ATTENTION_NAME
    return ContextParallel(model, group, spec.rank, spec.size, bool(fsdp), attention, spec.balanced, previous)
