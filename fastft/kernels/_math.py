"""Elementwise math for Triton kernels, built only from ``tl.exp``, division and polynomials.

Triton's interpreter (how the kernels are tested on CPU) has no libdevice, so the logistic sigmoid and
the normal CDF are written out here. Both are stable for any finite input: every ``tl.exp`` gets a
non-positive argument, so nothing overflows and no ``inf / inf`` or ``0 * inf`` appears.
The tanh that GELU's tanh approximation needs is not built at all: ``0.5 * (1 + tanh(u)) = sigmoid(2u)``;
Gemma 2's logit softcap ``c * tanh(z / c)`` does need tanh itself (and its derivative): :func:`tanh_sech2`.

Accuracy, in fp32 arithmetic (checked against float64 in ``tests/kernels/test_geglu.py``):

- :func:`sigmoid_pair`: both ``sigmoid(x)`` and ``1 - sigmoid(x)`` to a few ulp *relative*, so neither
  loses digits to cancellation when the other is close to 1.
- :func:`erf`: absolute error below 1.2e-7 (two fp32 ulp near 1) on the whole real line.
- :func:`normal_cdf_pdf`: Phi(x) to the same absolute error, and in the lower tail, where it is computed
  as ``erfc/2`` rather than as ``(1 + erf)/2``, to ~3e-8 * x^2 relative (5e-6 at Phi(-12) ~ 2e-33);
  phi(x) from the same ``exp``. (``torch.special.ndtr`` has no relative accuracy there at all.)
- :func:`tanh_sech2` (checked in ``tests/kernels/test_cross_entropy.py``): tanh(y) within 0.67 * eps * |tanh y|
  and 1 - tanh(y)^2 within 1.9 * eps relative (eps = 2^-23; a correctly rounded result is within 0.5), 97%
  of tanh values correctly rounded; the previous degree-4 / switch-at-0.55 version reached 1.8 and 3.0.
  The residual error is ``tl.exp``'s own (numpy's fp32 exp under the interpreter is off by up to 1.6 eps
  relative), damped by 1 / sinh(2|y|) in tanh and passed on whole to 1 - tanh^2 ~ 4 exp(-2|y|) in the tail.

The polynomial coefficients below were fitted for this file (Lawson-reweighted least squares towards the
minimax error, against erf and erfcx evaluated in 40-digit arithmetic with mpmath), rounding the
coefficients to fp32 one at a time and refitting the rest, so the fp32 constants are the fitted ones.
The tanh polynomial was fitted the same way (to (tanh(y) - y) / y^3 on y^2 in [0, 0.81], weighted so the
error is relative to tanh(y)); its fit error is below 0.01 eps relative.

``tl.fma`` is used where a single rounding (or an exactly representable remainder) is what makes a
compensation step work; it rounds once in the interpreter too, and GPUs would contract most of these anyway.
"""

import triton
import triton.language as tl


@triton.jit
def sigmoid_pair(x):
    """Return ``(sigmoid(x), 1 - sigmoid(x))`` for fp32 ``x``, each accurate to a few ulp relative.

    With ``e = exp(-|x|)`` in (0, 1] and ``r = 1 / (1 + e)``: for x >= 0, sigmoid = r and 1 - sigmoid =
    e * r; for x < 0 the two swap. No subtraction, so both halves keep full relative precision.
    """
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    er = e * r
    positive = x >= 0.0
    return tl.where(positive, r, er), tl.where(positive, er, r)


@triton.jit
def _erf_small(z):
    """erf(z) for |z| <= 0.875: z + z * S(z^2), S of degree 6 fitted to erf(z)/z - 1 (error < 1 ulp).

    Writing the leading term 2/sqrt(pi) = 1 + 0.128... keeps the rounding of that coefficient off z.
    """
    w = z * z
    s = 8.408823e-05
    s = s * w - 0.000814752
    s = s * w + 0.0052009644
    s = s * w - 0.026859095
    s = s * w + 0.11283682
    s = s * w - 0.37612632
    s = s * w + 0.12837917
    return z + z * s


@triton.jit
def _erfc_large(z, exp_neg_z2):
    """erfc(z) for z >= 0.875 (and any larger z, +inf included): exp(-z^2) * t * Q(t), t = 1 / (1 + z/2).

    ``t * Q(t)`` approximates erfcx(z) = exp(z^2) erfc(z), smooth on t in (0, 0.7] (t -> 0 as z -> inf,
    where erfcx ~ 1 / (z sqrt(pi)) = t Q(0) + ...); Q of degree 8, relative error < 6e-8. The caller
    passes ``exp(-z^2)`` so that phi(x) can reuse it. For large z, exp(-z^2) underflows to 0 and so does
    the result, as it should (erfc(9.2) is below the smallest fp32 denormal).
    """
    t = 1.0 / (1.0 + 0.5 * z)
    q = 0.013697313
    q = q * t + 0.0537103
    q = q * t - 0.18031497
    q = q * t + 0.056230407
    q = q * t + 0.06804509
    q = q * t + 0.17847794
    q = q * t + 0.24668743
    q = q * t + 0.28209847
    q = q * t + 0.28209478
    return exp_neg_z2 * (t * q)


