"""The compile audit (``python -m fastft.kernels.audit``).

The pytest process runs with TRITON_INTERPRET=1 (tests/conftest.py), where ``@triton.jit`` yields
interpreter objects that cannot be compiled, so every compile happens in a subprocess without it:

- the real audit of every kernel module: rows for both targets, no spill, no error, sane numbers;
- the audit of the two toy kernels below (this module doubles as a kernel module: it defines
  ``audit_cases()``), started *with* TRITON_INTERPRET=1 so the audit's own re-run is tested too;
- a cross-check of the audit's specialisation against the JIT's own binder, and of the spill bytes
  counted in the SASS against ``ptxas -v``.

The SASS / cuobjdump parsers are also tested in-process on canned text.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from fastft.kernels import audit
from fastft.kernels._spec import AuditCase, Ptr

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------
# Toy kernels: one clean (exercises every specialisation rule), one that must spill
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _audit_toy_kernel(x_ptr, w_ptr, y_ptr, stride, n_cols, inner, eps, flag, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 before the stride multiply: no int32 overflow
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride + cols * inner, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(flag, y, -y)
    tl.store(y_ptr + row * stride + cols * inner, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _audit_spill_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # 8192 fp32 values in one warp: 256 per thread, more than the 255 registers a thread can have.
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + cols, mask=cols < n, other=0.0)
    tl.store(y_ptr + cols, tl.exp(x - tl.max(x, axis=0)) / tl.sum(x, axis=0), mask=cols < n)


TOY_ARGS = {
    "x_ptr": Ptr("bf16"),
    "w_ptr": None,
    "y_ptr": Ptr("bf16"),
    "stride": 4096,
    "n_cols": 4000,
    "inner": 1,
    "eps": 1e-6,
    "flag": True,
}
TOY_SPECIALISATION = (
    "x_ptr:*bf16/16 w_ptr:=None y_ptr:*bf16/16 stride:i32/16 n_cols:i32/16 inner:=1 eps:fp32 flag:u1 "
    "HAS_W:=False BLOCK:=4096"
)


def audit_cases() -> list[AuditCase]:
    return [
        AuditCase(
            "toy",
            _audit_toy_kernel,
            TOY_ARGS,
            constexprs={"HAS_W": False, "BLOCK": 4096},
            num_warps=8,
            shape="8192x4000 bf16",
            min_bytes=2 * 2 * 8192 * 4000,
        ),
        AuditCase(
            "spill",
            _audit_spill_kernel,
            {"x_ptr": Ptr("fp32"), "y_ptr": Ptr("fp32"), "n": 8000},
            constexprs={"BLOCK": 8192},
            num_warps=1,
            num_stages=1,
            shape="8192 fp32",
            min_bytes=8 * 8000,
        ),
        # tl.arange needs a power-of-2 range: Triton refuses to compile this one.
        AuditCase("broken", _audit_toy_kernel, TOY_ARGS, constexprs={"HAS_W": False, "BLOCK": 3000}),
    ]


def _compile_with_ptxas_log(case: AuditCase, target: str):
    """Compile bypassing Triton's cache with Triton's own ``ptxas -v`` log printed, and capture that log."""
    import contextlib
    import io

    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.nvidia, "dump_ptxas_log"):
        return audit.compile_case(case, target)[0], None
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(io.StringIO()) as log:
            compiled, _ = audit.compile_case(case, target)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return compiled, log.getvalue()


def _parse_ptxas_verbose(text: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from ``ptxas -v`` output."""
    out = {}
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text):
        out.update(stack=int(m.group(1)), spill_store_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3)))
    if m := re.search(r"Used (\d+) registers", text):
        out["reg"] = int(m.group(1))
    return out


