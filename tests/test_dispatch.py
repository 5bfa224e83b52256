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


# ------------------------------------------------------------------------------ the measured table
# backend="auto" on CUDA reads diffpool_fast/ops/dispatch_table.json: per device capability and
# shape bucket, the path measured faster. A CUDA device is faked here: a torch.device("cuda", 0)
# descriptor (no CUDA call) and a capability put in the per-device cache.

import json  # noqa: E402

from diffpool_fast.ops import dispatch, dispatch_table  # noqa: E402

CUDA0 = torch.device("cuda", 0)


def _table(cap="9.0", **choices):
    """A table document: bucket name 'N512-C128-F128-float32-float32' -> backend."""
    buckets = []
    for name, backend in choices.items():
        n, c, f, dt, adt = name.split("_")
        buckets.append({"nodes": int(n[1:]), "clusters": int(c[1:]), "features": int(f[1:]), "dtype": dt,
                        "adj_dtype": adt, "backend": backend})
    return {"format": 1, "capabilities": {cap: {"device": "fake", "buckets": buckets}}}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Device 0 reports capability (9, 0); the packaged table comes back afterwards."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "TRITON_IMPORTABLE", True)
    monkeypatch.setattr(dispatch_table, "_capability_cache", {0: (9, 0)})
    yield
    dispatch_table.use(None)


def test_buckets_round_n_c_f_up_to_powers_of_two():
    assert [dispatch_table.next_pow2(n) for n in (0, 1, 2, 3, 100, 128, 129, 300, 512)] == [1, 1, 2, 4, 128, 128, 256, 512, 512]
    x, adj, s = torch.zeros(2, 300, 3), torch.zeros(2, 300, 300, dtype=torch.bool), torch.zeros(2, 300, 100)
    assert dispatch_table.bucket_of(x, adj, s) == (512, 128, 4, "float32", "bool")
    assert dispatch_table.bucket_of(x, adj.to(torch.int32), s) is None  # no name for int32: no bucket


def test_auto_on_cuda_takes_the_table_choice_per_bucket_and_capability(fake_gpu):
    dispatch_table.use(_table(N512_C128_F128_float32_float32="torch", N1024_C128_F128_float32_float32="triton"))
    torch_bucket = dispatch_table.bucket(300, 100, 128, "float32", "float32")
    assert resolve_backend("auto", CUDA0, key=torch_bucket) == "torch"
    assert resolve_backend("auto", CUDA0, key=dispatch_table.bucket(1000, 128, 128, "float32", "float32")) == "triton"
    # another adjacency dtype, another bucket, no key, another capability: the default, Triton
    assert resolve_backend("auto", CUDA0, key=dispatch_table.bucket(300, 100, 128, "float32", "bool")) == "triton"
    assert resolve_backend("auto", CUDA0) == "triton"
    dispatch_table._capability_cache[0] = (8, 0)
    assert resolve_backend("auto", CUDA0, key=torch_bucket) == "triton"
    dispatch_table._capability_cache[0] = (9, 0)
    # an explicit backend is never replaced by the table
    assert resolve_backend("triton", CUDA0, key=torch_bucket) == "triton"
    # CPU tensors: torch, whatever the table says
    dispatch_table.use(_table(N512_C128_F128_float32_float32="triton"))
    assert resolve_backend("auto", torch.device("cpu"), key=torch_bucket) == "torch"


def test_an_unmeasured_f_takes_the_choice_all_measured_f_agree_on(fake_gpu):
    def f(features):
        return dispatch_table.bucket(512, 128, features, "float32", "float32")

    dispatch_table.use(_table(N512_C128_F128_float32_float32="torch", N512_C128_F256_float32_float32="torch"))
    assert resolve_backend("auto", CUDA0, key=f(32)) == "torch"
    assert "F not measured" in dispatch_table.describe(CUDA0, f(32))
    dispatch_table.use(_table(N512_C128_F128_float32_float32="torch", N512_C128_F256_float32_float32="triton"))
    assert resolve_backend("auto", CUDA0, key=f(32)) == "triton"  # they disagree: the default
    assert "not in the table" in dispatch_table.describe(CUDA0, f(32))
    assert resolve_backend("auto", CUDA0, key=f(128)) == "torch"
    # another C is not borrowed
    assert resolve_backend("auto", CUDA0, key=dispatch_table.bucket(512, 64, 128, "float32", "float32")) == "triton"


def test_the_environment_variable_still_overrides_the_table(fake_gpu, monkeypatch):
    dispatch_table.use(_table(N512_C128_F128_float32_float32="torch"))
    key = dispatch_table.bucket(512, 128, 128, "float32", "float32")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend("auto", CUDA0, key=key) == "triton"
    dispatch_table.use(_table(N512_C128_F128_float32_float32="triton"))
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("auto", CUDA0, key=key) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend("torch", CUDA0, key=key) == "triton"  # the variable's auto reads the table


