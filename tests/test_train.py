"""The train stage on a real local Ray (2 workers), real MLflow (sqlite) and a real S3 server."""

import collections
import itertools
import json
import random
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import boto3
import mlflow
import pytest
import ray.cloudpickle
import ray.data
import torch
import yaml

import clip_core
from clip_core.transforms import normalize, random_crop_box
from workflows.parallel import distribute, gathered_state, scalar
from workflows.preprocess import PreprocessOptions, preprocess, read_manifest, read_prepared_table
from workflows import cli, storage
from workflows.tracking import git_commit
from workflows.data_passes import checkpoint_pass, registered_checkpoint, resume_pass
from workflows.train import (TrainConfig, _RankZeroTracker, build_model, check_config, contrastive_step,
                             default_cpus_per_worker, init_image_size, init_source, latest_checkpoint,
                             lr_schedule, train)
from workflows.train_data import Augment, Position, batches
from workflows.train_rows import mixed_rows

from micro import hf_clip, micro_config

pytestmark = pytest.mark.usefixtures("ray_session")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers run this module's loop


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("prepared")
    quiet = lambda *_: None  # noqa: E731
    # 4 shards: each pass over the data reads them in its own order
    preprocess("synthetic://train?count=256&seed=0&image_size=64", str(root / "train"),
               PreprocessOptions(image_size=64, rows_per_shard=64), echo=quiet)
    preprocess("synthetic://heldout?count=48&seed=1&image_size=64", str(root / "heldout"),
               PreprocessOptions(image_size=64), echo=quiet)
    # a 64-wide, 2-layer CLIP at 64 px: the train stage's machinery without the compute
    (root / "micro.json").write_text(json.dumps(micro_config().to_dict()))
    return root


