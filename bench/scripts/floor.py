"""Print bench/notes/FLOOR.md's table: the bytes and FLOPs a DiffPool coarsening step must spend,
and the time they take at an H100's peak rates. Counted by hand from docs/math.md ("What
moves"); run: python bench/scripts/floor.py > bench/notes/FLOOR.md (the header text is part of
the output; no measurement, so it is a note, not a bench/results/ folder).

Forward, per graph (fp32 = 4 bytes; adj as bool/uint8 = 1 byte):
  read  A (N^2), L (N C), X (N F); write S (N C), A S (N C), out (C F), A' (C^2)
  FLOPs 2 N^2 C (A S) + 2 N C^2 (S^T A S) + 2 N C^2 (S^T S) + 2 N C F (S^T X)
Backward for s and x (A symmetric, no gradient into A: A is not read):
  read  X (N F), S (N C), A S (N C), g_out (C F), G (C^2); write dL (N C), dX (N F)
  FLOPs 2 N C F (X g_out^T) + 2 N C^2 ((A S) H) + 2 N C^2 (S H3) + 2 N C F (S g_out)
  A non-symmetric A adds one read of A and 2 N^2 C FLOPs (A^T S).
Predicted time = max(bytes / HBM bandwidth, FLOPs / tf32 tensor rate); the fp32 CUDA-core column
shows why the N^2 C product must use tensor cores.
"""
from __future__ import annotations

from diffpool_fast.profiling.costmodel import Shape, floor_bytes, floor_flops

HBM = 3.35e12  # H100 SXM HBM3, bytes/s
TF32 = 495e12  # H100 SXM dense tf32 tensor-core FLOP/s
FP32 = 60e12  # H100 SXM fp32 non-tensor FLOP/s (~67 peak; 60 as in the issue)


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
    print("# Floor of one DiffPool coarsening step on an H100 (bytes, FLOPs, predicted time)")
    print()
    print("Written by `python bench/scripts/floor.py > bench/notes/FLOOR.md` (no measurement:")
    print("arithmetic on the counts below). Device model: H100 SXM, 3.35 TB/s HBM, 495 TF/s tf32")
    print("(dense), 60 TF/s fp32 without tensor cores. fp32 x, s and adj unless a row says uint8.")
    print()
    print("```")
    print(__doc__.split("\n\n", 1)[1].split("Predicted")[0].rstrip())
    print("```")
    print()
    print(f"B={B}, C={C}, F={F}. Times in microseconds; `full` = forward + backward (symmetric A).")
    print()
    print("| N | adj | fwd MB | fwd GFLOP | fwd us (tf32) | fwd us (fp32 cores) | bwd MB | bwd GFLOP | bwd us "
          "| full us | full us, A not symmetric |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for adj_bytes, name in ((4, "fp32"), (1, "uint8")):
        for N in (128, 256, 512, 1024, 2048):
            fb, ff, bb, bf = counts(B, N, C, F, adj_bytes)
            _, _, bb_a, bf_a = counts(B, N, C, F, adj_bytes, symmetric=False)
            fwd = us(fb, ff, TF32)
            bwd = us(bb, bf, TF32)
            print(f"| {N} | {name} | {fb / 1e6:.1f} | {ff / 1e9:.1f} | {fwd:.1f} | {us(fb, ff, FP32):.1f} "
                  f"| {bb / 1e6:.1f} | {bf / 1e9:.1f} | {bwd:.1f} | {fwd + bwd:.1f} "
                  f"| {fwd + us(bb_a, bf_a, TF32):.1f} |")
    print()
    print("Reading: at fp32 adj the forward is memory-bound at every N here (A's 4 B N^2 bytes")
    print("dominate from N = 512); on CUDA cores alone it would be compute-bound (2 N^2 C FLOPs at")
    print("60 TF/s exceed the read of A for C > ~36), which is why kernels/adjacency.py uses tf32.")
    print("With uint8 adj the bytes shrink ~4x and the N^2 C product becomes the floor at large N.")
    print("PyG's dense_diff_pool moves far more: it materialises S S^T and A - S S^T (B N^2 each,")
    print("written and read, and kept for backward).")


if __name__ == "__main__":
    main()
