"""One DiffPool level's forward + backward time, this checkout against earlier commits.

Level 0 of PyG's example architecture on PROTEINS-like input (3 label features, SAGE, hidden 64,
3 layers, JK, batch norm, 62 clusters as with ratio 0.1 of PROTEINS' 620-node maximum), torch
backend, B graphs of N node slots (graphs 1.. padded from N/2 on, graph 0 full), loss = sum of
the pooled outputs + link + entropy terms. Each revision runs in its own process from its own
git worktree; revisions alternate over ``--rounds`` rounds and each reports its best block.

Usage: python bench/scripts/level_step.py [--ref REV ...] [--n 45,150,620] [--batch 20] [--threads 2]
Writes bench/results/<UTC date>-<device>-level_step/level_step.md (command, machine, versions,
date included; bench/README.md); the reading of the recorded run is bench/notes/level_step.md.
An earlier revision runs this file's own --worker code (from this checkout) with its package.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))


from provenance import header, results_dir  # noqa: E402  (bench/scripts/ is on sys.path)


def _measure(n_list, B, threads, reps):
    import torch

    try:
        from diffpool_fast.nn.model import DiffPool
    except ImportError:  # a revision from before the layout change (--ref)
        from diffpool_fast.model import DiffPool

    torch.set_num_threads(threads)
    out = {}
    for N in n_list:
        torch.manual_seed(0)
        lv = DiffPool(3, 62, hidden=64, layers=3, batch_norm=True, adj_symmetric=True, backend="torch")
        x = torch.randn(B, N, 3)
        a = (torch.rand(B, N, N) < 0.05).float()
        a = ((a + a.transpose(1, 2)) > 0).float()
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1:, N // 2:] = False
        a = a * (mask[:, :, None] & mask[:, None, :])

        def run():  # called within this iteration only
            o = lv(x, a, mask)  # noqa: B023
            (o.x.sum() + o.adj.sum() + o.link_loss + o.ent_loss).backward()

        for _ in range(3):
            run()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            best = min(best, (time.perf_counter() - t0) / reps)
        out[N] = 1e3 * best
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", action="append", default=[], help="earlier commit(s) to compare with")
    ap.add_argument("--n", default="45,150,620")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="markdown file to write (default: a new folder in bench/results/)")
    args = ap.parse_args(argv)
    n_list = [int(v) for v in args.n.split(",")]
    if args.worker:
        print(json.dumps(_measure(n_list, args.batch, args.threads, args.reps)))
        return
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    revs = {f"{head}{'+changes' if dirty else ''} (this checkout)": REPO}
    tmp = Path(tempfile.mkdtemp(prefix="level_step_"))
    try:
        for ref in args.ref:
            short = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                                   check=True).stdout.strip()
            wt = tmp / short
            subprocess.run(["git", "worktree", "add", "--detach", "-f", str(wt), ref], cwd=REPO, check=True,
                           capture_output=True)
            revs[short] = wt
        best = {r: {} for r in revs}
        for rnd in range(args.rounds):
            for name, root in (list(revs.items()) if rnd % 2 == 0 else list(revs.items())[::-1]):
                env = dict(os.environ, PYTHONPATH=str(root))
                res = subprocess.run([sys.executable, str(HERE / "level_step.py"), "--worker", "--n", args.n,
                                      "--batch", str(args.batch), "--threads", str(args.threads), "--reps",
                                      str(args.reps)], cwd=root, env=env, capture_output=True, text=True, check=True)
                for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items():
                    best[name][int(k)] = min(best[name].get(int(k), float("inf")), v)
                print(f"round {rnd + 1}: {name}: {best[name]}", file=sys.stderr)
    finally:
        for ref_dir in tmp.iterdir() if tmp.exists() else []:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_dir)], cwd=REPO, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "# One DiffPool level, forward + backward (CPU)",
        "",
        f"Level 0, 3 input features, 62 clusters, batch norm, B={args.batch}, {args.threads} threads; best of "
        f"3 blocks of {args.reps} runs per process, best over {args.rounds} alternating rounds; ms.",
        "",
        *header(__file__, argv),
        "",
        "| revision | " + " | ".join(f"N={n}" for n in n_list) + " |",
        "| --- | " + " | ".join("---:" for _ in n_list) + " |",
    ]
    for name in revs:
        lines.append(f"| {name} | " + " | ".join(f"{best[name][n]:.2f}" for n in n_list) + " |")
    out = Path(args.out) if args.out else results_dir("level_step") / "level_step.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
