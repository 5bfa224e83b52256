"""The Triton path of one coarsening step: launches, autograd and torch.library registration.

Forward, four launches (kernels/):

1. ``assignment_fwd``: S = m * softmax(s) and the per-graph entropy sum (row pass);
2. ``adjacency_fwd``: A S, ||A||^2 and, when a gradient into s is coming and the
   caller did not say, whether each A_b is symmetric (the one read of A);
3. ``gram_fwd`` three times: out = S^T X, A' = S^T (A S), S^T S.

link_sq = ||A||^2 - 2 tr(A') + ||S^T S||^2 (as tr(S^T A S) = tr(A')), summed per graph in
float64; graphs where those terms cancel (``link_exact.cancellation_flags``) get their Q
recomputed directly from row blocks of A - S S^T in float64 (a second read of A, for those
graphs only). Q is clamped at 0 outside the op (NaN passes). A' of a graph found symmetric is made
bitwise symmetric, as the next level's symmetry check wants.

Dot precision follows ``torch.get_float32_matmul_precision()`` (``dot_precision``), as PyTorch's
CUDA matmuls do: "highest" (the default) runs every product over A, and the backward row pass, in
tf32x3 (above C_PAD = 128 the row pass then leaves dX = S g_out to a torch matmul), "high" and
"medium" allow tf32. The choice is an argument of the ops,
so a ``torch.compile`` graph keeps the setting it was traced under.

Backward: ``adjacency_transpose_fwd`` (A^T S, only for graphs found non-symmetric), one fused
row pass ``assignment_bwd`` (dL and dX), and ``adjacency_bwd`` (dA) only when adj needs a
gradient. For flagged graphs the row pass gets no link term (its g_Q is zeroed there) and the
direct one, softmax_bwd(-2 g_Q m (R + R^T) S), is added in torch (the softmax backward is
linear). Autograd saves S, A S (fp32, [B, N, C]), S^T S ([B, C, C]), two [B] flags, and
references to the caller's x, adj and mask: no copy, nothing O(B N^2) allocated.

Both directions are ``torch.library.custom_op`` s with fake implementations, so the step traces
into ``torch.compile`` graphs without a graph break. No double backward: differentiating the
backward raises a RuntimeError that names backend="torch", which has one.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from ..config import (
    CONVERT_CHUNK_BYTES,
    MAX_CLUSTERS,
    TRITON_ADJ_DTYPES,
    TRITON_FLOAT_DTYPES,
    triton_importable,
    triton_interpreting,
)
from . import link_exact

# sym_known values of the op
_SYM_UNKNOWN, _SYM_NO, _SYM_YES = -1, 0, 1

_BLOCK_KEYS = ("row_n", "row_k", "adj_m", "adj_k", "gram_c", "gram_k", "gram_n",
               "grad_m", "grad_n", "grad_k")
_forced: Dict[str, int] = {}


@contextlib.contextmanager
def forced_blocks(**blocks: int) -> Iterator[None]:
    """Force block sizes of every launch inside the block (tests use it to reach each branch).

    Keys: row_n, row_k (row passes), adj_m, adj_k (adjacency passes), gram_c, gram_k, gram_n
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


#: the products' dot precision, by ``torch.get_float32_matmul_precision()``
_PRECISION_OF_SETTING = {"highest": "tf32x3", "high": "tf32", "medium": "tf32"}


@torch.compiler.assume_constant_result  # read at trace time: a compiled graph keeps its setting
def dot_precision() -> str:
    """``"tf32x3"`` (fp32-grade) under torch's "highest" matmul precision (its default),
    ``"tf32"`` under "high" or "medium": the ``input_precision`` of the launches over A."""
    return _PRECISION_OF_SETTING.get(torch.get_float32_matmul_precision(), "tf32x3")


def _gram(S: Tensor, Y: Tensor) -> Tensor:
    from ..kernels.gram import gram_fwd

    f = _forced
    return gram_fwd(S, Y, f.get("gram_c"), f.get("gram_k"), f.get("gram_n"))


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


