"""Train stage on Ray Train: contrastive training that scales by `workers`, survives failures,
and logs to MLflow from rank 0.

The prepared datasets are decoded by Ray Data (CPU tasks, anywhere in the cluster) and handed to
the trainer; each worker augments on its device (random resized crop by one batched
`grid_sample`), runs DDP (or FSDP), and reports a checkpoint (weights, config, full train state) every
`checkpoint_every` steps. A restarted worker group resumes from the latest checkpoint with the
same step, optimizer, schedule, RNG and data position.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

import clip_core
from clip_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from clip_core.transforms import normalize

from . import storage
from .parallel import distribute, gather, gathered_state, global_mean, load_optimizer_state, scalar, sharded
from .preprocess import decode_batch
from .tracking import (dataset_input, flat_params, git_commit, guard_output, rayclip_version, redact, redacted,
                       sqlite_path, sqlite_uri, start_run)
from .train_data import Augment, Position, batches, to_device
from .train_rows import shuffles_globally, training_dataset

TRAIN_STATE = "train_state.pt"

# Recipes: what a run leaves unset. The published presets carry the paper's (global batch 32,768,
# AdamW beta2 0.98, eps 1e-6, weight decay 0.2, 2,000 warmup steps, 32 epochs of 400M pairs), not
# run here; the CPU presets are tuned on the synthetic set.
RECIPES: dict[str, dict] = {
    "tiny": dict(batch_size=128, lr=1e-3, warmup_steps=25, weight_decay=0.1, steps=300),
    "small": dict(batch_size=256, lr=5e-4, warmup_steps=100, weight_decay=0.1, steps=2000),
    **{name: dict(batch_size=32768, lr=5e-4, warmup_steps=2000, weight_decay=0.2, steps=390_000)
       for name in ("RN50", "RN101", "RN50x4", "RN50x16", "ViT-B-32", "ViT-B-16")},
    **{name: dict(batch_size=32768, lr=4e-4, warmup_steps=2000, weight_decay=0.2, steps=390_000)
       for name in ("RN50x64", "ViT-L-14", "ViT-L-14-336")},
}


class FaultInjection(BaseModel):
    """Chaos rehearsal: when worker `rank` reaches `step`, once (the marker file remembers), it is
    SIGKILLed (`kill`) or stops making progress until something outside kills it (`hang`)."""

    model_config = ConfigDict(extra="forbid")
    rank: int = 0
    step: int = Field(gt=0)
    marker: str
    action: Literal["kill", "hang"] = "kill"


class TrainConfig(BaseModel):
    """Everything the train stage needs; unset recipe fields come from the preset's recipe."""

    model_config = ConfigDict(extra="forbid")

    data: list[str] = Field(min_length=1, description="prepared dataset URIs")
    data_weights: list[float] | None = Field(None, description="sampling weight per dataset")
    val: str | None = Field(None, description="prepared captioned set: validation loss and retrieval R@1")
    zeroshot: str | None = Field(None, description="prepared labeled set: zero-shot top-1")
    output: str | None = Field(None, description="where the final checkpoint is copied")
    model: str = Field("tiny", description="preset name, or a JSON file with a model config (recipe: tiny's)")
    init: str | None = Field(None, description="openai:PATH | openclip:PATH | PATH to pretrained weights "
                                   "(anything clip_core.load_model reads, e.g. a Hugging Face CLIPModel directory)")
    quick_gelu: bool | None = Field(None, description="True QuickGELU, False GELU: for a preset, instead of its "
                                    "own (OpenCLIP's --force-quick-gelu); for --init weights, overriding what they "
                                    "imply (openai: QuickGELU)")
    aug_scale: tuple[float, float] = Field((0.9, 1.0), description="the random resized crop's area range, as a "
                                           "fraction of the image (OpenCLIP's --aug-cfg scale)")
    image_size: int | None = Field(None, gt=0, description="train at this resolution instead of the model's "
                                   "(OpenCLIP's --force-image-size): --init weights' position embedding is "
                                   "interpolated to it; the prepared data should be at least this size")
    steps: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0, description="global contrastive batch")
    accum_freq: int = Field(1, gt=0, description="micro-batches per step, the contrastive batch kept whole")
    train_num_samples: int | None = Field(None, gt=0, description="samples per epoch (default: one pass over the "
                                          "data); such epochs only number the steps, the data runs on through them")
    lr: float | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)
    lr_scheduler: Literal["cosine", "const", "const-cooldown"] = Field(
        "cosine", description="after warmup: cosine decay to 0, the rate held, or held then cooled down over "
        "the last cooldown_steps (OpenCLIP's --lr-scheduler)")
    cooldown_steps: int | None = Field(None, gt=0, description="const-cooldown: the steps the rate decays over "
                                       "(OpenCLIP's --epochs-cooldown, in steps)")
    lr_cooldown_power: float = Field(1.0, gt=0, description="const-cooldown: 1 a linear decay, else polynomial")
    lr_cooldown_end: float = Field(0.0, ge=0, description="const-cooldown: the rate it ends at")
    weight_decay: float | None = Field(None, ge=0)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip_norm: float | None = Field(1.0, gt=0)
    loss: Literal["clip", "siglip"] = "clip"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_checkpointing: bool = False
    patch_dropout: float = Field(0.0, ge=0, lt=1, description="fraction of each training image's patches dropped "
                                 "(FLIP; ViT only): the vision tower computes ~1 - patch_dropout as much; "
                                 "validation and evaluation see every patch")
    unmasked_tuning_steps: int = Field(0, ge=0, description="with patch_dropout: the last N steps see every "
                                       "patch (FLIP's unmasked tuning), on the tail of the same schedule")
    compile: bool = False
    lock_image: bool = False
    lock_image_unlocked_layers: int = Field(0, ge=0)
    lock_text: bool = False
    lock_text_unlocked_layers: int = Field(0, ge=0)
    workers: int = Field(1, gt=0, validation_alias=AliasChoices("workers", "num_workers"),
                         description="Ray Train workers (ScalingConfig's num_workers, which is accepted too)")
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0, description="default: this machine's cores / workers "
                                          "on a local Ray (leaving Ray Data a CPU), 1 with GPUs or on a cluster")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp replicates the model on every worker; fsdp "
                                             "(FSDP2) shards weights, gradients and optimizer state across them")
    storage: str | None = Field(None, description="Ray Train storage_path (local dir or s3://)")
    run_name: str | None = None
    checkpoint_every: int = Field(100, gt=0)
    num_to_keep: int = Field(2, gt=0)
    checkpoint_metric: str | None = Field(None, description="e.g. val_loss or zeroshot_top1: keep the best")
    val_every: int | None = Field(None, gt=0)
    log_every: int = Field(10, gt=0)
    max_failures: int = Field(0, ge=-1)
    seed: int = 0
    global_shuffle: bool | None = Field(None, description="shuffle all the rows afresh on every pass over the "
                                        "data, as a map-style loader does (a permutation seeded by seed and pass, "
                                        "gathered from the encoded rows kept in Ray's object store); default: when "
                                        "the prepared data is at most GLOBAL_SHUFFLE_MAX_BYTES (the train stage "
                                        "records what it chose). Without it a pass shuffles the shard order and "
                                        "streams through shuffle_buffer")
    shuffle_buffer: int = Field(512, ge=0, description="rows mixed while batching when the rows are not shuffled "
                                "globally (a streaming shuffle, as webdataset's)")
    decode_batch_size: int = Field(64, gt=0, description="rows a Ray Data task decodes at once from a "
                                   "streamed pass (a globally shuffled pass decodes each gathered block whole)")
    resume: str | None = Field(None, description="'latest' (the newest registered checkpoint under storage, of "
                               "run_name when set, that trained this model on this data) or a checkpoint path")
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "rayclip"
    mlflow_parent_run_id: str | None = None
    git_commit: str | None = None
    data_digests: list[str] | None = Field(None, description="set by train(): the content digest of each `data` "
                                           "set as it trained, recorded in every checkpoint for lineage")
    fault_injection: FaultInjection | None = None

    @model_validator(mode="after")
    def _resolve_recipe(self):
        name = "tiny" if self.model.endswith(".json") else clip_core.config.canonical_name(self.model)[0]
        for key, value in RECIPES[name].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if "warmup_steps" not in self.model_fields_set:  # a shortened run keeps warmup to a tenth of it
            object.__setattr__(self, "warmup_steps", min(self.warmup_steps, self.steps // 10))
        if self.batch_size % (self.workers * self.accum_freq):
            raise ValueError(f"batch_size {self.batch_size} must divide evenly into workers ({self.workers}) x "
                             f"accum_freq ({self.accum_freq}) micro-batches")
        if self.data_weights is not None and len(self.data_weights) != len(self.data):
            raise ValueError(f"{len(self.data_weights)} data_weights for {len(self.data)} datasets")
        if self.data_weights is not None and any(w <= 0 for w in self.data_weights):
            raise ValueError(f"data_weights must be positive, got {self.data_weights}")
        if self.checkpoint_metric and not (self.val or self.zeroshot):
            raise ValueError(f"checkpoint_metric {self.checkpoint_metric!r} needs a validation set: "
                             "set val or zeroshot")
        # (not the training loss: the last logged step's, noisy, and missing from a checkpoint before any log)
        computed = (({"val_loss", "val_image_to_text_R1", "val_text_to_image_R1"} if self.val else set())
                    | ({"zeroshot_top1"} if self.zeroshot else set()))
        if self.checkpoint_metric and self.checkpoint_metric not in computed:  # Ray would score every one -inf
            raise ValueError(f"checkpoint_metric {self.checkpoint_metric!r} is not a metric this run computes "
                             f"(with {' and '.join(k for k in ('val', 'zeroshot') if getattr(self, k))} set): "
                             f"choose one of {sorted(computed)}")
        for tower in ("image", "text"):
            if getattr(self, f"lock_{tower}_unlocked_layers") and not getattr(self, f"lock_{tower}"):
                raise ValueError(f"lock_{tower}_unlocked_layers leaves the last groups of a locked {tower} tower "
                                 f"trainable: set lock_{tower} too (without it the whole tower trains)")
        if self.unmasked_tuning_steps and not self.patch_dropout:
            raise ValueError("unmasked_tuning_steps tunes on whole images after patch dropout: set patch_dropout too")
        if self.unmasked_tuning_steps >= self.steps:
            raise ValueError(f"unmasked_tuning_steps ({self.unmasked_tuning_steps}) must be fewer than steps "
                             f"({self.steps})")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        if (self.lr_scheduler == "const-cooldown") != (self.cooldown_steps is not None):
            raise ValueError("cooldown_steps goes with lr_scheduler const-cooldown, and it with them: set both")
        if self.cooldown_steps is not None and self.warmup_steps + self.cooldown_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) and cooldown_steps ({self.cooldown_steps}) are "
                             f"more than steps ({self.steps})")
        if not 0 < self.aug_scale[0] <= self.aug_scale[1] <= 1:
            raise ValueError(f"aug_scale {self.aug_scale}: give (low, high) with 0 < low <= high <= 1")
        if self.lr_cooldown_end > self.lr:
            raise ValueError(f"lr_cooldown_end ({self.lr_cooldown_end}) is above lr ({self.lr}): a cooldown lowers it")
        return self

    def patch_dropout_at(self, step: int) -> float:
        """The patch dropout of step `step` (1-based): none in the last `unmasked_tuning_steps`."""
        return self.patch_dropout if step <= self.steps - self.unmasked_tuning_steps else 0.0

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.workers * self.accum_freq)


