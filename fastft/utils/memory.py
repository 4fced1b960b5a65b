"""Count the bytes autograd keeps for backward: the honest memory metric on any device.

Every tensor a ``torch.autograd.Function`` (or a built-in op) saves for backward passes through
``torch.autograd.graph.saved_tensors_hooks``. :class:`SavedTensorMeter` records them while a forward
runs and counts each underlying storage once, so a view saved twice, or the input saved by two ops,
is not double-counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from typing_extensions import Self


@dataclass
class SavedTensor:
    """One tensor saved for backward, as autograd saw it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    storage_bytes: int


@dataclass
class SavedTensorMeter:
    """Context manager that records the tensors saved for backward inside its block.

    ``meter.total_bytes`` sums the bytes of each distinct storage once; ``meter.saved`` lists every
    saved tensor in the order autograd packed it (including repeats).

    >>> with SavedTensorMeter() as meter:
    ...     y = torch.nn.functional.silu(torch.randn(4, 8, requires_grad=True))
    >>> meter.total_bytes
    128
    """

    saved: list[SavedTensor] = field(default_factory=list)
    _storages: dict[tuple[str, int], int] = field(default_factory=dict)
    _hooks: Any = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        self._storages[(str(tensor.device), storage.data_ptr())] = nbytes
        self.saved.append(SavedTensor(tuple(tensor.shape), tensor.dtype, nbytes))
        return tensor

    @property
    def total_bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> Self:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``fn(*args, **kwargs)`` and return the bytes autograd saved for its backward (each storage once)."""
    with SavedTensorMeter() as meter:
        fn(*args, **kwargs)
    return meter.total_bytes
