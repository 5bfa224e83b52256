"""Data-parallel training with ``torch.distributed``: ``diffpool-fast train --nproc-per-node K``
or the command under ``torchrun`` directly.

- Launch (:mod:`diffpool_fast.train.parallel`): ``--nproc-per-node K`` (outside torchrun) re-runs the command through
  ``torch.distributed.run --standalone`` (torchrun's module: a c10d rendezvous on a free
  loopback port) with K ranks; torchrun's agent stops every rank when one dies. Under torchrun
  (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment) the loop joins the process group:
  gloo on CPU, NCCL on CUDA (one GPU per local rank), with a timeout on every collective
  (``DIFFPOOL_FAST_DIST_TIMEOUT`` seconds, default 300), so a lost rank never hangs the others.
- Batches: the global batches are exactly those of a one-process run at ``--batch-size`` x
  world size (same seed, same epoch), and each is split into one shard per rank, balanced by
  node count (:func:`shard`). ``--batch-size`` is per rank.
- Gradients: each rank's loss is weighted by (its graphs x world size / the batch's graphs), so
  that DDP's average of the ranks' gradients is the gradient of the global batch's mean loss: the
  cross-entropy and the per-graph link and entropy losses (``--link-norm graph``) are means over
  graphs. A rank with no graph in a batch (a batch with fewer graphs than ranks) runs one graph of
  the batch with weight 0, since DDP needs every rank in every backward. Clipping acts on the
  averaged gradients, the same on all ranks.
- Metrics: the sums (loss x graphs, correct, graphs) of training and of the sharded evaluation
  are all-reduced, so every rank holds the global numbers; rank 0 alone writes metrics.csv,
  results.json and the checkpoints (which record the world size).
- Exactness: with ``--norm none`` (the default) and ``--dropout 0`` the ranks together compute the
  one-process run's step up to floating-point summation order. Batch norm's statistics are per
  rank (per shard) and dropout draws are per rank (the same seed on every rank, other shapes), so
  those runs are a data-parallel run of the same model, not the same numbers.
- Resume: ``--resume`` continues with the same world size; another one is refused, naming both
  (the per-rank batch times the world size is the global batch the run's epochs were drawn with).
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Iterator, List, NamedTuple

from ..config import DIST_TIMEOUT_ENV
from ..errors import UsageError

TIMEOUT_ENV = DIST_TIMEOUT_ENV
_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def env_world() -> int:
    """The world size torchrun gave this process (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def timeout_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get(TIMEOUT_ENV, "300")))
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}") from None


# --------------------------------------------------------------------------- sharding

def shard(indices, sizes, world: int) -> List[List[int]]:
    """Split one batch (graph ids ``indices``, node counts ``sizes[i]``) into ``world`` shards
    balanced by node count: the graphs in descending size (ties: earlier in the batch) each go to
    the shard with the fewest nodes so far (ties: fewer graphs, then the lower rank). Each shard
    keeps the batch's order. Deterministic; disjoint; together the whole batch; a shard is empty
    only when the batch has fewer graphs than ``world``."""
    ids = [int(i) for i in indices]
    n = [int(sizes[i]) for i in ids]
    order = sorted(range(len(ids)), key=lambda p: (-n[p], p))
    load, count = [0] * world, [0] * world
    owner = [0] * len(ids)
    for p in order:
        r = min(range(world), key=lambda r: (load[r], count[r], r))
        owner[p] = r
        load[r] += n[p]
        count[r] += 1
    return [[ids[p] for p in range(len(ids)) if owner[p] == r] for r in range(world)]


class Shard(NamedTuple):
    batch: object  # DenseBatch of this rank's graphs (one graph of the batch, weight 0, when it has none)
    n: int  # this rank's graphs in the batch (0: the placeholder)
    n_global: int  # graphs in the global batch


class ShardedLoader:
    """This rank's shards of a :class:`~diffpool_fast.data.DenseLoader` whose batches are the
    global ones (batch size = per-rank batch x world size)."""

    def __init__(self, loader, world: int, rank: int):
        self.loader, self.world, self.rank = loader, world, rank
        self._cached = None

    def __len__(self) -> int:
        return len(self.loader)

    def shards(self, epoch: int = 0) -> List[tuple]:
        """(this rank's graph ids, global batch ids) of every batch of the epoch."""
        sizes = self.loader.ds.num_nodes
        out = []
        for b in self.loader.batch_indices(epoch):
            out.append((shard(b, sizes, self.world)[self.rank], [int(i) for i in b]))
        return out

    def epoch(self, epoch: int = 0) -> Iterator[Shard]:
        from ..data import collate

        if not self.loader.shuffle and self._cached is not None:
            yield from self._cached
            return
        made = []
        for mine, whole in self.shards(epoch):
            ids, n = (mine, len(mine)) if mine else (whole[:1], 0)
            made.append(Shard(collate(self.loader.ds, ids, self.loader.pad_to), n, len(whole)))
            if self.loader.shuffle:
                yield made[-1]
        if not self.loader.shuffle:
            self._cached = made
            yield from made


# --------------------------------------------------------------------------- the process group

