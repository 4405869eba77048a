"""Process groups, parallel wrappers and activation checkpointing, applied from outside
the model (the model code knows nothing of them)."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup(device: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    # Under torchrun (RANK set) a process group exists even for one process, so that
    # DDP/FSDP and the NCCL path can be exercised on a single GPU.
    if (world > 1 or "RANK" in os.environ) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, local, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":
            value /= d.world_size  # gloo has no AVG
    return value


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each wrapped decoder layer in the backward pass. The composable API
    keeps parameter names unchanged, so checkpoints stay interchangeable."""
    from torch.distributed._composable import checkpoint

    for layer in model.decoder_layers():
        checkpoint(layer)


def wrap(model: nn.Module, strategy: str, d: Dist, precision: str) -> nn.Module:
    """DDP or FSDP2 around the model; ``none`` returns it as it is."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if precision.startswith("bf16"):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for layer in model.decoder_layers():
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    return model


@contextmanager
def no_gradient_sync(model: nn.Module, strategy: str, active: bool):
    """Skip the gradient all-reduce on accumulation micro-steps."""
    if not active:
        yield
    elif strategy == "ddp":
        with model.no_sync():
            yield
    elif strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with nullcontext():
            yield
