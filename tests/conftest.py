"""Shared test set-up.

Triton kernels run through Triton's interpreter on CPU tensors, so the variable must be set before
triton (and fastft.kernels) is imported. Hypothesis is derandomised so CI sees the same examples as
a developer; 100 examples per property keep the whole suite near 2 minutes on 2 cores.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# bitsandbytes' CPU library links the system libgomp next to torch's own OpenMP runtime; with their default
# (active) wait policy the two thread pools spin against each other on a 2-core machine (a 4-bit step: 12 s
# instead of 0.7 s). Passive waiting removes that; it must be set before either runtime loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fastft",
    derandomize=True,
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A deeper run for a developer hunting edge cases: HYPOTHESIS_PROFILE=thorough python -m pytest tests/kernels
settings.register_profile("thorough", parent=settings.get_profile("fastft"), max_examples=200, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastft"))


@pytest.fixture(autouse=True, scope="session")
def _interpreter_rounds_bf16_like_gpus():
    """Make Triton's interpreter convert between fp32 and bf16 as GPUs do.

    A compiled ``x.to(tl.bfloat16)`` is ``cvt.rn.bf16.f32`` (round to nearest even); the interpreter (triton
    3.9, ``_convert_float``) drops the low 16 bits instead, which doubles the rounding error of every bf16
    result and would make a correct kernel look worse than PyTorch. Its bf16 -> fp32 also mangles
    subnormals (a GPU's is exact: the bits shifted left by 16). fp16 casts go through numpy and are right.
    On a Triton whose interpreter has no such hook the interpreter is used as it is.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter

        original = interpreter._convert_float
        rtne = interpreter._ir.ROUNDING_MODE.RTNE
    except (ImportError, AttributeError):
        yield
        return

    def convert(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode in (None, rtne):
            as_float = np.ascontiguousarray(values, dtype=np.float32)
            bits = as_float.view(np.uint32).astype(np.int64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return np.where(np.isnan(as_float), np.uint16(0x7FC0), rounded).reshape(np.shape(values))
        if input_dtype == tl.bfloat16 and output_dtype == tl.float32:
            widened = np.ascontiguousarray(values).view(np.uint16).astype(np.uint32) << 16
            return widened.reshape(np.shape(values))
        return original(values, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert
    yield
    interpreter._convert_float = original


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests: matmuls this small gain nothing from a second
    thread, and on a busy 2-core runner its OpenMP spin-waits cost 10-100x. No checked number depends on it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """The folder of the real SmolLM2-135M-Instruct checkpoint (see tests/smollm2.py), read-only: copy to change it."""
    from tests.smollm2 import smollm2_checkpoint_folder

    return smollm2_checkpoint_folder(tmp_path_factory)
