"""Per-graph cluster counts (``num_clusters``) and the BCE link loss, on both backends.

The reference slices each graph to its n_b real nodes and k_b columns and calls PyG's
``dense_diff_pool`` on it, one graph at a time, in float64: outputs, per-graph losses, and the
gradients of x and s. N, C and k_b are not powers of two; k_b = 1 and a fully padded graph are
included; outputs are NaN-poisoned before the Triton launches.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch_geometric.nn import dense_diff_pool as pyg_pool
from triton_cases import DEVICE, fresh_generator, nan_poisoned_allocations

from diffpool_fast import dense_diff_pool
from diffpool_fast.ops.coarsen_triton import forced_blocks
from diffpool_fast.ops.inputs import cluster_mask
from diffpool_fast.ops.link_bce import EPS_BCE, bce_link_sums

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(B, N, C, F, g, dtype=torch.float64, sizes=None, ks=None, device="cpu"):
    x = torch.randn(B, N, F, generator=g, dtype=torch.float64)
    s = 2.0 * torch.randn(B, N, C, generator=g, dtype=torch.float64)
    a = (torch.rand(B, N, N, generator=g, dtype=torch.float64) < 0.35).to(torch.float64)
    a = torch.triu(a, 1)
    a = a + a.transpose(1, 2)
    if sizes is None:
        sizes = torch.randint(1, N + 1, (B,), generator=g)
        sizes[0] = N
        if B > 2:
            sizes[2] = 0  # a fully padded graph
    sizes = torch.as_tensor(sizes)
    mask = torch.arange(N)[None, :] < sizes[:, None]
    a = a * (mask[:, :, None] & mask[:, None, :])  # no entries at padded pairs (PyG slices them away)
    if ks is None:
        ks = torch.randint(1, C + 1, (B,), generator=g)
        ks[0] = 1
        ks[-1] = C
    k = torch.as_tensor(ks, dtype=torch.int64)
    return (x.to(dtype).to(device), a.to(dtype).to(device), s.to(dtype).to(device), mask.to(device),
            k.to(device))


def _reference(x, adj, s, mask, k, link_loss="frobenius"):
    """Per graph through PyG's dense_diff_pool on the slice [:n_b, :k_b], float64: out [B, C, F],
    out_adj [B, C, C] zero-padded, link [B] (||A_b - S_b S_b^T||_F, or the BCE sum / n_b^2),
    ent [B] (mean row entropy over the n_b nodes)."""
    B, N, C = s.shape
    out = x.new_zeros(B, C, x.shape[2], dtype=torch.float64)
    out_adj = x.new_zeros(B, C, C, dtype=torch.float64)
    link, ent = [], []
    for b in range(B):
        n, kb = int(mask[b].sum()), int(k[b])
        if n == 0:
            link.append(x.new_zeros((), dtype=torch.float64) + 0.0 * s[b].sum())
            ent.append(x.new_zeros((), dtype=torch.float64) + 0.0 * s[b].sum())
            continue
        xb, ab, sb = x[b, :n].double(), adj[b, :n, :n].double(), s[b, :n, :kb].double()
        o, oa, lk, en = pyg_pool(xb, ab, sb, normalize=False)
        out[b, :kb] = o[0]
        out_adj[b, :kb, :kb] = oa[0]
        if link_loss == "bce":
            S = torch.softmax(sb, dim=-1)
            P = torch.minimum(S @ S.T, torch.ones(()))
            terms = -ab * torch.log(P + EPS_BCE) - (1 - ab) * torch.log(1 - P + EPS_BCE)
            lk = terms.sum() / n**2
        link.append(lk)
        ent.append(en)
    return out, out_adj, torch.stack(link), torch.stack(ent)


def _weights(B, C, F, g):
    return (torch.randn(B, C, F, generator=g, dtype=torch.float64),
            torch.randn(B, C, C, generator=g, dtype=torch.float64),
            torch.rand(B, generator=g, dtype=torch.float64) + 0.5,
            torch.rand(B, generator=g, dtype=torch.float64) + 0.5)


def _scalar(outs, w):
    out, out_adj, link, ent = outs
    return ((out.double() * w[0].to(out.device)).sum() + (out_adj.double() * w[1].to(out.device)).sum()
            + (link.double() * w[2].to(out.device)).sum() + (ent.double() * w[3].to(out.device)).sum())


def _compare(got, want, tol, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} vs {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    scale = max(want.abs().max().item(), 1e-6) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


@contextlib.contextmanager
def _poisoned():
    """``triton_cases.nan_poisoned_allocations``, except for tensors allocated with
    ``requires_grad=True``: ``torch.utils.checkpoint`` (the BCE link loss runs under it) makes
    one, ``torch.empty((0,), requires_grad=True)``, in torch 2.11 (not in 2.13), and filling a
    leaf that requires grad in place is an error. It is no output of ours to check."""
    real = torch.empty
    with nan_poisoned_allocations():
        poisoned = torch.empty

        def empty(*args, **kwargs):
            return (real if kwargs.get("requires_grad") else poisoned)(*args, **kwargs)

        torch.empty = empty
        try:
            yield
        finally:
            torch.empty = poisoned


def test_poisoned_allocations_leave_a_grad_leaf_alone():
    with _poisoned():
        leaf = torch.empty((0,), requires_grad=True)  # what torch 2.11's checkpoint allocates
        out = torch.empty(3)
    assert leaf.requires_grad and leaf.is_leaf and torch.isnan(out).all()
    assert torch.empty is not None and not torch.isnan(torch.zeros(1)).any()


def _check(x, adj, s, mask, k, backend, tol, link_loss="frobenius", blocks=None):
    g = fresh_generator()
    B, N, C = s.shape
    w = _weights(B, C, x.shape[2], g)
    xr, sr = x.detach().double().cpu().requires_grad_(), s.detach().double().cpu().requires_grad_()
    ref = _reference(xr, adj.double().cpu(), sr, mask.cpu(), k.cpu(), link_loss)
    gx_ref, gs_ref = torch.autograd.grad(_scalar(ref, w), [xr, sr])
    xg, sg = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ctx = forced_blocks(**blocks) if blocks else _poisoned()
    with ctx:
        got = dense_diff_pool(xg, adj, sg, mask, normalize=False, per_graph=True, backend=backend,
                              num_clusters=k, link_loss=link_loss)
    if link_loss == "bce":  # normalize=False is the plain sum: per graph mean over n_b^2 here
        n2 = mask.sum(1).double().clamp_min(1) ** 2
        got = (got[0], got[1], got[2].double() / n2.to(got[2].device), got[3])
    for name, a, b in zip(("out", "out_adj", "link", "ent"), got, ref):
        _compare(a, b, tol, name)
    # exact zeros past k_b: the softmax never gave them mass
    real = cluster_mask(k.cpu(), C)
    assert (got[0].detach().cpu()[~real] == 0).all()
    assert (got[1].detach().cpu()[~(real[:, :, None] & real[:, None, :])] == 0).all()
    gx, gs = torch.autograd.grad(_scalar(got, w), [xg, sg])
    _compare(gx, gx_ref, tol, "grad x")
    _compare(gs, gs_ref, tol, "grad s")
    assert (gs.detach().cpu()[~real[:, None, :].expand(B, N, C)] == 0).all(), "grad s past k_b"


@pytest.mark.parametrize("link_loss", ["frobenius", "bce"])
@pytest.mark.parametrize("B,N,C,F", [(5, 13, 7, 6), (3, 29, 11, 5), (1, 9, 1, 3)])
def test_torch_path_matches_pyg_per_graph(B, N, C, F, link_loss):
    g = fresh_generator()
    x, adj, s, mask, k = _inputs(B, N, C, F, g)
    _check(x, adj, s, mask, k, "torch", 1e-10, link_loss)


@pytest.mark.parametrize("case", [
    dict(B=4, N=37, C=10, F=9, blocks=None),
    dict(B=3, N=45, C=20, F=7, blocks=dict(row_n=16, row_k=16, adj_m=16, adj_k=16, gram_c=16, gram_f=16,
                                           gram_n=16)),
    dict(B=2, N=21, C=3, F=5, blocks=None),
    dict(B=2, N=24, C=130, F=8, blocks=None),
], ids=["C10", "C20-small-blocks", "C3", "C130"])
def test_triton_path_matches_pyg_per_graph(case):
    g = fresh_generator()
    x, adj, s, mask, k = _inputs(case["B"], case["N"], case["C"], case["F"], g, dtype=torch.float32,
                                 device=DEVICE)
    _check(x, adj, s, mask, k, "triton", 5e-5 if DEVICE == "cpu" else 5e-3, blocks=case["blocks"])


def test_triton_bce_matches_pyg_per_graph():
    g = fresh_generator()
    x, adj, s, mask, k = _inputs(3, 19, 7, 4, g, dtype=torch.float32, device=DEVICE)
    _check(x, adj, s, mask, k, "triton", 5e-5 if DEVICE == "cpu" else 5e-3, link_loss="bce")


def test_num_clusters_equal_to_c_is_the_plain_op():
    g = fresh_generator()
    x, adj, s, mask, _ = _inputs(4, 11, 6, 3, g)
    full = torch.full((4,), 6, dtype=torch.int64)
    a = dense_diff_pool(x, adj, s, mask, num_clusters=full)
    b = dense_diff_pool(x, adj, s, mask)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("normalize", [True, "graph", False])
def test_bce_scalings(normalize):
    """True: the authors' sum over real pairs / sum n_b^2; "graph": mean of per-graph means."""
    g = fresh_generator()
    x, adj, s, mask, k = _inputs(4, 10, 5, 3, g)
    n = mask.sum(1).double()
    per = dense_diff_pool(x, adj, s, mask, normalize=False, per_graph=True, num_clusters=k, link_loss="bce")[2]
    got = dense_diff_pool(x, adj, s, mask, normalize=normalize, num_clusters=k, link_loss="bce")[2]
    if normalize is True:
        want = per.sum() / (n**2).sum()
    elif normalize == "graph":
        want = (per[n > 0] / n[n > 0] ** 2).mean()
    else:
        want = per.sum()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_bce_clamp_gradient_is_torch_minimum_s():
    """One-hot rows: (S S^T)_ii == 1 exactly, where the clamp's derivative is 1/2."""
    s = torch.tensor([[[60.0, 0.0], [0.0, 60.0], [0.3, -0.2]]], dtype=torch.float64, requires_grad=True)
    adj = torch.tensor([[[1.0, 0, 1], [0, 1, 0], [1, 0, 0]]], dtype=torch.float64)
    x = torch.ones(1, 3, 1, dtype=torch.float64)
    got = dense_diff_pool(x, adj, s, link_loss="bce")[2]
    S = torch.softmax(s, -1)
    P = torch.minimum(S @ S.transpose(1, 2), torch.ones(()))
    want = (-adj * torch.log(P + EPS_BCE) - (1 - adj) * torch.log(1 - P + EPS_BCE)).sum() / 9
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


