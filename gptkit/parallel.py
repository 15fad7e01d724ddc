"""Scale-out around the model, never inside it: DDP, FSDP2 and activation checkpointing.

torch.distributed is the engine (torchtitan's habit: parallelism is applied to a finished model).
- DDP replicates the model and averages gradients; accumulation micro-steps skip the all-reduce.
- FSDP (`fsdp=true`) shards every block and the root with `fully_shard`: each rank holds 1/N of
  the parameters, gradients and AdamW moments. Checkpoints are still written by rank 0 alone, as
  full (unsharded) tensors gathered from every rank, so a checkpoint does not depend on how many
  processes wrote it: an FSDP run resumes without FSDP and the other way round.
- Activation checkpointing recomputes each block's forward during backward.

Where the processes come from (torchrun's environment) is read in runtime.py only.
"""

from __future__ import annotations

import base64
import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from gptkit.model import GPT


def enable_activation_checkpointing(model: GPT) -> None:
    """Recompute each transformer block's activations in backward instead of storing them."""
    for block in model.transformer.h:
        fwd = block.forward
        # an instance attribute shadows the class's forward; module hooks (FSDP's) still run around it
        block.forward = lambda *a, _fwd=fwd, **k: checkpoint(_fwd, *a, use_reentrant=False, **k)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def wrap_fsdp(model: GPT) -> GPT:
    """Shard `model` in place: one FSDP unit per block, plus the root (embeddings, ln_f, lm_head)."""
    # FSDP and distributed checkpointing load DTensor and sympy (seconds of start-up, which the
    # time budget counts): imported only by the runs that shard
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def set_gradient_sync(model: torch.nn.Module, sync: bool):
    """A context for one micro-step: gradients are reduced across ranks only when `sync`."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def local_scalar(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's grad norm) as a plain tensor; plain tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls this (it gathers); rank 0 gets the full tensors on the CPU, others {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = getattr(getattr(model, "config", None), "tie_embeddings", True)
    return {k: v.contiguous() for k, v in sd.items() if not (tied and k == "lm_head.weight")}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         names: dict[int, str]) -> dict:
    """Every rank calls this; rank 0 gets optimizer.state_dict()'s layout (integer parameter ids,
    unsharded CPU tensors), the same as a single process writes. Others get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not osd:
        return {}
    idx = {n: i for i, n in names.items()}
    groups = [{**g, "params": [idx[p] for p in g["params"]]} for g in osd["param_groups"]]
    return {"state": {idx[n]: slots for n, slots in osd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict,
                              names: dict[int, str]) -> None:
    """Load a full (unsharded) optimizer.state_dict()-layout dict into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    osd = {"state": {names[i]: slots for i, slots in sd["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def gather_rng(device: torch.device) -> list[str]:
    """Every rank's RNG state (base64; the CUDA one on CUDA), gathered on all ranks: each rank
    draws its own dropout masks, so each resumes its own stream."""
    mine = (torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()).to(device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii") for t in out]


def set_rng(b64: str, device: torch.device) -> None:
    state = torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
