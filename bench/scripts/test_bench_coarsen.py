"""pytest-benchmark cases: one coarsening step, our paths against PyG's, at fixed shapes.

    pytest bench/scripts --benchmark-only                        # a table per shape and mode
    pytest bench/scripts --benchmark-only --benchmark-autosave   # keep this commit's numbers
    pytest bench/scripts --benchmark-only --benchmark-compare    # against the last saved run

Each case times forward ("fwd") or forward + backward ("full") of ``dense_diff_pool`` with x
and s requiring grad, on the same inputs as ``diffpool-fast profile``
(diffpool_fast.profiling.harness builds them). CUDA when available (then also the Triton path),
else CPU. Cases of one shape and mode share a benchmark group, so they print side by side. Not
collected by ``pytest tests``.
"""
import pytest
import torch

from diffpool_fast.profiling import costmodel
from diffpool_fast.profiling.costmodel import Shape
from diffpool_fast.profiling.harness import backward, forward, make_backend, make_inputs, triton_unsupported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = (
    [Shape(64, 512, 128, 128), Shape(64, 1024, 128, 128), Shape(16, 2048, 128, 128)]
    if DEVICE == "cuda"
    else [Shape(16, 128, 32, 64), Shape(16, 512, 128, 64), Shape(4, 1024, 128, 64)]
)
BACKENDS = ["torch", "pyg"] + (["triton"] if DEVICE == "cuda" else [])


@pytest.fixture(scope="module")
def inputs():
    cache = {}

    def get(shape):
        if shape not in cache:
            cache.clear()  # one shape's inputs alive at a time
            cache[shape] = make_inputs(shape, DEVICE, seed=0)
        return cache[shape]

    return get


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label())
@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_coarsen(benchmark, inputs, shape, mode, backend):
    b = make_backend(backend, DEVICE, shape)
    if not b.available:
        pytest.skip(b.reason)
    inp = inputs(shape)
    if backend == "triton":
        reason = triton_unsupported(shape, inp)
        if reason:
            pytest.skip(f"the Triton path would fall back to torch: {reason}")
    benchmark.group = f"{shape.label()} {mode}"
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        threads=torch.get_num_threads(), backend=backend, mode=mode,
        floor_bytes=costmodel.floor_bytes(shape, mode),
        floor_flops=costmodel.floor_flops(shape, mode),
        model_peak_bytes=costmodel.memory_model(backend, shape, mode).peak,
    )
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        inp.x.grad = inp.s.grad = None
        outs = forward(b.fn, inp)
        if mode == "full":
            backward(outs, inp)
        sync()

    benchmark.pedantic(run, warmup_rounds=1, rounds=5 if DEVICE == "cpu" else 20, iterations=1)
