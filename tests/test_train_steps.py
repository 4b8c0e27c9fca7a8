"""The train stage's pieces that need no Ray: one optimizer step, the driver's checks, the checkpoint it
resumes from, the numbers it logs."""

import copy

import pytest
import torch

import clip_core
from workflows.train import TrainConfig, autocast_dtype, build_optimizer, optimizer_step

from micro import micro_config


def _batch(size: int = 8):
    images = torch.randn(size, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return images, clip_core.get_tokenizer()([f"a photo of thing {i}" for i in range(size)])


def _step(model, config: TrainConfig):
    """One optimizer step as the train loop takes it; returns (grad norm, gradients, scaler)."""
    device = torch.device("cpu")
    cast = autocast_dtype(config.precision, device)
    optimizer, scheduler, scaler = build_optimizer(model, config, device, cast)
    autocast = torch.autocast("cpu", dtype=cast or torch.float32, enabled=cast is not None)
    _, grad_norm, _ = optimizer_step(model, model, optimizer, scheduler, scaler, clip_core.ClipLoss(), *_batch(),
                                     config, autocast)
    return float(grad_norm), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), scaler


@pytest.mark.parametrize("accum_freq", [1, 2])
def test_an_fp16_step_scales_every_backward_and_clips_and_updates_by_the_unscaled_gradient(accum_freq):
    torch.manual_seed(0)
    model = clip_core.CLIP(micro_config())
    reference = copy.deepcopy(model)
    settings = dict(data=["unread"], steps=10, batch_size=8, accum_freq=accum_freq, grad_clip_norm=None)
    fp16_norm, fp16_grads, scaler = _step(model, TrainConfig(**settings, precision="fp16"))
    fp32_norm, fp32_grads, _ = _step(reference, TrainConfig(**settings, precision="fp32"))

    assert scaler is not None and scaler.get_scale() > 1, "the step ran under a gradient scale"
    # the update was taken (a step with non-finite gradients would have been skipped) ...
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    # ... on the gradient at its true size: fp16 rounding apart, the fp32 step's
    assert fp16_norm == pytest.approx(fp32_norm, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(fp16_grads, fp32_grads, dim=0) > 0.999