def _config(prepared, tmp_path, **overrides) -> TrainConfig:
    values = dict(data=[str(prepared / "train")], model=str(prepared / "micro.json"), steps=8, batch_size=32,
                  lr=1e-3, warmup_steps=2,
                  log_every=1, checkpoint_every=4, storage=str(tmp_path / "runs"), output=str(tmp_path / "final"),
                  shuffle_buffer=64, mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    values.update(overrides)
    return TrainConfig(**values)


def _lines_by_worker_process(prefixes: tuple[str, ...]) -> list[list[str]]:
    """The lines starting with one of `prefixes` that each Ray worker process of this session wrote
    (stdout and stderr together): what the log monitor forwards to the driver."""
    from pathlib import Path

    from ray._private.worker import _global_node

    found = []
    for out in Path(_global_node.get_logs_dir_path()).glob("worker-*.out"):
        text = out.read_text(errors="replace") + out.with_suffix(".err").read_text(errors="replace")
        found.append([line for line in text.splitlines() if line.startswith(prefixes)])
    return found


def _history(tmp_path, run_id, key="loss"):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _first_update_loop(config):
    """One optimizer step on a fixed global batch for each setup, split over the workers as the train
    stage splits it (one worker group for all setups: starting one costs more than the steps)."""
    import ray.train
    import ray.train.torch

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    generator = torch.Generator().manual_seed(123)
    images = torch.randn(config["global_batch"], 3, 64, 64, generator=generator)
    tokens = clip_core.get_tokenizer()([f"a photo of thing {i}" for i in range(config["global_batch"])])
    rows = slice(rank * config["global_batch"] // world, (rank + 1) * config["global_batch"] // world)
    grad_norms = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, setup in config["setups"].items():
            train_config = TrainConfig(**setup)
            torch.manual_seed(0)
            model = build_model(train_config)
            runnable = distribute(model, train_config.strategy, world, train_config.compile)
            # plain SGD: the update is the gradient itself (Adam's first step is ~sign(g), which turns
            # rounding noise on near-zero gradients into full-size differences)
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            optimizer.zero_grad()
            contrastive_step(runnable, clip_core.ClipLoss(), images[rows], tokens[rows], train_config.accum_freq,
                             torch.autocast("cpu", enabled=False))
            grad_norms[name] = scalar(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
            optimizer.step()
            weights, _ = gathered_state(model, optimizer)  # every worker: FSDP gathers the shards
            if rank == 0:
                clip_core.save_checkpoint(model, f"{directory}/{name}", weights=weights)
        ray.train.report({"rank": rank, **grad_norms},
                         checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)


def _first_update_in_process(prepared, tmp_path):
    """The reference: one process, the whole batch, no Ray."""
    train_config = _config(prepared, tmp_path, batch_size=16)
    torch.manual_seed(0)
    model = build_model(train_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    images = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(123))
    tokens = clip_core.get_tokenizer()([f"a photo of thing {i}" for i in range(16)])
    contrastive_step(model, clip_core.ClipLoss(), images, tokens, 1, torch.autocast("cpu", enabled=False))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    optimizer.step()
    return model.state_dict(), grad_norm


def test_two_workers_and_accumulation_give_the_single_big_batch_update(prepared, tmp_path):
    from pathlib import Path

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    reference, reference_norm = _first_update_in_process(prepared, tmp_path)
    # FSDP shards every block; logit_scale (0-dim) stays whole and its gradient is averaged by hand;
    # torch.compile (inductor) runs DDP's model as one compiled graph per bucket
    setups = {f"accum{accum_freq}-{strategy}{'-compiled' if compiled else ''}":
              _config(prepared, tmp_path, workers=2, accum_freq=accum_freq, batch_size=16, strategy=strategy,
                      compile=compiled).model_dump(mode="json")
              for accum_freq, strategy, compiled in ((1, "ddp", False), (2, "ddp", False), (2, "fsdp", False),
                                                     (1, "ddp", True))}
    trainer = TorchTrainer(_first_update_loop, train_loop_config={"setups": setups, "global_batch": 16},
                           scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name="first-update", storage_path=str(tmp_path / "first-update")))
    result = trainer.fit()
    for name in setups:
        update = clip_core.load_model(Path(result.checkpoint.path) / name).state_dict()
        setup = f"2 workers, {name}"
        assert result.metrics[name] == pytest.approx(reference_norm, rel=1e-5), setup
        assert update.keys() == reference.keys(), setup
        for key, value in reference.items():
            difference = (update[key] - value).abs().max().item()
            assert difference < 1e-5, f"{key} differs by {difference:.2e} with {setup}"


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_accumulation_gradient_equals_the_big_batch_gradient(patch_dropout):
    torch.manual_seed(0)
    model = clip_core.create_model("tiny")
    images = torch.randn(12, 3, 64, 64)
    tokens = clip_core.get_tokenizer()([f"caption {i} of a shape" for i in range(12)])
    keep = model.sample_patches(12, patch_dropout, torch.Generator().manual_seed(0)) if patch_dropout else None
    grads = {}
    for accum_freq in (1, 3):
        model.zero_grad()
        contrastive_step(model, clip_core.ClipLoss(), images, tokens, accum_freq, torch.autocast("cpu", enabled=False),
                         keep)
        grads[accum_freq] = {k: p.grad.clone() for k, p in model.named_parameters()}
    for key, grad in grads[1].items():
        torch.testing.assert_close(grads[3][key], grad, atol=1e-6, rtol=1e-4, msg=key)


def test_a_restart_before_the_first_checkpoint_logs_to_the_same_mlflow_run_and_a_failed_run_ends_failed(
        prepared, tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def runs() -> list:
        return client.search_runs([e.experiment_id for e in client.search_experiments()])

    # killed at step 2 of 4, before the step-4 checkpoint that would carry the run's id: the restart finds it
    marker = tmp_path / "killed"
    config = _config(prepared, tmp_path, workers=1, steps=4, checkpoint_every=4, max_failures=1,
                     fault_injection={"rank": 0, "step": 2, "marker": str(marker)})
    result = train(config, echo=lambda *_: None)
    assert marker.read_text().startswith("killed rank 0 at step 2") and result.metrics["step"] == 4
    assert [(run.info.run_id, run.info.status) for run in runs()] == [(result.mlflow_run_id, "FINISHED")]
    steps = [metric.step for metric in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4] and steps.count(1) == 2, steps  # step 1 ran again after the restart

    # no restart left: the run ends FAILED, not RUNNING for ever
    marker.unlink()
    with pytest.raises(Exception, match="(?i)worker|died|fail"):
        train(config.model_copy(update={"max_failures": 0, "run_name": "doomed"}), echo=lambda *_: None)
    (failed,) = [run for run in runs() if run.info.run_id != result.mlflow_run_id]
    assert failed.info.status == "FAILED"
    # nor does a resumed run (it reopens its checkpoint's MLflow run) that fails
    marker.unlink()
    resumed = config.model_copy(update={"max_failures": 0, "steps": 8, "resume": "latest",
                                        "fault_injection": {"rank": 0, "step": 6, "marker": str(marker)}})
    with pytest.raises(Exception, match="(?i)worker|died|fail"):
        train(resumed, echo=lambda *_: None)
    assert client.get_run(result.mlflow_run_id).info.status == "FAILED" and len(runs()) == 2


def test_two_workers_train_log_to_mlflow_and_resume_from_the_s3_checkpoint_when_a_worker_is_killed(
        prepared, tmp_path, s3_bucket):
    marker = tmp_path / "killed"
    # max_failures=2: one spare restart, because a 2-core CI machine has (rarely) lost a second worker right
    # after the injected kill; the assertions below hold however many restarts it took
    # 8 steps per pass over the data: the restart resumes from step 9, in the second pass
    config = _config(prepared, tmp_path, workers=2, steps=12, checkpoint_every=9, max_failures=2,
                     storage=f"s3://{s3_bucket}/runs", output=f"s3://{s3_bucket}/final",
                     val=str(prepared / "heldout"), zeroshot=str(prepared / "heldout"), checkpoint_metric="val_loss",
                     val_every=5, fault_injection={"rank": 1, "step": 11, "marker": str(marker)})
    result = train(config, echo=lambda *_: None)

    assert marker.read_text().startswith("killed rank 1 at step 11")
    assert result.metrics["step"] == 12
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any(k.startswith("runs/") and k.endswith("checkpoint_00000012/train_state.pt") for k in keys), keys
    assert "final/model.safetensors" in keys
    checkpoints = {k.split("/")[2] for k in keys if k.startswith("runs/") and "/checkpoint_0" in k}
    assert checkpoints and len(checkpoints) <= config.num_to_keep and "checkpoint_00000012" in checkpoints, keys
    final = storage.download(result.checkpoint, str(tmp_path))
    model = clip_core.load_model(final)
    assert model.config.name == "micro" and model.config.vision.width == 64
    # the registry finds the train run (lineage) from the checkpoint itself
    description = json.loads((tmp_path / "final" / "config.json").read_text())
    assert description["train"]["mlflow_run_id"] == result.mlflow_run_id and description["train"]["step"] == 12
    assert description["train"]["config"]["data_digests"] == [read_manifest(str(prepared / "train"))["digest"]]
    assert description["train"]["config"]["global_shuffle"] is True, "the default resolved for this small set"

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = {}
    for metric in client.get_metric_history(result.mlflow_run_id, "loss"):
        history.setdefault(metric.step, []).append(metric.value)
    # one MLflow run through the restart; step 10 ran before the kill and again after resuming from the
    # step-9 checkpoint (not from scratch: step 9 ran fewer times), on the same data (that pass's shard
    # order) with the same result
    assert sorted(history) == list(range(1, 13))
    assert len(history[10]) >= 2 and len(history[9]) < len(history[10]), history
    for step, losses in history.items():
        assert losses == pytest.approx([losses[0]] * len(losses), abs=1e-5), (step, losses)
    assert sum(history[s][0] for s in (10, 11, 12)) / 3 < sum(history[s][0] for s in (1, 2, 3)) / 3 - 0.2, history
    # each step logs the learning rate its update used (the schedule's value at that step, from 1/warmup up)
    factor = lr_schedule(config)
    lr = _history(tmp_path, result.mlflow_run_id, "lr")
    assert lr == pytest.approx({step: config.lr * factor(step - 1) for step in range(1, 13)}), lr
    # rank 0 prints each step's progress and each validation once: the driver shows them once
    printed = _lines_by_worker_process(("step ", "validation at step "))
    assert any(any("/12  loss" in x for x in lines) for lines in printed), printed
    assert any(any(x.startswith("validation at step ") for x in lines) for lines in printed), printed
    assert all(len(lines) == len(set(lines)) for lines in printed), [lines for lines in printed if lines]

    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["model"].endswith("micro.json") and run.data.params["workers"] == "2"
    for key in ("lr", "logit_scale", "samples_per_s", "samples_per_s_per_worker", "data_wait_fraction",
                "grad_norm", "val_loss", "val_image_to_text_R1", "zeroshot_top1"):
        assert key in run.data.metrics, key
    assert {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs} == {
        (name, read_manifest(str(prepared / name))["digest"].removeprefix("sha256:")[:36])
        for name in ("train", "heldout")}
    assert (run.data.tags["rayclip.version"], run.data.tags["git_commit"]) == (version("rayclip"), git_commit() or "")
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/train_state.pt"} <= artifacts
    # the best checkpoint is the kept one with the lowest val_loss (Ray lists its best checkpoints best last)
    val_loss = {int(m.step): m.value for m in client.get_metric_history(result.mlflow_run_id, "val_loss")}
    kept_steps = [int(name.removeprefix("checkpoint_")) for name in checkpoints]
    best = client.download_artifacts(result.mlflow_run_id, "best_checkpoint/config.json", str(tmp_path))
    assert json.loads(Path(best).read_text())["train"]["step"] == min(kept_steps, key=val_loss.__getitem__), (
        val_loss, kept_steps)


def test_workers_on_a_node_share_one_download_of_a_remote_checkpoint_never_repeated_under_a_reader(
        tmp_path, s3_bucket, monkeypatch):
    """Workers restarted on one node all read the same checkpoint. With Ray's shared download, a worker that
    came later downloaded again over the files another was reading (a torn train_state.pt, a segfault in
    the memory-mapped weights; seen on resume from S3 on 2 cores)."""
    from pathlib import Path

    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), tmp_path / "ckpt")
    written = {file.name: file.read_bytes() for file in (tmp_path / "ckpt").iterdir()}
    uri = f"s3://{s3_bucket}/runs/checkpoint_00000009"
    for name in written:
        storage.copy(str(tmp_path / "ckpt" / name), f"{uri}/{name}")

    def files(directory):
        return {file.name: file.read_bytes() for file in Path(directory).iterdir()}

    with storage.local_copy(uri) as first:
        assert Path(first).name == "checkpoint_00000009" and files(first) == written
        with monkeypatch.context() as patch:  # a second download would write over the first's files
            patch.setattr(storage, "download", lambda *_: pytest.fail("downloaded again under a reader"))
            with storage.local_copy(uri) as second:
                assert second == first and files(second) == written
        assert files(first) == written  # the second reader leaving deletes nothing under the first
    assert not Path(first).exists()
    # a single file too; a local path is read where it is, and stays
    storage.copy(str(tmp_path / "ckpt" / "model.safetensors"), f"s3://{s3_bucket}/weights/bare.safetensors")
    with storage.local_copy(f"s3://{s3_bucket}/weights/bare.safetensors") as local:
        assert Path(local).name == "bare.safetensors" and Path(local).read_bytes() == written["model.safetensors"]
    assert not Path(local).exists()
    with storage.local_copy(str(tmp_path / "ckpt")) as directory:
        assert directory == str(tmp_path / "ckpt")
    assert files(tmp_path / "ckpt") == written


@pytest.mark.parametrize("global_shuffle", [True, False])
def test_data_weights_mix_the_datasets_by_weight_not_by_size(prepared, tmp_path, global_shuffle):
    heldout_tokens = read_prepared_table(str(prepared / "heldout"), ["tokens"])["tokens"].to_pylist()
    heldout = {tuple(tokens) for tokens in heldout_tokens}
    config = _config(prepared, tmp_path, data=[str(prepared / "train"), str(prepared / "heldout")], data_weights=[1, 3],
                     global_shuffle=global_shuffle)
    rows = mixed_rows(config, [read_manifest(uri) for uri in config.data]).select_columns(["tokens"]).take_all()
    from_heldout = sum(tuple(row["tokens"]) in heldout for row in rows)
    # an epoch keeps the datasets' total size (256 + 48 rows), three quarters of it from the second (by
    # size it would be 16%): exactly when the pass's rows are drawn by index, about with Ray Data's
    # random_sample while streaming
    if global_shuffle:
        assert (len(rows), from_heldout) == (304, 228)
    else:
        assert len(rows) == pytest.approx(304, abs=25)
        assert from_heldout / len(rows) == pytest.approx(0.75, abs=0.06)


def test_a_global_shuffle_refuses_rows_that_changed_or_do_not_fit_before_any_worker_starts(prepared, tmp_path):
    config = _config(prepared, tmp_path, global_shuffle=True)
    manifest = read_manifest(str(prepared / "train"))
    grown = {**manifest, "counts": {**manifest["counts"], "kept": manifest["counts"]["kept"] + 1}}
    with pytest.raises(ValueError, match=r"holds 256 rows where its manifest lists 257.*prepare it again"):
        mixed_rows(config, [grown])
    huge = {**manifest, "shards": [{**shard, "bytes": 2**50} for shard in manifest["shards"]]}
    with pytest.raises(ValueError, match=r"object store.*set global_shuffle: false"):
        mixed_rows(config, [huge])


def test_each_pass_shuffles_every_row_afresh_and_a_resumed_pass_reads_its_order_again(prepared, tmp_path):
    shard_rows = [shard["rows"] for shard in read_manifest(str(prepared / "train"))["shards"]]
    stored = read_prepared_table(str(prepared / "train"), ["key"])["key"].to_pylist()
    shard_of = {key: index for index, rows in enumerate(shard_rows) for key in stored[sum(shard_rows[:index]):][:rows]}

    def passes(config, count, start=0):
        dataset = mixed_rows(config, [read_manifest(str(prepared / "train"))]).select_columns(["key"])
        dataset.context.execution_options.preserve_order = True  # as the train stage reads it
        dataset.context._execution_idx = start  # as PassDataConfig sets it for a resumed run
        return [[row["key"] for row in dataset.iter_rows()] for _ in range(count)]

    def same_shard_neighbours(order):
        return sum(shard_of[a] == shard_of[b] for a, b in zip(order, order[1:])) / (len(order) - 1)

    config = _config(prepared, tmp_path)  # 256 rows in 4 shards: small enough to shuffle whole by default
    orders = passes(config, 3)
    assert all(sorted(order) == sorted(stored) for order in orders), "a pass reads every row once"
    assert len({tuple(order) for order in orders}) == 3, "every pass has its own order"
    # rows, not just shards, are mixed: about a quarter of neighbours share a shard (4 equal shards)
    assert max(same_shard_neighbours(order) for order in orders) < 0.45
    assert passes(config, 1, start=2)[0] == orders[2], "a resumed pass reads its rows in the same order"
    # as a worker reads it: its split of the dataset (run by Ray Data's split coordinator), pass after pass
    (split,) = mixed_rows(config, [read_manifest(str(prepared / "train"))]).select_columns(["key"]).streaming_split(1)
    assert [[row["key"] for row in split.iter_rows()] for _ in range(2)] == orders[:2]
    assert passes(config.model_copy(update={"seed": 1}), 1)[0] != orders[0]

    streaming = passes(config.model_copy(update={"global_shuffle": False}), 2)
    assert all(sorted(order) == sorted(stored) for order in streaming)
    # without it a pass reshuffles the shard order only (the shuffle buffer mixes them while batching)
    assert min(same_shard_neighbours(order) for order in streaming) > 0.95


def test_globally_shuffled_rows_are_batched_in_their_order_and_streamed_rows_through_the_buffer():
    rows = ray.data.range(96, override_num_blocks=3)
    rows.context.execution_options.preserve_order = True  # as the train stage reads it

    def first_pass(global_shuffle: bool) -> list[int]:
        config = TrainConfig(data=["unread"], steps=1, batch_size=32, shuffle_buffer=64, global_shuffle=global_shuffle)
        taken = itertools.islice(batches(rows, config, Position(), 32, "cpu", rank=0), 3)
        return [int(i) for batch, _ in taken for i in batch["id"]]

    # the pass's rows arrive shuffled already: a shuffle buffer on top would only delay the first batch
    assert first_pass(global_shuffle=True) == list(range(96))
    streamed = first_pass(global_shuffle=False)
    assert sorted(streamed) == list(range(96)) and streamed != list(range(96))


def test_fsdp_workers_validate_save_whole_weights_and_resume_by_hand_exactly(prepared, tmp_path):
    # sample-based epochs of 2 batches; a pass over the 256 rows is 8 steps: the checkpoint at step 10
    # is mid-epoch (epoch 4, batch 1) in the second pass (batch 2)
    # with patch dropout, whose draws the resumed run must repeat too, and tuning on whole images at the end
    config = _config(prepared, tmp_path / "a", workers=2, strategy="fsdp", steps=12, checkpoint_every=10,
                     num_to_keep=3, train_num_samples=64, val=str(prepared / "heldout"),
                     zeroshot=str(prepared / "heldout"), patch_dropout=0.5, unmasked_tuning_steps=1)
    full = train(config, echo=lambda *_: None)
    assert full.metrics["step"] == 12 and 0 <= full.metrics["zeroshot_top1"] <= 1 and full.metrics["val_loss"] > 0
    assert full.metrics["epoch"] == 5  # steps 11 and 12 are the sixth 64-sample epoch
    losses = _history(tmp_path / "a", full.mlflow_run_id)
    assert sorted(losses) == list(range(1, 13))
    assert _history(tmp_path / "a", full.mlflow_run_id, "patch_dropout") == {**{s: 0.5 for s in range(1, 12)}, 12: 0}
    # the checkpoint holds the whole model (not one worker's shards) and loads anywhere
    final = clip_core.load_model(full.checkpoint)
    reference = build_model(config)
    shapes = {key: value.shape for key, value in reference.state_dict().items()}
    assert {key: value.shape for key, value in final.state_dict().items()} == shapes

    # sample-based epochs do not restart the data: the stream ran on into its second pass
    midway = next((tmp_path / "a" / "runs").glob("*/checkpoint_00000010"))
    assert checkpoint_pass(str(midway)) == 1
    # resuming by hand from step 10 (sharded optimizer state restored from the whole one, the data
    # stream mid-pass, in that pass's shard order) retraces steps 11 and 12; through the command line
    # in this process and Ray
    from_flags = {"patch_dropout", "unmasked_tuning_steps"}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude=from_flags)))
    exit_code = cli.main(["train", "--config", str(tmp_path / "train.yaml"), "--storage", str(tmp_path / "b" / "runs"),
                          "--output", str(tmp_path / "b" / "final"), "--patch-dropout", "0.5",
                          "--unmasked-tuning-steps", "1",
                          "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}",
                          "--resume", str(midway)])
    assert exit_code == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    resumed_run = client.search_runs([client.get_experiment_by_name("rayclip").experiment_id])[0]
    resumed_losses = _history(tmp_path / "b", resumed_run.info.run_id)
    assert sorted(resumed_losses) == [11, 12]
    assert _history(tmp_path / "b", resumed_run.info.run_id, "patch_dropout") == {11: 0.5, 12: 0}
    for step in (11, 12):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-5)
    again = clip_core.load_model(tmp_path / "b" / "final").state_dict()
    for key, value in final.state_dict().items():
        torch.testing.assert_close(again[key], value, atol=1e-5, rtol=1e-4, msg=key)

    # resumed where it already ended (a job stopped after its last checkpoint, before copying it out):
    # nothing left to train, and that checkpoint is the result
    done = train(config.model_copy(update={"storage": str(tmp_path / "b" / "runs"), "output": str(tmp_path / "c"),
                                           "resume": "latest"}), echo=lambda *_: None)
    assert done.metrics["step"] == 12 and done.checkpoint == str(tmp_path / "c")
    assert done.mlflow_run_id == resumed_run.info.run_id
    assert clip_core.checkpoint.file_sha256(tmp_path / "c" / "model.safetensors") == \
        clip_core.checkpoint.file_sha256(tmp_path / "b" / "final" / "model.safetensors")

    # a restarted worker group reads the shard order of the checkpoint Ray hands its workers: the latest
    # registered one (step 12, in the second pass over 256 rows), not a newer directory a worker uploaded
    # before dying in report()
    run_dir = midway.parent
    unregistered = run_dir / "checkpoint_00000014"
    shutil.copytree(run_dir / "checkpoint_00000012", unregistered)
    description = json.loads((unregistered / "config.json").read_text())
    description["train"]["data_pass"] = 5
    (unregistered / "config.json").write_text(json.dumps(description))
    assert registered_checkpoint(str(run_dir)) == str(run_dir / "checkpoint_00000012")
    assert latest_checkpoint(str(run_dir.parent)) == str(run_dir / "checkpoint_00000012")  # --resume latest too
    assert resume_pass(str(run_dir), None) == 1
    no_run = str(tmp_path / "no-run")
    assert resume_pass(no_run, str(unregistered)) == 5 and resume_pass(no_run, None) == 0


