"""A table of bad inputs and the error each gets.

Every row is (id, how to break a good call, exception type, text the message must contain). The
text names the argument (and, for shape errors, the shapes). The type must be exactly TypeError
(wrong kind: not a tensor, sparse or nested, wrong dtype or option type) or ValueError (wrong
rank, shape, device or values): never an internal RuntimeError from deep inside a backend.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpool_fast import dense_diff_pool

# building the sparse and nested bad inputs warns that those APIs are beta/prototype
pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype"),
]

B, N, F, C = 2, 6, 3, 4


def good():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, F, generator=g)
    adj = (torch.rand(B, N, N, generator=g) < 0.4).float()
    s = torch.randn(B, N, C, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return dict(x=x, adj=adj, s=s, mask=mask, normalize=True, backend="torch")


def with_(**changes):
    """A mutation that replaces arguments; a callable value gets the good value."""
    def mutate(kw):
        for k, v in changes.items():
            kw[k] = v(kw[k]) if callable(v) else v
        return kw
    return mutate


def _nested(x):
    return torch.nested.nested_tensor([x[0], x[1, :4]])


def _jagged(x):
    return torch.nested.nested_tensor([x[0], x[1, :4]], layout=torch.jagged)


def _float_mask(value):
    def make(m):
        m = m.float()
        m[0, 0] = value
        return m
    return make


T, V = TypeError, ValueError

NORM = "normalize must be True, False or one of ('numel', 'none', 'graph'), got "
SYM = "adj_symmetric must be None, True or False, got "
BACK = "backend must be one of ('auto', 'torch', 'triton'), got "
BACK_STR = "backend must be a str, one of ('auto', 'torch', 'triton'), got "
MASK_SHAPE = "mask must have shape [B, N] = [2, 6] to match x [2, 6, 3], got "
DENSE = "must be a dense (strided) tensor, got"
FLOAT = "must be a floating-point tensor, got dtype"
ADJ_DTYPE = "adj must be floating point, bool or uint8, got dtype "

ROWS = [
    # not tensors
    ("x-list", with_(x=lambda x: x.tolist()), T, "x must be a torch.Tensor, got list"),
    ("x-numpy", with_(x=lambda x: x.numpy()), T, "x must be a torch.Tensor, got ndarray"),
    ("adj-none", with_(adj=None), T, "adj must be a torch.Tensor, got NoneType"),
    ("s-float", with_(s=1.0), T, "s must be a torch.Tensor, got float"),
    ("mask-list", with_(mask=lambda m: m.tolist()), T, "mask must be a torch.Tensor or None, got list"),
    ("mask-numpy", with_(mask=lambda m: m.numpy()), T, "mask must be a torch.Tensor or None, got ndarray"),
    # ranks
    ("x-0d", with_(x=torch.tensor(1.0)), V, "x must be [B, N, F]"),
    ("x-1d", with_(x=lambda x: x[0, 0]), V,
     "x must be [B, N, F] (or the same without the batch dimension), got a 1-D tensor of shape [3]"),
    ("x-4d", with_(x=lambda x: x[None]), V, "x must be [B, N, F]"),
    ("adj-1d", with_(adj=lambda a: a[0, 0]), V, "adj must be [B, N, N]"),
    ("adj-4d", with_(adj=lambda a: a[None]), V, "adj must be [B, N, N]"),
    ("s-1d", with_(s=lambda s: s[0, 0]), V, "s must be [B, N, C]"),
    ("s-4d", with_(s=lambda s: s[None]), V, "s must be [B, N, C]"),
    # shapes that disagree
    ("x-batch", with_(x=lambda x: x[:1]), V, "batch sizes disagree: x [1, 6, 3], adj [2, 6, 6], s [2, 6, 4]"),
    ("adj-batch", with_(adj=lambda a: torch.cat([a, a[:1]])), V, "adj [3, 6, 6]"),
    ("s-batch", with_(s=lambda s: s[:1]), V, "batch sizes disagree: x [2, 6, 3], adj [2, 6, 6], s [1, 6, 4]"),
    ("x-2d-batch-2", with_(x=lambda x: x[0]), V, "batch sizes disagree: x [6, 3]"),
    ("adj-nodes", with_(adj=lambda a: a[:, :5, :5]), V,
     "node counts disagree: x [2, 6, 3] has N=6, adj [2, 5, 5] has N=5"),
    ("s-nodes", with_(s=lambda s: s[:, :5]), V, "s [2, 5, 4] has N=5"),
    ("adj-not-square", with_(adj=lambda a: a[:, :, :5]), V,
     "adj must be square in its last two dimensions, got shape [2, 6, 5]"),
    ("no-cluster", with_(s=lambda s: s[..., :0]), V, "s must have at least one cluster, got shape [2, 6, 0]"),
    # dtypes
    ("x-int", with_(x=lambda x: x.long()), T, "x " + FLOAT + " torch.int64"),
    ("x-bool", with_(x=lambda x: x > 0), T, "x " + FLOAT + " torch.bool"),
    ("x-complex", with_(x=lambda x: x.to(torch.complex64)), T, "x " + FLOAT + " torch.complex64"),
    ("s-int", with_(s=lambda s: s.int()), T, "s (assignment logits) " + FLOAT + " torch.int32"),
    ("s-complex", with_(s=lambda s: s.to(torch.complex128)), T, "s (assignment logits) " + FLOAT + " torch.complex128"),
    ("adj-int16", with_(adj=lambda a: a.to(torch.int16)), T, ADJ_DTYPE + "torch.int16"),
    ("adj-int8", with_(adj=lambda a: a.to(torch.int8)), T, ADJ_DTYPE + "torch.int8"),
    ("adj-int64", with_(adj=lambda a: a.long()), T, ADJ_DTYPE + "torch.int64"),
    ("adj-complex", with_(adj=lambda a: a.to(torch.complex64)), T, ADJ_DTYPE + "torch.complex64"),
    # layouts and kinds of tensors
    ("adj-sparse-coo", with_(adj=lambda a: a.to_sparse()), T, "adj " + DENSE + " layout torch.sparse_coo"),
    ("adj-sparse-csr", with_(adj=lambda a: torch.eye(N).expand(B, N, N).to_sparse_csr()), T,
     "adj " + DENSE + " layout torch.sparse_csr"),
    ("adj-2d-sparse-csr", with_(adj=lambda a: a[0].to_sparse_csr(), x=lambda x: x[0], s=lambda s: s[0], mask=None), T,
     "adj " + DENSE + " layout torch.sparse_csr"),
    ("x-sparse-coo", with_(x=lambda x: x.to_sparse()), T, "x " + DENSE + " layout torch.sparse_coo"),
    ("s-sparse-coo", with_(s=lambda s: s.to_sparse()), T, "s " + DENSE + " layout torch.sparse_coo"),
    ("mask-sparse", with_(mask=lambda m: m.to_sparse()), T, "mask " + DENSE + " layout torch.sparse_coo"),
    ("x-nested", with_(x=_nested), T, "x " + DENSE + " a nested tensor"),
    ("x-nested-jagged", with_(x=_jagged), T, "x " + DENSE + " a nested tensor"),
    ("adj-nested", with_(adj=_nested), T, "adj " + DENSE + " a nested tensor"),
    # devices
    ("all-meta", with_(x=lambda x: x.to("meta"), adj=lambda a: a.to("meta"), s=lambda s: s.to("meta"),
                       mask=lambda m: m.to("meta")), V, "x, adj, s and mask are on the meta device"),
    ("all-meta-no-mask", with_(x=lambda x: x.to("meta"), adj=lambda a: a.to("meta"), s=lambda s: s.to("meta"),
                               mask=None), V, "x, adj, s are on the meta device"),
    ("adj-meta", with_(adj=lambda a: a.to("meta")), V,
     "x, adj, s and mask must be on one device, got x on cpu, adj on meta"),
    ("mask-meta", with_(mask=lambda m: m.to("meta")), V, "mask on meta"),
    # masks
    ("mask-short", with_(mask=lambda m: m[:, :5]), V, MASK_SHAPE + "[2, 5]"),
    ("mask-flat", with_(mask=lambda m: m.reshape(-1)), V, MASK_SHAPE + "[12]"),
    ("mask-transposed", with_(mask=lambda m: m.t()), V, MASK_SHAPE + "[6, 2]"),
    ("mask-3d", with_(mask=lambda m: m[..., None].expand(B, N, 2)), V, "mask must have shape [B, N] = [2, 6]"),
    ("mask-complex", with_(mask=lambda m: m.to(torch.complex64)), T,
     "mask must be bool (or 0/1 integers or floats), got dtype torch.complex64"),
    ("mask-half", with_(mask=_float_mask(0.5)), V, "mask of dtype torch.float32 must hold only 0 and 1"),
    ("mask-nan", with_(mask=_float_mask(float("nan"))), V, "mask of dtype torch.float32 must hold only 0 and 1"),
    ("mask-minus-one", with_(mask=_float_mask(-1.0)), V, "mask of dtype torch.float32 must hold only 0 and 1"),
    ("mask-two", with_(mask=lambda m: m.long() * 2), V, "mask of dtype torch.int64 must hold only 0 and 1"),
    ("mask-uint8-255", with_(mask=lambda m: m.to(torch.uint8) * 255), V,
     "mask of dtype torch.uint8 must hold only 0 and 1"),
    # normalize
    ("normalize-mean", with_(normalize="mean"), V, NORM + "'mean'"),
    ("normalize-Graph", with_(normalize="Graph"), V, NORM + "'Graph'"),
    ("normalize-empty", with_(normalize=""), V, "normalize must be"),
    ("normalize-1", with_(normalize=1), T, NORM + "int 1"),
    ("normalize-0", with_(normalize=0), T, NORM + "int 0"),
    ("normalize-float", with_(normalize=1.0), T, NORM + "float"),
    ("normalize-tensor", with_(normalize=torch.tensor(True)), T, NORM + "torch.Tensor"),
    ("normalize-numpy-bool", with_(normalize=np.True_), T, NORM + "numpy.bool"),
    ("normalize-list", with_(normalize=["graph"]), T, NORM + "list"),
    # keyword options
    ("per_graph-yes", with_(per_graph="yes"), T, "per_graph must be a bool, got str 'yes'"),
    ("per_graph-1", with_(per_graph=1), T, "per_graph must be a bool, got int 1"),
    ("per_graph-none", with_(per_graph=None), T, "per_graph must be a bool, got NoneType"),
    ("per_graph-tensor", with_(per_graph=torch.tensor(True)), T, "per_graph must be a bool, got torch.Tensor"),
    ("adj_symmetric-1", with_(adj_symmetric=1), T, SYM + "int 1"),
    ("adj_symmetric-0", with_(adj_symmetric=0), T, SYM + "int 0"),
    ("adj_symmetric-yes", with_(adj_symmetric="yes"), T, SYM + "str 'yes'"),
    ("adj_symmetric-numpy", with_(adj_symmetric=np.True_), T, SYM + "numpy.bool"),
    ("adj_symmetric-tensor", with_(adj_symmetric=torch.tensor(True)), T, SYM + "torch.Tensor"),
    ("backend-cuda", with_(backend="cuda"), V, BACK + "'cuda'"),
    ("backend-Torch", with_(backend="Torch"), V, BACK + "'Torch'"),
    ("backend-none", with_(backend=None), T, BACK_STR + "NoneType None"),
    ("backend-int", with_(backend=1), T, BACK_STR + "int 1"),
    ("backend-list", with_(backend=["torch"]), T, "backend must be a str"),
]


def test_the_table_is_long_and_ids_are_unique():
    ids = [r[0] for r in ROWS]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("mutate, exc, text", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_raises_a_clear_error(mutate, exc, text, monkeypatch):
    monkeypatch.delenv("DIFFPOOL_FAST_BACKEND", raising=False)
    kw = mutate(good())
    args = [kw.pop(k) for k in ("x", "adj", "s", "mask", "normalize")]
    with pytest.raises(Exception) as info:
        dense_diff_pool(*args, **kw)
    assert info.type is exc, f"{info.type.__name__} instead of {exc.__name__}: {info.value}"
    assert text in str(info.value), f"{text!r} not in {str(info.value)!r}"


def test_the_good_call_works():
    kw = good()
    args = [kw.pop(k) for k in ("x", "adj", "s", "mask", "normalize")]
    out, out_adj, link, ent = dense_diff_pool(*args, **kw)
    assert out.shape == (B, C, F) and out_adj.shape == (B, C, C)
    assert torch.isfinite(link) and torch.isfinite(ent)


def test_a_bad_backend_is_named_even_when_the_environment_overrides_it(monkeypatch):
    monkeypatch.setenv("DIFFPOOL_FAST_BACKEND", "torch")
    kw = good()
    args = [kw.pop(k) for k in ("x", "adj", "s", "mask", "normalize")]
    with pytest.raises(ValueError, match="backend must be one of"):
        dense_diff_pool(*args, backend="cuda")
