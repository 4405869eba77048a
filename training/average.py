"""An exponential moving average (EMA) of the trained weights, kept beside the run.

At a learning rate that is still high, consecutive checkpoints scatter around a better
point: the average of the weights over the last few hundred steps scores above each of
them (docs/experiments.md). With ``optim.ema_decay`` d > 0 the trainer keeps, after every
optimiser step n (counted from where the average started),

    avg <- avg + (1 - d_n) * (w - avg),   d_n = min(d, n / (n + 1)),

that is the plain mean of the weights after each step until 1 / (1 - d) steps are in it,
then the exponential average: the weights the average started from do not linger.
Checkpoints then hold the average in ``ema/`` (the format the applications load), the
held-out evaluation reports it as ``ema_eval_*``, and ``export_latest`` exports it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    """The EMA of the parameters in ``params`` (name -> trained parameter; plain or FSDP2
    ``DTensor``), in float32 and with the parameters' sharding."""

    def __init__(
        self, params: dict[str, torch.nn.Parameter], decay: float, state: dict | None = None, updates: int = 0
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1) to keep an average, got {decay}")
        self.params, self.decay, self.updates = params, decay, updates
        self.average: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in params.items():
                start = p.detach() if state is None or name not in state else _like(state[name], p)
                self.average[name] = start.float().clone()

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights (once per optimiser step)."""
        n = self.updates
        weight = 1.0 - min(self.decay, n / (n + 1))
        for name, p in self.params.items():
            self.average[name].lerp_(p.detach().float(), weight)
        self.updates += 1

    def full_state(self) -> dict[str, torch.Tensor]:
        """The average as whole float32 CPU tensors (a collective under FSDP2: every rank calls it)."""
        out = {}
        for name, avg in self.average.items():
            out[name] = (avg.full_tensor() if hasattr(avg, "full_tensor") else avg).detach().cpu().clone()
        return out

    @contextmanager
    def swapped_in(self):
        """The model computes with the averaged weights inside the block, its own after."""
        with torch.no_grad():
            own = {name: p.detach().clone() for name, p in self.params.items()}
            for name, p in self.params.items():
                p.detach().copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.detach().copy_(own[name])


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor ``value`` laid out as ``param`` is: sharded the same way under FSDP2."""
    value = value.to(param.device)
    if hasattr(param, "device_mesh"):  # a DTensor: keep this rank's shard
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, param.device_mesh, param.placements)
    return value
