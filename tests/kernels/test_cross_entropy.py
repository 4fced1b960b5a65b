"""cross_entropy: semantics vs float64 and transformers, the chunked kernels vs float64, edge cases, memory.

Baselines ("torch_same_dtype" of :func:`assert_no_worse_than_torch`): what a transformers user gets today
for the same logits tensor: ``ForCausalLMLoss`` upcasts to fp32, so the loss baseline is torch's
cross-entropy on ``logits.float()`` with scale and softcap applied in fp32 (``cross_entropy_reference``),
and the gradient baseline is autograd through that computation, which rounds the fp32 gradient once to
the logits' dtype. That is stricter than computing in bf16/fp16 (whose loss is off by a bf16 rounding
of ~10, i.e. 0.03): fastft must be as good as the fp32-upcast path, not merely as good as bf16.
fp32 additionally stays within ~1e-5 relative of float64.

Interpreted kernels cost ~1 ms per program and op, so most shapes are small and the kernels' vocabulary
chunk (``_MAX_BLOCK``) is shrunk to 64 to walk many chunks cheaply; explicit tests run the real 4096
chunk at V = 4097, ~70k and Gemma's 262,144 for a couple of rows.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastft.kernels._math import tanh_sech2
from fastft.kernels.cross_entropy import _cross_entropy_rows, cross_entropy, cross_entropy_reference
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend

# The module itself (fastft.kernels re-exports a function under the same name as the module).
ce = importlib.import_module("fastft.kernels.cross_entropy")

COMBOS = [(b, d) for b in BACKENDS for d in DTYPES]
COMBO_IDS = [f"{b}-{str(d).split('.')[-1]}" for b, d in COMBOS]


@contextlib.contextmanager
def small_chunks(block: int = 64, torch_elements: int = 512):
    """Shrink the kernel's vocabulary chunk and the torch path's row block so small shapes cross both."""
    with mock.patch.object(ce, "_MAX_BLOCK", block), mock.patch.object(ce, "_TORCH_CHUNK_ELEMENTS", torch_elements):
        yield


def make_inputs(n, v, dtype, seed, ignore_frac=0.25, row_pad=0, spread=4.0):
    """Logits (n, v) in ``dtype`` (rows strided by ``row_pad`` extra columns when > 0) and int64 labels."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, v + row_pad, generator=gen, dtype=torch.float64) * spread).to(dtype)
    logits = base[:, :v] if row_pad else base
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    return logits, labels


def transform64(logits, softcap, logit_scale):
    """z = softcap(logit_scale * x) and dz/dx in float64."""
    z = logits.double() * (1.0 if logit_scale is None else logit_scale)
    dz_dx = torch.full_like(z, 1.0 if logit_scale is None else logit_scale)
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z, dz_dx = softcap * t, dz_dx * (1 - t * t)
    return z, dz_dx


def float64_formula(logits, labels, softcap, logit_scale, ignore_index=-100):
    """Per-row losses and d loss_i / d logits_i in float64, written out (no F.cross_entropy)."""
    z, dz_dx = transform64(logits, softcap, logit_scale)
    m = z.max(dim=1, keepdim=True).values
    lse = (m + (z - m).exp().sum(dim=1, keepdim=True).log()).squeeze(1)
    live = labels != ignore_index
    safe = labels.clamp(0, z.shape[1] - 1)
    loss = torch.where(live, lse - z.gather(1, safe[:, None]).squeeze(1), 0.0)
    d = (z - lse[:, None]).exp()
    d[torch.arange(len(labels))[live], safe[live]] -= 1
    grad = torch.where(live[:, None], d * dz_dx, 0.0)
    return loss, lse, grad


def float64_terms(logits, labels, softcap, logit_scale, ignore_index=-100):
    """The size of the terms each result is computed from: |lse| for a loss lse - z[y] (which cancels when the
    label dominates), (p + [v == y]) |dz/dx| for a gradient p - [v == y] (which cancels when p -> 1). No
    computation in a low precision is accurate relative to the cancelled difference, only to its terms."""
    z, dz_dx = transform64(logits, softcap, logit_scale)
    lse = torch.logsumexp(z, dim=1)
    onehot = torch.zeros_like(z)
    live = labels != ignore_index
    onehot[torch.arange(len(labels))[live], labels[live]] = 1.0
    return lse.abs(), ((z - lse[:, None]).exp() + onehot) * dz_dx.abs()


