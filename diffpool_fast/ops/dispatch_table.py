"""The measured choice of ``backend="auto"`` on CUDA: Triton or torch, per device capability and
shape bucket.

The table lives in ``dispatch_table.json`` next to this module (package data). ``diffpool-fast
profile --device cuda --write-dispatch PATH`` writes it from forward+backward timings of both
paths; ``dispatch.resolve_backend(..., key=...)`` reads it.

Bucket of a call (:func:`bucket`):

- N (padded nodes), C (clusters) and F (features), each rounded up to the next power of two:
  N = 300 and N = 512 share the bucket 512;
- the dtype of x and s, and the dtype of adj (names as in torch: ``float32``, ``bool``, ...).

The batch size is not part of the bucket: each entry lists the batch sizes it was measured at.
F matters least (it only enters the Sᵀ X products, not the pass over A), so a bucket whose F was
not measured takes the choice of the same N, C and dtypes when every measured F of those agrees.
A capability or bucket the table does not hold otherwise gets the default: Triton when it is
importable.

Cost per call: the capability is read once per device index (``torch.cuda.get_device_properties``)
and cached; the lookup is then two dict lookups on ints and strings, no file IO and no host-device
sync. The JSON file is read once, when this module is imported (a few kB), so that nothing is
read while ``torch.compile`` traces a call.

A section of the file can be ``"provisional": true``: measured on older kernels, to be replaced by
the next GPU run (``--write-dispatch`` replaces the whole section of the capability it measured).
The lookup treats it like any other section; ``describe()`` says so.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

#: the file the package ships (and ``--write-dispatch`` rewrites in a checkout)
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_table.json")
FORMAT = 1
CHOICES = ("torch", "triton")

#: torch dtype -> its name in the table
DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.float64: "float64", torch.bool: "bool", torch.uint8: "uint8",
}

Capability = Tuple[int, int]
Bucket = Tuple[int, int, int, str, str]
#: a bucket without F: (N, C, dtype, adj_dtype)
AnyF = Tuple[int, int, str, str]

#: capability -> bucket -> "torch" | "triton"
_choices: Dict[Capability, Dict[Bucket, str]] = {}
#: capability -> (N, C, dtype, adj_dtype) -> the choice every measured F of it agrees on
_any_f: Dict[Capability, Dict[AnyF, str]] = {}
#: capability -> the section's provenance (device, source, date, commit, provisional)
_sections: Dict[Capability, Dict[str, object]] = {}
#: where the table in use was read from ("" when set from a dict)
_loaded_from = ""
#: CUDA device index -> capability, filled on first use of each device
_capability_cache: Dict[int, Capability] = {}


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    p = 1
    while p < n:
        p *= 2
    return p


def bucket(nodes: int, clusters: int, features: int, dtype: str, adj_dtype: str) -> Bucket:
    return (next_pow2(nodes), next_pow2(clusters), next_pow2(features), dtype, adj_dtype)


def bucket_of(x, adj, s) -> Optional[Bucket]:
    """The bucket of batched inputs x [B, N, F], adj [B, N, N], s [B, N, C]; None for a dtype the
    table has no name for."""
    dt, adt = DTYPE_NAMES.get(x.dtype), DTYPE_NAMES.get(adj.dtype)
    if dt is None or adt is None:
        return None
    return bucket(x.shape[-2], s.shape[-1], x.shape[-1], dt, adt)


def capability(device) -> Capability:
    """(major, minor) of a CUDA device, read once per device index."""
    index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
    cap = _capability_cache.get(index)
    if cap is None:
        props = torch.cuda.get_device_properties(index)
        cap = (int(props.major), int(props.minor))
        _capability_cache[index] = cap
    return cap


def lookup(device, key: Optional[Bucket]) -> Optional[str]:
    """The measured choice for a CUDA device and bucket, or None where the table has none."""
    if key is None or not _choices:
        return None
    cap = capability(device)
    table = _choices.get(cap)
    if not table:
        return None
    choice = table.get(key)
    if choice is None:
        choice = _any_f[cap].get((key[0], key[1], key[3], key[4]))
    return choice


def any_f(table: Mapping[Bucket, str]) -> Dict[AnyF, str]:
    """(N, C, dtype, adj_dtype) -> choice, where all measured F of it agree."""
    seen: Dict[AnyF, set] = {}
    for (n, c, _, dt, adt), choice in table.items():
        seen.setdefault((n, c, dt, adt), set()).add(choice)
    return {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}


# ----------------------------------------------------------------------------------------------
# Reading and writing the file


class TableError(ValueError):
    """A dispatch table that does not follow the format (the message names the field)."""


def parse(data: Mapping) -> Tuple[Dict[Capability, Dict[Bucket, str]], Dict[Capability, Dict[str, object]]]:
    """The choices and provenance of a loaded JSON document; TableError when malformed."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise TableError(f"dispatch table: 'format' must be {FORMAT}, got {data.get('format') if isinstance(data, Mapping) else data!r}")
    sections = data.get("capabilities")
    if not isinstance(sections, Mapping):
        raise TableError("dispatch table: 'capabilities' must be an object keyed by 'major.minor'")
    choices: Dict[Capability, Dict[Bucket, str]] = {}
    meta: Dict[Capability, Dict[str, object]] = {}
    for cap_text, section in sections.items():
        cap = parse_capability(cap_text)
        entries = section.get("buckets") if isinstance(section, Mapping) else None
        if not isinstance(entries, list):
            raise TableError(f"dispatch table: capabilities[{cap_text!r}].buckets must be a list")
        table: Dict[Bucket, str] = {}
        for i, e in enumerate(entries):
            where = f"capabilities[{cap_text!r}].buckets[{i}]"
            try:
                key = (int(e["nodes"]), int(e["clusters"]), int(e["features"]), str(e["dtype"]),
                       str(e["adj_dtype"]))
                choice = e["backend"]
            except (KeyError, TypeError, ValueError) as err:
                raise TableError(f"dispatch table: {where}: needs nodes, clusters, features, dtype, "
                                 f"adj_dtype, backend ({err})") from None
            if key[:3] != tuple(next_pow2(v) for v in key[:3]):
                raise TableError(f"dispatch table: {where}: nodes, clusters and features must be powers "
                                 f"of two (a bucket), got {key[:3]}")
            if choice not in CHOICES:
                raise TableError(f"dispatch table: {where}: backend must be one of {CHOICES}, got {choice!r}")
            if key in table:
                raise TableError(f"dispatch table: {where}: bucket {key} appears twice")
            table[key] = choice
        choices[cap] = table
        meta[cap] = {k: v for k, v in section.items() if k != "buckets"}
    return choices, meta


