"""Tests for fastft.kernels.lora_ungated_mlp: float64 accuracy of every output and gradient, parity with the
transformers MLP modules (GPT-2's Conv1D, Phi, StarCoder2, Nemotron, GPT-NeoX, Apertus' xIELU) wrapped by PEFT
and fully fine-tuned, what autograd saves against PEFT, quantized weights, autocast, errors.

Tolerances are test_lora.py's: fp32 results within 1e-5 of float64 (PEFT parity: 1e-5 relative); low-precision
results no worse than PEFT's formula run by PyTorch in the same dtypes (2x its error + 4 ulp), where the fused
activation rounds once and transformers rounds after each op.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import ApertusConfig, GPT2Config, GPTNeoXConfig, NemotronConfig, PhiConfig, Starcoder2Config
from transformers.models.apertus.modeling_apertus import ApertusMLP
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP
from transformers.models.nemotron.modeling_nemotron import NemotronMLP
from transformers.models.phi.modeling_phi import PhiMLP
from transformers.models.starcoder2.modeling_starcoder2 import Starcoder2MLP
from transformers.pytorch_utils import Conv1D

from fastft.kernels.activation import XIELU, activation_name
from fastft.kernels.lora import LoRAProjection
from fastft.kernels.lora_ungated_mlp import audit_cases, lora_ungated_mlp, lora_ungated_mlp_reference
from fastft.models.projections import read_projection
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, backend
from tests.kernels.test_lora import (
    DTYPE_CONFIGS,
    PARTS,
    _shapes,
    as_float64,
    assert_accurate,
    assert_peft_parity,
    leaves,
    make_proj,
    make_x,
    peft_wrap,
    rand,
)

KINDS = ("gelu", "gelu_tanh", "relu2", "quick_gelu", "xielu")
HIDDEN, INTERMEDIATE = 16, 40


def make_xielu(gen, dtype, requires_grad=True) -> XIELU:
    alpha_p = (torch.randn(1, generator=gen) * 0.8).to(dtype).requires_grad_(requires_grad)
    alpha_n = (torch.randn(1, generator=gen) * 0.8 - 0.7).to(dtype).requires_grad_(requires_grad)
    return XIELU(alpha_p, alpha_n, torch.tensor(0.5, dtype=dtype), torch.tensor(-1e-6, dtype=dtype))


def alpha_leaves(spec):
    if not isinstance(spec, XIELU):
        return []
    return [(label, t) for label, t in (("alpha_p", spec.alpha_p), ("alpha_n", spec.alpha_n)) if t.requires_grad]


def xielu_float64(spec: XIELU) -> tuple[XIELU, list[torch.Tensor]]:
    """An XIELU in float64 whose coefficients are exactly ``spec``'s (rounded in its parameters' dtype, as
    transformers computes them), and per alpha the factor turning its float64 gradient into the exact gradient
    of ``spec``'s own parameter: d/dp = dL/da * sigmoid(p), where the float64 run gives dL/da * sigmoid(p64)."""
    with torch.no_grad():
        beta = spec.beta.double()
        a_p = F.softplus(spec.alpha_p).double()
        a_n = (spec.beta + F.softplus(spec.alpha_n)).double() - beta
    raws = [torch.log(torch.expm1(a)) for a in (a_p, a_n)]  # softplus^-1
    factors = [
        torch.sigmoid(p.detach().double()) / torch.sigmoid(raw) for p, raw in zip((spec.alpha_p, spec.alpha_n), raws)
    ]
    p64, n64 = (raw.requires_grad_(t.requires_grad) for raw, t in zip(raws, (spec.alpha_p, spec.alpha_n)))
    return XIELU(p64, n64, beta, spec.eps.double()), factors


def run(fn, x, projs, spec, dy):
    """Output (flat) and the gradients of x, every projection leaf and the xIELU alphas that require grad."""
    out = fn(x, projs[0], projs[1], spec).reshape(-1)
    labelled = ([("x", x)] if x.requires_grad else []) + leaves(projs) + alpha_leaves(spec)
    grads = torch.autograd.grad(out, [t for _, t in labelled], dy.to(out.dtype)) if labelled else ()
    return {"out": out, **{label: g for (label, _), g in zip(labelled, grads, strict=True)}}


