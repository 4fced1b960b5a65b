"""Tests for fastft.kernels.lora: float64 accuracy of every output and gradient, parity with real PEFT modules
(fp32 and bf16 bases, dropout, autocast), what autograd saves, quantized weights, frozen weights, errors.

Tolerances. Results in fp32 (or float64) are held to 1e-5 of the largest exact value (the fp32 contract; the
sums here have at most ~100 terms, so fp32 rounding stays below 1e-6). bf16/fp16 results must be no worse
than PEFT's own formula (``lora_*_reference``) run by PyTorch in the same dtypes, adapters in fp32 as PEFT
keeps them (:func:`assert_no_worse_than_torch`: 2x its error + 4 ulp). Parity with PEFT modules: fp32 to 1e-5
relative (only the summation order differs); with a bf16 base the low-precision results may differ by the
rounding of the final sum (PEFT adds an fp32 term to a bf16 tensor or rounds the LoRA term first), so 2 bf16
ulp of the largest value, while the fp32 adapter gradients stay within 1e-5.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastft.kernels.lora import (
    LoRAProjection,
    audit_cases,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_qkv,
)
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, assert_no_worse_than_torch, backend, unit_roundoff

# (base dtype, adapter dtype): fp32 throughout; PEFT's default over a bf16/fp16 base (fp32 adapters); all bf16.
DTYPE_CONFIGS = {
    "fp32": (torch.float32, torch.float32),
    "bf16+fp32": (torch.bfloat16, torch.float32),
    "fp16+fp32": (torch.float16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
}
PARTS = ("weight", "bias", "lora_A", "lora_B")
ACTIVATIONS = ("swiglu", "geglu_tanh", "geglu")


class FakeQuantWeight:
    """A 4-bit-like base weight: int8 codes and one scale; counts dequantize() calls, tracks what it returned."""

    def __init__(self, dense: torch.Tensor):
        self.scale = dense.abs().max().clamp_min(1e-3) / 7
        self.codes = torch.round(dense / self.scale).clamp(-7, 7).to(torch.int8)
        self.dtype, self.shape, self.calls, self.returned = dense.dtype, dense.shape, 0, []

    def dequantize(self) -> torch.Tensor:
        self.calls += 1
        dense = self.codes.to(self.dtype) * self.scale.to(self.dtype)
        self.returned.append(weakref.ref(dense))
        return dense

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.returned)


def rand(gen, *shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_proj(gen, n_out, n_in, rank, config, train=PARTS, bias=True, lora=True, quantized=False, dropout=0.0):
    """A LoRAProjection with random weights (lora_B non-zero) in ``config``'s dtypes; ``train`` require grad."""
    base, adapter = DTYPE_CONFIGS[config]
    weight = rand(gen, n_out, n_in, dtype=base, scale=n_in**-0.5)
    if quantized:
        weight = FakeQuantWeight(weight)
    return LoRAProjection(
        weight=weight if quantized else weight.requires_grad_("weight" in train),
        bias=rand(gen, n_out, dtype=base, scale=0.5).requires_grad_("bias" in train) if bias else None,
        lora_A=rand(gen, rank, n_in, dtype=adapter, scale=n_in**-0.5).requires_grad_("lora_A" in train)
        if lora
        else None,
        lora_B=rand(gen, n_out, rank, dtype=adapter, scale=0.5).requires_grad_("lora_B" in train) if lora else None,
        scaling=2.0 / rank,
        dropout=dropout,
    )


def leaves(projs):
    """(label, tensor) of every projection tensor that requires grad, in a fixed order."""
    return [
        (f"{i}.{part}", t)
        for i, p in enumerate(projs)
        for part in PARTS
        if isinstance(t := getattr(p, part), torch.Tensor) and t.requires_grad
    ]


def as_float64(proj):
    """The same projection in float64 (a quantized weight dequantized), leaves with the same requires_grad."""

    def cast(t):
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            return t.dequantize().double()
        return t.detach().double().requires_grad_(t.requires_grad)

    return LoRAProjection(*(cast(getattr(proj, part)) for part in PARTS), proj.scaling, proj.dropout)


