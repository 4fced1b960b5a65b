"""Compile audit: every fastft Triton kernel, compiled for real GPUs on a machine without one.

``python -m fastft.kernels.audit`` finds every module of :mod:`fastft.kernels` that defines
``audit_cases()`` (see :mod:`fastft.kernels._spec`), compiles each case with ``triton.compile`` for
``sm80`` (A100) and ``sm90`` (H100/H200), and prints one row per (kernel, target):

- **regs**, **stack**: from ``cuobjdump -res-usage`` on the cubin Triton built (``REG``, ``STACK``).
- **spill st/ld**: bytes of spill stores / loads, summed from the ``STL`` / ``LDL`` instructions in the
  cubin's SASS (``nvdisasm``), each counted at its access width. These are the numbers ``ptxas -v``
  prints as "bytes spill stores/loads" (the test suite checks that they agree on a kernel that spills),
  but taken from the binary that actually runs: running ptxas again on the PTX with other flags than
  Triton's (Triton 3.9 adds ``--regAllocOptLevel=2`` on sm90, for one) gives other numbers.
  ptxas puts spills in the stack frame, not in ``LOCAL``, so a non-zero STACK, LOCAL, STL or LDL all
  count as a spill: the run fails.
- **smem**: the shared memory Triton asks for at launch (its metadata; the cubin's own SHARED is the
  static part only).
- **ldg128** / **stg128**: how many of the global loads (``LDG``, and ``LDGSTS`` async copies) and
  stores (``STG``) in the SASS are 128-bit wide; a memory-bound kernel wants all of them.
- **min bytes**: the case's bytes model (the fewest bytes the launch must move).

The specialisation is the one ``@triton.jit`` applies when launched on PyTorch tensors (read from
``triton/runtime/jit.py`` and its native ``specialize_impl``): pointers are 16-byte aligned
(``tt.divisibility`` 16), int arguments divisible by 16 get the same attribute, int arguments equal to
1 and ``None`` arguments become compile-time constants, floats are ``fp32``, Python bools ``u1``;
``do_not_specialize`` and parameter annotations are honoured. Compilation goes through Triton's own
on-disk cache; the audit writes nothing else outside a temporary directory it deletes.

Options: ``--target sm80|sm90`` (repeatable), ``--module NAME`` (a kernel module such as ``rms_norm``,
or a dotted module path; repeatable), ``--json PATH``, ``--jobs N``. Exit status 1 when any case spills,
fails to compile, or a kernel module fails to import.

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` returns interpreter objects that cannot be compiled, so
``main`` re-runs itself in a subprocess without that variable.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import importlib.util
import inspect
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The test suite runs kernels with FP fusion on (tests/conftest.py); compile what it tests, and keep
# Triton 3.9's "unset" warning out of the table.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton

from fastft.kernels._spec import AuditCase, Ptr

_PACKAGE = "fastft.kernels"
_TRUTHY = ("1", "true", "yes", "on")
# Triton's driver reports a warp of 32 threads on every NVIDIA GPU; the CUDA backend ignores the
# target's warp size and uses its own option (32) in any case.
TARGETS: dict[str, tuple[int, int]] = {"sm80": (80, 32), "sm90": (90, 32)}


# ----------------------------------------------------------------------------------------------------
# Specialisation: what the JIT would compile for this call
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Specialisation:
    """Arguments for ``ASTSource``: types by parameter name, constants and attributes by ``(index,)``."""

    signature: dict[str, str]
    constexprs: dict[tuple[int], object]
    attrs: dict[tuple[int], list]

    def describe(self) -> str:
        """One line, e.g. ``x_ptr:*bf16/16 n:i32/16 stride:=1 eps:fp32 BLOCK:=4096``."""
        parts = []
        for i, (name, ty) in enumerate(self.signature.items()):
            if ty == "constexpr":
                parts.append(f"{name}:={self.constexprs[(i,)]!r}")
            else:
                parts.append(f"{name}:{ty}" + ("/16" if ["tt.divisibility", 16] in self.attrs.get((i,), []) else ""))
        return " ".join(parts)


def _unwrap(kernel: object) -> object:
    """The ``JITFunction`` under ``@triton.autotune`` / ``@triton.heuristics`` wrappers."""
    for _ in range(8):
        if isinstance(kernel, triton.runtime.JITFunction) or type(kernel).__name__ == "InterpretedFunction":
            break
        kernel = getattr(kernel, "fn", kernel)
    if type(kernel).__name__ == "InterpretedFunction":
        raise RuntimeError(
            "the kernel is a Triton interpreter object because TRITON_INTERPRET=1 was set when it was "
            "imported; run the audit in a process without TRITON_INTERPRET (python -m fastft.kernels.audit "
            "does this by itself)"
        )
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise TypeError(f"AuditCase.kernel must be a @triton.jit function, got {type(kernel).__name__}")
    return kernel


def _int_type(value: int) -> str:
    # Same ranges as Triton's native specialize_impl: i32, then i64, then u64.
    if -(2**31) <= value < 2**31:
        return "i32"
    if -(2**63) <= value < 2**63:
        return "i64"
    if value < 2**64:
        return "u64"
    raise ValueError(f"integer argument {value} does not fit in 64 bits")


def specialise(case: AuditCase) -> Specialisation:
    """The signature, constants and attributes the JIT would compile ``case.kernel`` with.

    Raises ``ValueError`` naming the parameter when ``case`` misses or misnames an argument.
    """
    kernel = _unwrap(case.kernel)
    params = list(kernel.params)
    names = [p.name for p in params]
    defaults = {k: v.default for k, v in inspect.signature(kernel.fn).parameters.items()}
    given = {**case.args, **case.constexprs}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"{case.name}: {unknown} are not parameters of {kernel.__name__}{tuple(names)}")

    signature: dict[str, str] = {}
    constexprs: dict[tuple[int], object] = {}
    attrs: dict[tuple[int], list] = {}
    divisible = [["tt.divisibility", 16]]
    for i, p in enumerate(params):
        if p.name in given:
            value = given[p.name]
        elif defaults[p.name] is not inspect.Parameter.empty:
            value = defaults[p.name]
        else:
            raise ValueError(f"{case.name}: no value for parameter {p.name!r} of {kernel.__name__}; add it to args")
        key = (i,)
        if p.is_constexpr:
            signature[p.name], constexprs[key] = "constexpr", value
            continue
        specialize = not getattr(p, "do_not_specialize", False)
        align = not getattr(p, "do_not_specialize_on_alignment", False)
        annotated = getattr(p, "annotation_type", "")
        if isinstance(value, Ptr):
            signature[p.name] = ("*k" if getattr(p, "is_const", False) else "*") + value.dtype
            if specialize and align:
                attrs[key] = divisible
        elif value is None:
            signature[p.name], constexprs[key] = "constexpr", None
        elif isinstance(value, bool):
            signature[p.name] = annotated or "u1"
        elif isinstance(value, int):
            if annotated:  # an annotated int keeps its type and is never turned into a constant
                signature[p.name] = annotated
                if specialize and align and value % 16 == 0 and not annotated.startswith(("fp", "bf", "u1")):
                    attrs[key] = divisible
            elif specialize and value == 1:
                signature[p.name], constexprs[key] = "constexpr", 1
            else:
                signature[p.name] = _int_type(value)
                if specialize and align and value % 16 == 0:
                    attrs[key] = divisible
        elif isinstance(value, float):
            signature[p.name] = annotated or "fp32"
        else:
            raise TypeError(
                f"{case.name}: argument {p.name}={value!r} ({type(value).__name__}) is not a Ptr, int, float, "
                f"bool or None; constants for tl.constexpr parameters go in AuditCase.constexprs"
            )
    return Specialisation(signature, constexprs, attrs)


def _ast_source(kernel, spec: Specialisation):
    from triton.compiler import ASTSource

    accepted = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in accepted or "attrs" not in accepted:
        raise RuntimeError(
            f"triton {triton.__version__}: ASTSource{tuple(accepted)[1:]} has no constexprs/attrs parameters; "
            "the audit needs the API of triton >= 3.3 (dict signature, constexprs and attrs keyed by (index,))"
        )
    return ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)


def compile_case(case: AuditCase, target: str):
    """``triton.compile`` of ``case`` for ``target`` ("sm80" or "sm90"), specialised like the JIT."""
    from triton.backends.compiler import GPUTarget

    kernel = _unwrap(case.kernel)
    spec = specialise(case)
    arch, warp_size = TARGETS[target]
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    compiled = triton.compile(_ast_source(kernel, spec), target=GPUTarget("cuda", arch, warp_size), options=options)
    return compiled, spec


# ----------------------------------------------------------------------------------------------------
# Reading the binary: cuobjdump -res-usage and nvdisasm
# ----------------------------------------------------------------------------------------------------


def nvidia_tool(name: str) -> str:
    """Path of a CUDA tool (``cuobjdump``, ``nvdisasm``) as Triton finds it: its knob (``TRITON_<NAME>_PATH``)
    where this Triton has one, else the copy shipped in the triton wheel."""
    tool = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), name, None)
    if getattr(tool, "path", None):
        return tool.path
    import triton.backends.nvidia as nvidia_backend

    path = Path(nvidia_backend.__file__).parent / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the audit needs the CUDA tools that ship in the triton wheel")
    return str(path)


def parse_res_usage(text: str, kernel_name: str) -> dict[str, int]:
    """``REG``/``STACK``/``SHARED``/``LOCAL`` of ``kernel_name`` from ``cuobjdump -res-usage`` output."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Function") and line.strip().rstrip(":").split()[-1] == kernel_name:
            fields = dict(re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            return {k: int(fields[k.upper()]) for k in ("reg", "stack", "shared", "local") if k.upper() in fields}
    raise ValueError(f"cuobjdump -res-usage has no function {kernel_name!r}:\n{text}")


_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}


