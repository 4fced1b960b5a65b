"""Kernel benchmarks: every public fastft kernel against the PyTorch formula, torch.compile and Liger Kernel.

For each kernel, forward, backward and forward+backward of one training step are timed at the audit shapes
(Llama-3-8B at 8192 tokens in bf16, Gemma's 262144 vocabulary for cross-entropy; see :mod:`fastft.bench.shapes`) for
four contenders:

- ``fastft``: the public function (``fastft.kernels.rms_norm`` ...);
- ``pytorch``: its ``*_reference``, the plain PyTorch formula autograd differentiates;
- ``torch.compile``: the same reference through ``torch.compile``;
- ``liger``: Liger Kernel's equivalent, when ``import liger_kernel`` works (otherwise "not installed").

Achieved bandwidth is the kernel's bytes model (``min_bytes`` of the kernel module's ``audit_cases()``, the
fewest bytes the launch must move: the same yardstick for every contender) over the measured time, also as
a fraction of the device's copy bandwidth (a 1 GiB device-to-device copy, measured once per run). The
fused linear cross-entropy is matmul-bound and has no bytes model; it reports TFLOP/s instead.

Without a GPU everything runs on the CPU at reduced shapes, fastft on its torch path, and every number is
labelled a CPU number; Liger Kernel (CUDA only) is skipped.

Three ways to run it:

- ``python benchmarks/kernels.py --out DIR``: everything once, no pytest, writes ``DIR/kernels.json`` and
  ``DIR/kernels.md`` (device, date, versions, per kernel and contender: times, GB/s, fraction of copy
  bandwidth, peak memory, fastft's speedup). Made for a session with a GPU: it stays under four minutes by
  running torch.compile (the slow part: compilation) last and skipping what remains of it once
  ``--budget-s`` has passed. A contender that fails is recorded with its error, never a crash.
- ``pytest benchmarks/kernels.py --benchmark-only``: one pytest-benchmark test per kernel, contender and
  phase (ids ``cuda-rms_norm-fastft-fwd``; ``cpu-...`` without a GPU), defined in ``benchmarks/kernels.py``.
- :func:`run_all` from code: the ``kernels`` part of the one-shot GPU suite (:mod:`fastft.bench.gpu`).

Run it with ``TRITON_INTERPRET`` unset: interpreted kernels are for correctness, not timing (:func:`main`
refuses them; ``benchmarks/kernels.py`` removes the variable before fastft is imported).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastft.bench import harness, shapes
from fastft.kernels import _dispatch

CONTENDERS = ("fastft", "pytorch", "torch.compile", "liger")
ACCURACY_CONTENDERS = ("fastft", "pytorch")  # the accuracy pass: fastft against what users run today
PHASES = ("fwd", "bwd", "fwdbwd")


class Unavailable(Exception):
    """A contender that cannot run here: ``status`` is "not installed" or "skipped", the message says why."""

    def __init__(self, reason: str, status: str = "skipped") -> None:
        super().__init__(reason)
        self.status = status


# ----------------------------------------------------------------------------------------------------
# What is benchmarked
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelBench:
    """One public kernel at one configuration, and how each contender calls it.

    Every contender is called as ``impl(*[inputs[name] for name in args], **kwargs)``; Liger with its own
    keyword arguments. ``fwd_case`` / ``bwd_case`` name the ``audit_cases()`` entries whose ``min_bytes`` is
    the bytes model of the forward / backward launch.
    """

    name: str
    module: str  # fastft.kernels.<module> defines the public function <module> and <module>_reference
    build: Callable[..., dict]  # (device, tokens=None) -> inputs; None: the benchmark's token count
    args: tuple[str, ...]
    shape: str
    tokens: int = shapes.LLAMA3_8B.tokens  # the benchmark's token count: its bytes model scales with it
    kwargs: dict = field(default_factory=dict)
    liger: str | None = None  # a function of liger_kernel.transformers.functional
    liger_kwargs: dict = field(default_factory=dict)
    fwd_case: str | None = None
    bwd_case: str | None = None
    compile_reason: str | None = None  # why torch.compile of the reference is not a contender (None: it is)

    def call(self, impl: Callable, inputs: dict, kwargs: dict | None = None) -> object:
        return impl(*[inputs[name] for name in self.args], **(self.kwargs if kwargs is None else kwargs))


def _on(device: torch.device, tokens: int | None = None, *, shape: shapes.ModelShape, builder: Callable, **kw) -> dict:
    return builder(dataclasses.replace(shape, tokens=tokens or shape.tokens), device, **kw)


def benches(device: torch.device, tokens: int | None = None) -> list[KernelBench]:
    """Every benchmarked kernel at the shapes for ``device`` (``shapes.shape_for``), at ``tokens`` tokens if given."""
    s = shapes.shape_for(device)
    head = shapes.LLAMA3_8B if device.type == "cuda" else shapes.CPU_SMALL_HEAD
    if tokens is not None:
        s, head = dataclasses.replace(s, tokens=tokens), dataclasses.replace(head, tokens=tokens)
    gemma = {"softcap": shapes.GEMMA_SOFTCAP}
    on = functools.partial(_on, shape=s)
    return [
        KernelBench(
            name="rms_norm",
            tokens=s.tokens,
            module="rms_norm",
            build=functools.partial(on, builder=shapes.rms_norm_inputs),
            args=("x", "weight"),
            shape=f"x ({s.tokens}, {s.hidden}) bf16, trainable weight",
            kwargs={"eps": 1e-6},
            liger="liger_rms_norm",
            liger_kwargs={"eps": 1e-6},
            fwd_case="rms_norm_forward_llama3_8b",
            bwd_case="rms_norm_backward_llama3_8b",
        ),
        KernelBench(
            name="rms_norm_gated",
            tokens=s.tokens,
            module="rms_norm_gated",
            build=functools.partial(on, builder=shapes.rms_norm_gated_inputs),
            args=("x", "gate", "weight"),
            shape=(
                f"x, gate ({s.tokens}, {s.n_heads}, {s.head_dim}) bf16, trainable weight ({s.head_dim},): "
                "Qwen3-Next's per-head norm * silu(gate); no Liger equivalent"
            ),
            kwargs={"eps": 1e-6},
            fwd_case="rms_norm_gated_forward_qwen3_next",
            bwd_case="rms_norm_gated_backward_qwen3_next",
        ),
        KernelBench(
            name="layer_norm",
            tokens=s.tokens,
            module="layer_norm",
            build=functools.partial(on, builder=shapes.layer_norm_inputs),
            args=("x", "weight", "bias"),
            shape=f"x ({s.tokens}, {s.hidden}) bf16, trainable weight and bias",
            kwargs={"eps": 1e-5},
            liger="liger_layer_norm",
            liger_kwargs={"eps": 1e-5},
            fwd_case="layer_norm_forward_h4096",
            bwd_case="layer_norm_backward_h4096",
        ),
        KernelBench(
            name="rope",
            tokens=s.tokens,
            module="rope",
            build=functools.partial(on, builder=shapes.rope_inputs),
            args=("q", "k", "cos", "sin"),
            shape=f"q (1, {s.n_heads}, {s.tokens}, {s.head_dim}), k {s.n_kv_heads} heads, bf16, transposed views",
            liger="liger_rope",
            fwd_case="rope_forward",
            bwd_case="rope_backward",
        ),
        KernelBench(
            name="rope_interleaved",
            tokens=s.tokens,
            module="rope_interleaved",
            build=functools.partial(on, builder=shapes.rope_interleaved_inputs),
            args=("q", "k", "cos", "sin"),
            shape=(
                f"q (1, {s.n_heads}, {s.tokens}, {s.head_dim}), k {s.n_kv_heads} heads, bf16, transposed views, "
                f"pairs (2i, 2i+1) of the first {s.head_dim // 2} columns rotated (GLM-4); no Liger equivalent"
            ),
            fwd_case="rope_interleaved_forward",
            bwd_case="rope_interleaved_backward",
        ),
        KernelBench(
            name="swiglu",
            tokens=s.tokens,
            module="swiglu",
            build=functools.partial(on, builder=shapes.gated_mlp_inputs),
            args=("gate", "up"),
            shape=f"gate, up ({s.tokens}, {s.intermediate}) bf16",
            liger="liger_swiglu",
            fwd_case="swiglu_forward",
            bwd_case="swiglu_backward",
        ),
        KernelBench(
            name="geglu:tanh",
            tokens=s.tokens,
            module="geglu",
            build=functools.partial(on, builder=shapes.gated_mlp_inputs),
            args=("gate", "up"),
            shape=f"gate, up ({s.tokens}, {s.intermediate}) bf16, tanh approximation",
            kwargs={"approximate": "tanh"},
            liger="liger_geglu",
            fwd_case="geglu_forward[tanh]",
            bwd_case="geglu_backward[tanh]",
        ),
        KernelBench(
            name="activation:gelu_tanh",
            tokens=s.tokens,
            module="activation",
            build=functools.partial(on, builder=shapes.ungated_mlp_inputs),
            args=("x",),
            shape=f"u ({s.tokens}, {s.intermediate}) bf16, tanh GELU of a non-gated MLP (GPT-2, Phi, StarCoder2); "
            "no Liger equivalent",
            kwargs={"activation": "gelu_tanh"},
            fwd_case="activation_forward[gelu_tanh]",
            bwd_case="activation_backward[gelu_tanh]",
        ),
        KernelBench(
            name="activation:relu2",
            tokens=s.tokens,
            module="activation",
            build=functools.partial(on, builder=shapes.ungated_mlp_inputs),
            args=("x",),
            shape=f"u ({s.tokens}, {s.intermediate}) bf16, relu(u)^2 (Nemotron); no Liger equivalent",
            kwargs={"activation": "relu2"},
            fwd_case="activation_forward[relu2]",
            bwd_case="activation_backward[relu2]",
        ),
        KernelBench(
            name="activation:quick_gelu",
            tokens=s.tokens,
            module="activation",
            build=functools.partial(on, builder=shapes.ungated_mlp_inputs),
            args=("x",),
            shape=f"u ({s.tokens}, {s.intermediate}) bf16, u sigmoid(1.702 u) (CLIP / Qwen2-VL vision MLPs); "
            "no Liger equivalent",
            kwargs={"activation": "quick_gelu"},
            fwd_case="activation_forward[quick_gelu]",
            bwd_case="activation_backward[quick_gelu]",
        ),
        KernelBench(
            name="cross_entropy:llama3",
            tokens=s.tokens,
            module="cross_entropy",
            build=functools.partial(on, builder=shapes.cross_entropy_inputs),
            args=("logits", "labels"),
            shape=f"logits ({s.tokens}, {s.vocab}) bf16",
            liger="liger_cross_entropy",
            fwd_case="cross_entropy_forward_llama3",
            bwd_case="cross_entropy_backward_llama3",
        ),
        KernelBench(
            name="cross_entropy:gemma",
            tokens=s.tokens,
            module="cross_entropy",
            build=functools.partial(on, builder=shapes.cross_entropy_inputs, vocab=shapes.GEMMA_VOCAB),
            args=("logits", "labels"),
            shape=f"logits ({s.tokens}, {shapes.GEMMA_VOCAB}) bf16, softcap {shapes.GEMMA_SOFTCAP:g}",
            kwargs=gemma,
            liger="liger_cross_entropy",
            liger_kwargs=gemma,
            fwd_case="cross_entropy_forward_gemma",
            bwd_case="cross_entropy_backward_gemma",
        ),
        KernelBench(
            name="fused_linear_cross_entropy:lora",
            tokens=s.tokens,
            module="fused_linear_cross_entropy",
            build=lambda d, tokens=None: shapes.fused_linear_cross_entropy_inputs(
                dataclasses.replace(head, tokens=tokens or head.tokens), d
            ),
            args=("hidden", "weight", "labels"),
            shape=f"hidden ({head.tokens}, {head.hidden}) bf16, frozen head ({head.vocab}, {head.hidden})",
            liger="liger_fused_linear_cross_entropy",
        ),
        _moe_bench(device, tokens),
    ]


def _moe_bench(device: torch.device, tokens: int | None) -> KernelBench:
    """Routed experts of one Qwen3-30B-A3B layer (16 experts on a CPU), full fine-tuning; matmul-bound: TFLOP/s."""
    from fastft.bench import moe_shapes

    moe = moe_shapes.QWEN3_30B_A3B if device.type == "cuda" else moe_shapes.CPU_QWEN3
    moe = dataclasses.replace(moe, tokens=tokens or moe.tokens)
    return KernelBench(
        name="moe_experts:qwen3_30b_a3b",
        tokens=moe.tokens,
        module="moe_experts",
        build=lambda d, tokens=None: moe_shapes.moe_inputs(dataclasses.replace(moe, tokens=tokens or moe.tokens), d),
        args=("hidden", "top_k_index", "top_k_weights", "gate_up", "down"),
        shape=(
            f"hidden ({moe.tokens}, {moe.hidden}) bf16, {moe.experts} experts x (2x{moe.intermediate}, {moe.hidden}) "
            f"trainable, top-{moe.top_k}; pytorch = the expert loop of transformers' eager experts"
        ),
        kwargs=moe_shapes.moe_kwargs(moe),
        compile_reason="the reference's expert loop is data-dependent (torch.compile breaks and recompiles per expert)",
    )


# ----------------------------------------------------------------------------------------------------
# Bytes model: the kernels' own audit cases
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _audit_min_bytes(module: str) -> dict[str, int]:
    cases = importlib.import_module(f"fastft.kernels.{module}").audit_cases()
    return {case.name: case.min_bytes for case in cases}


def bytes_model(bench: KernelBench, case: str | None) -> int | None:
    """``min_bytes`` of the audit case at the benchmark's shape, or None without one.

    The audit cases are at the GPU shape (8192 tokens). Every audited kernel's traffic is proportional to
    the token count at fixed widths, so at a reduced token count (a CPU, a dry run) the model is scaled by it
    (up to per-launch constants such as a weight vector, small against the rest).
    """
    if case is None:
        return None
    try:
        min_bytes = _audit_min_bytes(bench.module).get(case)
    except Exception:  # noqa: BLE001 - a module that cannot build its cases has no model here
        return None
    if not min_bytes:
        return None
    return round(min_bytes * bench.tokens / shapes.LLAMA3_8B.tokens)


# ----------------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------------


def _liger_functional():
    try:
        return importlib.import_module("liger_kernel.transformers.functional")
    except ImportError as exc:
        raise Unavailable(f"{exc}; pip install liger-kernel", status="not installed") from None


@functools.cache
def _compiled(bench_name: str, device_type: str) -> Callable:
    bench = next(b for b in benches(torch.device(device_type)) if b.name == bench_name)
    reference = getattr(importlib.import_module(f"fastft.kernels.{bench.module}"), f"{bench.module}_reference")
    return torch.compile(functools.partial(reference, **bench.kwargs), dynamic=False)


def implementation(bench: KernelBench, contender: str, device: torch.device) -> Callable[[dict], object]:
    """``inputs -> outputs`` for ``contender``; raises :class:`Unavailable` when it cannot run here."""
    module = importlib.import_module(f"fastft.kernels.{bench.module}")
    if contender == "fastft":
        fn = getattr(module, bench.module)
        return lambda inputs: bench.call(fn, inputs)
    if contender == "pytorch":
        fn = getattr(module, f"{bench.module}_reference")
        return lambda inputs: bench.call(fn, inputs)
    if contender == "torch.compile":
        if bench.compile_reason:
            raise Unavailable(bench.compile_reason)
        compiled = _compiled(bench.name, device.type)
        return lambda inputs: bench.call(compiled, inputs, kwargs={})
    if contender == "liger":
        if bench.liger is None:
            raise Unavailable("no Liger equivalent")
        functional = _liger_functional()
        if device.type != "cuda":
            raise Unavailable("Liger Kernel runs on CUDA only")
        fn = getattr(functional, bench.liger, None)
        if fn is None:
            raise Unavailable(f"this liger-kernel has no {bench.liger}")
        return lambda inputs: bench.call(fn, inputs, kwargs=bench.liger_kwargs)
    raise ValueError(f"contender must be one of {CONTENDERS}, got {contender!r}")


# ----------------------------------------------------------------------------------------------------
# One measurement
# ----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One kernel x contender: status, median times per phase and what they mean against the models."""

    kernel: str
    contender: str
    device_type: str
    shape: str
    status: str = "ok"  # ok | not installed | skipped | failed
    reason: str = ""
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    total_ms: float | None = None
    reps: int = 0
    peak_extra_bytes: int | None = None
    fwd_bytes: int | None = None
    bwd_bytes: int | None = None
    flops: int | None = None
    gbps: dict = field(default_factory=dict)  # phase -> GB/s of the bytes model
    copy_fraction: dict = field(default_factory=dict)  # phase -> GB/s / copy GB/s
    tflops: float | None = None
    speedup: dict = field(default_factory=dict)  # phase -> this contender's time / fastft's time
    errors: dict = field(default_factory=dict)  # output or gradient -> max |value - float64| (accuracy pass)

    def ms(self, phase: str) -> float | None:
        return {"fwd": self.fwd_ms, "bwd": self.bwd_ms, "fwdbwd": self.total_ms}[phase]


