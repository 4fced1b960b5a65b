"""Small utilities shared by the kernels, the tests and the benchmarks."""