def _subprocess_checks() -> dict:
    """Run without TRITON_INTERPRET (in a subprocess): the audit's specialisation vs the JIT's, Triton's own
    ``ptxas -v`` log vs the spill bytes the audit counts in the SASS."""
    import torch

    toy, spill, _ = audit_cases()
    out: dict = {"audit_specialisation": audit.specialise(toy).describe()}
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", 90, 32))
        kernel = toy.kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        values = {**toy.args, **toy.constexprs}
        tensor = torch.empty(64, dtype=torch.bfloat16)  # PyTorch's allocator aligns far beyond 16 bytes
        call = [tensor if isinstance(values[name], Ptr) else values[name] for name in kernel.arg_names]
        bound, specialization, options = binder(*call)
        _, signature, constexprs, attrs = kernel._pack_args(backend, {}, bound, specialization, options)
        spec = audit.Specialisation(signature, {k: v for k, v in constexprs.items()}, dict(attrs))
        out["jit_specialisation"] = spec.describe()
    except (ImportError, AttributeError, TypeError) as exc:  # private JIT API of another triton version
        out["jit_skip"] = f"triton {triton.__version__}: JIT binder API differs ({type(exc).__name__}: {exc})"

    for arch in (80, 90):
        compiled, log = _compile_with_ptxas_log(spill, f"sm{arch}")
        out[f"sass_sm{arch}"] = audit.inspect_cubin(compiled.asm["cubin"], compiled.metadata.name)
        out[f"ptxas_sm{arch}"] = _parse_ptxas_verbose(log) if log is not None else None

    bad = AuditCase("bad", _audit_spill_kernel, {"x_ptr": Ptr("fp32"), "y_ptr": Ptr("fp32"), "nn": 3})
    try:
        audit.specialise(bad)
    except ValueError as exc:
        out["bad_args_error"] = str(exc)
    return out


# ----------------------------------------------------------------------------------------------------
# Subprocess plumbing
# ----------------------------------------------------------------------------------------------------


