"""The one-GPU check of context parallelism's attention (fastft.bench.context_parallel), dry run on the CPU.

Tolerances: fp32 blocks against float64 attention over the whole sequence, 1e-5 absolute on values of order 1
(measured 1.2e-6: fp32 rounding of the softmax sums); bf16, 0.1 (measured 0.046 on a dv entry: bf16's relative step
is 4e-3 and the inputs, outputs and gradients are each rounded to it).
"""

from __future__ import annotations

import json
import time

from fastft.bench import gpu_report
from fastft.bench.context_parallel import main, part_context_parallel, run


def test_dry_run_reports_every_number_and_small_errors(capsys):
    result = run(dry_run=True)
    assert result["shape"]["tokens"] == result["shape"]["ranks"] * result["shape"]["tokens_per_rank"]
    assert result["kernels"]["total_ms"] > 0 and result["kernels"]["math_scores_bytes"] > 0
    assert all(value > 0 for value in result["balance"].values())
    for dtype, bound in (("float32", 1e-5), ("bfloat16", 0.1)):
        errors = result["errors"][dtype]
        assert errors.pop("head_tail_order_exact") is True
        assert len(errors) == 8 and all(0 <= e < bound for e in errors.values()), (dtype, errors)
    assert main(["--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"]["device"] == "cpu"


def test_a_measurement_not_started_by_the_deadline_is_skipped_and_reported():
    # The GPU suite's part: each measurement saved as it ends; past the deadline none starts, and the report says so.
    saved = []  # what the worker writes at each emit: a snapshot, as JSON
    spec = {"dry_run": True, "deadline": time.time() - 1}
    results = part_context_parallel(spec, lambda payload: saved.append(json.loads(json.dumps(payload))))["results"]
    assert [list(p["results"]) for p in saved] == [["shape", "kernels"], ["shape", "kernels", "balance"], list(results)]
    assert all(results[k] == {"skipped": "time budget"} for k in ("kernels", "balance", "errors"))
    section = "\n".join(gpu_report._context_parallel_section({"context_parallel": {"results": results}}))
    assert "Skipped: kernels: time budget; balance: time budget; errors: time budget." in section
    assert "| last (slowest) | contiguous | - | - | - | - |" in section and "| float32 |" not in section