def _pick_sym(check_sym: bool, sym_known: int, B: int, device) -> Tuple[bool, Optional[Tensor]]:
    if sym_known == _SYM_YES:
        return False, torch.zeros(B, dtype=torch.int32, device=device)
    if sym_known == _SYM_NO or not check_sym:
        return False, None  # adjacency_fwd then reports every graph as non-symmetric
    return True, None


@torch.library.custom_op("diffpool_fast::coarsen", mutates_args=())
def _coarsen_op(
    x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor], check_sym: bool, sym_known: int,
    precision: str = "tf32x3", num_clusters: Optional[Tensor] = None, exact: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, out_adj, q_raw, ent_sum, S, AS, StS, asym, flags); q_raw is link_sq before the
    clamp, flags [B] int32 is 1 where q_raw was recomputed directly (``link_exact``; never with
    ``exact=False``, for a caller that discards q_raw)."""
    from ..kernels.adjacency import adjacency_fwd
    from ..kernels.assignment import assignment_fwd

    f = _forced
    do_check, asym_known = _pick_sym(check_sym, sym_known, x.shape[0], x.device)
    mask = mask.contiguous() if mask is not None else None
    S, ent_sum = assignment_fwd(s, mask, f.get("row_n"), num_clusters)
    AS, adj_sq, asym = adjacency_fwd(adj, S, do_check, f.get("adj_m"), f.get("adj_k"),
                                     input_precision=precision)
    if asym_known is not None:
        asym = asym_known
    out = _gram(S, x)
    out_adj = _gram(S, AS)
    # S^T A S of a symmetric A is symmetric, but not bitwise so after rounding; making it so
    # lets the next level's symmetry check pass, which spares that level's backward a read of A.
    sym = (asym == 0)[:, None, None]
    out_adj = torch.where(sym, 0.5 * (out_adj + out_adj.transpose(1, 2)), out_adj)
    StS = _gram(S, S)
    trace = torch.diagonal(out_adj, dim1=1, dim2=2).sum(dim=1, dtype=torch.float64)
    sts_sq = StS.to(torch.float64).square().sum(dim=(1, 2))
    q_raw = adj_sq - 2.0 * trace + sts_sq
    flags = link_exact.cancellation_flags(adj_sq, sts_sq, q_raw)
    if not exact:
        flags = torch.zeros_like(flags)
    if bool(flags.any()):
        idx = flags.nonzero().squeeze(1)
        q_exact, _ = link_exact.exact_link(adj, S, idx, chunk_bytes=CONVERT_CHUNK_BYTES)
        q_raw = q_raw.index_put((idx,), q_exact)
    return out, out_adj, q_raw, ent_sum, S, AS, StS, asym, flags.to(torch.int32)


@_coarsen_op.register_fake
def _coarsen_fake(x, adj, s, mask, check_sym, sym_known, precision="tf32x3", num_clusters=None, exact=True):
    B, N, C = s.shape
    F = x.shape[2]
    f32 = dict(dtype=torch.float32, device=x.device)
    f64 = dict(dtype=torch.float64, device=x.device)
    i32 = dict(dtype=torch.int32, device=x.device)
    return (
        x.new_empty((B, C, F), **f32), x.new_empty((B, C, C), **f32),
        x.new_empty((B,), **f64), x.new_empty((B,), **f64),
        x.new_empty((B, N, C), **f32), x.new_empty((B, N, C), **f32),
        x.new_empty((B, C, C), **f32), x.new_empty((B,), **i32), x.new_empty((B,), **i32),
    )


def _flagged_link_grad(adj: Tensor, S: Tensor, mask: Optional[Tensor], gq: Tensor,
                       flags: Tensor, asym: Tensor, dL: Tensor) -> None:
    """dL[flagged] += softmax_bwd(m * -2 g_Q (R + R^T) S), in place (dL fp32): the link term of
    the graphs whose identity terms cancel, computed directly (``link_exact``)."""
    idx = flags.nonzero().squeeze(1)
    _, D = link_exact.exact_link(adj, S, idx, want_q=False, want_d=True,
                                 symmetric=asym.index_select(0, idx) == 0,
                                 chunk_bytes=CONVERT_CHUNK_BYTES)
    dS = (-2.0 * gq.index_select(0, idx).to(torch.float64).view(-1, 1, 1) * D).to(torch.float32)
    if mask is not None:
        dS = dS * mask.index_select(0, idx).unsqueeze(-1).to(torch.float32)
    Sf = S.index_select(0, idx)  # m * P: equals P where dS is not 0
    dL.index_add_(0, idx, Sf * (dS - (Sf * dS).sum(-1, keepdim=True)))


@torch.library.custom_op("diffpool_fast::coarsen_backward", mutates_args=())
def _coarsen_backward_op(
    g_out: Tensor, g_out_adj: Tensor, g_q: Tensor, g_ent: Tensor,
    x: Tensor, adj: Tensor, mask: Optional[Tensor],
    S: Tensor, AS: Tensor, StS: Tensor, asym: Tensor,
    s_dtype: torch.dtype, need_dx: bool, need_ds: bool, need_dadj: bool,
    flags: Optional[Tensor] = None, precision: str = "tf32x3",
) -> List[Tensor]:
    """[dx, ds, dadj]; an input whose gradient is not needed gets an empty tensor. ``flags``: the
    forward's [B] int32 graphs whose link term is computed directly (None: none)."""
    from ..kernels.adjacency import adjacency_bwd, adjacency_transpose_fwd
    from ..kernels.assignment import assignment_bwd

    B, N, C = S.shape
    mask = mask.contiguous() if mask is not None else None
    g_out = g_out.to(torch.float32).contiguous()
    G = g_out_adj.to(torch.float32)
    gq = g_q.to(torch.float32)
    flagged = flags is not None and need_ds and bool(flags.any())
    # the row pass's link term (g_Q through the identity's products), 0 for flagged graphs
    gi = gq * (1 - flags).to(torch.float32) if flagged else gq
    eye = torch.eye(C, dtype=torch.float32, device=S.device)
    # three distinct empties: a custom op's outputs must not alias each other
    dx, ds, dadj = S.new_empty(0), S.new_empty(0), S.new_empty(0)
    if need_ds or need_dx:
        H2 = (G - 2.0 * gi[:, None, None] * eye).contiguous()  # for A^T S
        H1 = G.transpose(1, 2) - 2.0 * gi[:, None, None] * eye
        # A symmetric graph has A^T S = A S: fold H2 into H1 and skip A^T S.
        H1 = (H1 + (1 - asym).to(torch.float32)[:, None, None] * H2).contiguous()
        H3 = (4.0 * gi[:, None, None] * StS).contiguous()
        f = _forced
        AtS = (adjacency_transpose_fwd(adj, S, asym, f.get("adj_m"), f.get("adj_k"),
                                       input_precision=precision)
               if need_ds else AS)
        dL, dX = assignment_bwd(
            x, S, AS, AtS, asym, mask, g_out, H1, H2, H3,
            g_ent.to(torch.float32).contiguous(), need_ds, need_dx,
            torch.float32 if flagged else s_dtype,
            f.get("row_n"), f.get("row_k"), input_precision=precision,
        )
        if need_ds:
            if flagged:
                _flagged_link_grad(adj, S, mask, gq, flags, asym, dL)
                dL = dL.to(s_dtype)
            ds = dL
        if need_dx:
            dx = dX
    if need_dadj:
        # dA = S (G - 2 g I) S^T + 2 g A: entrywise A - S S^T, no cancellation of whole terms
        SH = torch.bmm(S, (G - 2.0 * gq[:, None, None] * eye).contiguous())
        f = _forced
        dadj = adjacency_bwd(adj, SH, S, (2.0 * gq).contiguous(),
                             f.get("grad_m"), f.get("grad_n"), f.get("grad_k"),
                             input_precision=precision)
    return [dx, ds, dadj]


