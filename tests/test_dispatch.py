"""The one dispatch point: backend names, the environment override, clear errors."""
import pytest
import torch

from diffpool_fast import BACKEND_ENV, dense_diff_pool
from diffpool_fast.dispatch import resolve_backend


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        dense_diff_pool(torch.randn(1, 3, 2), torch.rand(1, 3, 3), torch.randn(1, 3, 2), backend="cuda")


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
