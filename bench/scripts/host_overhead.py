"""Host time of one forward+backward of the Triton path with the kernel launches stubbed out:
what the package spends in Python, autograd and allocation around its launches, measurable
without a GPU (issue 19: at B=64 N=512 the whole step must stay under ~0.63 ms for 3x PyG).

    TRITON_INTERPRET=1 python bench/scripts/host_overhead.py [--reps 200] [--out DIR]

Each kernel's ``kernel[grid](...)`` is replaced by a function that only counts the call, so the
numbers leave out what a launch itself costs on a GPU (Triton's launcher: a few microseconds
each, 8 per step) and every device-side cost. Tensors are CPU tensors of the headline shape
(B=64 N=512 C=128 F=128, fp32, bool mask); allocations are the CPU allocator's. Printed: median
host microseconds per step of ours (stubbed Triton path, via ``dense_diff_pool``) and, for scale,
of PyG's ``dense_diff_pool`` on a small shape where its arithmetic is negligible (B=2 N=8), which
is mostly its own host time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def stub_launches():
    """Replace every package kernel's launch by a counter; returns the counter dict."""
    from diffpool_fast.kernels import adjacency, assignment, finish, gram

    counts = {}

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counts[self.name] = counts.get(self.name, 0) + 1
            return launch

    for mod in (adjacency, assignment, finish, gram):
        for name in dir(mod):
            if name.endswith("_kernel"):
                setattr(mod, name, Stub(name))
    return counts


def per_step_us(fn, reps):
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None, help="folder for host_overhead.md (default: print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from diffpool_fast import dense_diff_pool

    counts = stub_launches()
    B, N, C, F = 64, 512, 128, 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, F, generator=g).requires_grad_()
    s = torch.randn(B, N, C, generator=g).requires_grad_()
    adj = (torch.rand(B, N, N, generator=g) < 0.1).float()
    mask = torch.ones(B, N, dtype=torch.bool)

    # the upstream gradients made once: on a GPU their fills are device work, on the CPU they
    # would dominate the host time measured here
    grads = [torch.ones_like(o) for o in dense_diff_pool(x, adj, s, mask, backend="triton")]

    def ours():
        out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask, backend="triton")
        torch.autograd.grad((out, out_adj, link, ent), (x, s), grads)

    ours_us = per_step_us(ours, args.reps)
    launches = sum(counts.values()) / (args.reps + 5)
    lines = [f"ours (Triton path, launches stubbed), B={B} N={N} C={C} F={F}: {ours_us:.0f} us host per "
             f"forward+backward, {launches:.0f} launches per step (not timed)"]
    try:
        from torch_geometric.nn import dense_diff_pool as pyg

        xs, ss = torch.randn(2, 8, 4).requires_grad_(), torch.randn(2, 8, 3).requires_grad_()
        a = (torch.rand(2, 8, 8) < 0.3).float()
        m = torch.ones(2, 8, dtype=torch.bool)
        pgrads = [torch.ones_like(o) for o in pyg(xs, a, ss, m)]

        def theirs():
            outs = pyg(xs, a, ss, m)
            torch.autograd.grad(outs, (xs, ss), pgrads)

        lines.append(f"PyG dense_diff_pool at B=2 N=8 (its arithmetic negligible): {per_step_us(theirs, args.reps):.0f} us "
                     "host per forward+backward")
    except ImportError:
        lines.append("PyG not installed")
    lines.append(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}; torch {torch.__version__}; "
                 "1 torch thread; CPU tensors")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_overhead.md"), "w") as f:
            f.write("\n\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
