"""The MoE benchmark (fastft.bench.moe, gpu_moe): tiny configs of the preset model types on the CPU.

What the numbers must say: every contender trains the same model (the same losses from the same seed), and one MoE
layer of fastft keeps at most half the bytes for backward that transformers' eager and grouped_mm experts keep
(the issue's bound), in LoRA (experts adapted) and full fine-tuning.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from fastft.bench import cli, gpu_moe, moe
from fastft.bench.presets import PRESETS, Preset, preset_config
from fastft.kernels import force_backend
from fastft.models.tiny_configs import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Losses of one model trained by each contender: transformers' implementations and fastft reorder fp32 sums only.
LOSS_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _torch_path():
    with force_backend("torch"):
        yield


@pytest.mark.parametrize(("model_type", "modes"), [("qwen3_moe", ("lora", "full")), ("gpt_oss", ("lora",))])
def test_one_moe_layer_saves_at_most_half_of_transformers(model_type, modes):
    rows = moe.compare(
        tiny_config(model_type),
        modes=modes,
        contenders=("eager", "grouped_mm", "fastft"),
        tokens=64,
        steps=2,
        dtype=torch.float32,
    )
    assert all(r["status"] == "ok" for r in rows), [(r["contender"], r.get("reason")) for r in rows]
    for mode in modes:
        by = {r["contender"]: r for r in rows if r["mode"] == mode}
        ours = by["fastft"]
        for base in ("eager", "grouped_mm"):
            assert ours["layer_saved_bytes"] <= 0.5 * by[base]["layer_saved_bytes"], (mode, base, ours, by[base])
            assert ours[f"layer_saved_of_{base}"] <= 0.5
            for a, b in zip(ours["losses"], by[base]["losses"]):
                assert abs(a - b) <= LOSS_RTOL * abs(b), (mode, base, ours["losses"], by[base]["losses"])
        assert ours["losses"][-1] != ours["losses"][0], "the steps must train something"
        assert ours["tokens_per_s"] > 0 and ours["saved_bytes"] < by["grouped_mm"]["saved_bytes"]
        # What one layer keeps is listed: the hidden states, the routing, nothing (tokens x top-k x width)-sized.
        hidden = tiny_config(model_type).hidden_size
        assert ours["layer_saved_tensors"] and all(
            t["shape"][-1] in (hidden, 2, 4, tiny_config(model_type).num_experts_per_tok) or len(t["shape"]) == 1
            for t in ours["layer_saved_tensors"]
        ), ours["layer_saved_tensors"]


def test_presets_have_the_published_expert_dimensions():
    qwen = preset_config("qwen3-30b-a3b", 2)
    dims = (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size, qwen.hidden_size)
    assert dims == (128, 8, 768, 2048)
    assert qwen.num_hidden_layers == 2 and moe.is_moe(qwen)
    oss = preset_config("gpt-oss-20b", 2)
    dims = (oss.num_local_experts, oss.num_experts_per_tok, oss.intermediate_size, oss.swiglu_limit)
    assert dims == (32, 4, 2880, 7.0)
    assert oss.layer_types == ["sliding_attention", "full_attention"] and moe.is_moe(oss)
    assert not moe.is_moe(preset_config("llama3-8b", 1))


@pytest.fixture
def tiny_moe_preset(monkeypatch):
    """A preset entry with qwen3_moe's tiny config, so ``fastft bench --preset`` runs the MoE path in seconds."""
    config = tiny_config("qwen3_moe")
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in ("model_type",)}
    fields["num_hidden_layers"] = 2
    monkeypatch.setitem(PRESETS, "tiny-moe", Preset("tiny-moe", "test", "qwen3_moe", fields))
    return "tiny-moe"


def test_cli_runs_the_moe_comparison_for_a_moe_preset(tiny_moe_preset, tmp_path, capsys):
    argv = ["--preset", tiny_moe_preset, "--layers", "1", "--seq-len", "32", "--batch-size", "1", "--steps", "2"]
    status = cli.main([*argv, "--dtype", "float32", "--out", str(tmp_path)])
    assert status == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["contender"]: r for r in report["results"]}
    assert {"eager", "grouped_mm", "batched_mm", "fastft"} <= {c for c, r in rows.items() if r["status"] == "ok"}
    assert rows["liger"]["status"] == "skipped"
    assert rows["fastft"]["layer_saved_of_grouped_mm"] <= 0.5
    md = (tmp_path / "bench.md").read_text()
    assert "one MoE layer saves" in md and "fastft" in md and "1 layers" in report["meta"]["model"]


def test_cli_refuses_what_the_moe_comparison_does_not_do(tiny_moe_preset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--preset", tiny_moe_preset, "--max-context", "8", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--max-context" in capsys.readouterr().err


def test_gpu_part_dry_run_measures_every_contender_it_can():
    emitted = []
    payload = gpu_moe.part_moe_step({"dry_run": True, "deadline": time.time() + 120}, emitted.append)
    rows = payload["results"]["rows"]
    assert len(rows) == len(gpu_moe.PLAN) and emitted
    for r in rows:
        if r["contender"] == "liger":
            assert r["status"] == "skipped", r
        else:
            assert r["status"] == "ok", r
            assert r["tokens_per_s"] > 0 and r["layer_saved_bytes"] > 0
    ours = [r for r in rows if r["contender"] == "fastft"]
    assert all(r["layer_saved_of_grouped_mm"] <= 0.5 for r in ours)
    table = "\n".join(gpu_moe.markdown_rows(payload["results"]))
    assert "MoE training step" in table and "qwen3-30b-a3b" in table and "gpt-oss-20b" in table


def test_gpu_part_stops_at_its_deadline():
    payload = gpu_moe.part_moe_step({"dry_run": True, "deadline": time.time() - 1}, lambda _: None)
    assert all(r["status"] == "skipped" and "time budget" in r["reason"] for r in payload["results"]["rows"])
