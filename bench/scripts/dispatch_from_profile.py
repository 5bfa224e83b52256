"""Write a device's section of the dispatch table from a GPU run's op table (profile.csv), when
the run could not write it itself (``diffpool-fast profile --write-dispatch`` needs CUDA in the
same process; a lent GPU's time may end first).

    python bench/scripts/dispatch_from_profile.py RESULTS/profile.csv [--table diffpool_fast/ops/dispatch_table.json]

Same rule as ``--write-dispatch`` (``profiling.run.dispatch_cases`` and
``ops.dispatch_table.winners``): full-mode rows of torch and triton under "highest", per bucket
the path with the lower geometric-mean time; device, capability, versions and command from the
CSV's own columns.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys

from diffpool_fast.ops import dispatch_table
from diffpool_fast.profiling.run import dispatch_cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile_csv")
    ap.add_argument("--table", default=dispatch_table.DEFAULT_PATH)
    args = ap.parse_args(argv)
    with open(args.profile_csv) as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # as the profile's own records type them
        for k in ("batch", "nodes", "clusters", "features"):
            r[k] = int(r[k])
    cases, prec = dispatch_cases(rows)
    buckets = dispatch_table.winners(cases)
    if not buckets:
        print(f"{args.profile_csv}: no shape has full-mode times of both torch and triton", file=sys.stderr)
        return 1
    r0 = rows[0]
    cap = tuple(int(v) for v in str(r0["capability"]).split("."))
    section = {
        "device": r0["device"], "provisional": False,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "commit": r0.get("git", "unknown"),
        "versions": {k: r0[k] for k in ("python", "torch", "triton", "torch_geometric") if r0.get(k)},
        "precision": prec,
        "timing": f"forward+backward (grads of x and s, adj without grad), median of {r0['repeats']} CUDA-event "
                  "timings, backends interleaved in one process",
        "source": f"bench/scripts/dispatch_from_profile.py {os.path.relpath(args.profile_csv)}",
        "command": r0["command"],
        "buckets": buckets,
    }
    dispatch_table.write_section(args.table, cap, section)
    for b in buckets:
        print(f"N{b['nodes']} C{b['clusters']} F{b['features']} {b['dtype']}/{b['adj_dtype']}: {b['backend']} "
              f"(triton/torch {b['triton_over_torch']}, beats PyG {b['beats_pyg']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
