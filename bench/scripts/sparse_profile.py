"""Where sparse_diff_pool's time goes on one SBM-like graph (bench/scripts/sparse_scale.py's generator).

Usage: python bench/scripts/sparse_profile.py N   (1 thread; F=32, C=64, ~10 edges per node)
Prints one timed forward+backward, then torch.profiler's operator table of another, by input shape.
"""
import sys
import time

import torch
from torch.profiler import profile

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from sparse_scale import sbm_batch

from diffpool_fast import sparse_diff_pool

torch.set_num_threads(1)
N = int(sys.argv[1])
ei, batch = sbm_batch([N], 10, 100, 0.8, 0)
g = torch.Generator().manual_seed(0)
x = torch.randn(N, 32, generator=g, requires_grad=True)
s = torch.randn(N, 64, generator=g, requires_grad=True)
def step():
    o = sparse_diff_pool(x, ei, s, batch)
    (o[0].sum() + o[1].sum() + o[2] + o[3]).backward()
step()
t0 = time.perf_counter()
step()
print("step", time.perf_counter() - t0)

with profile(record_shapes=True) as p:
    step()
print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))
