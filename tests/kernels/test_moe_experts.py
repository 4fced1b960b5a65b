"""Tests for fastft.kernels.moe_experts (and the grouped GEMMs of fastft.kernels.grouped_matmul under it).

- Semantics: the reference equals transformers' own eager experts modules (Qwen3-MoE, gpt-oss, Nemotron-H) and
  an independent per-pair float64 formula, and PEFT's target_parameters LoRA through :func:`peft_factors`.
- Kernels: the Triton path (interpreted) and the torch path against the float64 reference in forward and every
  gradient (hidden, router weights, both stacks, biases, LoRA A/B), over named edge cases (empty experts,
  top-k 1, top-k = E, one token, all tokens to one expert, tiles spanning experts) and hypothesis shapes.
- Saved for backward, errors before any kernel launch.

Tolerances: fp32 results within 2e-5 of the largest exact value (the 1e-5 contract, doubled because each
output sums over K experts of GEMMs with fp32 accumulation over H and I); bf16 no worse than the reference
formula run by PyTorch in bf16 (tests/helpers.py: 2x its error + 4 ulp).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft.kernels import grouped_matmul as gm
from fastft.kernels.moe_experts import MoELoRA, moe_experts, moe_experts_reference, peft_factors
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, assert_no_worse_than_torch, backend

FP32_TOL = 2e-5


def make_case(
    seed,
    *,
    T=9,
    H=24,
    I=20,
    E=5,
    K=2,
    dtype=torch.float32,
    gated=True,
    transposed=False,
    bias=False,
    lora=(),
    rank=3,
    route="random",
    frozen=False,
    hidden_stride=1,
    scale=1.0,
    peft_views=False,
):
    """Tensors of one call; ``lora`` names the adapted projections ("gate_up", "down")."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)

    hidden = rand(T, H * hidden_stride)[:, ::hidden_stride]  # hidden_stride > 1: a non-contiguous view
    if route == "random":
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
    elif route == "one":
        idx = torch.full((T, K), E - 1)
        idx[:, 1:] = torch.arange(K - 1).expand(T, K - 1)  # k > 1: distinct experts per token, skewed load
    idx = idx.long()
    weights = torch.rand(T, K, generator=gen, dtype=torch.float64).to(dtype)
    n_gu = 2 * I if gated else I
    gate_up = rand(E, n_gu, H, s=scale / H**0.5)
    down = rand(E, H, I, s=1 / I**0.5)
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    tensors = {"hidden": hidden, "top_k_weights": weights, "gate_up": gate_up, "down": down}
    if bias:
        tensors.update(gate_up_bias=rand(E, n_gu, s=0.5), down_bias=rand(E, H, s=0.5))
    factors = {}
    if "gate_up" in lora:
        factors.update(gate_up_A=rand(E, rank, H, s=H**-0.5), gate_up_B=rand(E, n_gu, rank, s=0.5))
    if "down" in lora:
        factors.update(down_A=rand(E, rank, I, s=I**-0.5), down_B=rand(E, H, rank, s=0.5))
    for name, t in (*tensors.items(), *factors.items()):
        if not (frozen and name in ("gate_up", "down", "gate_up_bias", "down_bias")):
            t.requires_grad_(True)
    if peft_views:  # the factors as PEFT stores them, read through peft_factors' strided views
        for proj in lora:
            A, B = factors[f"{proj}_A"], factors[f"{proj}_B"]
            lora_A = A.detach().reshape(E * rank, -1).requires_grad_(True)
            lora_B = B.detach().permute(1, 2, 0).reshape(B.shape[1], rank * E).requires_grad_(True)
            factors[f"{proj}_A"], factors[f"{proj}_B"] = peft_factors(lora_A, lora_B, E)
    return tensors, factors, idx


def call(fn, tensors, factors, idx, **kw):
    lora = MoELoRA(**factors, gate_up_scaling=0.5, down_scaling=2.0) if factors else None
    t = dict(tensors)
    return fn(
        t.pop("hidden"),
        idx,
        t.pop("top_k_weights"),
        t.pop("gate_up"),
        t.pop("down"),
        t.pop("gate_up_bias", None),
        t.pop("down_bias", None),
        lora=lora,
        **kw,
    )


