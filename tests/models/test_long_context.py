"""Tests for fastft.models.long_context: tiled MLPs, with the input norms fused into q/k/v and into the MLP, give
the same loss and gradients as untiled, unfused ones on every family of fastft.models.families (LoRA, offloaded
checkpointing), and the switch's arguments and errors.

Tolerance: fp32 models, 1e-5 of the largest value of each compared tensor (the fp32 contract: the tiled and untiled
MLPs differ by fp32 rounding of the per-tile partial sums of the parameter gradients, ~1e-7 relative per tile, and
by nothing else; the fused q/k/v are bitwise the norm-then-projections composition, tests/kernels/test_normed_qkv.py). The models run fastft's torch path:
tiling does not depend on the backend, and the interpreted Triton kernels of the tiles are held against the same
bound in tests/kernels/test_tiled_mlp.py.
"""

from __future__ import annotations

import pytest
import torch

import fastft
from fastft.kernels._dispatch import force_backend
from fastft.kernels.normed_qkv import normed_lora_qkv
from fastft.models import layers
from fastft.models.checkpointing import set_checkpointing
from fastft.models.families import FAMILIES
from fastft.models.layers import FastGatedMLP
from fastft.models.long_context import set_long_context
from fastft.utils.memory import SavedTensorMeter
from tests.models.tiny import batch, twins

FP32 = 1e-5


def step(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiled_equals_untiled(family, monkeypatch):
    """set_long_context (tiled MLP, the norms in front of q/k/v and of the MLP fused) against neither."""
    untiled, tiled = twins(family, torch.float32)
    for model in (untiled, tiled):
        fastft.patch(model)
        set_checkpointing(model, "offload")
    assert set_long_context(tiled, tiled_mlp=5)["tiled_mlp"] == 2  # 2 x 11 rows: tiles of 5, 5, 5, 5, 2
    fused = []  # layers whose q/k/v kept the input norm's input (fastft.kernels.normed_qkv)
    monkeypatch.setattr(layers, "normed_lora_qkv", lambda *a: fused.append(1) or normed_lora_qkv(*a))
    inputs = batch()
    with force_backend("torch"):
        loss_u, grads_u = step(untiled.train(), inputs)
        assert not fused
        loss_t, grads_t = step(tiled.train(), inputs)
    # Each of the 2 layers, in forward and in its recompute; Phi-3's fused qkv_proj is one projection (lora_linear).
    assert len(fused) == (0 if family == "phi3" else 4)
    assert torch.allclose(loss_t, loss_u, rtol=FP32, atol=0)
    assert grads_u.keys() == grads_t.keys() and any("mlp" in n for n in grads_u)
    for name, grad in grads_u.items():
        err = (grads_t[name] - grad).abs().max().item()
        assert err <= FP32 * grad.abs().max().item(), (name, err)


def test_switch_off_and_errors():
    model, _ = twins("llama", torch.float32)
    with pytest.raises(ValueError, match="found no fused gated MLP"):
        set_long_context(model, tiled_mlp=True)
    fastft.patch(model)
    assert set_long_context(model, tiled_mlp=True)["tiled_mlp"] == 2
    assert all(m.__dict__["_fastft_mlp_tile"] == 0 for m in model.modules() if isinstance(m, FastGatedMLP))
    assert set_long_context(model, tiled_mlp=False)["tiled_mlp"] == 0
    assert not any("_fastft_mlp_tile" in m.__dict__ for m in model.modules())
    for bad in (0, -3, 2.5, "auto"):
        with pytest.raises(ValueError, match="tiled_mlp must be True"):
            set_long_context(model, tiled_mlp=bad)


@pytest.mark.parametrize("keep_every", [2, 3])
def test_keep_every_kth_input_same_gradients(keep_every):
    """5 layers, dropout on (adapters and attention: the replays must draw the forward's masks): bitwise the same
    loss and gradients as keeping every input, and only the segment starts' inputs saved (host memory)."""
    overrides = {"num_hidden_layers": 5, "attention_dropout": 0.2}
    every, segmented = twins("llama", torch.float32, model_kwargs=overrides, lora_dropout=0.1)
    for model in (every, segmented):
        fastft.patch(model)
        set_checkpointing(model, "offload")
    info = set_long_context(segmented, tiled_mlp=False, keep_every=keep_every)
    assert info == {"tiled_mlp": 0, "keep_every": keep_every, "kept_inputs": -(-5 // keep_every)}
    inputs = batch()
    results = []
    with force_backend("torch"):
        for model in (every, segmented):
            torch.manual_seed(11)
            hidden_bytes = 2 * 11 * 64 * 4  # one layer input
            with SavedTensorMeter() as meter:
                loss = model.train()(**inputs).loss
            inputs_saved = sum(1 for s in meter.saved if s.shape == (2, 11, 64))
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((loss.detach(), grads, inputs_saved))
            assert meter.total_bytes > hidden_bytes
    (loss_e, grads_e, saved_e), (loss_s, grads_s, saved_s) = results
    assert torch.equal(loss_e, loss_s)
    for name, grad in grads_e.items():
        assert torch.equal(grads_s[name], grad), name
    # Hidden-sized saved tensors: the layer inputs kept (5, or one per segment) and the final norm's input.
    assert (saved_e, saved_s) == (5 + 1, -(-5 // keep_every) + 1)


def test_keep_every_for():
    from fastft.models.long_context import keep_every_for

    gib = 2**30
    per_input = 1_000_000 * 4096 * 2  # a million tokens of Llama-3-8B: 7.6 GiB per layer input
    assert keep_every_for(32, 1_000_000, 4096, 32 * per_input) == 1
    assert keep_every_for(32, 1_000_000, 4096, 128 * gib) == 3  # 11 + 2 = 13 inputs, 99 GiB (k=2: 17, 130 GiB)
    with pytest.raises(ValueError, match="fewest layer inputs"):
        keep_every_for(32, 1_000_000, 4096, 50 * gib)
