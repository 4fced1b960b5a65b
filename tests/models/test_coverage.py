"""The coverage command on every causal LM type of the installed transformers: no crash, no difference, and the
whole fast path on the families people fine-tune now.

``python -m fastft.models.coverage`` runs once for the module (each type in its own process, see its docstring for
how a difference is judged against float64); the tests read the ``coverage.json`` it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every block kind of these families runs on fastft's kernels, the loss is fused, and what stays on
# transformers' code is only what the next issues bring (routed experts) or what has no kernel by design here
# (state-space and linear-attention mixers, short convolutions).
FULLY_PATCHED = [
    "llama", "mistral", "ministral", "ministral3", "qwen2", "qwen3", "qwen3_5_text", "qwen3_next", "gemma", "gemma2",
    "gemma3_text", "gemma3", "gemma4_text", "gemma4", "phi3", "phi", "granite", "granitemoehybrid", "olmo2", "olmo3",
    "smollm3", "exaone4", "glm4", "cohere2", "seed_oss", "hunyuan_v1_dense", "apertus", "nemotron", "starcoder2",
    "gpt_oss", "gpt2", "lfm2", "falcon_h1",
]  # fmt: skip
ALLOWED_LEFT = ("routed experts", "state-space or linear-attention mixer")


@pytest.fixture(scope="module")
def coverage(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("coverage")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "fastft.models.coverage", "--out", str(out), "--timeout", "400"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=3000,
    )
    assert (out / "coverage.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((out / "coverage.json").read_text())["rows"]
    return {row["model_type"]: row for row in rows}


def test_no_type_crashes_differs_or_hangs(coverage):
    bad = {t: (r["result"], r["detail"]) for t, r in coverage.items() if r["result"] in ("crash", "differs", "timeout")}
    assert not bad, bad


def test_every_causal_lm_type_was_checked(coverage):
    from fastft.models.coverage import causal_lm_types

    assert sorted(coverage) == causal_lm_types()
    built = [t for t, r in coverage.items() if r["result"] not in ("not built", "transformers fails")]
    assert len(built) >= 0.9 * len(coverage), f"only {len(built)} of {len(coverage)} tiny models could be built"


@pytest.mark.parametrize("model_type", FULLY_PATCHED)
def test_the_families_people_fine_tune_are_fully_patched(coverage, model_type):
    row = coverage[model_type]
    assert row["result"] == "equal", (row["result"], row["detail"])
    assert row["fused_loss"] and row["norms"] > 0 and row["attentions"] > 0, row
    left = {kind: reason for kind, reason in row["skipped"].items() if not reason.startswith(ALLOWED_LEFT)}
    assert not left, left
    assert row["saved_fastft"] < row["saved_plain"], "fastft must keep less for backward than plain + PEFT"


# The mixture-of-experts families of issue 12: routed experts on fastft's grouped kernel too.
MOE_FULLY_PATCHED = [
    "qwen3_moe", "qwen3_5_moe", "mixtral", "olmoe", "gpt_oss", "glm4_moe", "deepseek_v3", "granitemoe", "phimoe",
    "qwen2_moe", "llama4_text", "deepseek_v2", "glm4_moe_lite", "kimi_linear",
]  # fmt: skip


@pytest.mark.parametrize("model_type", MOE_FULLY_PATCHED)
def test_the_moe_families_run_their_experts_on_fastft(coverage, model_type):
    row = coverage[model_type]
    assert row["result"] == "equal", (row["result"], row["detail"])
    assert row["experts"] > 0 and row["fused_loss"] and row["attentions"] > 0, row
    left = {kind: reason for kind, reason in row["skipped"].items() if not reason.startswith(ALLOWED_LEFT[1:])}
    assert not left, left
    assert row["saved_fastft"] < row["saved_plain"]


def test_the_fused_loss_is_on_wherever_the_head_is_a_plain_linear_layer(coverage):
    """Where fastft patched something and left the loss alone, the report must say why."""
    for model_type, row in coverage.items():
        if row["result"] == "equal" and not row["fused_loss"]:
            assert "loss" in row["skipped"] or "lm_head" in row["skipped"], model_type


def test_the_readme_family_table_is_this_run(coverage):
    """README.md's table is written by ``fastft coverage --readme README.md``; it must say what this run says."""
    import transformers

    from fastft.models.coverage import README_BEGIN, README_END, _row_from_dict, causal_lm_types, readme_table, versions

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n") + "\n"
    if f"transformers {transformers.__version__}:" not in block:
        pytest.skip(f"README's table was measured on another transformers than {transformers.__version__}")
    rows = [_row_from_dict(dict(coverage[t])) for t in causal_lm_types()]
    assert block == readme_table(rows, versions()), "regenerate it: fastft coverage --readme README.md"
