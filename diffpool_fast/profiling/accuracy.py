"""``diffpool-fast profile --accuracy``: each backend's error against a float64 reference.

The reference is PyG's formulas (``ops.reference``) run in float64 on the very inputs the
timings used, with the same upstream gradients; the error of each output and input gradient is
the relative Frobenius norm ||got - ref||_F / ||ref||_F (for the two scalar losses |got - ref| /
|ref|), as in the first GPU run's op table.
"""
from __future__ import annotations

from typing import Dict, List

from .harness import BACKEND_LABELS, Inputs, backward, forward

#: the compared tensors: the four outputs of dense_diff_pool, then the two input gradients
ERROR_NAMES = ["out", "out_adj", "link_loss", "ent_loss", "grad_x", "grad_s"]


def two_cliques(scale: float, n: int = 20, dtype=None, F: int = 3):
    """A near-fit case: two n-node cliques (self-loops included), logits = scale * the one-hot of
    each node's clique, x [1, 2n, F] standard normal (seed 0); float32 unless ``dtype``. S S^T ->
    A as the scale grows (scale 12: link 4.9e-4 of terms ~ 3200), so the link identity's terms
    cancel: the regime ``ops/link_exact.py`` handles. Used by the tests and
    bench/scripts/link_accuracy.py."""
    import torch

    dtype = dtype or torch.float32
    N = 2 * n
    adj = torch.zeros(1, N, N)
    adj[0, :n, :n] = 1
    adj[0, n:, n:] = 1
    oh = torch.zeros(1, N, 2)
    oh[0, :n, 0] = 1
    oh[0, n:, 1] = 1
    x = torch.randn(1, N, F, generator=torch.Generator().manual_seed(0))
    return x.to(dtype), adj.to(dtype), (scale * oh).to(dtype)


#: the error columns of profile.csv for ERROR_NAMES, in order
ERROR_COLUMNS = ["err_out", "err_out_adj", "err_link", "err_ent", "err_grad_x", "err_grad_s"]


def reference(inp: Inputs):
    """PyG's formulas in float64 on these inputs, with their upstream gradients: the six tensors
    of ERROR_NAMES. One forward+backward, computed on the inputs' device."""
    import torch

    from ..ops.reference import dense_diff_pool_reference

    x64 = inp.x.detach().double().requires_grad_()
    s64 = inp.s.detach().double().requires_grad_()
    ref = dense_diff_pool_reference(x64, inp.adj.double(), s64, inp.mask)
    torch.autograd.backward(ref, [g.double() for g in inp.grads])
    return [t.detach() for t in ref] + [x64.grad, s64.grad]


def rel_frobenius(got, ref) -> float:
    """||got - ref||_F / ||ref||_F in float64 (for a scalar: |got - ref| / |ref|); inf where the
    reference is 0 and got is not, nan where got is not finite."""
    import torch

    diff = torch.linalg.vector_norm(got.detach().double() - ref)
    norm = torch.linalg.vector_norm(ref)
    d, n = float(diff), float(norm)
    if n == 0:
        return 0.0 if d == 0 else float("inf")
    return d / n


def measure_errors(fn, inp: Inputs, ref) -> Dict[str, float]:
    """ERROR_COLUMNS -> relative Frobenius error of one forward+backward of ``fn`` on ``inp``."""
    inp.x.grad = inp.s.grad = None
    outs = forward(fn, inp)
    backward(outs, inp)
    got = [t.detach() for t in outs] + [inp.x.grad, inp.s.grad]
    inp.x.grad = inp.s.grad = None
    return {c: rel_frobenius(g, r) for c, g, r in zip(ERROR_COLUMNS, got, ref)}


def accuracy_rows(records: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """accuracy.csv: one row per shape, inputs, precision and backend that has errors (the
    full-mode row's, else the first mode's)."""
    out: Dict[tuple, Dict[str, object]] = {}
    keys = ("backend", "path", "precision", "logits", "batch", "nodes", "clusters", "features", "dtype", "adj_dtype")
    for r in records:
        if not any(r.get(c) not in (None, "") for c in ERROR_COLUMNS):
            continue
        k = tuple(r.get(x, "") for x in keys)
        if k not in out or r["mode"] == "full":
            out[k] = {**{x: r.get(x, "") for x in keys}, **{c: r[c] for c in ERROR_COLUMNS}}
    return list(out.values())


def accuracy_markdown(rows: List[Dict[str, object]]) -> str:
    """The error table, with each backend's link-loss error as a ratio to PyG's (same case)."""
    def case(r):
        return tuple(str(r.get(k, "")) for k in ("precision", "logits", "batch", "nodes", "clusters", "features", "adj_dtype"))

    pyg_link = {case(r): r.get("err_link", "") for r in rows if r["backend"] == "pyg"}
    lines = ["Relative error vs PyG's formulas in float64 (||got - ref||_F / ||ref||_F, same inputs):", "",
             "| backend | precision | logits | B | N | C | F | adj | " + " | ".join(ERROR_NAMES)
             + " | this link error / PyG's |",
             "|---|---|---|---|---|---|---|---|" + "---|" * (len(ERROR_NAMES) + 1)]
    for r in rows:
        own, theirs = r.get("err_link", ""), pyg_link.get(case(r), "")
        try:
            ratio = f"{float(own) / float(theirs):.3g}" if float(theirs) > 0 else ""
        except ValueError:
            ratio = ""
        name = BACKEND_LABELS.get(r["backend"], r["backend"])
        if r["backend"] == "auto" and r.get("path"):
            name = f"ours (auto: {r['path']})"
        lines.append(f"| {name} | {r.get('precision', '')} | {r.get('logits', '')} | {r['batch']} | {r['nodes']} | "
                     f"{r['clusters']} | {r.get('features', '')} | {r.get('adj_dtype', '')} | "
                     + " | ".join(str(r.get(c, "")) for c in ERROR_COLUMNS) + f" | {ratio} |")
    return "\n".join(lines) + "\n"
