"""Short CUDA checks of ``bench/gpu.sh``: ``sparse`` and ``clusters``.

    python bench/scripts/gpu_checks.py sparse      sparse_diff_pool on CUDA: equality with the dense
                                                   op in float64 (a random graph, then a near-converged
                                                   batch with every bucket kind), time at 10^6 nodes
    python bench/scripts/gpu_checks.py clusters    num_clusters on the Triton path against torch, and
                                                   the BCE link loss, time and memory at B64 N512 C128

Both need CUDA (status 2 without). Exit status 1 if a check fails (an assertion).
"""
import sys
import time

import torch

from diffpool_fast import dense_diff_pool, sparse_diff_pool


def sparse():
    """sparse_diff_pool on CUDA (module docstring)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    # equality with the dense op on CUDA (float64), then forward+backward time at 10^6 nodes
    N, C, F, E = 300, 17, 9, 3000
    ei = torch.randint(0, N, (2, E), device="cuda", generator=g)
    x = torch.randn(N, F, device="cuda", dtype=torch.float64, generator=g)
    s = torch.randn(N, C, device="cuda", dtype=torch.float64, generator=g)
    adj = torch.zeros(N, N, device="cuda", dtype=torch.float64).index_put_((ei[0], ei[1]), torch.ones(E, device="cuda", dtype=torch.float64), accumulate=True)
    a, b = sparse_diff_pool(x, ei, s), dense_diff_pool(x, adj, s, backend="torch")
    err = max(float((p - q).abs().max()) for p, q in zip(a, b))
    print(f"sparse vs dense on CUDA, float64: max abs diff {err:.3e}")
    assert err < 1e-9
    # a near-converged batch of graphs with a symmetric pattern: the hard split of the link loss,
    # every size-bucket kind (lone, equal-size view, padded), gradients of x, s and edge_weight
    sizes = [5, 5, 5, 3, 9, 17, 12, 1, 40]
    B, Nmax, C, F = len(sizes), max(sizes), 6, 3
    batch = torch.repeat_interleave(torch.arange(B, device="cuda"), torch.tensor(sizes, device="cuda"))
    ptr = torch.tensor([0] + sizes, device="cuda").cumsum(0)
    r = torch.cat([torch.randint(0, n, (2 * n,), device="cuda", generator=g) + ptr[b] for b, n in enumerate(sizes)])
    c = torch.cat([torch.randint(0, n, (2 * n,), device="cuda", generator=g) + ptr[b] for b, n in enumerate(sizes)])
    ei = torch.cat([torch.stack([r, c]), torch.stack([c, r])], 1)
    w = torch.rand(ei.shape[1], device="cuda", dtype=torch.float64, generator=g).requires_grad_(True)
    Nt = int(ptr[-1])
    hard = torch.randint(0, C, (Nt,), device="cuda", generator=g)
    s = (9.0 * torch.nn.functional.one_hot(hard, C).double() + 0.3 * torch.randn(Nt, C, device="cuda", dtype=torch.float64, generator=g)).requires_grad_(True)
    x = torch.randn(Nt, F, device="cuda", dtype=torch.float64, generator=g).requires_grad_(True)
    loc = torch.arange(Nt, device="cuda") - ptr[batch]
    xd = torch.zeros(B, Nmax, F, device="cuda", dtype=torch.float64).index_put((batch, loc), x)
    sd = torch.zeros(B, Nmax, C, device="cuda", dtype=torch.float64).index_put((batch, loc), s)
    ad = torch.zeros(B, Nmax, Nmax, device="cuda", dtype=torch.float64).index_put((batch[ei[0]], loc[ei[0]], loc[ei[1]]), w, accumulate=True)
    mask = torch.zeros(B, Nmax, dtype=torch.bool, device="cuda").index_put((batch, loc), torch.ones(Nt, dtype=torch.bool, device="cuda"))
    a = sparse_diff_pool(x, ei, s, batch, w, per_graph=True)
    b = dense_diff_pool(xd, ad, sd, mask, per_graph=True, backend="torch")
    err = max(float((p - q).detach().abs().max()) for p, q in zip(a, b))
    ga = torch.autograd.grad(sum(t.sum() for t in a), (x, s, w))
    gb = torch.autograd.grad(sum(t.sum() for t in b), (x, s, w))
    gerr = max(float((p - q).abs().max()) for p, q in zip(ga, gb))
    print(f"near-converged batch of {B} graphs, symmetric pattern, float64: outputs {err:.3e}, grads of x, s, w {gerr:.3e}")
    assert err < 1e-9 and gerr < 1e-9
    N, E = 10**6, 10**7
    ei = torch.randint(0, N, (2, E), device="cuda", generator=g)
    x = torch.randn(N, 32, device="cuda", generator=g, requires_grad=True)
    s = torch.randn(N, 64, device="cuda", generator=g, requires_grad=True)
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out, oa, link, ent = sparse_diff_pool(x, ei, s)
        (out.sum() + oa.sum() + link + ent).backward()
        torch.cuda.synchronize()
        print(f"N=1e6 E=1e7 C=64 F=32 fwd+bwd {time.perf_counter() - t0:.3f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def clusters():
    """num_clusters and link_loss='bce' on CUDA (module docstring)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, C, F = 64, 512, 128, 128
    x = torch.randn(B, N, F, device="cuda", generator=g, requires_grad=True)
    s = torch.randn(B, N, C, device="cuda", generator=g, requires_grad=True)
    a = (torch.rand(B, N, N, device="cuda", generator=g) < 0.05).float()
    adj = ((a + a.transpose(1, 2)) > 0).float()
    mask = torch.arange(N, device="cuda")[None] < torch.randint(N // 4, N + 1, (B,), device="cuda", generator=g)[:, None]
    k = torch.randint(1, C + 1, (B,), device="cuda", generator=g)
    def run(backend, **kw):
        outs = dense_diff_pool(x, adj, s, mask, backend=backend, **kw)
        gx, gs = torch.autograd.grad(sum(o.float().sum() for o in outs), [x, s])
        return outs, gx, gs
    def timed(backend, **kw):
        for _ in range(2):
            run(backend, **kw)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(5):
            run(backend, **kw)
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t0) / 5, torch.cuda.max_memory_allocated() / 2**20
    (o1, gx1, gs1), (o2, gx2, gs2) = run("triton", num_clusters=k), run("torch", num_clusters=k)
    err = max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-6)) for p, q in zip(list(o1) + [gx1, gs1], list(o2) + [gx2, gs2]))
    print(f"num_clusters: triton vs torch, max error relative to the largest entry {err:.2e}")
    assert err < 5e-3
    for name, backend, kw in (("triton, fixed C", "triton", {}), ("triton, num_clusters", "triton", dict(num_clusters=k)),
                              ("torch, num_clusters", "torch", dict(num_clusters=k)),
                              ("triton + bce", "triton", dict(link_loss="bce")), ("torch + bce", "torch", dict(link_loss="bce"))):
        ms, mib = timed(backend, **kw)
        print(f"B={B} N={N} C={C} F={F} {name}: fwd+bwd {ms:.2f} ms, peak {mib:.0f} MiB")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("sparse", "clusters"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("gpu_checks.py: no CUDA device", file=sys.stderr)
        sys.exit(2)
    {"sparse": sparse, "clusters": clusters}[sys.argv[1]]()
