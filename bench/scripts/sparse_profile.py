"""Where sparse_diff_pool's time goes on one SBM-like graph (bench/scripts/sparse_scale.py's generator).

Usage: python bench/scripts/sparse_profile.py N [--logits randn|linear|converged] [--no-profile]
(1 thread; F=32, C=64, ~10 edges per node). Prints the median of 3 timed forward+backward steps
after a warm-up, then torch.profiler's operator table of one more step, by input shape.

Logits: ``randn`` (default) standard normal; ``linear`` one Linear(32, 64) layer of x with
PyTorch's default init, as sparse_scale.py times it (no row of S above 1/2: the link loss
skips its hard split); ``converged`` 10 * one-hot of the node's block (of 100) modulo C plus
N(0, 0.3^2) noise (every row above 1/2: the hard split on every row and edge).
"""
import argparse
import sys
import time

import torch
from torch.profiler import profile

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from sparse_scale import sbm_batch

from diffpool_fast import sparse_diff_pool

ap = argparse.ArgumentParser()
ap.add_argument("N", type=int)
ap.add_argument("--logits", choices=["randn", "linear", "converged"], default="randn")
ap.add_argument("--no-profile", action="store_true")
args = ap.parse_args()

torch.set_num_threads(1)
N = args.N
ei, batch = sbm_batch([N], 10, 100, 0.8, 0)
g = torch.Generator().manual_seed(0)
x = torch.randn(N, 32, generator=g, requires_grad=True)
if args.logits == "randn":
    s_leaf = torch.randn(N, 64, generator=g, requires_grad=True)
    def logits():
        return s_leaf
elif args.logits == "linear":
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 64)
    def logits():
        return lin(x)
else:
    blocks = (torch.arange(N) // 100) % 64
    s_leaf = (10.0 * torch.nn.functional.one_hot(blocks, 64).float()
              + 0.3 * torch.randn(N, 64, generator=g)).requires_grad_(True)
    def logits():
        return s_leaf
with torch.no_grad():
    top = logits().softmax(-1).max(-1).values
print(f"N={N} E={ei.shape[1]} logits={args.logits}: rows of S above 1/2: {int((top > 0.5).sum())} of {N}")


def step():
    o = sparse_diff_pool(x, ei, logits(), batch)
    (o[0].sum() + o[1].sum() + o[2] + o[3]).backward()


step()
times = []
for _ in range(3):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
times.sort()
print(f"step median {times[1]:.4f} s, min {times[0]:.4f} s, max {times[2]:.4f} s (of 3)")

if not args.no_profile:
    with profile(record_shapes=True) as p:
        step()
    print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))
