"""Shared helpers of the Triton tests: random inputs, NaN-poisoned allocations, tolerances, the
two-clique near-fit case (also used by test_numerics.py).

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), where ``tl.dot`` is a NumPy
fp32 matmul (of the bf16 parts the kernels split fp32 operands into, kernels/split.py); on CUDA
the same parts run on tensor cores, with libdevice's exp and log, so the tolerances below are per
device and per dtype.
"""
from __future__ import annotations

import contextlib
import math

import torch

from diffpool_fast.profiling.accuracy import two_cliques  # noqa: F401  (the tests take it from here)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.bool: "bool", torch.uint8: "u8"}


def fresh_generator() -> torch.Generator:
    """A generator seeded differently every run (the seed is printed on failure by pytest -l)."""
    seed = torch.seed() % 2**31
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def make_inputs(B, N, C, F, xs_dtype, adj_dtype, mask_mode, sym, g):
    """x [B,N,F], adj [B,N,N], s [B,N,C], mask. mask_mode: "none", or "pad" (random padding,
    graph 0 keeps >= 1 real node, graph 1 fully padded when B > 1). sym: "sym", "asym" or
    "mixed" (graph 0 symmetric, the others not)."""
    x = torch.randn(B, N, F, generator=g)
    s = 2.0 * torch.randn(B, N, C, generator=g)
    if adj_dtype in (torch.bool, torch.uint8):
        a = (torch.rand(B, N, N, generator=g) < 0.3).to(torch.float32)
        if adj_dtype == torch.uint8:  # a weighted byte adjacency, weights 1..3
            a = a * torch.randint(1, 4, (B, N, N), generator=g).to(torch.float32)
    else:
        a = torch.rand(B, N, N, generator=g) * (torch.rand(B, N, N, generator=g) < 0.4)
    if sym in ("sym", "mixed"):
        up = torch.triu(a)
        symm = up + torch.triu(a, 1).transpose(1, 2)
        if sym == "sym":
            a = symm
        else:
            a = a.clone()
            a[0] = symm[0]
    mask = None
    if mask_mode == "pad":
        sizes = torch.randint(1, N + 1, (B,), generator=g)
        sizes[0] = max(1, N - 5)
        if B > 1:
            sizes[1] = 0
        mask = torch.arange(N)[None, :] < sizes[:, None]
    x = x.to(xs_dtype).to(DEVICE)
    s = s.to(xs_dtype).to(DEVICE)
    adj = (a != 0 if adj_dtype == torch.bool else a.to(adj_dtype)).to(DEVICE)
    if mask is not None:
        mask = mask.to(DEVICE)
    return x, adj, s, mask


@contextlib.contextmanager
def nan_poisoned_allocations():
    """Fill every tensor from torch.empty / empty_like with NaN (floats) or -7 (integers),
    so an element a kernel forgets to write fails the comparison instead of passing as 0."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.requires_grad:  # a leaf made to require grad (torch 2.11's checkpoint) cannot be filled in place
            return t
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype != torch.bool and t.numel():
            t.fill_(-7)
        return t

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def tolerance(dtype: torch.dtype) -> float:
    """Allowed max error relative to the largest reference magnitude of a tensor.

    Interpreter: the split products in NumPy fp32, so fp32 rounding only; CUDA: the same split
    products on tensor cores (fp32-grade under torch's default "highest" precision), with a
    margin for the order of their accumulation and libdevice's exp and log. Half-precision
    results add their own rounding.
    """
    base = 2e-5 if DEVICE == "cpu" else 1e-4
    if dtype == torch.float16:
        return max(base, 2e-3)
    if dtype == torch.bfloat16:
        return max(base, 1.6e-2)
    return base


def assert_close_scaled(got, want, tol, name, scale=None):
    got = got.detach().to(torch.float64).cpu()
    want = want.detach().to(torch.float64).cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element?)"
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 1.0
    scale = max(float(scale), 1e-6)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.1e} x scale {scale:.3e}"


