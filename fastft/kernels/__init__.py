"""fastft's kernels: one file per operation, each with its formula, hand-derived backward and reference.

Every public function dispatches on its input: CUDA (and ROCm) tensors run the Triton kernels, CPU tensors
run a torch path with the same hand-written backward (so the memory savings hold there too), and with
``TRITON_INTERPRET=1`` the Triton kernels run on CPU tensors through Triton's interpreter.
"""

from fastft.kernels._dispatch import force_backend
from fastft.kernels.activation import XIELU, activation, activation_reference
from fastft.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from fastft.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from fastft.kernels.geglu import geglu, geglu_reference
from fastft.kernels.layer_norm import layer_norm, layer_norm_reference
from fastft.kernels.lora import LoRAProjection, lora_linear, lora_mlp, lora_qkv
from fastft.kernels.lora_ungated_mlp import lora_ungated_mlp
from fastft.kernels.moe_experts import MoELoRA, moe_experts, moe_experts_reference, peft_factors
from fastft.kernels.mrope import mrope_tables, mrope_tables_reference
from fastft.kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference
from fastft.kernels.rms_norm import rms_norm, rms_norm_reference
from fastft.kernels.rms_norm_gated import rms_norm_gated, rms_norm_gated_reference
from fastft.kernels.rope import rope, rope_reference
from fastft.kernels.rope_interleaved import rope_interleaved, rope_interleaved_reference
from fastft.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "XIELU",
    "LoRAProjection",
    "MoELoRA",
    "NF4Weight",
    "activation",
    "activation_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "force_backend",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "geglu",
    "geglu_reference",
    "layer_norm",
    "layer_norm_reference",
    "lora_linear",
    "lora_mlp",
    "lora_qkv",
    "lora_ungated_mlp",
    "moe_experts",
    "moe_experts_reference",
    "mrope_tables",
    "mrope_tables_reference",
    "peft_factors",
    "rms_norm",
    "rms_norm_gated",
    "rms_norm_gated_reference",
    "rms_norm_reference",
    "rope",
    "rope_interleaved",
    "rope_interleaved_reference",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]