def test_bce_never_holds_a_quadratic_buffer():
    """Autograd keeps only the block inputs (views): saved bytes stay O(B N C), not B N^2."""
    g = torch.Generator().manual_seed(0)
    B, N, C = 2, 1500, 8
    S = torch.softmax(torch.randn(B, N, C, generator=g), -1).requires_grad_()
    adj = torch.rand(B, N, N, generator=g) < 0.01
    mask = torch.ones(B, N, dtype=torch.bool)
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.untyped_storage().data_ptr() != adj.untyped_storage().data_ptr()
                     else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total = bce_link_sums(adj, S, mask, chunk_bytes=1 << 20).sum()
    total.backward()
    assert max(saved) < B * N * N, f"a saved tensor of {max(saved)} bytes"
    assert S.grad is not None and torch.isfinite(S.grad).all()


@pytest.mark.parametrize("bad,err,match", [
    (torch.tensor([0, 2, 2]), ValueError, r"num_clusters\[0\] = 0"),
    (torch.tensor([1, 2, 6]), ValueError, r"C=5"),
    (torch.tensor([1, 2]), ValueError, r"shape \[B\] = \[3\]"),
    (torch.tensor([1.0, 2.0, 3.0]), TypeError, "integers"),
    ([1, 2, 3.5], TypeError, "sequence of ints"),
    ("3", TypeError, "num_clusters must be"),
])
def test_num_clusters_errors_name_the_argument(bad, err, match):
    x, adj, s = torch.randn(3, 4, 2), torch.rand(3, 4, 4), torch.randn(3, 4, 5)
    with pytest.raises(err, match=match):
        dense_diff_pool(x, adj, s, num_clusters=bad)


