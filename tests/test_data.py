"""Data: TU-format loading through a writable cache, dense batches, bucketing, folds, generated data."""
import re
import stat
from pathlib import Path

import pytest
import torch

from diffpool_fast.data import (
    DatasetError,
    DenseLoader,
    GraphDataset,
    collate,
    load_tu,
    make_synthetic,
    stratified_folds,
    stratified_split,
)

REPO = Path(__file__).resolve().parents[1]

# Three small graphs: a triangle (class 0), a path of 4 (class 1), a single edge (class 1).
TINY_EDGES = [(1, 2), (2, 3), (3, 1), (4, 5), (5, 6), (6, 7), (8, 9)]
TINY_INDICATOR = [1, 1, 1, 2, 2, 2, 2, 3, 3]
TINY_GRAPH_LABELS = [0, 1, 1]
TINY_NODE_LABELS = [0, 1, 2, 0, 0, 1, 1, 2, 0]


def _write_tiny(root: Path, name="TINY", node_labels=True, attributes=False):
    d = root / name
    d.mkdir(parents=True)
    lines = [f"{a}, {b}" for a, b in TINY_EDGES] + [f"{b}, {a}" for a, b in TINY_EDGES]
    (d / f"{name}_A.txt").write_text("\n".join(lines) + "\n")
    (d / f"{name}_graph_indicator.txt").write_text("\n".join(map(str, TINY_INDICATOR)) + "\n")
    (d / f"{name}_graph_labels.txt").write_text("\n".join(map(str, TINY_GRAPH_LABELS)) + "\n")
    if node_labels:
        (d / f"{name}_node_labels.txt").write_text("\n".join(map(str, TINY_NODE_LABELS)) + "\n")
    if attributes:
        rows = [f"{i * 1.5}, {-i}" for i in range(len(TINY_INDICATOR))]
        (d / f"{name}_node_attributes.txt").write_text("\n".join(rows) + "\n")
    # The source folder is read-only, as ../shared/tudata is.
    for f in d.iterdir():
        f.chmod(stat.S_IRUSR | stat.S_IRGRP)
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return d


