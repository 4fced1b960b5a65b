"""Log-prob head: per-token log-probabilities (and entropy) of ``hidden @ W.T``, never creating the (N, V) logits.

This is what RL and preference trainers (DPO, KTO, GRPO, RLOO, PPO, ORPO, CPO) need from a causal LM instead
of a loss: for hidden states h (N, H), the head weight W (V, H), an optional bias b (V,) and labels y (N,)::

    x_i   = h_i @ W.T (+ b)                        model dtype, fp32 accumulation (transformers' lm_head)
    z_i   = softcap(logit_scale * x_i) / T         fp32; softcap(u) = c * tanh(u / c); T the temperature
    lse_i = log sum_v exp(z_iv),  p_i = softmax(z_i)
    log_probs_i = z_i[y_i] - lse_i
    entropy_i   = -sum_v p_iv log p_iv                              (when asked)
    log_sum_sq_probs_i = log sum_v p_iv^2,  mean_logits_i = mean_v z_iv,  is_top1_i = argmax_v z_iv == y_i
                                                                    (``stats=True``; no gradient)

Every output is 0 (False) where y_i == ignore_index, with a zero gradient. The kernel works per row with a
running max m: with w_v = m - z_v >= 0 and s = sum_v exp(-w_v), lse = m + log s and
entropy = log s + sum_v p_v w_v, a sum of two non-negative terms (no cancellation, unlike lse - sum p z).

Backward (hand derived). With g_i the upstream gradient of log_probs_i and e_i that of entropy_i::

    d log_probs_i / d z_iv = [v == y_i] - p_iv
    d entropy_i   / d z_iv = -p_iv (z_iv - sum_u p_iu z_iu) = p_iv (w_iv - Wbar_i),  Wbar_i = sum_u p_iu w_iu
    d z_iv / d x_iv        = (logit_scale / T) * (1 - tanh(logit_scale * x_iv / c)^2)     (1 / T without cap)
    G_iv = (g_i ([v == y_i] - p_iv) + e_i p_iv (w_iv - Wbar_i)) * d z_iv / d x_iv
    dL/dh = G @ W,   dL/dW = G.T @ h,   dL/db = sum_i G_i                  (chunk by chunk, like the forward)

Rows are processed in chunks of C tokens (the chunk rule of :mod:`fastft.kernels.fused_linear_cross_entropy`
with its fixed 256 MiB logits budget only, TRL's own tile size: Llama-3 at bf16 gets 1024-row chunks, so the
(V, H) weight is re-read once per 1024 tokens and each GEMM stays compute-bound):
per chunk the (C, V) logits come from one torch matmul (cuBLAS), the row kernel below (Triton, or its torch
path) turns them into the outputs and, when asked, overwrites them IN PLACE with G, and the gradient products
are formed while G is there. Only one chunk of logits exists at any time.

Which gradients are formed when (g and e are unknown in the forward: each row's G is linear in them):

- Frozen head (W, b need no gradient; the LoRA and reference cases): the forward also computes
  A = G(g=1, e=0) @ W, the (N, H) gradient of every log-prob, and saves only A; backward scales its rows by g
  in place. Two GEMMs per chunk in all, against three for recomputing (TRL's ``_ChunkedLogProbFunction``
  recomputes the logits in backward), at the same memory (A is the size of h, which it does not keep).
  Entropy's gradient, rarely used (GRPO's entropy bonus), comes from a second, lazy node that keeps h and
  recomputes its chunks only if a gradient actually reaches the entropy; if none does, the node and h are
  freed with the entropy tensor, before backward starts.
- Trainable W or b: the forward keeps h, W, b and the labels (no copies) and backward recomputes each
  chunk's logits and G with both g and e: dL/dW accumulates in an fp32 (V, H) buffer, rounded once.
- Without grad (reference passes under ``torch.no_grad``): outputs only, nothing kept.

Ignored positions are skipped, not computed: when some labels are ``ignore_index`` the live rows are gathered
first (one (N_live, H) copy and, on GPU, one host sync for their count), so prompts and padding cost no GEMM.

Precision: the logits are rounded to the model dtype exactly as lm_head rounds them; everything after is
fp32 (fp64 for fp64 inputs), and outputs are fp32 (as TRL's ``selective_log_softmax`` upcasts). A is written
in the model dtype and scaled by g in backward (one more rounding than a fused fp32 accumulation).
Backward scales A in place, so backward may run once per forward (a second one raises RuntimeError).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase, Ptr
from fastft.kernels.cross_entropy import _checked_labels, _transform
from fastft.kernels.fused_linear_cross_entropy import (
    _bias_grad_buffer,
    _checked_head_inputs,
    _chunk_gradients,
    _chunk_rows,
    _logit_chunks,
    _weight_grad_buffer,
)

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK = 4096  # vocabulary chunk per program (see cross_entropy.py: 16 fp32 values per thread at 8 warps)
_TORCH_CHUNK_ELEMENTS = 1 << 24  # the torch path's fp32 temporaries stay at 64 MiB each


@dataclass
class LogProbs:
    """Per-token outputs of :func:`linear_log_probs`, each of the labels' shape (fp32; ``is_top1`` bool).

    ``entropy`` is None unless asked for; ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` are None
    unless ``stats=True`` and carry no gradient.
    """

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    softcap: float | None
    logit_scale: float | None
    temperature: float
    entropy: bool
    stats: bool


# ------------------------------------------------------------------------------------------------ reference


def linear_log_probs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    ignore_index: int = -100,
    entropy: bool = False,
    stats: bool = False,
) -> LogProbs:
    """Plain differentiable PyTorch defining :func:`linear_log_probs` (the test oracle; holds the (N, V) logits).

    The logits are ``F.linear`` in the inputs' dtype, then upcast to fp32 (float64 stays float64) as TRL's
    ``selective_log_softmax`` does, scaled, capped and divided by the temperature.
    """
    x = F.linear(hidden, weight, bias)
    z = x.to(torch.promote_types(x.dtype, torch.float32))
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    live = labels != ignore_index
    safe = torch.where(live, labels, 0).to(torch.int64)
    logp = torch.log_softmax(z, dim=-1)
    log_probs = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(~live, 0.0)
    out = LogProbs(log_probs)
    if entropy:
        out.entropy = -(logp.exp() * logp).sum(-1).masked_fill(~live, 0.0)
    if stats:
        with torch.no_grad():
            out.log_sum_sq_probs = torch.logsumexp(2 * logp, dim=-1).masked_fill(~live, 0.0)
            out.mean_logits = z.mean(-1).masked_fill(~live, 0.0)
            out.is_top1 = (z.argmax(-1) == safe) & live
    return out


# ----------------------------------------------------------------------------------------------- Triton


@triton.jit
def _logprob_rows_kernel(
    x_ptr, stride_x, labels_ptr, V, ignore_index,
    logp_ptr, ent_ptr, sumsq_ptr, mean_ptr, top1_ptr, glogp_ptr, gent_ptr,
    logit_scale, softcap, inv_softcap, temperature,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr, WANT_STATS: tl.constexpr,
    GRAD_LOGP: tl.constexpr, GRAD_ENT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: the outputs, and with GRAD_LOGP/GRAD_ENT the row of G written over the logits.

    GRAD_LOGP is 0 (no log-prob term), 1 (g = 1: the forward's A) or 2 (g read from glogp_ptr); GRAD_ENT
    reads e from gent_ptr. Pass 1 is an online reduction over the row: running max m, s = sum exp(z - m),
    t = sum exp(z - m) (m - z) (entropy), q = sum exp(2 (z - m)) and the first index of the max (stats),
    each rescaled when m grows. Pass 2 (gradient only) re-reads the row and overwrites it with G.
    """
    # Promote to int64 before multiplying by the stride: N * V passes 2^31 at 8192 x 262144 (int32 overflow).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * stride_x
    label = tl.load(labels_ptr + row)
    live = label != ignore_index
    in_range = (label >= 0) & (label < V)
    label32 = tl.where(in_range, label, -1).to(tl.int32)
    NEED_T: tl.constexpr = WANT_ENTROPY or GRAD_ENT

    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    t = 0.0
    q = 0.0
    z_sum = 0.0
    arg = V  # first column holding the max
    for start in range(0, V, BLOCK):
        offs = start + cols
        in_row = offs < V
        x = tl.load(row_ptr + offs, mask=in_row, other=0.0)
        z, _ = _transform(x, logit_scale, softcap, inv_softcap, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(in_row, z / temperature, float("-inf"))
        block_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, block_max)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        if NEED_T:
            # sum e_old (m_new - z) = sum e_old (m_old - z) + (m_new - m_old) sum e_old, then rescale
            w = tl.where(in_row, shift - z, 0.0)
            t = alpha * (t + s * (shift - tl.where(m == float("-inf"), shift, m))) + tl.sum(e * w, axis=0)
        if WANT_STATS:
            q = q * alpha * alpha + tl.sum(e * e, axis=0)
            z_sum += tl.sum(tl.where(in_row, z, 0.0), axis=0)
            block_arg = tl.min(tl.where(z == block_max, offs, V), axis=0)
            arg = tl.where(block_max > m, block_arg, arg)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    log_sum = tl.log(s)

    x_label = tl.load(row_ptr + tl.where(in_range, label, 0), mask=in_range & live, other=0.0)
    z_label, _ = _transform(x_label, logit_scale, softcap, inv_softcap, HAS_SCALE, HAS_SOFTCAP)
    z_label = z_label / temperature
    # (z_label - m) - log_sum, not z_label - lse: no rounding of a large lse into the result.
    logp = tl.where(in_range, (z_label - m) - log_sum, float("nan"))
    tl.store(logp_ptr + row, tl.where(live, logp, 0.0))
    w_bar = t / s  # sum_v p_v (m - z_v)
    if WANT_ENTROPY:
        tl.store(ent_ptr + row, tl.where(live, log_sum + w_bar, 0.0))
    if WANT_STATS:
        tl.store(sumsq_ptr + row, tl.where(live, tl.log(q) - 2.0 * log_sum, 0.0))
        tl.store(mean_ptr + row, tl.where(live, z_sum / V, 0.0))
        tl.store(top1_ptr + row, live & (arg == label32))

    if GRAD_LOGP or GRAD_ENT:
        g = 0.0
        if GRAD_LOGP == 1:
            g = 1.0
        if GRAD_LOGP == 2:
            g = tl.load(glogp_ptr + row).to(tl.float32)
        e_up = 0.0
        if GRAD_ENT:
            e_up = tl.load(gent_ptr + row).to(tl.float32)
        g = tl.where(in_range, g, float("nan"))
        load_limit = tl.where(live, V, 0)  # ignored rows are all zeros: skip their loads
        for start in range(0, V, BLOCK):
            offs = start + cols
            in_row = offs < V
            x = tl.load(row_ptr + offs, mask=offs < load_limit, other=0.0)
            z, dz_dx = _transform(x, logit_scale, softcap, inv_softcap, HAS_SCALE, HAS_SOFTCAP)
            w = m - z / temperature
            p = tl.exp(-w - log_sum)
            d = g * (tl.where(offs == label32, 1.0, 0.0) - p)
            if GRAD_ENT:
                d += e_up * p * (w - w_bar)
            d = tl.where(live, d * (dz_dx / temperature), 0.0)
            tl.store(row_ptr + offs, d.to(x_ptr.dtype.element_ty), mask=in_row)


def _launch_config(vocab: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(vocab, 1)), _MAX_BLOCK)
    return block, max(1, min(8, block // 512))


def _rows_triton(x, labels, opts: _Options, out, g_logp, g_ent) -> None:
    n_rows, vocab = x.shape
    block, num_warps = _launch_config(vocab)
    logp, ent, sumsq, mean, top1 = out
    dummy = logp
    _logprob_rows_kernel[(n_rows,)](
        x, x.stride(0), labels, vocab, opts.ignore_index,
        logp, ent if ent is not None else dummy, sumsq if sumsq is not None else dummy,
        mean if mean is not None else dummy, top1 if top1 is not None else dummy,
        g_logp if torch.is_tensor(g_logp) else dummy, g_ent if g_ent is not None else dummy,
        1.0 if opts.logit_scale is None else opts.logit_scale, 1.0 if opts.softcap is None else opts.softcap,
        1.0 if opts.softcap is None else 1.0 / opts.softcap, opts.temperature,
        HAS_SCALE=opts.logit_scale is not None, HAS_SOFTCAP=opts.softcap is not None,
        WANT_ENTROPY=ent is not None, WANT_STATS=top1 is not None,
        GRAD_LOGP=0 if g_logp is None else (2 if torch.is_tensor(g_logp) else 1), GRAD_ENT=g_ent is not None,
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- torch path


def _rows_torch(x, labels, opts: _Options, out, g_logp, g_ent) -> None:
    """The kernel's math on a block of rows (torch ops, fp32 or fp64), writing ``out`` and G over ``x``."""
    vocab = x.shape[1]
    z = x.to(torch.promote_types(x.dtype, torch.float32))
    dz_dx = 1.0 / opts.temperature
    if opts.logit_scale is not None:
        z = z * opts.logit_scale
        dz_dx = dz_dx * opts.logit_scale
    if opts.softcap is not None:
        y = z / opts.softcap
        z = opts.softcap * torch.tanh(y)
        dz_dx = dz_dx / torch.cosh(y).square()  # 1 - tanh^2 without cancellation
    z = z / opts.temperature
    live = labels != opts.ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    safe = torch.where(in_range, labels, 0)[:, None]
    m = z.amax(dim=1, keepdim=True)
    w = m - z  # >= 0
    e = torch.exp(-w)
    s = e.sum(dim=1, keepdim=True)
    log_sum = s.log()
    p = e / s
    nan = torch.full((), math.nan, dtype=z.dtype, device=z.device)
    logp_out, ent_out, sumsq_out, mean_out, top1_out = out
    logp = torch.where(in_range, -w.gather(1, safe).squeeze(1) - log_sum.squeeze(1), nan)
    logp_out.copy_(logp.masked_fill(~live, 0.0))
    w_bar = (p * w).sum(dim=1, keepdim=True)
    if ent_out is not None:
        ent_out.copy_((log_sum + w_bar).squeeze(1).masked_fill(~live, 0.0))
    if top1_out is not None:
        sumsq_out.copy_((torch.log((e * e).sum(dim=1)) - 2 * log_sum.squeeze(1)).masked_fill(~live, 0.0))
        mean_out.copy_((z.sum(dim=1) / vocab).masked_fill(~live, 0.0))
        top1_out.copy_((z.argmax(dim=1) == labels) & live)
    if g_logp is None and g_ent is None:
        return
    d = torch.zeros_like(z)
    if g_logp is not None:
        g = torch.as_tensor(g_logp, dtype=z.dtype, device=z.device).expand(len(labels))
        g = torch.where(in_range, g, nan)[:, None]
        d = (-p).scatter_add(1, safe, in_range.to(z.dtype)[:, None]) * g
    if g_ent is not None:
        d = d + g_ent.to(z.dtype)[:, None] * p * (w - w_bar)
    x.copy_((d * dz_dx).masked_fill_(~live[:, None], 0.0))


def _rows(x, labels, opts: _Options, out, g_logp=None, g_ent=None) -> None:
    """Dispatch one chunk of rows to the Triton kernel or the torch path (in blocks bounding its temporaries)."""
    if not len(labels):
        return
    if use_triton(x) and x.dtype in _TRITON_DTYPES:
        _rows_triton(x, labels, opts, out, g_logp, g_ent)
        return
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(x.shape[1], 1))
    for start in range(0, len(labels), step):
        rows = slice(start, start + step)
        part = [None if o is None else o[rows] for o in out]
        _rows_torch(x[rows], labels[rows], opts, part,
                    g_logp[rows] if torch.is_tensor(g_logp) else g_logp,
                    None if g_ent is None else g_ent[rows])  # fmt: skip


# ------------------------------------------------------------------------------------------ chunked pass


def _new_outputs(n_rows: int, dtype: torch.dtype, device: torch.device, opts: _Options) -> list:
    def vec(kind=dtype):
        return torch.empty(n_rows, dtype=kind, device=device)

    return [vec(), vec() if opts.entropy else None, vec() if opts.stats else None, vec() if opts.stats else None,
            vec(torch.bool) if opts.stats else None]  # fmt: skip


def _chunked_pass(h, weight, bias, labels, opts: _Options, *, grad_h=None, grad_w=None, grad_b=None,
                  g_logp=None, g_ent=None, outputs=True) -> list:  # fmt: skip
    """One sweep over token chunks: the outputs, and the gradient products of G(g_logp, g_ent) when asked."""
    n_rows, vocab = h.shape[0], weight.shape[0]
    acc = torch.promote_types(h.dtype, torch.float32)
    want = opts if outputs else dataclasses.replace(opts, entropy=False, stats=False)
    out = _new_outputs(n_rows, acc, h.device, want)
    grads = grad_h is not None or grad_w is not None or grad_b is not None
    rows = _chunk_rows(n_rows, vocab, h.element_size(), grad_w is not None, None)
    for start, stop, h_chunk, logits in _logit_chunks(h, weight, bias, rows):
        part = [None if o is None else o[start:stop] for o in out]
        # The outputs; with gradients asked for, the logits become G (module docstring) in place.
        _rows(logits, labels[start:stop], want, part,
              g_logp[start:stop] if torch.is_tensor(g_logp) else (g_logp if grads else None),
              None if g_ent is None or not grads else g_ent[start:stop])  # fmt: skip
        if grads:
            _chunk_gradients(logits, weight, h_chunk, grad_h, grad_w, grad_b, start)
    return out


# ------------------------------------------------------------------------------------------ autograd


class _FrozenHeadLogProbs(torch.autograd.Function):
    """W and b frozen: the forward forms A = G(g=1) @ W and keeps only A; backward scales its rows by g."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, opts, need_h):
        ctx.set_materialize_grads(False)
        ctx.consumed = False
        grad_h = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else None
        out = _chunked_pass(h, weight, bias, labels, opts, grad_h=grad_h, g_logp=1.0 if need_h else None)
        ctx.save_for_backward(grad_h)
        ctx.mark_non_differentiable(*(o for o in out[1:] if o is not None))
        return tuple(out)

    @staticmethod
    def backward(ctx, g_logp, *_):
        if ctx.consumed:
            raise RuntimeError(
                "linear_log_probs: backward ran twice through the same graph (retain_graph=True?). The log-prob "
                "gradient is formed in the forward and scaled in place in backward; call linear_log_probs again "
                "for a second backward."
            )
        ctx.consumed = True
        (grad_h,) = ctx.saved_tensors
        if grad_h is None or g_logp is None:
            return None, None, None, None, None, None
        return grad_h.mul_(g_logp[:, None]), None, None, None, None, None


class _LazyEntropyGrad(torch.autograd.Function):
    """The entropy, passed through; its gradient (frozen head) recomputes the chunks only if one arrives."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, entropy, opts):
        ctx.opts = opts
        ctx.save_for_backward(h, weight, bias, labels)
        return entropy.clone()

    @staticmethod
    def backward(ctx, g_ent):
        h, weight, bias, labels = ctx.saved_tensors
        grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
        with torch.autocast(h.device.type, enabled=False):
            _chunked_pass(h, weight, bias, labels, ctx.opts, grad_h=grad_h, g_ent=g_ent.contiguous(), outputs=False)
        return grad_h, None, None, None, None, None


class _RecomputedLogProbs(torch.autograd.Function):
    """W or b trainable: keep the inputs, recompute every chunk in backward with both upstream gradients."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, opts):
        ctx.set_materialize_grads(False)
        ctx.opts = opts
        out = _chunked_pass(h, weight, bias, labels, opts)
        ctx.save_for_backward(h, weight, bias, labels)
        ctx.mark_non_differentiable(*(o for o in out[2:] if o is not None))
        return tuple(out)

    @staticmethod
    def backward(ctx, g_logp, g_ent, *_):
        h, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        grad_h = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else None
        grad_w = _weight_grad_buffer(weight) if need_w else None
        grad_b = _bias_grad_buffer(weight) if need_b else None
        with torch.autocast(h.device.type, enabled=False):
            _chunked_pass(h, weight, bias, labels, ctx.opts, grad_h=grad_h, grad_w=grad_w, grad_b=grad_b,
                          g_logp=None if g_logp is None else g_logp.contiguous(),
                          g_ent=None if g_ent is None else g_ent.contiguous(), outputs=False)  # fmt: skip
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None)  # fmt: skip


# ------------------------------------------------------------------------------------------ public function


def _check_options(temperature, softcap, logit_scale) -> None:
    caller = "linear_log_probs"
    for name, value, hint in (("temperature", temperature, "1.0 is the model's own distribution"),
                              ("softcap", softcap, "Gemma 2 uses 30.0"),
                              ("logit_scale", logit_scale, "Cohere's logit_scale, or 1 / logits_scaling")):  # fmt: skip
        if value is None and name != "temperature":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{caller}: {name} must be a finite number ({hint}), got {value!r}")
        if name != "logit_scale" and value <= 0:
            raise ValueError(f"{caller}: {name} must be > 0 ({hint}), got {value!r}")


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    ignore_index: int = -100,
    entropy: bool = False,
    stats: bool = False,
) -> LogProbs:
    """Per-token log-probabilities of ``labels`` under ``softmax(softcap(logit_scale * (hidden @ weight.T + bias))
    / temperature)``, never creating the (N, V) logits (see the module docstring for the math and memory).

    ``hidden`` is (..., H), ``labels`` has its leading shape and is already shifted (this function does not
    shift); positions whose label is ``ignore_index`` are skipped and get 0. ``entropy=True`` adds the
    differentiable per-token entropy; ``stats=True`` adds ``log_sum_sq_probs``, ``mean_logits`` and
    ``is_top1`` (no gradient). Gradients flow to hidden, weight and bias as each requires; a frozen weight
    allocates nothing (V, H)-sized. Under ``torch.autocast`` the matmuls run in the autocast dtype, as
    ``lm_head`` would. Labels outside [0, V) raise a ``ValueError`` on CPU; on GPU their log-prob is NaN.
    """
    hidden, weight, bias = _checked_head_inputs("linear_log_probs", hidden, weight, labels, bias)
    _check_options(temperature, softcap, logit_scale)
    vocab, n_embd = weight.shape
    opts = _Options(int(ignore_index), None if softcap is None else float(softcap),
                    None if logit_scale is None else float(logit_scale), float(temperature), bool(entropy),
                    bool(stats))  # fmt: skip
    flat = _checked_labels("linear_log_probs", labels, vocab, opts.ignore_index, hidden.device)
    h = hidden.reshape(-1, n_embd)
    live = flat != opts.ignore_index
    keep = None
    if not bool(live.all()):  # gather the live rows: ignored positions cost no GEMM (one host sync on GPU)
        keep = live.nonzero().squeeze(1)
        h, flat = h.index_select(0, keep), flat.index_select(0, keep)

    grad_on = torch.is_grad_enabled()
    need_h = grad_on and h.requires_grad
    need_wb = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    with torch.autocast(h.device.type, enabled=False):
        if need_wb:
            out = list(_RecomputedLogProbs.apply(h, weight, bias, flat, opts))
        elif need_h or len(flat) == 0:
            out = list(_FrozenHeadLogProbs.apply(h, weight, bias, flat, opts, need_h))
            if need_h and opts.entropy:
                out[1] = _LazyEntropyGrad.apply(h, weight, bias, flat, out[1], opts)
        else:
            with torch.no_grad():
                out = _chunked_pass(h, weight, bias, flat, opts)

    def place(t):
        if t is None:
            return None
        if keep is not None:
            t = t.new_zeros(live.shape).index_put((keep,), t)  # differentiable scatter back; zeros elsewhere
        return t.view(labels.shape)

    return LogProbs(*(place(t) for t in out))


# ------------------------------------------------------------------------------------------------ audit


def audit_cases() -> list[AuditCase]:
    """The row kernel at Llama-3's vocabulary: outputs only, the forward's A pass, and the recompute pass."""
    n_rows, vocab = 8192, 128256
    block, num_warps = _launch_config(vocab)
    shape = f"N={n_rows} V={vocab} bf16"
    logits_bytes = n_rows * vocab * 2
    args = {"x_ptr": Ptr("bf16"), "stride_x": vocab, "labels_ptr": Ptr("i64"), "V": vocab, "ignore_index": -100,
                "logp_ptr": Ptr("fp32"), "ent_ptr": Ptr("fp32"), "sumsq_ptr": Ptr("fp32"), "mean_ptr": Ptr("fp32"),
                "top1_ptr": Ptr("i1"), "glogp_ptr": Ptr("fp32"), "gent_ptr": Ptr("fp32"), "logit_scale": 1.0, "softcap": 1.0,
                "inv_softcap": 1.0, "temperature": 0.7}  # fmt: skip
    cases = []
    for name, entropy, stats, grad_logp, grad_ent in (
        ("outputs", True, True, 0, False),
        ("forward_grad", True, False, 1, False),
        ("backward_grad", False, False, 2, True),
    ):
        consts = {"HAS_SCALE": False, "HAS_SOFTCAP": False, "WANT_ENTROPY": entropy, "WANT_STATS": stats,
                  "GRAD_LOGP": grad_logp, "GRAD_ENT": grad_ent, "BLOCK": block}  # fmt: skip
        writes = logits_bytes if (grad_logp or grad_ent) else 0
        cases.append(AuditCase(
            name=f"logprob_rows_{name}", kernel=_logprob_rows_kernel, args={**args, **consts}, constexprs=consts,
            num_warps=num_warps, shape=shape,
            # read the logits once (+ labels), write the per-row outputs, and the gradient row when asked
            min_bytes=logits_bytes + writes + n_rows * (8 + 4 * (1 + entropy + 2 * stats) + stats),
        ))  # fmt: skip
    return cases
