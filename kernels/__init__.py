"""Fused Triton kernels for DiffPool coarsening, installed as ``diffpool_fast.kernels``.

One module per fused pass: kernel(s), then the launch helper. Autograd lives in the package.
"""
