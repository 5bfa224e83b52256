"""Fused Triton kernels for DiffPool coarsening, installed as ``diffpool_fast.kernels``.

One module per fused pass: kernel(s), then the launch helper. Autograd lives in the package.
"""


def register_cap(num_warps: int) -> int:
    """The ``maxnreg`` every launch passes: all registers one program's threads may hold.

    Without it ptxas picks its own, lower cap for some configurations and spills (8-24 bytes
    seen on sm_80/sm_90); with it no configuration spills (``diffpool-fast compile-check``).
    The price is fewer resident programs per SM where a kernel then uses many registers.
    """
    return min(255, 65536 // (32 * num_warps))
