"""fp32-grade products on bf16 tensor cores (in exact arithmetic of the parts), and the exact
exp/log of the row passes.

**Split products.** An fp32 value x is the sum of bf16 parts taken greedily::

    x0 = bf16(x),  x1 = bf16(x - x0),  x2 = bf16(x - x0 - x1)

Each subtraction is exact in fp32 (Sterbenz), so x0 + x1 + x2 carries about 24 significant bits
(3 parts; about 16 with 2). A bf16 x bf16 product is exact in fp32 and the tensor cores
accumulate in fp32, so

    a b  ~  sum of a_i b_j over i + j < PARTS          (PARTS = 3: 6 products; 2: 3 products)

is an fp32-grade product (PARTS = 3) or a ~16-bit one (PARTS = 2), with every dot a bf16 wgmma
on Hopper. The dropped terms are below 2^-24 |a||b| (PARTS = 3). An operand that is exact in bf16
(a 0/1 or small-integer adjacency, a bf16 tensor) needs no parts of its own: a_0 b_0 + a_0 b_1
(+ a_0 b_2), 2 or 3 products. Smaller terms are accumulated first.

Why bf16 parts and not Triton's ``tf32x3``: bf16 wgmma takes MN-major operands from shared
memory (tf32 wgmma wants K-major ones), runs at twice the tf32 rate, and - the reason that
decides it on a machine without a GPU - the interpreter (TRITON_INTERPRET=1) multiplies bf16
parts exactly as the tensor cores do, so the tests measure the accuracy the GPU gets, where it
computes any fp32 ``tl.dot`` exactly whatever its ``input_precision``.

Measured on an H200 (bench/notes/gpu_2026-12-04.md): the tensor cores' fp32 accumulation of a
chained product is not IEEE, so out and out_adj came out at about 3e-6 relative error, 8x PyG's
fp32, where the interpreter's exact accumulation gives 1e-7. Promoting the accumulator every K
step (a fresh accumulator per step, added with fp32 adds) is the likely remedy, not yet tried.

Non-finite values: inf - inf is NaN, so an infinite entry makes its products NaN (not inf); a
NaN stays NaN. Either way the output is not finite, as the README promises.

**Precise exp and log.** ``tl.exp``/``tl.log`` lower to the approximate ``ex2``/``lg2`` of the
GPU with a scaling whose rounding grows with |x| (about 1e-6 relative at the logit gaps of a
near-converged softmax); PyTorch uses the correctly rounded-ish ``expf``/``logf``. The row passes
use libdevice's on the GPU. Triton's interpreter has no libdevice (and NumPy's exp and log are
already exact to an ulp), so there the plain ones are used.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..config import triton_interpreting

#: parts per fp32 operand by torch.get_float32_matmul_precision(): fp32-grade under "highest"
#: (its default), ~16 bits under "high" / "medium" (more than tf32's 10 bits, at 1.5x its cost)
PARTS_OF_SETTING = {"highest": 3, "high": 2, "medium": 2}


@triton.jit
def round_bf16(x):
    """x (fp32) rounded to the nearest bf16 (ties to even), as an fp32 whose low 16 bits are 0.

    Done on the bits, not with ``.to(tl.bfloat16)``: Triton's interpreter truncates that
    conversion where the GPU rounds, and a truncated leading part (0.99609375 for 1 - 1e-7) makes
    the later parts large, so that summing the partial products rounds away the small residuals
    the link loss is made of near an exact fit. On the GPU both forms round the same.
    NaN stays NaN, inf stays inf, and the largest finite values round to inf (as the conversion).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def split_bf16(x, PARTS: tl.constexpr):
    """(x0, x1, x2): bf16 parts of fp32 ``x``, x ~ x0 + x1 (+ x2 when PARTS == 3; else x2 is x1,
    unused), each the nearest bf16 to what is left."""
    x = x.to(tl.float32)  # a float64 scalar factor would make the parts of a float64 value
    h0 = round_bf16(x)
    r = x - h0
    h1 = round_bf16(r)
    if PARTS == 3:
        x2 = round_bf16(r - h1).to(tl.bfloat16)
    else:
        x2 = h1.to(tl.bfloat16)
    return h0.to(tl.bfloat16), h1.to(tl.bfloat16), x2


@triton.jit
def load_parts(ptrs, plane, mask, PARTS: tl.constexpr):
    """(p0, p1, p2): the bf16 parts stored ``plane`` elements apart at ``ptrs`` (0 where not
    ``mask``); p2 is p1 (unused) when PARTS == 2."""
    p0 = tl.load(ptrs, mask=mask, other=0.0)
    p1 = tl.load(ptrs + plane, mask=mask, other=0.0)
    if PARTS == 3:
        p2 = tl.load(ptrs + 2 * plane, mask=mask, other=0.0)
    else:
        p2 = p1
    return p0, p1, p2


@triton.jit
def dot_parts(a0, a1, a2, b0, b1, b2, acc, PARTS: tl.constexpr):
    """acc + a b from the bf16 parts of both operands (module docstring), smallest terms first."""
    if PARTS == 3:
        acc = tl.dot(a0, b2, acc)
        acc = tl.dot(a2, b0, acc)
        acc = tl.dot(a1, b1, acc)
    acc = tl.dot(a0, b1, acc)
    acc = tl.dot(a1, b0, acc)
    acc = tl.dot(a0, b0, acc)
    return acc


@triton.jit
def dot_f32(a, b, acc, PARTS: tl.constexpr):
    """acc + a b for fp32 tiles a, b, split into parts here."""
    a0, a1, a2 = split_bf16(a, PARTS)
    b0, b1, b2 = split_bf16(b, PARTS)
    return dot_parts(a0, a1, a2, b0, b1, b2, acc, PARTS)


@triton.jit
def dot_exact_a(a, b0, b1, b2, acc, PARTS: tl.constexpr):
    """acc + a b where ``a`` (any float tile) is exact in bf16 and b is given as parts."""
    a0 = a.to(tl.bfloat16)
    if PARTS == 3:
        acc = tl.dot(a0, b2, acc)
    acc = tl.dot(a0, b1, acc)
    acc = tl.dot(a0, b0, acc)
    return acc


if triton_interpreting():
    @triton.jit
    def precise_exp(x):
        return tl.exp(x)

    @triton.jit
    def precise_log(x):
        return tl.log(x)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def precise_exp(x):
        return libdevice.exp(x)

    @triton.jit
    def precise_log(x):
        return libdevice.log(x)
