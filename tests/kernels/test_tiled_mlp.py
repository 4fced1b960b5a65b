"""Tests for fastft.kernels.tiled_mlp: the tiled LoRA MLP against float64 and against the untiled lora_mlp, in
forward and every gradient, over hypothesis shapes (tiles that do not divide the rows, one-row tiles, Phi-3's fused
gate_up, every activation, full fine-tuning and LoRA), what autograd saves, and the errors.

Tolerances. fp32: 1e-5 of the largest exact value (the fp32 contract); tiled against untiled in fp32: 2e-6 of the
largest value, the bound of fp32 rounding of the per-tile partial sums of the parameter gradients (at most ~100
terms each here, each rounding 6e-8 relative). float64: 1e-12 (float64 rounding only). bf16 bases with fp32 adapters:
the tiled result within 2 bf16 ulp of the largest value of the untiled one (the same kernels on the same rows; only
the GEMM blocking of a tile can differ), the fp32 adapter gradients within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft.kernels.lora import lora_mlp, lora_mlp_reference
from fastft.kernels.tiled_mlp import tile_rows, tiled_lora_mlp
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, backend
from tests.kernels.test_lora import ACTIVATIONS, as_float64, leaves, make_proj, rand

FP32_TILED_VS_UNTILED = 2e-6  # fp32 rounding of per-tile partial sums (module docstring)


def mlp_projs(gen, hidden, inter, rank, config, fused, train):
    gate = make_proj(gen, 2 * inter if fused else inter, hidden, rank, config, train=train)
    up = None if fused else make_proj(gen, inter, hidden, rank, config, train=train)
    down = make_proj(gen, hidden, inter, rank, config, train=train)
    return gate, up, down


def run(fn, x, projs, activation, **kw):
    x = x.detach().requires_grad_(True)
    y = fn(x, *projs, activation, **kw)
    gen = torch.Generator().manual_seed(7)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    params = [t for _, t in leaves([p for p in projs if p is not None])]
    grads = torch.autograd.grad(y, [x, *params], grad_y)
    return [y, *grads]


def close(actual, expected, rel):
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:.1g} x {scale:.3g}"


@settings(max_examples=6, deadline=None)
@given(
    rows=st.integers(2, 70),
    tile=st.integers(1, 40),
    hidden=st.sampled_from([8, 24, 33]),
    inter=st.sampled_from([16, 40, 65]),
    activation=st.sampled_from(ACTIVATIONS),
    fused=st.booleans(),
    full=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("name", BACKENDS)
def test_fp32_equals_float64_and_untiled(name, rows, tile, hidden, inter, activation, fused, full, seed):
    gen = torch.Generator().manual_seed(seed)
    train = ("weight", "bias", "lora_A", "lora_B") if full else ("lora_A", "lora_B")
    projs = mlp_projs(gen, hidden, inter, 4, "fp32", fused, train)
    x = rand(gen, 1, rows, hidden, dtype=torch.float32)
    with backend(name):
        tiled = run(tiled_lora_mlp, x, projs, activation, tile_tokens=tile)
        untiled = run(lora_mlp, x, projs, activation)
    exact = run(lora_mlp_reference, x.double(), [as_float64(p) if p is not None else None for p in projs], activation)
    for t, u, e in zip(tiled, untiled, exact, strict=True):
        close(t, e, 1e-5)
        close(t, u, FP32_TILED_VS_UNTILED)


def test_float64_tiles_are_exact():
    gen = torch.Generator().manual_seed(3)
    projs = [as_float64(p) for p in mlp_projs(gen, 16, 40, 4, "fp32", False, ("weight", "lora_A", "lora_B"))]
    x = rand(gen, 2, 37, 16)
    tiled = run(tiled_lora_mlp, x, projs, "swiglu", tile_tokens=9)
    exact = run(lora_mlp_reference, x, projs, "swiglu")
    for t, e in zip(tiled, exact, strict=True):
        close(t, e, 1e-12)


@pytest.mark.parametrize("name", BACKENDS)
def test_bf16_base_fp32_adapters_match_untiled(name):
    gen = torch.Generator().manual_seed(5)
    projs = mlp_projs(gen, 32, 64, 8, "bf16+fp32", False, ("lora_A", "lora_B"))
    x = rand(gen, 1, 100, 32, dtype=torch.bfloat16)
    with backend(name):
        tiled = run(tiled_lora_mlp, x, projs, "geglu_tanh", tile_tokens=32)
        untiled = run(lora_mlp, x, projs, "geglu_tanh")
    for t, u in zip(tiled, untiled, strict=True):
        assert t.dtype == u.dtype
        close(t, u, 1e-5 if t.dtype == torch.float32 else 2 * 2**-8)


def test_saves_only_the_input():
    gen = torch.Generator().manual_seed(1)
    projs = mlp_projs(gen, 32, 96, 4, "fp32", False, ("lora_A", "lora_B"))
    x = rand(gen, 1, 64, 32, dtype=torch.float32).requires_grad_(True)
    param_bytes = sum(t.untyped_storage().nbytes() for p in projs for t in (p.weight, p.bias, p.lora_A, p.lora_B))
    with SavedTensorMeter() as meter:
        tiled_lora_mlp(x, *projs, "swiglu", tile_tokens=16)
    assert meter.total_bytes - param_bytes == x.numel() * 4  # x alone: no gate, up or (N, r) product


def test_dropout_runs_untiled_with_peft_numbers():
    gen = torch.Generator().manual_seed(2)
    gate, up, down = mlp_projs(gen, 16, 32, 4, "fp32", False, ("lora_A", "lora_B"))
    gate.dropout = 0.25
    x = rand(gen, 1, 40, 16, dtype=torch.float32)
    torch.manual_seed(0)
    tiled = run(tiled_lora_mlp, x, (gate, up, down), "swiglu", tile_tokens=8)
    torch.manual_seed(0)
    untiled = run(lora_mlp, x, (gate, up, down), "swiglu")
    for t, u in zip(tiled, untiled, strict=True):
        assert torch.equal(t, u)


def test_tile_rows_default_and_errors():
    assert tile_rows(10_000, 512, 1792, torch.bfloat16, torch.device("cpu")) == 512
    assert tile_rows(100, 512, 1792, torch.bfloat16, torch.device("cpu")) == 100
    gen = torch.Generator().manual_seed(0)
    projs = mlp_projs(gen, 8, 16, 2, "fp32", False, ("lora_A",))
    with pytest.raises(ValueError, match="tile_tokens must be a positive int"):
        tiled_lora_mlp(torch.randn(4, 8), *projs, "swiglu", tile_tokens=0)
    with pytest.raises(ValueError, match="tiled_lora_mlp: activation"):
        tiled_lora_mlp(torch.randn(4, 8), *projs, "relu", tile_tokens=2)
