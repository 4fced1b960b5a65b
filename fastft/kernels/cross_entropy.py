"""Cross-entropy over a large vocabulary, chunked along the vocabulary with an online logsumexp.

Forward, for row i of logits x (N, V) and label y_i:

    z_i   = logit_scale * x_i                      (Cohere; Granite passes 1 / logits_scaling)
    z_i   = c * tanh(z_i / c)                      (Gemma 2 final-logit softcap c, if given)
    lse_i = log sum_v exp(z_iv)
    loss_i = lse_i - z_i[y_i]                      (0 where y_i == ignore_index)

The kernel never holds a whole row: one program per row walks the vocabulary in BLOCK chunks and keeps a
running max m and a running sum s of exp(z - m) (rescaled by exp(m_old - m_new) whenever the max grows).

Backward. With p_i = softmax(z_i) = exp(z_i - lse_i) and g_i the upstream gradient of loss_i
(g = dL/dloss for "none", dL/dtotal for "sum", dL/dtotal / denominator for "mean"):

    d loss_i / d z_iv = p_iv - [v == y_i]
    d z_iv / d x_iv   = logit_scale * (1 - tanh(logit_scale * x_iv / c)^2)   (chain rule: scale, then cap;
                                                                          without a cap the factor is 1)
    d L / d x_iv      = g_i * (p_iv - [v == y_i]) * d z_iv / d x_iv     (0 for ignored rows)

Saved for backward: the logits themselves (the caller's tensor, not a copy; never modified), the int64
labels, and two fp32 numbers per row, stats = (m, log_sum) with m the row max of z and
log_sum = log sum_v exp(z_iv - m), so lse = m + log_sum. That is the minimum for an exact gradient:
p needs z, recomputed from x in registers (cheaper than storing fp32 probabilities: 2 bytes per logit
re-read in bf16 against 4 written and 4 read), and the normaliser, so backward reads each logit once. The
normaliser is kept as the pair, not as one rounded lse (4 more bytes per row, 32 KiB at 8192 rows against
2 GiB of logits), because p = exp((z - m) - log_sum) is as accurate as a plain softmax (z - m is exact
near the max), while exp(z - fl(lse)) carries ulp(lse)/2 of relative error into every p: 2e-6 at
everyday logits of ~30, 5e-4 at logits of 1e4. The loss is (m - z[y]) + log_sum for the same reason.
The "mean" denominator is recomputed from the labels in backward (one cheap count, no host sync).

Output dtype: the loss is always computed and returned in fp32 (fp64 for fp64 logits), whatever the dtype
of the logits, because that is what transformers users get: ``ForCausalLMLoss`` upcasts the logits to fp32
before ``cross_entropy``. The gradient w.r.t. logits is written in the logits' dtype.

Labels outside [0, V) that are not ``ignore_index``: on CPU tensors the public function raises a
``ValueError`` (checking costs nothing there). On GPU a check would need a host sync, so the kernels
instead never read out of bounds (the label load is masked) and mark such rows: their loss and every
element of their gradient are NaN, which surfaces in the logged loss instead of training on garbage.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._math import tanh_sech2
from fastft.kernels._spec import AuditCase, Ptr

# Dtypes the kernels load; anything else (fp64, fp8) takes the torch path, which computes in fp32 or fp64.
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")

# Largest vocabulary chunk a program holds at once, and the warps that hold it: 4096 fp32 values over
# 8 warps is 16 per thread (two 128-bit bf16 loads), far from spilling, and 32 chunks per Llama-3 row keep
# the two block reductions per chunk (max and sum) cheap relative to the loads.
_MAX_BLOCK = 4096
# The torch path processes this many logits (rows x V) at a time, so its fp32 temporaries stay bounded
# (64 MiB per temporary) however large N is.
_TORCH_CHUNK_ELEMENTS = 1 << 24


def _launch_config(vocab: int) -> tuple[int, int]:
    """BLOCK (vocabulary chunk, a power of two) and num_warps for a row of ``vocab`` logits."""
    block = min(triton.next_power_of_2(max(vocab, 1)), _MAX_BLOCK)
    num_warps = max(1, min(8, block // 512))  # ~16 elements per thread once the row is big enough
    return block, num_warps


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    logit_scale: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain differentiable PyTorch defining :func:`cross_entropy` (test oracle and documentation).

    Computes in fp32 (fp64 for fp64 logits) like transformers' ``ForCausalLMLoss``; "mean" over zero
    non-ignored labels is 0 (not NaN).
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    losses = torch.nn.functional.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (labels != ignore_index).sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------- Triton


@triton.jit
def _transform(x, logit_scale, softcap, inv_softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(logit_scale * x) in fp32, and dz/dx (1.0 when there is neither).

    The same roundings as the torch path (z = x * scale, then tanh(z / c)): z / c is the correctly rounded
    quotient, from the reciprocal plus one fma-corrected step (three flops instead of a division), not
    z * fl(1 / c), whose second rounding (and the constant's) would sit on every logit; tanh is
    :func:`fastft.kernels._math.tanh_sech2`, within 0.67 eps of tanh, so z is almost always torch's z.
    """
    z = x.to(tl.float32)
    dz_dx = 1.0
    if HAS_SCALE:
        z = z * logit_scale
        dz_dx = logit_scale
    if HAS_SOFTCAP:
        y = z * inv_softcap
        y = tl.fma(tl.fma(-y, softcap, z), inv_softcap, y)  # z - y c is exact in one fma: y + that / c
        t, sech2 = tanh_sech2(y)
        z = softcap * t
        dz_dx = dz_dx * sech2
    return z, dz_dx