def parse_capability(text: str) -> Capability:
    try:
        major, minor = str(text).split(".")
        return int(major), int(minor)
    except ValueError:
        raise TableError(f"dispatch table: capability must be 'major.minor' such as '9.0', got {text!r}") from None


def read(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def use(source=None) -> None:
    """Replace the table in use: a path, a parsed JSON document, or None for the packaged file.

    For tests and for a user who measured a table of their own. Call it before the first
    ``torch.compile`` trace that should see it (a compiled graph keeps the choice it traced)."""
    global _choices, _sections, _loaded_from, _any_f
    path = DEFAULT_PATH if source is None else source
    data = read(path) if isinstance(path, str) else path
    _choices, _sections = parse(data)
    _any_f = {cap: any_f(table) for cap, table in _choices.items()}
    _loaded_from = path if isinstance(path, str) else ""


def _load_packaged() -> None:
    """At import: the packaged table, or an empty one with a warning when it is missing or bad
    (auto then picks Triton on CUDA, as before there was a table)."""
    if not os.path.isfile(DEFAULT_PATH):
        return
    try:
        use(None)
    except (OSError, ValueError) as err:
        warnings.warn(f"diffpool_fast: ignoring the dispatch table {DEFAULT_PATH}: {err}", RuntimeWarning, stacklevel=2)


def describe(device, key: Optional[Bucket]) -> str:
    """Where the auto choice for this device and bucket comes from, in words (for reports)."""
    if key is None:
        return "no table bucket for these dtypes"
    cap = capability(device)
    if cap not in _choices:
        return f"no table section for capability {cap[0]}.{cap[1]}"
    name = f"N{key[0]} C{key[1]} F{key[2]} {key[3]}/adj {key[4]}"
    if key in _choices[cap]:
        where = name
    elif (key[0], key[1], key[3], key[4]) in _any_f[cap]:
        where = f"{name} (F not measured; every measured F of N{key[0]} C{key[1]} agrees)"
    else:
        return f"bucket {name} not in the table for {cap[0]}.{cap[1]}: the default, Triton"
    m = _sections.get(cap, {})
    what = "provisional " if m.get("provisional") else ""
    return (f"{what}table {cap[0]}.{cap[1]} ({m.get('device', '?')}, {m.get('date', '?')}, "
            f"commit {m.get('commit', '?')}): {where}")


# ----------------------------------------------------------------------------------------------
# Measured winners -> a section


def winners(cases: Iterable[Mapping]) -> List[Dict[str, object]]:
    """Buckets from measured cases, each a mapping with batch, nodes, clusters, features, dtype,
    adj_dtype, torch_ms, triton_ms and optionally pyg_ms and logits.

    A bucket's winner is Triton when the geometric mean over its cases of triton_ms / torch_ms is
    below 1, else torch. Cases without both times are left out. ``beats_pyg``: whether the winner
    was faster than PyG in every case of the bucket where PyG was measured (None if never)."""
    grouped: Dict[Bucket, List[Mapping]] = {}
    for c in cases:
        if not c.get("torch_ms") or not c.get("triton_ms"):
            continue
        key = bucket(int(c["nodes"]), int(c["clusters"]), int(c["features"]), str(c["dtype"]), str(c["adj_dtype"]))
        grouped.setdefault(key, []).append(c)
    out = []
    for key in sorted(grouped, key=lambda k: (k[3], k[4], k[0], k[1], k[2])):
        group = grouped[key]
        log_ratio = sum(math.log(float(c["triton_ms"]) / float(c["torch_ms"])) for c in group) / len(group)
        choice = "triton" if log_ratio < 0 else "torch"
        with_pyg = [c for c in group if c.get("pyg_ms")]
        beats = all(float(c[f"{choice}_ms"]) < float(c["pyg_ms"]) for c in with_pyg) if with_pyg else None
        out.append({
            "nodes": key[0], "clusters": key[1], "features": key[2], "dtype": key[3], "adj_dtype": key[4],
            "backend": choice, "triton_over_torch": round(math.exp(log_ratio), 4), "beats_pyg": beats,
            "cases": [{k: c[k] for k in ("batch", "nodes", "clusters", "features", "logits", "precision",
                                         "torch_ms", "triton_ms", "pyg_ms", "source") if c.get(k) not in (None, "")}
                      for c in group],
        })
    return out


def write_section(path: str, cap: Capability, section: Mapping[str, object]) -> Dict:
    """Put ``section`` (provenance fields and ``buckets``) into the table at ``path`` as the whole
    entry of capability ``cap`` (replacing what was there, a provisional seed included), keeping
    the other capabilities. The result is checked with :func:`parse` before it is written."""
    data = read(path) if os.path.isfile(path) else {}
    if not data:
        data = {"format": FORMAT, "about": ABOUT, "capabilities": {}}
    data.setdefault("capabilities", {})[f"{cap[0]}.{cap[1]}"] = dict(section)
    parse(data)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return data


ABOUT = ("backend='auto' on CUDA: per device capability ('major.minor') and bucket (N, C, F rounded up to "
         "the next power of two; dtype of x and s; dtype of adj), the faster of our two paths in "
         "forward+backward (grads of x and s) timings. Written by diffpool-fast profile --write-dispatch; "
         "read by diffpool_fast/ops/dispatch_table.py. Buckets not listed: Triton.")

_load_packaged()
