"""The process group a run trains in: one process, or a torchrun job (DDP or FSDP2).

`Runtime` is the trainer's only view of distribution: rank, world size, the device, and
the few collective operations the loop needs. With one process every method is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _store_for_this_attempt(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this torchrun attempt. torchrun keeps one
    store across `--max-restarts`, and the process group's keys from a killed attempt
    (a dead rank's address) would otherwise be read by the restarted ranks."""
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0 and not use_agent_store,
        timeout=timeout,
    )
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # set under torchrun; None lets the trainer resolve it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_name: str = "auto") -> Runtime:
        """Join the torchrun process group when WORLD_SIZE > 1: NCCL on CUDA, gloo on CPU."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
        if use_cuda:
            device = torch.device("cuda", local_rank())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=float(os.environ.get("TRAINING_DIST_TIMEOUT", "120")))
            rank = int(os.environ["RANK"])
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                store=_store_for_this_attempt(rank, world_size, timeout),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)

    # -- model ----------------------------------------------------------------------------
    def wrap_model(self, model: torch.nn.Module, strategy: str) -> torch.nn.Module:
        if not self.distributed:
            return model
        if strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in getattr(model, "blocks", []):
                fully_shard(block)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    # -- collectives ----------------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        out = tensor.to(self.device, copy=True) if self.device is not None else tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)  # NCCL reduces device tensors only
        return out.to(tensor.device)

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same_choice(self, step: int) -> None:
        """Every rank must resume from the same checkpoint step."""
        if not self.distributed:
            return
        steps = [None] * self.world_size
        dist.all_gather_object(steps, step)
        if len(set(steps)) != 1:
            raise RuntimeError(
                f"ranks chose different checkpoints to resume from (steps {steps}); is the workspace shared?"
            )

    def any_true(self, *flags: bool) -> list[bool]:
        """Element-wise OR across ranks, so that a stop or a time-based save asked by any
        rank happens on every rank at the same step."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
