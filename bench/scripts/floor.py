"""Print bench/notes/FLOOR.md's table: the bytes and FLOPs a DiffPool coarsening step must spend,
and the time they take at an H200's peak rates, for the math and for the kernels as built. Counted by hand from docs/math.md ("What
moves"); run: python bench/scripts/floor.py > bench/notes/FLOOR.md (the header text is part of
the output; no measurement, so it is a note, not a bench/results/ folder).

Forward, per graph (fp32 = 4 bytes; adj as bool/uint8 = 1 byte):
  read  A (N^2), L (N C), X (N F); write S (N C), A S (N C), out (C F), A' (C^2)
  FLOPs 2 N^2 C (A S) + 2 N C^2 (S^T A S) + 2 N C^2 (S^T S) + 2 N C F (S^T X)
Backward for s and x (A symmetric, no gradient into A: A is not read):
  read  X (N F), S (N C), A S (N C), g_out (C F), G (C^2); write dL (N C), dX (N F)
  FLOPs 2 N C F (X g_out^T) + 2 N C^2 ((A S) H) + 2 N C^2 (S H3) + 2 N C F (S g_out)
  A non-symmetric A adds one read of A and 2 N^2 C FLOPs (A^T S).
As built (kernels/split.py): every product is a split bf16 tensor-core product, fp32-grade under
torch's "highest" precision: 6 bf16 products per fp32 x fp32 product, 3 when one operand is exact
in bf16 (A S of a 0/1 or small-integer adjacency). A graph whose link identity cancels (near an
exact fit) adds one read of A and 6 x 2 N^2 C (the residual's S S^T) forward, and again 2 x 6 x
2 N^2 C backward ((R + R^T) S).
Predicted time = max(bytes / HBM bandwidth, FLOPs / rate): the math at the fp32 CUDA-core rate
and at the bf16 tensor rate, and the as-built bf16 products at the bf16 tensor rate.
"""
from __future__ import annotations

from diffpool_fast.profiling.costmodel import Shape, floor_bytes, floor_flops

HBM = 4.8e12  # H200 HBM3e, bytes/s (datasheet)
BF16 = 990e12  # H200 SXM dense bf16 tensor-core FLOP/s (datasheet; the H100's rate)
FP32 = 60e12  # fp32 non-tensor FLOP/s (~67 peak)


def built_flops(B, N, C, F, exact_adj: bool, flagged: bool = False):
    """(fwd, bwd) bf16 tensor FLOPs of the kernels as built (symmetric A, grads of x and s)."""
    adj_products = 3 if exact_adj else 6
    fwd = adj_products * 2 * B * N * N * C + 6 * (2 * B * N * C * F + 2 * 2 * B * N * C * C)
    bwd = 6 * (2 * 2 * B * N * C * F + 2 * 2 * B * N * C * C)
    if flagged:
        fwd += 6 * 2 * B * N * N * C
        bwd += 2 * 6 * 2 * B * N * N * C
    return fwd, bwd


def counts(B, N, C, F, adj_bytes=4, el=4, symmetric=True):
    """(fwd bytes, fwd FLOPs, bwd bytes, bwd FLOPs): the counts above, from the package's cost
    model (diffpool_fast.profiling.costmodel), which `diffpool-fast profile` also uses."""
    assert el == 4, "this table is for fp32 x and s"
    shape = Shape(B, N, C, F, adj_dtype="uint8" if adj_bytes == 1 else "float32", masked=False,
                  symmetric=symmetric)
    return (floor_bytes(shape, "fwd"), floor_flops(shape, "fwd"),
            floor_bytes(shape, "bwd"), floor_flops(shape, "bwd"))


def us(bytes_, flops, rate):
    return max(bytes_ / HBM, flops / rate) * 1e6


def main():
    B, C, F = 64, 128, 128
    print("# Floor of one DiffPool coarsening step on an H200 (bytes, FLOPs, predicted time)")
    print()
    print("Written by `python bench/scripts/floor.py > bench/notes/FLOOR.md` (no measurement:")
    print("arithmetic on the counts below). Device model: H200 SXM, 4.8 TB/s HBM3e, 990 TF/s dense")
    print("bf16 tensor cores (datasheet), 60 TF/s fp32 without tensor cores. fp32 x, s and adj unless")
    print("a row says uint8. Measured ceilings of this workplace's H200 are in the device tool's notes.")
    print()
    print("```")
    print(__doc__.split("\n\n", 1)[1].rstrip().rstrip('"'))
    print("```")
    print()
    print(f"B={B}, C={C}, F={F}. Times in microseconds; `full` = forward + backward (symmetric A);")
    print("`built` = the split bf16 products of the kernels at the bf16 rate; `host` (not in the")
    print("columns): 8 launches forward and backward, each some microseconds of host time.")
    print()
    print("| N | adj | fwd MB | bwd MB | math GFLOP | full us, fp32 cores | full us, bf16 rate | built GFLOP "
          "| full us, built | built, near a fit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for adj_bytes, name in ((4, "fp32"), (1, "uint8")):
        for N in (128, 256, 512, 1024, 2048):
            fb, ff, bb, bf = counts(B, N, C, F, adj_bytes)
            bf_f, bf_b = built_flops(B, N, C, F, exact_adj=adj_bytes == 1)
            cf_f, cf_b = built_flops(B, N, C, F, exact_adj=adj_bytes == 1, flagged=True)
            near = us(fb + B * N * N * adj_bytes, cf_f, BF16) + us(bb + B * N * N * adj_bytes, cf_b, BF16)
            print(f"| {N} | {name} | {fb / 1e6:.1f} | {bb / 1e6:.1f} | {(ff + bf) / 1e9:.1f} "
                  f"| {us(fb, ff, FP32) + us(bb, bf, FP32):.1f} | {us(fb, ff, BF16) + us(bb, bf, BF16):.1f} "
                  f"| {(bf_f + bf_b) / 1e9:.1f} | {us(fb, bf_f, BF16) + us(bb, bf_b, BF16):.1f} | {near:.1f} |")
    print()
    print("Reading: the math alone is bound by moving bytes at every N here (fp32 adj: 49 us at")
    print("N = 512, of which A is most). The split products that make it fp32-grade on bf16 tensor")
    print("cores (6 per fp32 product) make the step as built bound by tensor arithmetic instead, at")
    print("about 1.5x the byte time (72 us at N = 512); near an exact fit the direct residual and")
    print("its gradient double that. Either is small next to PyG's 1.88 ms at B=64 N=512 (1.28 ms")
    print("on the GPU) in the first H200 run: 3x PyG needs the whole step under ~0.63 ms, so the")
    print("step's time is set by host time (launches, Python, allocation) and by how far the")
    print("kernels stay from these rates.")
    print("PyG's dense_diff_pool moves far more: it materialises S S^T and A - S S^T (B N^2 each,")
    print("written and read, and kept for backward).")


if __name__ == "__main__":
    main()