# ------------------------------------------------------------------------------- model


def init_source(init: str) -> tuple[str, str]:
    """`openai:PATH`, `openclip:PATH` or `PATH` → (kind, PATH); PATH is local or s3://."""
    kind, _, path = init.partition(":")
    return (kind, path) if kind in ("openai", "openclip") else ("", init)


def build_model(config: TrainConfig) -> clip_core.CLIP:
    if config.init:
        kind, path = init_source(config.init)
        with storage.local_copy(path) as local:  # load_model reads the weights into memory
            implied = True if kind == "openai" else None
            model = clip_core.load_model(local, quick_gelu=implied if config.quick_gelu is None else config.quick_gelu,
                                         image_size=config.image_size)
    else:
        model = clip_core.create_model(scratch_config(config))
    check_loss_fits(config, model.logit_bias is not None,
                    f"--init {config.init}" if config.init else f"the model {config.model}")
    if config.patch_dropout:
        clip_core.model.require_patches(model.config)
    _lock(model, config)
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model


def _lock(model: clip_core.CLIP, config: TrainConfig) -> None:
    if config.lock_image:
        model.lock_image_tower(config.lock_image_unlocked_layers)
    if config.lock_text:
        model.lock_text_tower(config.lock_text_unlocked_layers)


def check_model(config: TrainConfig, model_config: clip_core.CLIPConfig, source: str) -> None:
    """What build_model would refuse on every worker (and again on each retry), checked on the driver from
    the model's config: the loss against its logit_bias, patch dropout against its image tower, the
    unlocked layer groups against those its towers have."""
    check_loss_fits(config, model_config.init_logit_bias is not None, source)
    if config.patch_dropout:
        clip_core.model.require_patches(model_config)
    if config.lock_image or config.lock_text:
        with torch.device("meta"):  # the towers' structure without their memory
            _lock(clip_core.CLIP(model_config), config)


