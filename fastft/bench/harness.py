"""Timing and bandwidth helpers shared by the benchmarks.

- :func:`time_training_step` times forward, backward and forward+backward of one training step in the
  same loop: on CUDA three CUDA events per repetition (before the forward, between forward and backward,
  after the backward) and one ``torch.cuda.synchronize`` at the end; on a CPU ``time.perf_counter``.
  Medians over the repetitions. Gradients are reset (``.grad = None``) before each repetition, outside
  the timed region, so accumulation is not timed.
- :func:`copy_bandwidth` measures the device's achievable bandwidth once per process with a large
  device-to-device copy (bytes read + bytes written per second), the yardstick for "fraction of peak";
  :func:`matmul_rate` the achievable bf16 matmul FLOP/s with a large square GEMM, the yardstick for MFU.
- :func:`environment` says where the numbers come from (device, versions, date).
"""

from __future__ import annotations

import datetime
import functools
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimes:
    """Median milliseconds of each phase, the repetitions they come from and the step's peak extra memory."""

    fwd_ms: float
    bwd_ms: float
    total_ms: float
    reps: int
    peak_extra_bytes: int | None  # CUDA only: peak allocated during the steps minus what the inputs held


def as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    """A function's outputs as a tuple: one tensor becomes a 1-tuple."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def make_grad_outputs(outputs: Sequence[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """Upstream gradients for ``outputs``: ones for a scalar loss, a fixed random tensor otherwise."""
    grads = []
    for i, o in enumerate(outputs):
        if o.dim() == 0:
            grads.append(torch.ones_like(o))
        else:
            g = torch.Generator(device=o.device).manual_seed(seed + i)
            grads.append(torch.randn(o.shape, device=o.device, dtype=o.dtype, generator=g))
    return grads


def time_training_step(
    step: Callable[[], object],
    leaves: Sequence[torch.Tensor],
    device: torch.device,
    *,
    warmup: int = 2,
    min_reps: int = 5,
    max_reps: int = 50,
    target_s: float = 0.5,
) -> StepTimes:
    """Time ``step()`` (the forward: returns a tensor or a tuple of tensors) and its backward.

    The first warm-up call also compiles (Triton, torch.compile) and sizes the upstream gradients; the
    number of timed repetitions is chosen from the last warm-up so the loop takes about ``target_s``.
    """
    grad_outputs = None

    def once() -> float:
        nonlocal grad_outputs
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        outputs = as_tuple(step())
        if grad_outputs is None:
            grad_outputs = make_grad_outputs(outputs)
        torch.autograd.backward(outputs, grad_outputs)
        del outputs
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(max(1, warmup) - 1):
        once()
    per_rep = once()
    reps = int(min(max_reps, max(min_reps, target_s / max(per_rep, 1e-6))))

    cuda = device.type == "cuda"
    for leaf in leaves:
        leaf.grad = None
    if cuda:
        base = torch.cuda.memory_allocated(device)  # the inputs (and the upstream gradients) only
        torch.cuda.reset_peak_memory_stats(device)
    marks: list[tuple] = []
    for _ in range(reps):
        for leaf in leaves:
            leaf.grad = None
        t0 = _mark(cuda)
        outputs = as_tuple(step())
        t1 = _mark(cuda)
        torch.autograd.backward(outputs, grad_outputs)
        t2 = _mark(cuda)
        del outputs
        marks.append((t0, t1, t2))
    synchronize(device)
    fwd, bwd, total = [], [], []
    for t0, t1, t2 in marks:
        fwd.append(_elapsed_ms(t0, t1, cuda))
        bwd.append(_elapsed_ms(t1, t2, cuda))
        total.append(_elapsed_ms(t0, t2, cuda))
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    for leaf in leaves:
        leaf.grad = None
    return StepTimes(statistics.median(fwd), statistics.median(bwd), statistics.median(total), reps, peak)


def _mark(cuda: bool):
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed_ms(a, b, cuda: bool) -> float:
    return a.elapsed_time(b) if cuda else (b - a) * 1e3


@functools.cache
def copy_bandwidth(device_str: str, n_bytes: int | None = None) -> float:
    """Bytes per second of a large ``dst.copy_(src)`` on the device (read + write), measured once per process.

    ``n_bytes`` defaults to 1 GiB on a GPU (far beyond L2) and 128 MiB on a CPU (beyond its caches); median of
    10 copies after warm-up.
    """
    device = torch.device(device_str)
    cuda = device.type == "cuda"
    n_bytes = n_bytes or ((1 << 30) if cuda else (128 << 20))
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    median_ms = _median_ms(functools.partial(dst.copy_, src), device, warmup=3, reps=10)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return 2 * n_bytes / (median_ms / 1e3)


@functools.cache
def matmul_rate(device_str: str, n: int | None = None, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an ``n x n x n`` matmul in ``dtype`` on the device (2 n^3 per product), measured once per process.

    ``n`` defaults to 8192 on a GPU (1.1 TFLOP per product, long enough to reach the clocks a training step
    runs at) and 512 on a CPU. The operands are normal random numbers, not zeros: a GPU's power draw, and so
    its clock, depends on the bits it multiplies. Median of 10 products after 3 warm-ups.
    """
    device = torch.device(device_str)
    n = n or (8192 if device.type == "cuda" else 512)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    median_ms = _median_ms(functools.partial(torch.matmul, a, b, out=out), device, warmup=3, reps=10)
    del a, b, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n**3 / (median_ms / 1e3)


def _median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()``: CUDA events around each call on a GPU, ``perf_counter`` on a CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    cuda = device.type == "cuda"
    marks = []
    for _ in range(reps):
        t0 = _mark(cuda)
        fn()
        marks.append((t0, _mark(cuda)))
    synchronize(device)
    return statistics.median(_elapsed_ms(a, b, cuda) for a, b in marks)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, object]:
    """Device, versions and date: what a reader needs to know where the numbers come from."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
