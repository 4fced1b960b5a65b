"""Tests for fastft.kernels.rope: semantics, kernel == float64 in every dtype and backend, edges, errors, memory.

Every comparison of a result or gradient uses :func:`assert_no_worse_than_torch`: fastft's error against
the float64 answer (same low-precision inputs, upcast) may be at most 2x the error of transformers' own
formula computed by PyTorch in the dtype under test, plus a few ulp. fp32 results are also held to 1e-5
relative of float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary_pos_emb

from fastft.kernels._spec import AuditCase, Ptr
from fastft.kernels.rope import _rope_kernel, audit_cases, rope, rope_reference
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _qk(batch, n_heads_q, n_heads_k, seq_len, head_dim, layout, dtype, gen):
    """q, k in one of the layouts attention hands to rope (views of leaf tensors that require grad)."""

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    if layout == "transposed":  # transformers: proj(x).view(B, T, H, D).transpose(1, 2)
        q = rand(batch, seq_len, n_heads_q * head_dim).view(batch, seq_len, n_heads_q, head_dim).transpose(1, 2)
        k = rand(batch, seq_len, n_heads_k * head_dim).view(batch, seq_len, n_heads_k, head_dim).transpose(1, 2)
    elif layout == "fused_qkv":  # heads sliced out of one fused projection: not dense, gaps between tokens
        n_heads = n_heads_q + 2 * n_heads_k
        qkv = rand(batch, seq_len, n_heads * head_dim).view(batch, seq_len, n_heads, head_dim)
        q, k = qkv[:, :, :n_heads_q].transpose(1, 2), qkv[:, :, n_heads_q : n_heads_q + n_heads_k].transpose(1, 2)
    else:
        q, k = rand(batch, n_heads_q, seq_len, head_dim), rand(batch, n_heads_k, seq_len, head_dim)
    return q, k


def _cos_sin(batch, seq_len, rotary_dim, dtype, gen, *, per_row=False, kind="llama"):
    """cos/sin as a rotary embedding builds them (float64, then cast), or arbitrary values for both halves."""
    rows = batch if per_row else 1
    if kind == "random":  # halves differ, not unit norm: pins the general formula and its transpose
        cos = torch.randn(rows, seq_len, rotary_dim, generator=gen, dtype=torch.float64)
        sin = torch.randn(rows, seq_len, rotary_dim, generator=gen, dtype=torch.float64)
        return cos.to(dtype), sin.to(dtype)
    positions = torch.randint(0, 4096, (rows, seq_len), generator=gen).double()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _check(q, k, cos, sin, backend_name, gen, name=""):
    """rope vs float64 and vs the same-dtype reference: outputs, dq, dk; fp32 also within 1e-5 of float64."""
    with backend(backend_name):
        q_out, k_out = rope(q, k, cos, sin)
        grad_q, grad_k = (
            torch.randn(q_out.shape, generator=gen).to(q.dtype),
            torch.randn(k_out.shape, generator=gen).to(k.dtype),
        )
        dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k))
    ref_q, ref_k = rope_reference(q, k, cos, sin)
    ref_dq, ref_dk = torch.autograd.grad((ref_q, ref_k), (q, k), (grad_q, grad_k))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    exact_q, exact_k = rope_reference(q64, k64, cos.double(), sin.double())
    exact_dq, exact_dk = torch.autograd.grad((exact_q, exact_k), (q64, k64), (grad_q.double(), grad_k.double()))
    for label, ours, theirs, exact in (
        ("q_out", q_out, ref_q, exact_q),
        ("k_out", k_out, ref_k, exact_k),
        ("dq", dq, ref_dq, exact_dq),
        ("dk", dk, ref_dk, exact_dk),
    ):
        assert_no_worse_than_torch(ours, theirs, exact, name=f"{name} {label} [{backend_name}]")
        if ours.dtype == torch.float32 and exact.numel():
            scale = exact.abs().max().item()
            assert (ours.double() - exact).abs().max().item() <= 1e-5 * scale + 1e-30, f"{label}: fp32 vs float64"


# ------------------------------------------------------------------------------------------------------
# Semantics
# ------------------------------------------------------------------------------------------------------


def test_reference_is_complex_rotation_float64():
    """rope_reference == multiplying each pair (x[i], x[i + D/2]) by e^{iθ}: an independent formulation."""
    gen = torch.Generator().manual_seed(0)
    q, k = _qk(2, 4, 2, 5, 16, "contiguous", torch.float64, gen)
    cos, sin = _cos_sin(2, 5, 16, torch.float64, gen, per_row=True)
    theta = torch.atan2(sin[..., :8], cos[..., :8]).unsqueeze(1)
    for x, ref in zip((q, k), rope_reference(q, k, cos, sin)):
        z = torch.complex(x[..., :8], x[..., 8:]) * torch.exp(1j * theta)
        torch.testing.assert_close(ref, torch.cat((z.real, z.imag), dim=-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rope_parameters", [None, LLAMA3_SCALING], ids=["default", "llama3"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_matches_transformers_llama(rope_parameters, dtype, backend_name):
    """cos/sin from a real LlamaRotaryEmbedding; rope == transformers' apply_rotary_pos_emb (float64: exact)."""
    extra = {"rope_parameters": rope_parameters} if rope_parameters else {}
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra
    )
    rotary = LlamaRotaryEmbedding(config)
    gen = torch.Generator().manual_seed(1)
    q, k = _qk(2, 4, 2, 6, 16, "transposed", dtype, gen)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [40, 41, 42, 0, 1, 2]])  # packed: per-row positions
    cos, sin = rotary(q, position_ids)
    assert cos.shape == (2, 6, 16) and cos.dtype == dtype
    _check(q, k, cos, sin, backend_name, gen, name="llama")
    # transformers' own function on the same inputs is what rope_reference computes, bit for bit
    for ours, theirs in zip(rope_reference(q, k, cos, sin), llama_apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(ours, theirs)
    # float64 semantics: the torch path computes transformers' formula exactly
    q64, k64 = q.detach().double(), k.detach().double()
    with backend("torch"):
        ours64 = rope(q64, k64, cos.double(), sin.double())
    for ours, theirs in zip(ours64, llama_apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())):
        torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------------------------