def reduce(losses, labels, reduction, num_items=None):
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (num_items if num_items is not None else max(int((labels != -100).sum()), 1))


def run_with_grad(fn, logits, upstream):
    # A copy with the same strides (clone() would make strided rows contiguous), as the leaf.
    x = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype).copy_(logits).requires_grad_()
    out = fn(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


def check_fp32_relative(actual, exact, name, rel=1e-5, terms=None):
    """|actual - exact| <= rel * scale, where scale is the size of the terms the result is computed from
    (``terms``, default the result itself): a loss lse - z[y] near 0 cancels terms of size |lse|, and no fp32
    computation can be relatively accurate to the cancelled difference."""
    if exact.numel():
        scale = max((exact if terms is None else terms).abs().max().item(), 1e-30)
        assert (actual.double() - exact).abs().max().item() <= rel * scale, name


def compare(logits, labels, reduction, softcap, logit_scale, seed=0, num_items=None):
    """Forward and d logits of fastft vs float64 vs the fp32-upcast torch baseline (see module docstring)."""
    n = logits.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = torch.randn(n if reduction == "none" else (), generator=gen) + 0.5
    kwargs = {"reduction": reduction, "softcap": softcap, "logit_scale": logit_scale, "num_items_in_batch": num_items}
    ours, ours_grad = run_with_grad(lambda x: cross_entropy(x, labels, **kwargs), logits, upstream)
    base, base_grad = run_with_grad(lambda x: cross_entropy_reference(x, labels, **kwargs), logits, upstream)

    loss64, _, grad64 = float64_formula(logits, labels, softcap, logit_scale)
    loss_terms, grad_terms = float64_terms(logits, labels, softcap, logit_scale)
    loss_terms = reduce(torch.where(labels != -100, loss_terms, 0.0), labels, reduction, num_items)
    exact = reduce(loss64, labels, reduction, num_items)
    if reduction == "none":
        row_scale = upstream.double()[:, None]
    else:
        denom = 1 if reduction == "sum" else num_items or max(int((labels != -100).sum()), 1)
        row_scale = upstream.double() / denom
    exact_grad, grad_terms = grad64 * row_scale, grad_terms * row_scale.abs()
    terms = {"loss": loss_terms.abs().max().item() if loss_terms.numel() else None,
             "d logits": grad_terms.max().item() if grad_terms.numel() else None}  # fmt: skip
    assert ours.dtype == torch.float32 and ours_grad.dtype == logits.dtype
    assert_no_worse_than_torch(ours, base, exact, name="loss", scale=terms["loss"])
    assert_no_worse_than_torch(ours_grad, base_grad, exact_grad, name="d logits", scale=terms["d logits"])
    if logits.dtype == torch.float32:
        check_fp32_relative(ours, exact, "loss", terms=loss_terms)
        check_fp32_relative(ours_grad, exact_grad, "d logits", terms=grad_terms)


# ------------------------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("softcap,logit_scale", [(None, None), (3.0, None), (None, 0.0625), (2.5, 1.7)])
def test_reference_is_the_float64_formula(softcap, logit_scale):
    logits, labels = make_inputs(7, 33, torch.float64, seed=1)
    loss64, _, grad64 = float64_formula(logits, labels, softcap, logit_scale)
    for reduction in ("none", "sum", "mean"):
        kwargs = {"reduction": reduction, "softcap": softcap, "logit_scale": logit_scale}
        out, grad = run_with_grad(lambda x, kw=kwargs: cross_entropy_reference(x, labels, **kw), logits, 1.0)
        torch.testing.assert_close(out, reduce(loss64, labels, reduction), rtol=1e-12, atol=1e-12)
        # The hand-derived gradient of the docstring is autograd's gradient of the reference.
        torch.testing.assert_close(grad, grad64 / (1 if reduction != "mean" else int((labels != -100).sum())))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
def test_matches_transformers_causal_lm_loss(be, num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 9, 40, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, 40, (2, 9), generator=gen)
    labels[0, :3] = -100  # a masked prompt
    items = torch.tensor(11) if num_items == "tensor" else num_items
    x_hf = logits.clone().requires_grad_()
    hf = ForCausalLMLoss(x_hf, labels, vocab_size=40, num_items_in_batch=items)
    hf.backward()
    # ForCausalLMLoss predicts token t+1 from position t: shift the labels, then flatten.
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    x = logits.clone().requires_grad_()
    with backend(be):
        ours = cross_entropy(x.view(-1, 40), shifted, num_items_in_batch=items)
    ours.backward()
    assert ours.dtype == hf.dtype == torch.float32
    torch.testing.assert_close(ours, hf, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_hf.grad, rtol=0, atol=0.008)  # <= one bf16 rounding apart


# -------------------------------------------------------------------------------- kernels vs float64


@pytest.mark.parametrize("be,dtype", COMBOS, ids=COMBO_IDS)
@given(
    n=st.integers(1, 9),
    v=st.one_of(st.integers(1, 200), st.sampled_from([63, 64, 65, 127, 129, 257]), st.integers(4000, 70000)),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    cap_scale=st.sampled_from([(None, None), (3.0, None), (None, 0.0625), (30.0, 1.7), (2.0, 0.5)]),
    reduction=st.sampled_from(["none", "sum", "mean"]),
    row_pad=st.sampled_from([0, 5]),
    seed=st.integers(0, 2**16),
)
@example(n=1, v=65, ignore_frac=0.0, cap_scale=(3.0, 0.5), reduction="mean", row_pad=0, seed=0)
@example(n=9, v=129, ignore_frac=0.3, cap_scale=(None, None), reduction="none", row_pad=5, seed=1)
@example(n=2, v=4097, ignore_frac=0.0, cap_scale=(30.0, None), reduction="sum", row_pad=3, seed=2)
def test_matches_float64(be, dtype, n, v, ignore_frac, cap_scale, reduction, row_pad, seed):
    """Small vocabularies run with 64-wide chunks (many chunks per row); large ones (a couple of rows, up to
    70k) with the launch heuristics' real chunk."""
    softcap, logit_scale = cap_scale
    large = v > 1000
    logits, labels = make_inputs(min(n, 2) if large else n, v, dtype, seed, ignore_frac, row_pad)
    with contextlib.nullcontext() if large else small_chunks(), backend(be):
        compare(logits, labels, reduction, softcap, logit_scale, seed)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("v,dtype,softcap", [(4097, torch.float16, None), (70001, torch.bfloat16, 30.0)])
def test_real_chunk_size(be, v, dtype, softcap):
    """The launch heuristics' own 4096 chunk, one past it, and a large odd vocabulary."""
    logits, labels = make_inputs(2, v, dtype, seed=v, ignore_frac=0.0, row_pad=3)
    with backend(be):
        compare(logits, labels, "none", softcap, None)


@pytest.mark.parametrize("be", BACKENDS)
def test_gemma_vocab(be):
    logits, labels = make_inputs(2, 262144, torch.bfloat16, seed=5, ignore_frac=0.0, spread=10.0)
    with backend(be):
        compare(logits, labels, "mean", 30.0, None)


@pytest.mark.parametrize("be,dtype", COMBOS, ids=COMBO_IDS)
@settings(max_examples=5)
@given(
    n=st.integers(1, 6),
    v=st.one_of(st.integers(1, 150), st.just(65)),
    cap_scale=st.sampled_from([(None, None), (3.0, 0.7), (None, 2.0)]),
    row_pad=st.sampled_from([0, 7]),
    seed=st.integers(0, 2**16),
)
def test_rows_write_grad_in_place(be, dtype, n, v, cap_scale, row_pad, seed):
    """_cross_entropy_rows: loss and lse for every row, and the unscaled per-row gradient written over logits."""
    softcap, logit_scale = cap_scale
    padded, labels = make_inputs(n, v + row_pad, dtype, seed, 0.3)
    labels = labels.clamp(max=v - 1).masked_fill(labels == -100, -100)
    logits, original = padded[:, :v], padded.clone()
    loss64, lse64, grad64 = float64_formula(logits, labels, softcap, logit_scale)
    base_loss = cross_entropy_reference(logits, labels, reduction="none", softcap=softcap, logit_scale=logit_scale)
    x_base = logits.clone().requires_grad_()
    cross_entropy_reference(x_base, labels, reduction="sum", softcap=softcap, logit_scale=logit_scale).backward()

    with small_chunks(), backend(be):
        loss, lse = _cross_entropy_rows(logits, labels, softcap=softcap, logit_scale=logit_scale, write_grad=True)
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (n,)
    assert_no_worse_than_torch(loss, base_loss, loss64, name="loss")
    z = original[:, :v].float() * (1.0 if logit_scale is None else logit_scale)
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    assert_no_worse_than_torch(lse, torch.logsumexp(z, dim=1), lse64, name="lse")  # ignored rows too
    assert_no_worse_than_torch(logits, x_base.grad, grad64, name="grad in place")
    assert (logits[labels == -100] == 0).all()
    assert torch.equal(padded[:, v:], original[:, v:])  # the gap between strided rows is never written


def test_rows_write_grad_false_leaves_logits_alone():
    logits, labels = make_inputs(3, 50, torch.bfloat16, seed=2)
    before = logits.clone()
    for be in BACKENDS:
        with small_chunks(), backend(be):
            _cross_entropy_rows(logits, labels, softcap=5.0)
    assert torch.equal(logits, before)


@triton.jit
def _tanh_sech2_probe(y_ptr, t_ptr, sech2_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t, sech2 = tanh_sech2(tl.load(y_ptr + offs, mask=offs < n, other=0.0))
    tl.store(t_ptr + offs, t, mask=offs < n)
    tl.store(sech2_ptr + offs, sech2, mask=offs < n)


def test_softcap_tanh_is_accurate():
    """The kernels' libdevice-free tanh and 1 - tanh^2 (``_math.tanh_sech2``) against float64, in units of
    eps * |exact| (eps = 2^-23; correct rounding is <= 0.5): densely over [-4, 4] (both sides of the 0.9
    switch between polynomial and exp form), out to the saturated tails where 1 - tanh^2 underflows, down to
    tiny |y|, and at 0 and +-inf. Pinned just above what it achieves: tanh 0.67 (torch's 0.5; the previous
    version 1.8, enough to fail the thorough fp32 softcap runs), 1 - tanh^2 1.87 (all of it exp's own error,
    see the module docstring). Most tanh values must also be exactly torch's (correctly rounded) value."""
    grid = torch.cat([torch.linspace(0, 4, 200001), torch.linspace(4, 60, 20001), torch.logspace(-30, 1.5, 400)])
    switch = torch.tensor([0.9, -0.9])
    edges = torch.cat([switch, torch.nextafter(switch, torch.zeros(2)), torch.tensor([50.0, -math.inf, math.inf])])
    y = torch.cat([grid, -grid, edges]).float()
    t, sech2 = torch.empty_like(y), torch.empty_like(y)
    with backend("triton"):
        _tanh_sech2_probe[(triton.cdiv(len(y), 4096),)](y, t, sech2, len(y), BLOCK=4096)
    exact_t = torch.tanh(y.double())
    exact_sech2 = 1 / torch.cosh(y.double()) ** 2
    eps = torch.finfo(torch.float32).eps
    tiny = torch.finfo(torch.float32).tiny  # below it fp32 rounds absolutely (subnormals)
    t_err = (t.double() - exact_t).abs() / (eps * exact_t.abs() + tiny)
    sech2_err = (sech2.double() - exact_sech2).abs() / (eps * exact_sech2 + tiny)
    assert t_err.max().item() <= 0.7, f"tanh: {t_err.max().item():.3f} eps at y = {y[t_err.argmax()].item()!r}"
    assert sech2_err.max().item() <= 1.9, (
        f"1 - tanh^2: {sech2_err.max().item():.3f} eps at {y[sech2_err.argmax()].item()!r}"
    )
    dense = y.abs() <= 4  # where tanh is not exactly +-1
    assert (t[dense] == exact_t[dense].float()).double().mean().item() >= 0.96
    assert t[-2].item() == -1.0 and t[-1].item() == 1.0 and sech2[-2].item() == sech2[-1].item() == 0.0


# -------------------------------------------------------------------------------------------- edges


@pytest.mark.parametrize("be", BACKENDS)
def test_all_labels_ignored(be):
    logits, labels = make_inputs(4, 30, torch.bfloat16, seed=3, ignore_frac=1.0)
    assert math.isnan(torch.nn.functional.cross_entropy(logits.float(), labels).item())  # what torch does
    for reduction, expected_shape in (("mean", ()), ("sum", ()), ("none", (4,))):
        x = logits.clone().requires_grad_()
        with backend(be):
            out = cross_entropy(x, labels, reduction=reduction)
        out.sum().backward()
        assert out.shape == expected_shape and (out == 0).all()
        assert (x.grad == 0).all()


@pytest.mark.parametrize("be,dtype", COMBOS, ids=COMBO_IDS)
def test_huge_logits_stay_finite(be, dtype):
    logits, labels = make_inputs(4, 70, dtype, seed=4, ignore_frac=0.0, spread=1.0)
    logits[0, :] = -1e4
    logits[1, ::3] = 1e4  # several tied maxima, the label among them or not
    logits[2, 5], labels[2] = 1e4, 6  # the label far below the max: loss ~2e4
    logits[3, :] = -1e4
    logits[3, 7], labels[3] = 1e4, 7  # the label is the only max: loss ~0
    with small_chunks(), backend(be):
        for cap_scale in ((None, None), (30.0, None), (None, 0.5)):
            compare(logits, labels, "none", *cap_scale)


@pytest.mark.parametrize("be", BACKENDS)
def test_minus_inf_logits(be):
    """Masked vocabulary entries (-inf), a whole first chunk of them included, give finite losses."""
    logits, labels = make_inputs(2, 200, torch.float32, seed=6, ignore_frac=0.0)
    logits[:, :100] = -math.inf
    labels[:] = torch.tensor([150, 199])
    with small_chunks(), backend(be):
        x = logits.clone().requires_grad_()
        out = cross_entropy(x, labels, reduction="sum")
        out.backward()
    loss64, _, grad64 = float64_formula(logits, labels, None, None)
    torch.testing.assert_close(out.double(), loss64.sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), grad64, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("bad", [50, 1000, -1, -101])
def test_label_out_of_range_raises(be, bad):
    logits, labels = make_inputs(3, 50, torch.float32, seed=7)
    labels[1] = bad
    with (
        backend(be),
        pytest.raises(ValueError, match=rf"labels \(flattened\) \[1\] = {bad} is outside \[0, 50\).*ignore_index"),
    ):
        cross_entropy(logits, labels)


@pytest.mark.parametrize("be", BACKENDS)
def test_kernel_guard_on_out_of_range_label(be):
    """What a GPU call (no host check) does: never reads outside the row; that row's loss and grad are NaN."""
    logits, labels = make_inputs(3, 50, torch.float32, seed=8, ignore_frac=0.0)
    labels[1] = 10**12  # would be far outside the tensor if it were read
    expected_loss, _, expected_grad = float64_formula(logits, labels, None, None)
    with small_chunks(), backend(be):
        loss, lse = _cross_entropy_rows(logits, labels, write_grad=True)
    assert torch.isnan(loss[1]) and torch.isnan(logits[1]).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(loss[[0, 2]].double(), expected_loss[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits[[0, 2]].double(), expected_grad[[0, 2]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("ignore_index", [3, -1, 10**6])
def test_custom_ignore_index(be, ignore_index):
    """ignore_index may be a valid class (3), -1, or anything else; -100 is then an ordinary (bad) label."""
    logits, labels = make_inputs(8, 20, torch.float32, seed=12, ignore_frac=0.0)
    labels[::3] = ignore_index
    expected = torch.nn.functional.cross_entropy(logits.double(), labels, ignore_index=ignore_index, reduction="sum")
    with backend(be):
        out = cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        per_row = cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
        with pytest.raises(ValueError, match="-100 is outside"):
            cross_entropy(logits, labels.masked_fill(labels == ignore_index, -100), ignore_index=ignore_index)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    assert (per_row[labels == ignore_index] == 0).all() and (per_row[labels != ignore_index] > 0).all()


@pytest.mark.parametrize("be", BACKENDS)
def test_empty_batch(be):
    x = torch.randn(0, 17, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    with backend(be):
        for reduction, expected_shape in (("mean", ()), ("sum", ()), ("none", (0,))):
            out = cross_entropy(x, labels, reduction=reduction)
            assert out.shape == expected_shape and out.dtype == torch.float32 and (out == 0).all()
            out.sum().backward()
    assert x.grad.shape == (0, 17)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize(
    "layout",
    [
        lambda x: torch.stack([x, x], dim=2)[:, :, 0],  # vocabulary stride 2: copied to contiguous
        lambda x: x.t().contiguous().t(),  # column-major: copied
        lambda x: torch.nn.functional.pad(x, (0, 8))[:, :40],  # row stride 48: used in place
    ],
    ids=["vocab-stride-2", "column-major", "row-stride-48"],
)
def test_non_contiguous_inputs(be, layout):
    """Strided logits give bit-identical results; labels may be strided too; the input is never modified."""
    base, labels = make_inputs(5, 40, torch.bfloat16, seed=9)
    labels_strided = torch.stack([labels, labels], dim=1)[:, 0]
    with backend(be):
        expected, expected_grad = run_with_grad(lambda x: cross_entropy(x, labels), base, 1.0)
        buffer = layout(base).detach()  # the strided tensor itself is the leaf
        assert not buffer.is_contiguous()
        before = buffer.clone()
        buffer.requires_grad_()
        out = cross_entropy(buffer, labels_strided)
        out.backward()
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(buffer.grad, expected_grad, rtol=0, atol=0)
    assert torch.equal(buffer.detach(), before)


@pytest.mark.parametrize("be", BACKENDS)
def test_num_items_in_batch_matches_fixed_cross_entropy(be):
    from transformers.loss.loss_utils import fixed_cross_entropy

    logits, labels = make_inputs(6, 25, torch.float32, seed=10)
    for items in (7, torch.tensor(7), torch.tensor(7.0)):
        x_hf = logits.clone().requires_grad_()
        hf = fixed_cross_entropy(x_hf, labels, num_items_in_batch=items)
        hf.backward()
        with backend(be):
            ours, grad = run_with_grad(lambda x, n=items: cross_entropy(x, labels, num_items_in_batch=n), logits, 1.0)
        torch.testing.assert_close(ours, hf.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, x_hf.grad, rtol=1e-5, atol=1e-7)
    with small_chunks(), backend(be):  # and against float64 through the same checks as everything else
        compare(logits.bfloat16(), labels, "mean", None, None, num_items=7)


def test_int32_labels_and_fp64_logits():
    logits, labels = make_inputs(4, 30, torch.float64, seed=11)
    out = cross_entropy(logits, labels.int(), reduction="none")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, float64_formula(logits, labels, None, None)[0])


@pytest.mark.parametrize(
    "logits,labels,kwargs,error,match",
    [
        (torch.zeros(2, 3, 4), torch.zeros(6, dtype=torch.long), {}, ValueError, r"2-D.*view\(-1"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long), {}, TypeError, "floating-point"),
        (torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), {}, ValueError, "V == 0"),
        (torch.zeros(2, 4), torch.zeros(2), {}, TypeError, "integer tensor"),
        (torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), {}, ValueError, r"shape \(2,\)"),
        (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), {"reduction": "avg"}, ValueError, "reduction"),
        (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), {"reduction": "sum", "num_items_in_batch": 3},
         ValueError, "num_items_in_batch"),
        (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), {"softcap": 0.0}, ValueError, "softcap"),
        (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), {"logit_scale": math.inf}, ValueError, "logit_scale"),
    ],
)  # fmt: skip
def test_bad_arguments(logits, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        cross_entropy(logits, labels, **kwargs)


# ------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_saved_tensors(be, reduction):
    """Backward keeps the logits (the caller's storage), the int64 labels and two fp32 (max, log-sum) per row."""
    n, v = 6, 48
    logits = torch.randn(n, v, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    with backend(be), SavedTensorMeter() as meter:
        loss = cross_entropy(logits, labels, reduction=reduction, softcap=30.0, num_items_in_batch=None)
    assert [(s.shape, s.dtype) for s in meter.saved] == [((n, v), torch.bfloat16), ((n,), torch.int64),
                                                         ((n, 2), torch.float32)]  # fmt: skip
    assert meter.total_bytes == n * v * 2 + n * 8 + n * 8
    loss.sum().backward()  # and what was saved is enough


def test_audit_cases_follow_launch_heuristics():
    cases = ce.audit_cases()
    kernels = {case.kernel for case in cases}
    assert kernels == {ce._cross_entropy_forward_kernel, ce._cross_entropy_backward_kernel}
    for case in cases:
        vocab = case.args["V"]
        assert (case.constexprs["BLOCK"], case.num_warps) == ce._launch_config(vocab)
        assert set(case.args) == set(case.kernel.arg_names)
        read_logits = 8192 * vocab * 2
        assert read_logits < case.min_bytes <= 2 * read_logits + 8192 * 24