def test_without_triton_auto_is_torch_even_where_the_table_says_triton(fake_gpu, monkeypatch):
    dispatch_table.use(_table(N512_C128_F128_float32_float32="triton"))
    monkeypatch.setattr(dispatch, "TRITON_IMPORTABLE", False)
    assert resolve_backend("auto", CUDA0, key=dispatch_table.bucket(512, 128, 128, "float32", "float32")) == "torch"


def test_coarsen_passes_the_bucket_of_its_inputs(monkeypatch):
    seen = []

    def spy(backend, device, key=None):
        seen.append((backend, key))
        return "torch"

    monkeypatch.setattr(dispatch, "resolve_backend", spy)
    x, s = torch.randn(2, 37, 5), torch.randn(2, 37, 9)
    adj = torch.rand(2, 37, 37) < 0.3
    dispatch.coarsen(x, adj, s, None, "auto")
    assert seen == [("auto", (64, 16, 8, "float32", "bool"))]


def test_the_capability_is_read_once_per_device(monkeypatch):
    calls = []

    class Props:
        major, minor = 9, 0

    def props(index):
        calls.append(index)
        return Props()

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(dispatch_table, "_capability_cache", {})
    for _ in range(5):
        assert dispatch_table.capability(CUDA0) == (9, 0)
    assert dispatch_table.capability(torch.device("cuda", 1)) == (9, 0)
    assert calls == [0, 1]


def test_a_lookup_reads_no_file(fake_gpu, monkeypatch):
    dispatch_table.use(_table(N512_C128_F128_float32_float32="torch"))

    def no_io(*a, **k):
        raise AssertionError("file IO in a lookup")

    key = dispatch_table.bucket(512, 128, 128, "float32", "float32")
    with monkeypatch.context() as m:
        m.setattr(dispatch_table, "read", no_io)
        m.setattr("builtins.open", no_io)
        assert all(resolve_backend("auto", CUDA0, key=key) == "torch" for _ in range(100))


def test_the_choice_traces_under_torch_compile_fullgraph(fake_gpu):
    """The lookup is plain Python on ints and strings: dynamo traces it without a graph break
    (backend="eager": only the tracing is tested, no compiler is needed)."""
    dispatch_table.use(_table(N512_C128_F128_float32_float32="torch", N64_C16_F8_float32_float32="triton"))

    def f(x, adj, s):
        chosen = resolve_backend("auto", CUDA0, dispatch_table.bucket_of(x, adj, s))
        return x * (1.0 if chosen == "torch" else 2.0)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.ones(1, 300, 128)
    assert float(compiled(x, torch.zeros(1, 300, 300), torch.zeros(1, 300, 100)).max()) == 1.0
    x = torch.ones(1, 40, 5)
    assert float(compiled(x, torch.zeros(1, 40, 40), torch.zeros(1, 40, 9)).max()) == 2.0


