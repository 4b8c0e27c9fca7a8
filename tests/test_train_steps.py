"""The train stage's pieces that need no Ray: one optimizer step, the driver's checks, the checkpoint it
resumes from, the numbers it logs."""

import copy
import json
import os
import time
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import clip_core
from workflows import storage
from workflows import train as train_module
from workflows.parallel import gathered_state, global_mean
from workflows.train import (TrainConfig, _save_train_state, autocast_dtype, build_model, build_optimizer,
                             check_config, checkpoint_to_resume, contrastive_step, init_image_size, latest_checkpoint,
                             load_train_state, lr_schedule, optimizer_step, resumable_checkpoints, resume_mismatch)
from workflows.train_data import Position

from micro import micro_config


MANIFESTS = [{"counts": {"kept": 1000}}]  # what check_config reads of config.data's manifests


@pytest.fixture
def cluster(monkeypatch):
    """check_config asks Ray for the cluster's resources: a 4-CPU one, without starting Ray."""
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})


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


def test_weights_with_a_logit_bias_are_refused_for_the_softmax_loss_before_any_worker_starts(
        tmp_path, monkeypatch, cluster):
    # e.g. --init from a checkpoint trained with loss: siglip, then trained with the default loss
    clip_core.save_checkpoint(clip_core.create_model(micro_config(), init_logit_bias=-10.0), tmp_path / "siglip")
    config = TrainConfig(data=["unread"], steps=10, init=str(tmp_path / "siglip"), cpus_per_worker=1)
    refused = rf"--init {tmp_path / 'siglip'} has a logit_bias \(a SigLIP model\).*set loss: siglip"
    with monkeypatch.context() as patch:
        # the driver learns it from the checkpoint's config alone: the weights are the workers' to fetch
        patch.setattr(storage, "local_copy", lambda uri: pytest.fail(f"the driver read the weights at {uri}"))
        with pytest.raises(ValueError, match=refused):
            init_image_size(config)
    with pytest.raises(ValueError, match=refused):
        build_model(config)  # and a worker, or the driver for weights without a config file
    assert build_model(config.model_copy(update={"loss": "siglip"})).logit_bias is not None
    # a model config file with a bias, trained from scratch
    (tmp_path / "micro.json").write_text(json.dumps(micro_config().replace(init_logit_bias=-10.0).to_dict()))
    with pytest.raises(ValueError, match=r"the model .*micro.json has a logit_bias"):
        check_config(TrainConfig(data=["unread"], steps=10, model=str(tmp_path / "micro.json"), cpus_per_worker=1),
                     MANIFESTS)
    # the other way round, as before: the sigmoid loss needs a bias
    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), tmp_path / "clip")
    with pytest.raises(ValueError, match=r"the sigmoid loss needs a model with logit_bias and --init .*clip has none"):
        init_image_size(config.model_copy(update={"init": str(tmp_path / "clip"), "loss": "siglip"}))


def _train_checkpoint(directory, config: TrainConfig, step: int) -> str:
    """A checkpoint as the train loop writes it: weights, config.json with its train record, train_state.pt."""
    model = clip_core.CLIP(micro_config())
    optimizer, scheduler, _ = build_optimizer(model, config, torch.device("cpu"))
    directory.mkdir(parents=True)
    _save_train_state(str(directory), model, model.state_dict(), optimizer.state_dict(), scheduler, None,
                      Position(step, 0, step), [], config, None, {"step": step})
    return str(directory)


def _register(run, *steps: int) -> None:
    """Ray Train's record of the checkpoints it registered for a run (its checkpoint manager's snapshot, as Ray
    writes it once a reported checkpoint is whole in storage)."""
    results = [{"version": 0, "checkpoint_dir_name": f"checkpoint_{step:08d}", "metrics": {"step": step}}
               for step in steps]
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "ray_version": ray.__version__, "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(steps))), "latest_checkpoint_result": results[-1],
        "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(steps),
        "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": []}))