def grads_of(fn, tensors, factors, idx, grad_out=None, **kw):
    y = call(fn, tensors, factors, idx, **kw)
    leaves = {k: v for k, v in (*tensors.items(), *factors.items()) if v.requires_grad}
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    gs = torch.autograd.grad(y, list(leaves.values()), grad_out.to(y.dtype), allow_unused=True)
    return y, dict(zip(leaves, gs)), grad_out


def as64(tensors):
    return {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in tensors.items()}


def check_fp32(tensors, factors, idx, **kw):
    y, g, go = grads_of(moe_experts, tensors, factors, idx, **kw)
    if y.numel() == 0:  # no tokens: an empty output, and every gradient exists and is zero
        assert y.shape == tensors["hidden"].shape and all(v is not None and not v.any() for v in g.values())
        return
    y64, g64, _ = grads_of(moe_experts_reference, as64(tensors), as64(factors), idx, grad_out=go, **kw)
    for name, actual, exact in (("y", y, y64), *((k, g[k], g64[k]) for k in g64)):
        assert actual is not None, name
        assert actual.dtype == torch.float32
        scale = max(exact.abs().max().item(), 1e-30)
        err = (actual.double() - exact).abs().max().item() if exact.numel() else 0.0
        assert err <= FP32_TOL * scale, f"{name}: error {err:.3e} vs scale {scale:.3e}"


CASES = {
    "qwen3_silu": {},
    "gpt_oss": {
        "gen": {"transposed": True, "bias": True},
        "kw": {"act": "gpt_oss", "interleaved": True, "transposed": True, "limit": 0.9, "alpha": 1.702},
    },
    "lora_both_frozen_base": {"gen": {"lora": ("gate_up", "down"), "frozen": True}},
    "lora_gate_up_gelu_tanh_strided": {"gen": {"lora": ("gate_up",), "hidden_stride": 2}, "kw": {"act": "gelu_tanh"}},
    "ungated_relu2_lora_down": {"gen": {"gated": False, "lora": ("down",)}, "kw": {"act": "relu2", "gated": False}},
    "gelu_limit_transposed_lora": {
        "gen": {"transposed": True, "lora": ("gate_up", "down"), "scale": 3.0},
        "kw": {"act": "gelu", "transposed": True, "limit": 1.0},
    },
    "peft_strided_factors_gpt_oss": {
        "gen": {"transposed": True, "bias": True, "lora": ("gate_up", "down"), "peft_views": True},
        "kw": {"act": "gpt_oss", "interleaved": True, "transposed": True, "limit": 0.9},
    },
    "top1_one_token": {"gen": {"T": 1, "K": 1, "E": 3}},
    "no_tokens": {"gen": {"T": 0, "lora": ("gate_up",)}},
    "topk_all_experts": {"gen": {"T": 5, "K": 4, "E": 4, "bias": True}},
    "all_to_one_expert_many_tiles": {
        "gen": {"T": 150, "K": 2, "E": 8, "H": 16, "I": 16, "route": "one", "lora": ("down",)}
    },
}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_float64(case, backend_name):
    spec = CASES[case]
    tensors, factors, idx = make_case(1, **spec.get("gen", {}))
    with backend(backend_name):
        check_fp32(tensors, factors, idx, **spec.get("kw", {}))


@settings(max_examples=6)
@given(
    T=st.integers(1, 40),
    H=st.sampled_from([8, 16, 33]),
    I=st.sampled_from([8, 17, 24]),
    E=st.integers(1, 6),
    data=st.data(),
)
def test_triton_hypothesis_shapes(T, H, I, E, data):
    K = data.draw(st.integers(1, E))
    gated = data.draw(st.booleans())
    act = data.draw(st.sampled_from(["silu", "gelu_tanh", "gpt_oss"] if gated else ["silu", "relu"]))
    lora = data.draw(st.sampled_from([(), ("gate_up",), ("down",), ("gate_up", "down")]))
    transposed = data.draw(st.booleans())
    tensors, factors, idx = make_case(
        T * 31 + E, T=T, H=H, I=I, E=E, K=K, gated=gated, lora=lora, transposed=transposed, bias=act == "gpt_oss"
    )
    with backend("triton"):
        check_fp32(
            tensors,
            factors,
            idx,
            act=act,
            gated=gated,
            transposed=transposed,
            interleaved=act == "gpt_oss",
            limit=1.5 if act == "gpt_oss" else None,
        )


