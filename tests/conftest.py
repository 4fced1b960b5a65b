"""Shared test set-up.

Triton kernels run through Triton's interpreter on CPU tensors, so the variable must be set before
triton (and fastft.kernels) is imported. Hypothesis is derandomised so CI sees the same examples as
a developer; the example counts keep the interpreted kernels within the suite's time budget.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "fastft",
    derandomize=True,
    deadline=None,
    max_examples=12,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastft"))
