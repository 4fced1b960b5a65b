"""fused_linear_cross_entropy: semantics, transformers parity, property-based accuracy, memory.

Baselines ("torch_same_dtype" of :func:`assert_no_worse_than_torch`): what a transformers user gets today,
``lm_head`` (``F.linear``) in the model dtype, then ``ForCausalLMLoss``'s cross-entropy on the logits upcast
to fp32, gradients by autograd through both. That is ``fused_linear_cross_entropy_reference`` run on the
inputs in the dtype under test; the exact answer is the same reference on the same (rounded) inputs in
float64. fp32 additionally stays within ~1e-5 relative of float64 (the fp32 contract), and its comparison
with torch allows sqrt(K) roundings for a K-term sum, because there both errors are BLAS summation-order
noise that depends on how many rows each GEMM gets (see :func:`compare`).

"triton" runs the cross-entropy row kernel of ``cross_entropy.py`` interpreted (~1 ms per program and op),
so those examples keep N small; the matmuls are torch on both backends. Chunking is forced down to a few
rows (module constants lowered by :func:`chunk_rows`) so that every path crosses several chunks.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from fastft.kernels.fused_linear_cross_entropy import (
    audit_cases,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from fastft.utils.memory import SavedTensorMeter
from tests.helpers import BACKENDS, DTYPES, assert_no_worse_than_torch, backend, max_error

# `fastft.kernels.fused_linear_cross_entropy` the attribute is the function (the package re-exports it).
flce = importlib.import_module("fastft.kernels.fused_linear_cross_entropy")

COMBOS = [(b, d) for b in BACKENDS for d in DTYPES]
COMBO_IDS = [f"{b}-{str(d).split('.')[-1]}" for b, d in COMBOS]


@contextlib.contextmanager
def chunk_rows(rows: int | None):
    """Force chunks of ``rows`` tokens (None: the production budget, one chunk at test sizes)."""
    names = ("LOGITS_CHUNK_BYTES", "MIN_CHUNK_ROWS", "MIN_CHUNK_ROWS_WEIGHT_GRAD")
    saved = [getattr(flce, name) for name in names]
    if rows is not None:
        for name, value in zip(names, (0, rows, rows)):
            setattr(flce, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(flce, name, value)


class ChunkCounter:
    """Counts the chunks (calls of the cross-entropy row function) a fused call runs."""

    def __init__(self):
        self.calls, self._real = 0, flce._cross_entropy_rows

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._real(*args, **kwargs)


def make_inputs(lead, h, v, seed, ignore_frac=0.25, bias=False):
    """float64 hidden (*lead, h), weight (v, h), bias (v,) or None, labels (*lead) with some ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=gen, dtype=torch.float64)
    # Logits of a few units, like a trained head: std ~2 whatever h is.
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2.0 / max(h, 1) ** 0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    labels = torch.randint(0, v, tuple(lead), generator=gen)
    labels[torch.rand(tuple(lead), generator=gen) < ignore_frac] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, dtype, *, train_w=True, train_b=True, upstream=0.75,
        non_contiguous=False, **kwargs):  # fmt: skip
    """Loss and gradients of ``fn`` on the inputs cast to ``dtype``; upstream scales the loss (per row for "none")."""
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_(train_w)
    b = bias.to(dtype).requires_grad_(train_b) if bias is not None else None
    # Same values, transposed strides: the (..., H) input the function sees is not contiguous.
    h_in = h.transpose(0, -1).contiguous().transpose(0, -1) if non_contiguous else h
    loss = fn(h_in, w, labels, b, **kwargs)
    up = upstream if loss.dim() == 0 else torch.linspace(-1.5, 2.0, loss.numel(), dtype=loss.dtype).view(loss.shape)
    inputs = [t for t in (h, w, b) if t is not None and t.requires_grad]
    return loss.detach(), list(torch.autograd.grad((loss * up).sum(), inputs))


