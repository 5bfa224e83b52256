"""Fused Triton kernels for DiffPool coarsening, installed as ``diffpool_fast.kernels``.

One module per fused pass: kernel(s), then the launch helper and its configurations. Autograd and
the launch plan live in the package (``diffpool_fast/ops/coarsen_triton.py``).
"""
from ..config import triton_interpreting


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: the launch helpers' grid sizes. ``triton.cdiv`` and
    ``triton.next_power_of_2`` are constexpr functions in triton 3.6, whose Python calls unwrap
    their arguments: about 2 microseconds of host time each, some 30 a step."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2``."""
    return 1 << max(0, int(n) - 1).bit_length()


def register_cap(num_warps: int) -> int:
    """The ``maxnreg`` every launch passes: all registers one program's threads may hold.

    Without it ptxas picks its own, lower cap for some configurations and spills (8-24 bytes
    seen on sm_80/sm_90); with it no configuration spills (``diffpool-fast compile-check``).
    The price is fewer resident programs per SM where a kernel then uses many registers.
    """
    return min(255, 65536 // (32 * num_warps))


def _interpreter_multiplies_bf16() -> None:
    """Triton 3.6's interpreter keeps bf16 tensors as their uint16 bit patterns and its ``tl.dot``
    multiplies those bits as integers. Widen bf16 operands to fp32 first (exact: a bf16 value is
    an fp32 with 16 zero low bits), which is what the tensor cores compute. Idempotent."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_diffpool_fast_bf16", False):
        return
    plain = builder.create_dot

    def widen(h):
        if h.dtype == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return plain(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._diffpool_fast_bf16 = True
    builder.create_dot = create_dot


if triton_interpreting():
    _interpreter_multiplies_bf16()
