"""The train stage's data on a worker: the batches it takes from the stream of rows (`train_rows`)
from its position on, and the batched random resized crop on its device."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from clip_core.transforms import normalize

if TYPE_CHECKING:
    from .train import TrainConfig


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor copied to `device` without waiting there: a CUDA copy from pageable memory first
    waits for every kernel already queued, so one small copy a step would keep the loop from running
    ahead of the GPU; from pinned memory it queues behind them."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Augment:
    """uint8 [B, S, S, 3] on the device → normalized float [B, 3, S, S]; in training, a random
    resized crop (area `scale`, OpenCLIP's 0.9-1.0 by default; aspect 3/4-4/3; bicubic) for the whole batch
    in one grid_sample.
    The generator is part of the train state, so a resumed run draws the same crops."""

    def __init__(self, image_size: int, train: bool, generator: torch.Generator, scale=(0.9, 1.0),
                 ratio=(3 / 4, 4 / 3)):
        self.image_size, self.train, self.generator = image_size, train, generator
        self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))

    def crop_boxes(self, n: int, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """n crops of a side x side image as (width, height, centre x, centre y) in its [-1, 1] coordinates,
        drawn in whole pixels as torchvision's RandomResizedCrop draws them (clip_core's `random_crop_box`):
        of up to ten (area, aspect) draws the first whose rounded size fits inside the image, else the whole
        image; a whole-pixel offset that keeps the crop inside. Whole pixels matter at training sizes: at
        64 px, crops drawn continuously moved the content a quarter less off centre than torchvision's
        (0.94 px vs 1.28 px on average: a 62 px crop lies 0, 1 or 2 px in, not anywhere between)."""
        draws = torch.rand(n, 10, 2, generator=self.generator, dtype=torch.float64)
        area = side * side * (self.scale[0] + (self.scale[1] - self.scale[0]) * draws[..., 0])
        aspect = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * draws[..., 1])
        # round() as Python's: half to even; shape = [n, 10]
        width, height = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
        fits = (width > 0) & (width <= side) & (height > 0) & (height <= side)
        first = fits.int().argmax(dim=1, keepdim=True)  # argmax gives the first of equal maxima
        found = fits.any(dim=1)
        width = torch.where(found, width.gather(1, first).squeeze(1), float(side))
        height = torch.where(found, height.gather(1, first).squeeze(1), float(side))
        offset = torch.rand(n, 2, generator=self.generator, dtype=torch.float64)
        left, top = torch.floor(offset[:, 0] * (side - width + 1)), torch.floor(offset[:, 1] * (side - height + 1))
        centre_x, centre_y = (2 * left + width) / side - 1, (2 * top + height) / side - 1
        return tuple(value.float() for value in (width / side, height / side, centre_x, centre_y))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div_(255)
        if self.train:
            n = x.shape[0]
            width, height, cx, cy = self.crop_boxes(n, x.shape[-1])  # decode_batch's images are square
            theta = torch.zeros(n, 2, 3)
            theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width, cx, height, cy
            grid = F.affine_grid(to_device(theta, x.device), [n, 3, self.image_size, self.image_size],
                                 align_corners=False)
            # clamped as PIL's bicubic is: the kernel overshoots at sharp edges (clip art's outlines)
            x = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)
        return normalize(x)


@dataclass
class Position:
    """Where a run is: optimizer steps taken, and the data stream's place: the pass over the data
    (one run of the Ray Dataset, with its own row or shard order) and the batches
    taken from that pass."""
    step: int = 0
    data_pass: int = 0
    batch_in_pass: int = 0

    def epoch(self, config: TrainConfig) -> int:
        """The pass over the data, or with sample-based epochs (train_num_samples) the epoch of the
        last step; the stream runs on through those, so every row is seen, not each epoch's first."""
        if config.train_num_samples:
            return max(0, self.step - 1) // max(1, config.train_num_samples // config.batch_size)
        return self.data_pass


def batches(shard, config: TrainConfig, position: Position, local_batch: int, device, rank: int):
    """(batch, seconds waited for it) from the data stream, pass after pass, from `position` on
    (which it advances). Each pass runs the dataset again (its rows or shards in a new order each run,
    as `train_rows` orders them; `PassDataConfig` keeps that count right after a restart); rows not shuffled globally
    are mixed by a local shuffle buffer of their pass. The batches a resumed run already trained on in
    its pass are read and skipped."""
    buffer = None if config.global_shuffle else config.shuffle_buffer or None  # train() resolved the choice
    while position.step < config.steps:
        # pinned batches reach a GPU without waiting for the step before (see to_device)
        iterator = iter(shard.iter_torch_batches(batch_size=local_batch, drop_last=True, device=device,
                                                 pin_memory=torch.device(device).type == "cuda",
                                                 local_shuffle_buffer_size=buffer,
                                                 local_shuffle_seed=config.seed + 7919 * position.data_pass + rank))
        for _ in range(position.batch_in_pass):
            next(iterator, None)
        while True:
            waited = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            position.batch_in_pass += 1
            yield batch, time.perf_counter() - waited
        if position.batch_in_pass == 0:
            raise ValueError(f"a pass over the data yielded no batch of {local_batch} rows per worker: the "
                             f"training data is smaller than one global batch ({config.batch_size})")
        position.data_pass += 1
        position.batch_in_pass = 0
