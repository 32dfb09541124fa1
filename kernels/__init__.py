"""Triton kernels of sparse_engine, installed as ``sparse_engine.kernels``.

Each module holds the ``@triton.jit`` kernels of one op and launchers that check shapes,
allocate outputs and launch. Autograd and dispatch live in ``sparse_engine.ops``.
"""