def scratch_config(config: TrainConfig) -> clip_core.CLIPConfig:
    """The model a run without --init builds: the preset's (or the config file's), at image_size when set,
    at SigLIP's start for the sigmoid loss (its paper, and open_clip_train --siglip): t = 10, b = -10."""
    model_config = clip_core.get_config(config.model, quick_gelu=config.quick_gelu)
    if config.image_size:
        model_config = model_config.replace(vision=dataclasses.replace(model_config.vision,
                                                                       image_size=config.image_size))
    if config.loss == "siglip":
        model_config = model_config.replace(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    return model_config


def check_loss_fits(config: TrainConfig, logit_bias: bool, source: str) -> None:
    """The sigmoid loss needs the model's logit_bias and the softmax one takes none: either mismatch fails
    every worker's first step (and each retry), so the driver checks it from the model's config too."""
    if config.loss == "siglip" and not logit_bias:
        raise ValueError(f"the sigmoid loss needs a model with logit_bias and {source} has none; initialise from "
                         "a SigLIP checkpoint or train from scratch")
    if config.loss == "clip" and logit_bias:
        raise ValueError(f"{source} has a logit_bias (a SigLIP model), which the softmax CLIP loss has no term for: "
                         "set loss: siglip in the train config to train it with the sigmoid loss, or start from "
                         "weights without one")


def init_image_size(config: TrainConfig) -> int:
    """The resolution of the --init weights, which the driver's decoding plan needs. A rayclip checkpoint
    (or a Hugging Face one) says it in its config file: the driver reads that alone, and only the workers
    fetch the weights (the head node would otherwise download and hold them once more: 1.7 GB for
    ViT-L/14). Other formats are built to see."""
    from clip_core.checkpoint import described_config, described_image_size, is_hf_config

    from .registry import checkpoint_description

    _, path = init_source(config.init)
    if storage.exists(storage.join(path, CONFIG_FILE)):
        described = checkpoint_description(path)
        if is_hf_config(described):  # a transformers CLIPModel: no logit_bias
            check_loss_fits(config, False, f"--init {config.init}")
        else:
            check_model(config, described_config(described, path), f"--init {config.init}")
        return config.image_size or described_image_size(described, path)
    return build_model(config).image_size  # build_model checks all that check_model does


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs under "auto"; CPUs without AVX512-BF16/AMX run bf16 matmuls ~40x slower than fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_schedule(config: TrainConfig):
    """Step (from 0) → the factor on config.lr, OpenCLIP's --lr-scheduler: a linear warmup, then cosine
    decay to 0 (`cosine`), the rate held (`const`), or held until the last `cooldown_steps` and then
    decayed as (1 - progress) ** lr_cooldown_power to lr_cooldown_end (`const-cooldown`)."""
    warmup, total = config.warmup_steps, config.steps
    cooldown_start, end = total - (config.cooldown_steps or 0), config.lr_cooldown_end / config.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if config.lr_scheduler == "const" or step < cooldown_start:
            return 1.0
        progress = min(1.0, (step - cooldown_start) / (total - cooldown_start))
        return (1 - progress) ** config.lr_cooldown_power * (1 - end) + end
    return factor


def contrastive_step(model, loss_fn, images: torch.Tensor, tokens: torch.Tensor, accum_freq: int,
                     autocast, patch_keep: torch.Tensor | None = None, scaler=None) -> torch.Tensor:
    """Forward + backward for one optimizer step's local batch; returns the loss, detached and where
    it was computed: reading it waits for the device, so the loop reads it only when it logs.

    With `accum_freq` > 1 the contrastive batch stays whole (OpenCLIP's accum_freq): every
    micro-batch's features are computed without grad and cached, then each micro-batch is
    recomputed with grad and scored against all cached features. Each feature is live in exactly
    one backward, and the temperature (and bias) only in the last, so the accumulated gradient is
    the big batch's. DDP synchronises on the last micro-batch only. `patch_keep` (patch dropout)
    is drawn once per step, so both computations of a micro-batch see the same patches. Under fp16
    each backward runs on the loss multiplied by `scaler`'s scale (the GradScaler the optimizer step
    unscales by): small fp16 gradients would otherwise flush to zero.
    """
    if accum_freq == 1:
        with autocast:
            loss = loss_fn(*model(images, tokens, patch_keep=patch_keep))
        _backward(loss, scaler)
        return loss.detach()
    image_chunks, token_chunks = images.chunk(accum_freq), tokens.chunk(accum_freq)
    keep_chunks = patch_keep.chunk(accum_freq) if patch_keep is not None else [None] * accum_freq
    with torch.no_grad(), autocast:
        cached = [model(i, t, patch_keep=k) for i, t, k in zip(image_chunks, token_chunks, keep_chunks)]
    loss = None
    for j in range(accum_freq):
        last = j == accum_freq - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast:
                live = model(image_chunks[j], token_chunks[j], patch_keep=keep_chunks[j])
                image_features = torch.cat([c[0] for c in cached[:j]] + [live[0]] + [c[0] for c in cached[j + 1:]])
                text_features = torch.cat([c[1] for c in cached[:j]] + [live[1]] + [c[1] for c in cached[j + 1:]])
                extras = [value if last else value.detach() for value in live[2:]]
                loss = loss_fn(image_features, text_features, *extras)
            _backward(loss, scaler)
    return loss.detach()


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def build_optimizer(model, config: TrainConfig, device: torch.device, cast: torch.dtype | None = None):
    """The paper's optimizer: AdamW over `model.param_groups`, `lr_schedule` (the paper's: cosine after a
    linear warmup; stepped once per optimizer step), and a gradient scaler only under fp16 autocast."""
    optimizer = torch.optim.AdamW(model.param_groups(config.weight_decay), lr=config.lr,
                                  betas=(config.beta1, config.beta2), eps=config.eps, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    scaler = torch.amp.GradScaler(device.type) if cast == torch.float16 else None
    return optimizer, scheduler, scaler


def load_train_state(model, optimizer, scheduler, scaler, state: dict) -> None:
    """A train state's optimizer moments, schedule step and gradient scaler, into those `build_optimizer` made
    from this run's config; the recipe stays the config's (rate, weight decay, betas, eps, the schedule's
    length), as OpenCLIP sets the rate from --lr at every step: load_state_dict brings back the checkpoint's."""
    recipe = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    load_optimizer_state(model, optimizer, state["optimizer"])
    for group, values in zip(optimizer.param_groups, recipe, strict=True):
        group.update(values)
    scheduler.load_state_dict(state["scheduler"])  # its step; the rates again as the config has them
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])


