"""The torch path never builds a B x N x N intermediate (it reads adj, it does not copy it)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffpool_fast import dense_diff_pool
from diffpool_fast.ops import coarsen_torch


class LargestAllocation(TorchDispatchMode):
    """Records the largest new storage (in bytes) any ATen op returns; views of inputs are free."""

    def __init__(self, *inputs):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in inputs}
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in self.seen:
                continue
            self.seen.add(storage.data_ptr())
            if storage.nbytes() > self.largest:
                self.largest, self.op = storage.nbytes(), func
        return out


@pytest.mark.parametrize("adj_dtype", [torch.float32, torch.bool, torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, "graph"])
def test_no_n_by_n_intermediate_forward_and_backward(adj_dtype, normalize, monkeypatch):
    B, N, F, C = 3, 96, 8, 5
    # Converting a bool/uint8/bf16 adjacency goes a few graphs at a time: shrink the chunk to one
    # graph so that a whole-batch conversion would show.
    monkeypatch.setattr(coarsen_torch, "CONVERT_CHUNK_BYTES", N * N * 4)
    x = torch.randn(B, N, F, requires_grad=True)
    s = torch.randn(B, N, C, requires_grad=True)
    adj = (torch.rand(B, N, N) < 0.1).to(adj_dtype)
    mask = torch.rand(B, N) < 0.8
    with LargestAllocation(x, s, adj, mask) as rec:
        out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask, normalize, backend="torch")
        (out.sum() + out_adj.sum() + link + ent).backward()
    # Allowed: [B, N, C or F] tensors up to 8 bytes an entry, and one converted graph (N x N,
    # int64 for uint8 squares). A B x N x N fp32 tensor (B*N*N*4 bytes) fails.
    limit = max(B * N * max(C, F) * 8, N * N * 8)
    assert limit < B * N * N * 4
    assert rec.largest <= limit, f"{rec.op} returned {rec.largest} bytes (limit {limit})"


def test_pyg_does_build_it():
    # The check above can fail: PyG's function trips it.
    pyg = pytest.importorskip("torch_geometric.nn")
    B, N, F, C = 3, 96, 8, 5
    x, s, adj = torch.randn(B, N, F), torch.randn(B, N, C), torch.rand(B, N, N)
    with LargestAllocation(x, s, adj) as rec:
        pyg.dense_diff_pool(x, adj, s)
    assert rec.largest >= B * N * N * 4
