"""The contenders of ``fastft bench`` and one training run: the same LoRA model, three ways, same seed, same data.

Contenders (:data:`CONTENDERS`), each a PEFT LoRA model (r=16, lora_alpha 16, no dropout, on the seven
projections of :data:`LORA_TARGETS`) on bit-identical base weights (random weights are drawn again from the same
seed for every contender; a model from the Hub or a folder is loaded again):

- ``plain``: transformers + PEFT as users run it. ``standard`` checkpointing is transformers' own (non-reentrant),
  enabled before ``get_peft_model`` as a training script does. transformers has no offloaded checkpointing: asked
  for ``offload``, plain runs ``standard`` (:func:`checkpointing_for`) and the report says so;
- ``fastft``: PEFT, then :func:`fastft.patch`; checkpointing by
  :func:`fastft.models.checkpointing.set_checkpointing`;
- ``liger``: Liger Kernel's ``apply_liger_kernel_to_<model type>(model=...)`` on the base model, then PEFT; only
  where liger-kernel is importable and the device has CUDA (its kernels are Triton-only). It patches transformers'
  module functions globally, so a process runs it after the others.

What one run measures (:class:`TrainingRun`, :func:`train`), every step being forward + backward + AdamW
``step()`` + ``zero_grad()``:

- **loss** of every step (``model(**batch).loss``, transformers' token-mean over labels != -100);
- **tokens/s**: trained tokens over wall time (synchronised on CUDA), leaving out the first step when there are
  more (it compiles Triton kernels and allocates the optimizer states);
- **saved for backward**: the bytes autograd keeps from forward to backward in the first step, each storage once,
  parameters and buffers excluded (:class:`ActivationMeter`: a frozen weight that ``F.linear`` keeps for ``dx``
  exists anyway);
- **peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` over all steps (weights, optimizer states,
  activations: what must fit); on a CPU the saved-for-backward bytes stand in for it.

This module also holds what the GPU suite (:mod:`fastft.bench.gpu`) and ``benchmarks/memory.py`` share with the command:
:class:`ActivationMeter`, :class:`PeakBytes`, :func:`quantize_4bit`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig
from typing_extensions import Self

from fastft.bench.harness import synchronize
from fastft.utils.memory import SavedTensorMeter

CONTENDERS = ("plain", "fastft", "liger")
LABELS = {"plain": "transformers + PEFT", "fastft": "fastft", "liger": "transformers + PEFT + Liger Kernel"}
CHECKPOINTING = ("none", "standard", "offload")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A model to benchmark: a config (random weights from the seed), a Hub id or folder (from_pretrained), or a
# function (seed, dtype) -> model that builds the same random weights for the same seed.
ModelSource = PretrainedConfig | str | os.PathLike | Callable[[int, torch.dtype], nn.Module]


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """The identity of ``tensor``'s storage: two views of one buffer have the same key."""
    return str(tensor.device), tensor.untyped_storage().data_ptr()


@dataclass
class ActivationMeter(SavedTensorMeter):
    """A :class:`SavedTensorMeter` that remembers each saved tensor's storage and leaves out ``exclude``.

    ``keys[i]`` is the storage of ``saved[i]``. :meth:`for_model` excludes the model's parameters and buffers:
    a frozen base weight or a LoRA matrix that an op saves costs no memory beyond the weight itself.
    """

    exclude: frozenset[tuple[str, int]] = frozenset()
    keys: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def for_model(cls, model: nn.Module) -> Self:
        return cls(exclude=frozenset(storage_key(t) for t in [*model.parameters(), *model.buffers()]))

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key in self.exclude:
            return tensor
        self.keys.append(key)
        return super()._pack(tensor)


class PeakBytes:
    """The most bytes the block's own allocations held at once, beyond what was allocated when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the allocator events that ``torch.profiler``
    records with ``profile_memory=True`` (+bytes per allocation, -bytes per free), summed in time order; the
    profiler costs some time, so a block measured here is not also timed.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._profile = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._profile.__exit__(*exc)
        if exc[0] is not None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            self._profile.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        live = 0
        for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
            if event["args"].get("Device Type", 0) == 0:  # CPU
                live += event["args"]["Bytes"]
                self.peak = max(self.peak, live)


def liger_unavailable(device: torch.device) -> str | None:
    """Why the ``liger`` contender cannot run on ``device`` (``None`` when it can)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if device.type != "cuda":
        return "Liger Kernel's kernels are Triton-only: they need a CUDA device"
    return None