def test_reads_tiny_tu_dataset_from_read_only_folder(tmp_path):
    src = _write_tiny(tmp_path / "src")
    ds = load_tu("TINY", str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3 and ds.num_classes == 2
    assert ds.num_nodes.tolist() == [3, 4, 2] and ds.max_nodes == 4
    assert ds.y.tolist() == TINY_GRAPH_LABELS
    assert ds.num_features == 3  # one-hot node labels
    assert ds.xs[0].argmax(1).tolist() == [0, 1, 2]
    assert ds.xs[1].argmax(1).tolist() == [0, 0, 1, 1]
    assert [e.shape[1] for e in ds.edges] == [6, 6, 2]
    assert not any(p.name == "processed" for p in src.rglob("*"))  # nothing written into the source
    b = collate(ds, [0, 1, 2])
    assert b.adj.dtype == torch.bool and b.adj.shape == (3, 4, 4)
    assert b.mask.tolist() == [[True] * 3 + [False], [True] * 4, [True] * 2 + [False] * 2]
    assert torch.equal(b.adj, b.adj.transpose(1, 2))
    assert b.adj[0, :3, :3].sum() == 6 and b.adj[0, 3].sum() == 0
    assert b.adj[1].sum() == 6 and bool(b.adj[1, 0, 1]) and not bool(b.adj[1, 0, 2])
    assert b.adj[2].sum() == 2


def test_node_attributes_and_degree_features(tmp_path):
    _write_tiny(tmp_path / "a", attributes=True)
    ds = load_tu("TINY", str(tmp_path / "a"), cache_dir=str(tmp_path / "cache"), node_attr=True)
    assert ds.num_features == 2 + 3
    attrs = torch.cat(ds.xs)[:, :2]
    torch.testing.assert_close(attrs.mean(0), torch.zeros(2), atol=1e-5, rtol=0)  # standardised
    _write_tiny(tmp_path / "b", node_labels=False)
    ds = load_tu("TINY", str(tmp_path / "b"), cache_dir=str(tmp_path / "cache"))
    # No node labels: one-hot degree up to the maximum degree (2).
    assert ds.num_features == 3
    assert ds.xs[1].argmax(1).tolist() == [1, 2, 2, 1]
    assert "degree" in ds.info["node_input"]


def test_missing_dataset_and_files_give_clear_errors(tmp_path):
    _write_tiny(tmp_path / "src")
    with pytest.raises(DatasetError, match=r"'NOPE' not found.*datasets there: TINY"):
        load_tu("NOPE", str(tmp_path / "src"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetError, match="does not exist"):
        load_tu("TINY", str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "c"))
    d = tmp_path / "broken" / "TINY"
    d.mkdir(parents=True)
    (d / "TINY_A.txt").write_text("1, 2\n2, 1\n")
    (d / "TINY_graph_indicator.txt").write_text("1\n1\n")
    with pytest.raises(DatasetError, match="missing file .*TINY_graph_labels.txt"):
        load_tu("TINY", str(tmp_path / "broken"), cache_dir=str(tmp_path / "c"))


def _shared_tudata():
    for cand in (Path("/work/shared/tudata"), REPO.parent / "shared" / "tudata"):
        if (cand / "README.md").is_file():
            return cand
    return None


def _readme_table(path: Path):
    rows = {}
    for line in (path / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"[\d,]+", cells[1] or ""):
            def num(s):
                return float(s.replace(",", ""))

            rows[cells[0]] = {"graphs": num(cells[1]), "nodes": num(cells[2]), "max_nodes": num(cells[4]),
                              "mean_nodes": num(cells[5]), "classes": num(cells[6])}
    return rows


SHARED = _shared_tudata()


@pytest.mark.skipif(SHARED is None, reason="no shared/tudata folder on this machine")
@pytest.mark.parametrize("name", ["MUTAG", "PROTEINS", "ENZYMES", "NCI1", "IMDB-BINARY", "DD"])
def test_shared_tudata_matches_its_readme(name, tmp_path_factory):
    table = _readme_table(SHARED)
    if name not in table or not (SHARED / name).is_dir():
        pytest.skip(f"{name} not in {SHARED}")
    cache = tmp_path_factory.getbasetemp() / "tucache"
    ds = load_tu(name, str(SHARED), cache_dir=str(cache))
    want = table[name]
    assert len(ds) == want["graphs"]
    assert int(ds.num_nodes.sum()) == want["nodes"]
    assert ds.max_nodes == want["max_nodes"]
    assert round(float(ds.num_nodes.float().mean()), 1) == want["mean_nodes"]
    assert ds.num_classes == want["classes"]
    assert all(torch.isfinite(x).all() and x.shape[1] == ds.num_features for x in ds.xs[:50])


def test_bucketed_loader_covers_every_graph_once_and_pads_per_batch():
    ds = make_synthetic(90, seed=1)
    idx = torch.arange(5, 90)
    loader = DenseLoader(ds, idx, batch_size=8, shuffle=True, bucket=True, bucket_chunk=4, seed=3)
    seen = torch.cat(loader.batch_indices(0))
    assert sorted(seen.tolist()) == idx.tolist()
    assert [b.tolist() for b in loader.batch_indices(0)] == [b.tolist() for b in loader.batch_indices(0)]
    assert [b.tolist() for b in loader.batch_indices(0)] != [b.tolist() for b in loader.batch_indices(1)]
    for b_idx, batch in zip(loader.batch_indices(2), loader.epoch(2)):
        n = ds.num_nodes[b_idx]
        assert batch.x.shape[1] == int(n.max()) and torch.equal(batch.mask.sum(1), n)
    # Bucketing shrinks the padding: fewer padded entries than random batches of the same graphs.
    def padded(bucket):
        L = DenseLoader(ds, idx, batch_size=8, shuffle=True, bucket=bucket, seed=3)
        return sum(len(b) * int(ds.num_nodes[b].max()) ** 2 for b in L.batch_indices(0))
    assert padded(True) < padded(False)
    fixed = next(iter(DenseLoader(ds, idx, batch_size=8, pad_to=70)))
    assert fixed.adj.shape[1:] == (70, 70)


def test_stratified_folds_and_split():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    y = torch.randint(0, 4, (203,), generator=g)
    folds = stratified_folds(y, 10, seed=5)
    allidx = torch.cat(folds)
    assert sorted(allidx.tolist()) == list(range(203))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for c in range(4):
        per = [int((y[f] == c).sum()) for f in folds]
        assert max(per) - min(per) <= 1
    assert [f.tolist() for f in stratified_folds(y, 10, seed=5)] == [f.tolist() for f in folds]
    rest, held = stratified_split(torch.arange(203), y, 0.1, seed=1)
    assert len(set(rest.tolist()) & set(held.tolist())) == 0 and len(rest) + len(held) == 203
    for c in range(4):
        n_c = int((y == c).sum())
        assert abs(int((y[held] == c).sum()) - 0.1 * n_c) <= 1
    with pytest.raises(ValueError, match="k="):
        stratified_folds(y[:5], 10)


def test_generated_dataset_is_deterministic_and_well_formed():
    a, b = make_synthetic(30, seed=7), make_synthetic(30, seed=7)
    c = make_synthetic(30, seed=8)
    assert all(torch.equal(e1, e2) for e1, e2 in zip(a.edges, b.edges))
    assert not all(e1.shape == e2.shape and torch.equal(e1, e2) for e1, e2 in zip(a.edges, c.edges))
    assert torch.bincount(a.y).tolist() == [10, 10, 10]
    for e, x in zip(a.edges, a.xs):
        assert (e[0] != e[1]).all()
        A = torch.zeros(x.shape[0], x.shape[0], dtype=torch.bool)
        A[e[0], e[1]] = True
        assert torch.equal(A, A.t())
        assert torch.equal(x.argmax(1), A.sum(1).clamp_max(16))


def test_undirected_flag():
    ds = make_synthetic(num_graphs=12, seed=3)
    assert ds.undirected
    directed = GraphDataset("D", [torch.zeros(3, 1)], [torch.tensor([[0, 1], [1, 2]])], torch.tensor([0]), 1)
    assert not directed.undirected
    both = GraphDataset("U", [torch.zeros(3, 1)], [torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])], torch.tensor([0]), 1)
    assert both.undirected


