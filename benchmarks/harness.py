"""Timing and bandwidth helpers: moved into the package as :mod:`fastft.bench.harness` (the installed GPU suite
uses them); re-exported here for the scripts in ``benchmarks/``."""

from fastft.bench.harness import (
    StepTimes,
    as_tuple,
    copy_bandwidth,
    device_name,
    environment,
    make_grad_outputs,
    matmul_rate,
    synchronize,
    time_training_step,
)

__all__ = [
    "StepTimes",
    "as_tuple",
    "copy_bandwidth",
    "device_name",
    "environment",
    "make_grad_outputs",
    "matmul_rate",
    "synchronize",
    "time_training_step",
]