def checkpointing_for(contender: str, mode: str) -> str:
    """The checkpointing ``contender`` runs when ``mode`` is asked: only fastft has ``offload``."""
    return "standard" if mode == "offload" and contender != "fastft" else mode


def enable_hf_checkpointing(model: nn.Module) -> None:
    """transformers' own gradient checkpointing, non-reentrant (the 5.2x name, else the older one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Replace every projection named in :data:`LORA_TARGETS` by a bitsandbytes NF4 ``Linear4bit`` (double
    quantisation, ``compute_dtype`` compute), quantised in place on the weight's device: the modules
    ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` creates, without writing
    and reloading the weights. Embeddings, norms and ``lm_head`` keep their dtype, as transformers leaves them."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, linear in list(parent.named_children()):
            if name not in LORA_TARGETS or type(linear) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",  # no throw-away full-precision weight
            )
            weight = bnb.nn.Params4bit(
                linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
            )
            q.weight = weight._quantize(linear.weight.device)
            if linear.bias is not None:
                q.bias = linear.bias
            setattr(parent, name, q)  # the full-precision weight is freed here
    model.is_loaded_in_4bit = True  # what transformers' quantiser sets; PEFT then wraps Linear4bit in its bnb LoRA
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _base_model(
    source: ModelSource, *, dtype: torch.dtype, device: torch.device, seed: int, load_in_4bit: bool
) -> nn.Module:
    """The transformers causal LM of ``source`` on ``device``, 4-bit if asked."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if isinstance(source, (str, os.PathLike)):
        kwargs = {"dtype": dtype, "device_map": {"": device}}
        if load_in_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        return _training_config(AutoModelForCausalLM.from_pretrained(source, **kwargs))
    torch.manual_seed(seed)
    if isinstance(source, PretrainedConfig):
        with torch.device(device):  # built where it trains: no host round trip for a model of real size
            model = AutoModelForCausalLM.from_config(source, dtype=dtype)
    else:  # the function decides where it builds (the embedded default: on the host, from a host generator)
        model = source(seed, dtype)
    model = _training_config(model.to(device=device, dtype=dtype))
    if load_in_4bit:
        quantize_4bit(model, compute_dtype=dtype)
    return model


def _training_config(model: nn.Module) -> nn.Module:
    # A KV cache is never read in training; filling one would hold every layer's keys and values to the end.
    model.config.use_cache = False
    return model


def build_model(
    source: ModelSource,
    contender: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
    load_in_4bit: bool = False,
    checkpointing: str = "none",
    seed: int = 0,
    rank: int = 16,
    lora_alpha: int = 16,
) -> tuple[nn.Module, str]:
    """The PEFT LoRA model of ``contender`` ("plain", "fastft" or "liger") on ``source``, in training mode.

    ``checkpointing`` is the mode asked for; plain and liger run :func:`checkpointing_for` of it. Returns the model
    and a one-line note (fastft's patch report; what Liger patched). Raises ``ValueError`` for an unknown contender
    or mode, ``RuntimeError`` when Liger cannot run here (:func:`liger_unavailable`).
    """
    from peft import LoraConfig, get_peft_model

    if contender not in CONTENDERS:
        raise ValueError(f"contender={contender!r} is not one of {', '.join(CONTENDERS)}.")
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing={checkpointing!r} is not one of {', '.join(CHECKPOINTING)}.")
    device = device or torch.device("cpu")
    if contender == "liger" and (reason := liger_unavailable(device)):
        raise RuntimeError(reason)
    mode = checkpointing_for(contender, checkpointing)
    base = _base_model(source, dtype=dtype, device=device, seed=seed, load_in_4bit=load_in_4bit)
    note = ""
    if contender == "liger":
        import liger_kernel.transformers as liger

        apply = getattr(liger, f"apply_liger_kernel_to_{base.config.model_type}", None)
        if apply is None:
            raise RuntimeError(f"Liger Kernel has no apply_liger_kernel_to_{base.config.model_type}")
        apply(model=base)
        note = f"liger: {apply.__name__}(model=...) with its defaults"
    if mode == "standard" and contender != "fastft":
        enable_hf_checkpointing(base)
    lora = LoraConfig(
        r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
    )
    torch.manual_seed(seed)  # LoRA's A matrices are drawn from the global generator: the same for every contender
    model = get_peft_model(base, lora)
    if contender == "fastft":
        import fastft
        from fastft.models.checkpointing import set_checkpointing

        fastft.patch(model)
        note = model.fastft_report.summary()
        if mode != "none":
            set_checkpointing(model, mode)
    return model.train(), note


