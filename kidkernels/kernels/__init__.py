"""Triton kernels: pure device code, no torch logic.

Every kernel here reads and writes raw pointers with explicit strides; shapes, dtypes, chunking and the choice of
backend live one layer up, in :mod:`kidkernels.ops`.  Importing this package requires ``triton``.
"""
