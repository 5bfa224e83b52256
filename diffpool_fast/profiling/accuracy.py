"""``diffpool-fast profile --accuracy``: each backend's error against a float64 reference."""
from __future__ import annotations

from typing import Dict, List

from .costmodel import Shape
from .harness import BACKEND_LABELS, Backend, backward, first_line, forward, make_inputs
from .options import Config

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


def measure_accuracy(cfg: Config, shape: Shape, backends: Dict[str, Backend]) -> List[Dict[str, object]]:
    """Max error of each backend's outputs and gradients relative to a float64 reference,
    each normalised by the largest magnitude of the reference (same inputs, same upstream
    gradients)."""
    import torch

    from ..ops.reference import dense_diff_pool_reference

    inp = make_inputs(shape, cfg.device, cfg.seed + 1, cfg.density)
    x64 = inp.x.detach().double().requires_grad_()
    s64 = inp.s.detach().double().requires_grad_()
    ref = dense_diff_pool_reference(x64, inp.adj.double(), s64, inp.mask)
    torch.autograd.backward(ref, [g.double() for g in inp.grads])
    ref = [t.detach() for t in ref] + [x64.grad, s64.grad]
    rows = []
    for b in cfg.backends:
        if not backends[b].available:
            continue
        try:
            inp.x.grad = inp.s.grad = None
            outs = forward(backends[b].fn, inp)
            backward(outs, inp)
            got = [t.detach() for t in outs] + [inp.x.grad, inp.s.grad]
        except Exception as err:
            rows.append({"backend": b, "nodes": shape.nodes, "clusters": shape.clusters,
                         "batch": shape.batch, "error": first_line(err)})
            continue
        row = {"backend": b, "batch": shape.batch, "nodes": shape.nodes,
               "clusters": shape.clusters, "features": shape.features, "dtype": shape.dtype}
        for name, g, r in zip(ERROR_NAMES, got, ref):
            scale = r.abs().max().clamp_min(1e-300)
            row[f"err_{name}"] = f"{float((g.double() - r).abs().max() / scale):.3e}"
        rows.append(row)
        inp.x.grad = inp.s.grad = None
    return rows


def accuracy_markdown(rows: List[Dict[str, object]]) -> str:
    """The error table, with each backend's link-loss error as a ratio to PyG's (same shape)."""
    pyg_link = {r["nodes"]: float(r["err_link_loss"]) for r in rows
                if r["backend"] == "pyg" and "error" not in r}
    lines = ["Error vs float64 reference (max |got - ref| / max |ref|):", "",
             "| backend | B | N | C | " + " | ".join(ERROR_NAMES) + " | PyG's link error / this |",
             "|---|---|---|---|" + "---|" * (len(ERROR_NAMES) + 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['batch']} | {r['nodes']} | {r['clusters']} | "
                         f"error: {r['error']} |")
            continue
        own = float(r["err_link_loss"])
        ratio = (f"{pyg_link[r['nodes']] / own:.3g}" if r["nodes"] in pyg_link and own > 0
                 else "")
        lines.append(f"| {BACKEND_LABELS.get(r['backend'], r['backend'])} | {r['batch']} | "
                     f"{r['nodes']} | {r['clusters']} | "
                     + " | ".join(str(r[f'err_{n}']) for n in ERROR_NAMES) + f" | {ratio} |")
    return "\n".join(lines) + "\n"