@pytest.mark.parametrize("case", ["qwen3_silu", "gpt_oss", "lora_both_frozen_base"])
def test_bf16_no_worse_than_torch(case):
    spec = CASES[case]
    kw = spec.get("kw", {})
    tensors, factors, idx = make_case(2, dtype=torch.bfloat16, T=12, **spec.get("gen", {}))
    with backend("triton"):
        y, g, go = grads_of(moe_experts, tensors, factors, idx, **kw)
    yt, gt, _ = grads_of(moe_experts_reference, tensors, factors, idx, grad_out=go, **kw)
    y64, g64, _ = grads_of(moe_experts_reference, as64(tensors), as64(factors), idx, grad_out=go, **kw)
    assert_no_worse_than_torch(y, yt, y64, name="y")
    for k in g64:
        assert_no_worse_than_torch(g[k], gt[k], g64[k], name=k)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fp32_router_weights_and_adapters_over_bf16_base(backend_name):
    """Mixtral-style fp32 router weights and PEFT's fp32 adapters over a bf16 expert stack: gradients keep each
    tensor's dtype, and everything is as accurate as the reference formula run in bf16 (factors cast to bf16,
    as PEFT's ParamWrapper does)."""
    tensors, factors, idx = make_case(8, dtype=torch.bfloat16, T=12, lora=("gate_up", "down"))
    tensors["top_k_weights"] = tensors["top_k_weights"].detach().float().requires_grad_(True)
    factors = {k: v.detach().float().requires_grad_(True) for k, v in factors.items()}
    with backend(backend_name):
        y, g, go = grads_of(moe_experts, tensors, factors, idx)
    yt, gt, _ = grads_of(moe_experts_reference, tensors, factors, idx, grad_out=go)
    y64, g64, _ = grads_of(moe_experts_reference, as64(tensors), as64(factors), idx, grad_out=go)
    assert_no_worse_than_torch(y, yt, y64, name="y")
    for k in g64:
        assert g[k].dtype == (tensors | factors)[k].dtype, k
        assert_no_worse_than_torch(g[k], gt[k].to(g[k].dtype), g64[k], name=k)


# ------------------------------------------------------------------------------------------ semantics


def _per_pair_formula(hidden, idx, weights, gate_up, down, b_gu, b_d, lora, act, transposed, interleaved, limit, alpha):
    """Every (token, slot) pair with its own gathered weights: no loop, no index_add (independent of the ref)."""
    T, K = idx.shape
    e = idx.reshape(-1)
    x = hidden.repeat_interleave(K, dim=0)
    W_gu = gate_up[e].transpose(1, 2) if transposed else gate_up[e]
    W_d = down[e].transpose(1, 2) if transposed else down[e]
    if lora is not None:
        W_gu = W_gu + lora.gate_up_scaling * lora.gate_up_B[e] @ lora.gate_up_A[e]
        W_d = W_d + lora.down_scaling * lora.down_B[e] @ lora.down_A[e]
    gu = torch.einsum("poi,pi->po", W_gu, x) + (b_gu[e] if b_gu is not None else 0)
    g, u = (gu[:, 0::2], gu[:, 1::2]) if interleaved else gu.chunk(2, -1)
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    h = (u + 1) * g * torch.sigmoid(alpha * g) if act == "gpt_oss" else torch.nn.functional.silu(g) * u
    y = torch.einsum("poi,pi->po", W_d, h) + (b_d[e] if b_d is not None else 0)
    return (y * weights.reshape(-1, 1)).view(T, K, hidden.shape[1]).sum(1)


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**16),
    T=st.integers(0, 12),
    E=st.integers(1, 5),
    gpt_oss=st.booleans(),
    with_lora=st.booleans(),
)
def test_reference_is_the_formula(seed, T, E, gpt_oss, with_lora):
    K = min(2, E)
    tensors, factors, idx = make_case(
        seed,
        T=T,
        E=E,
        K=K,
        dtype=torch.float64,
        transposed=gpt_oss,
        bias=gpt_oss,
        lora=("gate_up", "down") if with_lora else (),
        scale=3.0,
    )
    kw = {"act": "gpt_oss", "interleaved": True, "transposed": True, "limit": 1.0, "alpha": 1.702} if gpt_oss else {}
    lora = MoELoRA(**factors, gate_up_scaling=0.5, down_scaling=2.0) if factors else None
    t = tensors
    ref = call(moe_experts_reference, tensors, factors, idx, **kw)
    exact = _per_pair_formula(
        t["hidden"],
        idx,
        t["top_k_weights"],
        t["gate_up"],
        t["down"],
        t.get("gate_up_bias"),
        t.get("down_bias"),
        lora,
        kw.get("act", "silu"),
        gpt_oss,
        gpt_oss,
        kw.get("limit"),
        1.702,
    )
    torch.testing.assert_close(ref, exact, rtol=1e-12, atol=1e-12)


