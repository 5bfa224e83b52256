"""The Triton path of one coarsening step: its launch plan, autograd and torch.library registration.

Forward, five launches, one line each in ``_forward`` (kernels/):

1. ``assignment_fwd``   S = m * softmax(s), its bf16 parts; entropy and node-count partial sums
2. ``adjacency_fwd``    A S, ||A||^2, padded pairs' A^2, the exact symmetry check: the one read of A
3. ``gram_fwd``         out = S^T X, A' = S^T (A S), S^T S; traces, squares; bitwise-symmetric A'
4. ``link_residual``    sum (A - S S^T)^2 directly for graphs whose identity cancels (the others
                        exit at once; the decision is made on the device)
5. ``finish``           Q_b and E_b per graph in float64, and both losses in the caller's
                        normalisation (``normalize``, ``per_graph``) and dtype

Backward, three launches (four when adj needs a gradient), in ``_backward``:

1. ``adjacency_transpose_fwd``  A^T S for graphs found non-symmetric (the others exit at once)
2. ``link_residual_bwd``        (R + R^T) S directly for the graphs the forward flagged (the
                                others exit at once): their dQ/dS, which the identity's form
                                loses to cancellation near an exact fit
3. ``assignment_bwd``           dL and dX; the loss gradients' scales are computed in the kernel
4. ``adjacency_bwd``            dA (after one torch bmm, W = S G)

No launch depends on a value the host would have to read: the step never synchronises with the
device, so the host runs ahead and a CUDA graph can capture it (``bench/scripts/cuda_graph_step.py``).

Products: split bf16 tensor-core products (kernels/split.py): fp32-grade under torch's "highest"
float32 matmul precision (its default), ~16 bits under "high"/"medium" (tf32 would be 10). The
setting is read at each call (``dot_parts``) and passed to the op, so a ``torch.compile`` graph
keeps the one it was traced under.

The link loss: Q_b = ||A||^2 - 2 tr(S^T A S) + ||S^T S||^2 from the passes' partial sums; a graph
where these cancel (``link_exact.RHO``) takes the residual pass's direct sum, fp32-grade per
entry as PyG's residual, and in the backward the direct dQ/dS = -2 (R + R^T) S. Every other
graph's gradient is the identity's -2 (A + A^T) S + 4 S (S^T S), with A S kept from the forward:
the backward reads A only for non-symmetric and flagged graphs.

Autograd: eagerly one ``torch.autograd.Function`` (the least host time per call); inside
``torch.compile`` two ``torch.library.custom_op`` s with fake implementations (no graph break).
Both call ``_forward``/``_backward``. No double backward: differentiating the backward raises a
RuntimeError that names backend="torch", which has one.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ..config import (
    KERNEL_CONFIGS_ENV,
    MAX_CLUSTERS,
    TRITON_ADJ_DTYPES,
    TRITON_FLOAT_DTYPES,
    env,
    triton_importable,
    triton_interpreting,
)
from .link_exact import RHO

if env(KERNEL_CONFIGS_ENV) and triton_importable():  # a tuning run's configurations (kernels/tuning.py)
    from ..kernels import tuning as _tuning

    _tuning.load(env(KERNEL_CONFIGS_ENV))

_BLOCK_KEYS = ("row_n", "row_k", "adj_m", "adj_k", "gram_c", "gram_f", "gram_n",
               "grad_m", "grad_n", "grad_k")
_forced: Dict[str, int] = {}

#: the link loss's normalisation, as ``kernels.finish`` numbers it
MODES = {"numel": 0, "none": 1, "graph": 2}


@contextlib.contextmanager
def forced_blocks(**blocks: int) -> Iterator[None]:
    """Force block sizes of every launch inside the block (tests use it to reach each branch).

    Keys: row_n, row_k (row passes), adj_m, adj_k (adjacency passes), gram_c, gram_f, gram_n
    (S^T Y products), grad_m, grad_n, grad_k (dA). Powers of two >= 16.
    """
    bad = [k for k in blocks if k not in _BLOCK_KEYS]
    if bad:
        raise ValueError(f"unknown block keys {bad}; known: {_BLOCK_KEYS}")
    for k, v in blocks.items():
        if v < 16 or v & (v - 1):
            raise ValueError(f"block {k}={v} must be a power of two >= 16")
    saved = dict(_forced)
    _forced.update(blocks)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


_PARTS_OF_SETTING = {"highest": 3, "high": 2, "medium": 2}


@torch.compiler.assume_constant_result  # read at trace time: a compiled graph keeps its setting
def dot_parts() -> int:
    """bf16 parts per fp32 operand of the products: 3 (fp32-grade) under torch's "highest" float32
    matmul precision (its default), 2 under "high" or "medium"."""
    return _PARTS_OF_SETTING.get(torch.get_float32_matmul_precision(), 3)


def unsupported_reason(x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor]) -> Optional[str]:
    """None when the Triton kernels take these (batched, checked) inputs, else why not."""
    if not triton_importable():
        return "triton is not installed"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and triton_interpreting()):
        return f"tensors on {x.device}: the Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"
    if x.dtype not in TRITON_FLOAT_DTYPES:
        return f"x has dtype {x.dtype}; the Triton kernels take float32, bfloat16 or float16"
    if s.dtype not in TRITON_FLOAT_DTYPES:
        return f"s has dtype {s.dtype}; the Triton kernels take float32, bfloat16 or float16"
    if adj.dtype not in TRITON_ADJ_DTYPES:
        return f"adj has dtype {adj.dtype}; the Triton kernels take float32/16, bfloat16, bool, uint8"
    B, N, C = s.shape
    if C > MAX_CLUSTERS:
        return (f"s has C={C} clusters; the Triton kernels hold a whole row of S in one program "
                f"and support C <= {MAX_CLUSTERS}")
    if B == 0 or N == 0 or x.shape[2] == 0:
        return f"empty input (x {list(x.shape)})"
    return None


class _Plan(NamedTuple):
    """What one call computes, fixed on the host before the first launch."""
    sym_mode: str  # "check", "yes" (promised symmetric) or "no"
    mode: int  # MODES
    per_graph: bool
    exact: bool  # recompute flagged graphs' Q directly (False: the caller discards Q, BCE)
    parts: int  # bf16 parts per fp32 operand
    result_dtype: torch.dtype


def _forward(x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor], num_clusters: Optional[Tensor],
             plan: _Plan):
    """The forward launches. Returns (out, out_adj, q, ent, link, ent_loss, S, AS, StS, fin, asym, aux)."""
    from ..kernels.adjacency import adj_blocks, adjacency_fwd, link_residual
    from ..kernels.assignment import assignment_fwd, cluster_pad, row_blocks
    from ..kernels.finish import finish, workspace
    from ..kernels.gram import gram_fwd, gram_tiles

    f = _forced
    B, N, C = s.shape
    nt = gram_tiles(cluster_pad(C), f.get("gram_c"))
    n_adj = adj_blocks(N, C, f.get("adj_m"))
    ws = workspace(row_blocks(N, C, f.get("row_n")), n_adj, nt, nt * nt, n_adj)
    work = torch.empty((B, ws.width), device=s.device, dtype=torch.float32)
    mask = mask.contiguous() if mask is not None else None
    nc = num_clusters.to(torch.int32) if num_clusters is not None else None
    pad_sq = plan.mode == MODES["graph"] and mask is not None

    S, Sp = assignment_fwd(s, mask, nc, work, ws.ent, ws.cnt, plan.parts, f.get("row_n"))
    AS = adjacency_fwd(adj, Sp, mask, work, (ws.sq, ws.pad, ws.asym), plan.sym_mode, pad_sq,
                       f.get("adj_m"), f.get("adj_k"))
    out, out_adj, StS = gram_fwd(x, Sp, AS, work, ws, C, f.get("gram_c"), f.get("gram_f"), f.get("gram_n"))
    if plan.exact:
        link_residual(adj, Sp, work, ws, RHO, f.get("adj_m"), f.get("adj_k"))
    q, ent, fin, asym, link, ent_loss, aux = finish(work, ws, N, plan.mode, plan.per_graph, plan.exact,
                                                    pad_sq, plan.result_dtype)
    return out, out_adj, q, ent, link, ent_loss, S, AS, StS, fin, asym, aux


def _backward(g_out, g_out_adj, g_q, g_ent, g_link, g_entl, x, adj, mask, S, AS, StS, fin, asym, aux,
              plan: _Plan, C: int, s_dtype: torch.dtype, need_dx: bool, need_ds: bool, need_dadj: bool):
    """The backward launches: (dx, ds, dadj), None where not needed. Upstream gradients may be
    None (that output got none)."""
    from ..kernels.adjacency import adjacency_bwd, adjacency_transpose_fwd, link_residual_bwd
    from ..kernels.assignment import assignment_bwd

    f = _forced
    dx = ds = dadj = None
    mask = mask.contiguous() if mask is not None else None
    if need_ds or need_dx:
        # A^T S only where A_b was not found (or promised) symmetric; a promise launches nothing
        AtS = (adjacency_transpose_fwd(adj, S, asym, plan.parts, f.get("adj_m"), f.get("adj_k"))
               if need_ds and plan.sym_mode != "yes" else AS)
        # the direct (R + R^T) S of graphs whose link the forward recomputed (the others exit at once)
        D = (link_residual_bwd(adj, S, fin, asym, plan.parts, f.get("adj_m"), f.get("adj_k"))
             if need_ds and plan.exact else None)
        ds, dx = assignment_bwd(x, S, AS, AtS, D, asym, mask, StS, g_out, g_out_adj, fin, aux,
                                g_q, g_ent, g_link, g_entl, need_ds, need_dx, s_dtype, C,
                                plan.mode, plan.per_graph, plan.parts, f.get("row_n"), f.get("row_k"))
    if need_dadj:
        dadj = adjacency_bwd(adj, S, g_out_adj, mask, fin, aux, g_q, g_ent, g_link, g_entl, C,
                             plan.mode, plan.per_graph, plan.parts,
                             f.get("grad_m"), f.get("grad_n"), f.get("grad_k"))
    return dx, ds, dadj


def _no_double_backward():
    return RuntimeError(
        "double backward (differentiating a gradient, create_graph=True) through the Triton "
        "coarsening step is not supported; use backend='torch', whose backward is differentiable")


class _CoarsenFunction(torch.autograd.Function):
    """(x, adj, s, mask, num_clusters) -> (out, out_adj, q, ent, link, ent_loss), eagerly."""

    @staticmethod
    def forward(ctx, x, adj, s, mask, num_clusters, plan):
        outs = _forward(x, adj, s, mask, num_clusters, plan)
        out, out_adj, q, ent, link, ent_loss, S, AS, StS, fin, asym, aux = outs
        ctx.set_materialize_grads(False)  # an output without a gradient costs no zeros
        ctx.save_for_backward(x, adj, mask, S, AS, StS, fin, asym, aux, s)
        ctx.plan, ctx.C, ctx.s_dtype = plan, s.shape[2], s.dtype
        return out, out_adj, q, ent, link, ent_loss

    @staticmethod
    def backward(ctx, g_out, g_out_adj, g_q, g_ent, g_link, g_entl):
        x, adj, mask, S, AS, StS, fin, asym, aux, s = ctx.saved_tensors
        need_dx, need_dadj, need_ds = ctx.needs_input_grad[:3]
        with torch.no_grad():
            grads = _backward(g_out, g_out_adj, g_q, g_ent, g_link, g_entl, x, adj, mask, S, AS, StS,
                              fin, asym, aux, ctx.plan, ctx.C, ctx.s_dtype, need_dx, need_ds, need_dadj)
        if torch.is_grad_enabled():  # create_graph=True: these gradients refuse to be differentiated
            grads = [None if g is None else _RefuseDoubleBackward.apply(g, x, s, adj) for g in grads]
        dx, ds, dadj = grads
        return dx, dadj, ds, None, None, None


class _RefuseDoubleBackward(torch.autograd.Function):
    """The identity on ``t``, whose backward raises the double-backward error
    (``_no_double_backward``); the step's inputs are passed along so that the result is part of
    the graph (and its derivative is asked for) whenever one of them requires a gradient."""

    @staticmethod
    def forward(ctx, t, *inputs):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        raise _no_double_backward()


# ------------------------------------------------------------------ torch.compile: custom ops

_DTYPE_CODES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _plan_args(plan: _Plan):
    return (plan.sym_mode, plan.mode, plan.per_graph, plan.exact, plan.parts, _DTYPE_CODES.index(plan.result_dtype))


def _plan_of(sym_mode, mode, per_graph, exact, parts, dtype_code) -> _Plan:
    return _Plan(sym_mode, mode, per_graph, exact, parts, _DTYPE_CODES[dtype_code])


@torch.library.custom_op("diffpool_fast::coarsen", mutates_args=())
def _coarsen_op(x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor], num_clusters: Optional[Tensor],
                sym_mode: str, mode: int, per_graph: bool, exact: bool, parts: int, dtype_code: int) -> List[Tensor]:
    """``_forward`` as an opaque op: [out, out_adj, q, ent, link, ent_loss, S, AS, StS, fin, asym, aux]."""
    return list(_forward(x, adj, s, mask, num_clusters, _plan_of(sym_mode, mode, per_graph, exact, parts, dtype_code)))


@_coarsen_op.register_fake
def _coarsen_fake(x, adj, s, mask, num_clusters, sym_mode, mode, per_graph, exact, parts, dtype_code):
    from ..kernels.assignment import cluster_pad

    B, N, C = s.shape
    cp = cluster_pad(C)
    dev = x.device
    f32, f64 = torch.float32, torch.float64
    shape = (B,) if per_graph else ()
    rdt = _DTYPE_CODES[dtype_code]
    return [
        x.new_empty((B, C, x.shape[2]), dtype=f32), x.new_empty((B, C, C), dtype=f32),
        x.new_empty((B,), dtype=f64), x.new_empty((B,), dtype=f64),
        x.new_empty(shape, dtype=rdt), x.new_empty(shape, dtype=rdt),
        x.new_empty((B, N, cp), dtype=f32), x.new_empty((B, N, cp), dtype=f32),
        x.new_empty((B, cp, cp), dtype=f32), x.new_empty((B, 4), dtype=f64),
        torch.empty((B,), dtype=torch.int32, device=dev), x.new_empty((2,), dtype=f64),
    ]


@torch.library.custom_op("diffpool_fast::coarsen_backward", mutates_args=())
def _coarsen_backward_op(
    g_out: Optional[Tensor], g_out_adj: Optional[Tensor], g_q: Optional[Tensor], g_ent: Optional[Tensor],
    g_link: Optional[Tensor], g_entl: Optional[Tensor],
    x: Tensor, adj: Tensor, mask: Optional[Tensor], S: Tensor, AS: Tensor, StS: Tensor, fin: Tensor,
    asym: Tensor, aux: Tensor, sym_mode: str, mode: int, per_graph: bool, exact: bool, parts: int,
    dtype_code: int, C: int, s_dtype: torch.dtype, need_dx: bool, need_ds: bool, need_dadj: bool,
) -> List[Tensor]:
    """[dx, ds, dadj]; an input whose gradient is not needed gets an empty tensor."""
    plan = _plan_of(sym_mode, mode, per_graph, exact, parts, dtype_code)
    dx, ds, dadj = _backward(g_out, g_out_adj, g_q, g_ent, g_link, g_entl, x, adj, mask, S, AS, StS, fin,
                             asym, aux, plan, C, s_dtype, need_dx, need_ds, need_dadj)
    # three distinct empties: a custom op's outputs must not alias each other
    return [dx if dx is not None else S.new_empty(0), ds if ds is not None else S.new_empty(0),
            dadj if dadj is not None else S.new_empty(0)]


@_coarsen_backward_op.register_fake
def _coarsen_backward_fake(g_out, g_out_adj, g_q, g_ent, g_link, g_entl, x, adj, mask, S, AS, StS, fin, asym,
                           aux, sym_mode, mode, per_graph, exact, parts, dtype_code, C, s_dtype,
                           need_dx, need_ds, need_dadj):
    B, N, _ = S.shape
    return [
        torch.empty_like(x) if need_dx else S.new_empty(0),
        S.new_empty((B, N, C), dtype=s_dtype) if need_ds else S.new_empty(0),
        torch.empty_like(adj) if need_dadj else S.new_empty(0),
    ]


def _op_no_double_backward(ctx, *grads):
    raise _no_double_backward()


_coarsen_backward_op.register_autograd(_op_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _op_setup_context(ctx, inputs, output):
    x, adj, s, mask, num_clusters = inputs[:5]
    ctx.plan_args = inputs[5:]
    ctx.C, ctx.s_dtype = s.shape[2], s.dtype
    ctx.save_for_backward(x, adj, mask, *output[6:])


def _op_backward(ctx, grads):
    g_out, g_out_adj, g_q, g_ent, g_link, g_entl = grads[:6]  # the op's output is one list
    x, adj, mask, S, AS, StS, fin, asym, aux = ctx.saved_tensors
    need_dx, need_dadj, need_ds = ctx.needs_input_grad[:3]
    if not (need_dx or need_dadj or need_ds):
        return (None,) * 11
    dx, ds, dadj = torch.ops.diffpool_fast.coarsen_backward(
        g_out, g_out_adj, g_q, g_ent, g_link, g_entl, x, adj, mask, S, AS, StS, fin, asym, aux,
        *ctx.plan_args, ctx.C, ctx.s_dtype, need_dx, need_ds, need_dadj)
    return (dx if need_dx else None, dadj if need_dadj else None, ds if need_ds else None) + (None,) * 8


_coarsen_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ------------------------------------------------------------------ entry points

def _plan(s: Tensor, adj_symmetric: Optional[bool], mode: str, per_graph: bool, exact: bool,
          result_dtype: torch.dtype) -> _Plan:
    if adj_symmetric is None:
        sym_mode = "check" if torch.is_grad_enabled() and s.requires_grad else "no"
    else:
        sym_mode = "yes" if adj_symmetric else "no"
    return _Plan(sym_mode, MODES[mode], per_graph, exact, dot_parts(), result_dtype)


def _run(x, adj, s, mask, num_clusters, plan: _Plan):
    # the ops (with fake implementations) while tracing or on fake tensors; eagerly the Function
    if torch.compiler.is_compiling() or isinstance(x, FakeTensor):
        return torch.ops.diffpool_fast.coarsen(x, adj, s, mask, num_clusters, *_plan_args(plan))[:6]
    return _CoarsenFunction.apply(x, adj, s, mask, num_clusters, plan)


def pool_triton(
    x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor], mode: str, per_graph: bool, *,
    adj_symmetric: Optional[bool] = None, num_clusters: Optional[Tensor] = None,
    result_dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dense_diff_pool`` on the Triton kernels with the Frobenius link loss: returns (out [B,C,F]
    fp32, out_adj [B,C,C] fp32, link, ent) with both losses finished in the kernels in
    ``result_dtype`` (``mode``: "numel", "none" or "graph"; see ``kernels/finish.py``). Inputs
    checked and batched; ``num_clusters`` [B] int (checked)."""
    plan = _plan(s, adj_symmetric, mode, per_graph, True, result_dtype)
    out, out_adj, _, _, link, ent = _run(x, adj, s, mask, num_clusters, plan)
    return out, out_adj, link, ent


def coarsen_triton(
    x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor] = None, *,
    adj_symmetric: Optional[bool] = None, num_clusters: Optional[Tensor] = None, exact_link: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One coarsening step on the Triton kernels with the per-graph contract of ``coarsen_torch``:
    ``(out [B,C,F] fp32, out_adj [B,C,C] fp32, link_sq [B] float64, ent_sum [B] float64)``.

    ``adj_symmetric``: True promises A_b = A_b^T (the backward never reads A for ds); False says
    it is not; None (default) checks it exactly in the forward pass, only when a gradient into s
    will be needed. ``num_clusters``: [B] k_b (checked), masked in the row pass; S is 0 past k_b.
    ``exact_link=False``: the caller discards link_sq (the BCE loss): no residual pass.
    """
    plan = _plan(s, adj_symmetric, "numel", False, exact_link, torch.float32)
    out, out_adj, q, ent, _, _ = _run(x, adj, s, mask, num_clusters, plan)
    return out, out_adj, q, ent
