"""Helpers shared by the kernel tests: dtype-aware comparison against a float64 oracle.

The numerical contract (DESIGN.md): in fp32 a result is within ~1e-5 relative of float64; in bf16/fp16
fastft may not be worse than PyTorch computing the same formula in that dtype. Both are checked by
:func:`assert_no_worse_than_torch`, which compares the two errors against the same float64 answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fastft.kernels._dispatch import force_backend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# How much larger fastft's error may be than PyTorch's own error for the same formula in the same dtype.
# 2x allows for a different (still correct) summation order or one extra rounding of an fp32 intermediate
# to the output dtype; anything systematically wrong (a missing cast, fp16 accumulation) is far larger.
ERROR_FACTOR = 2.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the relative error of one rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (actual.double() - exact.double()).abs().max().item() if exact.numel() else 0.0


def assert_no_worse_than_torch(
    actual: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    exact: torch.Tensor,
    *,
    name: str = "",
    factor: float = ERROR_FACTOR,
    ulps: float = 4.0,
    scale: float | None = None,
) -> None:
    """Assert ``|actual - exact| <= factor * |torch_same_dtype - exact| + ulps * u(dtype) * scale``.

    ``exact`` is the float64 answer; ``torch_same_dtype`` is the plain PyTorch formula run in the dtype
    under test (its error is what users get today). The additive floor of a few roundings of ``scale``
    covers the case where PyTorch is exact by luck for this input. ``scale`` is the size of the terms the
    result is computed from (default: the largest exact value); pass it where the result is a difference of
    nearly equal terms (an RMSNorm gradient at width 1, a loss near 0), which no computation in ``dtype``
    can get right relative to the difference itself — only relative to the terms.
    """
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert actual.dtype == torch_same_dtype.dtype, f"{name}: dtype {actual.dtype} != {torch_same_dtype.dtype}"
    if exact.numel() == 0:
        return
    assert torch.isfinite(actual).all() == torch.isfinite(exact).all(), f"{name}: finiteness differs"
    scale = max(exact.double().abs().max().item() if scale is None else scale, 1e-30)
    ours, theirs = max_error(actual, exact), max_error(torch_same_dtype, exact)
    bound = factor * theirs + ulps * unit_roundoff(actual.dtype) * scale
    assert ours <= bound, (
        f"{name} ({actual.dtype}): max error {ours:.3e} exceeds {factor} x torch's {theirs:.3e} "
        f"+ {ulps} ulp of {scale:.3e} = {bound:.3e}"
    )


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Alias of :func:`fastft.kernels._dispatch.force_backend` for test parametrisation ("triton"/"torch")."""
    with force_backend(name):
        yield


BACKENDS = ("triton", "torch")
