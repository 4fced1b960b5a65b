"""Tests for fastft.kernels.rope_interleaved: semantics, kernel == float64 in every dtype and backend, the
transformers adapters bit for bit, edges, errors, memory, audit cases.

Two kinds of comparison:

- :func:`rope_interleaved` (fp32 arithmetic, one rounding) against float64 with
  :func:`assert_no_worse_than_torch`: its error may be at most 2x that of transformers' formula computed by
  PyTorch in the dtype under test, plus a few ulp; fp32 results are also held to 1e-5 relative of float64.
- The adapters against the transformers functions they replace: **exact equality** (``torch.equal``) of the
  outputs and of every gradient, in fp32, bf16 and fp16, on the interpreted Triton kernel and the torch path.
  No tolerance is needed because the adapters round where transformers rounds: in bf16/fp16 every product of
  two inputs is exact in fp32, so rounding it (and then the sum) to the dtype is what PyTorch's bf16/fp16
  ops compute; in fp32 nothing is contracted into a fused multiply-add (the interpreter never fuses; on a GPU
  the adapters launch with ``enable_fp_fusion=False``). DeepSeek-V2's complex multiply is bit for bit here
  because PyTorch's CPU complex multiply rounds each product too; a CUDA build of PyTorch may contract it,
  which would make the two differ by an fp32 ulp before the final cast (not testable without a GPU).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from transformers import CohereConfig, DeepseekV2Config, DeepseekV3Config, Ernie4_5Config, GlmConfig, GptOssConfig
from transformers.models.cohere import modeling_cohere
from transformers.models.cohere2 import modeling_cohere2
from transformers.models.deepseek_v2 import modeling_deepseek_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3
from transformers.models.ernie4_5 import modeling_ernie4_5
from transformers.models.glm import modeling_glm
from transformers.models.glm4 import modeling_glm4
from transformers.models.glm4_moe_lite import modeling_glm4_moe_lite
from transformers.models.gpt_oss import modeling_gpt_oss

from fastft.kernels._spec import AuditCase, Ptr
from fastft.kernels.rope_interleaved import (
    _rope_interleaved_kernel,
    audit_cases,
    cohere_apply_rotary_pos_emb,
    deepseek_apply_rotary_pos_emb_interleave,
    deepseek_v2_apply_rotary_emb,
    ernie4_5_apply_rotary_pos_emb,
    glm_apply_rotary_pos_emb,
    gpt_oss_apply_rotary_emb,
    gpt_oss_apply_rotary_pos_emb,
    rope_interleaved,
    rope_interleaved_reference,
)
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend


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


def _angles(batch, seq_len, rotary_dim, gen, *, per_row=False, kind="rope"):
    """(cos, sin) of one angle per pair, float64: a rotary embedding's, or arbitrary values (not unit norm)."""
    rows = batch if per_row else 1
    if kind == "random":
        shape = (rows, seq_len, rotary_dim // 2)
        return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen).double()
    positions = torch.randint(0, 4096, (rows, seq_len), generator=gen).double()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = positions[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


def _table(angle: torch.Tensor, table: str, dtype: torch.dtype) -> torch.Tensor:
    """The per-pair angles laid out as a caller hands them to rope_interleaved (all zero-copy for the kernel)."""
    if table == "llama":  # cat(freqs, freqs): the kernel reads the first half (rotary_dim given)
        return torch.cat((angle, angle), dim=-1).to(dtype)
    if table == "gptj":  # repeat_interleave(freqs, 2)[..., ::2]: column stride 2
        return angle.repeat_interleave(2, dim=-1).to(dtype)[..., ::2]
    return angle.to(dtype)


def _check(q, k, cos, sin, backend_name, gen, rotary_dim=None, name=""):
    """rope_interleaved vs float64 and vs the same-dtype reference: outputs, dq, dk; fp32 within 1e-5 of float64."""
    with backend(backend_name):
        q_out, k_out = rope_interleaved(q, k, cos, sin, rotary_dim)
        grad_q = torch.randn(q_out.shape, generator=gen).to(q.dtype)
        grad_k = torch.randn(k_out.shape, generator=gen).to(k.dtype)
        dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k))
    ref_q, ref_k = rope_interleaved_reference(q, k, cos, sin, rotary_dim)
    ref_dq, ref_dk = torch.autograd.grad((ref_q, ref_k), (q, k), (grad_q, grad_k))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    exact_q, exact_k = rope_interleaved_reference(q64, k64, cos.double(), sin.double(), rotary_dim)
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
    """The reference == multiplying each pair x[2i] + i x[2i+1] by e^{iθ_i}; columns past R unchanged."""
    gen = torch.Generator().manual_seed(0)
    q, k = _qk(2, 4, 2, 5, 20, "contiguous", torch.float64, gen)
    cos, sin = _angles(2, 5, 12, gen, per_row=True)
    theta = torch.atan2(sin, cos).unsqueeze(1)
    for x, ref in zip((q, k), rope_interleaved_reference(q, k, cos, sin)):
        z = torch.complex(x[..., 0:12:2], x[..., 1:12:2]) * torch.exp(1j * theta)
        torch.testing.assert_close(ref[..., :12], torch.view_as_real(z).flatten(-2), rtol=1e-12, atol=1e-12)
        assert torch.equal(ref[..., 12:], x[..., 12:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_transformers_glm(dtype):
    """rope_interleaved_reference with GLM's own (B, T, R) tables is GLM's apply_rotary_pos_emb, bit for bit."""
    config = GlmConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    gen = torch.Generator().manual_seed(1)
    q, k = _qk(2, 4, 2, 6, 16, "transposed", dtype, gen)
    cos, sin = modeling_glm.GlmRotaryEmbedding(config)(q, torch.tensor([[0, 1, 2, 3, 4, 5], [9, 10, 11, 0, 1, 2]]))
    assert cos.shape == (2, 6, 8), "GLM's partial_rotary_factor 0.5: R = 8 of 16"
    for ours, theirs in zip(
        rope_interleaved_reference(q, k, cos, sin, 8), modeling_glm.apply_rotary_pos_emb(q, k, cos, sin)
    ):
        assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------------------------------------
# rope_interleaved vs float64, property-based
# ------------------------------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    n_heads_k = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 6, 10, 34, 64, 80, 96, 128, 256]))
    return {
        "batch": draw(st.integers(1, 3)),
        "n_heads_q": n_heads_k * draw(st.sampled_from([1, 2, 4])) + draw(st.sampled_from([0, 0, 1])),
        "n_heads_k": n_heads_k,
        "seq_len": draw(st.integers(1, 4)),
        "head_dim": head_dim,
        "rotary_dim": draw(st.sampled_from([head_dim, head_dim, 2 * max(1, head_dim // 4), 2])),
        "per_row": draw(st.booleans()),
        "layout": draw(st.sampled_from(["transposed", "contiguous", "fused_qkv"])),
        "kind": draw(st.sampled_from(["rope", "random"])),
        "table": draw(st.sampled_from(["pairs", "llama", "gptj"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _case(**fields):
    return fields


_EXTREMES = [
    # D=2 (one pair), odd head counts, GPT-J table (column stride 2)
    _case(batch=1, n_heads_q=3, n_heads_k=3, seq_len=1, head_dim=2, rotary_dim=2, per_row=False,
          layout="transposed", kind="random", table="gptj", seed=0),
    # 7 query heads over 2 kv heads (no GQA ratio needed), widths just past a power of two
    _case(batch=2, n_heads_q=7, n_heads_k=2, seq_len=3, head_dim=34, rotary_dim=34, per_row=True,
          layout="fused_qkv", kind="random", table="pairs", seed=1),
    # 24 heads of 256: more heads than one tile holds (16), so the head loop runs twice
    _case(batch=1, n_heads_q=24, n_heads_k=8, seq_len=1, head_dim=256, rotary_dim=256, per_row=False,
          layout="transposed", kind="rope", table="llama", seed=2),
    # GLM-like partial rotary (half the head) and a non-power-of-two half (80 -> 40 pairs... of 24 rotated)
    _case(batch=2, n_heads_q=4, n_heads_k=2, seq_len=2, head_dim=128, rotary_dim=64, per_row=True,
          layout="transposed", kind="rope", table="llama", seed=3),
    _case(batch=1, n_heads_q=4, n_heads_k=1, seq_len=2, head_dim=80, rotary_dim=24, per_row=False,
          layout="contiguous", kind="random", table="gptj", seed=4),
]  # fmt: skip


def _with_examples(test):
    for case in _EXTREMES:
        test = example(case=case)(test)
    return test


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@_with_examples
@given(case=_cases())
def test_rope_interleaved_matches_float64(backend_name, dtype, case):
    gen = torch.Generator().manual_seed(case["seed"])
    q, k = _qk(case["batch"], case["n_heads_q"], case["n_heads_k"], case["seq_len"], case["head_dim"],
               case["layout"], dtype, gen)  # fmt: skip
    rotary_dim = case["rotary_dim"]
    cos, sin = _angles(case["batch"], case["seq_len"], rotary_dim, gen, per_row=case["per_row"], kind=case["kind"])
    cos, sin = _table(cos, case["table"], dtype), _table(sin, case["table"], dtype)
    _check(q, k, cos, sin, backend_name, gen, rotary_dim if case["table"] == "llama" else None, name=str(case))


# ------------------------------------------------------------------------------------------------------
# The adapters: bit for bit the transformers functions they replace
# ------------------------------------------------------------------------------------------------------

_POSITIONS = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 0, 1]])  # packed: per-row positions


def _glm(dtype, gen, module=modeling_glm):
    config = GlmConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    q, k = _qk(2, 4, 2, 5, 16, "transposed", dtype, gen)
    cos, sin = modeling_glm.GlmRotaryEmbedding(config)(q, _POSITIONS)  # (2, 5, 8): partial rotary R = 8
    return glm_apply_rotary_pos_emb, module.apply_rotary_pos_emb, (q, k, cos, sin)


def _cohere(dtype, gen, module=modeling_cohere):
    config = CohereConfig(hidden_size=96, num_attention_heads=3, num_key_value_heads=1)
    q, k = _qk(2, 3, 1, 5, 32, "transposed", dtype, gen)
    cos, sin = modeling_cohere.CohereRotaryEmbedding(config)(q, _POSITIONS)  # repeat-interleaved (2, 5, 32)
    return cohere_apply_rotary_pos_emb, module.apply_rotary_pos_emb, (q, k, cos, sin)


def _ernie(dtype, gen):
    config = Ernie4_5Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    q, k = _qk(2, 4, 2, 5, 16, "transposed", dtype, gen)
    cos, sin = modeling_ernie4_5.Ernie4_5RotaryEmbedding(config)(q, _POSITIONS)  # fp32 tables
    return ernie4_5_apply_rotary_pos_emb, modeling_ernie4_5.apply_rotary_pos_emb, (q, k, cos, sin)


def _mla(dtype, gen):
    """MLA's rope parts as DeepSeek-V3's attention slices them: q_rot from (B, T, H, nope + rope) rows, k_rot
    from the compressed kv (B, T, kv_lora_rank + rope) viewed as one head."""
    n_heads, nope, rope, lora = 3, 8, 16, 12
    q_states = torch.randn(2, 5, n_heads * (nope + rope), generator=gen).to(dtype).requires_grad_()
    kv = torch.randn(2, 5, lora + rope, generator=gen).to(dtype).requires_grad_()
    q_rot = q_states.view(2, 5, n_heads, nope + rope).transpose(1, 2)[..., nope:]
    k_rot = kv[..., lora:].view(2, 1, 5, rope)
    return q_states, kv, q_rot, k_rot


def _deepseek_v3(dtype, gen, module=modeling_deepseek_v3):
    config = DeepseekV3Config(hidden_size=48, num_attention_heads=3, qk_rope_head_dim=16, qk_nope_head_dim=8,
                              v_head_dim=8, kv_lora_rank=12, q_lora_rank=None)  # fmt: skip
    _, _, q_rot, k_rot = _mla(dtype, gen)
    cos, sin = modeling_deepseek_v3.DeepseekV3RotaryEmbedding(config)(q_rot, _POSITIONS)
    return deepseek_apply_rotary_pos_emb_interleave, module.apply_rotary_pos_emb_interleave, (q_rot, k_rot, cos, sin)


def _deepseek_v2(dtype, gen):
    config = DeepseekV2Config(hidden_size=48, num_attention_heads=3, qk_rope_head_dim=16, qk_nope_head_dim=8,
                              v_head_dim=8, kv_lora_rank=12, q_lora_rank=None)  # fmt: skip
    _, _, q_rot, k_rot = _mla(dtype, gen)
    freqs_cis = modeling_deepseek_v2.DeepseekV2RotaryEmbedding(config)(q_rot, _POSITIONS)  # (2, 5, 8) complex64
    return deepseek_v2_apply_rotary_emb, modeling_deepseek_v2.apply_rotary_emb, (q_rot, k_rot, freqs_cis)


def _gpt_oss(dtype, gen):
    config = GptOssConfig(hidden_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    q, k = _qk(2, 6, 2, 5, 16, "transposed", dtype, gen)
    cos, sin = modeling_gpt_oss.GptOssRotaryEmbedding(config)(q, _POSITIONS)  # yarn, half width (2, 5, 8)
    return gpt_oss_apply_rotary_pos_emb, modeling_gpt_oss.apply_rotary_pos_emb, (q, k, cos, sin)


def _gpt_oss_one(dtype, gen):
    _, _, (q, _, cos, sin) = _gpt_oss(dtype, gen)
    return gpt_oss_apply_rotary_emb, modeling_gpt_oss._apply_rotary_emb, (q, cos.unsqueeze(1), sin.unsqueeze(1))


ADAPTERS = {
    "glm": _glm,
    "glm4": lambda dtype, gen: _glm(dtype, gen, modeling_glm4),
    "cohere": _cohere,
    "cohere2": lambda dtype, gen: _cohere(dtype, gen, modeling_cohere2),
    "ernie4_5": _ernie,
    "deepseek_v3": _deepseek_v3,
    "glm4_moe_lite": lambda dtype, gen: _deepseek_v3(dtype, gen, modeling_glm4_moe_lite),
    "deepseek_v2": _deepseek_v2,
    "gpt_oss": _gpt_oss,
    "gpt_oss_one_tensor": _gpt_oss_one,
}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _assert_same_as_transformers(ours_fn, theirs_fn, args, gen, backend_name, label):
    """Outputs (values, dtypes) and the gradients of every input that requires grad, exactly equal."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with backend(backend_name):
        ours = _as_tuple(ours_fn(*args))
    theirs = _as_tuple(theirs_fn(*args))
    assert [(o.shape, o.dtype) for o in ours] == [(t.shape, t.dtype) for t in theirs], label
    for i, (o, t) in enumerate(zip(ours, theirs)):
        assert torch.equal(o, t), f"{label}: output {i} differs by {(o.double() - t.double()).abs().max():.3e}"
    upstream = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in theirs]
    with backend(backend_name):
        our_grads = torch.autograd.grad(ours, leaves, upstream)
    their_grads = torch.autograd.grad(theirs, leaves, upstream)
    for i, (o, t) in enumerate(zip(our_grads, their_grads)):
        assert o.dtype == t.dtype and torch.equal(o, t), f"{label}: gradient {i} differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_adapter_equals_transformers(adapter, backend_name, dtype):
    gen = torch.Generator().manual_seed(20)
    ours, theirs, args = ADAPTERS[adapter](dtype, gen)
    _assert_same_as_transformers(ours, theirs, args, gen, backend_name, f"{adapter} {dtype}")


@pytest.mark.parametrize("adapter", ["glm", "deepseek_v3", "gpt_oss", "cohere"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_adapter_fp32_tables_with_bf16_heads(adapter, backend_name):
    """fp32 cos/sin with bf16 q/k (an fp32 model under bf16 autocast): transformers promotes to fp32 outputs
    (GLM, DeepSeek, gpt-oss) or casts back to bf16 (Cohere); the adapters follow, gradients in bf16."""
    gen = torch.Generator().manual_seed(21)
    ours, theirs, args = ADAPTERS[adapter](torch.bfloat16, gen)
    tables = [a for a in args[2:] if a.dtype == torch.bfloat16]
    assert tables, "the table builders return bf16 tables for bf16 inputs"
    args = args[:2] + tuple(a.float() for a in args[2:])
    _assert_same_as_transformers(ours, theirs, args, gen, backend_name, f"{adapter} fp32 tables")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_adapters_unsqueeze_dim_2(backend_name):
    """(B, T, H, D) q/k with unsqueeze_dim=2, as transformers documents: same results as transformers."""
    gen = torch.Generator().manual_seed(22)
    for adapter in ("glm", "cohere", "gpt_oss", "deepseek_v3"):
        ours, theirs, (q, k, cos, sin) = ADAPTERS[adapter](torch.bfloat16, gen)
        args = (q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        ours_t = functools.partial(ours, unsqueeze_dim=2)
        theirs_t = functools.partial(theirs, unsqueeze_dim=2)
        _assert_same_as_transformers(ours_t, theirs_t, args, gen, backend_name, adapter)
    ours_one, theirs_one, (x, cos, sin) = _gpt_oss_one(torch.bfloat16, gen)
    args = (x.transpose(1, 2), cos.transpose(1, 2), sin.transpose(1, 2))
    _assert_same_as_transformers(ours_one, theirs_one, args, gen, backend_name, "gpt_oss one tensor")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_deepseek_without_key(backend_name):
    """k=None (transformers' mistral_large4 copy of the function allows it): q rotated, None returned for k."""
    gen = torch.Generator().manual_seed(23)
    _, theirs, (q, k, cos, sin) = _deepseek_v3(torch.bfloat16, gen)
    with backend(backend_name):
        q_out, k_out = deepseek_apply_rotary_pos_emb_interleave(q, None, cos, sin)
    assert k_out is None
    assert torch.equal(q_out, theirs(q, k, cos, sin)[0])


# ------------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_single_token_partial_rotary(backend_name):
    gen = torch.Generator().manual_seed(5)
    q, k = _qk(2, 5, 1, 1, 40, "transposed", torch.bfloat16, gen)
    cos, sin = (t.to(torch.bfloat16) for t in _angles(2, 1, 16, gen, per_row=True))
    _check(q, k, cos, sin, backend_name, gen, name="T=1")
    with backend(backend_name), torch.no_grad():
        q_out, k_out = rope_interleaved(q, k, cos, sin)
    assert torch.equal(q_out[..., 16:], q[..., 16:]) and torch.equal(k_out[..., 16:], k[..., 16:])


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_per_row_positions_equal_rowwise_calls(backend_name):
    gen = torch.Generator().manual_seed(6)
    q, k = _qk(3, 4, 2, 5, 32, "transposed", torch.float32, gen)
    cos, sin = (t.float() for t in _angles(3, 5, 32, gen, per_row=True))
    with backend(backend_name), torch.no_grad():
        q_out, k_out = rope_interleaved(q, k, cos, sin)
        for row in range(3):
            q_row, k_row = rope_interleaved(q[row : row + 1], k[row : row + 1], cos[row : row + 1], sin[row : row + 1])
            assert torch.equal(q_out[row : row + 1], q_row) and torch.equal(k_out[row : row + 1], k_row)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_layout_kept_and_expanded_gradient(backend_name):
    """Outputs and gradients keep q/k's (B, T, H, D) memory; a stride-0 gradient (from .sum()) is handled."""
    gen = torch.Generator().manual_seed(9)
    q, k = _qk(2, 4, 2, 3, 16, "transposed", torch.float32, gen)
    cos, sin = (t.float() for t in _angles(1, 3, 16, gen))
    with backend(backend_name):
        q_out, k_out = rope_interleaved(q, k, cos, sin)
        assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
        dq, dk = torch.autograd.grad(q_out.sum() + 2 * k_out.sum(), (q, k))
    assert dq.stride() == q.stride() and dk.stride() == k.stride()
    ref_q, ref_k = rope_interleaved_reference(q, k, cos, sin)
    ref_dq, ref_dk = torch.autograd.grad(ref_q.sum() + 2 * ref_k.sum(), (q, k))
    torch.testing.assert_close(dq, ref_dq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dk, ref_dk, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_only_one_output_used(backend_name):
    gen = torch.Generator().manual_seed(10)
    q, k = _qk(1, 2, 1, 2, 8, "contiguous", torch.bfloat16, gen)
    cos, sin = (t.to(torch.bfloat16) for t in _angles(1, 2, 8, gen))
    with backend(backend_name):
        q_out, _ = rope_interleaved(q, k, cos, sin)
        dq, dk = torch.autograd.grad(q_out.float().square().sum(), (q, k))
    assert torch.count_nonzero(dk) == 0 and torch.count_nonzero(dq) > 0


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fp32_tables_with_bf16_heads(backend_name):
    """fp32 cos/sin are used at full precision by rope_interleaved; outputs keep q's dtype (one rounding)."""
    gen = torch.Generator().manual_seed(12)
    q, k = _qk(1, 4, 2, 3, 16, "transposed", torch.bfloat16, gen)
    cos, sin = (t.float() for t in _angles(1, 3, 16, gen))
    with backend(backend_name), torch.no_grad():
        q_out, k_out = rope_interleaved(q, k, cos, sin)
        q32, k32 = rope_interleaved(q.float(), k.float(), cos, sin)
    assert q_out.dtype == k_out.dtype == torch.bfloat16
    # Within one bf16 ulp of the fp32 result (one round-to-nearest: half an ulp, plus fp32's own rounding).
    torch.testing.assert_close(q_out.float(), q32, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
    torch.testing.assert_close(k_out.float(), k32, rtol=torch.finfo(torch.bfloat16).eps, atol=0)


def test_empty_sequence():
    q, k = torch.randn(1, 2, 0, 8, requires_grad=True), torch.randn(1, 1, 0, 8, requires_grad=True)
    cos = sin = torch.randn(1, 0, 4)
    q_out, k_out = rope_interleaved(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    dq, _ = torch.autograd.grad(q_out.sum() + k_out.sum(), (q, k))
    assert dq.shape == q.shape


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


def _errors():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    return [
        ((q, k, cos, sin, 5), ValueError, r"rotary_dim \(5\) must be even"),
        ((q, k, cos, sin, 10), ValueError, r"rotary_dim \(10\).*head_dim = 8"),
        ((q, k, torch.randn(1, 3, 2), torch.randn(1, 3, 2), 8), ValueError, r"needs at least 4 columns.*\(1, 3, 2\)"),
        ((q, k, torch.randn(1, 3, 5), torch.randn(1, 3, 5)), ValueError, r"rotary_dim \(10\)"),
        ((q, k, cos, sin, 4.0), TypeError, r"rotary_dim must be an int"),
        ((q, torch.randn(3, 2, 3, 8), cos, sin), ValueError, r"q \(2, 4, 3, 8\) and k \(3, 2, 3, 8\).*batch"),
        ((q, torch.randn(2, 2, 3, 6), cos, sin), ValueError, r"head_dim"),
        ((q, k, torch.randn(1, 3, 4), torch.randn(1, 3, 3)), ValueError, r"cos \(1, 3, 4\) and sin \(1, 3, 3\)"),
        ((q, k, torch.randn(3, 3, 4), torch.randn(3, 3, 4)), ValueError, r"1 or 2, 3.*got \(3, 3, 4\)"),
        ((q, k, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)), ValueError, r"without unsqueezing"),
        ((q[0], k[0], cos, sin), ValueError, r"\(batch, heads, seq_len, head_dim\)"),
        ((q.long(), k.long(), cos, sin), ValueError, r"q has dtype torch.int64"),
        ((q, k.double(), cos, sin), ValueError, r"same dtype"),
        ((q, k, cos, sin.double()), ValueError, r"same dtype"),
        ((q.numpy(), k, cos, sin), TypeError, r"q must be a torch.Tensor"),
        ((q, k, torch.randn(1, 3, 4, requires_grad=True), sin), NotImplementedError, r"cos.detach\(\)"),
    ]


@pytest.mark.parametrize("args, error, match", _errors())
def test_errors(args, error, match):
    with pytest.raises(error, match=match):
        rope_interleaved(*args)


def _adapter_errors():
    q, k = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 3, 16)
    full, half = torch.randn(1, 3, 16), torch.randn(1, 3, 8)
    return [
        (cohere_apply_rotary_pos_emb, (q, k, half, half), r"rotates the whole head.*head_dim = 16"),
        (cohere_apply_rotary_pos_emb, (q, k, torch.randn(1, 3, 15), torch.randn(1, 3, 15)), r"repeat-interleaved"),
        (deepseek_apply_rotary_pos_emb_interleave, (q, k, half, half), r"rotates the whole head"),
        (ernie4_5_apply_rotary_pos_emb, (q, k, half, half), r"rotates the whole head"),
        (gpt_oss_apply_rotary_pos_emb, (q, k, full, full), r"rotates the whole head"),
        (glm_apply_rotary_pos_emb, (q, k, torch.randn(1, 3, 34), torch.randn(1, 3, 34)), r"rotary_dim \(34\)"),
        (glm_apply_rotary_pos_emb, (q, k, full, full, 3), r"unsqueeze_dim=3 is not supported"),
        (gpt_oss_apply_rotary_emb, (q, half, half), r"cos must be \(1 or B, 1, T, D/2\)"),
        (gpt_oss_apply_rotary_emb, (q, half[:, None, :, :4], half[:, None, :, :4]), r"rotates the whole head"),
        (deepseek_v2_apply_rotary_emb, (q, k, half), r"freqs_cis must be a complex tensor"),
        (deepseek_v2_apply_rotary_emb, (q, k, torch.polar(half, half)[..., :4]), r"rotates the whole head"),
    ]


@pytest.mark.parametrize("fn, args, match", _adapter_errors())
def test_adapter_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# ------------------------------------------------------------------------------------------------------
# Memory and audit
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [None, "deepseek_v3", "gpt_oss_one_tensor"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_saves_only_cos_and_sin(backend_name, adapter):
    gen = torch.Generator().manual_seed(11)
    if adapter is None:
        fn, (q, k) = rope_interleaved, _qk(2, 4, 2, 3, 16, "transposed", torch.bfloat16, gen)
        args = (q, k, *(t.to(torch.bfloat16) for t in _angles(2, 3, 16, gen, per_row=True)))
    else:
        fn, _, args = ADAPTERS[adapter](torch.bfloat16, gen)
    tables = [a for a in args if isinstance(a, torch.Tensor) and not a.requires_grad]
    with backend(backend_name), SavedTensorMeter() as meter:
        fn(*args)
    # The tables as the kernel reads them: views of the caller's (a squeezed head dim for gpt-oss's one tensor).
    assert len(meter.saved) == 2 and meter.total_bytes <= sum(t.nbytes for t in tables)
    assert all(s.dtype == tables[0].dtype for s in meter.saved)


def test_audit_cases():
    cases = audit_cases()
    suffixes = ("", "_deepseek_v3", "_gpt_oss")
    assert [c.name for c in cases] == [f"rope_interleaved_{d}{s}" for s in suffixes for d in ("forward", "backward")]
    params = set(_rope_interleaved_kernel.arg_names)
    for case in cases:
        assert isinstance(case, AuditCase) and case.kernel is _rope_interleaved_kernel
        assert set(case.args) | set(case.constexprs) == params and not set(case.args) & set(case.constexprs)
        assert all(case.args[name] == Ptr("bf16") for name in params if name.endswith("_ptr"))
    glm_forward = cases[0]
    # q, k, q_out, k_out: 8192 tokens x (32 + 8) heads x 128 x bf16, once each; cos and sin: 8192 x 32 angles
    assert glm_forward.min_bytes == 2 * 8192 * 40 * 128 * 2 + 2 * 8192 * 32 * 2
    assert glm_forward.constexprs["BLOCK_HQ"] == 32 and glm_forward.num_warps == 4
    assert glm_forward.constexprs["PASS"] == 64 and glm_forward.constexprs["HALF"] == 32
    # DeepSeek: pairs in, halves out; the backward reads halves and writes pairs.
    ds_forward, ds_backward = cases[2:4]
    assert (ds_forward.constexprs["IN_INTERLEAVED"], ds_forward.constexprs["OUT_INTERLEAVED"]) == (True, False)
    assert (ds_backward.constexprs["IN_INTERLEAVED"], ds_backward.constexprs["OUT_INTERLEAVED"]) == (False, True)
    assert [c.constexprs["BACKWARD"] for c in cases] == [False, True] * 3
