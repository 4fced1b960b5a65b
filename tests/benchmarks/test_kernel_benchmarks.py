"""The kernel benchmark (fastft.bench.kernels, started by benchmarks/kernels.py) on a CPU: the script mode end to
end (small), the bytes models it borrows from the kernels' audit cases, and its bookkeeping (a failing contender is
recorded, speedups and GB/s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastft.bench import kernels as bench
from fastft.kernels._dispatch import force_backend

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def test_every_bench_finds_its_bytes_model():
    # A renamed audit case would silently drop the GB/s column; the bytes model must resolve.
    for b in bench.benches(CPU):
        for case in (b.fwd_case, b.bwd_case):
            if case is not None:
                assert bench.bytes_model(b, case), f"{b.name}: no audit case {case!r} in {b.module}"
    names = {b.module for b in bench.benches(CPU)}
    assert names == {
        "rms_norm",
        "rms_norm_gated",
        "layer_norm",
        "rope",
        "rope_interleaved",
        "swiglu",
        "geglu",
        "activation",
        "cross_entropy",
        "fused_linear_cross_entropy",
        "moe_experts",
    }


def test_a_failing_contender_is_recorded_not_raised():
    def broken(_device):
        raise RuntimeError("input builder exploded")

    b = bench.KernelBench(name="broken", module="swiglu", build=broken, args=("gate", "up"), shape="n/a")
    result = bench.measure(b, "pytorch", CPU)
    assert result.status == "failed" and "input builder exploded" in result.reason
    assert bench.measure(b, "no-such-contender", CPU).status == "failed"


def test_annotate_speedup_and_bandwidth():
    fast = bench.Result(
        "k", "fastft", "cuda", "s", fwd_ms=1.0, bwd_ms=2.0, total_ms=3.0, fwd_bytes=10**9, bwd_bytes=2 * 10**9
    )
    slow = bench.Result(
        "k", "pytorch", "cuda", "s", fwd_ms=2.0, bwd_ms=3.0, total_ms=6.0, fwd_bytes=10**9, bwd_bytes=2 * 10**9
    )
    missing = bench.Result("k", "liger", "cuda", "s", status="not installed", reason="x")
    bench.annotate([fast, slow, missing], copy_bytes_per_s=2e12)
    assert slow.speedup == {"fwd": 2.0, "bwd": 1.5, "fwdbwd": 2.0}
    assert fast.gbps["fwd"] == 1000.0 and fast.gbps["fwdbwd"] == 1000.0
    assert fast.copy_fraction["bwd"] == 0.5
    assert missing.speedup == {} and missing.gbps == {}


def test_script_mode_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/kernels.py",
            "--out",
            str(tmp_path),
            "--kernels",
            "rms_norm,swiglu",
            "--contenders",
            "fastft,pytorch,liger",
            "--target-s",
            "0.02",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data["meta"]["device_type"] == "cpu" and data["meta"]["copy_gbps"] > 0
    rows = {(r["kernel"], r["contender"]): r for r in data["results"]}
    assert set(rows) == {(k, c) for k in ("rms_norm", "swiglu") for c in ("fastft", "pytorch", "liger")}
    for kernel in ("rms_norm", "swiglu"):
        ours, torch_row = rows[kernel, "fastft"], rows[kernel, "pytorch"]
        assert ours["status"] == "ok" and ours["fwd_ms"] > 0 and ours["bwd_ms"] > 0 and ours["reps"] >= 5
        assert ours["gbps"]["fwdbwd"] > 0 and 0 < ours["fwd_bytes"] < ours["fwd_bytes"] + ours["bwd_bytes"]
        assert set(torch_row["speedup"]) == {"fwd", "bwd", "fwdbwd"}
        assert rows[kernel, "liger"]["status"] in ("not installed", "skipped")  # CUDA only
    report = (tmp_path / "kernels.md").read_text()
    assert "CPU numbers" in report and "## rms_norm" in report and "| fastft |" in report


def test_accuracy_pass_measures_every_output_and_gradient():
    # Under the test session fastft runs its interpreted kernels here; the pass must name every output and
    # every gradient, give finite errors, and catch a wrong implementation.
    b = next(x for x in bench.benches(CPU) if x.name == "swiglu")
    ours = bench.accuracy(b, bench.implementation(b, "fastft", CPU), CPU)
    theirs = bench.accuracy(b, bench.implementation(b, "pytorch", CPU), CPU)
    assert set(ours) == set(theirs) == {"out", "d gate", "d up"}
    assert all(0 <= e < 0.1 for e in ours.values())  # bf16 inputs of size ~1: errors of a few bf16 ulps
    assert all(ours[k] <= 2 * theirs[k] + 1e-2 for k in ours)
    wrong = bench.accuracy(b, lambda inputs: torch.sigmoid(inputs["gate"]) * inputs["up"], CPU)
    assert wrong["out"] > 0.1


def test_moe_row_runs_and_counts_its_flops():
    # Matmul-bound: no bytes model, TFLOP/s from fastft's own FLOPs model (full fine-tuning: 11 GEMMs of 2 S H I,
    # 3 forward, 8 backward). The torch path: the interpreted kernels are tested in tests/kernels.
    b = next(x for x in bench.benches(CPU, tokens=4) if x.module == "moe_experts")
    inputs = b.build(CPU)
    with force_backend("torch"):
        out = bench.implementation(b, "fastft", CPU)(inputs)
    t, h = inputs["hidden"].shape
    assert out.shape == (t, h) and t == 4
    k, i = inputs["top_k_index"].shape[1], inputs["down"].shape[2]
    assert bench._flops(inputs) == 11 * 2 * t * k * h * i
    with pytest.raises(bench.Unavailable, match="data-dependent"):
        bench.implementation(b, "torch.compile", CPU)


def test_a_token_count_override_shrinks_inputs_and_scales_the_bytes_model():
    # The GPU suite's dry run benchmarks every kernel at 4 tokens; the bytes model must follow the token count.
    full, small = bench.benches(CPU), bench.benches(CPU, tokens=4)
    assert [b.name for b in full] == [b.name for b in small] and all(b.tokens == 4 for b in small)
    for big, tiny in zip(full, small):
        if big.fwd_case is not None:
            expected = bench.bytes_model(big, big.fwd_case) * 4 / big.tokens
            assert bench.bytes_model(tiny, tiny.fwd_case) == pytest.approx(expected, rel=0.01), tiny.name
    rms = next(b for b in small if b.name == "rms_norm").build(CPU)
    head = next(b for b in small if b.module == "fused_linear_cross_entropy").build(CPU)
    assert rms["x"].shape[0] == 4 and head["hidden"].shape[0] == 4 and head["labels"].shape == (4,)