def exact_run(x, projs, spec, dy):
    """The float64 answer for the same (rounded) inputs, xIELU coefficients and upstream gradient."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    spec64, factors = xielu_float64(spec) if isinstance(spec, XIELU) else (spec, [])
    exact = run(lora_ungated_mlp_reference, x64, [as_float64(p) for p in projs], spec64, dy)
    for label, factor in zip(("alpha_p", "alpha_n"), factors):
        if label in exact:
            exact[label] = exact[label] * factor
    return exact


def check_against_float64(x, projs, spec, gen, name=""):
    with torch.no_grad():
        out = lora_ungated_mlp(x, *projs, spec)
    dy = rand(gen, out.numel(), dtype=out.dtype)
    ours = run(lora_ungated_mlp, x, projs, spec, dy)
    theirs = run(lora_ungated_mlp_reference, x, projs, spec, dy)
    exact = exact_run(x, projs, spec, dy)
    assert ours.keys() == exact.keys() == theirs.keys()
    for label, value in ours.items():
        want = exact[label].reshape(value.shape)
        assert value.dtype == theirs[label].dtype, label
        assert_accurate(value, theirs[label], want, x.dtype, fp32_exact=False, name=f"{name} {label}")
    return ours


def make_mlp(gen, n_embd, n_inter, rank, config, train=PARTS, bias=True, quantized=False, dropout=0.0):
    return [
        make_proj(gen, n_inter, n_embd, rank, config, train, bias, quantized=quantized, dropout=dropout),
        make_proj(gen, n_embd, n_inter, rank + 1, config, train, bias, quantized=quantized, dropout=dropout),
    ]


# ------------------------------------------------------------------------------------------------------
# Property-based accuracy
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=30)
@given(
    case=_shapes(),
    n_embd=st.integers(1, 24),
    n_inter=st.integers(1, 40),
    kind=st.sampled_from(KINDS),
    train_alphas=st.booleans(),
)
def test_lora_ungated_mlp_matches_float64(backend_name, case, n_embd, n_inter, kind, train_alphas):
    gen = torch.Generator().manual_seed(case["seed"])
    projs = make_mlp(gen, n_embd, n_inter, case["rank"], case["config"], case["train"], case["bias"])
    base = DTYPE_CONFIGS[case["config"]][0]
    x = make_x(gen, case["lead"], n_embd, base, case["layout"], case["x_grad"])
    spec = make_xielu(gen, base, train_alphas) if kind == "xielu" else kind
    with backend(backend_name):
        check_against_float64(x, projs, spec, gen, name=f"{kind} {case}")


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_weights_match_float64_and_are_dequantized_once_per_pass(kind):
    """4-bit-like base weights (bf16 dequantized) with fp32 adapters, as QLoRA: every gradient right, each weight
    dequantized once in forward and once in backward, never kept."""
    gen = torch.Generator().manual_seed(3)
    projs = make_mlp(gen, 24, 40, 4, "bf16+fp32", ("bias", "lora_A", "lora_B"), quantized=True)
    x = make_x(gen, (2, 5), 24, torch.bfloat16, "contiguous")
    spec = make_xielu(gen, torch.bfloat16) if kind == "xielu" else kind
    check_against_float64(x, projs, spec, gen, name=kind)
    quants = [p.weight for p in projs]
    for q in quants:
        q.calls = 0
    with SavedTensorMeter() as meter:
        y = lora_ungated_mlp(x, *projs, spec)
    assert [q.calls for q in quants] == [1, 1] and all(q.alive() == 0 for q in quants)
    assert not any(tuple(t.shape) in {(40, 24), (24, 40)} for t in meter.saved)
    y.float().square().sum().backward()
    assert [q.calls for q in quants] == [2, 2] and all(q.alive() == 0 for q in quants)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_only_the_down_adapter_trains(backend_name):
    """x and the up projection frozen: no du, x not saved, u kept only to recompute h for dA_d."""
    gen = torch.Generator().manual_seed(4)
    up = make_proj(gen, 40, 16, 2, "bf16+fp32", train=())
    down = make_proj(gen, 16, 40, 2, "bf16+fp32", train=("lora_A", "lora_B"))
    x = make_x(gen, (6,), 16, torch.bfloat16, "contiguous", requires_grad=False)
    with backend(backend_name):
        check_against_float64(x, [up, down], "gelu_tanh", gen, name="down only")
        with SavedTensorMeter() as meter:
            y = lora_ungated_mlp(x, up, down, "gelu_tanh")
    saved = y.grad_fn.next_functions[0][0].saved_tensors  # the Function's, under the view outside it
    assert not any(t is not None and t.data_ptr() == x.data_ptr() for t in saved)
    # u and s xa_d (fp32), and B_d (for gBs); no x, no W_d or A_d (no dh is needed)
    assert meter.total_bytes == down.lora_B.untyped_storage().nbytes() + 6 * 40 * 2 + 6 * 2 * 4


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_empty_batch(backend_name):
    gen = torch.Generator().manual_seed(5)
    projs = make_mlp(gen, 8, 12, 2, "bf16+fp32")
    spec = make_xielu(gen, torch.bfloat16)
    x = make_x(gen, (0,), 8, torch.bfloat16, "contiguous")
    with backend(backend_name):
        y = lora_ungated_mlp(x, *projs, spec)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and projs[0].lora_A.grad.abs().sum() == 0 and spec.alpha_p.grad.item() == 0


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_output_may_be_modified_in_place(backend_name):
    """The result is an ordinary view (reshaped outside the Function): a residual add in place works."""
    gen = torch.Generator().manual_seed(6)
    projs = make_mlp(gen, 8, 12, 2, "fp32")
    x = make_x(gen, (2, 3), 8, torch.float32, "contiguous")
    with backend(backend_name):
        y = lora_ungated_mlp(x, *projs, "relu2")
        y.mul_(2.0)
    y.sum().backward()
    want = torch.autograd.grad(2 * lora_ungated_mlp_reference(x, *projs, "relu2").sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_under_autocast_behaves_like_f_linear(backend_name):
    """An fp32 model under torch.autocast(bf16), as an HF Trainer with bf16=True: bf16 output, fp32 gradients
    for the fp32 parameters (xIELU's alphas included)."""
    gen = torch.Generator().manual_seed(7)
    projs = make_mlp(gen, 12, 20, 2, "fp32")
    spec = make_xielu(gen, torch.float32)
    x = make_x(gen, (6,), 12, torch.float32, "contiguous")
    with torch.autocast("cpu", dtype=torch.bfloat16), backend(backend_name):
        y = lora_ungated_mlp(x, *projs, spec)
        want = lora_ungated_mlp_reference(x, *projs, spec)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=4e-2, atol=4e-2 * want.abs().max().item())
    y.float().sum().backward()
    assert (
        all(t.grad.dtype == torch.float32 for p in projs for t in (p.weight, p.lora_A))
        and x.grad.dtype == torch.float32
    )
    assert spec.alpha_p.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------
