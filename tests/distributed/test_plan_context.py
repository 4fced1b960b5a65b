"""Tests for fastft plan --max-context: the issue's command reaches a million tokens on one 80 GB GPU with 128 GiB of
host memory, and the planner's per-token activation terms equal what a fastft long-context decoder layer saves for
backward (SavedTensorMeter, bf16, at two lengths: bytes per token, exact).

The step-peak slope those terms predict was compared with PeakMemoryMeter on the Llama-3-8B-proportioned model of
fastft.bench.long_context (interpreted kernels): see that module, the README, and
tests/benchmarks/test_long_context_slope.py (the slope against transformers + PEFT, in CI at hidden 256).
"""

from __future__ import annotations

import pytest
import torch

import fastft
from fastft.distributed.planner import Dims, long_context_layer_bytes, main, max_context
from fastft.models.checkpointing import set_checkpointing
from fastft.models.long_context import set_long_context
from fastft.utils.memory import SavedTensorMeter
from tests.models.tiny import COMMON, tiny_model

GIB = 2**30


def test_a_million_tokens_on_80_gib(capsys):
    result = max_context("llama3-8b", 80 * GIB, 128 * GIB, method="qlora")
    assert result.fastft_tokens >= 1_000_000
    assert result.plain_tokens < 60_000
    assert result.device_bytes <= 80 * GIB and result.host_bytes <= 128 * GIB
    assert result.keep_every > 1  # every layer input of a million tokens would need 32 x 7.6 GiB of host memory
    main(["llama3-8b", "--method", "qlora", "--max-context", "--gpu-gib", "80", "--host-gib", "128"])
    out = capsys.readouterr().out
    assert f"{result.fastft_tokens:,} tokens, bounded by GPU memory" in out


def test_per_token_terms_equal_what_a_layer_saves():
    """One fastft decoder layer (tiled MLP with its norm fused, LoRA on every projection) saves, per token, the
    planner's saved terms plus two fp32 inverse rms (8 bytes): the two norm modules' own, saved while their
    outputs live and released with them (q/k/v and the MLP keep the norms' inputs and recompute the normalised rows:
    fastft.kernels.normed_qkv, tiled_mlp); the gradients are not saved."""
    model = tiny_model("llama", torch.bfloat16, attn_implementation="sdpa", max_position_embeddings=512)
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    fastft.patch(model)
    set_checkpointing(model, "none")
    set_long_context(model, tiled_mlp=8)
    layer = model.base_model.model.model.layers[0]
    rotary = model.base_model.model.model.rotary_emb
    saved = []
    for n in (64, 128):
        x = torch.randn(1, n, COMMON["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
        cos_sin = rotary(x, torch.arange(n)[None])
        exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), x]}
        with SavedTensorMeter() as meter:
            layer(x, position_embeddings=cos_sin, attention_mask=None, position_ids=torch.arange(n)[None])
        saved.append(sum(b for (_, ptr), b in meter._storages.items() if ptr not in exclude))
    per_token = (saved[1] - saved[0]) / 64
    dims = Dims(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128)
    terms = long_context_layer_bytes(dims, tuple(targets), 4, 2)
    gradients = ("incoming gradient + MLP dx", "gradient of the residual stream", "attention output's gradient",
                 "dq, dk, dv", "attention backward's fp32 dq accumulator")  # fmt: skip
    planned = sum(v for k, v in terms.items() if k not in gradients and k != "layer input (device copy)")
    planned += 2 * 64 if "residual after attention (the fused MLP's input)" not in terms else 0
    assert per_token == planned + 8, (per_token, planned, terms)


def test_context_parallel_divides_the_per_token_terms(capsys):
    """--cp C: each GPU holds 1/C of the sequence's per-token terms and host inputs, plus the gathered K/V of the
    whole sequence and their gradients (6 x KV x 2 bytes per token in bf16: model arithmetic for the GPU kernels)."""
    one = max_context("llama3-8b", 80 * GIB, 128 * GIB, method="qlora")
    assert max_context("llama3-8b", 80 * GIB, 128 * GIB, method="qlora", cp=1) == one
    eight = max_context("llama3-8b", 80 * GIB, 128 * GIB, method="qlora", cp=8)
    assert eight.per_token == one.per_token and eight.fixed == one.fixed
    assert eight.gathered_per_token == 6 * 1024 * 2  # Llama-3-8B: 8 K/V heads of 128
    slope = sum(one.per_token.values()) / 8 + eight.gathered_per_token
    assert eight.device_bytes == int(sum(one.fixed.values()) + slope * eight.fastft_tokens) <= 80 * GIB
    assert eight.fastft_tokens == int((80 * GIB - sum(one.fixed.values())) // slope) > 3 * one.fastft_tokens
    assert eight.host_bytes <= 128 * GIB
    main(["llama3-8b", "--method", "qlora", "--max-context", "--cp", "8"])
    out = capsys.readouterr().out
    assert "8 GPUs (context parallelism)" in out and f"{eight.fastft_tokens:,} tokens" in out
    assert "gathered K/V and their gradients, one layer): 12,288" in out
    with pytest.raises(ValueError, match="cp .* positive int"):
        max_context("llama3-8b", 80 * GIB, 128 * GIB, cp=0)