# Kernel and torch path vs float64, property-based
# ------------------------------------------------------------------------------------------------------


@st.composite
def _rope_cases(draw):
    n_heads_k = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 6, 10, 34, 64, 80, 96, 128, 256]))
    return {
        "batch": draw(st.integers(1, 3)),
        "n_heads_q": n_heads_k * draw(st.sampled_from([1, 2, 4])),
        "n_heads_k": n_heads_k,
        "seq_len": draw(st.integers(1, 4)),
        "head_dim": head_dim,
        "rotary_dim": draw(st.sampled_from([head_dim, head_dim, 2 * max(1, head_dim // 5)])),
        "per_row": draw(st.booleans()),
        "layout": draw(st.sampled_from(["transposed", "contiguous", "fused_qkv"])),
        "kind": draw(st.sampled_from(["llama", "random"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _case(**fields):
    return fields


_EXTREMES = [
    # D=2 (one pair), widths just past a power of two, odd head counts
    _case(batch=1, n_heads_q=3, n_heads_k=3, seq_len=1, head_dim=2, rotary_dim=2, per_row=False,
          layout="transposed", kind="random", seed=0),
    _case(batch=2, n_heads_q=6, n_heads_k=3, seq_len=3, head_dim=34, rotary_dim=34, per_row=True,
          layout="fused_qkv", kind="random", seed=1),
    # 24 heads of 256: more heads than one tile holds (16), so the head loop runs twice
    _case(batch=1, n_heads_q=24, n_heads_k=8, seq_len=1, head_dim=256, rotary_dim=256, per_row=False,
          layout="transposed", kind="llama", seed=2),
    # Phi-2-like partial rotary (32 of 80 columns) and a non-power-of-two half (96 -> 48)
    _case(batch=2, n_heads_q=4, n_heads_k=2, seq_len=2, head_dim=80, rotary_dim=32, per_row=True,
          layout="transposed", kind="llama", seed=3),
    _case(batch=1, n_heads_q=4, n_heads_k=1, seq_len=2, head_dim=96, rotary_dim=96, per_row=False,
          layout="contiguous", kind="random", seed=4),
]  # fmt: skip


def _with_examples(test):
    for case in _EXTREMES:
        test = example(case=case)(test)
    return test


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@_with_examples
@given(case=_rope_cases())
def test_rope_matches_float64(backend_name, dtype, case):
    gen = torch.Generator().manual_seed(case["seed"])
    q, k = _qk(case["batch"], case["n_heads_q"], case["n_heads_k"], case["seq_len"], case["head_dim"],
               case["layout"], dtype, gen)  # fmt: skip
    cos, sin = _cos_sin(case["batch"], case["seq_len"], case["rotary_dim"], dtype, gen, per_row=case["per_row"],
                        kind=case["kind"])  # fmt: skip
    _check(q, k, cos, sin, backend_name, gen, name=str(case))


# ------------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_single_token(backend_name):
    gen = torch.Generator().manual_seed(5)
    q, k = _qk(2, 4, 2, 1, 16, "transposed", torch.bfloat16, gen)
    cos, sin = _cos_sin(2, 1, 16, torch.bfloat16, gen, per_row=True)
    _check(q, k, cos, sin, backend_name, gen, name="T=1")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_per_row_positions_equal_rowwise_calls(backend_name):
    """Packed sequences: cos/sin of batch B give each row its own positions, same as one call per row."""
    gen = torch.Generator().manual_seed(6)
    q, k = _qk(3, 4, 2, 5, 32, "transposed", torch.float32, gen)
    cos, sin = _cos_sin(3, 5, 32, torch.float32, gen, per_row=True)
    assert not torch.equal(cos[0], cos[1])
    with backend(backend_name), torch.no_grad():
        q_out, k_out = rope(q, k, cos, sin)
        for row in range(3):
            q_row, k_row = rope(q[row : row + 1], k[row : row + 1], cos[row : row + 1], sin[row : row + 1])
            assert torch.equal(q_out[row : row + 1], q_row) and torch.equal(k_out[row : row + 1], k_row)
    _check(q, k, cos, sin, backend_name, gen, name="per-row")


@pytest.mark.parametrize("n_heads_k", [4, 1], ids=["Hk==Hq", "Hk==1"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_head_ratios(backend_name, n_heads_k):
    gen = torch.Generator().manual_seed(7)
    q, k = _qk(2, 4, n_heads_k, 3, 64, "transposed", torch.float16, gen)
    cos, sin = _cos_sin(2, 3, 64, torch.float16, gen)
    _check(q, k, cos, sin, backend_name, gen, name=f"Hk={n_heads_k}")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_partial_rotary_matches_transformers_phi3(backend_name):
    """cos/sin narrower than the head: the first columns rotate, the rest pass through (Phi-3's function)."""
    gen = torch.Generator().manual_seed(8)
    q, k = _qk(2, 4, 2, 3, 40, "transposed", torch.float32, gen)
    cos, sin = _cos_sin(1, 3, 16, torch.float32, gen)
    with backend(backend_name):
        q_out, k_out = rope(q, k, cos, sin)
    phi_q, phi_k = phi3_apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_out, phi_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, phi_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(q_out[..., 16:], q[..., 16:]) and torch.equal(k_out[..., 16:], k[..., 16:])
    _check(q, k, cos, sin, backend_name, gen, name="partial")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_layout_kept_and_expanded_gradient(backend_name):
    """Outputs and gradients keep q/k's (B, T, H, D) memory; a stride-0 gradient (from .sum()) is handled."""
    gen = torch.Generator().manual_seed(9)
    q, k = _qk(2, 4, 2, 3, 16, "transposed", torch.float32, gen)
    cos, sin = _cos_sin(1, 3, 16, torch.float32, gen)
    with backend(backend_name):
        q_out, k_out = rope(q, k, cos, sin)
        assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
        dq, dk = torch.autograd.grad(q_out.sum() + 2 * k_out.sum(), (q, k))
    assert dq.stride() == q.stride() and dk.stride() == k.stride()
    ref_dq, ref_dk = torch.autograd.grad(
        sum(x.sum() * w for x, w in zip(rope_reference(q, k, cos, sin), (1, 2))), (q, k)
    )
    torch.testing.assert_close(dq, ref_dq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dk, ref_dk, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_only_one_output_used(backend_name):
    """Backward with k_out unused: autograd hands a zero gradient, dk is exactly zero."""
    gen = torch.Generator().manual_seed(10)
    q, k = _qk(1, 2, 1, 2, 8, "contiguous", torch.bfloat16, gen)
    cos, sin = _cos_sin(1, 2, 8, torch.bfloat16, gen)
    with backend(backend_name):
        q_out, _ = rope(q, k, cos, sin)
        dq, dk = torch.autograd.grad(q_out.float().square().sum(), (q, k))
    assert torch.count_nonzero(dk) == 0 and torch.count_nonzero(dq) > 0


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fp32_cos_sin_with_bf16_heads(backend_name):
    """cos/sin kept in fp32 are used at full precision; outputs keep q's dtype (one rounding of the fp32 result)."""
    gen = torch.Generator().manual_seed(12)
    q, k = _qk(1, 4, 2, 3, 16, "transposed", torch.bfloat16, gen)
    cos, sin = _cos_sin(1, 3, 16, torch.float32, gen)
    with backend(backend_name), torch.no_grad():
        q_out, k_out = rope(q, k, cos, sin)
        q32, k32 = rope(q.float(), k.float(), cos, sin)
    assert q_out.dtype == k_out.dtype == torch.bfloat16
    # One rounding of the fp32 result: within one bf16 ulp (GPUs round to nearest; Triton's interpreter
    # truncates fp32 -> bf16, so half an ulp would fail there).
    torch.testing.assert_close(q_out.float(), q32, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
    torch.testing.assert_close(k_out.float(), k32, rtol=torch.finfo(torch.bfloat16).eps, atol=0)


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


def _errors():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    return [
        ((q, torch.randn(3, 2, 3, 8), cos, sin), ValueError, r"q \(2, 4, 3, 8\) and k \(3, 2, 3, 8\).*batch"),
        ((q, torch.randn(2, 2, 4, 8), cos, sin), ValueError, r"seq_len"),
        ((q, torch.randn(2, 2, 3, 6), cos, sin), ValueError, r"head_dim"),
        ((q, torch.randn(2, 3, 3, 8), cos, sin), ValueError, r"query heads \(4.*multiple of the key heads \(3"),
        ((q, k, torch.randn(1, 3, 8), torch.randn(1, 3, 6)), ValueError, r"cos \(1, 3, 8\) and sin \(1, 3, 6\)"),
        ((q, k, torch.randn(3, 3, 8), torch.randn(3, 3, 8)), ValueError, r"1 or 2, 3.*got \(3, 3, 8\)"),
        ((q, k, torch.randn(1, 4, 8), torch.randn(1, 4, 8)), ValueError, r"got \(1, 4, 8\)"),
        ((q, k, torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)), ValueError, r"without unsqueezing"),
        ((q, k, torch.randn(3, 8), torch.randn(3, 8)), ValueError, r"got \(3, 8\)"),
        ((q, k, torch.randn(1, 3, 10), torch.randn(1, 3, 10)), ValueError, r"rotary dim .*10.*head_dim = 8"),
        ((q, k, torch.randn(1, 3, 5), torch.randn(1, 3, 5)), ValueError, r"must be even"),
        ((q[0], k[0], cos, sin), ValueError, r"\(batch, heads, seq_len, head_dim\)"),
        ((q.long(), k.long(), cos, sin), ValueError, r"q has dtype torch.int64"),
        ((q, k, cos.int(), sin.int()), ValueError, r"cos has dtype torch.int32"),
        ((q, k.double(), cos, sin), ValueError, r"same dtype"),
        ((q, k, cos, sin.double()), ValueError, r"same dtype"),
        ((q.numpy(), k, cos, sin), TypeError, r"q must be a torch.Tensor"),
        ((q, k, torch.randn(1, 3, 8, requires_grad=True), sin), NotImplementedError, r"cos.detach\(\)"),
    ]


@pytest.mark.parametrize("args, error, match", _errors())
def test_errors(args, error, match):
    with pytest.raises(error, match=match):
        rope(*args)


# ------------------------------------------------------------------------------------------------------
# Memory and audit
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_saves_only_cos_and_sin(backend_name, per_row):
    gen = torch.Generator().manual_seed(11)
    q, k = _qk(2, 4, 2, 3, 16, "transposed", torch.bfloat16, gen)
    cos, sin = _cos_sin(2, 3, 16, torch.bfloat16, gen, per_row=per_row)
    with backend(backend_name), SavedTensorMeter() as meter:
        rope(q, k, cos, sin)
    assert [(s.shape, s.dtype) for s in meter.saved] == [(tuple(cos.shape), cos.dtype), (tuple(sin.shape), sin.dtype)]
    assert meter.total_bytes == cos.nbytes + sin.nbytes == 2 * cos.shape[0] * 3 * 16 * 2


def test_audit_cases():
    cases = audit_cases()
    assert [case.name for case in cases] == ["rope_forward", "rope_backward"]
    params = set(_rope_kernel.arg_names)
    for case in cases:
        assert isinstance(case, AuditCase) and case.kernel is _rope_kernel
        assert set(case.args) | set(case.constexprs) == params and not set(case.args) & set(case.constexprs)
        assert all(case.args[name] == Ptr("bf16") for name in params if name.endswith("_ptr"))
        # q, k, q_out, k_out: 8192 tokens x (32 + 8) heads x 128 x bf16, once each; cos and sin: 8192 x 128 x bf16
        assert case.min_bytes == 2 * 8192 * 40 * 128 * 2 + 2 * 8192 * 128 * 2
        assert case.constexprs["BLOCK_HQ"] == 32 and case.num_warps == 4
    assert [case.constexprs["BACKWARD"] for case in cases] == [False, True]
