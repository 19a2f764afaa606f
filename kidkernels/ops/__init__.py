"""Dispatch layer: shapes, dtypes, chunking, backend choice and the autograd functions built on the kernels."""
