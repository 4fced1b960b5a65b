"""``plan(...)``: the bytes one rank needs to fine-tune a model, with plain transformers + PEFT and with fastft.

Nothing is allocated: the numbers come from the model's dimensions, counted the way PyTorch holds them.

**Parameters, gradients, optimizer state.** Element counts per tensor (embeddings, the head, per decoder layer
q/k/v/o, gate/up/down and two norms, the final norm; LoRA ``A (r, in)`` and ``B (out, r)`` per targeted
projection). LoRA adapters are fp32 (PEFT's ``autocast_adapter_dtype``) over a ``dtype`` base; QLoRA stores the
seven projections of every layer in NF4 (0.5 byte per weight plus double-quantised block scales, bitsandbytes'
defaults) and the rest in ``dtype``. Full fine-tuning trains everything, in fp32 with ``master_weights`` (the
usual mixed-precision recipe: 16 bytes per parameter with AdamW) or in ``dtype``. Gradients have their
parameter's dtype; AdamW keeps two states of the parameter's dtype plus one fp32 ``step`` scalar per tensor
(``adamw8bit``: 2 bytes per parameter; ``sgd``: none). Sharding:

- ``fsdp2`` (``fastft.distributed.shard``: ``fully_shard`` per decoder layer, then the root): every parameter is
  a DTensor cut along dim 0 into ``world_size`` chunks; every rank allocates ``ceil(dim0 / world_size)`` rows
  (the padding of uneven shards: LoRA's ``A`` has only ``r`` rows, so 64 ranks hold one row each of a 16-row
  ``A``). Gradients and AdamW states follow the same shards. Replicated: AdamW's ``step`` scalars and buffers
  (rotary frequencies). Transient per rank: the root unit's gathered parameters (embeddings, final norm, head)
  for the whole step, two decoder layers gathered at a time (the running one and the prefetched next), and
  before each reduce-scatter one layer's unsharded gradients (the root's, embeddings and head, until the end
  of backward). fastft's ``shard`` refuses bitsandbytes 4-bit weights: QLoRA shards with ``ddp``.
- ``ddp``: everything replicated; DDP's gradient buckets are a second copy of the trainable gradients
  (``gradient_as_bucket_view=False``, its default).
- ``none``: one process.

**Activations** (what autograd keeps from forward to backward, per rank: ``micro_batch x seq_len`` tokens =
``N``), decoder layer by decoder layer, counted from what each side saves (checked byte for byte against
``fastft.bench.step.ActivationMeter`` in ``tests/distributed/test_plan.py``). With ``b`` the dtype's bytes,
``Q``/``KV`` the query/key-value widths, ``I`` the MLP width, ``r`` the LoRA rank, per layer:

- both: attention keeps q (after RoPE), k (after RoPE), v, its output (``b N (2Q + 2KV)``) and an fp32
  log-sum-exp per head and token; one cos/sin pair per model.
- transformers + PEFT: each RMSNorm keeps its fp32 upcast input and fp32 inverse rms (``4 N H + 4 N``); each
  LoRA ``A`` keeps its own fp32 cast of its input (q, k and v three copies of the same ``N x H``; down's
  ``N x I``) and ``B`` its fp32 ``N x r`` input; the MLP keeps gate, act(gate) and up (``3 b N I``). The loss
  keeps fp32 log-probabilities, ``4 N V``.
- fastft: each RMSNorm keeps its input (``b N H``) and fp32 inverse rms; the fused LoRA Functions keep each
  group's input once (``b N H`` for q/k/v, ``b N H`` for the MLP; o_proj's input is the attention output
  already kept), ``s xa`` (``4 N r``) per adapter, and the MLP's gate and up (``2 b N I``; never act(gate), h, or
  fp32 copies). The fused loss keeps the finished ``dL/dh`` of the rows with a label (``b N H``) and their index (none
  for one sequence, whose live rows are one slice), never logits.

The first layer's input norm keeps nothing when the embeddings are frozen (no gradient flows into its input).
``checkpointing="standard"`` keeps one ``b N H`` input per layer and recomputes one layer at a time in backward
(``recompute``: one layer's activations, transient); ``"offload"`` (fastft only) moves those inputs to host memory
(``offloaded``, not in the device total); transformers has no offload, so its side runs ``"standard"``.

**Loss peak** (transient, at the end of forward / start of backward): transformers + PEFT upcasts the
``N x V`` logits and holds two more fp32 ``N x V`` gradients while the loss backpropagates (``8 N V`` beyond
what is saved, measured on CPU); fastft holds one ``(C, V)`` logits chunk of the fused loss (its chunk rule),
plus, with a trainable head, the fp32 ``V x H`` gradient accumulator. QLoRA adds one dequantised projection
(the largest) at a time on both sides.

``total`` = parameters + gradients + optimizer + activations + max(loss peak, recompute) + FSDP2 gathered
buffers + QLoRA dequantisation: the device memory a step needs at its peak, short of the allocator's
fragmentation, the CUDA context and kernel workspaces (a few hundred MB to a few GB on a real GPU).

**Longest context** (:func:`max_context`, ``--max-context``): the most tokens one step fits in on one GPU of
``gpu_bytes`` with ``host_bytes`` of host memory. transformers + PEFT runs its own checkpointing; its peak is the
loss (``12 N V`` with the log-probabilities it saves) next to the kept layer inputs. fastft runs the long-context
layout (:mod:`fastft.models.long_context`: offloaded checkpointing keeping every k-th layer input, tiled MLP with
its norm fused); its peak is one decoder layer's backward after its recompute, per token: the layer input's device
copy, the normalised q/k/v input, q, k, v after RoPE, the attention output, its fp32 log-sum-exp, the residual sum
after attention (the MLP's norm is fused into the tiles, so its output is not kept), the (N, r) fp32 LoRA products
of q/k/v/o, the incoming gradient and the MLP's dx, and cos/sin; plus constants: one MLP tile's transients
(``_TILE_ROWS`` rows, ``_TILE_BYTES_PER_ELEMENT`` bytes per row and intermediate element, measured by the meter in
tests/distributed/test_plan.py), the fused loss's chunk and the dequantised weight. Host: ``ceil(L / k) + k - 1``
layer inputs, k from :func:`fastft.models.long_context.keep_every_for`. These per-token terms are checked against
:class:`fastft.utils.memory.PeakMemoryMeter` at small scale (tests/distributed/test_plan.py).

With context parallelism over ``C`` GPUs (``--cp C``, :mod:`fastft.distributed.context_parallel`) each GPU holds
``N / C`` tokens: every per-token term above, and the host's layer inputs, are divided by ``C``; added per token of
the whole sequence: the attention layer's gathered K and V, and in its backward their gradients, both at the
gathered length (the slice the last rank attends to, and the zero-filled full-length gradient that is
reduce-scattered): ``6 x KV x b`` (``load_balance=True`` adds one more copy of them, not planned). Model arithmetic
for the GPU kernels (flash / memory-efficient attention take the lower-right causal mask without building it); on
CPU SDPA's math path builds the ``S x N`` scores, so this term is not checked by the meter.

    fastft plan llama3-8b --world-size 1 8 64 --seq 4096 --method lora
    fastft plan --readme        # the README table (8B and 70B, 1/8/64 GPUs)
    fastft plan llama3-8b --method qlora --max-context --gpu-gib 80 --host-gib 128
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fastft.bench.presets import PRESETS
from fastft.kernels.fused_linear_cross_entropy import _chunk_rows

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lora", "qlora", "full")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
SHARDINGS = ("fsdp2", "ddp", "none")
CHECKPOINTING = ("none", "standard", "offload")

# Llama-3.1-70B's published config.json (meta-llama/Llama-3.1-70B); 3.1 only changes the RoPE scaling and context,
# so the widths are Llama-3-70B's. Kept here, not in fastft/bench/presets.py: nothing benchmarks a 70B model.
_LOCAL_PRESETS: dict[str, dict[str, Any]] = {
    "llama3-70b": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}
# NF4 with bitsandbytes' defaults: 4 bits per weight, one uint8 block scale per 64 weights, one fp32 scale per 256
# block scales (double quantisation).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Dims:
    """The dimensions that decide a decoder-only transformer's memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int]]:
        """``name -> (out_features, in_features)`` of one decoder layer's seven projections."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip


def dims_of(config_or_preset: Any) -> Dims:
    """:class:`Dims` of a preset name (``fastft.bench.presets`` or ``llama3-70b``), a transformers config, or a dict
    of config fields (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``vocab_size``; optional ``head_dim``, ``tie_word_embeddings``)."""
    if isinstance(config_or_preset, Dims):
        return config_or_preset
    if isinstance(config_or_preset, str):
        if config_or_preset in PRESETS:
            fields = dict(PRESETS[config_or_preset].fields)
        elif config_or_preset in _LOCAL_PRESETS:
            fields = dict(_LOCAL_PRESETS[config_or_preset])
        else:
            choices = ", ".join([*PRESETS, *_LOCAL_PRESETS])
            raise ValueError(f"plan: preset {config_or_preset!r} is unknown; choose one of {choices}, or pass a "
                             "transformers config or a dict of its fields.")  # fmt: skip
    elif isinstance(config_or_preset, Mapping):
        fields = dict(config_or_preset)
    elif hasattr(config_or_preset, "to_dict"):
        fields = config_or_preset.to_dict()
        fields = fields.get("text_config", fields) if "hidden_size" not in fields else fields
    else:
        raise TypeError(f"plan: config_or_preset must be a preset name, a transformers config or a dict, got "
                        f"{type(config_or_preset).__name__}.")  # fmt: skip
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if fields.get(k) is None]
    if missing:
        raise ValueError(f"plan: the config lacks {', '.join(missing)}; pass a decoder-only causal LM's config.")
    heads = fields["num_attention_heads"]
    return Dims(
        hidden=fields["hidden_size"],
        intermediate=fields["intermediate_size"],
        layers=fields["num_hidden_layers"],
        heads=heads,
        kv_heads=fields.get("num_key_value_heads") or heads,
        head_dim=fields.get("head_dim") or fields["hidden_size"] // heads,
        vocab=fields["vocab_size"],
        tied=bool(fields.get("tie_word_embeddings", False)),
    )


@dataclass
class Footprint:
    """Bytes per rank of one side (plain transformers + PEFT, or fastft). ``total`` is the device peak."""

    frozen: int  # frozen base parameters (LoRA, QLoRA)
    trainable: int  # trainable parameters (adapters, or the whole model in full fine-tuning)
    gradients: int
    optimizer: int
    activations: int  # saved for backward, on the device
    loss_peak: int  # transient: the loss/head beyond what it saves
    recompute: int  # transient: one checkpointed layer recomputed in backward
    gathered: int  # transient: FSDP2's unsharded parameters and gradients, QLoRA's dequantised weight
    offloaded: int = 0  # host memory (offloaded checkpointing), not in total

    @property
    def total(self) -> int:
        states = self.frozen + self.trainable + self.gradients + self.optimizer
        return states + self.activations + max(self.loss_peak, self.recompute) + self.gathered


ROWS = ("frozen", "trainable", "gradients", "optimizer", "activations", "loss_peak", "recompute", "gathered",
        "offloaded", "total")  # fmt: skip
ROW_LABELS = {
    "frozen": "parameters, frozen base",
    "trainable": "parameters, trainable",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations (saved for backward)",
    "loss_peak": "loss/head peak (transient)",
    "recompute": "checkpoint recompute (transient)",
    "gathered": "gathered / dequantised weights (transient)",
    "offloaded": "offloaded to host (not in total)",
    "total": "**total per rank**",
}


@dataclass
class Plan:
    """What one rank needs: :attr:`plain` (transformers + PEFT) and :attr:`fastft`, in bytes."""

    dims: Dims
    settings: dict[str, Any]
    plain: Footprint
    fastft: Footprint
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, int, int]]:
        """``(label, plain bytes, fastft bytes)`` per line of the table."""
        return [(ROW_LABELS[k], getattr(self.plain, k), getattr(self.fastft, k)) for k in ROWS]

    def markdown(self) -> str:
        """The plan as a markdown table (GiB per rank), the settings above it and the notes below."""
        s = self.settings
        head = (f"{s['model']}: {s['method']}, {s['sharding']} on {s['world_size']} rank(s), "
                f"{s['micro_batch']} x {s['seq_len']} tokens per rank, {s['dtype']}, {s['optimizer']}, "
                f"checkpointing {s['checkpointing']}")  # fmt: skip
        lines = [head, "", "| per rank | transformers + PEFT | fastft |", "| --- | ---: | ---: |"]
        lines += [f"| {label} | {gib(p)} | {gib(f)} |" for label, p, f in self.rows()]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"

    def __str__(self) -> str:
        return self.markdown()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _bytes(dtype: torch.dtype | str) -> tuple[torch.dtype, int]:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"plan: dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}.")
    return dtype, dtype.itemsize


def _shard(rows: int, row_elems: int, world: int) -> int:
    """Elements one FSDP2 rank allocates for a (rows, ...) parameter: ceil(rows / world) rows (padded chunk)."""
    return -(-rows // world) * row_elems


def plan(
    config_or_preset: Any,
    world_size: int = 1,
    seq_len: int = 4096,
    micro_batch: int = 1,
    *,
    method: str = "lora",
    lora_rank: int = 16,
    target_modules: Iterable[str] = LORA_TARGETS,
    optimizer: str = "adamw",
    sharding: str = "fsdp2",
    checkpointing: str = "none",
    dtype: torch.dtype | str = torch.bfloat16,
    master_weights: bool = True,
) -> Plan:
    """Bytes per rank to train ``config_or_preset`` (a preset name, transformers config or dict) on ``world_size``
    ranks with ``micro_batch x seq_len`` tokens per rank, for transformers + PEFT and for fastft (module docstring).

    ``method``: "lora", "qlora" (4-bit NF4 base) or "full"; ``target_modules``: LoRA targets among the seven
    projections; ``optimizer``: "adamw", "adamw8bit" or "sgd"; ``sharding``: "fsdp2", "ddp" or "none";
    ``checkpointing``: "none", "standard" or "offload"; ``dtype``: the model/compute dtype; ``master_weights``
    (full fine-tuning): trainable parameters, gradients and AdamW states in fp32 (else in ``dtype``).
    """
    dims = dims_of(config_or_preset)
    dtype, b = _bytes(dtype)
    targets = tuple(target_modules)
    choices = {"method": (method, METHODS), "optimizer": (optimizer, OPTIMIZERS), "sharding": (sharding, SHARDINGS),
               "checkpointing": (checkpointing, CHECKPOINTING)}  # fmt: skip
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"plan: {name}={value!r} is not one of {', '.join(allowed)}.")
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or (method != "full" and not targets):
        raise ValueError(f"plan: target_modules {list(targets)} must be a non-empty subset of {list(LORA_TARGETS)}.")
    for name, value in (("world_size", world_size), ("seq_len", seq_len), ("micro_batch", micro_batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"plan: {name} must be a positive int, got {value!r}.")
    if sharding == "none" and world_size != 1:
        raise ValueError(f"plan: sharding='none' runs one process; world_size={world_size} needs 'fsdp2' or 'ddp'.")
    if method == "qlora" and sharding == "fsdp2":
        raise ValueError(
            "plan: fastft.distributed.shard refuses bitsandbytes 4-bit weights (FSDP2's DTensor shards drop their "
            "packed layout); plan QLoRA with sharding='ddp' (the 4-bit base replicated)."
        )
    if method == "full":
        targets = ()
    world = world_size if sharding == "fsdp2" else 1
    notes: list[str] = []

    states = _states(dims, method, targets, lora_rank, optimizer, sharding, world, b, master_weights)
    tokens = micro_batch * seq_len
    gathered = _gathered(dims, method, sharding, world, b, master_weights)
    sides = {}
    for side in ("plain", "fastft"):
        mode = "standard" if side == "plain" and checkpointing == "offload" else checkpointing
        act, offloaded, recompute = _activations(dims, side, method, targets, lora_rank, mode, tokens, seq_len, b)
        loss = _loss_peak(dims, side, method, tokens, b)
        sides[side] = Footprint(
            **states, activations=act, loss_peak=loss, recompute=recompute, gathered=gathered, offloaded=offloaded
        )

    if checkpointing == "offload":
        notes.append("transformers has no offloaded checkpointing: its column runs its own (standard) checkpointing.")
    if sharding == "fsdp2":
        notes.append(f"FSDP2 shards every parameter, gradient and AdamW state along dim 0 over {world_size} ranks "
                     "(per rank: ceil(rows / ranks) rows, the padding of uneven shards); replicated: AdamW's step "
                     "scalars and buffers. Gathered: the root unit (embeddings, final norm, head) for the whole "
                     "step and two decoder layers at a time.")  # fmt: skip
    elif sharding == "ddp":
        notes.append("DDP replicates parameters, gradients and optimizer state; its gradient buckets are a second "
                     "copy of the trainable gradients.")  # fmt: skip
    if method == "qlora":
        notes.append("QLoRA: the seven projections in NF4 (double-quantised scales); embeddings, norms and head in "
                     f"{str(dtype).removeprefix('torch.')}; one projection dequantised at a time.")  # fmt: skip
    notes.append("Not counted: allocator fragmentation, CUDA context, kernel workspaces, data and tokenizer.")
    settings = {"model": config_or_preset if isinstance(config_or_preset, str) else "model",
                "world_size": world_size, "seq_len": seq_len, "micro_batch": micro_batch, "method": method,
                "lora_rank": lora_rank, "target_modules": targets, "optimizer": optimizer, "sharding": sharding,
                "checkpointing": checkpointing, "dtype": str(dtype).removeprefix("torch."),
                "master_weights": master_weights}  # fmt: skip
    return Plan(dims, settings, sides["plain"], sides["fastft"], notes)


def _param_shapes(dims: Dims) -> list[tuple[str, int, int]]:
    """Every base parameter as ``(kind, rows, elements per row)``; kind "proj" for the seven projections."""
    h, v = dims.hidden, dims.vocab
    shapes = [("embed", v, h)] + ([] if dims.tied else [("head", v, h)]) + [("norm", h, 1)]
    for _ in range(dims.layers):
        shapes += [("proj", out, inp) for out, inp in dims.projections().values()]
        shapes += [("norm", h, 1), ("norm", h, 1)]
    return shapes


def _lora_shapes(dims: Dims, targets: tuple[str, ...], rank: int) -> list[tuple[int, int]]:
    """``(rows, elements per row)`` of every LoRA matrix: A (r, in) and B (out, r) per target and layer."""
    per_layer = [shape for name, (out, inp) in dims.projections().items() if name in targets
                 for shape in ((rank, inp), (out, rank))]  # fmt: skip
    return per_layer * dims.layers


def _states(dims, method, targets, rank, optimizer, sharding, world, b, master_weights) -> dict[str, int]:
    """Frozen and trainable parameters, gradients and optimizer state per rank."""
    base = _param_shapes(dims)
    frozen_bytes = 0.0
    if method == "full":
        trainable, t_bytes = [(rows, per) for _, rows, per in base], 4 if master_weights else b
    else:
        trainable, t_bytes = _lora_shapes(dims, targets, rank), 4  # PEFT keeps adapters in fp32
        for kind, rows, per in base:
            nf4 = method == "qlora" and kind == "proj"
            frozen_bytes += _shard(rows, per, world) * (NF4_BYTES_PER_PARAM if nf4 else b)
    elems = sum(_shard(rows, per, world) for rows, per in trainable)
    grads = elems * t_bytes * (2 if sharding == "ddp" else 1)  # DDP: buckets hold a second copy
    if optimizer == "adamw":
        opt = 2 * elems * t_bytes + 4 * len(trainable)  # exp_avg, exp_avg_sq; one fp32 step per tensor (replicated)
    elif optimizer == "adamw8bit":
        opt = 2 * elems + 4 * len(trainable)
    else:
        opt = 0
    return {"frozen": math.ceil(frozen_bytes), "trainable": elems * t_bytes, "gradients": grads, "optimizer": opt}


def _layer_activations(dims, side, method, targets, rank, n, b, input_grad: bool) -> int:
    """Bytes one decoder layer saves for backward without checkpointing (module docstring), ``n`` tokens."""
    h, i, q, kv = dims.hidden, dims.intermediate, dims.q_width, dims.kv_width
    full = method == "full"
    attention = b * n * (2 * q + 2 * kv) + 4 * n * dims.heads  # q, k, v, output; fp32 log-sum-exp
    xa = 4 * n * rank * len(targets)  # the (N, r) fp32 products, one per adapter (both sides)
    qkv = {"q_proj", "k_proj", "v_proj"} & set(targets)
    mlp = {"gate_proj", "up_proj"} & set(targets)
    if side == "fastft":
        norms = (b * n * h + 4 * n) * (2 if input_grad else 1)  # input and fp32 inverse rms per row
        inputs = b * n * h * ((bool(qkv) or full) + (bool(mlp or "down_proj" in targets) or full))
        return norms + inputs + attention + 2 * b * n * i + xa
    norms = (4 * n * h + 4 * n) * (2 if input_grad else 1)  # the fp32 upcast input and inverse rms
    if full:
        norms += 2 * b * n * h  # a trainable norm weight also keeps the rounded normalised rows
    # each LoRA A keeps its own fp32 cast of its input; a trainable base keeps the input once per group
    widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}
    casts = sum(4 * n * widths[t] for t in targets) if b != 4 else 4 * n * (h * bool(qkv) + h * bool(mlp))
    if b == 4:
        casts += 4 * n * (q * ("o_proj" in targets) + i * ("down_proj" in targets))
    base_inputs = b * n * (2 * h + i) if full else 0  # q/k/v input, MLP input, h (o_proj's is the attention output)
    return norms + casts + base_inputs + attention + 3 * b * n * i + xa


def _activations(dims, side, method, targets, rank, mode, n, seq, b) -> tuple[int, int, int]:
    """(device bytes, host bytes, transient recompute bytes) saved for backward by the whole model."""
    h = dims.hidden
    embed_grad = method == "full"
    rotary = 2 * b * seq * dims.head_dim  # cos and sin, shared by every layer (position ids (1, T))
    if side == "fastft":
        final = b * n * h + 4 * n  # final norm: input and inverse rms
        # The fused loss drops the rows without a next token (one per sequence) first and keeps the live rows'
        # finished dL/dh and, unless they are one run (a single sequence: a slice), their int64 row index (the
        # head's dW, when trained, is a gradient: counted there).
        live = n - n // seq
        head = b * live * h + (8 * live if n // seq > 1 else 0)
    else:
        final = 4 * n * h + 4 * n + (2 * b * n * h if method == "full" else 0)
        # fp32 log-probs, the int64 shifted labels (a view of the padded (1, T + 1) labels for one row, else a copy)
        head = 4 * n * dims.vocab + 8 * (n + 1 if n == seq else n) + 4
    layer = _layer_activations(dims, side, method, targets, rank, n, b, input_grad=True)
    if mode == "none":
        first = _layer_activations(dims, side, method, targets, rank, n, b, input_grad=embed_grad)
        return rotary + first + layer * (dims.layers - 1) + final + head, 0, 0
    kept = b * n * h * dims.layers  # one input per checkpointed layer
    recompute = layer + rotary
    if mode == "offload":
        return final + head, kept, recompute + b * n * h
    return kept + final + head, 0, recompute


def _loss_peak(dims, side, method, n, b) -> int:
    """Transient bytes of the loss/head beyond what it saves."""
    v, h = dims.vocab, dims.hidden
    if side == "plain":
        return 8 * n * v  # two fp32 (N, V) gradients next to the saved log-probs; forward: logits + fp32 copy (6NV)
    weight_grad = method == "full"
    rows = _chunk_rows(n, v, b, weight_grad, h)
    return rows * v * b + (4 * v * h if weight_grad else 0)  # one logits chunk; the fp32 dW accumulator


def _gathered(dims, method, sharding, world, b, master_weights) -> int:
    """FSDP2's unsharded parameters/gradients and QLoRA's dequantised projection alive at once per rank."""
    extra = 0
    if method == "qlora":
        extra = b * max(out * inp for out, inp in dims.projections().values())
    if sharding != "fsdp2":
        return extra
    h, v = dims.hidden, dims.vocab
    root = (v * h * (1 if dims.tied else 2) + h) * b
    layer = (sum(out * inp for out, inp in dims.projections().values()) + 2 * h) * b
    gathered = root + 2 * layer  # the root for the whole step; the running and the prefetched layer
    if method == "full":  # unsharded gradients before their reduce-scatter (fp32 reduce with master weights)
        g = 4 if master_weights else b
        gathered += (root + layer) // b * g
    return gathered + extra


# ------------------------------------------------------------------------------------------------ longest context

_TILE_ROWS = 1024  # rows per MLP tile the plan assumes (tiled_mlp.tile_rows picks from free memory on a GPU)
_TILE_BYTES_PER_ELEMENT = 48  # one tile's transients per (row x intermediate) element, bf16 (measured: ~44)


def long_context_layer_bytes(dims: Dims, targets: tuple[str, ...], rank: int, b: int) -> dict[str, int]:
    """fastft's device bytes per token at its long-context peak, by term: one decoder layer's backward after its
    recompute, at the larger of its two moments (the MLP's backward; the attention's backward, where dq/dk/dv, the
    attention output's gradient and the fp32 dq accumulator of a flash-attention backward replace the residual sum,
    the MLP's dx and its gradient). The input norm's output is not a term: q/k/v keep the norm's input, the layer
    input, and recompute it (fastft.kernels.normed_qkv); nor is the MLP's normalised input (the tiled MLP's)."""
    h, q, kv = dims.hidden, dims.q_width, dims.kv_width
    adapters = len({"q_proj", "k_proj", "v_proj", "o_proj"} & set(targets))
    saved = {
        "layer input (device copy)": b * h,
        "q, k, v after RoPE": b * (q + 2 * kv),
        "attention output": b * q,
        "attention log-sum-exp (fp32)": 4 * dims.heads,
        "LoRA (N, r) products, fp32": 4 * rank * adapters,
        "cos/sin": 2 * b * dims.head_dim,
    }
    mlp = {**saved, "residual after attention (the fused MLP's input)": b * h, "incoming gradient + MLP dx": 2 * b * h}
    attention = {**saved, "gradient of the residual stream": b * h, "attention output's gradient": b * q,
                 "dq, dk, dv": b * (q + 2 * kv), "attention backward's fp32 dq accumulator": 4 * q}  # fmt: skip
    return max(mlp, attention, key=lambda terms: sum(terms.values()))


@dataclass
class ContextPlan:
    """The longest context of each side (tokens), what bounds it, and fastft's terms at that length (bytes)."""

    plain_tokens: int
    plain_bound: str
    fastft_tokens: int
    fastft_bound: str
    keep_every: int
    per_token: dict[str, int]
    fixed: dict[str, int]
    device_bytes: int
    host_bytes: int
    cp: int = 1  # GPUs one sequence is split over (context parallelism); bytes are per GPU
    gathered_per_token: int = 0  # context parallelism's gathered K/V and gradients, per token of the sequence

    def text(self, gpu_bytes: float, host_bytes: float) -> str:
        memory = f"{gpu_bytes / 2**30:.0f} GiB with {host_bytes / 2**30:.0f} GiB of host memory"
        where = f"one GPU of {memory}" if self.cp == 1 else f"{self.cp} GPUs (context parallelism), each of {memory}"
        lines = [
            f"longest context on {where}:",
            (
                f"  transformers + PEFT (its checkpointing, one GPU): {self.plain_tokens:,} tokens, bounded by "
                f"{self.plain_bound}"
            ),
            (
                f"  fastft (offloaded checkpointing keeping every {self.keep_every}-th layer input, tiled MLP): "
                f"{self.fastft_tokens:,} tokens, bounded by {self.fastft_bound}"
            ),
            f"  fastft at {self.fastft_tokens:,} tokens: GPU {gib(self.device_bytes)}, host {gib(self.host_bytes)}",
            "  GPU bytes per token (a layer's backward after its recompute, at its larger moment)"
            + (f", per token on this GPU (1/{self.cp} of the sequence):" if self.cp > 1 else ":"),
        ]
        lines += [f"    {k}: {v:,}" for k, v in self.per_token.items()]
        if self.cp > 1:
            lines.append(f"  GPU bytes per token of the whole sequence (gathered K/V and their gradients, one layer): "
                         f"{self.gathered_per_token:,}")  # fmt: skip
        lines += ["  GPU bytes fixed:"] + [f"    {k}: {gib(v)}" for k, v in self.fixed.items()]
        return "\n".join(lines)


