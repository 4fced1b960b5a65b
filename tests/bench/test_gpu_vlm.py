"""The GPU suite's vlm_step part (fastft.bench.vlm) on a CPU: its dry run in process, the report section, and the
Qwen2.5-VL-7B dimensions it builds on the GPU."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fastft.bench import gpu, gpu_report, vlm

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_torch_thread")]


def test_vlm_step_is_a_suite_part_within_the_total_budget():
    assert gpu.PARTS[-2:] == ("vlm_step", "context_parallel")
    assert set(gpu.BUDGETS_S) == set(gpu.PARTS) == set(gpu.DRY_RUN_BUDGETS_S)
    assert sum(gpu.BUDGETS_S.values()) == 500  # the suite's total, under the 9 minutes a run may take


def test_dry_run_trains_every_contender_and_renders(tmp_path):
    results = vlm.part_vlm_step({"dry_run": True, "deadline": time.time() + 600}, lambda payload: None)["results"]
    rows = {r["contender"]: r for r in results["rows"]}
    assert list(rows) == list(vlm.CONTENDERS)
    for row in rows.values():
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and all(map(math.isfinite, row["losses"]))
        assert len(row["losses"]) == vlm.TINY.steps
    # the same random base and adapters for every contender: the first step's loss agrees (fp32-level on the
    # bf16 model's CPU path: bf16 rounding in different places, 1e-2 relative)
    first = [r["losses"][0] for r in rows.values()]
    assert max(first) - min(first) < 1e-2 * first[0], first
    assert rows["plain"]["x_plain"] == 1.0
    part = {"status": "ok", "reason": "", "budget_s": 60.0, "seconds": 1.0, "results": results}
    lines = "\n".join(gpu_report._vlm_section({"vlm_step": part}))
    assert "## Vision-language LoRA step" in lines and "16 visual tokens + 32 text tokens" in lines
    assert all(f"| {c} |" in lines for c in vlm.CONTENDERS)


def test_qwen25_vl_7b_dimensions():
    """One decoder layer and one vision block built on the meta device have Qwen2.5-VL-7B's parameter counts."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    dims = vlm.QWEN25_VL_7B
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(dims.config())
    layer = model.model.language_model.layers[0]
    block = model.model.visual.blocks[0]
    h, i, kv = 3584, 18944, 4 * 128
    # q, k, v with biases; o; gate, up, down; two RMSNorms
    assert sum(p.numel() for p in layer.parameters()) == (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    w, m = 1280, 3420
    # fused qkv and proj with biases; gated MLP with biases; two RMSNorms
    assert (
        sum(p.numel() for p in block.parameters())
        == (w * 3 * w + 3 * w) + (w * w + w) + 2 * (w * m + m) + (m * w + w) + 2 * w
    )
    assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    batch = vlm.sample(vlm.VlmDims(image_tokens=1024, text_tokens=64, vocab=dims.vocab))
    assert batch["pixel_values"].shape == (4096, 1176) and batch["image_grid_thw"].tolist() == [[1, 64, 64]]
