"""The systems compared, each applied to the same freshly built model as its users apply it: per block,
then the root (FSDP2 and scalestack), an auto-wrap policy on the block class (FSDP1), the whole model
(DDP), ``deepspeed.initialize`` with ZeRO stage 3 (DeepSpeed, an optional extra)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

SYSTEMS = ("scalestack", "fsdp2", "fsdp1", "ddp", "deepspeed")


def available(system: str) -> bool:
    return system != "deepspeed" or importlib.util.find_spec("deepspeed") is not None


@dataclass
class Wrapped:
    """A sharded model's training step as its system runs it, in three phases (measured one by one):
    ``loss = forward(x)``, ``backward(loss)``, ``update()`` (optimizer step, gradients cleared)."""

    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    update: Callable[[], None]


def wrap(system: str, model: nn.Module, blocks: list[nn.Module], device: torch.device, lr: float) -> Wrapped:
    if system in ("scalestack", "fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh

        if system == "scalestack":
            from ..fsdp import fully_shard
        else:
            from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif system == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({type(blocks[0])}), use_orig_params=True, device_id=device
        )
    elif system == "ddp":  # its bucket all-reduces run in C++, uncounted: the runner adds them from the sizes
        model = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    elif system == "deepspeed":
        return _deepspeed(model, lr)
    else:
        raise ValueError(f"unknown system {system!r}: choose from {', '.join(SYSTEMS)}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def update() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Wrapped(model, lambda x: model(x, x), torch.Tensor.backward, update)


def _deepspeed(model: nn.Module, lr: float) -> Wrapped:
    import deepspeed

    hidden = model.wte.embedding_dim
    config = {
        "train_micro_batch_size_per_gpu": 1,  # only for DeepSpeed's bookkeeping: the batch is ours
        "zero_optimization": {  # the sizes Hugging Face's integration derives from the hidden size ("auto")
            "stage": 3,
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
        },
        "zero_allow_untested_optimizer": True,  # the same torch AdamW as every other system
    }
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)

    return Wrapped(engine, lambda x: engine(x, x), engine.backward, engine.step)  # step also zeroes gradients