def test_link_loss_option_errors():
    x, adj, s = torch.randn(1, 4, 2), torch.rand(1, 4, 4), torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="link_loss must be one of"):
        dense_diff_pool(x, adj, s, link_loss="ce")
    with pytest.raises(TypeError, match="link_loss must be one of"):
        dense_diff_pool(x, adj, s, link_loss=None)


def test_list_num_clusters_and_nan_in_unused_columns():
    """A list is accepted; NaN logits past k_b are not part of the graph and do not leak."""
    g = fresh_generator()
    x, adj, s, mask, _ = _inputs(2, 8, 4, 3, g)
    s = s.clone()
    s[0, :, 2:] = float("nan")
    out = dense_diff_pool(x, adj, s, mask, num_clusters=[2, 4])
    assert all(torch.isfinite(t).all() for t in out)


def test_torchscript_takes_num_clusters_and_bce():
    g = fresh_generator()
    x, adj, s, mask, k = _inputs(3, 9, 5, 2, g)

    @torch.jit.script
    def f(x: torch.Tensor, adj: torch.Tensor, s: torch.Tensor, mask: torch.Tensor, k: torch.Tensor):
        a = dense_diff_pool(x, adj, s, mask, num_clusters=k)
        b = dense_diff_pool(x, adj, s, mask, num_clusters=k, link_loss="bce")
        return a[0], a[2], b[2], b[3]

    got = f(x, adj, s, mask, k)
    a = dense_diff_pool(x, adj, s, mask, num_clusters=k)
    b = dense_diff_pool(x, adj, s, mask, num_clusters=k, link_loss="bce")
    for u, v in zip(got, (a[0], a[2], b[2], b[3])):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_bce_refuses_targets_outside_0_1():
    x, s = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    adj = torch.rand(2, 5, 5)
    adj[1, 2, 3] = 2.5
    with pytest.raises(ValueError, match=r"entries in \[0, 1\].*, 2.5\]"):
        dense_diff_pool(x, adj, s, link_loss="bce")
    adj[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"entries in \[0, 1\]"):
        dense_diff_pool(x, adj, s, link_loss="bce")
    dense_diff_pool(x, adj.nan_to_num(0.0) > 0.5, s, link_loss="bce")  # bool: a 0/1 graph