def _flops(inputs: dict) -> int | None:
    if "top_k_index" in inputs:  # routed experts: fwd + bwd GEMMs of fastft's implementation
        from fastft.kernels.moe_experts import bytes_and_flops

        (t, h), (e, i2, _), k = inputs["hidden"].shape, inputs["gate_up"].shape, inputs["top_k_index"].shape[1]
        model = bytes_and_flops(t, h, i2 // 2, e, k, full=inputs["gate_up"].requires_grad)
        return model["fwd_flops"] + model["bwd_flops"]
    if "weight" in inputs and "hidden" in inputs:  # linear cross-entropy: 2NVH per GEMM
        n, h = inputs["hidden"].shape
        v = inputs["weight"].shape[0]
        gemms = 2 + bool(inputs["weight"].requires_grad)  # logits, grad_hidden (+ grad_weight)
        return 2 * n * v * h * gemms
    return None


ACCURACY_TOKENS = 256  # on a GPU the accuracy pass runs the benchmark's widths at this many tokens (float64 is big)


def accuracy(bench: KernelBench, impl: Callable[[dict], object], device: torch.device) -> dict[str, float]:
    """Max |value - float64| of every output and gradient of ``impl``, at ``ACCURACY_TOKENS`` tokens on a GPU.

    The oracle is the kernel's ``*_reference`` run in float64 on the same inputs with the same upstream
    gradients. Run for fastft and the plain PyTorch formula, it shows on the benchmark's own device (for
    fastft on a GPU: the compiled kernels, which the CPU tests only check interpreted) that fastft is no
    less accurate than what users run today.
    """
    inputs = bench.build(device, ACCURACY_TOKENS if device.type == "cuda" else None)
    names = [k for k, t in inputs.items() if t.requires_grad]

    def run(fn: Callable[[dict], object], cast: torch.dtype | None, upstream: list | None):
        leaves = {
            k: (t.detach().to(cast) if cast is not None and t.is_floating_point() else t.detach()).requires_grad_(
                t.requires_grad
            )
            for k, t in inputs.items()
        }
        outs = harness.as_tuple(fn(leaves))
        upstream = upstream or harness.make_grad_outputs(outs)
        grads = torch.autograd.grad(outs, [leaves[k] for k in names], [u.to(o.dtype) for u, o in zip(upstream, outs)])
        return outs, grads, upstream

    outs, grads, upstream = run(impl, None, None)
    module = importlib.import_module(f"fastft.kernels.{bench.module}")
    reference = getattr(module, f"{bench.module}_reference")
    exact_outs, exact_grads, _ = run(lambda i: bench.call(reference, i), torch.float64, upstream)
    errors = {}
    for i, (o, e) in enumerate(zip(outs, exact_outs)):
        errors[f"out{i if len(outs) > 1 else ''}"] = (o.double() - e).abs().max().item() if o.numel() else 0.0
    for name, g, e in zip(names, grads, exact_grads):
        errors[f"d {name}"] = (g.double() - e).abs().max().item() if g.numel() else 0.0
    return errors


def measure(bench: KernelBench, contender: str, device: torch.device, target_s: float = 0.5) -> Result:
    """Time one contender on freshly built inputs; never raises (the status says what happened)."""
    result = Result(bench.name, contender, device.type, bench.shape)
    inputs = None
    try:
        impl = implementation(bench, contender, device)
        inputs = bench.build(device)
        leaves = [t for t in inputs.values() if t.requires_grad]
        times = harness.time_training_step(lambda: impl(inputs), leaves, device, target_s=target_s)
        result.fwd_ms, result.bwd_ms, result.total_ms = times.fwd_ms, times.bwd_ms, times.total_ms
        result.reps, result.peak_extra_bytes = times.reps, times.peak_extra_bytes
        result.flops = _flops(inputs)
        inputs = None
        if contender in ACCURACY_CONTENDERS:
            result.errors = accuracy(bench, impl, device)
    except Unavailable as exc:
        result.status, result.reason = exc.status, str(exc)
    except Exception as exc:  # noqa: BLE001 - recorded in the result, the run goes on
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"[:500]
    finally:
        inputs = None  # free the (GPU) inputs before the next contender builds its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result.fwd_bytes = bytes_model(bench, bench.fwd_case)
    result.bwd_bytes = bytes_model(bench, bench.bwd_case)
    return result


def annotate(results: list[Result], copy_bytes_per_s: float) -> None:
    """Fill in GB/s, fraction of copy bandwidth, TFLOP/s and fastft's speedup over each contender."""
    fastft = {r.kernel: r for r in results if r.contender == "fastft" and r.status == "ok"}
    for r in results:
        if r.status != "ok":
            continue
        phase_bytes = {
            "fwd": r.fwd_bytes,
            "bwd": r.bwd_bytes,
            "fwdbwd": r.fwd_bytes + r.bwd_bytes if r.fwd_bytes and r.bwd_bytes else None,
        }
        for phase, n_bytes in phase_bytes.items():
            if n_bytes and r.ms(phase):
                r.gbps[phase] = n_bytes / (r.ms(phase) / 1e3) / 1e9
                r.copy_fraction[phase] = r.gbps[phase] * 1e9 / copy_bytes_per_s
        if r.flops and r.total_ms:
            r.tflops = r.flops / (r.total_ms / 1e3) / 1e12
        base = fastft.get(r.kernel)
        if base is not None:
            r.speedup = {p: r.ms(p) / base.ms(p) for p in PHASES if r.ms(p) and base.ms(p)}


# ----------------------------------------------------------------------------------------------------
# Script mode
# ----------------------------------------------------------------------------------------------------


def run_all(
    device: torch.device,
    kernels: list[str] | None,
    contenders: tuple[str, ...],
    budget_s: float,
    target_s: float,
    log: Callable[[str], object] = print,
    *,
    tokens: int | None = None,
    on_result: Callable[[Result], object] | None = None,
) -> list[Result]:
    """Every bench x contender once; torch.compile last, skipped once ``budget_s`` has passed.

    ``kernels`` selects by bench or module name (None: all); ``tokens`` overrides the token count of every
    bench (the GPU suite's dry run uses a handful); ``on_result`` sees each result as it is made (the GPU suite
    saves partial results with it, so a run killed at its time budget keeps what it measured).
    """
    start = time.perf_counter()
    selected = [b for b in benches(device, tokens) if not kernels or b.name in kernels or b.module in kernels]
    results = []
    order = [c for c in contenders if c != "torch.compile"] + (
        ["torch.compile"] if "torch.compile" in contenders else []
    )
    for contender in order:
        for bench in selected:
            elapsed = time.perf_counter() - start
            if contender == "torch.compile" and elapsed > budget_s:
                r = Result(
                    bench.name,
                    contender,
                    device.type,
                    bench.shape,
                    status="skipped",
                    reason=f"time budget: {elapsed:.0f} s of --budget-s {budget_s:.0f} spent before it",
                )
            else:
                r = measure(bench, contender, device, target_s=target_s)
            log(
                f"[{time.perf_counter() - start:6.1f} s] {bench.name:34s} {contender:14s} {r.status:13s} "
                + (f"fwd {r.fwd_ms:.3f} ms  bwd {r.bwd_ms:.3f} ms" if r.status == "ok" else r.reason)
            )
            results.append(r)
            if on_result is not None:
                on_result(r)
    order_index = {c: i for i, c in enumerate(CONTENDERS)}
    bench_index = {b.name: i for i, b in enumerate(selected)}
    results.sort(key=lambda r: (bench_index[r.kernel], order_index[r.contender]))
    return results


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _fmt_rate(x: float | None) -> str:
    # GB/s and TFLOP/s: whole numbers on a GPU, three significant digits for the small CPU numbers.
    return "-" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.3g}")


