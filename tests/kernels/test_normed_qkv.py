"""Tests for fastft.kernels.normed_qkv: q, k, v of an RMSNorm's output keeping the norm's input.

The Function runs the same ops on the same values as ``lora_qkv(rms_norm(x, w))`` (the norm recomputed in backward
by the same kernel gives the same rows), so it is held to **bitwise** equality with that composition, in forward
and in every gradient (x, the norm weight, each projection tensor), on both backends (Triton interpreted, torch),
over hypothesis shapes. Against float64: fp32 within 1e-5 of the largest exact value (the fp32 contract). Plus what
autograd keeps (x, not the normalised rows), dropout with a seed, and the errors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft.kernels.lora import lora_linear_reference, lora_qkv
from fastft.kernels.normed_qkv import normed_lora_qkv
from fastft.kernels.rms_norm import rms_norm, rms_norm_reference
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, backend
from tests.kernels.test_lora import PARTS, as_float64, leaves, make_proj, make_x, rand

EPS = 1e-6


def qkv_projs(gen, hidden, n_q, n_kv, rank, config, train, bias=False, dropout=0.0):
    return [
        make_proj(gen, n_q, hidden, rank, config, train, bias, dropout=dropout),
        make_proj(gen, n_kv, hidden, rank + 1, config, train, False),
        make_proj(gen, n_kv, hidden, 1, config, train, bias, dropout=dropout),
    ]


def outputs_and_grads(fused, x, weight, projs, offset, seed=3):
    """q, k, v and the gradients of x, the norm weight and every trainable projection tensor."""
    x = x.detach().requires_grad_(True)
    normed = rms_norm(x, weight, EPS, offset)
    outs = normed_lora_qkv(normed, x, weight, EPS, offset, *projs) if fused else lora_qkv(normed, *projs)
    flat = torch.cat([o.reshape(-1) for o in outs])
    dy = rand(torch.Generator().manual_seed(seed), flat.numel(), dtype=flat.dtype)
    wanted = [x, *([weight] if weight.requires_grad else []), *(t for _, t in leaves(projs))]
    return [flat, *torch.autograd.grad(flat, wanted, dy)]


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=8, deadline=None)
@given(
    lead=st.sampled_from([(5,), (2, 7), (1, 33)]),
    hidden=st.sampled_from([8, 24, 40]),
    n_kv=st.integers(1, 16),
    rank=st.integers(1, 4),
    config=st.sampled_from(["fp32", "bf16+fp32"]),
    offset=st.sampled_from([0.0, 1.0]),
    train=st.sets(st.sampled_from(PARTS), min_size=1),
    norm_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bitwise_equal_to_norm_then_lora_qkv(name, lead, hidden, n_kv, rank, config, offset, train, norm_grad, seed):
    gen = torch.Generator().manual_seed(seed)
    projs = qkv_projs(gen, hidden, hidden, n_kv, rank, config, train, bias=True)
    dtype = projs[0].weight.dtype
    weight = rand(gen, hidden, dtype=dtype, scale=0.5).requires_grad_(norm_grad)
    x = make_x(gen, lead, hidden, dtype, "contiguous")
    with backend(name):
        fused = outputs_and_grads(True, x, weight, projs, offset)
        plain = outputs_and_grads(False, x, weight, projs, offset)
    for a, b in zip(fused, plain, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fp32_matches_float64(offset):
    gen = torch.Generator().manual_seed(5)
    projs = qkv_projs(gen, 24, 24, 8, 3, "fp32", PARTS, bias=True)
    weight = rand(gen, 24, dtype=torch.float32, scale=0.5).requires_grad_(True)
    x = make_x(gen, (2, 9), 24, torch.float32, "contiguous")
    ours = outputs_and_grads(True, x, weight, projs, offset)
    projs64 = [as_float64(p) for p in projs]
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    normed64 = rms_norm_reference(x64, w64, EPS, offset)
    flat = torch.cat([lora_linear_reference(normed64, p).reshape(-1) for p in projs64])
    dy = rand(torch.Generator().manual_seed(3), flat.numel(), dtype=torch.float32).double()
    exact = [flat, *torch.autograd.grad(flat, [x64, w64, *(t for _, t in leaves(projs64))], dy)]
    for value, want in zip(ours, exact, strict=True):
        assert value.dtype == torch.float32
        error, scale = (value.double() - want).abs().max().item(), want.abs().max().item()
        assert error <= 1e-5 * scale, (error, scale)


def test_keeps_x_not_the_normalised_rows():
    gen = torch.Generator().manual_seed(8)
    projs = qkv_projs(gen, 32, 32, 8, 4, "bf16+fp32", ("lora_A", "lora_B"))
    weight = rand(gen, 32, dtype=torch.bfloat16).requires_grad_(True)
    x = make_x(gen, (2, 10), 32, torch.bfloat16, "contiguous")
    normed = rms_norm(x, weight, EPS, 0.0)
    with SavedTensorMeter() as meter:
        q, _, _ = normed_lora_qkv(normed, x, weight, EPS, 0.0, *projs)
    saved = q._base.grad_fn.saved_tensors
    assert any(t is not None and t.data_ptr() == x.data_ptr() for t in saved)
    assert not any(t is not None and t.data_ptr() == normed.data_ptr() for t in saved)
    params = sum(t.untyped_storage().nbytes() for p in projs for t in (p.weight, p.lora_A, p.lora_B))
    # x, the norm weight, and s*xa (N, 4 + 5 + 1 ranks) in fp32: nothing else
    assert meter.total_bytes == params + x.numel() * 2 + 32 * 2 + 20 * 10 * 4


def test_dropout_with_a_seed_equals_the_composition():
    gen = torch.Generator().manual_seed(10)
    projs = qkv_projs(gen, 16, 16, 4, 2, "bf16+fp32", ("lora_A", "lora_B"), dropout=0.5)
    weight = rand(gen, 16, dtype=torch.bfloat16).requires_grad_(True)
    x = make_x(gen, (3, 5), 16, torch.bfloat16, "contiguous")
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        results.append(outputs_and_grads(fused, x, weight, projs, 0.0))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_errors_name_the_problem():
    gen = torch.Generator().manual_seed(11)
    projs = qkv_projs(gen, 8, 8, 4, 2, "fp32", PARTS)
    x, weight = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="normed must be rms_norm"):
        normed_lora_qkv(torch.randn(3, 9), x, weight, EPS, 0.0, *projs)
    with pytest.raises(ValueError, match="under autocast call lora_qkv"), torch.autocast("cpu", torch.bfloat16):
        normed_lora_qkv(rms_norm(x, weight), x, weight, EPS, 0.0, *projs)
    with pytest.raises(ValueError, match=r"q.weight is \(8, 8\) but its input has 5 features"):
        x5 = torch.randn(3, 5)
        normed_lora_qkv(x5, x5, torch.ones(5), EPS, 0.0, *projs)
