"""``diffpool-fast train`` across processes: which of the ways to run the command this process
is, and the two that start other processes' parts (see :mod:`diffpool_fast.train.distributed`
and :mod:`diffpool_fast.train.fold_workers`)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import List, Optional, Sequence

from ..errors import UsageError
from .distributed import env_world


def _distributed_errors():
    import torch.distributed as td

    kinds = [getattr(td, n) for n in ("DistError", "DistBackendError", "DistNetworkError") if hasattr(td, n)]
    return tuple(kinds) or (RuntimeError,)


def run_rank(args) -> int:
    """``loop.run`` as one rank of a torchrun job: a lost rank or a timed-out collective becomes a
    one-line error on this rank (exit 2), never a hang."""
    from . import loop

    rank = os.environ.get("RANK", "?")
    try:
        return loop.run(args)
    except _distributed_errors() as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UsageError(f"rank {rank}: lost contact with the other ranks ({first}); the run stopped: its "
                         "checkpoint keeps the finished epochs, continue it with --resume") from None
    except RuntimeError as err:
        text = str(err)
        if any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "timed out")):
            first = text.strip().splitlines()[0][:300]
            raise UsageError(f"rank {rank}: lost contact with the other ranks ({first}); the run stopped: its "
                             "checkpoint keeps the finished epochs, continue it with --resume") from None
        raise
    finally:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            td.destroy_process_group()


def _strip_option(argv: Sequence[str], option: str) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == option:
            skip = True
            continue
        if a.startswith(option + "="):
            continue
        out.append(a)
    return out


def launch(args, argv: Optional[Sequence[str]] = None) -> int:
    """``--nproc-per-node K`` outside torchrun: run this command as K ranks through
    ``python -m torch.distributed.run --standalone`` (loopback rendezvous on a free port), each
    with ``--threads max(1, cores // K)`` unless ``--threads`` is given, and the output folder
    fixed before they start. Returns torchrun's exit code, with one line saying how to continue
    when a rank failed."""
    from . import loop

    k = args.nproc_per_node
    if argv is None:
        argv = sys.argv[1:]
        if "train" not in argv:
            raise UsageError("--nproc-per-node: call it from the command line (diffpool-fast train ...), or run "
                             "the command under torchrun")
        argv = argv[argv.index("train") + 1:]
    argv = _strip_option(list(argv), "--nproc-per-node")
    out = loop._output_dir(args)
    argv = _strip_option(argv, "--out") + ["--out", str(out)]
    if args.threads is None and "--threads" not in argv:
        argv += ["--threads", str(max(1, (os.cpu_count() or 1) // k))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}",
           "--max-restarts=0", "-m", "diffpool_fast", "train"] + argv
    print(f"diffpool-fast train: {k} ranks: {' '.join(shlex.quote(c) for c in cmd[1:])}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default; --threads sets the count
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"diffpool-fast train: error: a rank failed (torchrun exit code {rc}); every rank was stopped. "
              f"The checkpoint in {out} keeps the finished epochs: continue with "
              f"diffpool-fast train --resume --out {out} --nproc-per-node {k}", file=sys.stderr)
        return rc if rc != 0 else 1
    return 0


def dispatch(args) -> int:
    """``diffpool-fast train``: a rank of a torchrun job, a launcher of ranks (--nproc-per-node),
    a parent of fold workers (--fold-workers, or --resume of such a run), or the plain loop."""
    from . import fold_workers, loop

    fw, npn = getattr(args, "fold_workers", None), getattr(args, "nproc_per_node", None)
    if fw and npn:
        raise UsageError("--fold-workers and --nproc-per-node: choose one")
    if env_world() > 1:
        if fw:
            raise UsageError("--fold-workers under torchrun: the folds would run once per rank; choose one")
        return run_rank(args)
    if npn and npn > 1:
        return launch(args)
    if (fw and fw > 1) or (args.resume and fold_workers.is_fold_parallel(args.out)):
        return fold_workers.run(args)
    return loop.run(args)