def test_resume_latest_takes_the_newest_registered_checkpoint_that_trained_this_model_on_this_data(tmp_path):
    runs = tmp_path / "ray_results"  # the default storage, shared by every `rayclip train` whose --output is beside it
    (tmp_path / "micro.json").write_text(json.dumps(micro_config().to_dict()))
    ours = TrainConfig(data=["train"], steps=20, model=str(tmp_path / "micro.json"), data_digests=["sha256:ours"],
                       resume="latest")
    theirs = ours.model_copy(update={"data_digests": ["sha256:theirs"]})
    mine = [_train_checkpoint(runs / "train-a" / f"checkpoint_{step:08d}", ours, step) for step in (3, 6)]
    _register(runs / "train-a", 3, 6)
    # a newer upload cut short (its worker died mid-way): a train state, torn weights, never registered
    torn = runs / "train-a" / "checkpoint_00000009"
    _train_checkpoint(torn, ours, 9)
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:100])
    # the newest: another run's, on other data
    other = _train_checkpoint(runs / "train-b" / "checkpoint_00000012", theirs, 12)
    _register(runs / "train-b", 12)
    (runs / "train-c").mkdir()  # a run that never checkpointed

    assert resumable_checkpoints(str(runs)) == [other, mine[1]]
    assert latest_checkpoint(str(runs)) == other and latest_checkpoint(str(runs), "train-a") == mine[1]
    assert latest_checkpoint(str(tmp_path / "absent")) is None
    assert checkpoint_to_resume(ours, str(runs)) == mine[1]
    assert checkpoint_to_resume(theirs, str(runs)) == other
    assert checkpoint_to_resume(ours.model_copy(update={"resume": None}), str(runs)) is None
    # none of this model on this data: refused, naming what differs and the way out
    with pytest.raises(ValueError, match=r"no checkpoint under .*ray_results trained this model on this data; the "
                                         r"newest, .*train-b/checkpoint_00000012: its model \(.*micro.json\) is "
                                         r"not this run's \(tiny\).*--resume PATH"):
        checkpoint_to_resume(ours.model_copy(update={"model": "tiny"}), str(runs))
    with pytest.raises(ValueError, match=r"the newest, .*train-a/checkpoint_00000006: it trained on data "
                                         r"\['sha256:ours'\], this run's is \['sha256:theirs'\]"):
        checkpoint_to_resume(theirs.model_copy(update={"run_name": "train-a"}), str(runs))
    with pytest.raises(FileNotFoundError, match="no registered checkpoint with a train state under .*train-c"):
        checkpoint_to_resume(ours.model_copy(update={"run_name": "train-c"}), str(runs))
    # one named by hand is checked too (before it is resumed, or copied out as the result if it is at the last step)
    with pytest.raises(ValueError, match=rf"--resume {other} cannot carry this run on: it trained on data "
                                         rf"\['sha256:theirs'\], this run's is \['sha256:ours'\].*--init {other}"):
        checkpoint_to_resume(ours.model_copy(update={"resume": other}), str(runs))
    assert checkpoint_to_resume(ours.model_copy(update={"resume": mine[0]}), str(runs)) == mine[0]
    # a run name used before: Ray Train would hand its workers that run's latest checkpoint, whatever was asked
    named = ours.model_copy(update={"run_name": "train-a"})
    assert checkpoint_to_resume(named, str(runs)) == mine[1]
    assert checkpoint_to_resume(named.model_copy(update={"resume": mine[1] + "/"}), str(runs)) == mine[1] + "/"
    for resume, asked in ((None, "a fresh run"), (mine[0], f"resuming {mine[0]}")):
        with pytest.raises(ValueError, match=rf"run 'train-a' under .*ray_results has checkpoints already \(the "
                                             rf"latest: {mine[1]}\), which Ray Train would carry on instead of "
                                             rf"{asked}: resume that run with --resume latest --run-name train-a"):
            checkpoint_to_resume(named.model_copy(update={"resume": resume}), str(runs))
    assert checkpoint_to_resume(ours.model_copy(update={"run_name": "train-c", "resume": None}), str(runs)) is None
    # a run from pretrained weights carries on only from the same weights
    assert "it started from" in resume_mismatch(ours.model_copy(update={"init": "openai:ViT-B-32.pt"}), mine[1])
    # latest is the most recently written: an older run of this model on this data that went further (step 30,
    # finished a month ago) is not what a crashed run resumes from
    finished = _train_checkpoint(runs / "train-d" / "checkpoint_00000030", ours, 30)
    _register(runs / "train-d", 30)
    month_ago = time.time() - 30 * 86400
    os.utime(os.path.join(finished, "train_state.pt"), (month_ago, month_ago))
    assert checkpoint_to_resume(ours, str(runs)) == mine[1]
    # a checkpoint from before train recorded its data's digests cannot tell, and is taken as named
    described = json.loads((runs / "train-d" / "checkpoint_00000030" / "config.json").read_text())
    del described["train"]["config"]["data_digests"]
    (runs / "train-d" / "checkpoint_00000030" / "config.json").write_text(json.dumps(described))
    assert resume_mismatch(theirs, finished) is None


