"""fastft's kernels: one file per operation, each with its formula, hand-derived backward and reference.

Every public function dispatches on its input: CUDA (and ROCm) tensors run the Triton kernels, CPU tensors
run a torch path with the same hand-written backward (so the memory savings hold there too), and with
``TRITON_INTERPRET=1`` the Triton kernels run on CPU tensors through Triton's interpreter.
"""

from fastft.kernels._dispatch import force_backend
from fastft.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from fastft.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from fastft.kernels.geglu import geglu, geglu_reference
from fastft.kernels.lora import LoRAProjection, lora_linear, lora_mlp, lora_qkv
from fastft.kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference
from fastft.kernels.rms_norm import rms_norm, rms_norm_reference
from fastft.kernels.rope import rope, rope_reference
from fastft.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "LoRAProjection",
    "NF4Weight",
    "cross_entropy",
    "cross_entropy_reference",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "force_backend",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "geglu",
    "geglu_reference",
    "lora_linear",
    "lora_mlp",
    "lora_qkv",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]