def check_fp32_relative(actual, exact, name, rel=1e-5):
    scale = exact.double().abs().max().item() if exact.numel() else 0.0
    err = max_error(actual, exact)
    assert err <= rel * scale + 1e-12, f"{name}: fp32 error {err:.3e} > {rel} x {scale:.3e}"


def compare(be, dtype, hidden, weight, bias, labels, chunk=None, non_contiguous=False, **kwargs):
    """fastft on ``be`` vs the float64 oracle, no worse than the transformers-style baseline in ``dtype``."""
    with chunk_rows(chunk), backend(be):
        ours = run(fused_linear_cross_entropy, hidden, weight, bias, labels, dtype,
                   non_contiguous=non_contiguous, **kwargs)  # fmt: skip
    theirs = run(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, dtype, **kwargs)
    exact = run(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, torch.float64, **kwargs)
    n_tokens, vocab = labels.numel(), weight.shape[0]
    # (name, length of the longest fp32 accumulation behind it: logsumexp / G @ W over V, sums over tokens)
    outputs = [("loss", vocab), ("d hidden", vocab)]
    outputs += [("d weight", n_tokens)] if kwargs.get("train_w", True) else []
    outputs += [("d bias", n_tokens)] if bias is not None and kwargs.get("train_b", True) else []
    assert len(outputs) == 1 + len(ours[1])
    for (name, length), a, t, e in zip(outputs, [ours[0], *ours[1]], [theirs[0], *theirs[1]], [exact[0], *exact[1]]):
        # fp32: the errors are BLAS summation-order noise, and CPU BLAS runs the 1-3-row GEMMs of the forced
        # tiny chunks with a different kernel than torch's one big GEMM (measured: ~3.5x the mean error over
        # V = 3001 terms). Floor: sqrt(K) roundings of the largest value for K-term sums instead of 4.
        ulps = max(4.0, length**0.5) if dtype == torch.float32 else 4.0
        assert_no_worse_than_torch(a, t, e, name=f"{be} {name}", ulps=ulps)
        if dtype == torch.float32:
            check_fp32_relative(a, e, f"{be} {name}")
    return ours


# ---------------------------------------------------------------------------------------------- semantics


