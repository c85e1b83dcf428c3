"""Data-parallel training under ``torchrun``: PyTorch's own process groups, nothing home-made.

``torchrun`` starts one process per device and tells each, through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``PORT``),
where it stands.  :func:`session` joins the process group those variables describe
(gloo for CPU tensors, and NCCL for CUDA tensors when a GPU is present), the trainer wraps
its model in ``DistributedDataParallel`` and reads its rows of every global batch, and
only rank 0 touches the run directory.  Without those variables (or with one process)
nothing here does anything, and training is exactly the single-process code path.

The helpers below take a :class:`Dist` and are no-ops when it is not ``active``, so the
trainer calls them unconditionally.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import CharRNNError, OptionError


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job: global ``rank`` of ``world`` processes, and on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: str = "cpu"  # where the small control tensors of :meth:`max_` live (gloo: the CPU)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints, writes files and decides for the job."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows: ``n // world`` each, the first ``n % world`` ranks one more."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def check_batch(self, batch_size: int) -> None:
        """``--batch-size`` is the global batch: every rank must get the same number of its rows."""
        if batch_size % self.world:
            raise OptionError("batch_size", "{value} is the global batch and must split evenly over the {world} "
                              "processes; use a multiple of {world}", value=batch_size, world=self.world)

    # ------------------------------------------------------------------ collectives

    def on_rank0(self, fn):
        """Run ``fn()`` on rank 0 only and hand its result (any picklable value) to every rank.

        A :class:`CharRNNError` on rank 0 is raised on every rank (marked ``from_rank0`` on the
        others, so that the command line prints it once); any other failure there stops the
        other ranks too instead of leaving them waiting in the next collective.
        """
        if not self.active:
            return fn()
        box: list = [None]
        failure = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except CharRNNError as e:
                failure, box[0] = e, ("error", str(e))
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
                failure, box[0] = e, ("crash", f"{type(e).__name__}: {e}")
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if failure is not None:
            raise failure
        if kind == "ok":
            return value
        if kind == "error":
            err = CharRNNError(value)
            err.from_rank0 = True
            raise err
        raise RuntimeError(f"rank 0 failed ({value}); see its output")

    def all_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` alone)."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of ``t`` over the ranks, in place."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def cat_rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's equally shaped ``t`` concatenated along ``dim`` in rank order."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Dist()


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of a rank > 0 that has no saved random state (a fresh run, or a resume with more
    ranks than were saved).  Rank 0 keeps the single-process stream, so one process is the plain run."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 1) % 2**63


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE) with 2+ processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _from_env() -> Dist:
    world = dist.get_world_size()
    # Our own groups always have gloo for CPU tensors; a group made by the caller might be NCCL alone.
    device = "cpu" if "gloo" in str(dist.get_backend()) else "cuda"
    return Dist(rank=dist.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), device=device)


def threads_per_process(local_world: int) -> int | None:
    """CPU threads for each of ``local_world`` processes on this machine, or None to keep torch's choice.

    torchrun sets ``OMP_NUM_THREADS=1`` for every worker unless it is already set; that leaves
    cores idle whenever there are more cores than processes.  Replace that default (only)
    with an even share of the cores this process may run on; any other value is the user's.
    """
    if os.environ.get("OMP_NUM_THREADS", "1") != "1":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world))


@contextmanager
def session():
    """Join torchrun's process group for the duration of a training run; yield this process's :class:`Dist`.

    Uses a process group that already exists (a program that set one up itself), else creates
    one when ``WORLD_SIZE`` > 1 and destroys it on leaving.  The backend is gloo for CPU tensors
    and NCCL for CUDA tensors (``cpu:gloo,cuda:nccl`` when a GPU is present), so the choice of
    ``--device`` decides which one does the work.
    """
    if dist.is_available() and dist.is_initialized():
        yield _from_env() if dist.get_world_size() > 1 else SINGLE
        return
    if not launched():
        yield SINGLE
        return
    if not dist.is_available():
        raise CharRNNError("WORLD_SIZE > 1 asks for distributed training, but this PyTorch build has no "
                           "torch.distributed; install a standard build or run one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        if dist.is_nccl_available():
            backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)
    try:
        d = _from_env()
        threads = threads_per_process(d.local_world)
        if threads is not None:
            torch.set_num_threads(threads)
        yield d
    finally:
        # Anything still holding the process group (a DistributedDataParallel reducer in a reference
        # cycle) goes first: a gloo group torn down at interpreter exit instead can abort the process.
        gc.collect()
        dist.destroy_process_group()
