"""Losses over the global batch: two gloo processes agree with one process on the whole batch."""

import math

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import clip_core

WORLD, LOCAL, DIM = 2, 4, 16


def _features(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=generator, dtype=torch.float64), dim=-1)
    return image, text


def _run(kind, image, text, scale, bias):
    loss_fn = clip_core.create_loss(kind)
    return loss_fn(image, text, scale, bias) if kind == "siglip" else loss_fn(image, text, scale)


def _leaves(image, text):
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    return image.clone().requires_grad_(), text.clone().requires_grad_(), scale, bias


def _worker(rank, init_file, kind, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        image, text = _features()
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        image, text, scale, bias = _leaves(image[rows], text[rows])
        loss = _run(kind, image, text, scale, bias)
        loss.backward()
        torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad,
                    "bias": bias.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_process_loss_and_gradients_equal_single_process(kind, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), kind, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    image, text, scale, bias = _leaves(*_features())
    loss = _run(kind, image, text, scale, bias)
    loss.backward()

    # each rank's loss is the mean over its rows: their mean is the global loss
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss.detach(), atol=1e-6, rtol=0)
    for rank, result in enumerate(ranks):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        # DDP averages gradients over ranks; the gathered features carry every rank's contribution
        torch.testing.assert_close(result["image"] / WORLD, image.grad[rows], atol=1e-6, rtol=0)
        torch.testing.assert_close(result["text"] / WORLD, text.grad[rows], atol=1e-6, rtol=0)
    torch.testing.assert_close(sum(r["scale"] for r in ranks) / WORLD, scale.grad, atol=1e-6, rtol=0)
    if kind == "siglip":
        torch.testing.assert_close(sum(r["bias"] for r in ranks) / WORLD, bias.grad, atol=1e-6, rtol=0)


def test_losses_match_openclip():
    image, text = _features(1)
    scale, bias = torch.tensor(14.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    torch.testing.assert_close(clip_core.ClipLoss()(image, text, scale), open_clip.ClipLoss()(image, text, scale))
    torch.testing.assert_close(clip_core.SigLipLoss()(image, text, scale, bias),
                               open_clip.loss.SigLipLoss()(image, text, scale, bias))


def test_perfectly_aligned_pairs_have_low_loss():
    features = F.normalize(torch.eye(8, 16), dim=-1)
    assert clip_core.ClipLoss()(features, features, torch.tensor(100.0)).item() < 1e-3
    shuffled = features[torch.randperm(8)]
    assert clip_core.ClipLoss()(features, shuffled, torch.tensor(100.0)).item() > math.log(2)


def test_loss_errors_name_the_problem():
    with pytest.raises(ValueError, match="must have the same shape"):
        clip_core.ClipLoss()(torch.zeros(4, 8), torch.zeros(3, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="needs a logit_bias"):
        clip_core.SigLipLoss()(torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor(1.0), None)
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        clip_core.create_loss("triplet")
