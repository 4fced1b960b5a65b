"""The one-shot GPU suite (fastft.bench.gpu) on a CPU: its ``--dry-run`` end to end in a subprocess (every part, the
JSON and markdown, per-part statuses, a missing peer reported as "not installed"), a part killed at its budget
while the rest still runs, the README table, and the model-FLOPs formula behind MFU."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastft.bench import gpu, gpu_parts
from fastft.bench.kernels import benches

ROOT = Path(__file__).resolve().parents[2]


def _run_suite(out: Path, *args: str) -> subprocess.CompletedProcess:
    # Without TRITON_INTERPRET, as a user runs it (the suite's workers take fastft's torch path on a CPU).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "fastft.bench", "gpu", "--dry-run", "--out", str(out), *args]
    timeout = sum(gpu.DRY_RUN_BUDGETS_S.values()) + 60  # every part may use its whole budget on a busy machine
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _record(out: Path) -> tuple[dict, str]:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-dry-run")
    done = _run_suite(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _record(out)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def test_dry_run_records_every_part(dry_run):
    record, _ = dry_run
    meta, parts = record["meta"], record["parts"]
    assert meta["dry_run"] is True and meta["device_type"] == "cpu" and meta["stem"].startswith("dry-run-cpu-")
    assert list(parts) == list(gpu.PARTS)
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part["reason"])
        assert 0 < part["seconds"] <= part["budget_s"] and part["results"], name
    device = parts["device"]["results"]
    assert device["copy_bytes_per_s"] > 1e8 and device["matmul_flops_per_s"] > 1e6  # any CPU does better
    assert meta["liger_kernel"] == ("not installed" if not _installed("liger_kernel") else meta["liger_kernel"])


def test_dry_run_kernels_part(dry_run):
    rows = {(r["kernel"], r["contender"]): r for r in dry_run[0]["parts"]["kernels"]["results"]["rows"]}
    kernels = {b.name: b for b in benches(torch.device("cpu"))}
    assert set(rows) == {(k, c) for k in kernels for c in ("fastft", "pytorch", "liger")}  # no torch.compile
    for kernel, b in kernels.items():
        ours = rows[kernel, "fastft"]
        assert ours["status"] == "ok" and ours["fwd_ms"] > 0 and ours["bwd_ms"] > 0 and ours["errors"]
        assert rows[kernel, "pytorch"]["speedup"]["fwdbwd"] > 0
        liger = rows[kernel, "liger"]
        # A kernel Liger has no equivalent of (b.liger is None) is skipped whether or not Liger is installed.
        expected = "skipped" if _installed("liger_kernel") or b.liger is None else "not installed"
        assert liger["status"] == expected, liger
    # Fraction of the measured bandwidth: the bytes model at the dry run's 4 tokens over the time.
    assert 0 < rows["rms_norm", "fastft"]["copy_fraction"]["fwdbwd"]
    assert rows["rms_norm", "fastft"]["fwd_bytes"] == pytest.approx(4 * 4096 * 2 * 2, rel=0.01)  # x in, y out


def test_dry_run_lora_step_part(dry_run):
    results = dry_run[0]["parts"]["lora_step"]["results"]
    rows = {(r["quant"], r["contender"], r["checkpointing"]): r for r in results["rows"]}
    assert list(rows) == list(gpu_parts.LORA_PLAN)
    for (quant, contender, _), row in rows.items():
        if contender == "liger":
            assert row["status"] == ("skipped" if _installed("liger_kernel") else "not installed"), row
        elif quant == "4bit" and not _installed("bitsandbytes"):
            assert row["status"] == "not installed" and "bitsandbytes" in row["reason"]
        else:  # bitsandbytes quantises on the CPU: the 4-bit rows run in the dry run too
            assert row["status"] == "ok", row
            assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["saved_bytes"] > 0
            assert len(row["losses"]) == gpu_parts.TINY.steps and row["x_plain"] > 0
    # Every contender trains the same weights on the same tokens: first losses agree to bf16 rounding (~1e-3).
    for quant in ("bf16", "4bit") if _installed("bitsandbytes") else ("bf16",):
        plain, ours = rows[quant, "plain", "none"]["losses"][0], rows[quant, "fastft", "none"]["losses"][0]
        assert abs(plain - ours) < 0.02, (quant, plain, ours)


def test_dry_run_max_context_part(dry_run):
    results = dry_run[0]["parts"]["max_context"]["results"]
    cap = results["cap_bytes"]
    for row in results["rows"]:
        if row["contender"] == "liger":
            assert row["status"] == ("skipped" if _installed("liger_kernel") else "not installed")
            continue
        assert row["status"] == "ok" and row["longest"] >= gpu_parts.TINY.first_probe and row["stopped"], row
        for probe in row["probes"]:  # the answer agrees with every probe it rests on
            assert probe["fits"] == (probe["seq_len"] <= row["longest"]), row["probes"]
            assert probe["fits"] == (probe["bytes"] <= cap)


def test_dry_run_context_parallel_part(dry_run):
    # fastft.bench.context_parallel's check as the suite's last part, and its section of the report; the check's
    # numbers themselves are tested in tests/bench/test_context_parallel.py (fp32 bound 1e-5 from there).
    results = dry_run[0]["parts"]["context_parallel"]["results"]
    assert gpu.PARTS[-1] == "context_parallel" and results["shape"]["device"] == "cpu"
    assert results["kernels"]["total_ms"] == results["balance"]["contiguous_slowest_ms"] > 0
    assert all(ms > 0 for ms in results["balance"].values())
    assert results["errors"]["float32"]["head_tail_order_exact"] is True
    assert 0 <= results["errors"]["float32"]["head_tail_dv"] < 1e-5
    report = dry_run[1]
    assert report.index("## Vision-language LoRA step") < report.index("## Context parallelism's attention blocks")
    assert "as with 4 ranks of 64 tokens (256 in all)" in report
    assert "| last (slowest) | contiguous |" in report and "| 0 | head-tail |" in report
    assert "| float32 | head-tail |" in report and "| bfloat16 | contiguous |" in report


def test_dry_run_markdown(dry_run):
    _, report = dry_run
    assert report.startswith("# fastft GPU suite (dry run")
    for part in ("device", "kernels", "lora_step", "max_context", "vlm_step", "context_parallel"):
        assert f"| {part} | ok |" in report
    assert "## Kernels" in report and "| rms_norm | fastft |" in report and "## Max context" in report
    assert "| bf16 | plain | none |" in report
    if not _installed("liger_kernel"):
        assert "| bf16 | liger | none | - |" in report and "not installed: liger-kernel" in report


def test_a_part_over_its_budget_is_a_timeout_and_the_next_part_runs(tmp_path):
    done = _run_suite(tmp_path, "--parts", "device,kernels", "--budget", "device=0.2")
    assert done.returncode == 1, done.stderr[-3000:]  # a part that ran out of time fails the run
    record, report = _record(tmp_path)
    parts = record["parts"]
    assert parts["device"]["status"] == "timeout" and "budget" in parts["device"]["reason"]
    assert parts["kernels"]["status"] == "ok" and parts["kernels"]["results"]["copy_bytes_per_s"] > 0
    assert parts["lora_step"]["status"] == parts["max_context"]["status"] == "skipped"
    assert "| device | timeout: killed at its budget" in report


def _as_gpu_record(record: dict, date: str, name: str) -> dict:
    fake = copy.deepcopy(record)
    fake["meta"].update(dry_run=False, device_type="cuda", date=f"{date}T12:00:00+00:00", stem=f"{name}-{date}")
    fake["parts"]["device"]["results"]["name"] = name
    return fake


def test_readme_table_renders_the_newest_gpu_result(dry_run, tmp_path):
    record, _ = dry_run
    assert gpu.readme_table(tmp_path).startswith("No GPU run has happened yet")
    (tmp_path / f"{record['meta']['stem']}.json").write_text(json.dumps(record))
    assert gpu.readme_table(tmp_path).startswith("No GPU run has happened yet")  # a dry run is not a GPU result
    for date, name in (("2026-01-02", "NVIDIA H200"), ("2025-12-30", "NVIDIA H100 80GB HBM3")):
        fake = _as_gpu_record(record, date, name)
        (tmp_path / f"{fake['meta']['stem']}.json").write_text(json.dumps(fake))
    table = gpu.readme_table(tmp_path)
    assert table.startswith("GPU results: **NVIDIA H200**, 2026-01-02") and "H100" not in table
    assert "NVIDIA H200-2026-01-02.md" in table  # a link to the full report
    assert "| rms_norm |" in table and "| bf16 | fastft | none |" in table and "| fastft | offload |" in table
    if not _installed("liger_kernel"):
        assert "not installed" in table


def test_update_readme_rewrites_between_the_markers(dry_run, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    fake = _as_gpu_record(dry_run[0], "2026-01-02", "NVIDIA H200")
    (results / "nvidia-h200-2026-01-02.json").write_text(json.dumps(fake))
    readme = tmp_path / "README.md"
    start, end = gpu.MARKERS
    readme.write_text(f"# fastft\n\nintro\n\n{start}\nold table\n{end}\n\nafter\n")
    assert gpu.main(["--update-readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith("# fastft\n\nintro\n\n") and text.endswith(f"{end}\n\nafter\n") and "old table" not in text
    assert f"{start}\n{gpu.readme_table(results)}{end}" in text
    gpu.update_readme(readme, results)  # idempotent
    assert readme.read_text() == text
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="gpu-results:start"):
        gpu.update_readme(readme, results)
    with pytest.raises(SystemExit):  # the command says the same, without a traceback
        gpu.main(["--update-readme", str(readme), "--results", str(results)])


def test_train_flops_per_token_counts_the_models_own_weights():
    # The frozen matmul weights N and the LoRA parameters, counted from the real module shapes (on the meta device).
    from transformers import LlamaForCausalLM

    dims = gpu_parts.LLAMA31_8B
    with torch.device("meta"):
        model = LlamaForCausalLM(dims.config())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.03e9, rel=0.005)  # Llama-3.1-8B
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # 7 per layer + lm_head
    frozen = sum(m.weight.numel() for m in linears)
    lora = sum(dims.rank * (m.in_features + m.out_features) for m in linears if m is not model.lm_head)
    seq = 4096
    attention = 6 * dims.layers * dims.heads * dims.head_dim * seq  # causal QK^T and PV: 2 fwd + 4 bwd
    assert gpu_parts.train_flops_per_token(dims, seq) == 4 * frozen + 6 * lora + attention
    assert frozen == pytest.approx(7.50e9, rel=0.005)


def test_command_line_errors_name_the_way_out(tmp_path, capsys):
    cases = [
        ([], "--out DIR"),
        (["--out", str(tmp_path), "--dry-run", "--parts", "device,gpu"], "unknown ['gpu']"),
        (["--out", str(tmp_path), "--dry-run", "--budget", "kernels=soon"], "PART=SECONDS"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--out", str(tmp_path)], "--dry-run"))
    for argv, message in cases:
        with pytest.raises(SystemExit):
            gpu.main(argv)
        assert message in capsys.readouterr().err, argv


def test_max_context_starts_no_probe_past_its_deadline():
    # With its time spent, the search reports "time budget" rather than a length that does not fit, and a
    # configuration that has no time left is skipped, not started.
    task = {
        "task": "max_context_one",
        "dry_run": True,
        "deadline": time.time() - 1,
        "cap_bytes": 10**6,
        "dims": dataclasses.asdict(gpu_parts.TINY),
        "quant": "bf16",
        "contender": "plain",
        "checkpointing": "standard",
    }
    row = gpu_parts._max_context_one(task, lambda _: None)
    assert row["longest"] is None and row["probes"] == [] and row["stopped"].startswith("time budget")
    skipped = gpu_parts._sub_task(task, torch.device("cpu"), min_start_s=0)
    assert skipped["status"] == "skipped" and "time budget" in skipped["reason"]