class Dist:
    """This process's part in a run: ``world`` 1 (and every method the one-process behaviour)
    outside torchrun."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0):
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self._ddp = {}

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files and prints its progress (rank 0)."""
        return self.rank == 0

    def device(self, device):
        import torch

        if self.active and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def same_everywhere(self, obj):
        """Rank 0's ``obj`` on every rank (the output folder a new run names by its start time)."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def loader(self, ds, indices, *, batch_size: int, **kw):
        from ..data import DenseLoader

        if not self.active:
            return DenseLoader(ds, indices, batch_size=batch_size, **kw)
        return ShardedLoader(DenseLoader(ds, indices, batch_size=batch_size * self.world, **kw), self.world, self.rank)

    def check_world(self, state, out: Path) -> None:
        """Record the world size in a new run's checkpoint; refuse to resume with another one."""
        if state is None:
            return
        saved = int(state["runtime"].get("world_size", 1))
        if saved != self.world:
            how = (f"--nproc-per-node {saved} (or torchrun --nproc-per-node {saved})" if saved > 1
                   else "one process (no --nproc-per-node, not under torchrun)")
            raise UsageError(f"--resume: the run in {out} was trained by {saved} rank(s), this is {self.world}: "
                             f"its batches are per-rank batch x world size, so another world size would change "
                             f"them; resume it with {how}")

    def record(self, state) -> None:
        if self.active:
            state["runtime"]["world_size"] = self.world

    def wrap(self, model):
        """The model in DistributedDataParallel (one wrapper per model)."""
        if not self.active:
            return model
        key = id(model)
        if key not in self._ddp or self._ddp[key].module is not model:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = next(model.parameters()).device
            self._ddp = {key: DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)}
        return self._ddp[key]

    def _sum(self, values, device):
        import torch
        import torch.distributed as td

        dev = device if td.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        td.all_reduce(t)
        return t.cpu().tolist()

    def train_epoch(self, model, opt, loader, epoch, device, clip, dtype=None):
        """One epoch of this rank's shards; the returned metrics are the global batch's (the same
        numbers ``loop._train_epoch`` gives for the one-process run)."""
        import torch
        import torch.distributed as td
        import torch.nn.functional as F

        ddp = self.wrap(model)
        ddp.train()
        sums = [0.0] * 6  # loss, ce, link, ent (each x graphs), correct, graphs
        flag = torch.zeros(1, dtype=torch.float64, device=device if td.get_backend() == "nccl" else "cpu")
        for sh in loader.epoch(epoch):
            b = sh.batch.to(device)
            x = b.x if dtype is None else b.x.to(dtype)
            opt.zero_grad(set_to_none=True)
            logits, aux, terms = ddp(x, b.adj, b.mask, return_terms=True)
            ce = F.cross_entropy(logits, b.y)
            loss = ce + aux
            (loss * (sh.n * self.world / sh.n_global)).backward()
            flag.fill_(0.0 if sh.n == 0 or bool(torch.isfinite(loss.detach())) else 1.0)
            td.all_reduce(flag)
            if float(flag) > 0:
                raise FloatingPointError(f"non-finite loss on {int(flag.item())} rank(s) at epoch {epoch + 1}")
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if sh.n:
                n = sh.n
                sums[0] += float(loss.detach()) * n
                sums[1] += float(ce.detach()) * n
                sums[2] += float(terms["link"].detach()) * n
                sums[3] += float(terms["ent"].detach()) * n
                sums[4] += int((logits.detach().argmax(-1) == b.y).sum())
                sums[5] += n
        loss_n, ce_n, link_n, ent_n, correct, total = self._sum(sums, device)
        t = max(total, 1)
        return {"loss": loss_n / t, "ce": ce_n / t, "link": link_n / t, "ent": ent_n / t, "acc": correct / t}

    def evaluate(self, model, loader, device, dtype=None):
        """(mean loss, accuracy) over every rank's shards of ``loader``."""
        import torch
        import torch.nn.functional as F

        model.eval()
        loss_sum, correct, total = 0.0, 0, 0
        with torch.no_grad():
            for sh in loader.epoch():
                if not sh.n:
                    continue
                b = sh.batch.to(device)
                logits, _ = model(b.x if dtype is None else b.x.to(dtype), b.adj, b.mask)
                loss_sum += float(F.cross_entropy(logits, b.y, reduction="sum"))
                correct += int((logits.argmax(-1) == b.y).sum())
                total += b.y.numel()
        loss_sum, correct, total = self._sum([loss_sum, correct, total], device)
        return (loss_sum / max(total, 1), correct / max(total, 1))

    def close(self) -> None:
        """Leaves the process group (after the run's last collective; call ``barrier`` first)."""
        if self.active:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


def start(args) -> Dist:
    """Join torchrun's process group when this process is one of its ranks (``WORLD_SIZE`` > 1
    in the environment); a one-process :class:`Dist` otherwise."""
    world = env_world()
    if world <= 1:
        return Dist()
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: run under torchrun")
    import torch
    import torch.distributed as td

    local = int(os.environ["LOCAL_RANK"])
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not td.is_initialized():
        kw = {}
        if cuda:
            torch.cuda.set_device(local)
            kw["device_id"] = torch.device("cuda", local)
        td.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_seconds()), **kw)
    return Dist(td.get_world_size(), td.get_rank(), local)
