"""What the compile audit needs to know about a kernel launch, declared next to the kernel itself.

Each kernel module defines ``audit_cases() -> list[AuditCase]``: one case per Triton kernel and
audited shape, built from the module's own launch heuristics (block sizes, warps), so the audit
compiles exactly what a real call would launch. ``python -m fastft.kernels.audit`` collects them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: the element type as Triton spells it ("bf16", "fp16", "fp32", "i64", ...).

    The audit marks it 16-byte aligned, as the JIT does for tensors allocated by PyTorch.
    """

    dtype: str


@dataclass(frozen=True)
class AuditCase:
    """One kernel, compiled once per GPU target.

    ``args`` maps every parameter of the ``@triton.jit`` function, in any order, to a :class:`Ptr`,
    an ``int`` (a size or stride: specialised like the JIT does, divisible-by-16 and ==1 included),
    a ``float`` (a runtime fp32 scalar) or, for ``tl.constexpr`` parameters, the constant itself
    (``bool``/``int``/``float``/``None``), listed in ``constexprs``.
    ``min_bytes`` is the bytes model: the fewest bytes the whole launch (all programs) must read and
    write from global memory for this shape.
    """

    name: str
    kernel: object
    args: dict[str, object]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    shape: str = ""
    min_bytes: int = 0