@_coarsen_backward_op.register_fake
def _coarsen_backward_fake(g_out, g_out_adj, g_q, g_ent, x, adj, mask, S, AS, StS, asym,
                           s_dtype, need_dx, need_ds, need_dadj, flags=None, precision="tf32x3"):
    return [
        torch.empty_like(x) if need_dx else S.new_empty(0),
        S.new_empty(S.shape, dtype=s_dtype) if need_ds else S.new_empty(0),
        torch.empty_like(adj) if need_dadj else S.new_empty(0),
    ]


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward (differentiating a gradient, create_graph=True) through the Triton "
        "coarsening step is not supported; use backend='torch', whose backward is differentiable")


_coarsen_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    x, adj, s, mask, check_sym, sym_known = inputs[:6]
    ctx.precision = inputs[6] if len(inputs) > 6 else "tf32x3"
    out, out_adj, q_raw, ent_sum, S, AS, StS, asym, flags = output
    ctx.s_dtype = s.dtype
    ctx.save_for_backward(x, adj, mask, S, AS, StS, asym, flags)


def _backward(ctx, g_out, g_out_adj, g_q, g_ent, *unused):
    x, adj, mask, S, AS, StS, asym, flags = ctx.saved_tensors
    need_dx, need_dadj, need_ds = ctx.needs_input_grad[:3]
    if not (need_dx or need_dadj or need_ds):
        return None, None, None, None, None, None, None, None, None
    B, N, C = S.shape
    if g_out is None:
        g_out = S.new_zeros((B, C, x.shape[2]))
    if g_out_adj is None:
        g_out_adj = S.new_zeros((B, C, C))
    if g_q is None:
        g_q = S.new_zeros((B,), dtype=torch.float64)
    if g_ent is None:
        g_ent = S.new_zeros((B,), dtype=torch.float64)
    dx, ds, dadj = torch.ops.diffpool_fast.coarsen_backward(
        g_out, g_out_adj, g_q, g_ent, x, adj, mask, S, AS, StS, asym,
        ctx.s_dtype, need_dx, need_ds, need_dadj, flags, ctx.precision,
    )
    return (dx if need_dx else None, dadj if need_dadj else None, ds if need_ds else None,
            None, None, None, None, None, None)