# Parity with the transformers MLP modules, PEFT-wrapped and fully fine-tuned
# ------------------------------------------------------------------------------------------------------

# family: (module factory, up, down, activation attribute, fastft activation)
FAMILIES = {
    "gpt2": (
        lambda: GPT2MLP(INTERMEDIATE, GPT2Config(n_embd=HIDDEN, resid_pdrop=0.0, activation_function="gelu_new")),
        "c_fc",
        "c_proj",
        "act",
        "gelu_tanh",
    ),
    "phi": (
        lambda: PhiMLP(PhiConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="gelu_new")),
        "fc1",
        "fc2",
        "activation_fn",
        "gelu_tanh",
    ),
    "starcoder2": (
        lambda: Starcoder2MLP(
            Starcoder2Config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, use_bias=True, residual_dropout=0.0)
        ),
        "c_fc",
        "c_proj",
        "act",
        "gelu_tanh",
    ),
    "nemotron": (
        lambda: NemotronMLP(NemotronConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, mlp_bias=True)),
        "up_proj",
        "down_proj",
        "act_fn",
        "relu2",
    ),
    "gpt_neox": (
        lambda: GPTNeoXMLP(
            GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=4, hidden_act="gelu")
        ),
        "dense_h_to_4h",
        "dense_4h_to_h",
        "act",
        "gelu",
    ),
    "apertus": (
        lambda: ApertusMLP(ApertusConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)),
        "up_proj",
        "down_proj",
        "act_fn",
        "xielu",
    ),
}


def _family(name, seed=0):
    factory, up, down, act, kind = FAMILIES[name]
    torch.manual_seed(seed)
    module = factory()
    with torch.no_grad():
        for p in module.parameters():  # weights of a trained model's size (the default init is tiny for GPT-2)
            p.normal_(0.0, 0.3)
    return module, up, down, act, kind