@triton.jit
def _write_grad_row(
    x_row_ptr, grad_row_ptr, V, label, row_max, log_sum, g, live,
    logit_scale, softcap, inv_softcap,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """grad[v] = g * (p[v] - [v == label]) * dz/dx[v] over the row (0 everywhere if not live), where
    p[v] = exp((z[v] - row_max) - log_sum): z - row_max is exact near the max, so p keeps the accuracy of a
    plain softmax even where a rounded lse = row_max + log_sum would not (ulp(lse) / 2 relative in every p).
    """
    cols = tl.arange(0, BLOCK)
    # Ignored rows are all zeros: skip their loads (a masked-off load moves no bytes).
    load_limit = tl.where(live, V, 0)
    for start in range(0, V, BLOCK):
        offs = start + cols
        in_row = offs < V
        x = tl.load(x_row_ptr + offs, mask=offs < load_limit, other=0.0)
        z, dz_dx = _transform(x, logit_scale, softcap, inv_softcap, HAS_SCALE, HAS_SOFTCAP)
        p = tl.exp((z - row_max) - log_sum)
        d = tl.where(offs == label, p - 1.0, p) * (g * dz_dx)
        d = tl.where(live, d, 0.0)
        tl.store(grad_row_ptr + offs, d.to(grad_row_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _cross_entropy_forward_kernel(
    logits_ptr, stride_logits, labels_ptr, loss_ptr, stats_ptr, V, ignore_index,
    logit_scale, softcap, inv_softcap,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: loss, and stats = (row max m, log sum exp(z - m)) whose sum is the lse;
    with WRITE_GRAD also d loss / d logits, written in place over the row."""
    # Promote to int64 before multiplying by the stride: N * V passes 2^31 at 8192 x 262144 (int32 overflow).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    label = tl.load(labels_ptr + row)
    live = label != ignore_index
    in_range = (label >= 0) & (label < V)
    # int32 label for the per-element compare (-1 never matches a column; out-of-range labels never read).
    label32 = tl.where(in_range, label, -1).to(tl.int32)

    # Pass 1: online logsumexp. Per chunk: one max and one sum reduction, one exp per element.
    cols = tl.arange(0, BLOCK)
    m = float("-inf")  # running max of z
    s = 0.0  # running sum of exp(z - m)
    for start in range(0, V, BLOCK):
        offs = start + cols
        in_row = offs < V
        x = tl.load(row_ptr + offs, mask=in_row, other=0.0)
        z, _ = _transform(x, logit_scale, softcap, inv_softcap, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(in_row, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every z so far is -inf, shift by 0 instead of -inf so exp never sees -inf - (-inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
    log_sum = tl.log(s)  # in [0, log V]: s >= 1 (the max contributes exp(0)) unless the row is all -inf

    # The label's logit: one scalar load, masked so an out-of-range label never reads outside the row.
    x_label = tl.load(row_ptr + tl.where(in_range, label, 0), mask=in_range & live, other=0.0)
    z_label, _ = _transform(x_label, logit_scale, softcap, inv_softcap, HAS_SCALE, HAS_SOFTCAP)
    # (m - z_label) + log_sum, not lse - z_label: no rounding of a large lse (logits ~1e4) into the loss.
    loss = tl.where(in_range, (m - z_label) + log_sum, float("nan"))
    tl.store(loss_ptr + row, tl.where(live, loss, 0.0))
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_sum)

    if WRITE_GRAD:
        # Pass 2 re-reads the row (from L2 when it is still there) and overwrites it with the gradient.
        g = tl.where(in_range, 1.0, float("nan"))
        _write_grad_row(row_ptr, row_ptr, V, label32, m, log_sum, g, live, logit_scale, softcap, inv_softcap,
                        HAS_SCALE, HAS_SOFTCAP, BLOCK)  # fmt: skip


@triton.jit
def _cross_entropy_backward_kernel(
    logits_ptr, stride_logits, grad_ptr, stride_grad, labels_ptr, stats_ptr, dloss_ptr, stride_dloss,
    V, ignore_index, logit_scale, softcap, inv_softcap,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: grad = dloss[row] * (softmax(z) - onehot) * dz/dx from the saved stats (one read)."""
    row = tl.program_id(0).to(tl.int64)  # int64 before the stride multiply (int32 overflow on big tensors)
    label = tl.load(labels_ptr + row)
    live = label != ignore_index
    in_range = (label >= 0) & (label < V)
    label32 = tl.where(in_range, label, -1).to(tl.int32)
    row_max = tl.load(stats_ptr + 2 * row)
    log_sum = tl.load(stats_ptr + 2 * row + 1)
    # stride_dloss is 0 for "sum"/"mean": every row reads the same (already divided) scalar.
    g = tl.load(dloss_ptr + row * stride_dloss).to(tl.float32)
    g = tl.where(in_range, g, float("nan"))
    _write_grad_row(logits_ptr + row * stride_logits, grad_ptr + row * stride_grad, V, label32, row_max, log_sum,
                    g, live, logit_scale, softcap, inv_softcap, HAS_SCALE, HAS_SOFTCAP, BLOCK)  # fmt: skip


def _scalars(softcap: float | None, logit_scale: float | None) -> dict[str, object]:
    return {
        "logit_scale": 1.0 if logit_scale is None else float(logit_scale),
        "softcap": 1.0 if softcap is None else float(softcap),
        "inv_softcap": 1.0 if softcap is None else 1.0 / float(softcap),
        "HAS_SCALE": logit_scale is not None,
        "HAS_SOFTCAP": softcap is not None,
    }


def _forward_triton(logits, labels, loss, stats, ignore_index, softcap, logit_scale, write_grad) -> None:
    n_rows, vocab = logits.shape
    block, num_warps = _launch_config(vocab)
    _cross_entropy_forward_kernel[(n_rows,)](
        logits, logits.stride(0), labels, loss, stats, vocab, ignore_index,
        WRITE_GRAD=write_grad, BLOCK=block, num_warps=num_warps, **_scalars(softcap, logit_scale),
    )  # fmt: skip


def _backward_triton(logits, labels, stats, dloss, grad, ignore_index, softcap, logit_scale) -> None:
    n_rows, vocab = logits.shape
    block, num_warps = _launch_config(vocab)
    stride_dloss = dloss.stride(0) if dloss.dim() == 1 else 0
    _cross_entropy_backward_kernel[(n_rows,)](
        logits, logits.stride(0), grad, grad.stride(0), labels, stats, dloss, stride_dloss, vocab, ignore_index,
        BLOCK=block, num_warps=num_warps, **_scalars(softcap, logit_scale),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- torch path


def _rows_torch(x, labels, ignore_index, softcap, logit_scale, stats=None, dloss=None, grad=None):
    """The kernels' math on a block of rows: returns (loss, stats); writes ``grad`` when given.

    ``stats`` (rows, 2) = (row max m, log sum exp(z - m)), computed unless given (backward passes the saved
    one). With ``grad``, ``dloss`` is the upstream gradient per row (or one scalar for all rows); ``grad`` may
    alias ``x`` (z is computed before it is written).
    """
    vocab = x.shape[1]
    z = x.to(torch.promote_types(x.dtype, torch.float32))
    dz_dx = None
    if logit_scale is not None:
        z = z * logit_scale
        dz_dx = logit_scale
    if softcap is not None:
        y = z / softcap
        z = softcap * torch.tanh(y)
        # 1 - tanh^2 = 1 / cosh^2, without the cancellation of 1 - t*t where |tanh| -> 1 (cosh^2 -> inf: 0).
        dz_dx = (1.0 if dz_dx is None else dz_dx) / torch.cosh(y).square()
    probs = None  # exp(z - max) / sum, kept from the statistics pass so the gradient needs no second exp
    if stats is None:
        row_max = z.amax(dim=1)
        shift = row_max.masked_fill(row_max == -math.inf, 0.0)  # an all -inf row: no -inf - (-inf)
        e = torch.sub(z, shift[:, None]).exp_()
        total = e.sum(dim=1)
        stats = torch.stack([row_max, total.log()], dim=1)
        if grad is not None:
            probs = e.div_(total[:, None])
    row_max, log_sum = stats[:, 0], stats[:, 1]
    live = labels != ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    safe = torch.where(in_range, labels, 0)[:, None]  # never index outside the row
    nan = torch.full((), math.nan, dtype=z.dtype, device=z.device)
    loss = torch.where(in_range, (row_max - z.gather(1, safe).squeeze(1)) + log_sum, nan).masked_fill(~live, 0.0)
    if grad is not None:
        d = probs if probs is not None else torch.exp((z - row_max[:, None]) - log_sum[:, None])
        d.scatter_add_(1, safe, -(live & in_range).to(d.dtype)[:, None])
        if dz_dx is not None:
            d *= dz_dx
        g = torch.where(in_range, torch.as_tensor(dloss, dtype=d.dtype, device=d.device).expand(len(labels)), nan)
        d *= g[:, None]
        grad.copy_(d.masked_fill_(~live[:, None], 0.0))
    return loss, stats


def _row_blocks(n_rows: int, vocab: int) -> list[slice]:
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(start, start + step) for start in range(0, n_rows, step)]


def _forward_torch(logits, labels, loss, stats, ignore_index, softcap, logit_scale, write_grad) -> None:
    for rows in _row_blocks(*logits.shape):
        x = logits[rows]
        loss[rows], stats[rows] = _rows_torch(x, labels[rows], ignore_index, softcap, logit_scale,
                                              dloss=1.0, grad=x if write_grad else None)  # fmt: skip


def _backward_torch(logits, labels, stats, dloss, grad, ignore_index, softcap, logit_scale) -> None:
    for rows in _row_blocks(*logits.shape):
        g = dloss[rows] if dloss.dim() == 1 else dloss
        _rows_torch(logits[rows], labels[rows], ignore_index, softcap, logit_scale, stats=stats[rows], dloss=g,
                    grad=grad[rows])  # fmt: skip


# -------------------------------------------------------------------------------------------- dispatch


def _kernel_runs(logits: torch.Tensor) -> bool:
    return use_triton(logits) and logits.dtype in _TRITON_DTYPES


def _forward_rows(logits, labels, ignore_index, softcap, logit_scale, write_grad):
    """(loss, stats) for every row; see :func:`_cross_entropy_rows`."""
    n_rows = logits.shape[0]
    acc = torch.promote_types(logits.dtype, torch.float32)
    loss = torch.empty(n_rows, dtype=acc, device=logits.device)
    stats = torch.empty(n_rows, 2, dtype=acc, device=logits.device)
    if n_rows:
        run = _forward_triton if _kernel_runs(logits) else _forward_torch
        run(logits, labels, loss, stats, ignore_index, softcap, logit_scale, write_grad)
    return loss, stats


def _cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float | None = None,
    write_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) with stride(-1) == 1 (row stride arbitrary), any float dtype; labels (N,) int64, already validated.

    Returns (loss, lse), both fp32 (N,) (fp64 for fp64 logits): loss_i = lse_i - z_i[label_i] after
    scale/softcap, 0 where label == ignore_index; lse is computed for every row, ignored ones included.
    If write_grad: overwrites `logits` IN PLACE with d loss_i / d logits_i (unscaled by any reduction; includes
    the softcap and logit_scale chain rule), in logits' dtype, rows of ignored labels set to 0.
    A label outside [0, V) that is not ignore_index is never read: its loss (and gradient row) is NaN.
    """
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"_cross_entropy_rows needs 2-D logits with stride(-1) == 1, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}; pass logits.contiguous()")  # fmt: skip
    loss, stats = _forward_rows(logits, labels, ignore_index, softcap, logit_scale, write_grad)
    return loss, stats.sum(dim=1)


def _cross_entropy_grad(logits, labels, stats, dloss, ignore_index, softcap, logit_scale) -> torch.Tensor:
    """d L / d logits in logits' dtype; ``dloss`` is fp32 (N,) per row or a 0-d scalar for every row."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.shape[0] == 0:
        return grad
    run = _backward_triton if _kernel_runs(logits) else _backward_torch
    run(logits, labels, stats, dloss, grad, ignore_index, softcap, logit_scale)
    return grad


class CrossEntropyFunction(torch.autograd.Function):
    """ctx handling only: the forward kernel gives per-row losses and stats, the backward kernel the gradient."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, softcap, logit_scale, num_items_in_batch):
        losses, stats = _forward_rows(logits, labels, ignore_index, softcap, logit_scale, write_grad=False)
        ctx.save_for_backward(logits, labels, stats)
        ctx.options = (ignore_index, reduction, softcap, logit_scale, num_items_in_batch)
        if reduction == "none":
            return losses
        total = losses.sum()
        if reduction == "sum":
            return total
        return total / _mean_denominator(labels, ignore_index, num_items_in_batch, total.device)

    @staticmethod
    def backward(ctx, grad_output):
        logits, labels, stats = ctx.saved_tensors
        ignore_index, reduction, softcap, logit_scale, num_items_in_batch = ctx.options
        dloss = grad_output.to(stats.dtype)
        if reduction == "mean":  # a 0-d device tensor: no host sync
            dloss = dloss / _mean_denominator(labels, ignore_index, num_items_in_batch, dloss.device)
        grad = _cross_entropy_grad(logits, labels, stats, dloss, ignore_index, softcap, logit_scale)
        return grad, None, None, None, None, None, None


def _mean_denominator(labels, ignore_index, num_items_in_batch, device):
    """The divisor of reduction="mean" (shared with fused_linear_cross_entropy): a device tensor or an int."""
    if num_items_in_batch is None:
        # Zero non-ignored labels: sum 0 over 1, so "mean" is 0 with a zero gradient instead of NaN.
        return (labels != ignore_index).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):  # as transformers' fixed_cross_entropy does
        return num_items_in_batch.to(device)
    return num_items_in_batch


def _check_loss_options(
    caller: str, reduction: str, num_items_in_batch: object, softcap: float | None, logit_scale: float | None
) -> None:
    """The argument checks shared by :func:`cross_entropy` and ``fused_linear_cross_entropy``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{caller}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"{caller}: num_items_in_batch replaces the denominator of reduction='mean', but "
                         f"reduction={reduction!r}; drop num_items_in_batch or use reduction='mean'")  # fmt: skip
    for name, value, positive, hint in (
        ("softcap", softcap, True, "Gemma 2 uses 30.0"),
        ("logit_scale", logit_scale, False, "Cohere's logit_scale, or 1 / logits_scaling for Granite"),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{caller}: {name} must be a finite float or None ({hint}), got {value!r}")
        if positive and value <= 0:
            raise ValueError(f"{caller}: {name} must be > 0 ({hint}), got {value!r}")


def _checked_labels(
    caller: str, labels: torch.Tensor, vocab: int, ignore_index: int, device: torch.device
) -> torch.Tensor:
    """Labels flattened, as contiguous int64 on ``device`` (as transformers moves them), range-checked on CPU.

    On CPU the check is free; on GPU it would cost a host sync, so there the row kernel instead never reads
    an out-of-range label's logit and gives that row a NaN loss.
    """
    labels = labels.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
    if labels.device.type == "cpu":
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bad.any():
            where = int(bad.nonzero()[0, 0])
            raise ValueError(f"{caller}: labels (flattened) [{where}] = {int(labels[where])} is outside [0, {vocab}) "
                             f"and is not ignore_index={ignore_index}; fix the labels or mark them with ignore_index")  # fmt: skip
    return labels


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    logit_scale: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of (N, V) logits against (N,) integer labels, chunked over the vocabulary (V up to 262,144).

    Computes z = softcap * tanh(logit_scale * logits / softcap) (each step only if given; Granite passes
    ``logit_scale = 1 / logits_scaling``) and loss_i = logsumexp(z_i) - z_i[label_i], 0 where
    label == ``ignore_index``. The loss is fp32 for every logits dtype (fp64 for fp64), matching transformers'
    ``ForCausalLMLoss``, which upcasts logits to fp32; the gradient is in the logits' dtype. ``reduction``:
    "none" (N,), "sum", or "mean" = sum / number of non-ignored labels, which is 0 (with a zero gradient)
    when every label is ignored, where torch returns NaN. ``num_items_in_batch`` (an int or a tensor, as
    transformers passes for gradient accumulation) replaces that denominator exactly as transformers'
    ``fixed_cross_entropy`` does (only with "mean"). Labels outside [0, V) raise a ``ValueError`` for CPU
    labels; on GPU (no host sync) such rows are never read and get a NaN loss and gradient. Backward keeps
    the logits (not copied, not modified), the labels and two fp32 numbers per row (max and log-sum-exp).
    """
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, V), got shape {tuple(logits.shape)}; "
                         "flatten with logits.view(-1, logits.shape[-1]) and labels.view(-1)")  # fmt: skip
    n_rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits has an empty vocabulary dimension (V == 0); cross-entropy needs V >= 1")
    if not torch.is_tensor(labels) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must be an integer tensor of class indices, got {getattr(labels, 'dtype', labels)}")
    if labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor of class indices, got torch.bool")
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},) to match logits {tuple(logits.shape)}, got "
                         f"{tuple(labels.shape)}; flatten with labels.view(-1)")  # fmt: skip
    _check_loss_options("cross_entropy", reduction, num_items_in_batch, softcap, logit_scale)
    labels = _checked_labels("cross_entropy", labels, vocab, ignore_index, logits.device)
    if vocab > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()  # rows may be strided, the vocabulary may not (128-bit loads)
    return CrossEntropyFunction.apply(logits, labels, ignore_index, reduction, softcap, logit_scale, num_items_in_batch)


# ------------------------------------------------------------------------------------------------ audit


def audit_cases() -> list[AuditCase]:
    """Forward (+ in-place grad, as fused linear cross-entropy launches it) and backward at Llama-3 / Gemma."""
    n_rows, cases = 8192, []
    for name, vocab, softcap in (("llama3", 128256, None), ("gemma", 262144, 30.0)):
        block, num_warps = _launch_config(vocab)
        consts = {"HAS_SCALE": False, "HAS_SOFTCAP": softcap is not None, "BLOCK": block}
        scalars = {"logit_scale": 1.0, "softcap": softcap or 1.0, "inv_softcap": 1.0 / (softcap or 1.0)}
        shape = f"N={n_rows} V={vocab} bf16 softcap={softcap}"
        logits_bytes, row_bytes = n_rows * vocab * 2, n_rows * 8  # bf16 logits; int64 label per row
        forward = dict(logits_ptr=Ptr("bf16"), stride_logits=vocab, labels_ptr=Ptr("i64"), loss_ptr=Ptr("fp32"),
                       stats_ptr=Ptr("fp32"), V=vocab, ignore_index=-100, **scalars)  # fmt: skip
        for write_grad in (False, True):
            cases.append(AuditCase(
                name=f"cross_entropy_forward{'_grad' if write_grad else ''}_{name}",
                kernel=_cross_entropy_forward_kernel, args={**forward, **consts, "WRITE_GRAD": write_grad},
                constexprs={**consts, "WRITE_GRAD": write_grad}, num_warps=num_warps, shape=shape,
                # read logits once + labels, write loss and stats (12 bytes/row); with the grad, also write
                # the row once (the kernel re-reads it in pass 2, from L2 when lucky: the model counts one read).
                min_bytes=logits_bytes * (2 if write_grad else 1) + row_bytes + n_rows * 12,
            ))  # fmt: skip
        backward = dict(logits_ptr=Ptr("bf16"), stride_logits=vocab, grad_ptr=Ptr("bf16"), stride_grad=vocab,
                        labels_ptr=Ptr("i64"), stats_ptr=Ptr("fp32"), dloss_ptr=Ptr("fp32"), stride_dloss=0,
                        V=vocab, ignore_index=-100, **scalars)  # fmt: skip
        cases.append(AuditCase(
            name=f"cross_entropy_backward_{name}", kernel=_cross_entropy_backward_kernel,
            args={**backward, **consts}, constexprs=consts, num_warps=num_warps, shape=shape,
            # read logits, labels, stats (and one scalar upstream gradient, "mean"), write the gradient
            min_bytes=2 * logits_bytes + row_bytes + n_rows * 8 + 4,
        ))  # fmt: skip
    return cases
