"""The embedded default of ``fastft bench``: shipped files, their loaders, and that they reproduce and train.

Everything here runs offline (tests/conftest.py sets ``HF_HUB_OFFLINE``): the loaders read package data only.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

from fastft.bench import assets
from fastft.bench.data import make_batches

ROOT = Path(__file__).resolve().parents[2]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_shipped_files_are_the_assets_and_small():
    folder = Path(str(assets.assets_dir()))
    assert sorted(p.name for p in folder.iterdir()) == sorted(assets.ASSET_FILES)  # package data ships all of them
    assert sum((folder / name).stat().st_size for name in assets.ASSET_FILES) < 1_000_000


def test_regenerating_reproduces_the_shipped_files_byte_for_byte(tmp_path):
    # A fresh process, as a developer runs the script: no state shared with this one.
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_bench_assets.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    folder = Path(str(assets.assets_dir()))
    for name in assets.ASSET_FILES:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), (
            f"{name} differs from what scripts/make_bench_assets.py writes: regenerate the assets"
        )


def test_config_has_llama3_8b_proportions():
    config = assets.default_config()
    assert config.model_type == "llama"
    assert config.intermediate_size == 3.5 * config.hidden_size  # Llama-3-8B: 14336 / 4096
    assert config.num_attention_heads == 4 * config.num_key_value_heads  # Llama-3-8B: 32 / 8
    assert config.head_dim * config.num_attention_heads == config.hidden_size
    assert config.head_dim == 64 and 2 <= config.num_hidden_layers <= 4
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters["factor"] == 8.0 and not config.tie_word_embeddings
    assert assets.default_config() is not config  # a fresh object: callers may change theirs


def test_tokenizer_matches_the_config_and_has_pad_and_eos():
    config, tokenizer = assets.default_config(), assets.default_tokenizer()
    assert len(tokenizer) == config.vocab_size == 2048
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|pad|>",
    )
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (config.bos_token_id, config.eos_token_id, config.pad_token_id)
    assert len(set(ids)) == 3 and tokenizer.padding_side == "right"


@pytest.mark.parametrize(
    "text",
    [
        "What is 347 + 586?",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "Grüße aus Köln, 日本語, emoji 🙂",
        "x" * 300,
        "",
    ],
)
def test_tokenizer_round_trips_any_text(text):
    tokenizer = assets.default_tokenizer()
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # Llama-3's post-processor: bos first
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids  # byte-level: nothing unknown
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_compresses_the_training_text():
    # A BPE trained on the examples: far fewer tokens than bytes (a byte-level fallback alone would be 1 per byte).
    tokenizer = assets.default_tokenizer()
    text = " ".join(e["prompt"] + " " + e["response"] for e in assets.default_examples()[:50])
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < len(text.encode()) / 2.5


def test_chat_template_renders_llama3_turns():
    tokenizer = assets.default_tokenizer()
    user = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_folder_also_loads_with_autotokenizer():
    shipped, loaded = assets.default_tokenizer(), AutoTokenizer.from_pretrained(str(assets.assets_dir()))
    text = "Convert 3.5 kilometers to meters."
    assert loaded(text)["input_ids"] == shipped(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id) == (shipped.pad_token_id, shipped.eos_token_id)


def test_examples_are_many_varied_and_distinct():
    examples = assets.default_examples()
    assert len(examples) >= 200
    assert all(
        isinstance(e["prompt"], str) and e["prompt"] and isinstance(e["response"], str) and e["response"]
        for e in examples
    )
    assert len({e["prompt"] for e in examples}) == len(examples)
    assert len({e["task"] for e in examples}) >= 8


def test_worked_arithmetic_answers_are_right():
    # The data teaches the answers it states: check every one of the four operations.
    operations = {"+": int.__add__, "-": int.__sub__, "x": int.__mul__, "divided by": int.__floordiv__}
    checked = 0
    for e in assets.default_examples():
        match = re.fullmatch(r"(?:What is|Compute) (\d+) (\+|-|x|divided by) (\d+)[?.]", e["prompt"])
        if match:
            a, op, b = int(match[1]), match[2], int(match[3])
            assert e["response"].endswith(f"The answer is {operations[op](a, b)}."), e
            checked += 1
    assert checked >= 100


def test_missing_asset_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "assets_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model_config\.json.*make_bench_assets\.py"):
        assets.default_config()


def test_default_model_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, again, other = assets.default_model(0), assets.default_model(0), assets.default_model(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    config = first.config
    assert first.training and config.hidden_size == 512 and config._attn_implementation == "sdpa"
    embed = first.get_input_embeddings().weight
    assert torch.equal(embed, again.get_input_embeddings().weight)
    assert not torch.equal(embed, other.get_input_embeddings().weight)
    assert abs(embed.std().item() - config.initializer_range) < 0.001
    assert all(torch.all(p == 1) for n, p in first.named_parameters() if n.endswith("norm.weight"))
    assert 15e6 < sum(p.numel() for p in first.parameters()) < 17e6


def test_default_model_dtype():
    model = assets.default_model(0, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="dtype"):
        assets.default_model(0, torch.int8)


def test_lora_training_on_the_default_lowers_the_loss(one_torch_thread):
    # What `fastft bench` shows: plain transformers + PEFT, LoRA r=16 on all seven projections, AdamW lr 1e-3,
    # 20 steps of 4 x 128 tokens. The random model starts at ln(2048) = 7.6; the templated data's token
    # frequencies and patterns bring it below 6 within 20 steps (measured: 7.63, then 5.74 over the last five).
    torch.manual_seed(0)
    model = get_peft_model(
        assets.default_model(0),
        LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokenizer = assets.default_tokenizer()
    batches = make_batches(tokenizer, assets.default_examples(), seq_len=128, batch_size=4, steps=20, seed=0)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(2048.0)).item()) < 0.2  # random weights: near-uniform logits
    assert statistics.mean(losses[-5:]) < losses[0] - 1.0