def optimizer_step(model, runnable, optimizer, scheduler, scaler, loss_fn, images: torch.Tensor,
                   tokens: torch.Tensor, config: TrainConfig, autocast, patch_keep: torch.Tensor | None = None):
    """One update of `model` (run through `runnable`, its DDP/FSDP/compiled wrapper): gradients of
    the whole contrastive batch, clipped by global norm, the AdamW step at this step's learning
    rate, the temperature clamped. Returns (loss, grad norm before clipping, the lr used)."""
    optimizer.zero_grad(set_to_none=True)
    loss = contrastive_step(runnable, loss_fn, images, tokens, config.accum_freq, autocast, patch_keep, scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm or float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr = scheduler.get_last_lr()[0]  # this step's, as OpenCLIP logs it; the scheduler then moves on
    scheduler.step()
    model.clamp_logit_scale_()
    return loss, grad_norm, lr


# ------------------------------------------------------------------------------- the loop


def _say(line: str) -> None:
    """One progress line from a training worker, written to the process's own stdout. A plain print
    reaches the driver twice: Ray Train 2.60's print patch both tees it to Ray's wrapped stdout and
    logs it to the console."""
    print(line, file=sys.__stdout__, flush=True)


def _rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
            "numpy": [str(x) if i == 0 else (x.tolist() if isinstance(x, np.ndarray) else x)
                      for i, x in enumerate(np.random.get_state())],
            "augment": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], np.asarray(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    generator.set_state(state["augment"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_train_state(directory: str, model, weights: dict, optimizer_state: dict, scheduler, scaler,
                      position: Position, rng: list, config: TrainConfig, mlflow_run_id: str | None,
                      metrics: dict) -> None:
    clip_core.save_checkpoint(model, directory, weights=weights, extra={"train": {
        "step": position.step, "data_pass": position.data_pass, "mlflow_run_id": mlflow_run_id,
        "config": redacted(config.model_dump(mode="json"))}})
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": position.step, "data_pass": position.data_pass, "batch_in_pass": position.batch_in_pass,
                "rng": rng, "mlflow_run_id": mlflow_run_id, "metrics": metrics},
               os.path.join(directory, TRAIN_STATE))


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    config = TrainConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.cpus_per_worker or 1)))
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)

    model = build_model(config).to(device)
    position, mlflow_run_id, metrics, state = Position(), None, {}, None

    # this run's latest checkpoint after a restart; else the one to resume from by hand
    checkpoint = ray.train.get_checkpoint()
    resume = _checkpoint_uri(checkpoint) if checkpoint is not None else loop_config.get("resume_checkpoint")
    if resume:
        with storage.local_copy(resume) as directory:
            restored = clip_core.load_model(directory)
            clip_core.checkpoint.load_weights(model, restored.state_dict(), source=f"the checkpoint {resume}")
            state = torch.load(os.path.join(directory, TRAIN_STATE), map_location="cpu", weights_only=True)

    runnable = distribute(model, config.strategy, world, config.compile)  # the optimizer must see FSDP's shards
    cast = autocast_dtype(config.precision, device)
    optimizer, scheduler, scaler = build_optimizer(model, config, device, cast)
    if state is not None:
        load_train_state(model, optimizer, scheduler, scaler, state)
        # checkpoints from before passes counted epochs, one pass each
        position = Position(state["step"], state.get("data_pass", state.get("epoch", 0)),
                            state.get("batch_in_pass", state.get("batch_in_epoch", 0)))
        if rank < len(state["rng"]):
            _set_rng_state(state["rng"][rank], generator)
        mlflow_run_id = state.get("mlflow_run_id")
        if rank == 0:
            _say(f"resumed from step {position.step} (pass {position.data_pass} over the data, "
                 f"batch {position.batch_in_pass})")

    loss_fn = clip_core.create_loss(config.loss)
    autocast = torch.autocast(device.type, dtype=cast or torch.float32, enabled=cast is not None)
    image_size = model.image_size
    augment = Augment(image_size, train=True, generator=generator, scale=config.aug_scale)
    record = loop_config.get("mlflow_run_record")
    if rank == 0 and mlflow_run_id is None and record:  # a restart before this fit's first checkpoint
        mlflow_run_id = opened_run(record)
    tracker = _RankZeroTracker(config, mlflow_run_id, record) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    local_batch = config.batch_size // world

    window_started, window_data_wait, window_steps = time.perf_counter(), 0.0, 0
    for batch, waited in batches(shard, config, position, local_batch, device, rank):
        window_data_wait += waited
        _maybe_inject_fault(config, rank, position.step + 1)
        runnable.train()
        images = augment(batch["image"])
        dropout = config.patch_dropout_at(position.step + 1)
        patch_keep = to_device(model.sample_patches(len(images), dropout, generator), device) if dropout else None
        loss, grad_norm, lr = optimizer_step(model, runnable, optimizer, scheduler, scaler, loss_fn, images,
                                             batch["tokens"], config, autocast, patch_keep)
        position.step += 1
        window_steps += 1
        if position.step % config.log_every == 0 or position.step == config.steps:
            # the whole batch's (every worker logs at the same steps); reading it waits for the device, so
            # the window's time holds all of its steps' work
            loss = float(global_mean(loss))
            elapsed = time.perf_counter() - window_started
            metrics = {"loss": loss, "lr": lr,
                       "logit_scale": model.logit_scale.detach().exp().item(),
                       "grad_norm": scalar(grad_norm), "samples_per_s": window_steps * config.batch_size / elapsed,
                       "samples_per_s_per_worker": window_steps * config.batch_size / elapsed / world,
                       "data_wait_fraction": window_data_wait / elapsed, "epoch": position.epoch(config),
                       **({"patch_dropout": dropout} if config.patch_dropout else {})}
            window_started, window_data_wait, window_steps = time.perf_counter(), 0.0, 0
            if tracker:
                tracker.log_step(position.step, metrics)
        checkpointing = position.step % config.checkpoint_every == 0 or position.step == config.steps
        # every checkpoint carries the validation metrics, so the best can be kept by them
        if checkpointing or (config.val_every and position.step % config.val_every == 0):
            metrics = {**metrics, **_validate(config, model, device, autocast, rank)}
            if tracker:
                tracker.log_validation(position.step, metrics)
        if checkpointing:
            _report(config, model, optimizer, scheduler, scaler, position, generator, rank, tracker, metrics)
        if position.step >= config.steps:
            break
    if tracker:
        tracker.finish()
    if world > 1:
        dist.barrier()