def _activation_of(mlp, act_attr):
    act = getattr(mlp, act_attr)
    kind = activation_name(act)
    return kind, (XIELU.from_module(act) if kind == "xielu" else kind)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_equals_peft_wrapped_transformers_mlp(family, dtype, dropout):
    """The transformers MLP with PEFT LoRA on both projections: forward, dx and every LoRA gradient; projections
    read by fastft.models.projections.read_projection (GPT-2's Conv1D through a transposed view)."""
    module, up_name, down_name, act_attr, expected = _family(family)
    model = peft_wrap(module, dtype, [up_name, down_name], dropout)
    mlp = model.base_model.model
    kind, spec = _activation_of(mlp, act_attr)
    assert kind == expected
    projs = [read_projection(getattr(mlp, name)) for name in (up_name, down_name)]
    assert all(p is not None and p.lora_A is not None for p in projs)
    assert projs[0].dropout == dropout
    gen = torch.Generator().manual_seed(1)
    x = make_x(gen, (2, 5), HIDDEN, dtype, "contiguous")
    dy = rand(gen, 2 * 5 * HIDDEN, dtype=dtype)
    torch.manual_seed(11)  # the same dropout masks for both
    theirs = run(lambda x, *_: model(x), x, projs, spec, dy)
    torch.manual_seed(11)
    ours = run(lora_ungated_mlp, x, projs, spec, dy)
    names = list(ours)
    assert names == ["out", "x", "0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B"]
    if dtype == torch.float32:
        assert_peft_parity(list(ours.values()), list(theirs.values()), names)
        return
    # bf16: transformers rounds after each op of the activation (gelu_new, xIELU) where fastft rounds once, so h
    # (and all that follows) may differ by an ulp of h: both are held against float64 (ours no worse than PEFT's).
    torch.manual_seed(11)
    exact = exact_run(x, projs, spec, dy)
    for name in names:
        want = exact[name].reshape(ours[name].shape)
        assert_accurate(ours[name], theirs[name], want, dtype, fp32_exact=False, name=f"{family} {name}")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_fine_tuning_equals_transformers_mlp(family, backend_name):
    """No PEFT, every parameter trainable (fp32): forward and the gradients of x, both weights and biases (GPT-2's
    Conv1D weight (in, out) through the view), and xIELU's alpha_p / alpha_n."""
    module, up_name, down_name, act_attr, _ = _family(family, seed=2)
    _, spec = _activation_of(module, act_attr)
    projs = [read_projection(getattr(module, name)) for name in (up_name, down_name)]
    up_module = getattr(module, up_name)
    if isinstance(up_module, Conv1D):
        assert projs[0].weight.data_ptr() == up_module.weight.data_ptr()  # a view, no copy
        assert projs[0].weight.shape == (INTERMEDIATE, HIDDEN)
    params = [p for p in module.parameters() if p.requires_grad]
    assert len(params) == len(list(module.parameters()))
    gen = torch.Generator().manual_seed(3)
    x = make_x(gen, (3, 4), HIDDEN, torch.float32, "contiguous")
    dy = rand(gen, 3, 4, HIDDEN, dtype=torch.float32)
    theirs = [module(x), *torch.autograd.grad(module(x), [x, *params], dy)]
    with backend(backend_name):
        y = lora_ungated_mlp(x, *projs, spec)
    ours = [y, *torch.autograd.grad(y, [x, *params], dy)]
    names = ["out", "x", *(name for name, _ in module.named_parameters())]
    assert_peft_parity(ours, theirs, names)


# ------------------------------------------------------------------------------------------------------
# Memory: what autograd keeps, against PEFT + transformers
# ------------------------------------------------------------------------------------------------------

SAVED_TOKENS, SAVED_HIDDEN, SAVED_INTERMEDIATE = 64, 32, 128