# --------------------------------------------------------------------------- the cache follows the content

def _tu(tmp_path, graphs=30):
    from tu_files import write_tu

    return write_tu(tmp_path / "src", "GEN", graphs=graphs)


def test_cache_is_keyed_on_the_raw_files_content(tmp_path):
    from tu_files import edit_lines

    d = _tu(tmp_path)
    cache = str(tmp_path / "cache")
    first = load_tu("GEN", str(tmp_path / "src"), cache_dir=cache)
    # Relabel (swap classes 0 and 1) in place: same folder, same cache, new content.
    edit_lines(d / "GEN_graph_labels.txt", lambda ls: [{"0": "1", "1": "0"}.get(x, x) for x in ls])
    relabelled = load_tu("GEN", str(tmp_path / "src"), cache_dir=cache)
    assert torch.equal(relabelled.y, torch.tensor([{0: 1, 1: 0}.get(int(v), int(v)) for v in first.y]))
    # Drop the first graph's edges (a "fixed" file): the edges follow.
    n0 = int(first.num_nodes[0])
    edit_lines(d / "GEN_A.txt", lambda ls: [x for x in ls if int(x.split(",")[0]) > n0])
    fixed = load_tu("GEN", str(tmp_path / "src"), cache_dir=cache)
    assert fixed.edges[0].numel() == 0 and torch.equal(fixed.edges[-1], first.edges[-1])
    assert first.info["files"]["GEN_A.txt"] != fixed.info["files"]["GEN_A.txt"]


