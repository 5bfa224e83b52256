"""float32 sparse_diff_pool against its own float64 value on a weighted batch of six SBM-like graphs.

Logits: scale * one-hot(block of 25 modulo C) + noise * N(0, 1), scale 0..18, noise 0 and 0.3, C=37;
weights uniform in [0.5, 1.5]; per-graph losses. Prints, per (scale, noise): the largest relative
error of the per-graph link losses, and the relative norm errors of the gradients of s and of
edge_weight, of link.sum() + ent.sum(). (At scale 0 with no noise the gradient of s is 0: "nan".)

Usage: python bench/scripts/sparse_f32_accuracy.py   (CPU; seconds)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_scale import sbm_batch

import diffpool_fast
from diffpool_fast import sparse_diff_pool

print("diffpool_fast from", Path(diffpool_fast.__file__).parent)
sizes = [300, 41, 1000, 7, 1, 250]
ei, batch = sbm_batch(sizes, 10, 25, 0.95, 1)
N, C = sum(sizes), 37
g = torch.Generator().manual_seed(1)
starts = torch.repeat_interleave(torch.cumsum(torch.tensor([0] + sizes[:-1]), 0), torch.tensor(sizes))
blk = (torch.arange(N) - starts) // 25
w = torch.rand(ei.shape[1], generator=g, dtype=torch.float64) + 0.5
print("scale noise | link rel err (max over graphs) | grad s rel | grad w rel")
for scale in (0, 2, 6, 10, 14, 18):
    for noise in (0.0, 0.3):
        s64 = scale * torch.nn.functional.one_hot(blk % C, C).double() + noise * torch.randn(N, C, generator=g, dtype=torch.float64)
        x64 = torch.randn(N, 5, generator=g, dtype=torch.float64)
        res = []
        for dt in (torch.float64, torch.float32):
            s, x, ww = (t.to(dt).requires_grad_() for t in (s64, x64, w))
            o = sparse_diff_pool(x, ei, s, batch, ww, per_graph=True)
            gs, gw = torch.autograd.grad(o[2].sum() + o[3].sum(), [s, ww])
            res.append((o[2].detach().double(), gs.double(), gw.double()))
        (l64, g64, w64), (l32, g32, w32) = res
        lerr = float(((l32 - l64).abs() / l64.abs().clamp_min(1e-30)).max())
        print(f"{scale:5d} {noise:5.1f} | {lerr:.2e} | {float((g32 - g64).norm() / g64.norm()):.2e} | "
              f"{float((w32 - w64).norm() / w64.norm()):.2e}")