def markdown(meta: dict, results: list[Result]) -> str:
    """The report as markdown: a header on where the numbers come from, then one table per kernel."""
    cpu = meta["device_type"] != "cuda"
    lines = [
        "# fastft kernel benchmarks" + (" (CPU numbers)" if cpu else ""),
        "",
        f"- device: {meta['device']}; {meta['date']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, Python {meta['python']}",
        f"- copy bandwidth: {meta['copy_gbps']:.0f} GB/s ({meta['copy_note']})",
        (
            f"- times: median of each phase over the repetitions ({meta['timer']}); GB/s = the kernel's bytes model "
            "(min_bytes of its audit case) / time; speedup = contender time / fastft time (> 1: fastft is faster)"
        ),
        f"- total run time: {meta['seconds']:.0f} s",
    ]
    if cpu:
        lines.append(
            "- **CPU numbers**: no GPU here. fastft runs its torch path, at reduced shapes "
            "(bytes models scaled by the token count); Liger Kernel is skipped. Not a GPU result."
        )
    kernels = list(dict.fromkeys(r.kernel for r in results))
    for kernel in kernels:
        rows = [r for r in results if r.kernel == kernel]
        first = rows[0]
        model = (
            f"bytes model fwd {_human_bytes(first.fwd_bytes)}, bwd {_human_bytes(first.bwd_bytes)}"
            if first.fwd_bytes
            else "no bytes model (matmul-bound): TFLOP/s instead"
        )
        lines += [
            "",
            f"## {kernel}",
            "",
            f"{first.shape}; {model}",
            "",
            (
                "| contender | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd GB/s | of copy bw | TFLOP/s | peak extra MB | "
                "fastft speedup fwd / bwd / total | status |"
            ),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for r in rows:
            speed = " / ".join(_fmt(r.speedup.get(p), ".2f") + "x" if p in r.speedup else "-" for p in PHASES)
            status = r.status if r.status == "ok" else f"{r.status}: {r.reason}".replace("|", "/")
            peak = None if r.peak_extra_bytes is None else r.peak_extra_bytes / 1e6
            lines.append(
                f"| {r.contender} | {_fmt(r.fwd_ms)} | {_fmt(r.bwd_ms)} | {_fmt(r.total_ms)} | "
                f"{_fmt_rate(r.gbps.get('fwdbwd'))} | {_fmt(r.copy_fraction.get('fwdbwd'), '.0%')} | "
                f"{_fmt_rate(r.tflops)} | {_fmt(peak, '.0f')} | "
                f"{speed if r.contender != 'fastft' else ''} | {status} |"
            )
        ours = next((r.errors for r in rows if r.contender == "fastft" and r.errors), None)
        theirs = next((r.errors for r in rows if r.contender == "pytorch" and r.errors), None)
        if ours and theirs:
            lines += ["", _accuracy_line(ours, theirs, cpu)]
    return "\n".join(lines) + "\n"


def _accuracy_line(ours: dict[str, float], theirs: dict[str, float], cpu: bool) -> str:
    """fastft's and the PyTorch formula's max |error| against float64, output by output."""
    tokens = "the benchmark's" if cpu else str(ACCURACY_TOKENS)
    parts = [f"{name} {ours[name]:.2e} vs {theirs.get(name, float('nan')):.2e}" for name in ours]
    return f"Accuracy, max abs error vs float64 at {tokens} tokens (fastft vs PyTorch formula): " + "; ".join(parts)


def _human_bytes(n: int | None) -> str:
    from fastft.kernels.audit import human_bytes

    return "-" if n is None else human_bytes(n)


def check_not_interpreted() -> None:
    """Raise ``RuntimeError`` when fastft's kernels would run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if _dispatch.triton_interpreted():
        raise RuntimeError(
            "fastft was imported with TRITON_INTERPRET=1: its kernels would run interpreted. "
            "Unset TRITON_INTERPRET before starting the benchmarks."
        )


def main(argv: list[str] | None = None, prog: str = "python benchmarks/kernels.py") -> int:
    """Script mode: measure, write ``--out``/kernels.json and kernels.md, print the report; 1 if fastft failed."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for kernels.json and kernels.md")
    parser.add_argument(
        "--kernels",
        help="comma-separated subset, e.g. rms_norm,cross_entropy:gemma (a module name selects all its entries)",
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=150.0,
        help="start no torch.compile contender after this many seconds (default 150)",
    )
    parser.add_argument("--target-s", type=float, default=0.5, help="seconds of timed repetitions per contender")
    args = parser.parse_args(argv)
    contenders = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    check_not_interpreted()

    start = time.perf_counter()
    device = shapes.default_device()
    meta = harness.environment(device)
    if device.type != "cuda":
        print("no GPU: CPU numbers, torch path at reduced shapes", file=sys.stderr)
    copy = harness.copy_bandwidth(str(device))
    meta.update(
        copy_gbps=copy / 1e9,
        timer="CUDA events" if device.type == "cuda" else "time.perf_counter",
        copy_note=(
            "1 GiB device-to-device copy, read + write" if device.type == "cuda" else "128 MiB host copy, read + write"
        ),
    )
    kernels = [k.strip() for k in args.kernels.split(",")] if args.kernels else None
    results = run_all(
        device,
        kernels,
        contenders,
        args.budget_s,
        args.target_s,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    annotate(results, copy)
    meta["seconds"] = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": [dataclasses.asdict(r) for r in results]}
    (args.out / "kernels.json").write_text(json.dumps(payload, indent=1))
    report = markdown(meta, results)
    (args.out / "kernels.md").write_text(report)
    print(report)
    failed = [f"{r.kernel}/{r.contender}" for r in results if r.status == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)} (recorded in kernels.json)", file=sys.stderr)
    return 1 if any(r.contender == "fastft" and r.status == "failed" for r in results) else 0
