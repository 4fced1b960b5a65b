"""linear_log_probs: semantics, float64 accuracy over property-based shapes, memory, errors.

Baseline ("torch_same_dtype" of :func:`assert_no_worse_than_torch`): ``linear_log_probs_reference`` run in the
dtype under test, i.e. what TRL users get from ``lm_head`` in the model dtype followed by an fp32
``log_softmax``/entropy; the exact answer is the same reference on the same rounded inputs in float64. fp32
also stays within ~1e-5 relative of float64 (sqrt(K) roundings of a K-term sum as the floor, as in
test_fused_linear_cross_entropy). Chunks are forced down to a few rows and the Triton kernel's vocabulary
block down to 64 so every path crosses several token chunks and several vocabulary blocks.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft.kernels.logprob_head import audit_cases, linear_log_probs, linear_log_probs_reference
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend, max_error
from tests.kernels.test_fused_linear_cross_entropy import check_fp32_relative, chunk_rows, make_inputs

lph = importlib.import_module("fastft.kernels.logprob_head")
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture(autouse=True)
def _small_vocab_blocks(monkeypatch):
    monkeypatch.setattr(lph, "_MAX_BLOCK", 64)


# ---------------------------------------------------------------------------------------------- semantics


def float64_formula(hidden, weight, bias, labels, temperature, softcap, logit_scale):
    """Every output written out in float64 from its definition (probabilities, not log_softmax)."""
    x = hidden.reshape(-1, hidden.shape[-1]) @ weight.T + (0.0 if bias is None else bias)
    z = x * (1.0 if logit_scale is None else logit_scale)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    p = z.exp() / z.exp().sum(dim=1, keepdim=True)
    y = labels.reshape(-1)
    live = y != -100
    safe = y.clamp(min=0)[:, None]
    out = {
        "log_probs": p.gather(1, safe).squeeze(1).log(),
        "entropy": -(p * p.log()).sum(dim=1),
        "log_sum_sq_probs": (p * p).sum(dim=1).log(),
        "mean_logits": z.mean(dim=1),
    }
    out = {k: torch.where(live, v, 0.0).view(labels.shape) for k, v in out.items()}
    out["is_top1"] = ((z.argmax(dim=1) == y) & live).view(labels.shape)
    return out


@pytest.mark.parametrize("temperature,softcap,logit_scale", [(1.0, None, None), (0.7, 3.0, None), (1.9, 2.5, 0.3)])
def test_reference_is_the_float64_formula(temperature, softcap, logit_scale):
    hidden, weight, bias, labels = make_inputs((3, 5), 8, 37, seed=1, bias=True)
    for b in (None, bias):
        got = linear_log_probs_reference(hidden, weight, labels, b, temperature=temperature, softcap=softcap,
                                         logit_scale=logit_scale, entropy=True, stats=True)  # fmt: skip
        want = float64_formula(hidden, weight, b, labels, temperature, softcap, logit_scale)
        for name in FIELDS:
            torch.testing.assert_close(getattr(got, name), want[name], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- accuracy


def run(fn, hidden, weight, bias, labels, dtype, *, train_w, entropy, stats, non_contiguous=False, **options):
    """Outputs and gradients (upstream: fixed ramps on log-probs and on entropy) on the inputs cast to ``dtype``."""
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_(train_w)
    b = bias.to(dtype).requires_grad_(train_w) if bias is not None else None
    h_in = h.transpose(0, -1).contiguous().transpose(0, -1) if non_contiguous else h
    out = fn(h_in, w, labels, b, entropy=entropy, stats=stats, **options)
    n = out.log_probs.numel()
    loss = (out.log_probs * torch.linspace(-1.5, 2.0, n, dtype=out.log_probs.dtype).view(labels.shape)).sum()
    if entropy:
        loss = loss + (out.entropy * torch.linspace(0.5, -1.0, n, dtype=out.entropy.dtype).view(labels.shape)).sum()
    inputs = [t for t in (h, w, b) if t is not None and t.requires_grad]
    grads = list(torch.autograd.grad(loss, inputs))
    values = {name: getattr(out, name) for name in FIELDS if getattr(out, name) is not None}
    return {k: v.detach() for k, v in values.items()}, grads


@settings(max_examples=80)
@given(
    combo=st.sampled_from([(b, d) for b in BACKENDS for d in DTYPES]),
    rows=st.integers(1, 9),
    lead2=st.booleans(),
    n_embd=st.integers(1, 24),
    vocab=st.sampled_from([1, 2, 63, 64, 65, 130, 301]),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    softcap=st.sampled_from([None, 4.0]),
    logit_scale=st.sampled_from([None, 1.3]),
    train_w=st.booleans(),
    entropy=st.booleans(),
    stats=st.booleans(),
    bias=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    chunk=st.sampled_from([None, 2, 3]),
    non_contiguous=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_float64(combo, rows, lead2, n_embd, vocab, temperature, softcap, logit_scale, train_w, entropy,
                         stats, bias, ignore_frac, chunk, non_contiguous, seed):  # fmt: skip
    be, dtype = combo
    lead = (2, rows) if lead2 else (rows,)
    hidden, weight, b, labels = make_inputs(lead, n_embd, vocab, seed, ignore_frac=ignore_frac, bias=bias)
    options = {"temperature": temperature, "softcap": softcap, "logit_scale": logit_scale, "train_w": train_w,
                   "entropy": entropy, "stats": stats}  # fmt: skip
    with chunk_rows(chunk), backend(be):
        ours, our_grads = run(linear_log_probs, hidden, weight, b, labels, dtype, non_contiguous=non_contiguous,
                              **options)  # fmt: skip
    theirs, their_grads = run(linear_log_probs_reference, hidden, weight, b, labels, dtype, **options)
    exact, exact_grads = run(linear_log_probs_reference, hidden, weight, b, labels, torch.float64, **options)
    assert set(ours) == set(exact)
    top1, their_top1 = ours.pop("is_top1", None), theirs.pop("is_top1", None)
    exact.pop("is_top1", None)
    if stats:  # argmax of the same rounded logits (the float64 argmax may break a rounding tie differently)
        assert torch.equal(top1, their_top1)
    n_tokens = labels.numel()
    grad_names = ["d hidden"] + (["d weight"] + (["d bias"] if bias else []) if train_w else [])
    pairs = [(name, vocab, ours[name], theirs[name], exact[name]) for name in exact]
    pairs += [(name, vocab if name == "d hidden" else n_tokens, a, t, e)
              for name, a, t, e in zip(grad_names, our_grads, their_grads, exact_grads)]  # fmt: skip
    for name, length, a, t, e in pairs:
        if name == "log_sum_sq_probs" and dtype != torch.float32:
            continue
        ulps = max(4.0, length**0.5) if dtype == torch.float32 else 4.0
        # Outputs computed in fp32 from rounded logits: compare in fp32 against the fp32-output baseline.
        a, t = (a, t) if a.dtype == t.dtype else (a.to(t.dtype), t)
        # The entropy term of a gradient is a difference of nearly equal products (p_v (w_v - Wbar)); its
        # size is set by the log-probs' scale, not by its own result: pass that scale for low precision.
        scale = None if dtype == torch.float32 else max(e.abs().max().item(), 1.0)
        assert_no_worse_than_torch(a, t, e, name=f"{be} {dtype} {name}", ulps=ulps, scale=scale)
        if dtype == torch.float32:
            check_fp32_relative(a, e, f"{be} {name}", rel=2e-5)


def test_log_sum_sq_probs_low_precision():
    """Its gradient-free value in bf16: same error as TRL's formula from bf16 logits (fp32 after the matmul)."""
    hidden, weight, _, labels = make_inputs((7,), 16, 130, seed=5)
    got = linear_log_probs(hidden.bfloat16(), weight.bfloat16(), labels, stats=True).log_sum_sq_probs
    baseline = linear_log_probs_reference(hidden.bfloat16(), weight.bfloat16(), labels, stats=True).log_sum_sq_probs
    exact = linear_log_probs_reference(hidden.bfloat16().double(), weight.bfloat16().double(), labels, stats=True)
    assert max_error(got, exact.log_sum_sq_probs) <= 2 * max_error(baseline, exact.log_sum_sq_probs) + 1e-5