def opened_run(record: str) -> str | None:
    """The MLflow run id rank 0 wrote to `record` when it opened the run (see train), or None before."""
    return storage.read_bytes(record, max_bytes=256).decode().strip() if storage.exists(record) else None


def _report(config, model, optimizer, scheduler, scaler, position, generator, rank, tracker, metrics) -> None:
    import ray.train

    rng = gather(_rng_state(generator))
    weights, optimizer_state = gathered_state(model, optimizer)
    reported = {**{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "step": position.step,
                "mlflow_run_id": tracker.run_id if tracker else None}
    if rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            _save_train_state(directory, model, weights, optimizer_state, scheduler, scaler, position, rng, config,
                              tracker.run_id if tracker else None, reported)
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint_{position.step:08d}")
    else:
        ray.train.report(reported, checkpoint=None, checkpoint_dir_name=f"checkpoint_{position.step:08d}")


def _maybe_inject_fault(config: TrainConfig, rank: int, step: int) -> None:
    fault = config.fault_injection
    if fault is None or fault.rank != rank or fault.step != step or os.path.exists(fault.marker):
        return
    Path(fault.marker).write_text(f"{'hung' if fault.action == 'hang' else 'killed'} rank {rank} at step {step}\n")
    if fault.action == "hang":
        threading.Event().wait()
    os.kill(os.getpid(), signal.SIGKILL)


@torch.no_grad()
def _validate(config: TrainConfig, model, device, autocast, rank: int) -> dict:
    """Rank 0: contrastive loss and retrieval on `val`; zero-shot top-1 on `zeroshot`. A sharded
    model runs forward on every worker together, so under FSDP every worker computes them."""
    if not (config.val or config.zeroshot) or (rank != 0 and not sharded(model)):
        return {}
    from .preprocess import read_manifest

    model.eval()
    out = {}
    if config.val:
        from .evaluate import gallery

        image_features, text_features, _ = _eval_features(config.val, model, device, autocast)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * image_features @ text_features.T
        labels = torch.arange(len(logits), device=logits.device)
        out["val_loss"] = float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
        # over the distinct images, as the evaluate stage counts (COCO's five captions an image: an image is
        # found by any of its captions), so checkpoint_metric ranks checkpoints as evaluation will
        first, inverse = gallery(_eval_set(config.val, model.image_size))
        retrieval = clip_core.retrieval_metrics(image_features[torch.from_numpy(first).to(image_features.device)],
                                                text_features, torch.from_numpy(inverse))
        out["val_image_to_text_R1"] = retrieval["image_to_text_R@1"]
        out["val_text_to_image_R1"] = retrieval["text_to_image_R@1"]
    if config.zeroshot:
        classnames = read_manifest(config.zeroshot)["classnames"]  # with a label on each row (check_config)
        image_features, _, labels = _eval_features(config.zeroshot, model, device, autocast)
        classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), classnames)
        scores = clip_core.zeroshot.zero_shot_logits(image_features, classifier)
        out["zeroshot_top1"] = clip_core.zeroshot.accuracy(scores, labels.to(scores.device), ks=(1,))["top1"]
    model.train()
    return out


_EVAL_SETS: dict[tuple[str, int], dict] = {}


def _eval_set(uri: str, image_size: int) -> dict:
    """A small prepared set decoded (decode_batch's arrays, and each row's image_id), once per worker."""
    key = (uri, image_size)
    if key not in _EVAL_SETS:
        from .evaluate import image_ids
        from .preprocess import read_prepared_table

        rows = read_prepared_table(uri, columns=["image", "tokens", "label"]).to_pydict()
        _EVAL_SETS[key] = {**decode_batch(rows, image_size), "image_id": image_ids(rows["image"])}
    return _EVAL_SETS[key]


def _eval_features(uri: str, model, device, autocast, batch_size: int = 256):
    """Normalized image and text features (and labels) of a small prepared set (`_eval_set`)."""
    data = _eval_set(uri, model.image_size)
    image_features, text_features = [], []
    for start in range(0, len(data["tokens"]), batch_size):
        images = torch.from_numpy(data["image"][start : start + batch_size]).to(device)
        tokens = torch.from_numpy(data["tokens"][start : start + batch_size]).to(device)
        with autocast:
            image_features.append(model.encode_image(normalize(images), normalize=True).float())
            text_features.append(model.encode_text(tokens, normalize=True).float())
    labels = torch.from_numpy(data["label"]) if (data["label"] >= 0).all() else None  # a set with labels
    return torch.cat(image_features), torch.cat(text_features), labels