def test_the_packaged_table_is_valid_and_says_where_it_was_measured():
    data = dispatch_table.read(dispatch_table.DEFAULT_PATH)
    choices, meta = dispatch_table.parse(data)
    h200 = meta[(9, 0)]
    # a provisional seed names its run; a measured section its source and command
    if h200.get("provisional"):
        assert h200["commit"] == "a09dd67" and h200["date"] == "2026-12-04" and "PROVISIONAL" in h200["source"]
    else:
        assert h200["source"] and h200["command"] and h200["versions"]["triton"]
    for section in data["capabilities"].values():
        for b in section["buckets"]:
            # each bucket's choice is the faster of our two paths over its measured cases
            cases = b["cases"]
            assert cases, b
            import math

            gm = math.exp(sum(math.log(c["triton_ms"] / c["torch_ms"]) for c in cases) / len(cases))
            assert b["backend"] == ("triton" if gm < 1 else "torch"), b
            for c in cases:
                assert dispatch_table.bucket(c["nodes"], c["clusters"], c["features"], b["dtype"], b["adj_dtype"]) == (
                    b["nodes"], b["clusters"], b["features"], b["dtype"], b["adj_dtype"])
    # the headline shape of issue 19 on an H200: Triton (bench/results/2026-12-04-nvidia-h200-gpu/:
    # 1.70 ms against the torch path's 2.48 ms; the old seed, from the old kernels, said torch)
    assert choices[(9, 0)][(512, 128, 128, "float32", "float32")] == "triton"


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(format=7), ["'format' must be 1", "7"]),
    (lambda d: d["capabilities"].update({"nine": {"buckets": []}}), ["capability", "'nine'"]),
    (lambda d: d["capabilities"]["9.0"]["buckets"][0].update(backend="pyg"), ["buckets[0]", "backend", "'pyg'"]),
    (lambda d: d["capabilities"]["9.0"]["buckets"][0].update(nodes=300), ["buckets[0]", "powers of two", "300"]),
    (lambda d: d["capabilities"]["9.0"]["buckets"][0].pop("clusters"), ["buckets[0]", "clusters"]),
])
def test_a_malformed_table_is_an_error_naming_the_field(edit, words):
    doc = _table(N512_C128_F128_float32_float32="torch")
    edit(doc)
    with pytest.raises(dispatch_table.TableError) as info:
        dispatch_table.parse(doc)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_winners_and_write_section_replace_one_capability(tmp_path, fake_gpu):
    cases = [
        # bucket N512: triton faster in one case, much slower in the other: geometric mean > 1
        {"batch": 64, "nodes": 512, "clusters": 128, "features": 128, "dtype": "float32", "adj_dtype": "float32",
         "torch_ms": 2.0, "triton_ms": 1.8, "pyg_ms": 1.9},
        {"batch": 256, "nodes": 400, "clusters": 128, "features": 128, "dtype": "float32", "adj_dtype": "float32",
         "torch_ms": 4.0, "triton_ms": 8.0, "pyg_ms": 5.0},
        # bucket N1024: triton faster, and faster than PyG
        {"batch": 64, "nodes": 1024, "clusters": 128, "features": 128, "dtype": "float32", "adj_dtype": "float32",
         "torch_ms": 3.0, "triton_ms": 1.0, "pyg_ms": 4.0},
        # triton not measured: no bucket
        {"batch": 64, "nodes": 2048, "clusters": 128, "features": 128, "dtype": "float32", "adj_dtype": "float32",
         "torch_ms": 3.0, "triton_ms": "", "pyg_ms": 4.0},
    ]
    w = {(b["nodes"], b["backend"], b["beats_pyg"], len(b["cases"])) for b in dispatch_table.winners(cases)}
    assert w == {(512, "torch", False, 2), (1024, "triton", True, 1)}
    path = str(tmp_path / "table.json")
    with open(path, "w") as f:
        json.dump(_table("8.0", N64_C16_F8_float32_float32="torch"), f)
    dispatch_table.write_section(path, (9, 0), {"device": "test", "buckets": dispatch_table.winners(cases)})
    dispatch_table.write_section(path, (9, 0), {"device": "test2", "buckets": dispatch_table.winners(cases[2:])})
    dispatch_table.use(path)
    assert dispatch_table._sections[(9, 0)]["device"] == "test2"  # replaced, not merged
    assert resolve_backend("auto", CUDA0, key=dispatch_table.bucket(512, 128, 128, "float32", "float32")) == "triton"
    assert resolve_backend("auto", CUDA0, key=dispatch_table.bucket(1024, 128, 128, "float32", "float32")) == "triton"
    dispatch_table._capability_cache[0] = (8, 0)  # the other capability's section was kept
    assert resolve_backend("auto", CUDA0, key=dispatch_table.bucket(64, 16, 8, "float32", "float32")) == "torch"
    with pytest.raises(dispatch_table.TableError, match="backend"):
        dispatch_table.write_section(path, (9, 0), {"buckets": [{"nodes": 512, "clusters": 128, "features": 128,
                                                                  "dtype": "float32", "adj_dtype": "float32",
                                                                  "backend": "cuda"}]})


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_capability_on_this_gpu_is_torchs():
    dev = torch.device("cuda", torch.cuda.current_device())
    assert dispatch_table.capability(dev) == tuple(torch.cuda.get_device_capability(dev))
    assert dispatch_table.capability(torch.device("cuda")) == tuple(torch.cuda.get_device_capability())


@needs_cuda
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_auto_on_cuda_traces_cold_under_fullgraph(monkeypatch, compiler):
    """dense_diff_pool(backend="auto") on CUDA under torch.compile(fullgraph=True) with the
    capability never read before (the first call is the trace), choosing torch from the table."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    cap = torch.cuda.get_device_capability()
    doc = _table(f"{cap[0]}.{cap[1]}", N64_C16_F8_float32_float32="torch")
    try:
        dispatch_table.use(doc)
        monkeypatch.setattr(dispatch_table, "_capability_cache", {})
        torch._dynamo.reset()
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(3, 50, 7, device="cuda", generator=g)
        s = torch.randn(3, 50, 11, device="cuda", generator=g)
        a = torch.rand(3, 50, 50, device="cuda", generator=g) < 0.2
        adj = (a | a.mT).float()
        mask = torch.arange(50, device="cuda")[None] < torch.tensor([50, 30, 10], device="cuda")[:, None]
        assert dispatch.explain_auto(x, adj, s, mask)[0] == "torch"

        def f(x, s):
            out, out_adj, link, ent = dense_diff_pool(x, adj, s, mask)
            return out.square().sum() + out_adj.square().sum() + link + ent

        xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        got = torch.compile(f, fullgraph=True, backend=compiler)(xs, ss)
        got.backward()
        xe, se = x.clone().requires_grad_(), s.clone().requires_grad_()
        want = dense_diff_pool(xe, adj, se, mask, backend="torch")
        want = want[0].square().sum() + want[1].square().sum() + want[2] + want[3]
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ss.grad, se.grad, rtol=1e-4, atol=1e-5)
    finally:
        dispatch_table.use(None)
