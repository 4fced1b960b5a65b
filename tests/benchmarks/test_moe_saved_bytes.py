"""benchmarks/moe_saved_bytes.py: fastft's experts save <= 0.5x of transformers' eager and grouped_mm experts.

Issue 12's target, measured exactly on the CPU (saved_tensors_hooks, each storage once, parameters apart) at a
small shape of the same proportions as the benchmark's (the script at the brief's shape takes minutes on 2 cores):
Qwen3-MoE and gpt-oss experts, full fine-tuning and PEFT target_parameters LoRA. fastft keeps exactly hidden, the
top-k indices and the top-k weights.
"""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import moe_saved_bytes as bench

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("gpt_oss", [False, True], ids=["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fastft_saves_at_most_half_of_transformers(mode, gpt_oss):
    shape = dataclasses.replace(bench.TINY, gpt_oss=gpt_oss)
    rows = {r["contender"]: r for r in bench.measure(shape, mode, contenders=("eager", "grouped_mm", "fastft"))}
    ours = rows["fastft"]
    T, H, K = shape.tokens, shape.hidden, shape.top_k
    assert sorted(t[0] for t in ours["tensors"]) == sorted([(T, H), (T, K), (T, K)])
    for contender in ("eager", "grouped_mm"):
        assert ours["activation_bytes"] <= 0.5 * rows[contender]["activation_bytes"], (contender, rows[contender])
    assert "| fastft |" in bench.markdown(shape, list(rows.values()))