def _tiny_experts(model_type):
    from transformers import AutoConfig

    if model_type == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        cfg = AutoConfig.for_model(
            "qwen3_moe", hidden_size=16, moe_intermediate_size=12, num_experts=5, num_experts_per_tok=2
        )
    elif model_type == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        cfg = AutoConfig.for_model(
            "gpt_oss", hidden_size=16, intermediate_size=12, num_local_experts=5, num_experts_per_tok=2
        )
    else:
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts as cls

        cfg = AutoConfig.for_model(
            "nemotron_h",
            hidden_size=16,
            moe_intermediate_size=12,
            n_routed_experts=5,
            num_experts_per_tok=2,
            mlp_hidden_act="relu2",
        )
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    experts = cls(cfg).double()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return experts


KWARGS_OF = {
    "qwen3_moe": lambda m: {"act": "silu"},
    "gpt_oss": lambda m: {
        "act": "gpt_oss",
        "transposed": True,
        "interleaved": True,
        "alpha": m.alpha,
        "limit": m.limit,
    },
    "nemotron_h": lambda m: {"act": "relu2", "gated": False},
}


@pytest.mark.parametrize("model_type", list(KWARGS_OF))
def test_reference_equals_transformers_experts(model_type):
    m = _tiny_experts(model_type)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 16, generator=gen, dtype=torch.float64) * 3
    idx = torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(11)])
    w = torch.rand(11, 2, generator=gen, dtype=torch.float64)
    gate_up = m.up_proj if model_type == "nemotron_h" else m.gate_up_proj
    biases = (m.gate_up_proj_bias, m.down_proj_bias) if model_type == "gpt_oss" else (None, None)
    ours = moe_experts_reference(x, idx, w, gate_up, m.down_proj, *biases, **KWARGS_OF[model_type](m))
    torch.testing.assert_close(ours, m(x, idx, w), rtol=1e-12, atol=1e-12)
    with backend("torch"):
        torch.testing.assert_close(
            moe_experts(x, idx, w, gate_up, m.down_proj, *biases, **KWARGS_OF[model_type](m)),
            m(x, idx, w),
            rtol=1e-12,
            atol=1e-12,
        )


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_peft_target_parameters_through_peft_factors(model_type):
    """PEFT's ParamWrapper on gate_up_proj/down_proj: same output and LoRA gradients via peft_factors."""
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.experts = experts

        def forward(self, x, idx, w):
            return self.experts(x, idx, w)

    m = _tiny_experts(model_type)
    model = get_peft_model(
        Holder(m),
        LoraConfig(
            r=2,
            lora_alpha=6,
            target_modules=[],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
            init_lora_weights=False,
        ),
    )
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 16, generator=gen, dtype=torch.float64)
    idx = torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(7)])
    w = torch.rand(7, 2, generator=gen, dtype=torch.float64)
    expected = model(x, idx, w)
    wrappers = {mod.parameter_name: mod for mod in model.modules() if type(mod).__name__ == "ParamWrapper"}
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    g_expected = torch.autograd.grad(expected.sum(), lora_params)

    def factors(name):
        wr = wrappers[name]
        return (*peft_factors(wr.lora_A["default"].weight, wr.lora_B["default"].weight, 5), wr.scaling["default"])

    gu_A, gu_B, gu_s = factors("gate_up_proj")
    d_A, d_B, d_s = factors("down_proj")
    lora = MoELoRA(gu_A, gu_B, gu_s, d_A, d_B, d_s)
    gate_up, down = m.gate_up_proj, m.down_proj
    biases = (m.gate_up_proj_bias, m.down_proj_bias) if model_type == "gpt_oss" else (None, None)
    with backend("torch"):
        ours = moe_experts(x, idx, w, gate_up, down, *biases, lora=lora, **KWARGS_OF[model_type](m))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours.sum(), lora_params), g_expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------ memory, errors


