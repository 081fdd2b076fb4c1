"""FSDP2 for alignment under `accelerate launch` with an FSDP config: the language model's decoder layers, its final
norm and the LM head are sharded over the processes, each decoder layer its own unit, so a process holds 1/N of them
and gathers one layer at a time. The value head is sharded as its own unit.

The parts alignment calls directly, outside the model's forward, stay whole and frozen in every process: the vision
tower and projector (one tower forward per batch gives the exit layer's features), the input embeddings (features
are scattered into them) and LLaVA-NeXT's image-newline vector: about 0.46B of LLaVA-1.5-7B's 7.1B.

edgekit applies the sharding itself rather than through `accelerator.prepare`: which modules may be sharded depends on
what alignment calls outside the forward, which accelerate's wrap policies cannot know. Generation runs with
`synced_gpus`, so every process keeps taking decoding steps (each a collective) until all are done. Checkpoints and
the output hold whole tensors, gathered from the shards.
"""

from __future__ import annotations

import os

import torch
from torch import nn

FSDP = "FSDP"


def fsdp_requested(distributed_type: str) -> bool:
    """An FSDP launch. On the CPU accelerate reports the launch as MULTI_CPU, but the launcher's setting is in the
    environment."""
    return distributed_type == FSDP or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_version() -> int:
    return int(os.environ.get("FSDP_VERSION", "1"))


def shard(model: nn.Module, value_head: nn.Module | None, device: torch.device) -> None:
    """Shard `model` (the policy's base model, LoRA layers inside) and the value head in place, before the optimizer
    is made: the optimizer must hold the sharded parameters."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    sharded = {id(p) for module in (decoder.layers, decoder.norm, head) for p in module.parameters()}
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    # The root holds the norm and the head, and every parameter it does not shard stays whole (ignored).
    fully_shard(model, mesh=mesh, ignored_params={p for p in model.parameters() if id(p) not in sharded})
    if value_head is not None:
        fully_shard(value_head, mesh=mesh)


def gather_to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU: gathered from every process if sharded (then every process must call this)."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def copy_into_shard(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into `param`, this process's shard of it if sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        whole = distribute_tensor(whole, param.device_mesh, param.placements)
    with torch.no_grad():
        param.copy_(whole)