def test_resuming_by_hand_needs_a_whole_train_checkpoint_before_any_worker_starts(tmp_path, cluster):
    config = TrainConfig(data=["train"], steps=20, model="tiny", cpus_per_worker=1)
    trained = _train_checkpoint(tmp_path / "checkpoint_00000006", config, 6)
    check_config(config.model_copy(update={"resume": trained}), MANIFESTS)
    # weights alone (a registered model version's, or save_checkpoint's): to start from, not to resume
    weights_only = str(clip_core.save_checkpoint(clip_core.CLIP(micro_config()), tmp_path / "weights"))
    with pytest.raises(FileNotFoundError, match=rf"{weights_only} has weights but no train_state.pt .*cannot be "
                                                rf"resumed; start from its weights with --init {weights_only}"):
        check_config(config.model_copy(update={"resume": weights_only}), MANIFESTS)
    (tmp_path / "checkpoint_00000006" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{trained} is not a whole train checkpoint: it lacks "
                                                "model.safetensors"):
        check_config(config.model_copy(update={"resume": trained}), MANIFESTS)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume at"):
        check_config(config.model_copy(update={"resume": str(tmp_path / "nowhere")}), MANIFESTS)


WORLD = 2


def _local_and_logged_loss(kind: str, rank: int = 0, world: int = 1):
    """One step's loss on this worker's rows of a fixed global batch of 8: as contrastive_step returns it, and as
    the train loop logs it."""
    torch.manual_seed(0)
    model = clip_core.create_model(micro_config(), init_logit_bias=-10.0 if kind == "siglip" else None)
    images, tokens = _batch(8)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = contrastive_step(model, clip_core.create_loss(kind), images[rows], tokens[rows], 1,
                            torch.autocast("cpu", enabled=False))
    return float(loss), float(global_mean(loss))


