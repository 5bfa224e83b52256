"""Bad inputs raise clear errors naming the argument and the shapes."""
import re

import pytest
import torch

from diffpool_fast import dense_diff_pool


def ok(B=2, N=6, F=3, C=4):
    return torch.randn(B, N, F), torch.rand(B, N, N), torch.randn(B, N, C), torch.ones(B, N, dtype=torch.bool)


def call(x, adj, s, mask=None, **kw):
    return dense_diff_pool(x, adj, s, mask, backend="torch", **kw)


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda x, a, s, m: (x[:1], a, s, m), ValueError, r"batch sizes disagree.*x \[1, 6, 3\].*adj \[2, 6, 6\]"),
        (lambda x, a, s, m: (x, a[:, :5, :5], s, m), ValueError, r"node counts disagree.*adj \[2, 5, 5\]"),
        (lambda x, a, s, m: (x, a, s[:, :5], m), ValueError, r"node counts disagree.*s \[2, 5, 4\]"),
        (lambda x, a, s, m: (x, a[:, :, :5], s, m), ValueError, r"adj must be square.*\[2, 6, 5\]"),
        (lambda x, a, s, m: (x, a, s, m[:, :5]), ValueError, r"mask must have shape \[B, N\] = \[2, 6\].*\[2, 5\]"),
        (lambda x, a, s, m: (x, a, s, m.float() * 0.5), ValueError, r"mask of dtype torch.float32 must hold only 0 and 1"),
        (lambda x, a, s, m: (x, a, s, torch.ones(2, 6, dtype=torch.complex64)), TypeError, r"mask must be bool"),
        (lambda x, a, s, m: (x.long(), a, s, m), TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
        (lambda x, a, s, m: (x, a, s.int(), m), TypeError, r"s \(assignment logits\) must be a floating-point"),
        (lambda x, a, s, m: (x, a.long(), s, m), TypeError, r"adj must be floating point, bool or uint8, got dtype torch.int64"),
        (lambda x, a, s, m: (x[0, 0], a, s, m), ValueError, r"x must be \[B, N, F\].*1-D tensor of shape \[3\]"),
        (lambda x, a, s, m: (x, a.unsqueeze(0), s, m), ValueError, r"adj must be \[B, N, N\].*4-D"),
        (lambda x, a, s, m: (x.numpy(), a, s, m), TypeError, r"x must be a torch.Tensor, got ndarray"),
        (lambda x, a, s, m: (x, a, s, m.tolist()), TypeError, r"mask must be a torch.Tensor or None, got list"),
        (lambda x, a, s, m: (x, a, s, m.to("meta")), ValueError, r"one device.*mask on meta"),
        (lambda x, a, s, m: (x, a, s[..., :0], m), ValueError, r"at least one cluster"),
    ],
    ids=[
        "batch", "adj-nodes", "s-nodes", "adj-square", "mask-shape", "mask-fraction", "mask-complex",
        "x-int", "s-int", "adj-int", "x-1d", "adj-4d", "x-numpy", "mask-list", "device", "no-cluster",
    ],
)
def test_bad_input_errors(mutate, exc, pattern):
    args = mutate(*ok())
    with pytest.raises(exc, match=pattern):
        call(*args)


def test_bad_normalize_and_per_graph():
    x, a, s, m = ok()
    with pytest.raises(ValueError, match=r"normalize must be True, False or one of \('numel', 'none', 'graph'\), got 'mean'"):
        call(x, a, s, m, normalize="mean")
    with pytest.raises(TypeError, match="per_graph must be a bool"):
        call(x, a, s, m, per_graph="yes")


def test_accepted_mask_forms_agree():
    x, a, s, _ = ok()
    m = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    want = call(x, a, s, m)
    for form in (m.to(torch.uint8), m.float(), m.long(), m.unsqueeze(-1)):
        for got, w in zip(call(x, a, s, form), want):
            torch.testing.assert_close(got, w)
    # a 1-D mask for a batch of one (2-D inputs)
    got = call(x[0], a[0], s[0], m[0])
    for g1, w in zip(got, call(x[:1], a[:1], s[:1], m[:1])):
        torch.testing.assert_close(g1, w)


def test_empty_shapes_give_finite_losses():
    for B, N in ((2, 0), (0, 5)):
        out, out_adj, link, ent = call(torch.randn(B, N, 3), torch.zeros(B, N, N), torch.randn(B, N, 4))
        assert out.shape == (B, 4, 3) and out_adj.shape == (B, 4, 4)
        assert torch.isfinite(link) and torch.isfinite(ent)
