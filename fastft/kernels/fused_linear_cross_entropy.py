"""Fused linear + cross-entropy: the language-model loss without ever creating the (N, V) logits.

Forward, for hidden states h (N, H) (leading dims flattened), the head weight W (V, H), an optional bias b
(V,) and labels y (N,)::

    x_i    = h_i @ W.T (+ b)                    in the model dtype, fp32 accumulation (transformers' lm_head)
    z_i    = softcap(logit_scale * x_i)         then exactly :func:`fastft.kernels.cross_entropy.cross_entropy`:
    loss_i = logsumexp(z_i) - z_i[y_i]          in fp32, 0 where y_i == ignore_index
    L      = sum_i loss_i / D                   D = 1 ("sum"), max(#non-ignored, 1) ("mean"), or the
                                                caller's num_items_in_batch ("mean" with it); "none": loss_i

With reduction "mean" or "sum", rows whose label is ``ignore_index`` are dropped before anything is computed
(``index_select`` of the live rows, or a slice when they are one run, e.g. a single causal row; autograd keeps
the index and scatters dL/dh back): in a multimodal sequence the
image tokens, padding and prompt never reach the head. The rows are processed in chunks of C tokens. Per chunk the (C, V) logits are computed with a torch matmul
(cuBLAS), the cross-entropy row function of ``cross_entropy.py`` (Triton, or its torch path) turns them into
per-row losses and overwrites them IN PLACE with ``G = d loss_i / d x_i`` (softcap and scale chain rule
included), and the gradients are formed from G while it is still there. Only one chunk of logits ever
exists.

Backward (hand derived). With G the (N, V) matrix of row gradients (never materialised: one chunk at a
time) and g the upstream gradient (a scalar for "sum"/"mean", one value per row for "none")::

    dL/dh = (g / D) * G @ W              (C, V) @ (V, H) per chunk, written into its rows of grad_hidden
    dL/dW = (g / D) * G.T @ h            accumulated over chunks (only if W requires grad)
    dL/db = (g / D) * G.sum(0)           accumulated over chunks (only if b requires grad)

For "sum" and "mean", g is one scalar, so the three products are computed in the forward, divided by D
there, and backward only multiplies them by g (in place; exact when g == 1, as for ``loss.backward()``).
For "none", g is per row and unknown in the forward. ``dL/dh`` still factors (row i is g_i times a row that
the forward can compute), so when only h needs a gradient (frozen head, the LoRA case) the forward computes
``G @ W`` and backward scales its rows. ``dL/dW = G.T @ diag(g) @ h`` does not factor that way, so when W
(or b) needs a gradient the forward computes only the losses, and backward recomputes each chunk's logits
and G, scales G's rows by g, and forms all three products: one extra (C, V, H) matmul per chunk, no (N, V)
tensor.

Precision. The logits and G are rounded to the model dtype exactly where transformers rounds them (lm_head
output; the gradient entering lm_head's backward), so the loss equals ``ForCausalLMLoss(lm_head(h))`` up to
fp32 summation order. ``dL/dW`` accumulates across chunks in an **fp32** buffer, rounded to W's dtype once
at the end after the division by D: accumulating in bf16 (as Liger's default does) adds one rounding per
chunk, and in fp16 the undivided sum over thousands of tokens can overflow. On CUDA the accumulation is one
``addmm`` with bf16/fp16 operands and an fp32 output (``out_dtype``, cuBLAS fp32 accumulate, the buffer read
and written in the GEMM epilogue; probed once per device, torch >= 2.8). Elsewhere (CPU, older torch) the
chunk's operands are upcast to fp32: the same products, exact, slower, and (C, V)-sized temporaries only.
The cost is a 4*V*H-byte buffer instead of 2*V*H while the forward runs; a frozen W allocates nothing
(V, H)-sized at all. ``dL/dh`` is written in the model dtype per chunk and then divided by D (one extra
rounding, covered by the 2x error budget); ``dL/db`` accumulates in fp32.

Chunk size. ``C = max(min_rows, min(LOGITS_CHUNK_BYTES // (V * itemsize), ceil(N * H / V)))`` rows, rounded
down to a multiple of 64 (whole GEMM tiles), then balanced (``ceil(N / ceil(N / C))`` rounded up to a multiple
of 64, so no small tail chunk). Two budgets bound the (C, V) logits chunk: a fixed 256 MiB (Llama-3: 1024
rows of bf16 logits; Gemma's 262144 vocabulary: 512 rows), and the size of the hidden states themselves
(``C * V <= N * H``: the loss never holds more logits than the activations it reads, so a short batch is
still split and no (N, V) logits tensor ever exists beyond ``min_rows`` tokens; Llama-3-8B at 8192 tokens:
256-row chunks). Neither may go below ``min_rows``: 256 rows keep the weight read amortised (a GEMM with
M = C reads all of W for 2*C*V*H FLOPs: C >= ~200 is compute-bound on an H200), 1024 when W's gradient is
accumulated (the fp32 buffer's read+write of 8*V*H bytes per chunk must stay below the 2*C*V*H-FLOP GEMM it
rides on). Tests lower these module constants to force many chunks.

Saved for backward ("sum"/"mean"): the finished gradients only: grad_hidden (N*H in h's dtype) when h
requires grad, grad_weight (V*H in W's dtype) when W does, grad_bias (V) when b does. Nothing else, and
nothing at all without grad. "none" with only h requiring grad: the unscaled grad_hidden (N*H). "none" with
W or b requiring grad: h, W, b (the inputs, no copies) and the int64 labels (8*N bytes). Compare plain
transformers: autograd keeps the fp32 log-probabilities (4*N*V bytes), besides the 2*N*V bytes of bf16 logits
it returns (Llama-3-8B at 8192 tokens: 4.2 GB + 2.1 GB).

Backward scales the saved gradients in place, so backward may run once per forward: backward through the
same graph twice (``retain_graph=True``) raises a RuntimeError instead of returning doubly scaled gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.kernels._spec import AuditCase
from fastft.kernels.cross_entropy import (
    _check_loss_options,
    _checked_labels,
    _cross_entropy_rows,
    _mean_denominator,
    cross_entropy_reference,
)

# Chunking (see the module docstring). Module constants so that tests can lower them to force many chunks.
LOGITS_CHUNK_BYTES = 256 * 2**20  # the (C, V) logits chunk in the model dtype stays within this ...
MIN_CHUNK_ROWS = 256  # ... unless that is fewer rows than this (GEMM efficiency: W read once per chunk),
MIN_CHUNK_ROWS_WEIGHT_GRAD = 1024  # or than this when the fp32 (V, H) gradient buffer is read+written per chunk.
_ROW_ALIGN = 64  # chunk rows are a multiple of this (whole GEMM tiles) once they are that many


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    logit_scale: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain differentiable PyTorch defining :func:`fused_linear_cross_entropy` (test oracle, documentation).

    The logits are ``F.linear`` in the inputs' dtype, upcast to fp32 (float64 stays float64) as transformers'
    ``ForCausalLMLoss`` does; then logit_scale, softcap, ``F.cross_entropy`` and the reduction. It holds the
    full (N, V) logits: use it for checking, not training.
    """
    logits = F.linear(hidden, weight, bias).reshape(-1, weight.shape[0])
    flat_labels = labels.reshape(-1).to(logits.device)
    loss = cross_entropy_reference(
        logits, flat_labels, ignore_index, reduction, softcap, logit_scale, num_items_in_batch
    )  # upcasts to fp32 itself
    return loss.view(labels.shape) if reduction == "none" else loss