def max_context(
    config_or_preset: Any,
    gpu_bytes: float,
    host_bytes: float,
    *,
    method: str = "qlora",
    lora_rank: int = 16,
    target_modules: Iterable[str] = LORA_TARGETS,
    optimizer: str = "adamw",
    dtype: torch.dtype | str = torch.bfloat16,
    cp: int = 1,
) -> ContextPlan:
    """The longest single sequence one step fits in on one GPU (fastft: split over ``cp`` GPUs by context
    parallelism, each with ``gpu_bytes`` and ``host_bytes``), plain vs fastft (module docstring)."""
    from fastft.models.long_context import keep_every_for

    dims = dims_of(config_or_preset)
    dtype, b = _bytes(dtype)
    targets = tuple(target_modules)
    if method == "full":
        raise ValueError("plan: --max-context plans LoRA or QLoRA (full fine-tuning's states leave little room).")
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"plan: cp (GPUs one sequence is split over) must be a positive int, got {cp!r}.")
    states = _states(dims, method, targets, lora_rank, optimizer, "none", 1, b, True)
    gathered = _gathered(dims, method, "none", 1, b, True)
    per_token = long_context_layer_bytes(dims, targets, lora_rank, b)
    fixed = {
        "parameters, gradients, optimizer": sum(states.values()),
        "dequantised weight (QLoRA)": gathered,
        "one MLP tile's transients": _TILE_ROWS * dims.intermediate * _TILE_BYTES_PER_ELEMENT,
        "fused loss chunk": _loss_peak(dims, "fastft", method, 1 << 20, b),
    }
    gathered_kv = 6 * dims.kv_width * b if cp > 1 else 0  # per token of the whole sequence (module docstring)
    slope, constant = sum(per_token.values()) / cp + gathered_kv, sum(fixed.values())
    gpu_tokens = max(0, int((gpu_bytes - constant) // slope))
    least_inputs = min(math.ceil(dims.layers / k) + k - 1 for k in range(1, dims.layers + 1))
    host_tokens = int(host_bytes * cp // (least_inputs * b * dims.hidden))
    tokens = min(gpu_tokens, host_tokens)
    bound = (
        f"GPU memory ({slope:,.0f} bytes per token)"
        if gpu_tokens <= host_tokens
        else f"host memory ({least_inputs} layer inputs of {b * dims.hidden:,} bytes per token)"
    )
    local = math.ceil(tokens / cp)
    k = keep_every_for(dims.layers, local, dims.hidden, host_bytes, b) if tokens else 1
    host_used = (math.ceil(dims.layers / k) + k - 1) * local * b * dims.hidden

    # transformers + PEFT: its checkpointing keeps every layer input on the GPU; the loss holds 12 N V at its peak.
    def plain_total(n: int) -> int:
        p = plan(dims, 1, n, 1, method=method, lora_rank=lora_rank, target_modules=targets, optimizer=optimizer,
                 sharding="none", checkpointing="standard", dtype=dtype)  # fmt: skip
        return p.plain.total

    lo, hi = 0, 1
    while plain_total(hi) <= gpu_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plain_total(mid) <= gpu_bytes else (lo, mid)
    plain_bound = f"GPU memory (the loss's fp32 (N, V) tensors: {12 * dims.vocab:,} bytes per token)"
    device = int(constant + slope * tokens)
    return ContextPlan(lo, plain_bound, tokens, bound, k, per_token, fixed, device, host_used, cp, gathered_kv)


# ------------------------------------------------------------------------------------------------ README table

README_MODELS = (("llama3-8b", "Llama-3.1-8B"), ("llama3-70b", "Llama-3.1-70B"))
README_GPUS = (1, 8, 64)
README_METHODS = (("lora", "LoRA r=16, bf16"), ("qlora", "QLoRA r=16, NF4"), ("full", "full, AdamW fp32 master"))


def readme_table(seqs: Iterable[int] = (4096, 8192), checkpointing: str = "offload") -> str:
    """Markdown: GiB per GPU for Llama-3.1-8B and -70B on 1, 8 and 64 GPUs (micro-batch 1), plain vs fastft.

    LoRA and full fine-tuning shard with FSDP2 beyond one GPU; QLoRA replicates its 4-bit base with DDP.
    """
    head = "| model | method | seq | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in README_GPUS) + " |"
    lines = [head, "| --- | --- | ---: |" + " ---: |" * len(README_GPUS)]
    for preset, model in README_MODELS:
        for method, label in README_METHODS:
            for seq in seqs:
                cells = []
                for gpus in README_GPUS:
                    sharding = "none" if gpus == 1 else ("ddp" if method == "qlora" else "fsdp2")
                    p = plan(preset, gpus, seq, 1, method=method, sharding=sharding, checkpointing=checkpointing)
                    cells.append(f"{p.plain.total / 2**30:.1f} → **{p.fastft.total / 2**30:.1f}**")
                lines.append(f"| {model} | {label} | {seq} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str = "fastft plan") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", nargs="?", default="llama3-8b", help=f"preset: {', '.join([*PRESETS, *_LOCAL_PRESETS])}"
    )
    parser.add_argument("--world-size", type=int, nargs="+", default=[1])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--sharding", choices=SHARDINGS, default=None, help="default: none on 1 rank, else fsdp2")
    parser.add_argument(
        "--checkpointing", choices=CHECKPOINTING, default=None, help="default: none (--readme: offload)"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--readme", action="store_true", help="print the README table (8B and 70B on 1/8/64 GPUs)")
    parser.add_argument("--max-context", action="store_true", help="the longest sequence one GPU fits (one step)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="with --max-context: GPU memory")
    parser.add_argument("--host-gib", type=float, default=128.0, help="with --max-context: host memory")
    parser.add_argument(
        "--cp", type=int, default=1, help="with --max-context: GPUs one sequence is split over (context parallelism)"
    )
    args = parser.parse_args(argv)
    if args.max_context:
        gpu, host = args.gpu_gib * 2**30, args.host_gib * 2**30
        result = max_context(args.model, gpu, host, method=args.method, lora_rank=args.rank, optimizer=args.optimizer,
                             dtype=args.dtype, cp=args.cp)  # fmt: skip
        print(result.text(gpu, host))
        return 0
    if args.readme:
        print(readme_table(checkpointing=args.checkpointing or "offload"))
        return 0
    for world in args.world_size:
        sharding = args.sharding or ("none" if world == 1 else "fsdp2")
        p = plan(
            args.model,
            world,
            args.seq,
            args.micro_batch,
            method=args.method,
            lora_rank=args.rank,
            optimizer=args.optimizer,
            sharding=sharding,
            checkpointing=args.checkpointing or "none",
            dtype=args.dtype,
        )
        print(p.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
