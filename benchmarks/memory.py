"""One LoRA training step, end to end: what autograd keeps for backward, whether logits ever exist, and time.

The model is Llama-3-8B scaled down, with its proportions: hidden 1024, intermediate 3584 (3.5x), head_dim 128,
8 query / 2 key-value heads (GQA 4:1), a 32000 vocabulary, 2 decoder layers, random weights in bf16, SDPA
attention; PEFT LoRA r=16 (lora_alpha 16) on all seven projections; one batch of 2 x 512 random tokens with
``labels = input_ids``. Four contenders run the same step (``model(input_ids=..., labels=...).loss.backward()``):

- ``plain``: transformers + PEFT as users run it;
- ``plain+checkpointing``: the same with transformers' own gradient checkpointing (``activation_checkpointing_enable``,
  non-reentrant), for context;
- ``fastft``: ``fastft.models.patch.patch(peft_model)``, no checkpointing;
- ``fastft+offload``: the same plus ``set_checkpointing(peft_model, "offload")``.

What is counted (:func:`measure_memory`), every saved storage once (:class:`fastft.bench.step.ActivationMeter`):

- **activations**: the saved storages that stay on the device from forward to backward. Parameters saved by an op
  (a frozen base weight that ``F.linear`` keeps for ``dx``, the LoRA A and B) are not activations: they exist
  anyway and cost nothing extra. They are reported apart (``parameter_bytes``) and excluded on every side alike.
- **offloaded**: what offloaded checkpointing parks in host memory: each checkpointed decoder layer's input hidden
  states. On a GPU these are storages on the CPU. On a CPU-only machine the offload's host copy is the tensor itself
  (no copy to make), so they are recognised as the storages of the decoder layers' inputs that were saved exactly
  once (by the checkpoint); one saved a second time would also be kept on the device by another op and counts as
  an activation. ``plain+checkpointing`` keeps the same layer inputs on the device: there they are activations.
- **B x T x V tensors**: every tensor the step creates (forward and backward, seen by a ``TorchDispatchMode``) or
  saves with at least batch x seq x vocab elements, other than a parameter or a view of one.
- **peak step bytes**: the most memory the step's own allocations held at once, beyond what existed before it
  (:class:`fastft.bench.step.PeakBytes`: CUDA ``max_memory_allocated``; CPU the allocator events of
  ``torch.profiler``).

The models are built by :func:`fastft.bench.step.build_model` (what ``fastft bench`` trains), from one random base
model built once per configuration.

The step time (:func:`measure_times`) is the median forward + backward of a few steps after a warm-up, the
contenders taking turns step by step; on a CPU fastft runs its torch path. ``--profile`` adds torch.profiler's top
ops per contender. Run the script with ``TRITON_INTERPRET`` unset (it removes the variable when started as a
script): interpreted Triton kernels are for correctness, not timing.

    python benchmarks/memory.py [--json PATH] [--markdown] [--reps N] [--contenders a,b] [--seq T] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):  # python benchmarks/memory.py: make the repository importable, and drop
        # benchmarks/ from the path: its kernels.py would shadow the ``kernels`` package transformers probes for.
        _here = Path(__file__).resolve().parent
        sys.path[:] = [str(_here.parent), *(p for p in sys.path if Path(p or ".").resolve() != _here)]
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        # fastft reads the variable when imported (below); interpreted kernels would make the step minutes long.
        print("benchmarks/memory.py: ignoring TRITON_INTERPRET (benchmarks time compiled kernels)", file=sys.stderr)
        del os.environ["TRITON_INTERPRET"]

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from fastft.bench import harness
from fastft.bench.step import LORA_TARGETS, ActivationMeter, PeakBytes, build_model, storage_key
from fastft.kernels import _dispatch


@dataclass(frozen=True)
class StepConfig:
    """The model, adapter and batch of the measured step (defaults: Llama-3-8B proportions, scaled down)."""

    batch: int = 2
    seq: int = 512
    hidden: int = 1024
    intermediate: int = 3584
    vocab: int = 32000
    layers: int = 2
    heads: int = 8
    kv_heads: int = 2
    rank: int = 16
    lora_alpha: int = 16
    dtype: str = "bfloat16"

    def describe(self) -> str:
        return (
            f"Llama ({self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
            f"{self.heads}/{self.kv_heads} heads, vocab {self.vocab}), {self.dtype}, "
            f"LoRA r={self.rank} alpha={self.lora_alpha} on {len(LORA_TARGETS)} projections, "
            f"batch {self.batch} x {self.seq} tokens, labels = input_ids"
        )


CONFIG = StepConfig()


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    fastft: bool
    checkpointing: str  # "none", "standard" (transformers' own, non-reentrant) or "offload" (fastft's)


CONTENDERS = (
    Contender("plain", "transformers + PEFT", fastft=False, checkpointing="none"),
    Contender("plain+checkpointing", "transformers + PEFT, gradient checkpointing", False, "standard"),
    Contender("fastft", "fastft", fastft=True, checkpointing="none"),
    Contender("fastft+offload", "fastft, offloaded checkpointing", fastft=True, checkpointing="offload"),
)
BY_NAME = {c.name: c for c in CONTENDERS}


# ----------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _random_llama(config: StepConfig, device: torch.device, seed: int) -> LlamaForCausalLM:
    """The randomly initialised base model (built once per configuration: initialising the two 32000 x 1024
    matrices is most of the cost; every contender gets a copy)."""
    llama = LlamaConfig(
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        vocab_size=config.vocab,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=max(2048, config.seq),
        tie_word_embeddings=False,
        use_cache=False,
    )
    llama._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama).to(device=device, dtype=getattr(torch, config.dtype))


def build(
    contender: str, config: StepConfig = CONFIG, device: torch.device | None = None, seed: int = 0
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The PEFT model of ``contender`` in training mode (the same random weights and LoRA initialisation for every
    contender) and its inputs: ``{"input_ids", "labels"}``, random tokens, labels equal to the inputs."""
    spec = BY_NAME[contender]
    device = device or torch.device("cpu")
    model, _ = build_model(
        lambda _seed, _dtype: copy.deepcopy(_random_llama(config, device, seed)),
        "fastft" if spec.fastft else "plain",
        dtype=getattr(torch, config.dtype),
        device=device,
        checkpointing=spec.checkpointing,
        seed=seed,
        rank=config.rank,
        lora_alpha=config.lora_alpha,
    )
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, config.vocab, (config.batch, config.seq), generator=g).to(device)
    return model, {"input_ids": input_ids, "labels": input_ids.clone()}


