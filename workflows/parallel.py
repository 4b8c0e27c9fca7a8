"""How the model runs across the training workers: as it is on one, wrapped by DDP or sharded in
place by FSDP on several; and the collective helpers the loop and its checkpoints need under either
(whole state on rank 0, a gradient norm as a float, one object from every worker, a loss over all of them)."""

from __future__ import annotations

import torch

import clip_core


def distribute(model: clip_core.CLIP, strategy: str, world: int, compiled: bool = False) -> torch.nn.Module:
    """What each worker runs forward and backward: on one worker the model itself; under DDP Ray's
    wrapper of it; under FSDP the model itself, sharded in place (FSDP2: each residual block, then the
    rest), so `model` stays the module to save and load state through. FSDP cannot shard 0-dim
    parameters (logit_scale, logit_bias): they stay whole on every worker and their gradients are
    averaged across workers as they accumulate, as DDP would. `compiled` wraps the result in
    torch.compile, outside DDP and FSDP as both expect."""
    runnable = _wrapped(model, strategy, world)
    return torch.compile(runnable) if compiled else runnable


def _wrapped(model: clip_core.CLIP, strategy: str, world: int) -> torch.nn.Module:
    if world == 1:
        return model
    if strategy == "ddp":
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")  # Ray's FSDP is GPU-only (FSDP1)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from clip_core.model import Bottleneck, ResidualAttentionBlock

    for module in model.modules():
        if isinstance(module, (ResidualAttentionBlock, Bottleneck)):
            fully_shard(module)
    scalars = {param for param in model.parameters() if param.dim() == 0}
    fully_shard(model, ignored_params=scalars)
    for method in ("encode_image", "encode_text"):  # validation calls these, not forward
        register_fsdp_forward_method(model, method)
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_gradient)
    return model


def _average_gradient(param: torch.Tensor) -> None:
    import torch.distributed as dist

    dist.all_reduce(param.grad)
    param.grad /= dist.get_world_size()


def sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gathered_state(model, optimizer) -> tuple[dict, dict]:
    """The full weights and optimizer state (keyed by parameter name) on rank 0, empty elsewhere.
    Every worker must call it: under FSDP it gathers the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def scalar(value) -> float:
    """A float from a tensor that may be an FSDP DTensor (e.g. the total gradient norm)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """`value` averaged over the workers (itself on one); every worker must call it. Each worker's
    contrastive loss (clip_core.loss, either kind) is the mean over its own rows of the global batch,
    and every worker has as many: their mean is the whole batch's loss, the one OpenCLIP logs, not
    one worker's share that changes with their number."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)  # a sum: gloo has no AVG
    return total / dist.get_world_size()


def gather(obj):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