# ---------------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("be", BACKENDS)
def test_all_positions_ignored_is_a_connected_zero(be):
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    labels = torch.full((2, 3), -100)
    with backend(be):
        out = linear_log_probs(hidden, weight, labels, entropy=True, stats=True)
    assert out.log_probs.shape == (2, 3) and not out.log_probs.any() and not out.is_top1.any()
    (out.log_probs.sum() + out.entropy.sum()).backward()
    assert hidden.grad is not None and not hidden.grad.any()


@pytest.mark.parametrize("be", BACKENDS)
def test_frozen_head_saves_one_hidden_sized_tensor(be):
    """Frozen W: autograd keeps A (live rows x H) and nothing vocabulary-sized; the lazy entropy node keeps h."""
    n, h, v = 24, 16, 500
    hidden, weight, _, labels = make_inputs((n,), h, v, seed=2, ignore_frac=0.0)
    labels[:8] = -100  # 16 live rows
    hidden, weight = hidden.float().requires_grad_(), weight.float()
    for entropy in (False, True):
        with SavedTensorMeter() as meter, backend(be):
            out = linear_log_probs(hidden, weight, labels, entropy=entropy)
        # The lazy entropy node keeps a reference to the weight itself (no copy: it is the parameter).
        own = [s for s in meter.saved if s.storage_bytes != weight.untyped_storage().nbytes()]
        assert all(v not in s.shape for s in own), meter.saved
        a_bytes = 16 * h * 4  # A in fp32; with entropy also the gathered live rows of h
        assert sum(s.storage_bytes for s in own if s.dtype == torch.float32) == a_bytes * (2 if entropy else 1)
        out.log_probs.sum().backward()  # entropy unused: its node never runs