def _width_bits(opcode: str) -> int:
    # An opcode such as LDG.E.EL.128 or STL.64: the size is a plain numeric modifier (or U8/S16...);
    # modifiers like LTC128B are cache hints, not sizes. No size modifier means 32 bits.
    for modifier in opcode.split(".")[1:]:
        if modifier in _WIDTHS:
            return _WIDTHS[modifier]
    return 32


def parse_sass(sass: str) -> dict[str, int]:
    """Counts of global loads/stores (all, 128-bit, by width) and local-memory spill bytes in SASS text."""
    counts = {
        "ldg": 0,
        "ldg128": 0,
        "stg": 0,
        "stg128": 0,
        "stl": 0,
        "ldl": 0,
        "spill_store_bytes": 0,
        "spill_load_bytes": 0,
    }
    # Instruction counts by access width in bits, e.g. {128: 8, 64: 6}: which loads are the narrow ones.
    ldg_bits: dict[int, int] = {}
    stg_bits: dict[int, int] = {}
    # An instruction line: /*0180*/  @!P2 LDG.E.128 R8, desc[UR10][R14.64] ;
    for match in re.finditer(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass):
        opcode = match.group(1)
        base = opcode.split(".")[0]
        bits = _width_bits(opcode)
        if base in ("LDG", "LDGSTS"):
            counts["ldg"] += 1
            counts["ldg128"] += bits >= 128
            ldg_bits[bits] = ldg_bits.get(bits, 0) + 1
        elif base == "STG":
            counts["stg"] += 1
            counts["stg128"] += bits >= 128
            stg_bits[bits] = stg_bits.get(bits, 0) + 1
        elif base == "STL":
            counts["stl"] += 1
            counts["spill_store_bytes"] += bits // 8
        elif base == "LDL":
            counts["ldl"] += 1
            counts["spill_load_bytes"] += bits // 8
    return {
        **counts,
        "ldg_bits": dict(sorted(ldg_bits.items(), reverse=True)),
        "stg_bits": dict(sorted(stg_bits.items(), reverse=True)),
    }