# ------------------------------------------------------------------------------------------ chunked pass


def _chunk_rows(n_rows: int, vocab: int, itemsize: int, weight_grad: bool, hidden: int | None) -> int:
    """Rows per chunk: the logits budgets, floored for GEMM efficiency, then balanced over the chunks.

    ``hidden=None`` drops the activation-sized budget and keeps only ``LOGITS_CHUNK_BYTES``.
    """
    floor = MIN_CHUNK_ROWS_WEIGHT_GRAD if weight_grad else MIN_CHUNK_ROWS
    vocab = max(vocab, 1)
    budget = LOGITS_CHUNK_BYTES // (vocab * itemsize)
    if hidden is not None:
        budget = min(budget, -(-n_rows * hidden // vocab))
    rows = max(1, floor, budget)
    align = _ROW_ALIGN if rows >= _ROW_ALIGN else 1
    rows -= rows % align
    if n_rows <= rows:
        return max(n_rows, 1)
    n_chunks = -(-n_rows // rows)
    balanced = -(-n_rows // n_chunks)  # near-equal chunks: no small tail GEMM
    return min(rows, -(-balanced // align) * align)


_MIXED_ADDMM_WORKS: dict[torch.device, bool] = {}


def _mixed_addmm_works(device: torch.device) -> bool:
    """Whether ``torch.addmm(fp32, bf16, bf16, out_dtype=fp32, out=fp32)`` runs and is right on ``device``.

    cuBLAS supports it from torch 2.8, but early versions required ``self`` in the operands' dtype; one tiny
    probe per device (one host sync, the first time only) decides instead of a version table.
    """
    if device.type != "cuda":
        return False
    if device not in _MIXED_ADDMM_WORKS:
        try:
            a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16, device=device)
            acc = torch.full((2, 2), 0.5, dtype=torch.float32, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            expected = torch.tensor([[7.5, 10.5], [15.5, 22.5]], device=device)
            _MIXED_ADDMM_WORKS[device] = bool(torch.equal(acc, expected))
        except (TypeError, RuntimeError):
            _MIXED_ADDMM_WORKS[device] = False
    return _MIXED_ADDMM_WORKS[device]


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """acc (V, H) += grad_logits.T (V, C) @ h (C, H), with fp32 accumulation and no (V, H) temporary."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), h)
    elif _mixed_addmm_works(acc.device):
        torch.addmm(acc, grad_logits.t(), h, out_dtype=acc.dtype, out=acc)
    else:  # exact products of bf16/fp16 values in fp32; the temporaries are chunk-sized
        acc.addmm_(grad_logits.t().to(acc.dtype), h.to(acc.dtype))


def _chunked_loss_and_grads(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    options: tuple,
    grad_hidden: torch.Tensor | None = None,
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One sweep over token chunks; returns the per-row losses (fp32) and accumulates the requested gradients.

    ``grad_hidden`` (N, H) gets ``G @ W`` written into its rows; ``grad_weight`` (V, H, fp32 or W's dtype)
    and ``grad_bias`` (V, fp32) are accumulated into. ``row_scale`` (N,) multiplies G's rows first ("none").
    """
    ignore_index, softcap, logit_scale = options
    n_rows, vocab = h.shape[0], weight.shape[0]
    acc_dtype = torch.promote_types(h.dtype, torch.float32)
    losses = torch.empty(n_rows, dtype=acc_dtype, device=h.device)
    write_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
    rows = _chunk_rows(n_rows, vocab, h.element_size(), grad_weight is not None, h.shape[1])
    for start, stop, h_chunk, logits in _logit_chunks(h, weight, bias, rows):
        # Loss per row; with write_grad the logits become G = d loss_i / d x_i in place (no second buffer).
        losses[start:stop] = _cross_entropy_rows(
            logits,
            labels[start:stop],
            ignore_index=ignore_index,
            softcap=softcap,
            logit_scale=logit_scale,
            write_grad=write_grad,
        )[0]
        if not write_grad:
            continue
        if row_scale is not None:
            logits.mul_(row_scale[start:stop, None])  # fp32 product, one rounding to the model dtype
        _chunk_gradients(logits, weight, h_chunk, grad_hidden, grad_weight, grad_bias, start)
    return losses


def _logit_chunks(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
    """Yield ``(start, stop, h_chunk, logits)`` per chunk of ``rows`` tokens: the chunk's lm_head logits, written
    into one (C, V) buffer reused by every chunk (the last uses its first rows): a single allocation."""
    n_rows, vocab = h.shape[0], weight.shape[0]
    buffer = torch.empty(min(rows, n_rows), vocab, dtype=h.dtype, device=h.device)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        h_chunk, logits = h[start:stop], buffer[: stop - start]
        # The lm_head matmul, as F.linear runs it: cuBLAS, fp32 accumulation, output in the model dtype.
        if bias is None:
            torch.mm(h_chunk, weight.t(), out=logits)
        else:
            torch.addmm(bias, h_chunk, weight.t(), out=logits)
        yield start, stop, h_chunk, logits


def _chunk_gradients(grad_logits, weight, h_chunk, grad_hidden, grad_weight, grad_bias, start: int) -> None:
    """A chunk's share of the head's gradients from its logits' gradient G (C, V): ``G @ W`` into rows ``start:``
    of grad_hidden, ``G.T @ h`` and ``G.sum(0)`` accumulated into grad_weight and grad_bias (each if given)."""
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden[start : start + grad_logits.shape[0]])
    if grad_weight is not None:
        _accumulate_weight_grad(grad_weight, grad_logits, h_chunk)
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0, dtype=grad_bias.dtype))


def _weight_grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """The (V, H) accumulator of dL/dW: fp32 (float64 for float64 weights)."""
    return torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)


def _bias_grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    return torch.zeros(weight.shape[0], dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)


# ------------------------------------------------------------------------------------------ autograd


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: chunked loss; saves finished gradients ("sum"/"mean") or what "none" recomputes from."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index, reduction, softcap, logit_scale, num_items, grad_on):
        need_h, need_w, need_b = (grad_on and need for need in ctx.needs_input_grad[:3])
        options = (ignore_index, softcap, logit_scale)
        ctx.reduction, ctx.options, ctx.consumed = reduction, options, False
        ctx.needs = (need_h, need_w, need_b)
        with torch.autocast(h.device.type, enabled=False):  # the matmuls run in the dtype we were given
            if reduction == "none" and (need_w or need_b):
                # dW needs the per-row upstream gradient: recompute the chunks in backward (module docstring).
                ctx.save_for_backward(h, weight, bias, labels)
                return _chunked_loss_and_grads(h, weight, bias, labels, options)
            grad_h = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else None
            grad_w = _weight_grad_buffer(weight) if need_w else None
            grad_b = _bias_grad_buffer(weight) if need_b else None
            losses = _chunked_loss_and_grads(h, weight, bias, labels, options, grad_h, grad_w, grad_b)
            if reduction == "none":  # only grad_h: its rows are scaled by the upstream gradient in backward
                ctx.save_for_backward(grad_h)
                return losses
            loss = losses.sum()
            if reduction == "mean":
                denominator = _mean_denominator(labels, ignore_index, num_items, loss.device)
                loss = loss / denominator
                # Divide here, before the fp32 buffers are rounded to the model dtype (no fp16 overflow).
                for grad in (grad_h, grad_w, grad_b):
                    if grad is not None:
                        grad.div_(denominator)
            if grad_w is not None:
                grad_w = grad_w.to(weight.dtype)  # the fp32 buffer is freed here
            if grad_b is not None:
                grad_b = grad_b.to(bias.dtype)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice through the same graph (retain_graph=True?). Its "
                "gradients are computed in the forward and scaled in place in backward, so a second backward "
                "would be wrong; call fused_linear_cross_entropy again for a second backward."
            )
        ctx.consumed = True
        need_h, need_w, need_b = ctx.needs
        with torch.autocast(grad_output.device.type, enabled=False):
            if ctx.reduction == "none" and (need_w or need_b):
                h, weight, bias, labels = ctx.saved_tensors
                grad_h = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else None
                grad_w = _weight_grad_buffer(weight) if need_w else None
                grad_b = _bias_grad_buffer(weight) if need_b else None
                row_scale = grad_output.reshape(-1).to(torch.promote_types(h.dtype, torch.float32))
                _chunked_loss_and_grads(h, weight, bias, labels, ctx.options, grad_h, grad_w, grad_b, row_scale)
                grad_w = grad_w.to(weight.dtype) if need_w else None
                grad_b = grad_b.to(bias.dtype) if need_b else None
            elif ctx.reduction == "none":
                (grad_h,) = ctx.saved_tensors
                grad_h = grad_h.mul_(grad_output.reshape(-1, 1)) if need_h else None
                grad_w = grad_b = None
            else:  # one scalar: in place, exact when it is 1
                grad_h, grad_w, grad_b = (g.mul_(grad_output) if g is not None else None for g in ctx.saved_tensors)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------ public function


def _checked_head_inputs(caller: str, hidden, weight, labels, bias):
    """The checks shared by the head functions (this one and ``linear_log_probs``): floating hidden (..., H) and
    weight (V, H), bias (V,) or None, integer labels of hidden's leading shape, one dtype and one device. Under
    ``torch.autocast`` the three are cast to the autocast dtype first, as lm_head (F.linear) would run; the casts
    are autograd ops, so fp32 master weights get their gradient back in fp32. Returns (hidden, weight, bias)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise TypeError(
                f"{caller}: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}"
            )
    if weight.dim() != 2:
        raise ValueError(f"{caller}: weight must be (V, H), got shape {tuple(weight.shape)}")
    vocab, n_embd = weight.shape
    if vocab == 0:
        raise ValueError(f"{caller}: weight has V == 0 rows; the head needs a vocabulary")
    if hidden.dim() == 0 or hidden.shape[-1] != n_embd:
        raise ValueError(
            f"{caller}: hidden must be (..., H) with H = weight.shape[1] = {n_embd}, got shape {tuple(hidden.shape)}"
        )
    if bias is not None and (not torch.is_tensor(bias) or tuple(bias.shape) != (vocab,)):
        raise ValueError(
            f"{caller}: bias must be None or shape (V,) = ({vocab},), got "
            f"{tuple(bias.shape) if torch.is_tensor(bias) else type(bias).__name__}"
        )
    tensors = (("weight", weight),) + ((("bias", bias),) if bias is not None else ())
    if torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        tensors = ()
    for name, t in tensors:
        if t.dtype != hidden.dtype:
            raise TypeError(
                f"{caller}: {name} is {t.dtype} but hidden is {hidden.dtype}; the head matmul "
                f"runs in one dtype: cast one of them (e.g. hidden.to({name}.dtype)) or run under torch.autocast"
            )
        if t.device != hidden.device:
            raise ValueError(
                f"{caller}: {name} is on {t.device} but hidden is on {hidden.device}; move them to one device"
            )
    if not torch.is_tensor(labels) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(
            f"{caller}: labels must be an integer tensor of token ids, got "
            f"{getattr(labels, 'dtype', type(labels).__name__)}"
        )
    if labels.dtype == torch.bool:
        raise TypeError(f"{caller}: labels must be an integer tensor of token ids, got torch.bool")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{caller}: labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
            f"{tuple(labels.shape)} (labels are taken already shifted: shift them before the call)"
        )
    return hidden, weight, bias


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    logit_scale: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, never creating the (N, V) logits.

    ``hidden`` is (..., H) (any strides), ``labels`` has hidden's leading shape (already shifted for causal
    LM: this function does not shift), ``weight`` is the (V, H) head and ``bias`` an optional (V,). The
    semantics are :func:`fastft.kernels.cross_entropy.cross_entropy` on the lm_head logits: ``logit_scale``
    then ``softcap``, ``ignore_index``, reduction "mean" (0 with a zero gradient when every label is ignored),
    "sum" or "none" (fp32, labels' shape), and ``num_items_in_batch`` as transformers' gradient accumulation
    passes it (the denominator of "mean"). Tokens are processed in chunks whose logits fit
    ``LOGITS_CHUNK_BYTES``; gradients for hidden, weight and bias are formed during the forward, each only if
    that tensor requires grad (a frozen weight allocates no (V, H) buffer), and autograd keeps only them.
    Labels outside [0, V) raise a ``ValueError`` on CPU; on GPU (no host sync) their loss is NaN.
    """
    hidden, weight, bias = _checked_head_inputs("fused_linear_cross_entropy", hidden, weight, labels, bias)
    vocab, n_embd = weight.shape
    _check_loss_options("fused_linear_cross_entropy", reduction, num_items_in_batch, softcap, logit_scale)
    flat_labels = _checked_labels("fused_linear_cross_entropy", labels, vocab, ignore_index, hidden.device)
    h = hidden.reshape(-1, n_embd)  # a view when it can be; the matmuls take any strides
    if reduction != "none":
        # Ignored positions (a multimodal sequence's image tokens, padding, the prompt) cost no GEMM: the live rows
        # are gathered first (one host sync on GPU); autograd keeps only their index, and scatters dL/dh back.
        live = flat_labels != ignore_index
        if bool(live.any()) and not bool(live.all()):
            keep = live.nonzero().squeeze(1)
            first, last = int(keep[0]), int(keep[-1])
            if last - first + 1 == keep.numel():  # one run of live rows (one causal row: all but the last): a view,
                h, flat_labels = h[first : last + 1], flat_labels[first : last + 1]  # no copy of the hidden states
            else:
                h, flat_labels = h.index_select(0, keep), flat_labels.index_select(0, keep)
    loss = FusedLinearCrossEntropyFunction.apply(
        h,
        weight,
        bias,
        flat_labels,
        int(ignore_index),
        reduction,
        None if softcap is None else float(softcap),
        None if logit_scale is None else float(logit_scale),
        num_items_in_batch,
        torch.is_grad_enabled(),
    )
    return loss.view(labels.shape) if reduction == "none" else loss


# ------------------------------------------------------------------------------------------------ audit


def audit_cases() -> list[AuditCase]:
    """None: this module launches no Triton kernel of its own.

    Its matmuls are cuBLAS and the per-row cross-entropy kernel belongs to ``cross_entropy.py`` (audited
    there). Bytes model of one chunk of C tokens (s = itemsize of the model dtype, trainable W, "mean"):

    - logits GEMM: read C*H*s + V*H*s (+ V*s bias), write C*V*s
    - CE row kernel (in place): read C*V*s, write C*V*s, plus 16*C (labels, loss, lse)
    - grad_hidden GEMM: read C*V*s + V*H*s, write C*H*s
    - grad_weight GEMM into the fp32 buffer: read C*V*s + C*H*s, read and write 8*V*H
    - grad_bias: read C*V*s

    Total ~ 5*C*V*s + 2*V*H*s + 8*V*H + 3*C*H*s bytes for 6*C*V*H FLOPs; a frozen W drops the grad_weight
    GEMM and its 8*V*H. Llama-3-8B (V=128256, H=4096, C=1024, bf16): ~7.6 GB and 3.2 TFLOP per chunk,
    compute-bound on an H200.
    """
    return []
