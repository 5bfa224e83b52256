"""The one dispatch point: backend names, the environment override, clear errors."""
import os

import pytest
import torch

from diffpool_fast import BACKEND_ENV, dense_diff_pool
from diffpool_fast.ops.dispatch import resolve_backend


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        dense_diff_pool(torch.randn(1, 3, 2), torch.rand(1, 3, 3), torch.randn(1, 3, 2), backend="cuda")


@pytest.mark.parametrize("backend", [None, 1, ["torch"], b"torch"])
def test_a_backend_that_is_not_a_str_is_a_type_error(monkeypatch, backend):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    with pytest.raises(TypeError, match=r"backend must be a str, one of \('auto', 'torch', 'triton'\)"):
        resolve_backend(backend, torch.device("cpu"))


def test_the_argument_is_checked_even_when_the_environment_overrides_it(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(TypeError, match="backend must be a str"):
        resolve_backend(None, torch.device("cpu"))


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("triton", torch.device("cpu")) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV}='fast'"):
        resolve_backend("auto", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")) == "triton"


@pytest.mark.parametrize("adj_symmetric", [None, True])
def test_public_function_on_the_triton_path_matches_the_torch_path(monkeypatch, adj_symmetric):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, N, F, C = 3, 45, 6, 11
    a = torch.rand(B, N, N, generator=g) < 0.2
    mask = torch.arange(N)[None] < torch.tensor([45, 20, 0])[:, None]
    adj = ((a | a.mT) & mask[:, :, None] & mask[:, None, :]).to(device)
    x = torch.randn(B, N, F, generator=g).to(device)
    s = torch.randn(B, N, C, generator=g).to(device)
    mask = mask.to(device)
    results = {}
    for backend in ("torch", "triton"):
        xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        outs = dense_diff_pool(xs, adj, ss, mask, "graph", backend=backend, adj_symmetric=adj_symmetric)
        (outs[0].square().sum() + outs[1].square().sum() + outs[2] + outs[3]).backward()
        results[backend] = [o.detach() for o in outs] + [xs.grad, ss.grad]
    for t, r in zip(results["triton"], results["torch"]):
        # tf32 on a GPU; exact fp32 under the interpreter
        torch.testing.assert_close(t, r, rtol=5e-3, atol=5e-4)