_coarsen_op.register_autograd(_backward, setup_context=_setup_context)


def coarsen_triton(
    x: Tensor, adj: Tensor, s: Tensor, mask: Optional[Tensor] = None, *,
    adj_symmetric: Optional[bool] = None, num_clusters: Optional[Tensor] = None, exact_link: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One coarsening step on the Triton kernels; the contract of ``coarsen_torch`` (``exact_link``
    as there).

    Returns ``(out [B,C,F] fp32, out_adj [B,C,C] fp32, link_sq [B] float64, ent_sum [B]
    float64)``. ``adj_symmetric``: True promises A_b = A_b^T (the backward never reads A for
    ds); False says it is not; None (default) checks it exactly in the forward pass, only when
    a gradient into s will be needed. The dot precision is read from
    ``torch.get_float32_matmul_precision()`` at each call (``dot_precision``). ``num_clusters``:
    [B] k_b (checked), masked in the row pass; S is 0 past k_b, so every later launch and the
    backward (dL = S * (...)) need no change.
    """
    check_sym = adj_symmetric is None and torch.is_grad_enabled() and s.requires_grad
    sym_known = {None: _SYM_UNKNOWN, False: _SYM_NO, True: _SYM_YES}[adj_symmetric]
    outs = torch.ops.diffpool_fast.coarsen(x, adj, s, mask, check_sym, sym_known, dot_precision(), num_clusters,
                                           exact_link)
    out, out_adj, q_raw, ent_sum = outs[:4]
    # q <= 0 is clamped (with a zero gradient there); NaN passes, with its gradient
    link_sq = torch.where(q_raw <= 0, torch.zeros_like(q_raw), q_raw)
    return out, out_adj, link_sq, ent_sum