def float64_formula(hidden, weight, bias, labels, reduction, softcap, logit_scale, num_items=None):
    """The loss written out in float64 (no F.linear, no F.cross_entropy)."""
    x = hidden.reshape(-1, hidden.shape[-1]) @ weight.T + (0.0 if bias is None else bias)
    z = x * (1.0 if logit_scale is None else logit_scale)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    m = z.max(dim=1, keepdim=True).values
    lse = (m + (z - m).exp().sum(dim=1, keepdim=True).log()).squeeze(1)
    y = labels.reshape(-1)
    live = y != -100
    losses = torch.where(live, lse - z.gather(1, y.clamp(min=0)[:, None]).squeeze(1), 0.0)
    if reduction == "none":
        return losses.view(labels.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (num_items if num_items is not None else max(int(live.sum()), 1))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap,logit_scale", [(None, None), (3.0, None), (None, 0.0625), (2.5, 1.7)])
def test_reference_is_the_float64_formula(reduction, softcap, logit_scale):
    hidden, weight, bias, labels = make_inputs((3, 5), 8, 37, seed=1, bias=True)
    for b in (None, bias):
        got = fused_linear_cross_entropy_reference(hidden, weight, labels, b, reduction=reduction, softcap=softcap,
                                                   logit_scale=logit_scale)  # fmt: skip
        want = float64_formula(hidden, weight, b, labels, reduction, softcap, logit_scale)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got = fused_linear_cross_entropy_reference(hidden, weight, labels, num_items_in_batch=torch.tensor(23))
    torch.testing.assert_close(got, float64_formula(hidden, weight, None, labels, "mean", None, None, 23))


def causal_lm_batch(seed, batch=2, seq=9, h=16, v=53, dtype=torch.float32):
    """hidden (B, T, H), an lm_head weight, unshifted labels with a masked prompt, and the shifted labels."""
    hidden, weight, _, labels = make_inputs((batch, seq), h, v, seed=seed, ignore_frac=0.0)
    labels[:, :3] = -100  # a prompt
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]  # what ForCausalLMLoss does inside
    return hidden.to(dtype), weight.to(dtype), labels, shifted


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
def test_matches_transformers_causal_lm_loss(be, num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight, labels, shifted = causal_lm_batch(seed=3)
    n_items = torch.tensor(13) if num_items == "tensor" else num_items
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lm_head = torch.nn.Linear(16, 53, bias=False)
    lm_head.weight = torch.nn.Parameter(w1)
    want = ForCausalLMLoss(lm_head(h1), labels, vocab_size=53, num_items_in_batch=n_items)
    want.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with chunk_rows(4), backend(be):
        got = fused_linear_cross_entropy(h2, w2, shifted, num_items_in_batch=n_items)
        got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w2.grad, lm_head.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_worse_than_transformers_in_low_precision(be, dtype):
    """In bf16/fp16 the baseline is literally transformers: lm_head in that dtype, ForCausalLMLoss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight, labels, shifted = causal_lm_batch(seed=4, dtype=torch.float64)

    def transformers_loss(h, w, dt):
        h, w = h.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        loss = ForCausalLMLoss(F.linear(h, w), labels, vocab_size=53)
        return [loss.detach(), *torch.autograd.grad(loss, (h, w))]

    theirs, exact = transformers_loss(hidden, weight, dtype), transformers_loss(hidden, weight, torch.float64)
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    with chunk_rows(5), backend(be):
        loss = fused_linear_cross_entropy(h, w, shifted)
        ours = [loss.detach(), *torch.autograd.grad(loss, (h, w))]
    for name, a, t, e in zip(["loss", "d hidden", "d weight"], ours, theirs, exact):
        assert_no_worse_than_torch(a, t, e, name=name)


@pytest.mark.parametrize("be", BACKENDS)
def test_rows_one_token_dominates(be):
    """fp32 rows where one logit dominates the softmax (p ~ 0.999): gradients within 2e-6 of float64.

    That is Gemma with its tied head at initialisation at real widths: a token's own embedding gives it a logit
    of ~0.02 * hidden (20 at hidden 1024) against ~N(0, 0.64) for the other 32000. PyTorch's CPU ``log_softmax``
    (transformers' fp32 loss) sums exp(z - max) in per-lane fp32 accumulators and the lane holding the maximum's
    1.0 drops the ~3e-8 terms added to it: about 4e-5 of error in every log-prob of such a row, one sign in every
    row (here 3.5e-5 relative in d hidden against fastft's 3.2e-7, x86 AVX-512, torch 2.13). That error, not fastft's,
    is what parts fastft's fp32 Gemma runs from plain transformers' on a CPU (tests/models/test_convergence.py).
    The float64 answer is computed with the loss in float64: ``ForCausalLMLoss`` upcasts with ``.float()``,
    which would round a float64 model's logits to fp32.
    """
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    weight = torch.randn(32000, 64, generator=gen, dtype=torch.float64) * 0.08
    for row, token in ((0, 7), (1, 9000)):  # own-token logit 17.5; the rest ~ N(0, 0.64)
        weight[token] = hidden[row] * 17.5 / hidden[row].square().sum()
    labels = torch.tensor([3, 11, 12, 13])

    def gradients(loss_fn, dtype):
        h, w = (t.to(dtype).detach().clone().requires_grad_() for t in (hidden, weight))
        return [g.double() for g in torch.autograd.grad(loss_fn(h, w), (h, w))]

    exact = gradients(lambda h, w: F.cross_entropy(F.linear(h, w), labels), torch.float64)
    theirs = gradients(lambda h, w: F.cross_entropy(F.linear(h, w).float(), labels), torch.float32)
    with backend(be):
        ours = gradients(lambda h, w: fused_linear_cross_entropy(h, w, labels), torch.float32)
    for name, o, t, e in zip(("d hidden", "d weight"), ours, theirs, exact):
        our_error, their_error = max_error(o, e) / e.abs().max().item(), max_error(t, e) / e.abs().max().item()
        assert our_error < 2e-6 and our_error <= their_error, f"{name}: fastft {our_error:.1e}, torch {their_error:.1e}"


@pytest.mark.parametrize("be", BACKENDS)
def test_gradient_accumulation_matches_transformers(be):
    """Two micro-batches with transformers' num_items_in_batch: same loss sum and accumulated gradients."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    batches = [causal_lm_batch(seed=s, seq=7 + s) for s in (5, 6)]
    num_items = sum(int((shifted != -100).sum()) for *_, shifted in batches)
    num_items = torch.tensor(num_items)
    weight = batches[0][1]
    lm_head = torch.nn.Linear(16, 53, bias=False)
    lm_head.weight = torch.nn.Parameter(weight.clone())
    w_ours = weight.clone().requires_grad_()
    losses_theirs, losses_ours, h_theirs, h_ours = [], [], [], []
    for hidden, _, labels, shifted in batches:
        h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        loss = ForCausalLMLoss(lm_head(h1), labels, vocab_size=53, num_items_in_batch=num_items)
        loss.backward()
        with chunk_rows(3), backend(be):
            mine = fused_linear_cross_entropy(h2, w_ours, shifted, num_items_in_batch=num_items)
            mine.backward()
        losses_theirs.append(loss.detach()), losses_ours.append(mine.detach())
        h_theirs.append(h1.grad), h_ours.append(h2.grad)
    torch.testing.assert_close(sum(losses_ours), sum(losses_theirs), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w_ours.grad, lm_head.weight.grad, rtol=1e-5, atol=1e-7)
    for a, t in zip(h_ours, h_theirs):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------- property-based accuracy


@st.composite
def cases(draw, max_rows):
    n = draw(st.integers(1, max_rows))
    batch = draw(st.sampled_from([1, 2])) if n % 2 == 0 else 1
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return {
        "lead": (n,) if batch == 1 else (batch, n // batch),
        "h": draw(st.integers(1, 40)),
        "v": draw(st.sampled_from([1, 3, 17, 37, 129, 257, 1023, 2049, 3001])),
        "bias": draw(st.booleans()),
        "train_w": draw(st.booleans()),
        "train_b": draw(st.booleans()),
        "cap_scale": draw(st.sampled_from([(None, None), (3.0, None), (None, 0.5), (2.5, 1.7)])),
        "reduction": reduction,
        "num_items": draw(st.sampled_from([None, 7])) if reduction == "mean" else None,
        "chunk": draw(st.sampled_from([None, 1, 2, 3, 5, 8])),
        "ignore_frac": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "non_contiguous": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def check_case(be, dtype, case):
    hidden, weight, bias, labels = make_inputs(case["lead"], case["h"], case["v"], case["seed"],
                                               case["ignore_frac"], case["bias"])  # fmt: skip
    softcap, logit_scale = case["cap_scale"]
    compare(be, dtype, hidden, weight, bias, labels, chunk=case["chunk"], non_contiguous=case["non_contiguous"],
            train_w=case["train_w"], train_b=case["train_b"], reduction=case["reduction"], softcap=softcap,
            logit_scale=logit_scale, num_items_in_batch=case["num_items"])  # fmt: skip


EDGE = {
    "bias": True,
    "train_w": True,
    "train_b": True,
    "cap_scale": (2.5, 1.7),
    "num_items": None,
    "ignore_frac": 0.3,
    "non_contiguous": True,
    "seed": 0,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[-1] for d in DTYPES])
@settings(max_examples=30)
@given(case=cases(max_rows=40))
@example(case=dict(EDGE, lead=(1,), h=7, v=3001, reduction="mean", chunk=None))  # one row
@example(case=dict(EDGE, lead=(2, 7), h=33, v=129, reduction="none", chunk=3))  # 14 rows in chunks of 3
@example(case=dict(EDGE, lead=(11,), h=16, v=4097, reduction="sum", chunk=4))  # V just past the CE block
def test_matches_float64_torch_backend(dtype, case):
    check_case("torch", dtype, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[-1] for d in DTYPES])
@settings(max_examples=10)
@given(case=cases(max_rows=12))
@example(case=dict(EDGE, lead=(5,), h=9, v=4097, reduction="none", chunk=2))  # V just past the CE block
def test_matches_float64_triton_backend(dtype, case):
    check_case("triton", dtype, case)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forced_chunks_equal_one_chunk(be, reduction):
    """10 rows in chunks of 3 (3+3+3+1 balanced to 3,3,3,1) give the one-chunk result; the chunks really ran ("mean"
    drops ignored rows before chunking: ceil(live / 3) chunks)."""
    hidden, weight, bias, labels = make_inputs((10,), 12, 41, seed=7, bias=True)
    rows_run = 10 if reduction == "none" else int((labels != -100).sum())
    results = []
    for rows in (None, 3):
        counter = ChunkCounter()
        with chunk_rows(rows), backend(be), pytest.MonkeyPatch.context() as mp:
            mp.setattr(flce, "_cross_entropy_rows", counter)
            results.append(run(fused_linear_cross_entropy, hidden, weight, bias, labels, torch.float32,
                               reduction=reduction, softcap=4.0))  # fmt: skip
        # forward only (scalar), or forward + the recompute in backward ("none" with a trainable weight)
        assert counter.calls == (1 if rows is None else -(-rows_run // 3)) * (2 if reduction == "none" else 1)
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_b, grads_a):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunk_size_formula():
    """Production budget: 256 MiB of logits, floors of 256 rows (1024 with a weight gradient), whole 64-row
    tiles, balanced chunks."""
    # Llama-3-8B at 8192 tokens: the hidden-states budget (8192 * 4096 / 128256 = 262 rows) wins: 32 chunks
    assert flce._chunk_rows(8192, 128256, 2, weight_grad=False, hidden=4096) == 256
    assert flce._chunk_rows(65536, 128256, 2, weight_grad=False, hidden=4096) == 1024  # long: the 256 MiB cap
    assert flce._chunk_rows(65536, 262144, 2, weight_grad=False, hidden=3584) == 512  # Gemma: 256 MiB cap
    assert flce._chunk_rows(8192, 262144, 2, weight_grad=True, hidden=3584) == 1024  # floor for the fp32 dW buffer
    assert flce._chunk_rows(32768, 128256, 2, weight_grad=False, hidden=4352) == 1024  # balanced 1024s
    assert flce._chunk_rows(4400, 128256, 2, weight_grad=False, hidden=16384) == 512  # 562 rows, aligned down
    assert flce._chunk_rows(300, 128256, 2, weight_grad=False, hidden=4096) == 192  # 256-row floor, balanced: 192+108
    assert flce._chunk_rows(200, 128256, 2, weight_grad=False, hidden=4096) == 200  # below the floor: one chunk
    # The memory benchmark's config (1024 tokens, H 1024, V 32000): 4 chunks of 256, never the (N, V) logits
    assert flce._chunk_rows(1024, 32000, 2, weight_grad=False, hidden=1024) == 256
    assert flce._chunk_rows(0, 128256, 2, weight_grad=False, hidden=4096) == 1
    assert flce._chunk_rows(10, 3, 4, weight_grad=False, hidden=8) == 10


# ------------------------------------------------------------------------------------------------- memory


class AllocationSpy(TorchDispatchMode):
    """Records the bytes of every storage an aten op creates (outputs not aliasing any input's storage).

    Every tensor PyTorch allocates, in forward and in autograd's backward, is the output of some aten op
    and passes through this mode, so the largest new storage bounds what was ever materialised; views and
    ``out=`` writes share an input's storage and are not counted.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                self.largest = max(self.largest, storage.nbytes())
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def largest_allocation(fn, hidden, weight, bias, labels, dtype, **kwargs):
    with AllocationSpy() as spy, SavedTensorMeter() as meter:
        run(fn, hidden, weight, bias, labels, dtype, **kwargs)
    return spy.largest, max((s.storage_bytes for s in meter.saved), default=0)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_materialises_the_logits(be, reduction):
    """No (N, V) tensor is allocated or saved, in forward or backward (the reference, as control, does)."""
    n, h, v, dtype = 64, 24, 1000, torch.bfloat16
    hidden, weight, bias, labels = make_inputs((4, 16), h, v, seed=8, bias=True)
    logits_bytes = n * v * dtype.itemsize  # the smallest an (N, V) tensor can be
    with chunk_rows(8), backend(be):
        allocated, saved = largest_allocation(fused_linear_cross_entropy, hidden, weight, bias, labels, dtype,
                                              reduction=reduction)  # fmt: skip
    # Largest legitimate ones: the fp32 (V, H) weight-gradient buffer and the chunk's fp32 temporaries.
    assert allocated < logits_bytes and saved < logits_bytes, (allocated, saved, logits_bytes)
    control, _ = largest_allocation(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, dtype,
                                    reduction=reduction)  # fmt: skip
    assert control >= logits_bytes


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("train_b", [False, True])
def test_frozen_weight_allocates_no_weight_sized_buffer(be, reduction, train_b):
    """LoRA: W frozen. weight.grad stays None and nothing of V x H elements is ever allocated."""
    h, v, dtype = 64, 1000, torch.float32
    hidden, weight, bias, labels = make_inputs((16,), h, v, seed=9, bias=True)
    weight_bytes = v * h * dtype.itemsize
    w = weight.to(dtype)
    with chunk_rows(8), backend(be), AllocationSpy() as spy:
        hd, b = hidden.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_(train_b)
        loss = fused_linear_cross_entropy(hd, w, labels, b, reduction=reduction)
        loss.sum().backward()
    assert w.grad is None and hd.grad is not None and (b.grad is not None) == train_b
    assert spy.largest < weight_bytes, (spy.largest, weight_bytes)
    # Control: a trainable weight does allocate its (V, H) fp32 gradient buffer, and the spy sees it.
    with chunk_rows(8), backend(be), AllocationSpy() as spy:
        fused_linear_cross_entropy(hidden.to(dtype), w.requires_grad_(), labels, reduction=reduction).sum().backward()
    assert spy.largest >= weight_bytes


@pytest.mark.parametrize("reduction,train_w,train_b", [
    ("mean", True, True), ("sum", True, False), ("mean", False, False), ("mean", False, True),
    ("none", False, False), ("none", True, True), ("none", False, True),
])  # fmt: skip
def test_saved_tensor_bytes(reduction, train_w, train_b):
    n, h, v, s = 12, 16, 40, 2  # bf16
    hidden, weight, bias, labels = make_inputs((3, 4), h, v, seed=10, bias=True)
    hd = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.to(torch.bfloat16).requires_grad_(train_w)
    b = bias.to(torch.bfloat16).requires_grad_(train_b)
    with SavedTensorMeter() as meter:
        fused_linear_cross_entropy(hd, w, labels, b, reduction=reduction)
    if reduction == "none" and (train_w or train_b):
        # hidden, weight, bias themselves (no copies) and the int64 labels: backward recomputes the chunks
        expected = n * h * s + v * h * s + v * s + n * 8
    elif reduction == "none":
        # the finished gradients, each only when needed
        expected = n * h * s + (v * h * s if train_w else 0) + (v * s if train_b else 0)
    else:
        # "mean"/"sum" keep only the live rows' dL/dh and their int64 index (ignored rows were never computed)
        live = int((labels != -100).sum())
        assert 0 < live < n
        expected = live * h * s + live * 8 + (v * h * s if train_w else 0) + (v * s if train_b else 0)
    assert meter.total_bytes == expected, [(t.shape, t.dtype) for t in meter.saved]
    with torch.no_grad(), SavedTensorMeter() as meter:
        fused_linear_cross_entropy(hd, w, labels, b, reduction=reduction)
    assert meter.total_bytes == 0


# ---------------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_input(be, lead):
    hidden, weight, bias, labels = make_inputs(lead, 8, 11, seed=11, bias=True)
    for reduction in ("mean", "sum", "none"):
        with backend(be):
            loss, grads = run(fused_linear_cross_entropy, hidden, weight, bias, labels, torch.float32,
                              reduction=reduction)  # fmt: skip
        assert loss.shape == (lead if reduction == "none" else ())
        assert loss.sum().item() == 0.0
        assert [g.shape for g in grads] == [hidden.shape, weight.shape, bias.shape]
        assert all(not g.any() for g in grads)


@pytest.mark.parametrize("be", BACKENDS)
def test_all_labels_ignored_mean_is_zero_with_zero_gradient(be):
    hidden, weight, bias, labels = make_inputs((6,), 8, 13, seed=12, bias=True, ignore_frac=1.0)
    with chunk_rows(4), backend(be):
        loss, grads = run(fused_linear_cross_entropy, hidden, weight, bias, labels, torch.bfloat16)
    assert loss.item() == 0.0 and all(not g.any() for g in grads)


@pytest.mark.parametrize("be", BACKENDS)
def test_int32_labels_and_fp64_inputs(be):
    hidden, weight, bias, labels = make_inputs((2, 5), 8, 19, seed=13, bias=True)
    with chunk_rows(3), backend(be):
        got = fused_linear_cross_entropy(hidden, weight, labels.to(torch.int32), bias, softcap=5.0)
    want = fused_linear_cross_entropy_reference(hidden, weight, labels, bias, softcap=5.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_no_grad_and_inference_inputs():
    hidden, weight, bias, labels = make_inputs((7,), 8, 19, seed=14, bias=True)
    want = fused_linear_cross_entropy_reference(hidden.float(), weight.float(), labels, bias.float())
    w = weight.float().requires_grad_()
    with torch.no_grad():
        got = fused_linear_cross_entropy(hidden.float(), w, labels, bias.float())
    assert not got.requires_grad
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(fused_linear_cross_entropy(hidden.float(), weight.float(), labels, bias.float()), want)


def test_second_backward_through_the_graph_raises():
    hidden, weight, _, labels = make_inputs((5,), 8, 19, seed=15)
    loss = fused_linear_cross_entropy(hidden.float().requires_grad_(), weight.float(), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_under_autocast_matches_lm_head_under_autocast():
    """fp32 master weights under bf16 autocast (a Trainer with bf16=True): the matmuls run in bf16."""
    hidden, weight, _, labels = make_inputs((9,), 16, 23, seed=16)
    results = []
    for fn in (fused_linear_cross_entropy_reference, fused_linear_cross_entropy):
        h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, labels)
        results.append([loss.detach(), *torch.autograd.grad(loss, (h, w))])
    for ours, theirs in zip(*reversed(results)):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------------------------------- bad input


def _bad(n=4, h=8, v=11):
    hidden, weight, bias, labels = make_inputs((n,), h, v, seed=17, bias=True)
    return hidden.float(), weight.float(), labels, bias.float()


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a: dict(a, labels=torch.tensor([0, 1, 11, 2])), ValueError, r"\[2\] = 11 is outside \[0, 11\)"),
        (lambda a: dict(a, labels=torch.tensor([0, -1, 1, 2])), ValueError, r"\[1\] = -1 is outside"),
        (lambda a: dict(a, labels=a["labels"][:3]), ValueError, "labels must have hidden's leading shape"),
        (lambda a: dict(a, labels=a["labels"].float()), TypeError, "labels must be an integer tensor"),
        (lambda a: dict(a, weight=a["weight"].double()), TypeError, "weight is torch.float64 but hidden"),
        (lambda a: dict(a, bias=a["bias"].half()), TypeError, "bias is torch.float16 but hidden"),
        (lambda a: dict(a, bias=a["bias"][:5]), ValueError, r"bias must be None or shape \(V,\) = \(11,\)"),
        (lambda a: dict(a, hidden=a["hidden"][:, :5]), ValueError, "hidden must be"),
        (lambda a: dict(a, weight=a["weight"][0]), ValueError, r"weight must be \(V, H\)"),
        (lambda a: dict(a, hidden=a["hidden"].long()), TypeError, "hidden must be a floating-point"),
        (lambda a: dict(a, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda a: dict(a, reduction="sum", num_items_in_batch=3), ValueError, "num_items_in_batch replaces"),
        (lambda a: dict(a, softcap=0.0), ValueError, "softcap must be > 0"),
        (lambda a: dict(a, logit_scale=float("nan")), ValueError, "logit_scale must be a finite"),
    ],
)
def test_bad_arguments(mutate, error, match):
    hidden, weight, labels, bias = _bad()
    kwargs = mutate({"hidden": hidden, "weight": weight, "labels": labels, "bias": bias})
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(**kwargs)


def test_audit_cases_is_empty():
    """No Triton kernel of its own: cuBLAS matmuls and cross_entropy.py's row kernel (audited there)."""
    assert audit_cases() == []


@pytest.mark.parametrize("be", BACKENDS)
def test_ignored_rows_never_reach_the_head(be):
    """A multimodal sequence: 3 of 24 positions carry a label (image tokens, padding and the prompt are -100). Only
    those rows are computed (the row function sees 3 rows) and autograd keeps a 3-row dL/dh and the index, not 24
    rows; the loss and dL/dh (0 on ignored rows) equal the float64 formula."""
    hidden, weight, _, labels = make_inputs((2, 12), 16, 37, seed=11, ignore_frac=0.0)
    labels[:] = -100
    labels[0, 9], labels[0, 10], labels[1, 11] = 3, 5, 7
    seen = []

    def rows(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return real(logits, *args, **kwargs)

    real = flce._cross_entropy_rows
    h = hidden.float().requires_grad_()
    with backend(be), pytest.MonkeyPatch.context() as mp, SavedTensorMeter() as meter:
        mp.setattr(flce, "_cross_entropy_rows", rows)
        loss = fused_linear_cross_entropy(h, weight.float(), labels)
    assert seen == [3]
    assert meter.total_bytes <= 3 * 16 * 4 + 3 * 8, [(s.shape, s.dtype) for s in meter.saved]
    (grad,) = torch.autograd.grad(loss, h)
    h64 = hidden.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy((h64 @ weight.T).view(-1, 37), labels.view(-1))
    (want_grad,) = torch.autograd.grad(want, h64)
    check_fp32_relative(loss, want.detach(), "loss")
    check_fp32_relative(grad, want_grad, "dL/dh")
    assert not grad[labels == -100].any()


@pytest.mark.parametrize("be", BACKENDS)
def test_one_run_of_live_rows_is_a_view(be):
    """One causal row whose prompt and last position are ignored (live rows 3..10 of 12, one run): the live hidden
    states are a slice, not an index_select copy (a tokens x hidden transient at the long-context peak), so autograd
    keeps no index either; the loss and dL/dh equal the float64 formula."""
    hidden, weight, _, labels = make_inputs((1, 12), 16, 37, seed=13, ignore_frac=0.0)
    labels[0, :3] = -100
    labels[0, -1] = -100
    h = hidden.float().requires_grad_()
    with backend(be), SavedTensorMeter() as meter, _OpsRun() as mode:
        loss = fused_linear_cross_entropy(h, weight.float(), labels)
    assert "aten.index_select.default" not in mode.ops
    assert meter.total_bytes == 8 * 16 * 4, [(s.shape, s.dtype) for s in meter.saved]  # the live rows' dL/dh only
    (grad,) = torch.autograd.grad(loss, h)
    h64 = hidden.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy((h64 @ weight.T).view(-1, 37), labels.view(-1))
    (want_grad,) = torch.autograd.grad(want, h64)
    check_fp32_relative(loss, want.detach(), "loss")
    check_fp32_relative(grad, want_grad, "dL/dh")
    assert not grad[labels == -100].any()


class _OpsRun(TorchDispatchMode):
    """Records the name of every op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))