def test_backward_twice_raises():
    hidden = torch.randn(4, 8, requires_grad=True)
    out = linear_log_probs(hidden, torch.randn(30, 8), torch.randint(0, 30, (4,)))
    out.log_probs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.log_probs.sum().backward()


def test_no_grad_keeps_nothing():
    hidden = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad(), SavedTensorMeter() as meter:
        out = linear_log_probs(hidden, torch.randn(30, 8, requires_grad=True), torch.randint(0, 30, (4,)))
    assert meter.total_bytes == 0 and out.log_probs.grad_fn is None


def test_autocast_runs_the_matmul_in_the_autocast_dtype():
    hidden, weight, _, labels = make_inputs((6,), 16, 90, seed=3)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_log_probs(h, w, labels, entropy=True)
    got.log_probs.sum().backward()
    want = linear_log_probs(h.detach().bfloat16(), w.detach().bfloat16(), labels, entropy=True)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=0, atol=0)
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"temperature": math.nan}, ValueError, "temperature must be a finite"),
        ({"softcap": -1.0}, ValueError, "softcap must be > 0"),
        ({"labels": torch.tensor([0, 1, 50])}, ValueError, "outside \\[0, 30\\)"),
        ({"labels": torch.tensor([0, 1])}, ValueError, "leading shape"),
        ({"labels": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "integer tensor"),
        ({"weight": torch.randn(30, 7)}, ValueError, "H = weight.shape\\[1\\]"),
        (
            {"weight": torch.randn(30, 8, dtype=torch.float64)},
            TypeError,
            "weight is torch.float64 but hidden is torch.float32",
        ),
        ({"bias": torch.randn(29)}, ValueError, "bias must be None or shape"),
    ],
)
def test_errors_speak_to_the_user(kwargs, error, match):
    args = {"hidden": torch.randn(3, 8), "weight": torch.randn(30, 8), "labels": torch.tensor([0, 1, 2])}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in ("hidden", "weight", "labels", "bias")})
    with pytest.raises(error, match=match):
        linear_log_probs(**args, **kwargs)


def test_audit_cases_cover_every_launch_mode():
    names = {case.name for case in audit_cases()}
    assert names == {"logprob_rows_outputs", "logprob_rows_forward_grad", "logprob_rows_backward_grad"}


@pytest.mark.parametrize("be", BACKENDS)
def test_frozen_head_allocates_nothing_vocabulary_by_hidden(be):
    """No (V, H) gradient buffer (nor any other tensor that large) when the weight is frozen; one when it trains."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestOutput(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if torch.is_tensor(a)}
            for t in tree_leaves(out):  # new storage only: views (weight.t()) and in-place results allocate nothing
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                    self.largest = max(self.largest, t.numel())
            return out

    n, h, v = 6, 32, 400  # V x H = 12800 elements, far more than any (N, V) or (N, H) tensor here
    hidden, weight, _, labels = make_inputs((n,), h, v, seed=4)
    for train_w in (False, True):
        hid, w = hidden.float().requires_grad_(), weight.float().requires_grad_(train_w)
        with LargestOutput() as watch, backend(be):
            linear_log_probs(hid, w, labels, entropy=True).log_probs.sum().backward()
        assert (watch.largest >= v * h) == train_w, (train_w, watch.largest)


@pytest.mark.parametrize(
    "train_w, grad, fastft_gemms, trl_gemms", [(False, True, 2, 3), (True, True, 4, 4), (False, False, 1, 1)]
)
def test_head_gemms_against_trls_chunked_function(train_w, grad, fastft_gemms, trl_gemms):
    """Counted exactly: the (N, V, H) matmuls of forward + backward, fastft's head against TRL's
    ``ChunkedLogProbFunction`` (what TRL's trainers run). A frozen head (LoRA, reference) saves one of three."""
    trl_kernels = pytest.importorskip("trl.kernels")
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class HeadGemms(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            packet = func.overloadpacket
            if packet in (aten.mm, aten.addmm, aten.addmm_):
                a, b = (args[0], args[1]) if packet is aten.mm else (args[1], args[2])
                self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    n, h, v = 64, 16, 500
    hidden, weight, _, labels = make_inputs((n,), h, v, seed=6, ignore_frac=0.0)
    counts = {}
    for name in ("fastft", "trl"):
        hid, w = hidden.float().requires_grad_(grad), weight.float().requires_grad_(train_w and grad)
        with HeadGemms() as gemms, backend("torch"):
            if name == "fastft":
                log_probs = linear_log_probs(hid, w, labels, entropy=True).log_probs
            else:
                args = (hid, w, None, labels, 1.0, 32768, None, 1.0, ("log_probs", "entropy"))
                log_probs = trl_kernels.ChunkedLogProbFunction.apply(*args)[0]
            if grad:
                log_probs.sum().backward()
        counts[name] = gemms.flops / (2 * n * v * h)
    assert counts == {"fastft": fastft_gemms, "trl": trl_gemms}