def _logging_worker(rank: int, init_file: str, kind: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(_local_and_logged_loss(kind, rank, WORLD)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_the_logged_loss_is_the_whole_batchs_whatever_the_number_of_workers(kind, tmp_path):
    mp.spawn(_logging_worker, args=(str(tmp_path / "rendezvous"), kind, str(tmp_path)), nprocs=WORLD, join=True)
    (local0, logged0), (local1, logged1) = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    whole, logged_alone = _local_and_logged_loss(kind)
    assert logged_alone == whole
    # each worker's own loss is over its rows only: the one rank 0 logged before
    assert abs(local0 - whole) > 1e-3 and abs(local1 - whole) > 1e-3
    assert logged0 == logged1 == pytest.approx(whole, abs=1e-5)


def test_image_size_trains_at_another_resolution_from_scratch_or_from_weights(tmp_path):
    """OpenCLIP's --force-image-size: a model built at it, or --init weights loaded at it (the position
    embedding interpolated), and the driver plans the data's decoding at it without loading the weights."""
    scratch = build_model(TrainConfig(data=["d"], model="tiny", image_size=48))
    assert scratch.image_size == 48 and scratch.config.vision.image_size == 48
    clip_core.save_checkpoint(clip_core.create_model("tiny"), tmp_path / "ckpt")
    config = TrainConfig(data=["d"], model="tiny", init=str(tmp_path / "ckpt"), image_size=96)
    assert init_image_size(config) == 96 and clip_core.load_model(tmp_path / "ckpt").image_size == 64
    resized = build_model(config)
    assert resized.image_size == 96
    assert resized(torch.randn(2, 3, 96, 96), clip_core.get_tokenizer()(["a", "b"]))[0].shape == (2, 256)

    # and such a run resumes (an interrupted pipeline resumes its train stage), at that size only
    for run, name in ((TrainConfig(data=["d"], model="tiny", image_size=48), "scratch"), (config, "init")):
        model = build_model(run)
        optimizer, scheduler, _ = build_optimizer(model, run, torch.device("cpu"))
        (tmp_path / name).mkdir()
        _save_train_state(str(tmp_path / name), model, model.state_dict(), optimizer.state_dict(), scheduler, None,
                          Position(3, 0, 3), [], run, None, {"step": 3})
        assert resume_mismatch(run, str(tmp_path / name)) is None, name
        assert resume_mismatch(run.model_copy(update={"image_size": None}), str(tmp_path / name)), name


def test_train_time_retrieval_counts_an_image_with_several_captions_once_as_evaluation_does(monkeypatch):
    """COCO's layout (five captions an image, a row each): validation's R@1 is over the distinct images, as
    the evaluate stage's, so a checkpoint_metric on it ranks checkpoints as evaluation will."""
    import contextlib

    import numpy as np

    from workflows import evaluate, train

    torch.manual_seed(0)
    model = clip_core.create_model("tiny").eval()
    pixels = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    rows = [0, 0, 1, 1, 2, 2]  # each image twice, with two captions
    tokens = clip_core.get_tokenizer()([f"caption {i} of image {r}" for i, r in enumerate(rows)]).numpy()
    monkeypatch.setitem(train._EVAL_SETS, ("val-set", 64), {
        "image": pixels[rows], "tokens": tokens, "label": np.full(6, -1),
        "image_id": np.asarray([f"id{r}" for r in rows], dtype=object)})
    config = TrainConfig(data=["d"], model="tiny", val="val-set")
    metrics = train._validate(config, model, "cpu", contextlib.nullcontext(), rank=0)
    with torch.no_grad():
        features = {"image_features": model.encode_image(clip_core.transforms.normalize(
                        torch.from_numpy(pixels[rows]).permute(0, 3, 1, 2).float() / 255), normalize=True).numpy(),
                    "text_features": model.encode_text(torch.from_numpy(tokens), normalize=True).numpy(),
                    "image_id": np.asarray([f"id{r}" for r in rows], dtype=object)}
    expected = evaluate.retrieval(features)
    assert expected["images"] == 3 and expected["captions"] == 6
    assert metrics["val_image_to_text_R1"] == pytest.approx(expected["image_to_text_R1"])
    assert metrics["val_text_to_image_R1"] == pytest.approx(expected["text_to_image_R1"])
    one_to_one = clip_core.retrieval_metrics(torch.from_numpy(features["image_features"]),
                                             torch.from_numpy(features["text_features"]))
    assert metrics["val_text_to_image_R1"] > one_to_one["text_to_image_R@1"], "a caption's twin image is no miss"


def test_a_resumed_run_keeps_the_optimizer_moments_and_step_but_takes_its_recipe_from_its_own_config():
    # OpenCLIP sets the rate from --lr at every step: a run carried on at another rate (or longer) uses it,
    # where load_state_dict would bring back the checkpoint's rate, weight decay, betas and eps
    before = TrainConfig(data=["train"], steps=10, warmup_steps=2, lr=1e-3, weight_decay=0.1)
    model = clip_core.CLIP(micro_config())
    optimizer, scheduler, _ = build_optimizer(model, before, torch.device("cpu"))
    for _ in range(3):
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    model.zero_grad(set_to_none=True)  # as a resumed run's model is built
    state = {"optimizer": copy.deepcopy(gathered_state(model, optimizer)[1]), "scheduler": scheduler.state_dict(),
             "scaler": None}  # as the train loop saves them

    after = before.model_copy(update={"steps": 20, "lr": 1e-4, "weight_decay": 0.0, "beta2": 0.95, "eps": 1e-8})
    optimizer, scheduler, scaler = build_optimizer(model, after, torch.device("cpu"))
    load_train_state(model, optimizer, scheduler, scaler, state)
    assert scheduler.last_epoch == 3
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4 * lr_schedule(after)(3)] * 2
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in optimizer.param_groups] == [(0.0, (0.9, 0.95), 1e-8)] * 2
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4 * lr_schedule(after)(4)] * 2
    moments = state["optimizer"]["state"]
    assert len(moments) == len(list(model.parameters())) and all(
        torch.equal(optimizer.state[param]["exp_avg"], moments[name]["exp_avg"])
        for name, param in model.named_parameters())


