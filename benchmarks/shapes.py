"""Benchmark shapes and input builders: moved into the package as :mod:`fastft.bench.shapes` (the installed GPU
suite builds its inputs from them); re-exported here for the scripts in ``benchmarks/``."""

from fastft.bench.shapes import (
    CPU_LLAMA3_8B,
    CPU_SMALL_HEAD,
    DTYPE,
    GEMMA_SOFTCAP,
    GEMMA_VOCAB,
    IGNORE_INDEX,
    LLAMA3_8B,
    ModelShape,
    cross_entropy_inputs,
    default_device,
    fused_linear_cross_entropy_inputs,
    gated_mlp_inputs,
    rms_norm_inputs,
    rope_inputs,
    shape_for,
)

__all__ = [
    "CPU_LLAMA3_8B",
    "CPU_SMALL_HEAD",
    "DTYPE",
    "GEMMA_SOFTCAP",
    "GEMMA_VOCAB",
    "IGNORE_INDEX",
    "LLAMA3_8B",
    "ModelShape",
    "cross_entropy_inputs",
    "default_device",
    "fused_linear_cross_entropy_inputs",
    "gated_mlp_inputs",
    "rms_norm_inputs",
    "rope_inputs",
    "shape_for",
]