def test_a_last_line_without_newline_is_not_dropped(tmp_path):
    d = _tu(tmp_path)
    ref = load_tu("GEN", str(tmp_path / "src"), cache_dir=str(tmp_path / "c1"))
    p = d / "GEN_A.txt"
    p.write_bytes(p.read_bytes().rstrip(b"\n"))  # PyG's reader silently drops such a line
    ds = load_tu("GEN", str(tmp_path / "src"), cache_dir=str(tmp_path / "c2"))
    assert sum(e.shape[1] for e in ds.edges) == sum(e.shape[1] for e in ref.edges)


def _truncate(part, keep):
    def edit(d):
        p = d / f"GEN_{part}.txt"
        b = p.read_bytes()
        p.write_bytes(b[: int(len(b) * keep)])
    return edit


def _replace_line(part, line, text):
    def edit(d):
        p = d / f"GEN_{part}.txt"
        lines = p.read_text().splitlines()
        lines[line] = text
        p.write_text("\n".join(lines) + "\n")
    return edit


@pytest.mark.parametrize(
    "edit, words",
    [
        (_truncate("graph_labels", 0.5), ["GEN_graph_labels.txt", "truncated"]),
        (_truncate("graph_indicator", 0.5), ["GEN_graph_indicator.txt", "truncated"]),
        (_truncate("node_labels", 0.7), ["GEN_node_labels.txt", "truncated"]),
        (_truncate("A", 0.5013), ["GEN_A.txt", "line"]),
        (_truncate("A", 0.0), ["GEN_A.txt", "empty"]),
        (_replace_line("node_labels", 4, "x"), ["GEN_node_labels.txt", "line 5", "not an integer"]),
        (_replace_line("A", 2, "1, 2, 3"), ["GEN_A.txt", "line 3"]),
        (_replace_line("A", 0, "1, 100000"), ["GEN_A.txt", "line 1", "outside"]),
        (_replace_line("graph_indicator", 0, "2"), ["GEN_graph_indicator.txt", "not sorted"]),
        (_replace_line("A", 1, ""), ["GEN_A.txt", "line 2 is blank"]),
    ],
    ids=["labels-truncated", "indicator-truncated", "node-labels-truncated", "A-cut-mid-line", "A-empty",
         "junk-node-label", "A-three-values", "A-bad-node", "indicator-unsorted", "A-blank-line"],
)
def test_malformed_files_give_a_dataset_error_naming_them(edit, words, tmp_path):
    d = _tu(tmp_path)
    edit(d)
    with pytest.raises(DatasetError) as info:
        load_tu("GEN", str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_a_last_graph_without_edges_is_refused(tmp_path):
    # TUDataset would cut such a graph off (its edge slices end one graph early).
    from tu_files import edit_lines

    d = _tu(tmp_path)
    n = len((d / "GEN_graph_indicator.txt").read_text().split())
    last = (d / "GEN_graph_indicator.txt").read_text().split().index("30") + 1
    edit_lines(d / "GEN_A.txt", lambda ls: [x for x in ls if int(x.split(",")[0]) < last])
    with pytest.raises(DatasetError, match="the last graph .30. has no edges in GEN_A.txt"):
        load_tu("GEN", str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"))
    assert n > last


def test_an_edge_between_two_graphs_is_refused(tmp_path):
    d = _tu(tmp_path)
    n = len((d / "GEN_graph_indicator.txt").read_text().split())
    with open(d / "GEN_A.txt", "a") as f:
        f.write(f"1, {n}\n")  # node 1 is in graph 1, node n in the last graph
    with pytest.raises(DatasetError, match="GEN_A.txt line .* joins nodes of two graphs"):
        load_tu("GEN", str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"))


def test_fingerprint_names_what_the_data_are():
    from diffpool_fast.data import fingerprint

    a, b = make_synthetic(30, seed=1), make_synthetic(30, seed=1)
    assert fingerprint(a) == fingerprint(b)
    c = a.subset(range(30))
    c.y = c.y.flip(0)
    fa, fc = fingerprint(a), fingerprint(c)
    assert fa["labels_sha256"] != fc["labels_sha256"]
    assert fa["edges_sha256"] == fc["edges_sha256"] and fa["features_sha256"] == fc["features_sha256"]