def _env(interpret: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _start(args: list[str], interpret: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(interpret),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # teardown ends the audit's worker processes with it (they hold its pipes)
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def subprocesses(tmp_path_factory) -> dict:
    """The three subprocesses of this file, started together (each is mostly one core's serial work)."""
    tmp = tmp_path_factory.mktemp("audit")
    code = f"import json, {__name__} as t; print('@@' + json.dumps(t._subprocess_checks()))"
    procs = {
        "real": (_start(["-m", "fastft.kernels.audit", "--json", str(tmp / "real.json")]), tmp / "real.json"),
        "toy": (
            _start(
                ["-m", "fastft.kernels.audit", "--module", __name__, "--json", str(tmp / "toy.json")], interpret=True
            ),
            tmp / "toy.json",
        ),
        "checks": (_start(["-c", code]), None),
    }
    results: dict = {}
    yield lambda name: results.setdefault(name, _finish(procs[name][0])), {k: v[1] for k, v in procs.items()}
    for proc, _ in procs.values():  # unfinished when only some tests were selected
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _audit_result(subprocesses, name: str) -> tuple[subprocess.CompletedProcess, dict]:
    wait, paths = subprocesses
    result = wait(name)
    assert paths[name].exists(), f"the audit wrote no JSON:\n{result.stdout}\n{result.stderr}"
    return result, json.loads(paths[name].read_text())


@pytest.fixture(scope="module")
def real_audit(subprocesses) -> tuple[subprocess.CompletedProcess, dict]:
    return _audit_result(subprocesses, "real")


@pytest.fixture(scope="module")
def toy_audit(subprocesses) -> tuple[subprocess.CompletedProcess, dict]:
    return _audit_result(subprocesses, "toy")


@pytest.fixture(scope="module")
def checks(subprocesses) -> dict:
    result = subprocesses[0]("checks")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.split("@@", 1)[1])


# ----------------------------------------------------------------------------------------------------
# The real audit
# ----------------------------------------------------------------------------------------------------


def _own_triton_kernels(module_name: str) -> list[str]:
    """``@triton.jit`` functions defined in (not imported into) a module; interpreted or compiled alike."""
    module = importlib.import_module(module_name)
    found = []
    for name, obj in vars(module).items():
        jitted = type(obj).__name__ in ("JITFunction", "InterpretedFunction")
        if jitted and getattr(getattr(obj, "fn", None), "__module__", None) == module_name:
            found.append(name)
    return found


def test_real_audit_every_module_both_targets_no_spill(real_audit):
    result, data = real_audit
    modules = [m.removeprefix("fastft.kernels.") for m in audit.kernel_modules()]
    assert modules, "no kernel module found in fastft.kernels"
    report = result.stdout + result.stderr
    module_errors = [m for m in data["modules"] if m["error"]]
    assert not module_errors, f"kernel modules failed to load: {module_errors}\n{report}"
    rows = data["rows"]
    for module in modules:
        entry = next(m for m in data["modules"] if m["name"] == f"fastft.kernels.{module}")
        if entry["n_cases"] == 0:
            # Allowed only for a module that launches no Triton kernel of its own (its GEMMs are cuBLAS,
            # its row kernel lives in another module and is audited there).
            own = _own_triton_kernels(f"fastft.kernels.{module}")
            assert not own, f"{module} defines Triton kernels {own} but audit_cases() covers none of them"
            continue
        for target in ("sm80", "sm90"):
            assert any(r["module"] == module and r["target"] == target for r in rows), (
                f"{module}: no audit row for {target}\n{report}"
            )
    errors = [f"{r['module']}.{r['case']} {r['target']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    spills = [f"{r['module']}.{r['case']} {r['target']}" for r in rows if r["spills"]]
    assert not spills, f"spilling kernels: {spills}\n{report}"
    for r in rows:
        name = f"{r['module']}.{r['case']} {r['target']}"
        assert 0 < r["regs"] <= 255, name
        assert r["ldg"] > 0 and 0 <= r["ldg128"] <= r["ldg"], name
        assert r["min_bytes"] > 0, f"{name}: the case has no bytes model (min_bytes)"
        assert r["specialisation"], name
    assert result.returncode == 0, report


# ----------------------------------------------------------------------------------------------------
# The toy kernels, end to end
# ----------------------------------------------------------------------------------------------------


def test_toy_audit_reruns_without_interpreter(toy_audit):
    result, _ = toy_audit
    assert "re-running the audit in a subprocess without it" in result.stderr


def test_toy_audit_rows(toy_audit):
    result, data = toy_audit
    rows = {(r["case"], r["target"]): r for r in data["rows"]}
    assert set(rows) == {(c, t) for c in ("toy", "spill", "broken") for t in ("sm80", "sm90")}, result.stdout
    for target in ("sm80", "sm90"):
        toy = rows["toy", target]
        assert toy["error"] is None and not toy["spills"], toy
        assert toy["specialisation"] == TOY_SPECIALISATION
        assert 0 < toy["regs"] < 255 and toy["stack"] == 0
        # inner == 1 became a constant, so the row loads and stores are contiguous: 128-bit wide.
        assert toy["ldg"] > 0 and toy["ldg128"] == toy["ldg"], toy
        assert toy["stg"] > 0 and toy["stg128"] == toy["stg"], toy
        assert toy["num_warps"] == 8 and toy["min_bytes"] == 2 * 2 * 8192 * 4000
        spill = rows["spill", target]
        assert spill["error"] is None and spill["spills"], spill
        assert spill["regs"] == 255 and spill["stack"] > 0 and spill["spill_store_bytes"] > 0
        assert "power of 2" in rows["broken", target]["error"]
    assert result.returncode == 1, "a spilling or failing case must fail the audit"
    assert "ERROR tests.kernels.test_audit.broken [sm90]: CompilationError" in result.stdout
    assert "SPILL" in result.stdout and "131 MB" in result.stdout  # human units of min_bytes


def test_specialisation_matches_the_jit(checks):
    if "jit_skip" in checks:
        pytest.skip(checks["jit_skip"])
    assert checks["audit_specialisation"] == checks["jit_specialisation"] == TOY_SPECIALISATION


@pytest.mark.parametrize("target", ["sm80", "sm90"])
def test_sass_spill_bytes_match_ptxas(checks, target):
    sass, ptxas = checks[f"sass_{target}"], checks[f"ptxas_{target}"]
    if ptxas is None:
        pytest.skip(f"triton {triton.__version__} has no knob to print its ptxas log")
    assert ptxas["spill_store_bytes"] > 0, "the toy kernel no longer spills; make it bigger"
    assert (sass["spill_store_bytes"], sass["spill_load_bytes"]) == (
        ptxas["spill_store_bytes"],
        ptxas["spill_load_bytes"],
    )
    assert (sass["reg"], sass["stack"]) == (ptxas["reg"], ptxas["stack"])


def test_bad_argument_names_the_parameter(checks):
    assert "['nn'] are not parameters of _audit_spill_kernel" in checks["bad_args_error"]


# ----------------------------------------------------------------------------------------------------
# In-process: parsers, discovery errors, the interpreter guard
# ----------------------------------------------------------------------------------------------------

SASS = """
        /*0180*/              @!P2 LDG.E.128 R8, desc[UR10][R14.64] ;
        /*0190*/                   LDG.E.EL.64 R2, desc[UR10][R4.64] ;
        /*01a0*/              @P0  LDG.E.U16 R6, desc[UR10][R4.64] ;
        /*01b0*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R8.64] ;
        /*01c0*/                   LDG.E.LTC128B R7, desc[UR10][R4.64] ;
        /*01d0*/                   STL [R1+0x4], R9 ;
        /*01e0*/                   STL.64 [R1+0x8], R10 ;
        /*01f0*/                   LDL.LU.128 R12, [R1+0x10] ;
        /*0200*/              @!UP0 STG.E.128 desc[UR10][R2.64], R4 ;
        /*0210*/                   STG.E desc[UR10][R2.64], R9 ;
        /*0220*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
"""


def test_parse_sass_counts_widths():
    counts = audit.parse_sass(SASS)
    assert counts == {
        "ldg": 5,
        "ldg128": 2,
        "stg": 2,
        "stg128": 1,
        "stl": 2,
        "ldl": 1,
        "spill_store_bytes": 4 + 8,
        "spill_load_bytes": 16,
        "ldg_bits": {128: 2, 64: 1, 32: 1, 16: 1},
        "stg_bits": {128: 1, 32: 1},
    }


def test_parse_res_usage_picks_the_kernel():
    text = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function other_kernel:
  REG:200 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _toy_kernel:
  REG:29 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert audit.parse_res_usage(text, "_toy_kernel") == {"reg": 29, "stack": 0, "shared": 1024, "local": 8}
    with pytest.raises(ValueError, match="no function 'missing'"):
        audit.parse_res_usage(text, "missing")


def test_parse_ptxas_verbose():
    text = (
        "ptxas info    : Function properties for k\n"
        "    600 bytes stack frame, 364 bytes spill stores, 412 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers, 600 bytes cumulative stack size\n"
    )
    assert _parse_ptxas_verbose(text) == {"stack": 600, "spill_store_bytes": 364, "spill_load_bytes": 412, "reg": 255}


def test_human_bytes():
    assert [audit.human_bytes(n) for n in (0, 999, 1000, 134_217_728, 2.5e12)] == [
        "0 B",
        "999 B",
        "1 kB",
        "134 MB",
        "2.5 TB",
    ]


def test_import_failure_is_reported_not_skipped():
    report, cases = audit.load_cases("tests.kernels.no_such_kernel_module")
    assert cases == [] and report.error.startswith("import failed: ModuleNotFoundError")


def test_interpreted_kernel_is_refused_with_the_way_out():
    if type(_audit_toy_kernel).__name__ != "InterpretedFunction":
        pytest.skip("TRITON_INTERPRET is not set in this process")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        audit.specialise(audit_cases()[0])