def _loss(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).loss


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------


class _LargeTensorWatch(TorchDispatchMode):
    """Records every op output with at least ``threshold`` elements that is not (a view of) a parameter."""

    def __init__(self, threshold: int, ignore: set[tuple[str, int]]) -> None:
        super().__init__()
        self.threshold, self.ignore = threshold, ignore
        # storage -> "dtype shape (op)" of the first tensor seen in it (an address freed and reused counts once)
        self.found: dict[tuple[str, int], str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.threshold:
                key = storage_key(t)
                if key not in self.ignore and key not in self.found:
                    self.found[key] = f"{_dtype(t.dtype)} {tuple(t.shape)} ({func.__name__})"
        return out


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _layer_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the hidden states each decoder layer receives (held, so no storage is reused meanwhile)."""
    seen: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor):
            seen.append(x)

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class MemoryResult:
    """What one training step of a contender keeps and creates (bytes; shapes as text)."""

    contender: str
    activation_bytes: int  # saved for backward, on the device, parameters excluded
    offloaded_bytes: int  # saved for backward in host memory by offloaded checkpointing
    parameter_bytes: int  # parameters saved by ops (no extra memory; excluded from activations everywhere)
    saved_tensors: int  # distinct activation storages
    largest_saved: str  # the largest activation: "dtype shape bytes"
    largest_saved_bytes: int
    btv_saved: list[str]  # saved tensors with >= batch x seq x vocab elements
    btv_created: list[str]  # tensors with >= batch x seq x vocab elements created anywhere in the step
    peak_step_bytes: int
    loss: float


def measure_memory(
    contender: str, config: StepConfig = CONFIG, device: torch.device | None = None, *, peak: bool = True
) -> MemoryResult:
    """Run one forward + backward of ``contender`` and account for every byte it saves (module docstring).

    ``peak=False`` skips the peak measurement (on a CPU it profiles the step, which adds seconds) and reports 0.
    """
    device = device or torch.device("cpu")
    spec = BY_NAME[contender]
    model, inputs = build(contender, config, device)
    params = {storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    btv = config.batch * config.seq * config.vocab
    watch = _LargeTensorWatch(btv, params)
    with PeakBytes(device) if peak else contextlib.nullcontext() as meter_peak:
        with _layer_inputs(model) as layer_inputs, watch, ActivationMeter() as meter:
            loss = _loss(model, inputs)
        layer_input_keys = {storage_key(x) for x in layer_inputs}
        del layer_inputs  # from here on only the graph holds them (or not), as without this benchmark
        with watch:
            loss.backward()

    packs: dict[tuple[str, int], int] = {}
    for key in meter.keys:
        packs[key] = packs.get(key, 0) + 1
    accelerator = device.type != "cpu"

    def where(key: tuple[str, int]) -> str:
        if key in params:
            return "parameter"
        if spec.checkpointing == "offload" and (
            key[0] == "cpu" if accelerator else key in layer_input_keys and packs[key] == 1
        ):
            return "offloaded"
        return "activation"

    totals = {"activation": 0, "offloaded": 0, "parameter": 0}
    largest, largest_bytes, btv_saved, counted, activations = "-", 0, [], set(), 0
    for key, saved in zip(meter.keys, meter.saved):
        if key in counted:
            continue
        counted.add(key)
        kind = where(key)
        totals[kind] += saved.storage_bytes
        if kind != "activation":
            continue
        activations += 1
        text = f"{_dtype(saved.dtype)} {saved.shape}"
        if saved.storage_bytes > largest_bytes:
            largest, largest_bytes = f"{text} {_mb(saved.storage_bytes)}", saved.storage_bytes
        if math.prod(saved.shape) >= btv:
            btv_saved.append(text)
    return MemoryResult(
        contender=contender,
        activation_bytes=totals["activation"],
        offloaded_bytes=totals["offloaded"],
        parameter_bytes=totals["parameter"],
        saved_tensors=activations,
        largest_saved=largest,
        largest_saved_bytes=largest_bytes,
        btv_saved=btv_saved,
        btv_created=list(watch.found.values()),
        peak_step_bytes=meter_peak.peak if peak else 0,
        loss=float(loss.detach()),
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------------


def measure_times(
    contenders: tuple[str, ...],
    config: StepConfig = CONFIG,
    device: torch.device | None = None,
    *,
    warmup: int = 1,
    reps: int = 5,
) -> dict[str, harness.StepTimes]:
    """Median forward, backward and forward+backward milliseconds per contender over ``reps`` timed steps.

    The contenders take turns, one step each per round, after ``warmup`` untimed rounds: on a machine that other
    work shares (a CI runner, a 2-core box), a busy spell slows every contender alike instead of whichever one
    happened to be running, so the ratios hold up better than the absolute times.
    """
    device = device or torch.device("cpu")
    models = {name: build(name, config, device) for name in contenders}
    phases: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for round_ in range(warmup + reps):
        for name, (model, inputs) in models.items():
            for p in model.parameters():
                p.grad = None  # outside the timed region: gradient accumulation is not timed
            harness.synchronize(device)
            t0 = time.perf_counter()
            loss = _loss(model, inputs)
            harness.synchronize(device)
            t1 = time.perf_counter()
            loss.backward()
            harness.synchronize(device)
            t2 = time.perf_counter()
            if round_ >= warmup:
                phases[name].append((1e3 * (t1 - t0), 1e3 * (t2 - t1)))
    times = {}
    for name, steps in phases.items():
        fwd, bwd = zip(*steps)
        total = statistics.median(f + b for f, b in steps)
        times[name] = harness.StepTimes(statistics.median(fwd), statistics.median(bwd), total, reps, None)
    return times


def profile_step(contender: str, config: StepConfig = CONFIG, device: torch.device | None = None, top: int = 15) -> str:
    """torch.profiler's table of the ``top`` ops by self CPU time over one step (after one warm-up step)."""
    device = device or torch.device("cpu")
    model, inputs = build(contender, config, device)
    _loss(model, inputs).backward()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _loss(model, inputs).backward()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def run(
    contenders: tuple[str, ...] = tuple(BY_NAME),
    config: StepConfig = CONFIG,
    device: torch.device | None = None,
    *,
    warmup: int = 1,
    reps: int = 5,
    log: Callable[[str], None] = lambda line: None,
) -> dict:
    """Memory (and, unless ``reps`` is 0, time) of every contender; a dict ready for JSON and :func:`markdown`."""
    device = device or torch.device("cpu")
    rows = []
    for name in contenders:
        start = time.perf_counter()
        rows.append(dataclasses.asdict(measure_memory(name, config, device)))
        log(f"{name}: memory measured in {time.perf_counter() - start:.1f} s")
    if reps:
        start = time.perf_counter()
        times = measure_times(contenders, config, device, warmup=warmup, reps=reps)
        for row in rows:
            t = times[row["contender"]]
            row.update(fwd_ms=t.fwd_ms, bwd_ms=t.bwd_ms, step_ms=t.total_ms, reps=t.reps)
        log(f"timed {reps} steps per contender in {time.perf_counter() - start:.1f} s")
    plain = next((r for r in rows if r["contender"] == "plain"), None)
    for row in rows:
        row["activation_ratio"] = row["activation_bytes"] / plain["activation_bytes"] if plain else None
        step, base = row.get("step_ms"), plain.get("step_ms") if plain else None
        row["time_ratio"] = step / base if step and base else None
    meta = harness.environment(device)
    meta.update(config=dataclasses.asdict(config), described=config.describe(), threads=torch.get_num_threads())
    meta["backend"] = "triton" if device.type == "cuda" else "torch path"
    return {"meta": meta, "results": rows}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _btv_cell(row: dict) -> str:
    if not (row["btv_saved"] or row["btv_created"]):
        return "none"
    first = (row["btv_saved"] or row["btv_created"])[0]
    return f"yes: {len(row['btv_saved'])} saved, {len(row['btv_created'])} created (e.g. {first})"


def markdown(report: dict) -> str:
    """The report as a README-ready markdown section: the table, then where the numbers come from and what they
    count."""
    meta, rows = report["meta"], report["results"]
    cpu = meta["device_type"] != "cuda"
    lines = [
        (
            "| contender | saved activations | ratio to plain | largest saved tensor | B x T x V tensor? "
            f"| parameters saved (not counted) | peak step memory | {'CPU ' if cpu else ''}step ms (fwd + bwd) "
            "| time ratio |"
        ),
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        offloaded = f" (+ {_mb(row['offloaded_bytes'])} on host)" if row["offloaded_bytes"] else ""
        step = row.get("step_ms")
        timing = f"{step:.0f} ({row['fwd_ms']:.0f} + {row['bwd_ms']:.0f})" if step else "-"
        lines.append(
            f"| {BY_NAME[row['contender']].label} | {_mb(row['activation_bytes'])}{offloaded} "
            f"| {_fmt(row['activation_ratio'], '.1%')} | {row['largest_saved']} | {_btv_cell(row)} "
            f"| {_mb(row['parameter_bytes'])} | {_mb(row['peak_step_bytes'])} | {timing} "
            f"| {_fmt(row['time_ratio'], '.2f')} |"
        )
    reps = next((row["reps"] for row in rows if row.get("reps")), None)
    peak = "torch.profiler's allocator events" if cpu else "CUDA max_memory_allocated"
    notes = [
        "",
        f"{meta['described']}. {meta['device']}, torch {meta['torch']}, fastft on its {meta['backend']}; {meta['date']}.",
        "",
        (
            "Saved activations: the bytes autograd keeps for backward on the device, each storage once "
            "(fastft.utils.memory.SavedTensorMeter). Parameters that ops save (frozen base weights kept by F.linear, "
            "LoRA A and B) are no extra memory: they are listed apart and excluded on every side. Offloaded "
            "checkpointing parks one hidden-states tensor per decoder layer in host memory, shown apart (on a CPU "
            "the decoder layers' saved inputs). B x T x V: any tensor with at least batch x seq x vocab elements "
            "saved, or created by any op in forward or backward, other than a parameter. Peak step memory: the most "
            f"the step's own allocations held at once ({peak})."
        ),
    ]
    if reps:
        notes[-1] += (
            f" Step time: median of {reps} steps after a warm-up, contenders taking turns step by step; "
            "time ratio = contender / plain (> 1: slower than plain)."
        )
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results (and where they come from) to this file")
    parser.add_argument("--markdown", action="store_true", help="print the README-ready markdown section")
    parser.add_argument("--contenders", default=",".join(BY_NAME), help=f"subset of {','.join(BY_NAME)}")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per contender (0: memory only)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--seq", type=int, default=CONFIG.seq, help="tokens per sequence (a smoke run may cut it)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops per contender")
    args = parser.parse_args(argv)
    contenders = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    unknown = sorted(set(contenders) - set(BY_NAME))
    if unknown:
        parser.error(f"--contenders: unknown {unknown}; choose from {', '.join(BY_NAME)}")
    if _dispatch.triton_interpreted():
        raise RuntimeError("fastft was imported with TRITON_INTERPRET=1; unset it before running the benchmark.")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dataclasses.replace(CONFIG, seq=args.seq)
    log = lambda line: print(line, file=sys.stderr, flush=True)
    report = run(contenders, config, device, warmup=args.warmup, reps=args.reps, log=log)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        print(markdown(report))
    else:
        for row in report["results"]:
            print(
                f"{row['contender']}: activations {_mb(row['activation_bytes'])} "
                f"({_fmt(row['activation_ratio'], '.1%')} of plain), offloaded {_mb(row['offloaded_bytes'])}, "
                f"B x T x V tensors {len(row['btv_saved']) + len(row['btv_created'])}, "
                f"step {_fmt(row.get('step_ms'), '.0f')} ms ({_fmt(row['time_ratio'], '.2f')}x plain)"
            )
    if args.profile:
        for name in contenders:
            print(f"\n## {name}: top ops by self time over one step\n\n```\n{profile_step(name, config, device)}```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