def test_init_loads_pretrained_weights_from_s3(prepared, tmp_path, s3_bucket, monkeypatch):
    torch.manual_seed(1)
    pretrained = clip_core.CLIP(micro_config())
    clip_core.save_checkpoint(pretrained, tmp_path / "pretrained")
    for file in (tmp_path / "pretrained").iterdir():
        storage.copy(str(file), f"s3://{s3_bucket}/weights/pretrained/{file.name}")
    config = _config(prepared, tmp_path, init=f"s3://{s3_bucket}/weights/pretrained", cpus_per_worker=1)
    manifests = [read_manifest(uri) for uri in config.data]
    check_config(config, manifests)
    built = build_model(config)
    assert all(torch.equal(built.state_dict()[key], value) for key, value in pretrained.state_dict().items())
    # the driver learns the resolution from the checkpoint's config alone: the weights are the workers' to fetch
    downloads, download = [], storage.download
    monkeypatch.setattr(storage, "download", lambda uri, *rest: downloads.append(uri) or download(uri, *rest))
    assert init_image_size(config) == 64 and not downloads
    # a bare weights file has no config to read: the driver builds the model to see
    from safetensors.torch import save_file

    save_file(pretrained.state_dict(), tmp_path / "bare.safetensors")
    storage.copy(str(tmp_path / "bare.safetensors"), f"s3://{s3_bucket}/weights/bare.safetensors")
    assert init_image_size(_config(prepared, tmp_path, init=f"s3://{s3_bucket}/weights/bare.safetensors")) == 64
    assert downloads == [f"s3://{s3_bucket}/weights/bare.safetensors"]
    # a Hugging Face CLIPModel directory states its resolution in its config too
    hf_clip().save_pretrained(tmp_path / "hf")
    for file in (tmp_path / "hf").iterdir():
        storage.copy(str(file), f"s3://{s3_bucket}/weights/hf/{file.name}")
    hf_config = _config(prepared, tmp_path, init=f"s3://{s3_bucket}/weights/hf")
    assert init_image_size(hf_config) == 64 and len(downloads) == 1
    assert build_model(hf_config).config.vision.heads == 3
    # --[no-]quick-gelu: instead of the preset's activation (OpenCLIP's --force-quick-gelu), or over what
    # the weights imply (this directory's hidden_act: QuickGELU)
    assert build_model(hf_config).config.quick_gelu
    assert not build_model(hf_config.model_copy(update={"quick_gelu": False})).config.quick_gelu
    assert not build_model(_config(prepared, tmp_path)).config.quick_gelu
    assert build_model(_config(prepared, tmp_path, quick_gelu=True)).config.quick_gelu
    assert init_source(f"openai:s3://{s3_bucket}/ViT-B-32.pt") == ("openai", f"s3://{s3_bucket}/ViT-B-32.pt")
    with pytest.raises(FileNotFoundError, match=rf"no pretrained weights at s3://{s3_bucket}/ViT-B-32.pt"):
        check_config(_config(prepared, tmp_path, init=f"openai:s3://{s3_bucket}/ViT-B-32.pt", cpus_per_worker=1),
                     manifests)


