"""Shared helper of the data and fault tests: a generated dataset written in the TU text format,
into a writable folder (so that a test can then fix, truncate or relabel its files)."""
from pathlib import Path

from diffpool_fast.data import make_synthetic


def write_tu(root: Path, name: str = "GEN", graphs: int = 30, seed: int = 0) -> Path:
    """``root/NAME/NAME_*.txt`` of ``make_synthetic(graphs, seed)``: edges (1-based, both
    directions), graph indicator, graph labels and node labels (the degree class); returns the
    dataset folder."""
    ds = make_synthetic(graphs, seed=seed)
    d = Path(root) / name
    d.mkdir(parents=True)
    a_lines, indicator, node_labels, first = [], [], [], 0
    for g, (x, e) in enumerate(zip(ds.xs, ds.edges)):
        n = x.shape[0]
        a_lines += [f"{int(u) + first + 1}, {int(v) + first + 1}" for u, v in e.t().tolist()]
        indicator += [str(g + 1)] * n
        node_labels += [str(int(c)) for c in x.argmax(1)]
        first += n
    (d / f"{name}_A.txt").write_text("\n".join(a_lines) + "\n")
    (d / f"{name}_graph_indicator.txt").write_text("\n".join(indicator) + "\n")
    (d / f"{name}_graph_labels.txt").write_text("\n".join(str(int(y)) for y in ds.y) + "\n")
    (d / f"{name}_node_labels.txt").write_text("\n".join(node_labels) + "\n")
    return d


def edit_lines(path: Path, fn) -> None:
    """Rewrite a text file line by line: ``fn(list of lines) -> list of lines``."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")
