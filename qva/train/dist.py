"""Training on several processes (`torchrun --nproc-per-node N -m qva.train ...`): the few things that differ.

- `setup()` joins the process group `torchrun` describes (gloo on CPU, nccl on GPU); one process: nothing.
  `teardown()` leaves the group `setup()` made (a group left to interpreter exit can abort a rank, exit -6).
- Each rank takes its slice of every step's global batch; the labelled-token count is summed over ranks,
  so the loss is normalised by the global count and the gradient equals one process's on the same batch.
- Data parallel: after each step's backward `sync_grads` sums the gradients in one flat all-reduce (a rank
  whose batch never reaches a parameter, e.g. has no audio, adds zeros); with `fsdp`, `wrap` applies FSDP2
  `fully_shard` to each decoder layer and the model (parameters sharded, gradients reduce-scattered and
  averaged in backward, so the loss is scaled by the world size; gathered for checkpoints and the output).
- Rank 0 logs and writes; every rank reads checkpoints back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() made the process group, so teardown() destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "cpu") -> Dist:
    """The process group from torchrun's environment (WORLD_SIZE > 1), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if world == 1:
        return Dist(0, 1, dev)
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev, made)


def teardown(d: Dist) -> None:
    """Destroy the process group `setup()` made (one made by the caller is the caller's)."""
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def wrap(model, d: Dist, fsdp: bool):
    """The module training calls: the model itself (one process), DDP over it, or the FSDP2-sharded model."""
    if d.world == 1 and not fsdp:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)  # its backward averages gradients over ranks: `accumulate` scales the loss by the world size
        return model
    return model  # data parallel: `sync_grads` sums the gradients after each step's backward


def sync_grads(params: list[torch.Tensor], d: Dist) -> None:
    """Sum the trainable gradients over ranks in one flat all-reduce (a rank whose batch did not reach some
    parameter contributes zeros). Not used under FSDP, whose backward reduces the gradients itself."""
    if d.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    reached = torch.tensor([float(p.grad is not None) for p in params])  # how many ranks' batches reached each
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [reached])
    dist.all_reduce(flat)
    *summed, reached = flat.split([g.numel() for g in grads] + [len(params)])
    for p, g, n in zip(params, summed, reached.tolist()):
        p.grad = g.view_as(p).to(p.dtype).clone() if n else None  # no rank reached it: no gradient, as one process


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `t` (an FSDP2 DTensor is gathered: every rank must call this)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (a full tensor read from a checkpoint) laid out as `param` is: sharded if it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value.to(param.device)


def finite(params) -> bool:
    """Whether every value of this rank's part of `params` is finite (one fused reduction)."""
    from torch.distributed.tensor import DTensor

    local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in params]
    norms = torch._foreach_norm([t for t in local if t.numel()])
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def gather_rng(d: Dist) -> list[torch.Tensor]:
    """Every rank's CPU RNG state, in rank order (each rank draws its own dropout masks)."""
    state = torch.get_rng_state()
    if d.world == 1:
        return [state]
    out = [torch.empty_like(state) for _ in range(d.world)]
    dist.all_gather(out, state)
    return out
