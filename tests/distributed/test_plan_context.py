"""Tests for fastft plan --max-context: the issue's command reaches a million tokens on one 80 GB GPU with 128 GiB of
host memory, and the planner's per-token activation terms equal what a fastft long-context decoder layer saves for
backward (SavedTensorMeter, bf16, at two lengths: bytes per token, exact).

The step-peak slope those terms predict is checked against PeakMemoryMeter, term by term, by
test_planned_peak_slope_is_the_meters (interpreted kernels, hidden 128); the slope against transformers + PEFT is
tests/benchmarks/test_long_context_slope.py.
"""

from __future__ import annotations

import gc

import pytest
import torch

import fastft
from fastft.distributed.planner import LORA_TARGETS, Dims, dims_of, long_context_layer_bytes, main, max_context
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


@pytest.fixture
def interpreter_launches_leave_no_garbage(monkeypatch):
    """Triton's interpreter copies a launch's arguments through a recursive closure (a reference cycle) that holds
    their storages until Python's cycle collector runs: a tensor the step has dropped may then still count at a
    later peak (here the recomputed MLP input, alive at the attention backward: one hidden row per token), which a
    GPU launch never holds. Collecting the youngest generation after each interpreted launch frees them as a GPU
    would (the step ran 163 s against 159 s without it)."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    launch = interpreter.GridExecutor.__call__

    def launch_then_collect(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect(0)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch_then_collect)


def test_planned_peak_slope_is_the_meters(interpreter_launches_leave_no_garbage):
    """The planner's per-token peak (one layer's attention backward after its recompute) against the slope of the
    step's peak (fastft.bench.long_context: offloaded checkpointing + tiled MLP, 1 layer, bf16, SDPA, LoRA r=16 on
    the seven projections; Triton interpreted; 768 -> 1536 tokens, where torch's CPU flash attention has reached its
    largest fixed-size blocks). Equal to the byte once the CPU's own differences are named:

    - torch's CPU flash backward accumulates dq in fp32 inside fixed-size per-thread buffers, not a per-token
      tensor: minus the planner's ``4 x q_width`` (flash-attention's fp32 dq accumulator on a GPU);
    - on a CPU the host is the device, so the offloaded layer input is the planner's device copy (with more layers
      the others' host inputs count too: 2 layers measure 2,768, one bf16 hidden row, ``2 x hidden``, more);
    - o_proj's fp32 LoRA product is freed by its backward, before the attention backward: minus ``4 x r`` (the
      planner keeps all four attention adapters' products: conservative by 64 bytes);
    - the int64 position ids: plus 8.

    (Measured 2,512 bytes per token against 3,080 planned at this width; 2,768 without the fixture above.)"""
    from fastft.bench.long_context import SCALED_LLAMA3_8B, measure

    fields = {"hidden_size": 128, "intermediate_size": 448, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 64, "vocab_size": 1024, "num_hidden_layers": 1}  # fmt: skip
    slope = measure("fastft+tiled", (768, 1536), tile=32, blocks=32, fields=fields)
    dims, rank = dims_of({**SCALED_LLAMA3_8B, **fields}), 16
    terms = long_context_layer_bytes(dims, LORA_TARGETS, rank, 2)
    assert "attention backward's fp32 dq accumulator" in terms  # the attention backward is the larger moment
    cpu = sum(terms.values()) - 4 * dims.q_width - 4 * rank + 8
    assert slope.bytes_per_token == cpu, (slope.bytes_per_token, cpu, terms, slope.at_peak)


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
