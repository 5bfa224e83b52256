"""The Triton step as torch.library ops: opcheck, fake tensors, torch.compile, dispatch fallback."""
from __future__ import annotations

import warnings

import pytest
import torch
from triton_cases import DEVICE, assert_close_scaled, fresh_generator, make_inputs

from diffpool_fast import BACKEND_ENV, dense_diff_pool
from diffpool_fast.ops import dispatch
from diffpool_fast.ops.coarsen_triton import coarsen_triton, unsupported_reason

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
f32 = torch.float32
# the op's plan arguments: sym_mode, mode (numel), per_graph, exact, parts, result dtype code (fp32)
PLAN = ("check", 0, False, True, 3, 0)


def test_opcheck_forward_and_backward_ops():
    """Schema, fake (meta) implementation, autograd registration: torch.library.opcheck."""
    g = fresh_generator()
    x, adj, s, mask = make_inputs(2, 21, 6, 5, f32, f32, "pad", "asym", g)
    x.requires_grad_()
    s.requires_grad_()
    adj.requires_grad_()
    torch.library.opcheck(torch.ops.diffpool_fast.coarsen.default, (x, adj, s, mask, None) + PLAN,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_fake_tensor_shapes_without_running_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 17, 9)
        adj = torch.empty(3, 17, 17, dtype=torch.bool)
        s = torch.empty(3, 17, 4, dtype=torch.bfloat16)
        out, out_adj, link_sq, ent_sum = coarsen_triton(x, adj, s, None)
    assert out.shape == (3, 4, 9) and out.dtype == f32
    assert out_adj.shape == (3, 4, 4) and out_adj.dtype == f32
    assert link_sq.shape == (3,) and link_sq.dtype == torch.float64
    assert ent_sum.shape == (3,) and ent_sum.dtype == torch.float64


def test_torch_compile_fullgraph_forward_backward():
    """dense_diff_pool(backend="triton") inside torch.compile(fullgraph=True): no graph break,
    same values and gradients as eager. aot_eager runs AOTAutograd (the custom ops' autograd
    and fake implementations) without inductor's C++ toolchain, which CPU CI does not need."""
    g = fresh_generator()
    x, adj, s, mask = make_inputs(2, 23, 7, 6, f32, f32, "pad", "sym", g)

    def step(x, adj, s, mask):
        out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask, backend="triton")
        return out.square().sum() + out_adj.sum() + link + ent

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    xe, se = x.clone().requires_grad_(), s.clone().requires_grad_()
    xc, sc = x.clone().requires_grad_(), s.clone().requires_grad_()
    le = step(xe, adj, se, mask)
    lc = compiled(xc, adj, sc, mask)
    le.backward()
    lc.backward()
    assert_close_scaled(lc, le, 1e-6, "loss")
    assert_close_scaled(xc.grad, xe.grad, 1e-6, "grad x")
    assert_close_scaled(sc.grad, se.grad, 1e-6, "grad s")


def test_unsupported_inputs_fall_back_with_one_warning(monkeypatch):
    g = fresh_generator()
    x, adj, s, mask = make_inputs(2, 9, 600, 4, f32, f32, "pad", "sym", g)
    reason = unsupported_reason(x, adj, s, mask)
    assert reason is not None and "C=600" in reason
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falling back to the torch path.*C=600"):
        got = dense_diff_pool(x, adj, s, mask, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        dense_diff_pool(x, adj, s, mask, backend="triton")
    want = dense_diff_pool(x, adj, s, mask, backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("what", ["x_float64", "adj_int32", "empty"])
def test_unsupported_reason_names_the_problem(what):
    x = torch.randn(2, 5, 3, device=DEVICE)
    adj = torch.rand(2, 5, 5, device=DEVICE)
    s = torch.randn(2, 5, 4, device=DEVICE)
    if what == "x_float64":
        x = x.double()
        assert "float64" in unsupported_reason(x, adj, s, None)
    elif what == "adj_int32":
        adj = adj.to(torch.int32)
        assert "int32" in unsupported_reason(x, adj, s, None)
    else:
        x, adj, s = x[:, :0], adj[:, :0, :0], s[:, :0]
        assert "empty" in unsupported_reason(x, adj, s, None)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter requirement concerns CPU tensors")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, adj, s = torch.randn(1, 4, 3), torch.rand(1, 4, 4), torch.randn(1, 4, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dense_diff_pool(x, adj, s, backend="triton")


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("parts", [3, 2])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["numel", "none", "graph"])
def test_opcheck_with_plan_arguments_and_flags(parts, mode):
    """The op takes the product precision (bf16 parts) and the losses' normalisation as arguments
    and returns the per-graph flags of graphs whose link is recomputed directly (fin[:, 3]):
    schema, fake tensors, autograd registration."""
    g = fresh_generator()
    x, adj, s, mask = make_inputs(2, 21, 6, 5, f32, f32, "pad", "asym", g)
    # graph 0 near an exact fit (flagged), graph 1 random
    adj[0] = 0
    adj[0, :10, :10] = 1
    adj[0, 10:, 10:] = 1
    s[0] = 0
    s[0, :10, 0] = 12.0
    s[0, 10:, 1] = 12.0
    mask[0] = True
    x.requires_grad_()
    s.requires_grad_()
    args = (x, adj, s, mask, None, "check", mode, mode == 2, True, parts, 0)
    outs = torch.ops.diffpool_fast.coarsen(*args)
    assert len(outs) == 12
    assert outs[9][:, 3].tolist() == [1.0, 0.0], outs[9]
    torch.library.opcheck(torch.ops.diffpool_fast.coarsen.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_and_compile_with_num_clusters():
    """The op with its num_clusters argument: opcheck, and torch.compile(fullgraph=True) of
    dense_diff_pool(num_clusters=...) equals eager (the range check is an in-graph assertion)."""
    g = fresh_generator()
    x, adj, s, mask = make_inputs(3, 19, 7, 5, f32, f32, "pad", "sym", g)
    k = torch.tensor([1, 7, 4], dtype=torch.int32, device=DEVICE)
    x.requires_grad_()
    s.requires_grad_()
    torch.library.opcheck(torch.ops.diffpool_fast.coarsen.default, (x, adj, s, mask, k) + PLAN,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def step(x, adj, s, mask, k):
        out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask, backend="triton", num_clusters=k)
        return out.square().sum() + out_adj.sum() + link + ent

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    xe, se = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    xc, sc = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    le, lc = step(xe, adj, se, mask, k), compiled(xc, adj, sc, mask, k)
    le.backward()
    lc.backward()
    assert_close_scaled(lc, le, 1e-6, "loss")
    assert_close_scaled(sc.grad, se.grad, 1e-6, "grad s")
    assert (sc.grad[0, :, 1:] == 0).all()