def _small_family(family):
    """The family's MLP at hidden 32, intermediate 128 (names of the up/down projections and act from FAMILIES)."""
    if family == "gpt2":
        return GPT2MLP(SAVED_INTERMEDIATE, GPT2Config(n_embd=SAVED_HIDDEN, resid_pdrop=0.0))
    config, module = {
        "starcoder2": (Starcoder2Config, Starcoder2MLP),
        "nemotron": (NemotronConfig, NemotronMLP),
        "apertus": (ApertusConfig, ApertusMLP),
    }[family]
    return module(config(hidden_size=SAVED_HIDDEN, intermediate_size=SAVED_INTERMEDIATE))


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("family", ["gpt2", "starcoder2", "nemotron", "apertus"])
def test_saves_less_than_peft(family, backend_name):
    """bf16 base, fp32 adapters (PEFT's default), 64 tokens, hidden 32, intermediate 128, r = 4. fastft keeps x,
    u (bf16) and s xa (N, r) fp32 per adapter (+ 24 bytes of xIELU coefficients) beside the weights; PEFT keeps
    the fp32 copy of x, u, the fp32 copy of h, the (N, r) products and the activation's own intermediates (gelu_new:
    three more (N, I) tensors; xIELU: three and a bool mask): 2.6x (relu2, F.gelu) to 4.8x (gelu_new) more."""
    _, up_name, down_name, act_attr, _ = FAMILIES[family]
    model = peft_wrap(_small_family(family), torch.bfloat16, [up_name, down_name])
    mlp = model.base_model.model
    _, spec = _activation_of(mlp, act_attr)
    projs = [read_projection(getattr(mlp, name)) for name in (up_name, down_name)]
    rank = projs[0].lora_A.shape[0]
    x = torch.randn(SAVED_TOKENS, SAVED_HIDDEN).bfloat16().requires_grad_()
    with backend(backend_name), SavedTensorMeter() as ours:
        lora_ungated_mlp(x, *projs, spec)
    with SavedTensorMeter() as theirs:
        model(x)
    weights = sum(t.untyped_storage().nbytes() for p in projs for t in (p.weight, p.lora_A, p.lora_B))
    activations = SAVED_TOKENS * (SAVED_HIDDEN * 2 + SAVED_INTERMEDIATE * 2 + 2 * rank * 4)
    assert ours.total_bytes == weights + activations + (24 if family == "apertus" else 0)
    assert theirs.total_bytes - weights > 2 * activations, (ours.total_bytes, theirs.total_bytes, weights)
    print(f"{family}: fastft {ours.total_bytes - weights} B, PEFT {theirs.total_bytes - weights} B beside weights")


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    gen = torch.Generator().manual_seed(8)
    up, down = make_mlp(gen, 8, 10, 2, "fp32")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"lora_ungated_mlp: activation must be one of 'gelu'.*got 'silu'"):
        lora_ungated_mlp(x, up, down, "silu")
    with pytest.raises(ValueError, match=r"pass XIELU\(alpha_p, alpha_n, beta, eps\) or XIELU.from_module"):
        lora_ungated_mlp(x, up, down, "xielu")
    with pytest.raises(ValueError, match=r"XIELU.alpha_p is on meta but x is on cpu"):
        lora_ungated_mlp(x, up, down, XIELU(torch.zeros(1, device="meta"), torch.zeros(1)))
    with pytest.raises(ValueError, match=r"down.weight is \(8, 10\) but its input has 12 features"):
        lora_ungated_mlp(x, make_proj(gen, 12, 8, 2, "fp32"), down, "gelu")
    with pytest.raises(ValueError, match=r"up.weight is \(10, 8\) but its input has 5 features"):
        lora_ungated_mlp(torch.randn(3, 5), up, down, "gelu")
    with pytest.raises(TypeError, match=r"x must be a float32/bfloat16/float16/float64 tensor"):
        lora_ungated_mlp(x.int(), up, down, "gelu")
    with pytest.raises(TypeError, match=r"up must be a LoRAProjection, got Linear"):
        lora_ungated_mlp(x, torch.nn.Linear(8, 10), down, "gelu")
    with pytest.raises(TypeError, match=r"adapters must share one dtype"):
        bf16_down = LoRAProjection(down.weight, None, down.lora_A.bfloat16(), down.lora_B.bfloat16())
        lora_ungated_mlp(x, up, bf16_down, "gelu")
    with pytest.raises(TypeError, match=r"up.weight is torch.float32 but x is torch.bfloat16.*autocast"):
        lora_ungated_mlp(x.bfloat16(), up, down, "gelu")


def test_no_audit_cases():
    """The module launches no Triton kernel of its own (GEMMs are cuBLAS, the activation is activation.py's)."""
    assert audit_cases() == []


def test_read_projection_of_conv1d_without_and_with_peft():
    """A plain Conv1D reads as its transposed weight (a view); a PEFT layer with fan_in_fan_out on a Conv1D is
    supported, while fan_in_fan_out on anything else still falls back (None)."""
    conv = Conv1D(6, 4)
    proj = read_projection(conv)
    assert proj.weight.shape == (6, 4) and proj.weight.data_ptr() == conv.weight.data_ptr()
    x = torch.randn(3, 4)
    torch.testing.assert_close(F.linear(x, proj.weight, proj.bias), conv(x), rtol=0, atol=0)
    model = peft_wrap(torch.nn.Sequential(Conv1D(6, 4)), torch.float32, ["0"])
    layer = model.base_model.model[0]
    assert layer.fan_in_fan_out and read_projection(layer).lora_A.shape == (4, 4)
    linear = peft_wrap(torch.nn.Sequential(torch.nn.Linear(4, 6)), torch.float32, ["0"]).base_model.model[0]
    linear.fan_in_fan_out = True
    assert read_projection(linear) is None
    assert math.isclose(read_projection(layer).scaling, 2.0)
