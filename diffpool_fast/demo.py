"""``diffpool-fast demo``: the main job on an embedded default, runnable anywhere.

Builds a batch of random graphs of varied size (padded, with a mask), runs one coarsening step
forward and backward on every available backend, checks each against the float64 reference and
prints a table of error, time and the peer's time.
"""
from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("demo", help="coarsen an embedded default batch on every backend and compare")
    p.add_argument("--batch", type=int, default=16, help="graphs per batch (default 16)")
    p.add_argument("--nodes", type=int, default=300, help="padded nodes per graph (default 300)")
    p.add_argument("--clusters", type=int, default=75, help="clusters (default 75)")
    p.add_argument("--features", type=int, default=64, help="features (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _random_batch(B, N, C, F, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(max(1, N // 4), N + 1, (B,), generator=g)
    mask = torch.arange(N)[None, :] < sizes[:, None]
    adj = torch.rand(B, N, N, generator=g) < 0.05
    adj = (adj | adj.transpose(1, 2)) & mask[:, :, None] & mask[:, None, :]
    x = torch.randn(B, N, F, generator=g)
    s = torch.randn(B, N, C, generator=g)
    return x, adj.float(), s, mask


def run(args) -> int:
    import torch

    from .cli import CLIError
    from .pool import dense_diff_pool
    from .reference import dense_diff_pool_reference

    for name in ("batch", "nodes", "clusters", "features", "repeats"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be at least 1, got {getattr(args, name)}")
    x, adj, s, mask = _random_batch(args.batch, args.nodes, args.clusters, args.features, args.seed)
    ref = dense_diff_pool_reference(x.double(), adj.double(), s.double(), mask)

    candidates = [("diffpool_fast torch", lambda *a: dense_diff_pool(*a, backend="torch"))]
    try:
        from torch_geometric.nn import dense_diff_pool as pyg_pool

        candidates.append(("torch_geometric", pyg_pool))
    except ImportError:
        print("torch_geometric not installed: PyG column skipped")

    print(
        f"DiffPool coarsening, B={args.batch} N={args.nodes} C={args.clusters} F={args.features}, "
        f"fp32 on CPU ({torch.get_num_threads()} threads), forward+backward"
    )
    print(f"{'implementation':<22}{'fwd+bwd ms':>12}{'max rel err vs fp64':>22}")
    for label, fn in candidates:
        xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            outs = fn(xs, adj, ss, mask)
            loss = outs[0].sum() + outs[1].sum() + outs[2] + outs[3]
            loss.backward()
            times.append(time.perf_counter() - t0)
            xs.grad = ss.grad = None
        err = max(
            float((o.detach().double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
            for o, r in zip(outs, ref)
        )
        ms = sorted(times[1:])[len(times[1:]) // 2] * 1e3
        print(f"{label:<22}{ms:>12.2f}{err:>22.2e}")
    return 0
