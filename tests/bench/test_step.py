"""fastft.bench.step and fastft.bench.presets: the contenders train the same model on the same data, the meters
count what the module docstring says, the presets are the published architectures, and the --max-context search
finds the boundary it is given.

Models are tiny (hidden 64, 2 layers, vocabulary 256: tens of milliseconds a step) except where a preset's real
dimensions are checked, which happens on the meta device (no memory, no time).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fastft.bench import cli, step
from fastft.bench.presets import PRESETS, preset_config
from fastft.kernels._dispatch import force_backend

CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers 5.2x renames checkpointing APIs
    pytest.mark.usefixtures("one_torch_thread"),
]


def _tiny(**overrides) -> LlamaConfig:
    fields = {
        "hidden_size": 64,
        "intermediate_size": 224,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "initializer_range": 0.1,  # logits of std ~1: the loss depends on every layer
    }
    return LlamaConfig(**{**fields, **overrides})


def _batches(n: int, seq: int = 24, vocab: int = 256, batch: int = 2) -> list[dict[str, torch.Tensor]]:
    """Random tokens; the first 5 positions of every row are an ignored prompt, the last 4 of row 1 padding."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -4:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :5] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


def _train(contender: str, checkpointing: str = "none", steps: int = 3, dtype=torch.float32) -> step.TrainStats:
    # fastft's torch path, as `fastft bench` runs on a CPU (the session interprets Triton kernels: far slower).
    with force_backend("torch"):
        model, _ = step.build_model(_tiny(), contender, dtype=dtype, checkpointing=checkpointing, seed=7)
        return step.train(model, _batches(steps), device=CPU, lr=1e-2, tokens_in=_tokens)


def test_plain_and_fastft_train_the_same_model():
    plain, fast = _train("plain"), _train("fastft")
    # fp32, same weights, same LoRA init, same batches: fastft's kernels compute the same formulas in another
    # order, so the losses agree to fp32 rounding accumulated over 3 AdamW steps (seen: < 1e-6). 1e-4 relative still
    # catches a wrong gradient: lr 1e-2 moves the loss by ~1e-2 per step.
    assert plain.losses[0] == pytest.approx(fast.losses[0], rel=1e-5)
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4)
    assert abs(plain.losses[-1] - plain.losses[0]) > 1e-3  # the steps do move the model
    # What fastft exists for: less kept for backward (no logits, no MLP intermediates).
    assert 0 < fast.saved_bytes < 0.8 * plain.saved_bytes


def test_train_measures_tokens_and_skips_the_first_step_in_throughput():
    stats = _train("plain", steps=3)
    assert len(stats.losses) == len(stats.step_seconds) == 3
    assert stats.tokens == [2 * 24 - 4] * 3  # padding is not a token
    assert stats.tokens_per_s == pytest.approx(sum(stats.tokens[1:]) / sum(stats.step_seconds[1:]))
    assert stats.peak_bytes is None and stats.model_bytes is None  # CUDA-only counters
    single = dataclasses.replace(stats, step_seconds=[2.0], tokens=[10])
    assert single.tokens_per_s == 5.0  # one step: it is all there is


def test_checkpointing_modes():
    none, standard, offload = (_train("plain", mode, steps=1) for mode in step.CHECKPOINTING)
    # transformers has no offload: plain runs its standard checkpointing, bitwise the same step.
    assert step.checkpointing_for("plain", "offload") == "standard"
    assert step.checkpointing_for("fastft", "offload") == "offload"
    assert offload.saved_bytes == standard.saved_bytes < 0.5 * none.saved_bytes
    assert offload.losses == standard.losses == pytest.approx(none.losses, rel=1e-6)
    fast = _train("fastft", "offload", steps=1)
    assert fast.losses == pytest.approx(none.losses, rel=1e-5)


def test_activation_meter_leaves_out_parameters():
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with step.ActivationMeter.for_model(linear) as meter:
        linear(x).sum()
    # F.linear saves the input (3 x 8 fp32) and the weight: only the input counts.
    assert meter.total_bytes == 3 * 8 * 4 and meter.keys == [step.storage_key(x)]
    with step.ActivationMeter() as everything:
        linear(x).sum()
    assert everything.total_bytes == 3 * 8 * 4 + 8 * 4 * 4


