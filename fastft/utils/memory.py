"""Count the bytes autograd keeps for backward, and the peak of live tensor bytes: the honest memory metrics.

Every tensor a ``torch.autograd.Function`` (or a built-in op) saves for backward passes through
``torch.autograd.graph.saved_tensors_hooks``. :class:`SavedTensorMeter` records them while a forward
runs and counts each underlying storage once, so a view saved twice, or the input saved by two ops,
is not double-counted.

:class:`PeakMemoryMeter` measures the other number that decides what fits: the most bytes of tensors alive at
once inside a block (a training step), beyond what was alive when it started, and which allocations made that
peak. It reads the allocator events of ``torch.profiler`` (``profile_memory=True``): every tensor storage that
PyTorch allocates or frees on the device, in time order. What a Triton kernel keeps in registers or shared
memory is not a tensor and is not counted; run on CPU with ``TRITON_INTERPRET=1``, the interpreter works in
numpy arrays on the tensors' own storages, so interpreted kernels count exactly the tensors they write, as on
a GPU. One difference: the interpreter copies a launch's arguments through a reference cycle that keeps their
storages until Python's cycle collector runs, so a tensor the block has dropped may still count at a later peak
(a GPU launch keeps nothing); ``gc.collect(0)`` after each interpreted launch removes that, as
``tests/distributed/test_plan_context.py`` does. Without it an interpreted peak can only overstate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._C._profiler import _EventType
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
    saved tensor in the order autograd packed it (including repeats). Storages are told apart by address, so the
    meter holds each one until its block ends: a storage saved and released inside the block still counts, and a
    later one the allocator places at the freed address is not taken for it (which made counts depend on the
    allocator's state, i.e. on what ran before).

    >>> with SavedTensorMeter() as meter:
    ...     y = torch.nn.functional.silu(torch.randn(4, 8, requires_grad=True))
    >>> meter.total_bytes
    128
    """

    saved: list[SavedTensor] = field(default_factory=list)
    _storages: dict[tuple[str, int], int] = field(default_factory=dict)
    _held: list[torch.UntypedStorage] = field(default_factory=list)
    _hooks: Any = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = (str(tensor.device), storage.data_ptr())
        if key not in self._storages:
            self._held.append(storage)
        self._storages[key] = nbytes
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
        self._held.clear()


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``fn(*args, **kwargs)`` and return the bytes autograd saved for its backward (each storage once)."""
    with SavedTensorMeter() as meter:
        fn(*args, **kwargs)
    return meter.total_bytes


@dataclass(frozen=True)
class LiveAllocation:
    """One allocation alive at the peak: its bytes and the ops that made it, innermost first
    (e.g. ``("aten::mm", "LoRAMLPFunctionBackward", ...)``)."""

    nbytes: int
    ops: tuple[str, ...]


class PeakMemoryMeter:
    """Context manager: the peak of live tensor bytes on ``device`` inside its block, beyond the bytes at entry.

    ``meter.peak_bytes`` is the most bytes the block's own allocations held at once (tensors allocated before the
    block are not counted, alive or freed: the profiler sees the frees of what it saw allocated); ``meter.at_peak`` lists the
    allocations made inside the block and alive at that moment, largest first; ``meter.end_bytes`` what the
    block's allocations still hold when it ends. The measure is the allocator's: a view costs nothing, a
    storage counts with all its bytes. The profiler slows the block down, so a block measured here is not
    also timed.

    >>> with PeakMemoryMeter() as meter:
    ...     y = torch.ones(1000) + torch.ones(1000)  # two operands and the sum alive at once, 4000 bytes each
    >>> meter.peak_bytes
    12000
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.end_bytes = 0
        self.at_peak: list[LiveAllocation] = []
        self._profile: Any = None

    def __enter__(self) -> Self:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(activities=activities, profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(*exc)
        if exc[0] is None:
            self._count(self._profile.profiler.kineto_results.experimental_event_tree())
        self._profile = None

    def _count(self, roots: list) -> None:
        events, stack = [], list(roots)
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation:
                fields = event.extra_fields
                if fields.device.type == self.device.type:
                    events.append((event.start_time_ns, fields.id, fields.alloc_size, fields.ptr, event))
        events.sort(key=lambda e: (e[0], e[1]))
        live: dict[int, tuple[int, Any]] = {}
        total, peak, peak_live = 0, 0, {}
        for _, _, size, ptr, event in events:
            total += size
            if size > 0:
                live[ptr] = (size, event)
            else:
                live.pop(ptr, None)
            if total > peak:
                peak, peak_live = total, dict(live)
        self.peak_bytes, self.end_bytes = peak, total
        self.at_peak = sorted(
            (LiveAllocation(size, _op_chain(event)) for size, event in peak_live.values()), key=lambda a: -a.nbytes
        )

    def summary(self, unit: int = 1, limit: int = 20) -> str:
        """The allocations alive at the peak, largest first, one line each (bytes divided by ``unit``)."""
        lines = [f"peak {self.peak_bytes / unit:.2f}"]
        lines += [f"  {a.nbytes / unit:10.2f}  {' < '.join(a.ops[:4])}" for a in self.at_peak[:limit]]
        return "\n".join(lines)


def _op_chain(event: Any) -> tuple[str, ...]:
    names, parent = [], event.parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.parent
    return tuple(names)