def test_autocast_runs_the_low_precision_call():
    """Under torch.autocast (bf16) on fp32 tensors: the call equals an explicit bf16 call; fp32 gradients."""
    tensors, factors, idx = make_case(6, lora=("gate_up",))
    low = {k: v.detach().bfloat16().requires_grad_(v.requires_grad) for k, v in tensors.items()}
    low["top_k_weights"] = tensors["top_k_weights"].detach().requires_grad_(True)  # not autocast
    low_f = {k: v.detach().bfloat16().requires_grad_(True) for k, v in factors.items()}
    with backend("torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, g, go = grads_of(moe_experts, tensors, factors, idx)
        y_low, g_low, _ = grads_of(moe_experts, low, low_f, idx, grad_out=go)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_low)
    for k, v in g.items():
        assert v.dtype == torch.float32 and torch.equal(v, g_low[k].float()), k


def test_saves_only_inputs_and_routing():
    tensors, factors, idx = make_case(5, T=16, lora=("gate_up", "down"), frozen=True)
    with backend("triton"), SavedTensorMeter() as meter:
        call(moe_experts, tensors, factors, idx)
    params = {id(t.untyped_storage()) for t in (*factors.values(), tensors["gate_up"], tensors["down"])}
    activations = [s for s in meter.saved if s.shape in ((16, 24), (16, 2))]
    shapes = sorted(s.shape for s in meter.saved)
    assert len(activations) == 3, shapes  # hidden, top_k_index, top_k_weights
    assert len(meter.saved) == 3 + 2 + 4, shapes  # + the two stacks + four LoRA factors (no memory of their own)
    assert params


def _malformed():
    t, _f, idx = make_case(0)
    E = 5
    yield "index out of range", {"idx": idx.clone().fill_(E)}, "outside"
    yield "negative index", {"idx": -idx - 1}, "outside"
    yield "weights shape", {"top_k_weights": t["top_k_weights"][:, :1]}, "top_k_weights must have"
    yield "float index", {"idx": idx.float()}, "integer"
    yield "3-D hidden", {"hidden": t["hidden"][None]}, "2-D"
    yield "dtype mismatch", {"hidden": t["hidden"].double()}, "dtype"
    yield "hidden size", {"hidden": t["hidden"][:, :7]}, "hidden size"
    yield "expert count", {"down": t["down"][:3]}, "experts"
    yield "lora half", {"lora": MoELoRA(gate_up_A=torch.zeros(E, 2, 24))}, "together"
    yield "lora shape", {"lora": MoELoRA(torch.zeros(E, 2, 24), torch.zeros(E, 40, 3))}, "lora.gate_up"
    yield "act", {"act": "swish"}, "act="
    yield "bias shape", {"gate_up_bias": torch.zeros(E, 7)}, "gate_up_bias"


@pytest.mark.parametrize("name,change,message", list(_malformed()), ids=[m[0] for m in _malformed()])
def test_malformed_inputs_raise_before_any_kernel(name, change, message, monkeypatch):
    t, _, idx = make_case(0)
    args = {
        "hidden": t["hidden"],
        "idx": idx,
        "top_k_weights": t["top_k_weights"],
        "gate_up": t["gate_up"],
        "down": t["down"],
        "gate_up_bias": None,
        "lora": None,
        "act": "silu",
    }
    args.update(change)

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before the input check")

    monkeypatch.setattr(gm, "ops", no_kernel)
    with pytest.raises(ValueError, match=message):
        moe_experts(
            args["hidden"],
            args["idx"],
            args["top_k_weights"],
            args["gate_up"],
            args["down"],
            args["gate_up_bias"],
            lora=args["lora"],
            act=args["act"],
        )