@triton.jit
def erf(x):
    """The error function of fp32 ``x``: absolute error < 1.2e-7 everywhere; rounds to exactly +-1 for |x| >= 4."""
    z = tl.abs(x)
    small = _erf_small(tl.minimum(z, 0.875))  # clamped: the unused lanes' polynomial stays finite
    large = 1.0 - _erfc_large(z, tl.exp(-(z * z)))
    magnitude = tl.where(z <= 0.875, small, large)
    return tl.where(x < 0.0, -magnitude, magnitude)


@triton.jit
def normal_cdf_pdf(x):
    """Return ``(Phi(x), phi(x))``: the standard normal CDF and density of fp32 ``x``, one ``exp`` for both.

    Phi(x) = (1 + erf(x / sqrt 2)) / 2 near 0, and erfc(|x| / sqrt 2) / 2 (or 1 minus it) in the tails,
    which keeps the lower tail accurate in relative terms. phi(x) = exp(-x^2 / 2) / sqrt(2 pi), and
    x^2 / 2 = z^2 with z = |x| / sqrt 2 is the same exponent erfc needs.
    """
    z = tl.abs(x) * 0.70710678  # 1 / sqrt(2)
    # exp(-x^2 / 2) from x itself (halving is exact): one rounding in the exponent instead of three, which
    # is what limits the relative accuracy of the far tail (error ~ x^2 / 2 * 2^-24).
    exp_neg_z2 = tl.exp(-0.5 * (x * x))
    signed_erf_small = _erf_small(tl.minimum(z, 0.875))  # clamped: the unused lanes' polynomial stays finite
    signed_erf_small = tl.where(x < 0.0, -signed_erf_small, signed_erf_small)
    half_erfc = 0.5 * _erfc_large(z, exp_neg_z2)
    tail = tl.where(x < 0.0, half_erfc, 1.0 - half_erfc)
    cdf = tl.where(z <= 0.875, 0.5 + 0.5 * signed_erf_small, tail)
    pdf = exp_neg_z2 * 0.3989422804014327  # 1 / sqrt(2 pi)
    return cdf, pdf


@triton.jit
def tanh_sech2(y):
    """Return ``(tanh(y), 1 - tanh(y)^2)`` for fp32 ``y``, within ~0.67 and ~1.9 eps relative (eps = 2^-23).

    |y| < 0.9: tanh y = y + y^3 P(y^2), P of degree 6 (fitted for this file), added to y in one fma (the
    y^3 P term is at most 26% of tanh there, so its few roundings barely show). Its rounding error
    t_lo is recovered exactly (y - t is exact: t and y are within a factor 2) and 1 - t^2 is formed as
    fma(-t, t, 1) - 2 t t_lo, so the cancellation in 1 - t^2 does not amplify the rounding of t.
    |y| >= 0.9: with e = exp(-2|y|) <= 0.17 (never overflows), q = 1 - tanh|y| = 2e / (1 + e) and
    1 - tanh^2 = q (2 - q), which keeps full relative precision where tanh^2 -> 1. Each rounding on the way
    to q is recovered (the error of 1 + e by Fast2Sum, the division's remainder by fma), so q carries only
    exp's own error, and tanh = 1 - q is rounded once, with exp's error damped by q / tanh <= 0.4.
    The switch at 0.9 balances the two: below it the polynomial would need more terms, above it less of
    exp's error would be damped. +-inf give +-1 and 0; a NaN stays NaN.
    """
    a = tl.abs(y)
    # Near 0: tanh(y) = y + y^3 * P(y^2).
    w = y * y
    p = -0.0004557178763207048
    p = tl.fma(p, w, 0.0025834408588707447)
    p = tl.fma(p, w, -0.008265464566648006)
    p = tl.fma(p, w, 0.021664094179868698)
    p = tl.fma(p, w, -0.05392947420477867)
    p = tl.fma(p, w, 0.13332980871200562)
    p = tl.fma(p, w, -0.33333322405815125)
    y3 = y * w
    small = tl.fma(y3, p, y)
    small_lo = tl.fma(y3, p, y - small)  # (y + y^3 P) - small: what rounding ``small`` dropped
    sech2_small = tl.fma(-2.0 * small, small_lo, tl.fma(-small, small, 1.0))
    # Away from 0: tanh|y| = 1 - q, q = 2e / (1 + e), e = exp(-2|y|) in (0, 0.17].
    e = tl.exp(-2.0 * a)
    d = 1.0 + e
    d_lo = e - (d - 1.0)  # exact rounding error of 1 + e (Fast2Sum: 1 >= e)
    r = 1.0 / d
    two_e = 2.0 * e
    q = two_e * r
    # 2e / (d + d_lo) - q, to first order: the remainder 2e - q d is exact in one fma.
    q_lo = tl.fma(-q, d_lo, tl.fma(-q, d, two_e)) * r
    big_hi = 1.0 - q
    big = big_hi + (((1.0 - big_hi) - q) - q_lo)  # 1 - big_hi is exact (Sterbenz), and so is its gap to q
    two_minus_q = 2.0 - q
    sech2_big = tl.fma(q, two_minus_q, q_lo * (two_minus_q - q))  # (q + q_lo)(2 - q - q_lo), first order
    near_zero = a < 0.9
    t = tl.where(near_zero, small, tl.where(y < 0.0, -big, big))
    return t, tl.where(near_zero, sech2_small, sech2_big)
