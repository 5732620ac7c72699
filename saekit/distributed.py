"""Running under `torchrun`: which rank am I, the process group, and the few collectives saekit needs.

saekit does not launch processes itself.  `torchrun --nproc-per-node N -m saekit harvest|train ...`
(or any launcher that sets the same variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) starts N copies of the ordinary command; each finds its place here:

    env()          -> DistEnv(rank, world_size, local_rank) from the environment (1 process: 0, 1, 0)
    session(dev)   -> context manager: join the process group if WORLD_SIZE > 1 (left at process exit)
    device(dev)    -> cuda means cuda:LOCAL_RANK under torchrun (one GPU per process)

Backend: gloo when the work is on the CPU; for CUDA the group is created as
`cpu:gloo,cuda:nccl`, so gradients (CUDA tensors) go through NCCL while barriers and the
small Python objects exchanged between ranks (`all_gather_object`, `broadcast_object`)
stay on gloo and need no GPU memory.

Collectives block until every rank calls them; a rank that raises leaves the others
waiting, and torchrun (like `torch.multiprocessing.spawn`) then stops the whole group.
The group's timeout (`SAEKIT_DIST_TIMEOUT`, seconds, default 2 hours) bounds how long one
rank may wait for the slowest at a barrier, e.g. at the end of a harvest.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from saekit.errors import SaekitError

TIMEOUT_ENV = "SAEKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 7200


class DistEnv(NamedTuple):
    rank: int
    """Global rank of this process (0 .. world_size-1); rank 0 writes manifests and checkpoints."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node: the CUDA device index this process uses."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SaekitError(f"environment variable {name}={raw!r} is not an integer; unset it or let torchrun set it") from None


def env() -> DistEnv:
    """Rank, world size and local rank from torchrun's variables; (0, 1, 0) when not launched by it."""
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local = _int_env("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise SaekitError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world}); launch with torchrun or unset both")
    if local < 0:
        raise SaekitError(f"LOCAL_RANK={local} is negative; launch with torchrun or unset it")
    return DistEnv(rank, world, local)


def current() -> DistEnv:
    """The initialised group's rank/world size (the environment's when no group exists)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), env().local_rank)
    return env()


def device(name: str, e: DistEnv | None = None) -> torch.device:
    """The device this process works on: `cuda`/`auto` become cuda:LOCAL_RANK when there are several processes.

    An explicit `cuda:N` is refused under a multi-process launch: every rank would pick the
    same GPU.  `auto` is cuda when torch sees one, else cpu.
    """
    e = e or current()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SaekitError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise SaekitError("device cuda asked for but torch sees no GPU; use --device cpu")
    if not e.distributed:
        return dev
    if dev.index is not None and dev.index != e.local_rank:
        raise SaekitError(f"--device {name} under torchrun: each process uses cuda:LOCAL_RANK; pass --device cuda")
    if e.local_rank >= torch.cuda.device_count():
        raise SaekitError(f"LOCAL_RANK={e.local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                          "lower --nproc-per-node to the number of GPUs")
    return torch.device("cuda", e.local_rank)


def backend_for(dev: torch.device) -> str:
    """gloo on the CPU; on CUDA, NCCL for CUDA tensors and gloo for CPU objects and barriers."""
    return "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=_int_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def init(dev: torch.device | str = "cpu") -> DistEnv:
    """Join the process group torchrun describes (no-op for one process or when already joined)."""
    e = env()
    if not e.distributed or dist.is_initialized():
        return current()
    if not dist.is_available():
        raise SaekitError("this torch build has no torch.distributed; install a standard torch wheel")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise SaekitError(f"WORLD_SIZE={e.world_size} but {var} is not set; launch with torchrun (it sets both)")
    dev = torch.device(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend_for(dev), rank=e.rank, world_size=e.world_size, timeout=timeout())
    atexit.register(_destroy_at_exit)
    return e


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(dev: torch.device | str = "cpu") -> Iterator[DistEnv]:
    """`with session(device) as e:` runs the block inside the process group torchrun describes, if any.

    The group saekit creates lives until the process exits (destroyed at exit): a pipeline
    that harvests and then trains in one process joins once, because tearing a group down
    and rendezvousing again on the same MASTER_PORT can hang.  A group the caller created
    (tests, a user's own script) is used and left alone.  After an error nothing waits:
    the exit closes the connections and the peers fail at once.
    """
    global _failed
    try:
        yield init(dev)
    except BaseException:
        _failed = True
        raise


_failed = False
"""Set when a session's block raised: the group is then left to the process exit, not destroyed."""


def _destroy_at_exit() -> None:
    """Tear the group down once every rank has reached its exit.

    Without the barrier the first rank out destroyed its side (rank 0 also its TCPStore) while
    a peer was still in its own teardown, and that peer could abort ("terminate called without
    an active exception"): 2 of 12 runs of tests/test_distributed.py's store test, 0 of 24 with it.
    A barrier that fails (a peer already gone) leaves the rest to the process exit.
    """
    if _failed:
        return
    try:
        if _active():
            dist.barrier()
    except Exception:  # noqa: BLE001 - a peer is gone; nothing left to coordinate with
        return
    destroy()


# --------------------------------------------------------------------------- collectives (no-ops alone)

def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (JSON-like values only: they travel pickled between our own ranks)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s obj on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(error: str | None) -> None:
    """Collective error check: every rank passes its own error (or None); all raise if any rank had one.

    Used before a step that every rank must take together, so one rank's mistake becomes
    the same clear message on all ranks instead of a hang at the next collective.
    """
    errors = [x for x in all_gather_object(error) if x]
    if errors:
        raise SaekitError(errors[0])


def flat_all_reduce(tensors: list[torch.Tensor], op: str = "mean") -> None:
    """All-reduce tensors in place as one flat buffer (one message, as DDP's buckets): sum, mean, max or min."""
    if not _active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    rop = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(flat, op=rop)
    if op == "mean":
        flat /= dist.get_world_size()
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i:i + n].view_as(t))
        i += n


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank `src`'s values into `tensors` on every rank (one flat message)."""
    if not _active() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src)
    i = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[i:i + n].view_as(t))
            i += n


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape everywhere) concatenated along dim 0 in rank order."""
    if not _active():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
