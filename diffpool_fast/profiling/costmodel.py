"""Analytic cost of one DiffPool coarsening step: the floor, and each backend's memory.

Everything here is arithmetic on shapes (no tensor is made), so a user can predict the cost of
sizes they cannot run. Formulas follow docs/math.md.

Notation: B graphs, N (padded) nodes, C clusters, F features; ``e`` bytes per element of the
compute dtype (x and s), ``a`` bytes per adjacency entry (1 for bool/uint8).

The floor
---------
Bytes that must move (every tensor read or written once; scalars ignored):

- forward: read A (B·N²·a), L (B·N·C·e), X (B·N·F·e) and the mask (B·N bytes, when there is
  one); write S and AS (B·N·C·e each, kept for backward), out (B·C·F·e) and A' (B·C·C·e).
- backward: read S, AS (saved), X, g_out (B·C·F·e) and G (B·C·C·e); write dL (B·N·C·e) and
  dX (B·N·F·e). A symmetric A is not read again (AS is all backward needs); an asymmetric A
  is read once more (for AᵀS).

Matmul FLOPs (elementwise work is negligible next to them):

- forward: 2·B·N²·C (AS) + 2·B·N·C² (Sᵀ(AS)) + 2·B·N·C² (SᵀS) + 2·B·N·C·F (SᵀX)
- backward: 2·B·N·C·F (X g_outᵀ) + 2·B·N·C·F (dX = S g_out) + 2·B·N·C² (AS(G + Gᵀ))
  + 2·B·N·C² (S(SᵀS)), plus 2·B·N²·C (AᵀS) when A is not symmetric.

The floor time on a device is the roofline bound max(bytes / bandwidth, FLOPs / peak rate).

Memory model
------------
``memory_model`` counts the tensors each backend keeps alive, beyond its inputs (x, adj, s,
mask and the upstream gradients): what it saves for backward and its peak during the timed
step. Sizes: n2 = B·N²·e (one batch of N x N in the compute dtype), nc = B·N·C·e,
nf = B·N·F·e. See ``memory_model`` for the per-backend accounting.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..config import CONVERT_CHUNK_BYTES

#: bytes per element of the dtypes the profiler accepts (names as in torch, without "torch.").
ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "bool": 1,
    "uint8": 1,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
ADJ_DTYPES = FLOAT_DTYPES + ("bool", "uint8")
MODES = ("fwd", "bwd", "full")
#: the implementations ``diffpool-fast profile`` compares (not the pooling op's ``backend``
#: argument, ``config.POOL_BACKENDS``): ours on torch and Triton, ours as ``backend="auto"``
#: picks (what a user gets by default), PyG's, and PyG's under ``torch.compile``
PROFILE_BACKENDS = ("torch", "pyg", "pyg-compiled", "triton", "auto")
#: what ``--backend all`` stands for: every implementation once (auto runs one of ours again)
ALL_BACKENDS = ("torch", "pyg", "pyg-compiled", "triton")
#: older names still accepted
BACKEND_ALIASES = {"compile": "pyg-compiled"}
#: the assignment logits of the generated inputs: ``random`` (standard normal) or ``converged``
#: (12 · one-hot + 0.1 · noise, with an adjacency of the same-cluster pattern)
LOGITS = ("random", "converged")


@dataclass(frozen=True)
class Shape:
    """One coarsening workload. ``dtype`` is x's and s's; ``adj_dtype`` the adjacency's."""

    batch: int
    nodes: int
    clusters: int
    features: int
    dtype: str = "float32"
    adj_dtype: str = "float32"
    masked: bool = True
    symmetric: bool = True
    #: our paths are told adj is symmetric (dense_diff_pool's adj_symmetric=True), so their
    #: backward makes no pass over A; without the promise the torch path makes one A^T product.
    promise_symmetric: bool = False
    #: the generated logits and adjacency (``LOGITS``)
    logits: str = "random"

    def __post_init__(self):
        for name in ("batch", "nodes", "clusters", "features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.clusters > self.nodes:
            raise ValueError(f"clusters ({self.clusters}) must not exceed nodes ({self.nodes})")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype!r}")
        if self.adj_dtype not in ADJ_DTYPES:
            raise ValueError(f"adj_dtype must be one of {ADJ_DTYPES}, got {self.adj_dtype!r}")
        if self.logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {self.logits!r}")

    @property
    def e(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def a(self) -> int:
        return ITEMSIZE[self.adj_dtype]

    @property
    def compute_dtype(self) -> str:
        """Our paths compute in fp32 for half inputs (ops.coarsen_torch.compute_dtype)."""
        return "float32" if self.dtype in ("float16", "bfloat16") else self.dtype

    @property
    def compute_e(self) -> int:
        return ITEMSIZE[self.compute_dtype]

    def with_batch(self, batch: int) -> "Shape":
        return Shape(batch, self.nodes, self.clusters, self.features, self.dtype,
                     self.adj_dtype, self.masked, self.symmetric, self.promise_symmetric, self.logits)

    def label(self) -> str:
        return (f"B{self.batch}-N{self.nodes}-C{self.clusters}-F{self.features}-"
                f"{self.dtype}-adj_{self.adj_dtype}" + ("-converged" if self.logits == "converged" else ""))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def adj_bytes(shape: Shape) -> int:
    """One read of the adjacency: B·N²·a."""
    return shape.batch * shape.nodes**2 * shape.a


def floor_bytes(shape: Shape, mode: str) -> int:
    """Bytes that must move for ``mode`` (see the module docstring)."""
    _check_mode(mode)
    B, N, C, F, e = shape.batch, shape.nodes, shape.clusters, shape.features, shape.e
    fwd = (adj_bytes(shape) + B * N * (C + F) * e + (B * N if shape.masked else 0)
           + 2 * B * N * C * e + B * C * (F + C) * e)
    bwd = (3 * B * N * C * e + 2 * B * N * F * e + B * C * (F + C) * e
           + (0 if shape.symmetric else adj_bytes(shape)))
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def floor_flops(shape: Shape, mode: str) -> int:
    """Matmul FLOPs for ``mode`` (see the module docstring)."""
    _check_mode(mode)
    B, N, C, F = shape.batch, shape.nodes, shape.clusters, shape.features
    fwd = 2 * B * N * N * C + 4 * B * N * C * C + 2 * B * N * C * F
    bwd = 4 * B * N * C * F + 4 * B * N * C * C + (0 if shape.symmetric else 2 * B * N * N * C)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


# ----------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class DeviceSpec:
    """Peak rates of a device: memory bandwidth (bytes/s) and matmul FLOP/s per dtype."""

    name: str
    bandwidth: float
    flops: Dict[str, float]
    source: str  # where the numbers come from ("datasheet ..." or "measured ...")

    def rate(self, dtype: str) -> float:
        return self.flops.get(dtype, self.flops["float32"])


_TF = 1e12
_TB = 1e12
# Datasheet peaks (dense, no sparsity). fp32 matmuls are rated at the tf32 tensor-core rate:
# Triton's tl.dot uses tf32 for fp32 inputs by default, so that is the floor a kernel can reach.
KNOWN_DEVICES: List[Tuple[str, DeviceSpec]] = [
    (r"H200", DeviceSpec("NVIDIA H200", 4.8 * _TB,
                         {"float32": 495 * _TF, "float16": 989 * _TF, "bfloat16": 989 * _TF,
                          "float64": 67 * _TF}, "datasheet (H200 SXM, dense)")),
    (r"H100.*(PCIe)", DeviceSpec("NVIDIA H100 PCIe", 2.0 * _TB,
                                 {"float32": 378 * _TF, "float16": 756 * _TF,
                                  "bfloat16": 756 * _TF, "float64": 51 * _TF},
                                 "datasheet (H100 PCIe, dense)")),
    (r"H100", DeviceSpec("NVIDIA H100 SXM", 3.35 * _TB,
                         {"float32": 495 * _TF, "float16": 989 * _TF, "bfloat16": 989 * _TF,
                          "float64": 67 * _TF}, "datasheet (H100 SXM, dense; tf32 for fp32)")),
    (r"A100", DeviceSpec("NVIDIA A100", 2.039 * _TB,
                         {"float32": 156 * _TF, "float16": 312 * _TF, "bfloat16": 312 * _TF,
                          "float64": 19.5 * _TF}, "datasheet (A100 80GB SXM, dense)")),
]
#: fp32 CUDA-core rate of the H100 SXM, for reference next to the tf32 floor.
H100_FP32_NON_TENSOR = 67 * _TF

#: Used on CPU when measuring is not wanted: deliberately generous (a fast server socket), so the
#: floor is a floor, never an overestimate of the time.
CPU_DEFAULT = DeviceSpec("cpu (default)", 100e9, {"float32": 2 * _TF, "float16": 2 * _TF,
                                                  "bfloat16": 2 * _TF, "float64": 1 * _TF},
                         "conservative default (100 GB/s, 2 TF/s); not measured")


def known_device(name: str) -> Optional[DeviceSpec]:
    """Datasheet spec for a device name such as ``torch.cuda.get_device_name()``, or None."""
    for pattern, spec in KNOWN_DEVICES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return spec
    return None


def measure_device(device: str = "cpu", *, repeats: int = 5) -> DeviceSpec:
    """Measure read bandwidth (a sum over 256 MiB) and fp32/fp64 matmul rate, best of ``repeats``.

    The best run approximates the peak the machine can reach; on a shared machine it is a lower
    bound of that peak, so the floor time it gives is an upper bound of the true floor.
    """
    import time

    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    big = torch.ones(64 << 20, dtype=torch.float32, device=dev)  # 256 MiB
    best_bw = 0.0
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        big.sum()
        sync()
        best_bw = max(best_bw, big.numel() * 4 / (time.perf_counter() - t0))
    del big
    rates = {}
    n = 1024
    for dtype in (torch.float32, torch.float64):
        m = torch.randn(n, n, dtype=dtype, device=dev)
        m @ m
        best = 0.0
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            m @ m
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        rates[str(dtype).replace("torch.", "")] = best
    rates["float16"] = rates["bfloat16"] = rates["float32"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return DeviceSpec(name, best_bw, rates,
                      f"measured here (best of {repeats}: sum over 256 MiB, {n}^3 matmul)")


def floor_time(shape: Shape, mode: str, spec: DeviceSpec) -> float:
    """Roofline floor in seconds: max(bytes / bandwidth, FLOPs / peak rate)."""
    return max(floor_bytes(shape, mode) / spec.bandwidth,
               floor_flops(shape, mode) / spec.rate(shape.dtype))


# ----------------------------------------------------------------------------------------------
# Memory


def input_bytes(shape: Shape, mode: str = "full") -> int:
    """The inputs every backend shares: x, adj, s, mask, and for backward g_out and G."""
    B, N, C, F, e = shape.batch, shape.nodes, shape.clusters, shape.features, shape.e
    total = B * N * F * e + adj_bytes(shape) + B * N * C * e + (B * N if shape.masked else 0)
    if mode != "fwd":
        total += B * C * F * e + B * C * C * e
    return total


@dataclass
class MemoryEstimate:
    """Bytes beyond the inputs: ``saved`` for backward after the forward, ``peak`` during the
    timed step of the mode; ``terms`` names what is counted."""

    backend: str
    mode: str
    saved: int
    peak: int
    terms: Dict[str, int] = field(default_factory=dict)


def memory_model(backend: str, shape: Shape, mode: str) -> MemoryEstimate:
    """Predicted memory of one coarsening step beyond the inputs (x and s require grad, adj not).

    - ``pyg`` (torch_geometric.nn.dense_diff_pool): saves softmax(s), S, the masked x, SᵀA
      (B·C·N) and the residual R = A - SSᵀ (n2), plus log(S+eps), S+eps and -S for the entropy.
      Forward peak: S Sᵀ and R alive together (2·n2). Backward: the norm's backward holds R,
      R/||R|| and its product with the upstream gradient (3·n2). A non-float adjacency is
      converted to the compute dtype first (one more n2, kept: SᵀA's backward saves it).
    - ``pyg-compiled`` (torch.compile of PyG's function; also ``compile``): the matmul S Sᵀ is still materialised (n2),
      the residual is fused into the reduction, and one N x N tensor is alive at a time in
      backward too. Fitted to CPU measurements with torch 2.13: Inductor's choices vary.
    - ``torch`` (our lean path, ops.coarsen_torch.CoarsenTorchFunction): no N x N tensor.
      Saves softmax(s), S (the same tensor when there is no mask) and AS: 3·nc; forward
      transients S+eps and log(S+eps) (2·nc); backward transients W, dS and the entropy and
      softmax terms (4·nc). A non-compute-dtype adjacency is converted at most
      ``config.CONVERT_CHUNK_BYTES`` at a time (plus an int64 copy for a uint8 adjacency's norm).
    - ``triton``: the fused kernels keep S and AS (2·nc) as docs/math.md prescribes, and write
      dL, dX.
    - ``auto``: modelled as ``torch`` (the path the measured table and the CPU pick today; on a
      GPU whose table picks Triton, ``triton``'s model is the closer one).

    Leaf gradients (x.grad: nf, s.grad: nc) count in the bwd and full peaks.
    """
    _check_mode(mode)
    backend = BACKEND_ALIASES.get(backend, backend)
    if backend not in PROFILE_BACKENDS:
        raise ValueError(f"backend must be one of {PROFILE_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "torch"
    B, N, C, F = shape.batch, shape.nodes, shape.clusters, shape.features
    ce = shape.compute_e if backend in ("torch", "triton") else shape.e
    n2 = B * N * N * ce
    nc = B * N * C * ce
    nf = B * N * F * shape.e
    small = B * C * (C + F) * ce + (B * N * ce if shape.masked else 0)
    grads = nf + B * N * C * shape.e  # x.grad, s.grad
    terms: Dict[str, int] = {}

    if backend == "pyg":
        convert = n2 if shape.adj_dtype != shape.dtype else 0
        saved = {"softmax(s)": nc, "S": nc, "S^T A": nc, "R = A - S S^T": n2,
                 "S+eps, log(S+eps), -S": 3 * nc, "outputs": small, "adj converted": convert}
        if shape.masked:
            saved["x * mask"] = nf
        saved_total = sum(saved.values())
        # forward peak: softmax, S, masked x, S^T A and outputs alive while S S^T and R coexist;
        # the entropy's temporaries come after R's partner S S^T is freed.
        before_r = saved_total - n2 - 3 * nc
        fwd_peak = max(before_r + 2 * n2, saved_total + nc)
        # backward: the entropy branch runs first (frees its 3 nc); then the norm's backward
        # holds R, R / ||R|| and grad R = (R / ||R||)·g at once (3·n2), next to softmax(s), S,
        # the masked x and SᵀA.
        bwd_peak = max(saved_total + nc, before_r + 3 * n2) + grads
    elif backend == "pyg-compiled":
        convert = n2 if shape.adj_dtype != shape.dtype else 0
        # Inductor fuses the residual into the norm's reduction and frees saved tensors as its
        # backward goes, so one N x N tensor (S Sᵀ, then the residual's gradient) is alive at a
        # time. Counts fitted to CPU measurements (torch 2.13): an estimate, versions vary.
        saved = {"S S^T": n2, "softmax(s), S, S^T A": 3 * nc, "outputs": small,
                 "adj converted": convert}
        saved_total = sum(saved.values())
        fwd_peak = saved_total + 2 * nc
        bwd_peak = saved_total + (5 * nc) // 2 + grads
        terms = saved
    elif backend == "torch":
        convert = 0
        if shape.adj_dtype != shape.compute_dtype:
            per_graph = N * N * ce
            convert = min(B, max(1, CONVERT_CHUNK_BYTES // per_graph)) * per_graph
        norm_tmp = 0
        if shape.adj_dtype == "uint8":
            per_graph = N * N * 8
            norm_tmp = 2 * min(B, max(1, CONVERT_CHUNK_BYTES // per_graph)) * per_graph
        saved = {"softmax(s)": nc, "S": nc if shape.masked else 0, "AS": nc, "outputs": small}
        saved_total = sum(saved.values())
        fwd_peak = saved_total + max(2 * nc, convert, norm_tmp)
        bwd_peak = saved_total + max(4 * nc, convert) + grads
        terms = dict(saved, **{"adj chunk converted": convert})
    else:  # triton
        saved = {"S": nc, "AS": nc, "outputs": small}
        saved_total = sum(saved.values())
        fwd_peak = saved_total
        bwd_peak = saved_total + nc + grads
        terms = saved

    peak = {"fwd": fwd_peak, "bwd": bwd_peak, "full": max(fwd_peak, bwd_peak)}[mode]
    return MemoryEstimate(backend, mode, saved_total, peak, terms)


def predict_max_batch(backend: str, shape: Shape, budget_bytes: int, mode: str = "full") -> int:
    """Largest batch whose inputs plus modelled peak fit ``budget_bytes`` (0 if none does)."""
    def total(b: int) -> int:
        s = shape.with_batch(b)
        return input_bytes(s, mode) + memory_model(backend, s, mode).peak

    if total(1) > budget_bytes:
        return 0
    lo, hi = 1, 2
    while total(hi) <= budget_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= budget_bytes else (lo, mid)
    return lo
