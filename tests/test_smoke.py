import torch

from diffpool_fast import dense_diff_pool
from diffpool_fast.ops.reference import dense_diff_pool_reference


def test_torch_path_matches_reference_float64():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, N, F, C = 3, 29, 6, 5
    x = torch.randn(B, N, F, dtype=torch.float64, generator=g)
    adj = (torch.rand(B, N, N, generator=g) < 0.2).double()
    s = torch.randn(B, N, C, dtype=torch.float64, generator=g)
    mask = torch.rand(B, N, generator=g) < 0.7
    mask[0] = False
    for got, want in zip(
        dense_diff_pool(x, adj, s, mask, backend="torch"), dense_diff_pool_reference(x, adj, s, mask)
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