def test_a_sigmoid_loss_model_starts_at_siglips_temperature_and_bias_and_a_softmax_one_at_clips():
    from workflows.train import build_model

    for loss, scale, bias in (("siglip", 10.0, -10.0), ("clip", 1 / 0.07, None)):
        model = build_model(TrainConfig(data=["unread"], steps=1, model="tiny", loss=loss))
        assert float(model.logit_scale.detach().exp()) == pytest.approx(scale)
        assert (None if model.logit_bias is None else float(model.logit_bias)) == bias


def test_the_train_crop_resamples_bicubic_within_the_pixel_range():
    # with the crop fixed to the whole image, the augmentation is a plain resize: OpenCLIP's bicubic one
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=generator)
    images[:, :, :8] = 0  # a sharp edge, where the bicubic kernel overshoots
    images[:, :, 8:] = 255
    augment = Augment(32, train=True, generator=generator, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    pixels = images.permute(0, 3, 1, 2).float() / 255
    resized = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bicubic", align_corners=False)
    assert resized.max() > 1 and resized.min() < 0
    torch.testing.assert_close(augment(images), normalize(resized.clamp(0, 1)), atol=1e-4, rtol=0)


def test_the_batched_train_crop_draws_the_crops_of_torchvisions_random_resized_crop():
    # OpenCLIP's RandomResizedCrop(scale=(0.9, 1)) keeps the first of ten (area, aspect) draws whose rounded
    # size fits the image, else the whole image, at a whole-pixel offset. The train stage draws a batch's
    # crops at once; at a training size (64 px, where a pixel is 1.6% of the side) the sizes and offsets
    # must follow the same law as clip_core's PIL crop, pixel for pixel, not a continuous one like it.
    n, side = 20000, 64
    width, height, cx, cy = Augment(side, train=True, generator=torch.Generator().manual_seed(0)).crop_boxes(n, side)
    w, h = width.double() * side, height.double() * side
    left, top = (cx.double() + 1) * side / 2 - w / 2, (cy.double() + 1) * side / 2 - h / 2
    for pixels in (w, h, left, top):
        torch.testing.assert_close(pixels, pixels.round(), atol=1e-4, rtol=0, msg="whole pixels")
    assert (w * h >= 0.9 * side * side - side).all() and (w <= side).all() and (h <= side).all()
    assert (left >= -1e-4).all() and (left + w <= side + 1e-4).all(), "inside the image"
    assert (top >= -1e-4).all() and (top + h <= side + 1e-4).all(), "inside the image"
    rng = random.Random(0)
    ref = torch.tensor([random_crop_box(side, side, rng) for _ in range(n)], dtype=torch.float64)
    ref_left, ref_top, ref_w, ref_h = ref.unbind(1)

    def frequencies(a, b):
        return collections.Counter(zip(a.round().long().tolist(), b.round().long().tolist()))

    ours, theirs = frequencies(w, h), frequencies(ref_w, ref_h)
    for size in set(ours) | set(theirs):
        assert abs(ours[size] - theirs[size]) / n < 0.01, (size, ours[size], theirs[size])
    # how far the crop's content moves off the image's centre, the augmentation's strength
    shift = ((left + w / 2 - side / 2).abs() + (top + h / 2 - side / 2).abs()).mean()
    ref_shift = ((ref_left + ref_w / 2 - side / 2).abs() + (ref_top + ref_h / 2 - side / 2).abs()).mean()
    assert abs(shift - ref_shift) < 0.03 * ref_shift, (shift, ref_shift)


def test_bad_configs_fail_before_any_worker_starts(prepared, tmp_path):
    with pytest.raises(ValueError, match="greater than 0"):
        _config(prepared, tmp_path, workers=0)
    with pytest.raises(ValueError, match="greater than 0"):
        _config(prepared, tmp_path, num_workers=0)  # Ray's ScalingConfig spelling
    assert _config(prepared, tmp_path, num_workers=2).workers == 2
    with pytest.raises(ValueError, match=r"batch_size 30 must divide evenly into workers \(4\) x accum_freq \(2\)"):
        _config(prepared, tmp_path, workers=4, accum_freq=2, batch_size=30)
    with pytest.raises(FileNotFoundError, match="no prepared dataset at .*nowhere"):
        train(_config(prepared, tmp_path, data=[str(tmp_path / "nowhere")]), echo=lambda *_: None)
    with pytest.raises(ValueError, match=r"the training data has 256 rows, fewer than one global batch \(512\)"):
        train(_config(prepared, tmp_path, batch_size=512), echo=lambda *_: None)
    with pytest.raises(ValueError, match="needs 1 GPU"):
        train(_config(prepared, tmp_path, use_gpu=True), echo=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="no pretrained weights at"):
        train(_config(prepared, tmp_path, init=f"openai:{tmp_path / 'ViT-B-32.pt'}"), echo=lambda *_: None)
    with pytest.raises(ValueError, match="patch dropout needs a Vision Transformer; RN50 has a ResNet"):
        train(_config(prepared, tmp_path, model="RN50", patch_dropout=0.5), echo=lambda *_: None)
    resnet = tmp_path / "resnet.json"  # a model given as a config file, too
    resnet.write_text(json.dumps(clip_core.get_config("RN50").to_dict()))
    with pytest.raises(ValueError, match="patch dropout needs a Vision Transformer; RN50 has a ResNet"):
        train(_config(prepared, tmp_path, model=str(resnet), patch_dropout=0.5), echo=lambda *_: None)
    with pytest.raises(ValueError, match="unmasked_tuning_steps tunes on whole images after patch dropout: set "
                                         "patch_dropout too"):
        _config(prepared, tmp_path, unmasked_tuning_steps=2)
    with pytest.raises(ValueError, match=r"unmasked_tuning_steps \(8\) must be fewer than steps \(8\)"):
        _config(prepared, tmp_path, patch_dropout=0.5, unmasked_tuning_steps=8)
    # a metric the run never reports: Ray would score every checkpoint -inf and keep any
    with pytest.raises(ValueError, match=r"checkpoint_metric 'zeroshot_top1' is not a metric this run computes "
                                         r"\(with val set\): choose one of \['val_image_to_text_R1'"):
        _config(prepared, tmp_path, val=str(prepared / "heldout"), checkpoint_metric="zeroshot_top1")
    assert not (tmp_path / "runs").exists()



def test_train_flags_override_the_config_file_which_overrides_the_environment(tmp_path, monkeypatch):
    from workflows import cli

    (tmp_path / "train.yaml").write_text("data: [prepared]\nsteps: 9\nmlflow_tracking_uri: http://file:5000\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")

    def config(*flags):
        return cli._train_config(cli.build_parser().parse_args(["train", *flags]))

    assert config("--config", str(tmp_path / "train.yaml")).mlflow_tracking_uri == "http://file:5000"
    flagged = config("--config", str(tmp_path / "train.yaml"), "--mlflow-tracking-uri", "http://flag:5000",
                     "--steps", "3")
    assert (flagged.mlflow_tracking_uri, flagged.steps) == ("http://flag:5000", 3)
    assert config("--data", "prepared").mlflow_tracking_uri == "sqlite:///env.db"
    assert config("--data", "prepared", "--run-name", "b16-laion").run_name == "b16-laion"  # OpenCLIP's --name

    # OpenCLIP's flag names for the recipe, LiT, SigLIP and logging; --set for any other option, under flags
    openclip = config("--data", "prepared", "--warmup", "50", "--wd", "0.1", "--lock-image",
                      "--lock-image-unlocked-groups", "2", "--lock-text", "--lock-text-unlocked-layers", "1",
                      "--siglip", "--grad-checkpointing", "--torchcompile", "--log-every-n-steps", "5",
                      "--train-num-samples", "1000", "--grad-clip-norm", "2", "--beta2", "0.95", "--gpu",
                      "--set", "shuffle_buffer=64", "--set", "train.seed=3", "--set", "steps=70", "--steps", "80",
                      "--lr-scheduler", "const-cooldown", "--cooldown-steps", "20", "--lr-cooldown-end", "1e-5",
                      "--aug-scale", "0.5", "1")
    assert openclip.model_dump(include={
        "warmup_steps", "weight_decay", "lock_image", "lock_image_unlocked_layers", "lock_text",
        "lock_text_unlocked_layers", "loss", "grad_checkpointing", "compile", "log_every", "train_num_samples",
        "grad_clip_norm", "beta2", "use_gpu", "shuffle_buffer", "seed", "steps", "lr_scheduler", "cooldown_steps",
        "lr_cooldown_end", "aug_scale"}) == {
        "warmup_steps": 50, "weight_decay": 0.1, "lock_image": True, "lock_image_unlocked_layers": 2,
        "lock_text": True, "lock_text_unlocked_layers": 1, "loss": "siglip", "grad_checkpointing": True,
        "compile": True, "log_every": 5, "train_num_samples": 1000, "grad_clip_norm": 2.0, "beta2": 0.95,
        "use_gpu": True, "shuffle_buffer": 64, "seed": 3, "steps": 80, "lr_scheduler": "const-cooldown",
        "cooldown_steps": 20, "lr_cooldown_end": 1e-5, "aug_scale": (0.5, 1.0)}
    with pytest.raises(ValueError, match=r"aug_scale \(0.9, 0.5\): give \(low, high\) with 0 < low <= high <= 1"):
        config("--data", "prepared", "--aug-scale", "0.9", "0.5")
    # a train config's storage is a path, not the pipeline's storage section
    (tmp_path / "stored.yaml").write_text("data: [prepared]\nstorage: /tmp/runs\n")
    assert config("--config", str(tmp_path / "stored.yaml"), "--set", "steps=5").storage == "/tmp/runs"
    assert config("--data", "prepared", "--set", "storage=/tmp/other").storage == "/tmp/other"
    nested = config("--data", "prepared", "--set", "fault_injection.step=3", "--set", "fault_injection.marker=m")
    assert (nested.fault_injection.step, nested.fault_injection.marker) == (3, "m")
    plain = config("--data", "prepared")
    assert (plain.lock_image, plain.compile, plain.loss, plain.use_gpu) == (False, False, "clip", False)
    with pytest.raises(ValueError, match=r"--set 'shufle_buffer=1': 'shufle_buffer' is not a train option; the "
                                         r"options are data, data_weights, "):
        config("--data", "prepared", "--set", "shufle_buffer=1")


def test_checkpoint_pass_comes_from_config_json_or_an_older_checkpoints_epoch(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    for directory, train_section, state in ((new, {"step": 10, "data_pass": 1}, {"data_pass": 1, "batch_in_pass": 2}),
                                            (old, {"step": 30}, {"epoch": 3, "batch_in_epoch": 6})):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"train": train_section}))
        torch.save({"step": train_section["step"], **state}, directory / "train_state.pt")
    assert checkpoint_pass(str(new)) == 1
    assert checkpoint_pass(str(old)) == 3  # before passes, each epoch was one run of the dataset