def test_step_memory_grows_with_the_sequence():
    model, _ = step.build_model(_tiny(), "plain", dtype=torch.float32)
    resident = step.resident_bytes(model)
    ids = [torch.randint(0, 256, (1, seq)) for seq in (16, 256)]
    short, long = (step.step_memory(model, {"input_ids": i, "labels": i}, device=CPU) for i in ids)
    # Weights, then AdamW states and gradients of the LoRA weights and the step's activations; the 240 more tokens
    # need at least the fp32 logits that plain transformers materialises for them.
    assert resident < short < long and long - short >= 240 * 256 * 4


def test_build_model_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="contender='unsloth'"):
        step.build_model(_tiny(), "unsloth")
    with pytest.raises(ValueError, match="checkpointing='full'"):
        step.build_model(_tiny(), "plain", checkpointing="full")
    with pytest.raises(RuntimeError, match="liger"):  # no liger-kernel here, or no CUDA
        step.build_model(_tiny(), "liger")
    assert step.liger_unavailable(CPU)


def test_quantize_4bit_replaces_the_projections():
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_config(_tiny()).to(torch.bfloat16)
    step.quantize_4bit(model)
    layer = model.model.layers[0]
    projections = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj]
    assert all(isinstance(p, bnb.nn.Linear4bit) for p in projections)
    assert type(model.lm_head) is torch.nn.Linear and model.is_loaded_in_4bit


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

# Parameter counts of the published checkpoints (their model cards / safetensors index): the dimensions are right
# when a model built from the preset, on the meta device, has exactly as many.
PUBLISHED_PARAMETERS = {
    "llama3-8b": 8_030_261_248,
    "qwen3-8b": 8_190_735_360,
    "gemma2-9b": 9_241_705_984,
    "qwen3-30b-a3b": 30_532_122_624,  # 30.5B total, 3.3B active
    "gpt-oss-20b": 20_914_757_184,  # 20.91B total (OpenAI's gpt-oss model card, table 1), 3.6B active
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_is_the_published_architecture(name):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    assert model.config.model_type == PRESETS[name].model_type and model.config.use_cache is False
    cut = preset_config(name, layers=1)
    assert cut.num_hidden_layers == 1 and cut.hidden_size == model.config.hidden_size


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_family_trains_scaled_down(name):
    # The real widths cost gigabytes; the same family with its quirks (Gemma-2's softcaps and sliding window,
    # Qwen-3's q/k norms) at a tiny width runs one step with both contenders and the same loss.
    config = preset_config(name, layers=1)
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 256,
            "pad_token_id": None,  # gpt-oss's 199999 is outside the tiny vocabulary
        }
    )
    losses = {}
    for contender in ("plain", "fastft"):
        with force_backend("torch"):
            model, note = step.build_model(config, contender, dtype=torch.float32)
            losses[contender] = step.train(model, _batches(1), device=CPU, tokens_in=_tokens).losses[0]
        if contender == "fastft":
            assert "left unpatched" not in note, note
    assert losses["fastft"] == pytest.approx(losses["plain"], rel=1e-5)  # fp32, as above


def test_unknown_preset_and_depth():
    with pytest.raises(ValueError, match="--preset 'llama9'.*llama3-8b, qwen3-8b, gemma2-9b"):
        preset_config("llama9")
    with pytest.raises(ValueError, match="--layers 33: llama3-8b has 32"):
        preset_config("llama3-8b", layers=33)


# ----------------------------------------------------------------------------------------------------
# The --max-context search
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", [16, 100, 1000, 3000])
def test_max_context_search_finds_the_boundary(boundary):
    seen = []

    def fits(seq_len):
        seen.append(seq_len)
        return seq_len <= boundary, seq_len * 10

    found = cli.max_context(fits, limit=8192)
    assert found["longest"] <= boundary < found["longest"] + max(8, found["longest"] // 16) + 1
    assert not found["reached_limit"] and len(seen) == len(set(seen)) == len(found["probes"])
    assert found["probes"][0] == {"seq_len": cli.FIRST_PROBE, "bytes": cli.FIRST_PROBE * 10, "fits": True}


def test_max_context_search_limits():
    assert cli.max_context(lambda n: (True, 1), limit=1000) | {"probes": None} == {
        "longest": 1000,
        "limit": 1000,
        "reached_limit": True,
        "probes": None,
    }
    nothing = cli.max_context(lambda n: (False, None), limit=1000)
    assert nothing["longest"] is None and len(nothing["probes"]) == 1
