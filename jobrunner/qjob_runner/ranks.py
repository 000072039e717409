"""One runner process among the torchrun ranks of a multi-pod quantize stage.

torchrun (``qjob_runner.launch`` in the pod) starts one runner per GPU with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. With more than one rank the
runner joins one process group (the ``rendezvous`` step), loads the model sharded with FSDP2
(ModelOpt's ``parallel_load_and_prepare_fsdp2``: each rank reads its share of the decoder layers),
calibrates on its share of the calibration batches (ModelOpt's max calibration all-reduces every
quantizer's amax over the data-parallel group, i.e. all ranks), and takes part in ModelOpt's
FSDP2-aware export, where rank 0 alone writes files. Rank 0 alone checks, publishes and reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import RendezvousFailed

log = logging.getLogger("qjob_runner.ranks")

#: How long a rank waits for all the others to join (pods of one gang start within this).
RENDEZVOUS_TIMEOUT_ENV = "QJOB_RENDEZVOUS_TIMEOUT_SECONDS"
DEFAULT_RENDEZVOUS_TIMEOUT = 600
#: Collectives after the rendezvous: the other ranks wait at the export's barrier while rank 0
#: writes the checkpoint (minutes for hundreds of GB), so this is generous.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the stage's ranks (one rank when not started by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = ""
    master_port: int = 0
    #: torchrun's agent already serves the rendezvous store: every rank is its client
    agent_store: bool = False
    #: started by torchrun (or as one of several ranks): the sharded path, even as its only rank
    launched: bool = False

    @classmethod
    def from_env(cls, env: os._Environ | dict[str, str] = os.environ) -> Ranks:
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1 and "TORCHELASTIC_RUN_ID" not in env:
            return cls()
        return cls(
            launched=True,
            rank=int(env.get("RANK", env.get("NODE_RANK", "0"))),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
        )

    @property
    def distributed(self) -> bool:
        """One process group over the ranks, FSDP2 shards (a 1-rank torchrun too: same code path)."""
        return self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def master(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def rendezvous_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT)))


def device_for(ranks: Ranks) -> str:
    import torch

    return f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"


def join(ranks: Ranks) -> None:
    """The ``rendezvous`` step: every rank joins one process group, or the stage fails with
    RendezvousFailed (exit 77, retried as a whole) naming the address and the timeout.

    The rendezvous store gets the rendezvous timeout (a missing rank or an unreachable rank 0
    fails in minutes); the process group gets the long collective timeout. A barrier proves that
    every rank is there before any heavy work starts.
    """
    import torch
    import torch.distributed as dist

    if not ranks.distributed or dist.is_initialized():
        return
    timeout = rendezvous_timeout()
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(ranks.local_rank)
    where = f"rank 0 at {ranks.master} ({ranks.describe()}, timeout {int(timeout.total_seconds())} s)"
    try:
        store = dist.TCPStore(
            ranks.master_addr,
            ranks.master_port,
            ranks.world_size,
            is_master=ranks.is_main and not ranks.agent_store,
            timeout=timeout,
        )
        dist.init_process_group(
            # gloo carries CPU tensors (ModelOpt's object broadcasts); NCCL the GPU shards
            backend="cpu:gloo,cuda:nccl" if on_cuda else "gloo",
            store=store,
            rank=ranks.rank,
            world_size=ranks.world_size,
            timeout=COLLECTIVE_TIMEOUT,
            device_id=torch.device(f"cuda:{ranks.local_rank}") if on_cuda else None,
        )
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - any failure to meet is the rendezvous failing
        raise RendezvousFailed(
            f"the ranks of this stage could not meet at {where}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            "the stage is retried; if it keeps failing, check that every pod of the stage was scheduled "
            "(kubectl get pods -l batch.kubernetes.io/job-name=<job>), that rank 0's headless Service "
            f"name resolves, and that port {ranks.master_port} is open between the pods (NetworkPolicy)",
        ) from None
    log.info("joined the process group as %s (rendezvous %s)", ranks.describe(), ranks.master)


def leave(ranks: Ranks, succeeded: bool) -> None:
    """Close the process group after a run; a failed rank exits without it (the collectives of
    a group that lost a rank cannot complete)."""
    import torch.distributed as dist

    if ranks.distributed and succeeded and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list[Any], ranks: Ranks) -> list[Any]:
    """This rank's share of the calibration batches: every rank runs the same number of forward
    passes (each FSDP2 forward is a collective), so a rank short of one repeats its first batch
    (max calibration takes a maximum: a repeated batch changes nothing)."""
    if not ranks.distributed or not items:
        return items
    mine = items[ranks.rank :: ranks.world_size]
    per_rank = -(-len(items) // ranks.world_size)
    return mine + [items[ranks.rank % len(items)]] * (per_rank - len(mine))


def agree_min(value: int, ranks: Ranks) -> int:
    """The smallest of every rank's ``value`` (e.g. the batch size that fits on every GPU)."""
    import torch
    import torch.distributed as dist

    if not ranks.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


@contextlib.contextmanager
def gather_fp8_over_gloo():
    """Let ModelOpt's FSDP2 export gather FP8 weight shards over gloo (CPU ranks).

    ModelOpt 0.47's export gathers the full state dict with ``get_model_state_dict(full_state_dict
    =True)``; gloo has no float8 collectives (``RuntimeError: Invalid scalar type`` from the
    all-gather of a ``float8_e4m3fn`` DTensor). Here the shards are gathered as bytes (uint8,
    the same size) and viewed back as FP8: bit-identical, no conversion. NCCL gathers FP8 itself,
    so nothing changes on GPUs.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        yield
        return
    import modelopt.torch.export.unified_export_hf as unified
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.tensor import DTensor

    original = unified.get_model_state_dict

    def full_tensor(t: Any) -> Any:
        if not isinstance(t, DTensor):
            return t
        if t.dtype.is_floating_point and t.dtype.itemsize == 1:
            as_bytes = DTensor.from_local(
                t.to_local().view(torch.uint8), t.device_mesh, t.placements, shape=t.shape, stride=t.stride()
            )
            return as_bytes.full_tensor().view(t.dtype)
        return t.full_tensor()

    def gathered(model, options=None, **kwargs):
        sharded = original(model, options=StateDictOptions(full_state_dict=False), **kwargs)
        return {k: full_tensor(v).cpu() for k, v in sharded.items()}

    unified.get_model_state_dict = gathered
    try:
        yield
    finally:
        unified.get_model_state_dict = original
