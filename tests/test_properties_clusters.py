"""Property-based check of ``num_clusters`` and ``link_loss``: any shape, mask and k_b against
PyG's ``dense_diff_pool`` on each graph sliced to its n_b nodes and k_b columns (float64).

Budget: a few dozen examples in CI; ``DIFFPOOL_FAST_PROPERTY_EXAMPLES=N`` raises it (the Triton
property gets a tenth), as in tests/test_properties.py. The Triton property runs where the kernels
run (``triton_cases.DEVICE``: CUDA when present, else the interpreter on the CPU), with that
device's float32 tolerance; the reference stays on the CPU in float64.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_num_clusters import _reference, _scalar, _weights
from triton_cases import DEVICE, tolerance

from diffpool_fast import dense_diff_pool

_LONG = int(os.environ.get("DIFFPOOL_FAST_PROPERTY_EXAMPLES", "0") or 0)
_SET = dict(deadline=None, derandomize=False, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@st.composite
def cases(draw):
    B = draw(st.integers(1, 4))
    N = draw(st.integers(1, 15))
    C = draw(st.integers(1, 9))
    sizes = draw(st.lists(st.integers(0, N), min_size=B, max_size=B))
    ks = draw(st.lists(st.integers(1, C), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.5, 2.0, 8.0]))
    link_loss = draw(st.sampled_from(["frobenius", "bce"]))
    return B, N, C, sizes, ks, seed, scale, link_loss


def _build(B, N, C, sizes, ks, seed, scale, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    F = 3
    x = torch.randn(B, N, F, generator=g, dtype=torch.float64)
    s = scale * torch.randn(B, N, C, generator=g, dtype=torch.float64)
    a = (torch.rand(B, N, N, generator=g, dtype=torch.float64) < 0.4).double()
    mask = torch.arange(N)[None, :] < torch.tensor(sizes)[:, None]
    a = a * (mask[:, :, None] & mask[:, None, :])
    return x.to(dtype), a.to(dtype), s.to(dtype), mask, torch.tensor(ks), g


def _check(case, backend, dtype, tol, floor=1e-6, device="cpu"):
    """``floor``: the smallest scale errors are relative to (float32 rounds a saturated row's
    entropy, ~1e-8, to no better than ~1e-9 absolute). ``device``: where the op runs."""
    B, N, C, sizes, ks, seed, scale, link_loss = case
    x, adj, s, mask, k, g = _build(B, N, C, sizes, ks, seed, scale, dtype)
    w = _weights(B, C, 3, g)
    xr, sr = x.double().requires_grad_(), s.double().requires_grad_()
    ref = _reference(xr, adj.double(), sr, mask, k, link_loss)
    gref = torch.autograd.grad(_scalar(ref, w), [xr, sr], allow_unused=True)  # no real node: unused
    gref = [torch.zeros_like(v) if gv is None else gv for v, gv in zip((xr, sr), gref)]
    xg, sg = x.to(device).requires_grad_(), s.to(device).requires_grad_()
    adj_d, mask_d, k_d = adj.to(device), mask.to(device), k.to(device)
    got = list(dense_diff_pool(xg, adj_d, sg, mask_d, normalize=False, per_graph=True, num_clusters=k_d,
                               link_loss=link_loss, backend=backend))
    if link_loss == "bce":
        got[2] = got[2] / mask_d.sum(1).clamp_min(1).to(got[2].dtype) ** 2
    ggot = torch.autograd.grad(_scalar(got, w), [xg, sg])
    for name, a, b in zip(("out", "out_adj", "link", "ent", "grad x", "grad s"), got + list(ggot),
                          list(ref) + list(gref)):
        assert a.device.type == torch.device(device).type, f"{name} on {a.device}, not {device}"
        scale_ = max(float(b.detach().abs().max()) if b.numel() else 0.0, floor)
        err = float((a.detach().double().cpu() - b.detach()).abs().max()) if b.numel() else 0.0
        assert err <= tol * scale_, f"{name}: {err:.3g} > {tol} x {scale_:.3g} (case {case})"


@settings(max_examples=_LONG or 40, **_SET)
@given(case=cases())
def test_torch_path_matches_pyg_per_graph(case):
    _check(case, "torch", torch.float64, 1e-9)


@settings(max_examples=max(1, _LONG // 10) if _LONG else 4, **_SET)
@given(case=cases())
def test_triton_path_matches_pyg_per_graph(case):
    if case[-1] == "bce":  # the BCE sum is the same torch code on both backends
        case = case[:-1] + ("frobenius",)
    _check(case, "triton", torch.float32, max(5e-4, tolerance(torch.float32)), floor=1e-2, device=DEVICE)