def test_local_default_cpus_per_worker_always_leaves_ray_data_a_cpu(ray_session):
    import ray

    # all logical CPUs taken by workers = Ray Data's decoding tasks never scheduled = a run that hangs
    logical = ray.cluster_resources()["CPU"]
    for workers in (1, 2, 3, 4, 8):
        assert workers * default_cpus_per_worker(workers) <= logical - 1, workers
        # a GPU worker takes one CPU: the others decode and augment its batches
        assert default_cpus_per_worker(workers, use_gpu=True) == 1.0, workers


def test_a_local_ray_keeps_more_worker_processes_than_logical_cpus(ray_session):
    from ray._private.worker import _global_node

    from workflows.runtime import IDLE_WORKERS_KEPT

    # with Ray's default limit (one per logical CPU) a fit's 8 actors leave every data task a fresh process
    assert IDLE_WORKERS_KEPT >= 16
    assert _global_node._ray_params._system_config["num_workers_soft_limit"] == IDLE_WORKERS_KEPT


def test_training_without_a_tracking_uri_never_imports_mlflow(tmp_path):
    """A run with MLflow off (no tracking URI) works where MLflow is not installed, and its workers skip
    the import (~3 s each): the tracker, and preprocess's dataset logging, import it only when used."""
    import os
    import subprocess

    code = """
import sys
from workflows.preprocess import _log_to_mlflow
from workflows.train import TrainConfig, _RankZeroTracker
tracker = _RankZeroTracker(TrainConfig(data=["prepared"], steps=4), None)
tracker.log_step(1, {"loss": 1.0, "lr": 0.1, "samples_per_s": 10.0, "data_wait_fraction": 0.0})
tracker.log_validation(1, {"val_loss": 1.0})
tracker.finish()
_log_to_mlflow({"digest": "sha256:0"}, "prepared")
assert "mlflow" not in sys.modules, "mlflow imported"
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1/4  loss 1.0000" in result.stdout + result.stderr


def test_rank_zero_opens_its_run_beside_the_loop_and_the_first_log_raises_what_failed(prepared, tmp_path):
    """Rank 0 opens its MLflow run in a thread while its data stream starts: the logging calls write to
    that run, and a run that could not be opened fails the first of them, naming why."""
    from workflows.tracking import using

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _config(prepared, tmp_path, steps=4, mlflow_tracking_uri=uri)
    step = {"loss": 1.5, "lr": 0.1, "samples_per_s": 10.0, "data_wait_fraction": 0.0}
    with using(uri):
        tracker = _RankZeroTracker(config, None)
        tracker.log_step(1, step)
        tracker.finish()
        run = mlflow.MlflowClient().get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 1.5 and run.data.params["steps"] == "4"
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["train"]
        assert mlflow.active_run() is None  # the run is named by id, never left active in the caller's thread

        broken = _RankZeroTracker(config.model_copy(update={"mlflow_tracking_uri": "bogus://nowhere"}), None)
        with pytest.raises(Exception, match="bogus://nowhere"):
            broken.log_step(1, step)
