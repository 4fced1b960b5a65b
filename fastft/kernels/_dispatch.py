"""Which implementation a kernel call runs: compiled Triton, interpreted Triton, or the torch path.

- CUDA (and ROCm, which PyTorch also reports as ``cuda``) tensors run the compiled Triton kernels.
- CPU tensors run the torch path, which has the same hand-written backward (and so the same memory
  savings) as the Triton path.
- With ``TRITON_INTERPRET=1`` set before triton is imported, CPU tensors run the Triton kernels through
  Triton's interpreter instead; that is how the tests check the kernels on machines without a GPU.

:func:`force_backend` pins the choice inside a ``with`` block (tests use it to check both paths).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]

_state = threading.local()


# Read once: ``@triton.jit`` decides between compiled and interpreted kernels when the kernel modules
# are imported (together with this one), so a later change of the variable would not take effect.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_interpreted() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETED


def _forced() -> Backend:
    return getattr(_state, "backend", "auto")


@contextlib.contextmanager
def force_backend(backend: Backend) -> Iterator[None]:
    """Run every fastft kernel call inside the block on ``backend`` ("auto", "triton" or "torch").

    "triton" on CPU tensors needs ``TRITON_INTERPRET=1``; without it the call raises a ``RuntimeError``
    that says so, rather than silently running something else.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    previous = _forced()
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = previous


def use_triton(x: torch.Tensor) -> bool:
    """Whether a kernel whose main input is ``x`` should run the Triton implementation."""
    backend = _forced()
    if backend == "torch":
        return False
    runnable = x.is_cuda or (x.device.type == "cpu" and triton_interpreted())
    if backend == "triton" and not runnable:
        raise RuntimeError(
            f"force_backend('triton') was asked for a tensor on {x.device}, where Triton cannot run. "
            "Use a CUDA tensor, or set TRITON_INTERPRET=1 before importing fastft to interpret kernels on CPU."
        )
    return runnable