def make_x(gen, lead, n_in, dtype, layout, requires_grad=True):
    """x of shape (*lead, n_in): contiguous, or with a non-contiguous last dimension (a transposed buffer)."""
    if layout == "transposed":
        x = rand(gen, n_in, *lead, dtype=dtype).movedim(0, -1)
    else:
        x = rand(gen, *lead, n_in, dtype=dtype)
    return x.requires_grad_(requires_grad)


def run(fn, x, projs, dy=None):
    """Outputs (concatenated, flat) and the gradients of every leaf for a fixed random upstream gradient."""
    out = fn(x, projs)
    out = torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out.reshape(-1)
    labelled = ([("x", x)] if x.requires_grad else []) + leaves(projs)
    grads = torch.autograd.grad(out, [t for _, t in labelled], dy.to(out.dtype)) if labelled else ()
    return {"out": out, **{label: g for (label, _), g in zip(labelled, grads, strict=True)}}


def assert_accurate(value, theirs, want, base_dtype, fp32_exact=True, name=""):
    """fp32 results within 1e-5 of float64; low-precision ones no worse than PEFT's formula in those dtypes.

    With ``fp32_exact=False`` an fp32 result may be computed from bf16/fp16 intermediates (the fp32 adapter
    gradients of a bf16 MLP: PEFT rounds h, dh and d gate too), so it is held like them: 2x PEFT's error plus
    a floor of 4 roundings in the base dtype (not in fp32, which no computation from those inputs reaches).
    """
    error = (value.double() - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    if value.dtype == torch.float32 and (fp32_exact or base_dtype == torch.float32):
        assert error <= 1e-5 * scale + 1e-30, f"{name}: {error:.3e} > 1e-5 x {scale:.3e}"
    else:
        ulps = 4.0 * unit_roundoff(base_dtype) / unit_roundoff(value.dtype)
        assert_no_worse_than_torch(value, theirs, want, name=name, ulps=max(ulps, 4.0))


def check_against_float64(fn, ref_fn, x, projs, gen, name="", fp32_exact=True):
    """Every output and gradient of ``fn`` vs float64, and (low precision) vs ``ref_fn`` in the same dtypes."""
    with torch.no_grad():
        out = fn(x, projs)
    out = torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out.reshape(-1)
    dy = rand(gen, out.numel(), dtype=out.dtype)  # rounded to the output dtype: the same upstream gradient for all
    ours, theirs = run(fn, x, projs, dy), run(ref_fn, x, projs, dy)
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    exact = run(ref_fn, x64, [as_float64(p) for p in projs], dy)
    assert ours.keys() == exact.keys()
    for label, value in ours.items():
        want = exact[label]
        assert value.shape == want.shape and value.dtype == theirs[label].dtype, label
        assert_accurate(value, theirs[label], want, x.dtype, fp32_exact, name=f"{name} {label}")
    return ours


# ------------------------------------------------------------------------------------------------------
# Property-based accuracy: lora_linear, lora_qkv, lora_mlp
# ------------------------------------------------------------------------------------------------------


@st.composite
def _shapes(draw):
    n = draw(st.integers(1, 6))
    return {
        "lead": draw(st.sampled_from([(n,), (2, n)])),
        "layout": draw(st.sampled_from(["contiguous", "transposed"])),
        "config": draw(st.sampled_from(list(DTYPE_CONFIGS))),
        "train": draw(st.sets(st.sampled_from(PARTS))),
        "x_grad": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "rank": draw(st.integers(1, 4)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _linear(x, projs):
    return lora_linear(x, projs[0])


def _linear_reference(x, projs):
    return lora_linear_reference(x, projs[0])


@settings(max_examples=25)
@given(case=_shapes(), n_in=st.integers(1, 40), n_out=st.integers(1, 40), lora=st.booleans(), quant=st.booleans())
def test_lora_linear_matches_float64(case, n_in, n_out, lora, quant):
    gen = torch.Generator().manual_seed(case["seed"])
    train = case["train"] - {"weight"} if quant else case["train"]
    proj = make_proj(gen, n_out, n_in, case["rank"], case["config"], train, case["bias"], lora or quant, quant)
    x = make_x(gen, case["lead"], n_in, DTYPE_CONFIGS[case["config"]][0], case["layout"], case["x_grad"])
    check_against_float64(_linear, _linear_reference, x, [proj], gen, name=str(case))


def _qkv(x, projs):
    return lora_qkv(x, *projs)


def _qkv_reference(x, projs):
    return tuple(lora_linear_reference(x, p) for p in projs)


@settings(max_examples=20)
@given(case=_shapes(), n_in=st.integers(1, 40), n_q=st.integers(1, 24), n_kv=st.integers(1, 12), k_lora=st.booleans())
def test_lora_qkv_matches_float64(case, n_in, n_q, n_kv, k_lora):
    """Grouped-query widths, a different rank per adapter, k possibly without an adapter."""
    gen = torch.Generator().manual_seed(case["seed"])
    r, config, train = case["rank"], case["config"], case["train"]
    projs = [
        make_proj(gen, n_q, n_in, r, config, train, case["bias"]),
        make_proj(gen, n_kv, n_in, r + 1, config, train, False, lora=k_lora),
        make_proj(gen, n_kv, n_in, 1, config, train, case["bias"]),
    ]
    x = make_x(gen, case["lead"], n_in, DTYPE_CONFIGS[config][0], case["layout"], case["x_grad"])
    check_against_float64(_qkv, _qkv_reference, x, projs, gen, name=str(case))


def _mlp_fn(activation, fused, reference=False):
    def fn(x, projs):
        gate, up, down = (projs[0], None, projs[1]) if fused else projs
        return (lora_mlp_reference if reference else lora_mlp)(x, gate, up, down, activation)

    return fn


def make_mlp(gen, n_embd, n_inter, rank, config, train=PARTS, bias=False, fused=False, quantized=False):
    if fused:
        gate_up = make_proj(gen, 2 * n_inter, n_embd, rank, config, train, bias, quantized=quantized)
        return [gate_up, make_proj(gen, n_embd, n_inter, rank, config, train, bias, quantized=quantized)]
    return [
        make_proj(gen, n_inter, n_embd, rank, config, train, bias, quantized=quantized),
        make_proj(gen, n_inter, n_embd, rank + 1, config, train, bias, quantized=quantized),
        make_proj(gen, n_embd, n_inter, rank, config, train, bias, quantized=quantized),
    ]


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(max_examples=15)
@given(
    case=_shapes(),
    n_embd=st.integers(1, 24),
    n_inter=st.integers(1, 40),
    fused=st.booleans(),
    activation=st.sampled_from(ACTIVATIONS),
)
def test_lora_mlp_matches_float64(backend_name, case, n_embd, n_inter, fused, activation):
    gen = torch.Generator().manual_seed(case["seed"])
    projs = make_mlp(gen, n_embd, n_inter, case["rank"], case["config"], case["train"], case["bias"], fused)
    x = make_x(gen, case["lead"], n_embd, DTYPE_CONFIGS[case["config"]][0], case["layout"], case["x_grad"])
    with backend(backend_name):
        check_against_float64(
            _mlp_fn(activation, fused),
            _mlp_fn(activation, fused, reference=True),
            x,
            projs,
            gen,
            name=str(case),
            fp32_exact=False,
        )


@pytest.mark.parametrize("fn", ["linear", "qkv", "mlp"])
def test_quantized_weight_matches_float64_and_trains_adapters(fn):
    """A 4-bit-like base weight (bf16 dequantized) with fp32 adapters, as QLoRA: all gradients right."""
    gen = torch.Generator().manual_seed(3)
    x = make_x(gen, (2, 5), 24, torch.bfloat16, "contiguous")
    train = ("bias", "lora_A", "lora_B")
    if fn == "mlp":
        projs = make_mlp(gen, 24, 40, 4, "bf16+fp32", train, quantized=True)
        funcs = _mlp_fn("swiglu", False), _mlp_fn("swiglu", False, reference=True)
        check_against_float64(*funcs, x, projs, gen, name=fn, fp32_exact=False)
        return
    else:
        projs = [make_proj(gen, 17, 24, 4, "bf16+fp32", train, quantized=True) for _ in range(3 if fn == "qkv" else 1)]
        funcs = (_qkv, _qkv_reference) if fn == "qkv" else (_linear, _linear_reference)
    check_against_float64(*funcs, x, projs, gen, name=fn)


def test_base_only_is_f_linear():
    """No adapter (lora_A None): exactly F.linear, in every dtype, gradients included."""
    gen = torch.Generator().manual_seed(4)
    for config in ("fp32", "bf16"):
        proj = make_proj(gen, 9, 13, 1, config, lora=False)
        x = make_x(gen, (3, 2), 13, proj.weight.dtype, "contiguous")
        dy = rand(gen, 3, 2, 9, dtype=proj.weight.dtype)
        ours = lora_linear(x, proj)
        want = F.linear(x, proj.weight, proj.bias)
        torch.testing.assert_close(ours, want, rtol=0, atol=0)
        grads = torch.autograd.grad(ours, (x, proj.weight, proj.bias), dy)
        for got, ref in zip(grads, torch.autograd.grad(want, (x, proj.weight, proj.bias), dy), strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_empty_batch(backend_name):
    gen = torch.Generator().manual_seed(5)
    projs = make_mlp(gen, 8, 12, 2, "bf16+fp32")
    x = make_x(gen, (0,), 8, torch.bfloat16, "contiguous")
    with backend(backend_name):
        y = lora_mlp(x, *projs, "swiglu")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and projs[0].lora_A.grad.abs().sum() == 0


# ------------------------------------------------------------------------------------------------------
# Parity with real PEFT modules
# ------------------------------------------------------------------------------------------------------


class _Linear(nn.Module):
    def __init__(self, n_in, n_out, bias):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


class _MLP(nn.Module):
    def __init__(self, n_embd, n_inter, activation):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, n_inter, bias=False)
        self.up_proj = nn.Linear(n_embd, n_inter, bias=False)
        self.down_proj = nn.Linear(n_inter, n_embd, bias=False)
        self.act = {"swiglu": nn.SiLU(), "geglu_tanh": nn.GELU("tanh"), "geglu": nn.GELU()}[activation]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def peft_wrap(module, dtype, targets, dropout=0.0, seed=0):
    """``get_peft_model`` with r=4, alpha=8 (scaling 2) on ``module`` in ``dtype``; lora_B set non-zero."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout)
    model = get_peft_model(module.to(dtype), config)
    with torch.no_grad():
        for name in targets:
            nn.init.normal_(getattr(model.base_model.model, name).lora_B["default"].weight, std=0.5)
    return model


def from_peft(layer) -> LoRAProjection:
    """The LoRAProjection of a PEFT LoRA Linear (what fastft.models builds)."""
    dropout = layer.lora_dropout["default"]
    return LoRAProjection(
        weight=layer.base_layer.weight,
        bias=layer.base_layer.bias,
        lora_A=layer.lora_A["default"].weight,
        lora_B=layer.lora_B["default"].weight,
        scaling=layer.scaling["default"],
        dropout=dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0,
    )


def grads_of(out, x, projs, dy):
    tensors = [x] + [t for _, t in leaves(projs)]
    return [out, *torch.autograd.grad(out, tensors, dy)]


def assert_peft_parity(ours, theirs, names):
    """fp32: 1e-5 relative; low-precision tensors: 2 ulp of their largest value (one rounding apart)."""
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = b.double().abs().max().item()
        tol = 1e-5 if a.dtype == torch.float32 else 4 * unit_roundoff(a.dtype)
        error = (a.double() - b.double()).abs().max().item()
        assert error <= tol * scale, f"{name} ({a.dtype}): {error:.3e} > {tol:.1e} x {scale:.3e}"


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_equals_peft_module(dtype, dropout):
    model = peft_wrap(_Linear(21, 13, bias=True), dtype, ["proj"], dropout)
    layer = model.base_model.model.proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's fp32 adapters over any base
    proj = from_peft(layer)
    gen = torch.Generator().manual_seed(1)
    x = make_x(gen, (2, 7), 21, dtype, "contiguous")
    dy = rand(gen, 2, 7, 13, dtype=dtype)
    torch.manual_seed(123)  # the same dropout masks for both
    theirs = grads_of(layer(x), x, [proj], dy)
    torch.manual_seed(123)
    ours = grads_of(lora_linear(x, proj), x, [proj], dy)
    assert_peft_parity(ours, theirs, ["out", "x", "lora_A", "lora_B"])


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_qkv_equals_three_peft_modules(dtype, dropout):
    """Dropout masks are drawn in q, k, v order, as three PEFT modules called in turn draw them."""
    models = [peft_wrap(_Linear(16, n, bias=n == 12), dtype, ["proj"], dropout, seed=n) for n in (12, 4, 4)]
    layers = [m.base_model.model.proj for m in models]
    projs = [from_peft(layer) for layer in layers]
    gen = torch.Generator().manual_seed(2)
    x = make_x(gen, (9,), 16, dtype, "contiguous")
    dy = rand(gen, 9 * 20, dtype=dtype)
    torch.manual_seed(7)
    theirs = grads_of(torch.cat([layer(x).reshape(-1) for layer in layers]), x, projs, dy)
    torch.manual_seed(7)
    ours = grads_of(torch.cat([o.reshape(-1) for o in lora_qkv(x, *projs)]), x, projs, dy)
    assert_peft_parity(ours, theirs, ["out", "x"] + [f"{p}.{t}" for p in "qkv" for t in ("A", "B")])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_mlp_equals_peft_mlp(dtype, dropout, activation):
    """An MLP of three PEFT-wrapped nn.Linear: forward and every LoRA gradient (and dx)."""
    targets = ["gate_proj", "up_proj", "down_proj"]
    model = peft_wrap(_MLP(16, 24, activation), dtype, targets, dropout)
    projs = [from_peft(getattr(model.base_model.model, name)) for name in targets]
    gen = torch.Generator().manual_seed(3)
    x = make_x(gen, (2, 5), 16, dtype, "contiguous")
    dy = rand(gen, 2, 5, 16, dtype=dtype)
    torch.manual_seed(11)
    theirs = grads_of(model(x), x, projs, dy)
    torch.manual_seed(11)
    with backend("torch"):
        ours = grads_of(lora_mlp(x, *projs, activation), x, projs, dy)
    names = ["out", "x"] + [f"{p}.{t}" for p in ("gate", "up", "down") for t in ("A", "B")]
    if dtype == torch.float32:
        assert_peft_parity(ours, theirs, names)
        return
    # bf16: PEFT rounds act(gate) and the product to bf16 separately, the fused kernel once, so h (and all that
    # follows) may differ by an ulp of h: both are held against float64 (ours no worse than PEFT's).
    x64 = x.detach().double().requires_grad_()
    projs64 = [as_float64(p) for p in projs]
    torch.manual_seed(11)
    exact = grads_of(lora_mlp_reference(x64, *projs64, activation), x64, projs64, dy.double())
    for name, a, b, e in zip(names, ours, theirs, exact, strict=True):
        assert_accurate(a, b, e, dtype, fp32_exact=False, name=name)


def test_autocast_behaves_like_f_linear():
    """fp32 model under torch.autocast(bf16), as an HF Trainer with bf16=True: bf16 outputs as F.linear gives,
    PEFT's numbers, fp32 gradients for the fp32 parameters (full fine-tuning of W and b included)."""
    model = peft_wrap(_Linear(20, 12, bias=True), torch.float32, ["proj"])
    layer = model.base_model.model.proj
    layer.base_layer.weight.requires_grad_(True)
    layer.base_layer.bias.requires_grad_(True)
    proj = from_peft(layer)
    gen = torch.Generator().manual_seed(4)
    x = make_x(gen, (3, 4), 20, torch.float32, "contiguous")
    dy = rand(gen, 3, 4, 12, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = grads_of(layer(x), x, [proj], dy)
        ours = grads_of(lora_linear(x, proj), x, [proj], dy)
        assert ours[0].dtype == F.linear(x, proj.weight).dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in ours[1:])
    # Both compute every product in bf16 (PEFT: three roundings of the LoRA term, here two): a few bf16 ulp.
    for name, a, b in zip(["out", "x", "W", "b", "A", "B"], ours, theirs, strict=True):
        scale = b.double().abs().max().item()
        assert (a.double() - b.double()).abs().max().item() <= 8 * unit_roundoff(torch.bfloat16) * scale, name


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_mlp_under_autocast(backend_name):
    gen = torch.Generator().manual_seed(5)
    projs = make_mlp(gen, 12, 20, 2, "fp32", train=("lora_A", "lora_B"))
    x = make_x(gen, (6,), 12, torch.float32, "contiguous")
    with torch.autocast("cpu", dtype=torch.bfloat16), backend(backend_name):
        y = lora_mlp(x, *projs, "geglu_tanh")
        want = lora_mlp_reference(x, *projs, "geglu_tanh")
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=4e-2, atol=4e-2 * want.abs().max().item())
    y.float().sum().backward()
    assert projs[0].lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------
# Memory: what autograd keeps
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["gate-up", "fused-gate-up"])
def test_lora_mlp_saves_x_gate_up_and_rank_sized_products(backend_name, fused):
    """Saved: x, gate and up (or gate_up), s*xa (N, r) per adapter, the weights; no h, no act(gate), no fp32
    copy of anything of size N x intermediate, no copy of x. PEFT's MLP keeps far more."""
    n, n_embd, n_inter, r = 16, 8, 48, 2
    gen = torch.Generator().manual_seed(6)
    projs = make_mlp(gen, n_embd, n_inter, r, "bf16+fp32", train=("lora_A", "lora_B"), fused=fused)
    x = make_x(gen, (n,), n_embd, torch.bfloat16, "contiguous")
    with backend(backend_name), SavedTensorMeter() as meter:
        y = _mlp_fn("swiglu", fused)(x, projs)
    ranks = [p.lora_A.shape[0] for p in projs]
    saved = y._base.grad_fn.saved_tensors  # y is a view of the Function's 2-D output
    assert sum(t is not None and t.data_ptr() == x.data_ptr() for t in saved) == 1  # x itself, once
    big = [t for t in meter.saved if t.shape[0] == n and t.shape[-1] >= n_inter]
    assert [(t.shape, t.dtype) for t in big] == (
        [((n, 2 * n_inter), torch.bfloat16)] if fused else [((n, n_inter), torch.bfloat16)] * 2
    )
    weights = sum(t.untyped_storage().nbytes() for p in projs for t in (p.weight, p.lora_A, p.lora_B))
    activations = n * n_embd * 2 + 2 * n * n_inter * 2 + n * sum(ranks) * 4  # x, gate + up, s*xa in fp32
    assert meter.total_bytes == weights + activations
    with SavedTensorMeter() as peft_style:
        _mlp_fn("swiglu", fused, reference=True)(x, projs)
    assert peft_style.total_bytes - weights > 2 * activations


@pytest.mark.parametrize("fn", ["linear", "qkv", "mlp"])
def test_quantized_weight_is_never_kept_and_dequantized_once_per_pass(fn):
    gen = torch.Generator().manual_seed(7)
    x = make_x(gen, (4, 3), 16, torch.bfloat16, "contiguous")
    train = ("lora_A", "lora_B")
    if fn == "mlp":
        projs = make_mlp(gen, 16, 36, 2, "bf16+fp32", train, quantized=True)
    else:
        projs = [
            make_proj(gen, 20 + i, 16, 2, "bf16+fp32", train, quantized=True) for i in range(3 if fn == "qkv" else 1)
        ]
    call = {"linear": _linear, "qkv": _qkv, "mlp": _mlp_fn("swiglu", False)}[fn]
    with SavedTensorMeter() as meter:
        out = call(x, projs)
    quants = [p.weight for p in projs]
    assert [q.calls for q in quants] == [1] * len(quants) and all(q.alive() == 0 for q in quants)
    assert not any(tuple(t.shape) == tuple(q.shape) for t in meter.saved for q in quants)
    out = torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out
    out.float().square().sum().backward()
    assert [q.calls for q in quants] == [2] * len(quants) and all(q.alive() == 0 for q in quants)


def test_lora_qkv_saves_x_once():
    gen = torch.Generator().manual_seed(8)
    projs = [make_proj(gen, n, 32, 4, "bf16+fp32", train=("lora_A", "lora_B")) for n in (32, 8, 8)]
    x = make_x(gen, (2, 10), 32, torch.bfloat16, "contiguous")
    with SavedTensorMeter() as meter:
        q, _, _ = lora_qkv(x, *projs)
    assert sum(t is not None and t.data_ptr() == x.data_ptr() for t in q._base.grad_fn.saved_tensors) == 1
    assert sum(t.shape == x.shape or t.shape == (20, 32) for t in meter.saved) == 1
    weights = sum(t.untyped_storage().nbytes() for p in projs for t in (p.weight, p.lora_A, p.lora_B))
    assert meter.total_bytes == weights + x.numel() * 2 + 20 * 12 * 4  # x, and s*xa (N, 3r) in fp32


class _Allocations(TorchDispatchMode):
    """Records the shape of every new tensor an op returns (views of its inputs are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("train_weight", [False, True])
def test_frozen_weight_gets_no_weight_sized_buffer(train_weight):
    """dW (out, in) is allocated only when W requires grad; the gradients asked for are still right."""
    gen = torch.Generator().manual_seed(9)
    train = ("weight", "lora_A", "lora_B") if train_weight else ("lora_A", "lora_B")
    proj = make_proj(gen, 11, 7, 2, "fp32", train, bias=False)
    x = make_x(gen, (5,), 7, torch.float32, "contiguous")
    y = lora_linear(x, proj)
    with _Allocations() as mode:
        y.sum().backward()
    assert ((11, 7) in mode.shapes) == train_weight
    assert (proj.weight.grad is not None) == train_weight and proj.lora_A.grad is not None


# ------------------------------------------------------------------------------------------------------
# Dropout: the same masks as F.dropout, the gradient through the mask
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_dropout_matches_reference_with_the_same_seed(p):
    gen = torch.Generator().manual_seed(10)
    proj = make_proj(gen, 9, 15, 3, "bf16+fp32", dropout=p)
    x = make_x(gen, (4, 3), 15, torch.bfloat16, "contiguous")
    dy = rand(gen, 4 * 3 * 9)
    torch.manual_seed(0)
    ours = run(_linear, x, [proj], dy)
    torch.manual_seed(0)
    theirs = run(_linear_reference, x, [proj], dy)
    assert_peft_parity(list(ours.values()), list(theirs.values()), list(ours))


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    gen = torch.Generator().manual_seed(11)
    proj = make_proj(gen, 6, 8, 2, "fp32")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"proj.weight is \(6, 8\) but its input has 5 features"):
        lora_linear(torch.randn(3, 5), proj)
    with pytest.raises(TypeError, match=r"proj.weight is torch.float32 but x is torch.bfloat16.*autocast"):
        lora_linear(x.bfloat16(), proj)
    with pytest.raises(TypeError, match=r"looks quantized"):
        lora_linear(x, LoRAProjection(torch.zeros(6, 8, dtype=torch.uint8)))
    with pytest.raises(TypeError, match=r"x must be a float32/bfloat16/float16/float64 tensor"):
        lora_linear(x.int(), proj)
    with pytest.raises(ValueError, match=r"lora_A must be \(r, 8\) and lora_B \(6, r\).*\(2, 8\).*\(6, 3\)"):
        lora_linear(x, LoRAProjection(proj.weight, lora_A=proj.lora_A, lora_B=torch.randn(6, 3)))
    with pytest.raises(ValueError, match=r"both be tensors or both None"):
        lora_linear(x, LoRAProjection(proj.weight, lora_A=proj.lora_A))
    with pytest.raises(TypeError, match=r"share one floating dtype.*lora_B.to"):
        lora_linear(x, LoRAProjection(proj.weight, lora_A=proj.lora_A, lora_B=proj.lora_B.double()))
    with pytest.raises(ValueError, match=r"bias must be None or shape \(6,\), got \(5,\)"):
        lora_linear(x, LoRAProjection(proj.weight, bias=torch.zeros(5)))
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\].*1.5"):
        lora_linear(x, LoRAProjection(proj.weight, dropout=1.5))
    with pytest.raises(TypeError, match=r"scaling must be a finite Python number.*nan"):
        lora_linear(x, LoRAProjection(proj.weight, scaling=float("nan")))
    with pytest.raises(TypeError, match=r"proj must be a LoRAProjection, got Linear"):
        lora_linear(x, nn.Linear(8, 6))
    with pytest.raises(TypeError, match=r"adapters must share one dtype"):
        lora_qkv(
            x, proj, proj, LoRAProjection(proj.weight, lora_A=proj.lora_A.bfloat16(), lora_B=proj.lora_B.bfloat16())
        )
    mlp = make_mlp(gen, 8, 10, 2, "fp32")
    with pytest.raises(ValueError, match=r"activation must be one of .*'relu'"):
        lora_mlp(x, *mlp, "relu")
    with pytest.raises(ValueError, match=r"down.weight is \(8, 10\) but its input has 5 features"):
        lora_mlp(x, mlp[0], None, mlp[2], "swiglu")
    with pytest.raises(ValueError, match=r"even out_features.*got 7"):
        lora_mlp(x, make_proj(gen, 7, 8, 2, "fp32"), None, mlp[2], "swiglu")
    with pytest.raises(ValueError, match=r"gate and up must have the same out_features.*10 and 6"):
        lora_mlp(x, mlp[0], proj, mlp[2], "swiglu")
    bad = FakeQuantWeight(torch.randn(6, 8))
    bad.shape = (6, 8)
    bad.codes = bad.codes[:, :4]
    with pytest.raises(ValueError, match=r"dequantize\(\) returned shape \(6, 4\) but weight.shape is \(6, 8\)"):
        lora_linear(x, LoRAProjection(bad))


def test_no_audit_cases():
    """The module launches no Triton kernel of its own (GEMMs are cuBLAS, activations are swiglu/geglu's)."""
    assert audit_cases() == []


class _Float32Rows(TorchDispatchMode):
    """Records the shape of every new fp32 tensor an op returns (views of its inputs are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float32
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("fn", ["qkv", "mlp"])
def test_fp32_adapter_work_in_row_blocks(monkeypatch, fn):
    """fp32 adapters on a bf16 base: the x-sized fp32 work (x cast to fp32, the product s xa B^T, dA, the LoRA part
    of dx) runs in blocks of ``_LORA_BACKWARD_ROWS`` rows, in forward and backward, so no fp32 tensor with a row
    per token and more columns than the ranks exists (the long-context peak), and the results are those of one
    block of all rows: bitwise for the bf16 outputs and dx (each row is the same GEMM row; add_ rounds once),
    1e-6 relative for the fp32 adapter gradients (dA sums its blocks in another order)."""
    import sys

    lora_module = sys.modules["fastft.kernels.lora"]
    gen = torch.Generator().manual_seed(12)
    n_rows, n_in, rank = 22, 32, 4  # 22 rows: blocks of 8, 8 and a tail of 6
    if fn == "qkv":
        projs = [make_proj(gen, n, n_in, rank, "bf16+fp32", train=("lora_A", "lora_B")) for n in (32, 16, 16)]
        call = _qkv
    else:
        projs = list(make_mlp(gen, n_in, 40, rank, "bf16+fp32", train=("lora_A", "lora_B")))
        call = _mlp_fn("swiglu", False)
    x = make_x(gen, (n_rows,), n_in, torch.bfloat16, "contiguous")
    dy = rand(gen, n_rows * (64 if fn == "qkv" else n_in))
    whole = run(call, x, projs, dy)
    monkeypatch.setattr(lora_module, "_LORA_BACKWARD_ROWS", 8)
    with _Float32Rows() as mode:
        blocked = run(call, x, projs, dy)
    wide = {s for s in mode.shapes if len(s) == 2 and s[0] == n_rows and s[1] > 3 * rank}
    assert not wide, f"fp32 (tokens x width) tensors allocated: {sorted(wide)}"
    for name, value in whole.items():
        if value.dtype == torch.float32:
            assert torch.allclose(blocked[name], value, rtol=1e-6, atol=1e-6 * value.abs().max().item()), name
        else:
            assert torch.equal(blocked[name], value), name
