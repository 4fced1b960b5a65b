"""Kernel benchmarks: every public fastft kernel against the PyTorch formula, torch.compile and Liger Kernel.

For each kernel, forward, backward and forward+backward of one training step are timed at the audit shapes
(Llama-3-8B at 8192 tokens in bf16, Gemma's 262144 vocabulary for cross-entropy; see ``shapes.py``) for
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

Two ways to run it:

- ``pytest benchmarks/kernels.py --benchmark-only``: one pytest-benchmark test per kernel, contender and
  phase (ids ``cuda-rms_norm-fastft-fwd``; ``cpu-...`` without a GPU). pytest-benchmark's own table is
  wall-clock around a synchronised call; ``extra_info`` holds the CUDA-event medians (``median_ms``), GB/s, fraction of copy bandwidth and speedups.
- ``python benchmarks/kernels.py --out DIR``: everything once, no pytest, writes ``DIR/kernels.json`` and
  ``DIR/kernels.md`` (device, date, versions, per kernel and contender: times, GB/s, fraction of copy
  bandwidth, peak memory, fastft's speedup). Made for a session with a GPU: it stays under four minutes by
  running torch.compile (the slow part: compilation) last and skipping what remains of it once
  ``--budget-s`` has passed. A contender that fails is recorded with its error, never a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):  # python benchmarks/kernels.py: make the repository importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        # Interpreted kernels are for correctness, not timing; fastft reads the variable when imported (below).
        print("benchmarks/kernels.py: ignoring TRITON_INTERPRET (benchmarks time compiled kernels)", file=sys.stderr)
        del os.environ["TRITON_INTERPRET"]

import torch

from benchmarks import harness, shapes
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
    kwargs: dict = field(default_factory=dict)
    liger: str | None = None  # a function of liger_kernel.transformers.functional
    liger_kwargs: dict = field(default_factory=dict)
    fwd_case: str | None = None
    bwd_case: str | None = None

    def call(self, impl: Callable, inputs: dict, kwargs: dict | None = None) -> object:
        return impl(*[inputs[name] for name in self.args], **(self.kwargs if kwargs is None else kwargs))


def _on(device: torch.device, tokens: int | None = None, *, builder: Callable, **kw) -> dict:
    shape = shapes.shape_for(device)
    return builder(dataclasses.replace(shape, tokens=tokens or shape.tokens), device, **kw)


def _benches(device: torch.device) -> list[KernelBench]:
    s = shapes.shape_for(device)
    head = shapes.LLAMA3_8B if device.type == "cuda" else shapes.CPU_SMALL_HEAD
    gemma = {"softcap": shapes.GEMMA_SOFTCAP}
    return [
        KernelBench(
            name="rms_norm",
            module="rms_norm",
            build=functools.partial(_on, builder=shapes.rms_norm_inputs),
            args=("x", "weight"),
            shape=f"x ({s.tokens}, {s.hidden}) bf16, trainable weight",
            kwargs={"eps": 1e-6},
            liger="liger_rms_norm",
            liger_kwargs={"eps": 1e-6},
            fwd_case="rms_norm_forward_llama3_8b",
            bwd_case="rms_norm_backward_llama3_8b",
        ),
        KernelBench(
            name="rope",
            module="rope",
            build=functools.partial(_on, builder=shapes.rope_inputs),
            args=("q", "k", "cos", "sin"),
            shape=f"q (1, {s.n_heads}, {s.tokens}, {s.head_dim}), k {s.n_kv_heads} heads, bf16, transposed views",
            liger="liger_rope",
            fwd_case="rope_forward",
            bwd_case="rope_backward",
        ),
        KernelBench(
            name="swiglu",
            module="swiglu",
            build=functools.partial(_on, builder=shapes.gated_mlp_inputs),
            args=("gate", "up"),
            shape=f"gate, up ({s.tokens}, {s.intermediate}) bf16",
            liger="liger_swiglu",
            fwd_case="swiglu_forward",
            bwd_case="swiglu_backward",
        ),
        KernelBench(
            name="geglu:tanh",
            module="geglu",
            build=functools.partial(_on, builder=shapes.gated_mlp_inputs),
            args=("gate", "up"),
            shape=f"gate, up ({s.tokens}, {s.intermediate}) bf16, tanh approximation",
            kwargs={"approximate": "tanh"},
            liger="liger_geglu",
            fwd_case="geglu_forward[tanh]",
            bwd_case="geglu_backward[tanh]",
        ),
        KernelBench(
            name="cross_entropy:llama3",
            module="cross_entropy",
            build=functools.partial(_on, builder=shapes.cross_entropy_inputs),
            args=("logits", "labels"),
            shape=f"logits ({s.tokens}, {s.vocab}) bf16",
            liger="liger_cross_entropy",
            fwd_case="cross_entropy_forward_llama3",
            bwd_case="cross_entropy_backward_llama3",
        ),
        KernelBench(
            name="cross_entropy:gemma",
            module="cross_entropy",
            build=functools.partial(_on, builder=shapes.cross_entropy_inputs, vocab=shapes.GEMMA_VOCAB),
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
            module="fused_linear_cross_entropy",
            build=lambda d, tokens=None: shapes.fused_linear_cross_entropy_inputs(
                dataclasses.replace(head, tokens=tokens or head.tokens), d
            ),
            args=("hidden", "weight", "labels"),
            shape=f"hidden ({head.tokens}, {head.hidden}) bf16, frozen head ({head.vocab}, {head.hidden})",
            liger="liger_fused_linear_cross_entropy",
        ),
    ]


# ----------------------------------------------------------------------------------------------------
# Bytes model: the kernels' own audit cases
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _audit_min_bytes(module: str) -> dict[str, int]:
    cases = importlib.import_module(f"fastft.kernels.{module}").audit_cases()
    return {case.name: case.min_bytes for case in cases}


def bytes_model(bench: KernelBench, case: str | None, device: torch.device) -> int | None:
    """``min_bytes`` of the audit case at the benchmark's shape, or None without one.

    The audit cases are at the GPU shape (8192 tokens). Every audited kernel's traffic is proportional to
    the token count at fixed widths, so at the CPU's reduced token count the model is scaled by it (up to
    per-launch constants such as a weight vector, small against the rest).
    """
    if case is None:
        return None
    try:
        min_bytes = _audit_min_bytes(bench.module).get(case)
    except Exception:  # noqa: BLE001 - a module that cannot build its cases has no model here
        return None
    if not min_bytes:
        return None
    return round(min_bytes * shapes.shape_for(device).tokens / shapes.LLAMA3_8B.tokens)


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
    bench = next(b for b in _benches(torch.device(device_type)) if b.name == bench_name)
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
    result.fwd_bytes = bytes_model(bench, bench.fwd_case, device)
    result.bwd_bytes = bytes_model(bench, bench.bwd_case, device)
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
    log=print,
) -> list[Result]:
    """Every bench x contender once; torch.compile last, skipped once ``budget_s`` has passed."""
    start = time.perf_counter()
    benches = [b for b in _benches(device) if not kernels or b.name in kernels or b.module in kernels]
    results = []
    order = [c for c in contenders if c != "torch.compile"] + (
        ["torch.compile"] if "torch.compile" in contenders else []
    )
    for contender in order:
        for bench in benches:
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
    order_index = {c: i for i, c in enumerate(CONTENDERS)}
    bench_index = {b.name: i for i, b in enumerate(benches)}
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


def _check_not_interpreted() -> None:
    if _dispatch.triton_interpreted():
        raise RuntimeError(
            "fastft was imported with TRITON_INTERPRET=1: its kernels would run interpreted. "
            "Unset TRITON_INTERPRET before starting the benchmarks."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/kernels.py", description=__doc__.split("\n\n")[0])
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
    _check_not_interpreted()

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


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark mode
# ----------------------------------------------------------------------------------------------------

_DEVICE = shapes.default_device()
_CASES = [(b.name, c, p) for b in _benches(_DEVICE) for c in CONTENDERS for p in PHASES]


@functools.cache
def _measured(kernel: str, contender: str) -> Result:
    bench = next(b for b in _benches(_DEVICE) if b.name == kernel)
    return measure(bench, contender, _DEVICE)


def _pedantic_phase(benchmark, bench: KernelBench, impl: Callable, phase: str, rounds: int) -> None:
    inputs = bench.build(_DEVICE)
    leaves = [t for t in inputs.values() if t.requires_grad]
    outputs = harness.as_tuple(impl(inputs))  # warm-up, and the shapes of the upstream gradients
    grads = harness.make_grad_outputs(outputs)
    torch.autograd.backward(outputs, grads)
    del outputs

    def reset():
        for leaf in leaves:
            leaf.grad = None
        harness.synchronize(_DEVICE)
        return (), {}

    def forward_then_reset():
        reset()
        outs = harness.as_tuple(impl(inputs))
        harness.synchronize(_DEVICE)
        return (outs,), {}

    def fwd():
        impl(inputs)
        harness.synchronize(_DEVICE)

    def bwd(outs):
        torch.autograd.backward(outs, grads)
        harness.synchronize(_DEVICE)

    def fwdbwd():
        torch.autograd.backward(harness.as_tuple(impl(inputs)), grads)
        harness.synchronize(_DEVICE)

    target, setup = {"fwd": (fwd, reset), "bwd": (bwd, forward_then_reset), "fwdbwd": (fwdbwd, reset)}[phase]
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
    inputs = leaves = grads = None  # the closures above hold these cells; free the inputs now
    if _DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _bench_id(case: tuple[str, str, str]) -> str:
    return f"{_DEVICE.type}-{case[0]}-{case[1]}-{case[2]}"


try:  # script mode does not need pytest
    import pytest
except ImportError:
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def copy_bytes_per_s() -> float:
        _check_not_interpreted()
        return harness.copy_bandwidth(str(_DEVICE))

    @pytest.mark.parametrize("case", _CASES, ids=[_bench_id(c) for c in _CASES])
    def test_kernel(benchmark, copy_bytes_per_s, case):
        kernel, contender, phase = case
        bench = next(b for b in _benches(_DEVICE) if b.name == kernel)
        result = _measured(kernel, contender)
        if result.status in ("not installed", "skipped"):
            pytest.skip(f"{contender}: {result.status}: {result.reason}")
        if result.status == "failed":
            if contender == "fastft":
                pytest.fail(f"fastft {kernel} failed: {result.reason}")
            pytest.skip(f"{contender} failed (recorded, not fastft's failure): {result.reason}")
        base = _measured(kernel, "fastft")
        results = [result] + ([base] if base is not result else [])
        annotate(results, copy_bytes_per_s)
        benchmark.extra_info.update(
            device=harness.device_name(_DEVICE),
            numbers=(
                "CPU numbers: torch path at reduced shapes" if _DEVICE.type != "cuda" else "GPU numbers (CUDA events)"
            ),
            shape=bench.shape,
            phase=phase,
            median_ms=result.ms(phase),
            timer="CUDA events" if _DEVICE.type == "cuda" else "time.perf_counter",
            reps=result.reps,
            bytes_model={"fwd": result.fwd_bytes, "bwd": result.bwd_bytes},
            bytes_model_source="audit min_bytes",
            gbps=result.gbps.get(phase),
            copy_fraction=result.copy_fraction.get(phase),
            copy_gbps=copy_bytes_per_s / 1e9,
            tflops=result.tflops if phase == "fwdbwd" else None,
            fastft_speedup=result.speedup.get(phase),
            peak_extra_bytes=result.peak_extra_bytes,
        )
        time_ms = result.ms(phase) or 1.0
        rounds = int(min(20, max(3, 300 / time_ms)))
        _pedantic_phase(benchmark, bench, implementation(bench, contender, _DEVICE), phase, rounds)


if __name__ == "__main__":
    sys.exit(main())