def _labeled_set(directory: Path, labels: list, classnames: list[str] | None) -> str:
    """A prepared set as far as its labels go: a manifest listing one shard, the shard's label column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (directory / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"label": pa.array(labels, pa.int64())}), directory / "shards" / "0.parquet")
    manifest = {"schema_version": 1, "shards": [{"path": "shards/0.parquet", "rows": len(labels)}],
                "counts": {"kept": len(labels)}, **({"classnames": classnames} if classnames else {})}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return str(directory)


def test_what_every_worker_would_fail_on_at_its_first_checkpoint_or_step_fails_on_the_driver(tmp_path):
    # the zero-shot set is scored at each checkpoint: wrong there, the run failed after that many steps (and,
    # with no checkpoint yet, each restart again from step 0)
    check = train_module._check_zeroshot_set
    check(_labeled_set(tmp_path / "fine", [0, 2, 1], ["cat", "dog", "bird"]))
    with pytest.raises(ValueError, match=r"zeroshot .*names has no class names in its manifest: prepare it with "
                                         r"--label-key and --classnames"):
        check(_labeled_set(tmp_path / "names", [0, 1], None))
    with pytest.raises(ValueError, match=r"zeroshot .*some has 1 unlabeled rows"):
        check(_labeled_set(tmp_path / "some", [0, None, 1], ["cat", "dog"]))
    with pytest.raises(ValueError, match=r"zeroshot .*short has label 2 but only 2 class names were given"):
        check(_labeled_set(tmp_path / "short", [0, 2], ["cat", "dog"]))

    # the model's lock groups, counted from its config (the towers built without memory)
    config = TrainConfig(data=["train"], steps=20, model="ViT-B-32", lock_image=True, lock_image_unlocked_layers=15,
                         lock_text=True, lock_text_unlocked_layers=14)
    with pytest.raises(ValueError, match=r"cannot leave 15 layer groups of the image tower unlocked: it has 14"):
        train_module.check_model(config, train_module.scratch_config(config), "ViT-B-32")
    config = config.model_copy(update={"lock_image_unlocked_layers": 14})
    train_module.check_model(config, train_module.scratch_config(config), "ViT-B-32")
    with pytest.raises(ValueError, match="patch dropout needs a Vision Transformer; RN50 has a ResNet"):
        train_module.check_model(TrainConfig(data=["train"], steps=20, patch_dropout=0.5),
                                 clip_core.get_config("RN50"), "--init rn50")
    # unlocked groups of a tower left unlocked: the whole tower would train
    with pytest.raises(ValueError, match="lock_text_unlocked_layers leaves the last groups of a locked text tower "
                                         "trainable: set lock_text too"):
        TrainConfig(data=["train"], steps=20, lock_text_unlocked_layers=2)
    # the training loss is no checkpoint metric: the last logged step's, missing before the first log
    with pytest.raises(ValueError, match=r"checkpoint_metric 'loss' is not a metric this run computes \(with val "
                                         r"set\): choose one of \['val_image_to_text_R1', 'val_loss'"):
        TrainConfig(data=["train"], steps=20, val="val", checkpoint_metric="loss")
