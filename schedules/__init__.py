"""Kernels for the compiled graph: sparse-window attention, int8/int4 matmul, per target."""