def inspect_cubin(cubin: bytes, kernel_name: str) -> dict[str, int]:
    """Resource usage and memory-instruction counts of one kernel in a cubin."""
    with tempfile.TemporaryDirectory(prefix="fastft-audit-") as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run(
            [nvidia_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [nvidia_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True
        ).stdout
    return {**parse_res_usage(res, kernel_name), **parse_sass(sass)}


# ----------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------


@dataclass
class AuditRow:
    """One (kernel, target) line of the audit."""

    module: str
    case: str
    kernel: str
    shape: str
    target: str
    num_warps: int
    num_stages: int
    min_bytes: int
    specialisation: str = ""
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stl: int = 0
    ldl: int = 0
    ldg: int = 0
    ldg128: int = 0
    stg: int = 0
    stg128: int = 0
    ldg_bits: dict = dataclasses.field(default_factory=dict)
    stg_bits: dict = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.stack or self.local or self.stl or self.ldl or self.spill_store_bytes or self.spill_load_bytes)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.spills


def audit_case(module: str, case: AuditCase, target: str) -> AuditRow:
    """Compile ``case`` for ``target`` and read its binary; a failure becomes the row's ``error``."""
    kernel_name = getattr(case.kernel, "__name__", "?")
    row = AuditRow(
        module=module,
        case=case.name,
        kernel=kernel_name,
        shape=case.shape,
        target=target,
        num_warps=case.num_warps,
        num_stages=case.num_stages,
        min_bytes=case.min_bytes,
    )
    start = time.perf_counter()
    try:
        compiled, spec = compile_case(case, target)
        row.specialisation = spec.describe()
        row.shared = int(compiled.metadata.shared)
        usage = inspect_cubin(compiled.asm["cubin"], compiled.metadata.name)
        usage.pop("shared", None)  # the cubin's static part only; the launch asks for metadata.shared
        row.regs = usage.pop("reg", 0)
        for key, value in usage.items():  # stack, local, spill bytes, STL/LDL and LDG/STG counts
            setattr(row, key, value)
    except Exception as exc:  # noqa: BLE001 - any failure is reported in the row, the run goes on
        row.error = f"{type(exc).__name__}: {exc}".strip()
    row.compile_s = time.perf_counter() - start
    return row


def human_bytes(n: float) -> str:
    """``1.07 GB``-style decimal units (bandwidths are quoted in GB/s)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _share(part: int, whole: int) -> str:
    return "-" if whole == 0 else f"{part}/{whole}"


def format_table(rows: list[AuditRow]) -> str:
    """The rows as an aligned text table, errors spelled out below it."""
    header = [
        "kernel",
        "shape",
        "target",
        "warps",
        "regs",
        "spill st/ld B",
        "stack",
        "smem",
        "ldg128",
        "stg128",
        "min bytes",
        "s",
        "",
    ]
    body = []
    for r in rows:
        status = "ERROR" if r.error else ("SPILL" if r.spills else "ok")
        if r.error:
            cells = [
                f"{r.module}.{r.case}",
                r.shape,
                r.target,
                str(r.num_warps),
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                human_bytes(r.min_bytes),
                f"{r.compile_s:.1f}",
                status,
            ]
        else:
            cells = [
                f"{r.module}.{r.case}",
                r.shape,
                r.target,
                str(r.num_warps),
                str(r.regs),
                f"{r.spill_store_bytes}/{r.spill_load_bytes}",
                str(r.stack),
                str(r.shared),
                _share(r.ldg128, r.ldg),
                _share(r.stg128, r.stg),
                human_bytes(r.min_bytes),
                f"{r.compile_s:.1f}",
                status,
            ]
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    for r in rows:
        if r.error:
            lines.append(f"ERROR {r.module}.{r.case} [{r.target}]: {r.error}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Discovery and the command line
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModuleReport:
    name: str
    n_cases: int = 0
    error: str | None = None  # import or audit_cases() failure
    has_cases: bool = True  # False: the module defines no audit_cases()


def kernel_modules() -> list[str]:
    """Dotted names of the public modules of :mod:`fastft.kernels` (underscore modules and this one skipped)."""
    package = importlib.import_module(_PACKAGE)
    return sorted(
        f"{_PACKAGE}.{m.name}"
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_") and m.name != "audit"
    )


def _resolve_module(name: str) -> str:
    # "rms_norm" means fastft.kernels.rms_norm; anything else is taken as a module path as given.
    if "." not in name and importlib.util.find_spec(f"{_PACKAGE}.{name}") is not None:
        return f"{_PACKAGE}.{name}"
    return name


def load_cases(module_name: str) -> tuple[ModuleReport, list[AuditCase]]:
    """Import ``module_name`` and call its ``audit_cases()``; failures are reported, not raised."""
    report = ModuleReport(module_name)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001
        report.error = f"import failed: {type(exc).__name__}: {exc}"
        return report, []
    if not hasattr(module, "audit_cases"):
        report.has_cases = False
        return report, []
    try:
        cases = list(module.audit_cases())
    except Exception as exc:  # noqa: BLE001
        report.error = f"audit_cases() failed: {type(exc).__name__}: {exc}"
        return report, []
    bad = [c for c in cases if not isinstance(c, AuditCase)]
    if bad:
        report.error = f"audit_cases() returned {type(bad[0]).__name__}, not AuditCase"
        return report, []
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        report.error = f"audit_cases() has duplicate case names {duplicates}"
        return report, []
    report.n_cases = len(cases)
    return report, cases


def _audit_task(module_name: str, case_name: str, targets: tuple[str, ...]) -> list[dict]:
    # Runs in a worker process: import the module there (kernels do not pickle) and audit one case.
    _, cases = load_cases(module_name)
    case = next(c for c in cases if c.name == case_name)
    short = module_name.removeprefix(_PACKAGE + ".")
    return [dataclasses.asdict(audit_case(short, case, t)) for t in targets]


def run_audit(modules: list[str], targets: tuple[str, ...], jobs: int = 1) -> tuple[list[ModuleReport], list[AuditRow]]:
    """Audit every case of ``modules`` for ``targets``; ``jobs`` > 1 compiles cases in worker processes."""
    reports, tasks = [], []
    for name in modules:
        report, cases = load_cases(name)
        reports.append(report)
        tasks += [(name, case) for case in cases]
    rows: list[AuditRow] = []
    if jobs > 1 and len(tasks) > 1:
        # spawn, not fork: the parent already holds torch and triton (threads, CUDA-free but not fork-safe).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(_audit_task, name, case.name, targets) for name, case in tasks]
            for future in futures:
                rows += [AuditRow(**d) for d in future.result()]
    else:
        for name, case in tasks:
            rows += [audit_case(name.removeprefix(_PACKAGE + "."), case, t) for t in targets]
    return reports, rows


def _rerun_without_interpreter(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(os.path.abspath(__file__)).parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    print("TRITON_INTERPRET is set: re-running the audit in a subprocess without it", file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "fastft.kernels.audit", *argv], env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m fastft.kernels.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="restrict to a target (repeatable)")
    parser.add_argument("--module", action="append", help="audit only this module: 'rms_norm' or a dotted path")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes compiling in parallel (default: min(4, cores))",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUTHY:
        return _rerun_without_interpreter(argv)

    start = time.perf_counter()
    targets = tuple(args.target or TARGETS)
    modules = [_resolve_module(m) for m in args.module] if args.module else kernel_modules()
    reports, rows = run_audit(modules, targets, jobs=max(1, args.jobs))
    elapsed = time.perf_counter() - start

    print(
        f"fastft kernel audit: triton {triton.__version__}, targets {', '.join(targets)}; regs/stack from "
        "cuobjdump -res-usage, spill bytes from STL/LDL in nvdisasm SASS, smem from Triton's launch metadata"
    )
    print(format_table(rows) if rows else "(no cases)")
    for report in reports:
        if report.error:
            print(f"ERROR {report.name}: {report.error}")
        elif not report.has_cases:
            print(f"note: {report.name} defines no audit_cases(); nothing audited there")
        elif report.n_cases == 0:
            print(f"note: {report.name}.audit_cases() returned no cases")
    n_spill = sum(r.error is None and r.spills for r in rows)
    n_error = sum(r.error is not None for r in rows) + sum(r.error is not None for r in reports)
    print(f"{len(rows)} rows, {n_spill} spilling, {n_error} errors, {elapsed:.1f} s total")

    if args.json:
        payload = {
            "triton": triton.__version__,
            "targets": list(targets),
            "seconds": round(elapsed, 2),
            "modules": [dataclasses.asdict(r) for r in reports],
            "rows": [{**dataclasses.asdict(r), "spills": r.spills, "ok": r.ok} for r in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
    return 1 if (n_spill or n_error) else 0


if __name__ == "__main__":
    sys.exit(main())