@pytest.mark.parametrize("link_loss", ["frobenius", "bce"])
def test_double_backward_torch_path(link_loss):
    g = fresh_generator()
    x, adj, s, mask, k = _inputs(2, 6, 4, 3, g)
    x, s = x.requires_grad_(), s.requires_grad_()

    def f(x, s):
        out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask, num_clusters=k, link_loss=link_loss)
        return (out**2).sum() + out_adj.sum() + link + ent

    assert torch.autograd.gradgradcheck(f, (x, s), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("link_loss", ["frobenius", "bce"])
def test_bce_skips_the_direct_link_recompute(monkeypatch, backend, link_loss):
    """Two cliques fit to 5e-4 (scale 12: the Frobenius identity cancels, so that graph's link is
    recomputed directly). The BCE link loss discards the Frobenius value: no recompute, and its
    values and gradients still match the per-graph reference."""
    from triton_cases import two_cliques

    from diffpool_fast.ops import link_exact

    calls = []
    real = link_exact.exact_link

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(link_exact, "exact_link", counting)
    # the Triton path's direct recompute: the residual passes (launched for every graph, each
    # deciding on the device whether its graph is flagged)
    from diffpool_fast.kernels import adjacency

    for name in ("link_residual", "link_residual_bwd"):
        monkeypatch.setattr(adjacency, name, (lambda real: lambda *a, **k: (calls.append(1), real(*a, **k))[1])(
            getattr(adjacency, name)))
    dt = torch.float32 if backend == "triton" else torch.float64
    x, adj, s = two_cliques(12.0, dtype=dt)
    x, adj, s = x.to(DEVICE), adj.to(DEVICE), s.to(DEVICE)
    mask = torch.ones(1, adj.shape[1], dtype=torch.bool, device=DEVICE)
    k = torch.full((1,), s.shape[2], dtype=torch.int64, device=DEVICE)
    if backend == "torch":
        _check(x, adj, s, mask, k, backend, 1e-9, link_loss=link_loss)
    else:
        # float32 at this saturation: grad s is ~1e-4 and rounds at ~2e-6 with or without the
        # recompute, so only the values are compared here (the other Triton tests check grads)
        sg = s.clone().requires_grad_()
        got = dense_diff_pool(x, adj, sg, mask, normalize=False, per_graph=True, backend=backend, link_loss=link_loss)
        ref = _reference(x.double().cpu(), adj.double().cpu(), s.double().cpu(), mask.cpu(), k.cpu(), link_loss)
        link = got[2].double().cpu() / (adj.shape[1] ** 2 if link_loss == "bce" else 1)
        _compare(link, ref[2], 1e-2, "link")
        _compare(got[3], ref[3], 1e-2, "ent")
        (gs,) = torch.autograd.grad(got[2].sum() + got[3].sum(), [sg])
        assert torch.isfinite(gs).all()
    assert (len(calls) > 0) == (link_loss == "frobenius"), calls
