"""Kernel benchmarks, as a script and as pytest-benchmark tests: every public fastft kernel against the PyTorch
formula, torch.compile and Liger Kernel. The benchmark itself lives in :mod:`fastft.bench.kernels` (what is
measured, the bytes models, the report); this file is how it is started from a checkout:

- ``python benchmarks/kernels.py --out DIR``: everything once, writes ``DIR/kernels.json`` and ``DIR/kernels.md``
  (see :func:`fastft.bench.kernels.main` for the options);
- ``pytest benchmarks/kernels.py --benchmark-only``: one pytest-benchmark test per kernel, contender and phase
  (ids ``cuda-rms_norm-fastft-fwd``; ``cpu-...`` without a GPU). pytest-benchmark's own table is wall-clock around
  a synchronised call; ``extra_info`` holds the CUDA-event medians (``median_ms``), GB/s, fraction of copy
  bandwidth and speedups.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):  # python benchmarks/kernels.py: make the repository importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        # Interpreted kernels are for correctness, not timing; fastft reads the variable when imported (below).
        print("benchmarks/kernels.py: ignoring TRITON_INTERPRET (benchmarks time compiled kernels)", file=sys.stderr)
        del os.environ["TRITON_INTERPRET"]

import torch

from fastft.bench import harness, shapes
from fastft.bench.kernels import (
    CONTENDERS,
    PHASES,
    KernelBench,
    Result,
    annotate,
    benches,
    check_not_interpreted,
    implementation,
    main,
    measure,
)

# ----------------------------------------------------------------------------------------------------
# pytest-benchmark mode
# ----------------------------------------------------------------------------------------------------

_DEVICE = shapes.default_device()
_CASES = [(b.name, c, p) for b in benches(_DEVICE) for c in CONTENDERS for p in PHASES]


@functools.cache
def _measured(kernel: str, contender: str) -> Result:
    bench = next(b for b in benches(_DEVICE) if b.name == kernel)
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
        check_not_interpreted()
        return harness.copy_bandwidth(str(_DEVICE))

    @pytest.mark.parametrize("case", _CASES, ids=[_bench_id(c) for c in _CASES])
    def test_kernel(benchmark, copy_bytes_per_s, case):
        kernel, contender, phase = case
        bench = next(b for b in benches(_DEVICE) if b.name == kernel)
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