@dataclass
class TrainStats:
    """What :class:`TrainingRun` measured (bytes; seconds). ``peak_bytes`` is ``None`` on a CPU."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    saved_bytes: int = 0
    peak_bytes: int | None = None
    model_bytes: int | None = None  # CUDA: allocated before the first step (weights, adapters)

    @property
    def tokens_per_s(self) -> float:
        """Tokens over seconds of every step but the first (which compiles and allocates), when there are more."""
        skip = 1 if len(self.step_seconds) > 1 else 0
        return sum(self.tokens[skip:]) / sum(self.step_seconds[skip:])


class TrainingRun:
    """One contender's training, a step at a time, so that contenders can take turns on a shared CPU: a busy spell
    of another program then slows every contender alike instead of whichever one happened to be running.

    ``step(batch)`` runs one AdamW step and records it; :attr:`stats` holds the measurements so far (on CUDA the
    peak since the run started, so one run at a time there). ``tokens_in(batch)`` counts a batch's tokens.
    """

    def __init__(
        self, model: nn.Module, *, device: torch.device, lr: float, tokens_in: Callable[[dict[str, torch.Tensor]], int]
    ) -> None:
        self.model, self.device, self.tokens_in = model, device, tokens_in
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.stats = TrainStats()
        synchronize(device)
        if device.type == "cuda":
            self.stats.model_bytes = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One forward + backward + AdamW step on ``batch``; returns its loss."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        first = not self.stats.losses
        meter = ActivationMeter.for_model(self.model) if first else contextlib.nullcontext()
        start = time.perf_counter()
        with meter:
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        self.stats.step_seconds.append(time.perf_counter() - start)
        self.stats.losses.append(float(loss.detach()))
        self.stats.tokens.append(self.tokens_in(batch))
        if first:
            self.stats.saved_bytes = meter.total_bytes
        if self.device.type == "cuda":
            self.stats.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        return self.stats.losses[-1]


def train(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    lr: float = 1e-4,
    tokens_in: Callable[[dict[str, torch.Tensor]], int],
    on_step: Callable[[int, float], None] | None = None,
) -> TrainStats:
    """Train ``model`` one AdamW step per batch and measure it (module docstring, :class:`TrainingRun`);
    ``on_step(i, loss)`` after each step (a progress bar)."""
    run = TrainingRun(model, device=device, lr=lr, tokens_in=tokens_in)
    for i, batch in enumerate(batches):
        loss = run.step(batch)
        if on_step is not None:
            on_step(i, loss)
    return run.stats


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (what exists before a step starts)."""
    storages = {storage_key(t): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def step_memory(model: nn.Module, batch: dict[str, torch.Tensor], *, device: torch.device, lr: float = 1e-4) -> int:
    """The memory one training step of ``model`` on ``batch`` needs, with a fresh AdamW (its states count).

    CUDA: ``torch.cuda.max_memory_allocated`` over the step (weights included); an out-of-memory error propagates.
    CPU: :func:`resident_bytes` plus the step's own allocation peak (:class:`PeakBytes`), the same quantity.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = {k: v.to(device) for k, v in batch.items()}
    base = resident_bytes(model) if device.type != "cuda" else 0
    try:
        with PeakBytes(device) as peak:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return base + peak.peak