class _RankZeroTracker:
    """MLflow logging from rank 0: params, per-step and validation metrics, dataset inputs, tags.

    The run opens in a thread while the loop starts its data stream: importing MLflow, opening or
    resuming the run and logging its params and dataset inputs took rank 0 ~6 s on 2 cores (longer
    against a remote server), and no worker gets a batch before every worker has asked for one. The
    logging calls wait for it; a failure to open the run is raised by the first of them."""

    def __init__(self, config: TrainConfig, run_id: str | None, record: str | None = None):
        self.enabled = bool(config.mlflow_tracking_uri)
        self._run_id, self._opening = run_id, None
        self.total_steps, self.batch_size = config.steps, config.batch_size
        if not self.enabled:
            return  # a run without MLflow never imports it (not installed everywhere, ~3 s per worker)
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlflow-run")
        self._opening = pool.submit(self._open, config, run_id, record)
        pool.shutdown(wait=False)

    @property
    def run_id(self) -> str | None:
        if self._opening is not None:
            self._run_id, self._opening = self._opening.result(), None
        return self._run_id

    @staticmethod
    def _open(config: TrainConfig, run_id: str | None, record: str | None) -> str:
        """The run's id; the run stays active in this thread only: the logging calls name it. The id is
        written to `record`, where a restart before the first checkpoint (which carries it after) finds
        it, and the driver, to end the run when the fit fails."""
        import mlflow

        guard_output(config.mlflow_tracking_uri)
        mlflow.set_tracking_uri(config.mlflow_tracking_uri)
        tags = {"rayclip.stage": "train", "rayclip.version": rayclip_version(), "git_commit": config.git_commit or "",
                "torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                else "cpu", "world_size": str(config.workers)}
        if config.mlflow_parent_run_id:
            tags["mlflow.parentRunId"] = config.mlflow_parent_run_id
        # a run resumed by hand into another tracking store gets a new run there
        opened = start_run(run_id, config.mlflow_experiment, config.run_name or "train", tags).info.run_id
        if record:
            storage.write_bytes(record, opened.encode())
        if opened != run_id:
            mlflow.log_params(flat_params(redacted(config.model_dump(mode="json", exclude={"fault_injection"}))))
            _RankZeroTracker._log_datasets(config)
        return opened

    @staticmethod
    def _log_datasets(config: TrainConfig) -> None:
        import mlflow

        from .preprocess import read_manifest

        for uri, context in [*((u, "train") for u in config.data), (config.val, "validation"),
                             (config.zeroshot, "zeroshot")]:
            if uri:
                mlflow.log_input(dataset_input(uri, read_manifest(uri)["digest"]), context=context)

    def log_step(self, step: int, metrics: dict) -> None:
        eta = (self.total_steps - step) * self.batch_size / max(metrics["samples_per_s"], 1e-9)
        _say(f"step {step}/{self.total_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
             f"{metrics['samples_per_s']:.1f} samples/s  data wait {metrics['data_wait_fraction']:.0%}  "
             f"ETA {eta / 60:.1f} min")
        if self.enabled:
            import mlflow

            mlflow.log_metrics(metrics, step=step, run_id=self.run_id)

    def log_validation(self, step: int, metrics: dict) -> None:
        validation = {k: v for k, v in metrics.items() if k.startswith(("val_", "zeroshot_"))}
        if validation:
            _say(f"validation at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in validation.items()))
        if self.enabled and validation:
            import mlflow

            mlflow.log_metrics(validation, step=step, run_id=self.run_id)

    def finish(self) -> None:
        if self.enabled:
            import mlflow

            mlflow.MlflowClient().set_terminated(self.run_id)


# ------------------------------------------------------------------------------- driver


@dataclass
class TrainResult:
    checkpoint: str  # the final checkpoint (copied to `output` when set)
    metrics: dict
    mlflow_run_id: str | None
    best_checkpoint: str | None
    run_path: str


def default_cpus_per_worker(workers: int, use_gpu: bool = False) -> float:
    """On a cluster or with GPUs, 1 CPU per worker: a GPU worker's CPU work is feeding its device, and
    the machine's other cores decode and augment for it (Ray Data tasks). On a local Ray without GPUs,
    the cores shared out, but never all of Ray's logical CPUs: Ray Data's decoding tasks need one, or
    the run waits for resources forever."""
    import ray

    if os.environ.get("RAY_ADDRESS") or use_gpu:
        return 1.0
    logical = ray.cluster_resources().get("CPU", 1.0)
    return float(min(max(1, (os.cpu_count() or 1) // workers), max(logical - 1, 0.25) / workers))


def check_config(config: TrainConfig, manifests: list[dict]) -> None:
    """Everything that can be known wrong before any worker starts (`manifests`: config.data's)."""
    import ray

    from .preprocess import read_manifest

    for uri in [config.val, config.zeroshot]:
        if uri:
            read_manifest(uri)  # raises naming the missing dataset
    if config.zeroshot:
        _check_zeroshot_set(config.zeroshot)
    rows = sum(manifest["counts"]["kept"] for manifest in manifests)
    if rows < config.batch_size:
        raise ValueError(f"the training data has {rows} rows, fewer than one global batch ({config.batch_size}): "
                         f"lower --batch-size or add data")
    if config.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < config.workers and not os.environ.get("RAY_ADDRESS"):
            raise ValueError(f"use_gpu with {config.workers} worker(s) needs {config.workers} GPU(s); this Ray "
                             f"cluster has {gpus:g}. Drop --gpu, or run on a cluster with GPUs")
    cpus = ray.cluster_resources().get("CPU", 0)
    if not config.use_gpu and config.workers * config.cpus_per_worker > cpus and not os.environ.get("RAY_ADDRESS"):
        raise ValueError(f"{config.workers} workers x {config.cpus_per_worker} CPUs exceed this Ray cluster's "
                         f"{cpus:g} CPUs; lower workers or cpus_per_worker")
    if config.resume and config.resume != "latest":
        if not storage.exists(config.resume):
            raise FileNotFoundError(f"no checkpoint to resume at {config.resume}")
        # the workers would fail to load it, each retry again
        missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE, TRAIN_STATE)
                   if not storage.exists(storage.join(config.resume, name))]
        if missing == [TRAIN_STATE]:
            raise FileNotFoundError(f"{config.resume} has weights but no {TRAIN_STATE} (optimizer, schedule, data "
                                    f"position): a weights-only checkpoint cannot be resumed; start from its weights "
                                    f"with --init {config.resume}")
        if missing:
            raise FileNotFoundError(f"{config.resume} is not a whole train checkpoint: it lacks {', '.join(missing)}; "
                                    "resume from a checkpoint directory the train stage wrote")
    if config.init:
        _, path = init_source(config.init)
        if not storage.exists(path):
            raise FileNotFoundError(f"no pretrained weights at {path} (from --init {config.init})")
    else:
        check_model(config, scratch_config(config), f"the model {config.model}")


def _check_zeroshot_set(uri: str) -> None:
    """The validation's zero-shot set has class names and a label within them on every row, as the evaluate
    stage requires: found wrong at the first checkpoint, the run would fail there (and, with no checkpoint yet,
    every restart from step 0)."""
    from .evaluate import _require_labels
    from .preprocess import label_array, read_manifest, read_prepared_table

    classnames = read_manifest(uri).get("classnames")
    if not classnames:
        raise ValueError(f"zeroshot {uri} has no class names in its manifest: prepare it with --label-key and "
                         "--classnames")
    labels = label_array(read_prepared_table(uri, columns=["label"]).column("label").to_pylist())
    _require_labels(f"zeroshot {uri}", {"label": labels}, len(classnames))


def default_storage(config: TrainConfig) -> str:
    if config.storage:
        return config.storage
    base = storage.dirname(config.output) if config.output else os.path.join(os.getcwd(), "work")
    return storage.join(base, "ray_results")


def resumable_checkpoints(storage_path: str, run_name: str | None = None) -> list[str]:
    """The checkpoints `--resume latest` may take, the most recently written first (a crashed run's, not
    an older one's that went further): each run's latest under `storage_path` (only run `run_name`'s when
    given) as Ray Train registered it, with its train state. A checkpoint
    directory is uploaded before it is registered, so one whose upload was cut short (weights missing or
    torn) or whose worker died in report() is never a candidate, however high its step."""
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    from .data_passes import registered_checkpoint

    if not storage.exists(storage_path):
        return []
    states = [uri for uri in storage.list_files(storage_path) if storage.basename(uri) == TRAIN_STATE]
    runs = sorted({storage.dirname(storage.dirname(uri)) for uri in states})
    if run_name is not None:
        runs = [run for run in runs if storage.basename(run) == run_name]
    found = []
    for run in runs:
        try:
            checkpoint = registered_checkpoint(run)
        except CheckpointManagerInitializationError:  # written by another Ray version: what it registered is unknown
            continue
        state = storage.info(storage.join(checkpoint, TRAIN_STATE)) if checkpoint is not None else None
        if state is not None and state.type == pafs.FileType.File:
            found.append((state.mtime, checkpoint))
    return [checkpoint for _, checkpoint in sorted(found, reverse=True)]


def latest_checkpoint(storage_path: str, run_name: str | None = None) -> str | None:
    """The newest of `resumable_checkpoints`, or None."""
    return next(iter(resumable_checkpoints(storage_path, run_name)), None)


def resume_mismatch(config: TrainConfig, checkpoint: str) -> str | None:
    """Why the train checkpoint at `checkpoint` cannot carry this run on, None if it can: it holds another
    model (its architecture, or for --init runs the weights it started from) or trained on other data (its
    optimizer state and data position would be another run's)."""
    from clip_core.checkpoint import described_config

    from .registry import checkpoint_description

    description = checkpoint_description(checkpoint)
    recorded = (description.get("train") or {}).get("config") or {}
    if config.init or recorded.get("init"):
        theirs = recorded.get("init"), recorded.get("quick_gelu"), recorded.get("image_size")
        ours = redacted(config.init), config.quick_gelu, config.image_size
        if theirs != ours:
            return f"it started from (init, quick_gelu, image_size) {theirs}, this run from {ours}"
    elif described_config(description, checkpoint).replace(name=None) != scratch_config(config).replace(name=None):
        return f"its model ({recorded.get('model', 'unrecorded')}) is not this run's ({config.model})"
    # (a checkpoint from before train recorded its data's digests cannot tell: it is taken as it is named)
    if "data_digests" in recorded and recorded["data_digests"] != config.data_digests:
        return f"it trained on data {recorded.get('data_digests')}, this run's is {config.data_digests}"
    return None


def checkpoint_to_resume(config: TrainConfig, storage_path: str) -> str | None:
    """The checkpoint `config.resume` names (None without one): 'latest' is the newest of
    `resumable_checkpoints` that can carry this run on (the storage is shared by every run writing there).
    One that cannot (another model, other data) is refused naming what differs; `config.data_digests`
    must be set. A `run_name` whose run has checkpoints already is refused unless this resumes its latest:
    Ray Train hands a run's workers its latest registered checkpoint, whatever else was asked (OpenCLIP
    refuses a --name used before, likewise)."""
    from .data_passes import registered_checkpoint

    resume_from = _checkpoint_named(config, storage_path)
    run = storage.join(storage_path, config.run_name) if config.run_name else None
    carried = registered_checkpoint(run) if run and storage.exists(run) else None
    if carried and not (resume_from and storage.absolute(resume_from).rstrip("/") == carried.rstrip("/")):
        asked = f"resuming {resume_from}" if resume_from else "a fresh run"
        raise ValueError(f"run {config.run_name!r} under {storage_path} has checkpoints already (the latest: "
                         f"{carried}), which Ray Train would carry on instead of {asked}: resume that run with "
                         f"--resume latest --run-name {config.run_name}, or name this one anew (--run-name)")
    return resume_from


def _checkpoint_named(config: TrainConfig, storage_path: str) -> str | None:
    if not config.resume:
        return None
    if config.resume != "latest":
        mismatch = resume_mismatch(config, config.resume)
        if mismatch:
            raise ValueError(f"--resume {config.resume} cannot carry this run on: {mismatch}. Resume it with the "
                             "model, --init and data it trained with, or start afresh from its weights with --init "
                             f"{config.resume}")
        return config.resume
    where = storage.join(storage_path, config.run_name) if config.run_name else storage_path
    candidates = resumable_checkpoints(storage_path, config.run_name)
    if not candidates:
        raise FileNotFoundError(f"--resume latest: no registered checkpoint with a train state under {where}; "
                                "resume one by its path (--resume PATH)")
    resume_from = next((uri for uri in candidates if resume_mismatch(config, uri) is None), None)
    if resume_from is None:
        raise ValueError(f"--resume latest: no checkpoint under {where} trained this model on this data; the newest, "
                         f"{candidates[0]}: {resume_mismatch(config, candidates[0])}. Resume the run you meant "
                         "with its own model and data (--resume PATH, or its run_name to scope latest to it), or "
                         "train afresh (no --resume, or a fresh --output)")
    return resume_from


def train(config: TrainConfig, echo=print) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    from .preprocess import read_manifest
    from .runtime import init_ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # report() otherwise costs ~2 s
    init_ray(dashboard=True)  # Ray Train's placement-group cleaner asks the state API every second
    database = sqlite_path(config.mlflow_tracking_uri or "")
    if database and not os.path.isabs(database):  # the workers may run elsewhere
        config = config.model_copy(update={"mlflow_tracking_uri": sqlite_uri(database)})
    if config.git_commit is None:
        config = config.model_copy(update={"git_commit": git_commit()})
    if config.cpus_per_worker is None:
        cpus = default_cpus_per_worker(config.workers, config.use_gpu)
        config = config.model_copy(update={"cpus_per_worker": cpus})
    # the data's identity as trained on, not whatever sits at these URIs when the model is registered;
    # read_manifest raises naming a missing dataset
    manifests = [read_manifest(uri) for uri in config.data]
    check_config(config, manifests)
    config = config.model_copy(update={"data_digests": [manifest["digest"] for manifest in manifests],
                                       "global_shuffle": shuffles_globally(config, manifests)})

    storage_path = default_storage(config)
    resume_from = checkpoint_to_resume(config, storage_path)
    if resume_from:
        from .data_passes import train_record

        trained = train_record(resume_from)
        if trained.get("step", 0) >= config.steps:  # a run stopped after its last checkpoint, before its copy
            echo(f"train: {resume_from} is at step {trained['step']} of {config.steps}: nothing left to train")
            final = resume_from
            if config.output:
                _copy_checkpoint(final, config.output)
                final = config.output
            return TrainResult(checkpoint=final, metrics={"step": trained["step"]},
                               mlflow_run_id=trained.get("mlflow_run_id"), best_checkpoint=None,
                               run_path=storage.dirname(resume_from))
    run_name = config.run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_path = storage.join(storage_path, run_name)
    # where rank 0 writes the MLflow run it opened, for a restart before the first checkpoint and for
    # _end_failed_run: one file per call, so a run name used again never reopens nor ends an earlier call's run
    run_record = (storage.join(run_path, f"mlflow_run_id.{uuid.uuid4().hex}") if config.mlflow_tracking_uri
                  else None)
    fs, _ = storage.filesystem(storage_path)
    if not storage.is_s3(storage_path):
        os.makedirs(storage_path, exist_ok=True)
    image_size = init_image_size(config) if config.init else \
        config.image_size or clip_core.get_config(config.model).vision.image_size
    datasets = {"train": training_dataset(config, manifests, image_size)}

    from ray.data import ExecutionOptions

    from .data_passes import PassDataConfig

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "resume_checkpoint": resume_from,
                           "mlflow_run_record": run_record},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage.filesystem(storage_path)[1] if storage.is_s3(storage_path) else storage_path,
            storage_filesystem=fs if storage.is_s3(storage_path) else None,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.num_to_keep, checkpoint_score_attribute=config.checkpoint_metric,
                checkpoint_score_order=_score_order(config))),
        datasets=datasets,
        dataset_config=PassDataConfig(storage.join(storage_path, run_name), resume_from,
                                      execution_options=ExecutionOptions(preserve_order=True)),
    )
    echo(f"train: {config.model} on {config.workers} worker(s), global batch {config.batch_size} "
         f"({config.micro_batch} x {config.accum_freq} per worker), {config.steps} steps → {storage_path}/{run_name}")
    try:
        result = trainer.fit()
    except BaseException as exc:  # the MLflow run ends as the Ray Train run did, not RUNNING for ever
        _end_failed_run(config, run_record, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    final = _checkpoint_uri(result.checkpoint)
    best = None
    if config.checkpoint_metric and result.best_checkpoints:
        best = result.get_best_checkpoint(config.checkpoint_metric, _score_order(config))
        best = best and _checkpoint_uri(best)
    if config.output:
        _copy_checkpoint(final, config.output)
        final = config.output
    metrics = dict(result.metrics or {})
    run_id = metrics.get("mlflow_run_id")
    if run_id and config.mlflow_tracking_uri:
        _log_checkpoints(config, run_id, final, best)
    echo(f"train: done at step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f} → {final}")
    return TrainResult(checkpoint=final, metrics=metrics, mlflow_run_id=run_id, best_checkpoint=best,
                       run_path=run_path)


def _end_failed_run(config: TrainConfig, record: str | None, status: str) -> None:
    if record is None:
        return
    try:
        run_id = opened_run(record)
        if run_id:
            import mlflow

            guard_output(config.mlflow_tracking_uri)
            mlflow.MlflowClient(config.mlflow_tracking_uri).set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - the training failure is what the caller must see
        _say(f"train: could not mark the MLflow run {status}: {redact(str(exc))[:300]}")


def _score_order(config: TrainConfig) -> str:
    return "min" if (config.checkpoint_metric or "").endswith("loss") else "max"


def _checkpoint_uri(checkpoint) -> str:
    return storage.to_uri(checkpoint.filesystem, checkpoint.path)


def _copy_checkpoint(source: str, destination: str) -> None:
    """The weights last: their presence says the copy is whole (a rerun that finds them skips training)."""
    storage.copy_directory(source, destination, last=WEIGHTS_FILE)


def _log_checkpoints(config: TrainConfig, run_id: str, final: str, best: str | None) -> None:
    import mlflow

    guard_output(config.mlflow_tracking_uri)
    client = mlflow.MlflowClient(config.mlflow_tracking_uri)
    for uri, name in ((final, "checkpoint"), (best, "best_checkpoint")):
        if uri is None:
            continue
        with tempfile.TemporaryDirectory() as local:
            _copy_checkpoint(uri, local)
            client.log_artifacts(run_id, local, artifact_path=name)

