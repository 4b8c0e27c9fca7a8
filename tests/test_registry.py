"""Evaluate, register, promote and roll back on a real local Ray, sqlite MLflow, and a real
`mlflow server` whose artifacts live on moto's S3 server."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

import clip_core
from workflows import cli, pipeline, registry, storage
from workflows import evaluate as evaluate_module
from workflows.evaluate import EvaluateConfig, evaluate, per_class_recall
from workflows.preprocess import PreprocessOptions, decode_batch, preprocess, read_manifest, read_prepared_table
from workflows.synthetic import samples
from workflows.tracking import using

from faulty_proxy import FaultyProxy
from micro import briefly_trained, hf_clip, micro_config
from ports import free_port

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def sets(tmp_path_factory, ray_session):
    """Two labeled sets of the held-out classes (probe train/test), and a micro checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    quiet = lambda *_: None  # noqa: E731
    for name, seed in (("heldout", 1), ("heldout2", 2)):
        preprocess(f"synthetic://heldout?count=64&seed={seed}&image_size=64", str(root / name),
                   PreprocessOptions(image_size=64), echo=quiet)
    clip_core.save_checkpoint(briefly_trained(), root / "ckpt", extra={"train": {
        "step": 5, "mlflow_run_id": None, "config": {"data": [str(root / "heldout2")], "git_commit": "0123abcd"}}})
    return root


def _in_process_metrics(checkpoint, uri, tie_tolerances=(0.0, 2e-6), zeroshot: bool = True) -> dict:
    """The reference: the same metrics computed in this process, without Ray; retrieval at each of
    `tie_tolerances` (two images of the synthetic set can score within ~1e-6 of each other, so where
    the stage's batches round differently, its default 1e-6 tolerance may count such a pair either way:
    its figures lie between those at 0 and 2e-6)."""
    model = clip_core.load_model(checkpoint)
    table = read_prepared_table(uri).to_pydict()
    rows = decode_batch(table, model.image_size)
    with torch.no_grad():
        image_features = model.encode_image(clip_core.transforms.normalize(torch.from_numpy(rows["image"])),
                                            normalize=True)
        text_features = model.encode_text(torch.from_numpy(rows["tokens"]), normalize=True)
    # rows of the same prepared image are one image with several captions
    distinct = {image: i for i, image in reversed(list(enumerate(table["image"])))}  # each image's first row
    first = sorted(distinct.values())
    text_to_image = torch.tensor([first.index(distinct[image]) for image in table["image"]])
    retrieval = [clip_core.retrieval_metrics(image_features[first], text_features, text_to_image,
                                             tie_tolerance=tolerance) for tolerance in tie_tolerances]
    if not zeroshot:
        return {"retrieval": retrieval}
    classnames = read_manifest(uri)["classnames"]
    classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), classnames)
    logits = clip_core.zeroshot.zero_shot_logits(image_features, classifier)
    labels, predicted = torch.from_numpy(rows["label"]), logits.argmax(dim=1)
    per_class = {name: float((predicted[labels == c] == c).float().mean()) for c, name in enumerate(classnames)
                 if (labels == c).any()}
    return {"zeroshot": {**clip_core.zeroshot.accuracy(logits, labels), "per_class_recall": per_class},
            "retrieval": retrieval}


def test_evaluate_matches_in_process_metrics_and_logs_to_mlflow(sets, tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = EvaluateConfig(model=str(sets / "ckpt"), zeroshot=str(sets / "heldout"), retrieval=str(sets / "heldout"),
                            linear_probe=(str(sets / "heldout2"), str(sets / "heldout")), batch_size=48,
                            output_json=str(tmp_path / "metrics.json"), mlflow_tracking_uri=tracking)
    metrics = evaluate(config, echo=lambda *_: None)

    # batches that cut across both sets, rows in any order: the in-process numbers
    expected = _in_process_metrics(sets / "ckpt", str(sets / "heldout"))
    for key in ("top1", "top5", "mean_per_class_recall", "per_class_recall"):
        assert metrics["zeroshot"][key] == pytest.approx(expected["zeroshot"][key], abs=1e-9)
    per_class = metrics["zeroshot"]["per_class_recall"]
    assert sum(per_class.values()) / len(per_class) == pytest.approx(metrics["zeroshot"]["mean_per_class_recall"])
    strict, loose = expected["retrieval"]
    for key in strict:
        low, high = sorted((strict[key], loose[key]))
        assert low - 1e-9 <= metrics["retrieval"][key.replace("R@", "R")] <= high + 1e-9, key
    assert metrics["zeroshot"]["digest"] == read_manifest(str(sets / "heldout"))["digest"]
    probes = [f"k{k}_top1" for k in (1, 2, 4, 8, 16)] + ["full_top1"]  # the paper's few-shot ladder by default
    assert set(metrics["linear_probe"]) >= {*probes, "digest", "train_digest", "setup_digest"}
    assert metrics["zeroshot"]["setup_digest"].startswith("sha256:")  # test_gate_compares_only_figures_of_the_same...
    described = json.loads((sets / "ckpt" / "config.json").read_text())
    assert metrics["model"]["weights_sha256"] == described["weights_sha256"]
    assert all(0 <= metrics["linear_probe"][key] <= 1 for key in probes)
    assert json.loads((tmp_path / "metrics.json").read_text())["zeroshot"] == metrics["zeroshot"]

    client = mlflow.MlflowClient(tracking)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["eval.zeroshot.top1"] == metrics["zeroshot"]["top1"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert artifacts == {"eval/metrics.json", "eval/confusion_matrix.png", "eval/retrieval_examples.png"}


def test_a_set_of_captions_without_labels_is_embedded_and_evaluated_for_retrieval(sets, tmp_path):
    import pyarrow.parquet as pq

    from corpus import clean_pairs, write_parquet

    pairs = clean_pairs(24)  # and 6 of the images again with other captions (COCO's layout: a row a caption)
    pairs += [(f"{key}-again", image, f"{caption}, said otherwise") for key, image, caption in pairs[:6]]
    write_parquet(tmp_path / "pairs.parquet", pairs)
    captions = str(tmp_path / "captions")
    preprocess(str(tmp_path / "pairs.parquet"), captions, PreprocessOptions(image_key="jpg", caption_key="txt",
                                                                            image_size=64), echo=lambda *_: None)
    # Ray hands a column of nulls to a batch as floats: NaN, not None
    assert cli.main(["embed", str(sets / "ckpt"), captions, str(tmp_path / "index"), "--batch-size", "10"]) == 0
    table = pq.read_table(tmp_path / "index" / "embeddings")
    assert table.num_rows == table["label"].null_count == table["metadata"].null_count == 30  # so are metadata
    # rows of one image share its id, and /v1/search's Index finds that image once, not once per caption
    ids = dict(zip(table["key"].to_pylist(), table["image_id"].to_pylist()))
    assert len(set(ids.values())) == 24 and all(ids[key] == ids[key.replace("-again", "")] for key in ids)
    from deploy.serve import Index

    index = Index({"model": str(sets / "ckpt"), "index": str(tmp_path / "index")})
    query = np.stack(table["image_embedding"].to_numpy(zero_copy_only=False))[:1]
    found = index.nearest("image", query, [30])[0]
    assert len(found) == 24 and len({ids[row["key"]] for row in found}) == 24
    assert found[0]["cosine"] == pytest.approx(1.0, abs=1e-5) and "-again" not in found[0]["key"]
    assert len(index.nearest("text", query, [30])[0]) == 30  # every caption is its own row to find
    metrics = evaluate(EvaluateConfig(model=str(sets / "ckpt"), retrieval=captions, batch_size=10),
                       echo=lambda *_: None)
    assert (metrics["retrieval"]["images"], metrics["retrieval"]["captions"]) == (24, 30)
    expected = _in_process_metrics(sets / "ckpt", captions, zeroshot=False)["retrieval"]
    for key in expected[0]:
        low, high = sorted(tolerance[key] for tolerance in expected)
        assert low - 1e-9 <= metrics["retrieval"][key.replace("R@", "R")] <= high + 1e-9, key


def test_evaluate_writes_its_json_only_once_mlflow_holds_its_metrics(sets, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = EvaluateConfig(model=str(sets / "ckpt"), retrieval=str(sets / "heldout"), batch_size=64,
                            output_json=str(tmp_path / "metrics.json"),
                            mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(MlflowException, match="127.0.0.1"):
        evaluate(config, echo=lambda *_: None)
    assert not (tmp_path / "metrics.json").exists()  # else a pipeline rerun skips it, and MLflow never gets them


def test_per_class_recall_keeps_every_class_apart_when_two_share_a_name():
    confusion = np.array([[3, 1, 0], [0, 0, 2], [0, 0, 0]])  # true x predicted; class 2 has no images
    assert per_class_recall(confusion, ["crane", "crane", "kite"]) == {"crane (0)": 0.75, "crane (1)": 0.0}
    assert per_class_recall(confusion, ["a", "b", "c"]) == {"a": 0.75, "b": 0.0}


def test_linear_probes_are_deterministic_and_use_k_examples_per_class():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=generator)
    def split(n):  # noqa: E306
        labels = torch.arange(n) % 5
        features = centers[labels] + 0.8 * torch.randn(n, 16, generator=generator)
        return {"image_features": features.numpy(), "label": labels.numpy()}
    train, test = split(100), split(50)
    first = evaluate_module.linear_probes(train, test, [1, 4, 16], seed=3)
    assert first == evaluate_module.linear_probes(train, test, [1, 4, 16], seed=3)
    assert set(first) == {"k1_top1", "k4_top1", "k16_top1", "full_top1"}
    assert first["k1_top1"] < first["full_top1"] and first["full_top1"] > 0.9  # separable classes, more data helps
    chosen = clip_core.zeroshot.few_shot_indices(torch.from_numpy(train["label"]), 4, seed=3)
    assert torch.bincount(torch.from_numpy(train["label"])[chosen]).tolist() == [4] * 5


def test_gate_on_a_rank_metric_wants_it_lower():
    from types import SimpleNamespace

    def version(number, rank, digest="sha256:d"):
        return SimpleNamespace(name="clip", version=number, tags={"eval.retrieval.image_to_text_median_rank": str(rank),
                                                                  "eval.retrieval.digest": digest})

    gate = registry.Gate(metric="retrieval.image_to_text_median_rank", max_drop=0.4)
    assert registry.evaluate_gate(version(1, 3.0), None, gate)[0]  # no floor: any first champion
    assert not registry.evaluate_gate(version(1, 3.0), None, gate.model_copy(update={"floor": 2.0}))[0]
    assert registry.evaluate_gate(version(1, 1.5), None, gate.model_copy(update={"floor": 2.0}))[0]
    assert registry.evaluate_gate(version(2, 3.3), version(1, 3.0), gate)[0]
    passed, reason, _ = registry.evaluate_gate(version(2, 3.5), version(1, 3.0), gate)
    assert not passed and "worse than the allowed drop" in reason
    assert registry.evaluate_gate(version(2, 1.0), version(1, 3.0), gate)[0]
    # a NaN (a diverged model's evaluation) is no first champion; a NaN champion blocks no challenger
    passed, reason, _ = registry.evaluate_gate(version(1, "nan"), None, gate)
    assert not passed and "is nan: its evaluation went wrong" in reason
    assert not registry.evaluate_gate(version(2, "nan"), version(1, 3.0), gate)[0]
    passed, reason, compared = registry.evaluate_gate(version(2, 3.0), version(1, "nan"), gate)
    assert passed and "champion version 1's retrieval.image_to_text_median_rank is nan and no floor" in reason
    assert compared["champion_version"] == "1"
    assert not registry.evaluate_gate(version(2, 3.0), version(1, "inf"), gate.model_copy(update={"floor": 2.0}))[0]


def test_gate_compares_only_figures_of_the_same_set_and_setup():
    from types import SimpleNamespace

    def version(number, top1, setup):
        return SimpleNamespace(name="clip", version=number, tags={
            "eval.zeroshot.top1": str(top1), "eval.zeroshot.digest": "sha256:d", "eval.zeroshot.setup_digest": setup})

    gate = registry.Gate()
    assert registry.evaluate_gate(version(2, 0.6, "sha256:s"), version(1, 0.6, "sha256:s"), gate)[0]
    # the same images with other class names or templates: a zero-shot score that does not compare
    passed, reason, compared = registry.evaluate_gate(version(2, 0.6, "sha256:t"), version(1, 0.5, "sha256:s"), gate)
    assert not passed and "has no zeroshot.top1 on the same eval set (sha256:d) and setup (sha256:t" in reason
    assert compared["eval_setup_digest"] == "sha256:t"
    # a champion evaluated before setups were recorded is compared on the same set alone, and that is said
    legacy = version(1, 0.6, "x")
    del legacy.tags["eval.zeroshot.setup_digest"]
    passed, reason, _ = registry.evaluate_gate(version(2, 0.6, "sha256:t"), legacy, gate)
    assert passed and "predates setup digests" in reason


def test_a_promote_compares_with_the_champion_that_a_concurrent_promote_put_in_place(tmp_path, monkeypatch):
    tracking, quiet = f"sqlite:///{tmp_path / 'mlflow.db'}", lambda *_: None
    clip_core.save_checkpoint(briefly_trained(steps=1), tmp_path / "ckpt")
    for top1 in (0.55, 0.90, 0.60):
        registry.register(str(tmp_path / "ckpt"), "clip", metrics={"zeroshot": {"top1": top1, "digest": "sha256:z"}},
                          tracking_uri=tracking, echo=quiet)
    registry.promote("clip", "1", tracking_uri=tracking, echo=quiet)
    gate, raced = registry.evaluate_gate, []

    def gate_while_version_2_is_promoted(challenger, champion, *args):
        if str(challenger.version) == "3" and not raced:  # v3 has been compared with v1, and now v2 goes live
            raced.append(registry.promote("clip", "2", tracking_uri=tracking, echo=quiet)["decision"])
        return gate(challenger, champion, *args)

    monkeypatch.setattr(registry, "evaluate_gate", gate_while_version_2_is_promoted)
    decision = registry.promote("clip", "3", tracking_uri=tracking, echo=quiet)
    assert raced == ["passed"]
    assert (decision["decision"], decision["champion_version"]) == ("failed", "2"), decision
    assert str(registry.client(tracking).get_registered_model("clip").aliases["champion"]) == "2"
    # the history a rollback walks is bounded: a tag holds at most 5000 characters in MLflow's SQL stores
    monkeypatch.undo()
    client = registry.client(tracking)
    client.set_registered_model_tag("clip", registry.HISTORY_TAG, json.dumps(["1", "2"] * 400))
    registry.promote("clip", "3", force=True, tracking_uri=tracking, echo=quiet)
    history = json.loads(client.get_registered_model("clip").tags[registry.HISTORY_TAG])
    assert len(history) == registry.HISTORY_KEPT and history[-2:] == ["2", "3"]


def test_registering_into_the_train_run_leaves_its_status_and_a_deleted_one_is_not_reopened(tmp_path, monkeypatch):
    import mlflow

    from workflows.tracking import set_experiment, using

    tracking, quiet = f"sqlite:///{tmp_path / 'mlflow.db'}", lambda *_: None
    clip_core.save_checkpoint(briefly_trained(steps=1), tmp_path / "ckpt")
    client = registry.client(tracking)
    with using(tracking):
        set_experiment("rayclip")  # artifacts beside the database (experiment 0's are in ./mlruns)
        with mlflow.start_run(run_name="train") as run:
            train_id = run.info.run_id
    finished = client.get_run(train_id).info
    # a registration that fails while it logs into the train run (as a checkpoint's run_id makes it)
    import mlflow.pyfunc  # noqa: F401 - the module itself, not mlflow's lazy attribute

    monkeypatch.setattr(sys.modules["mlflow.pyfunc"], "log_model", lambda **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        registry.register(str(tmp_path / "ckpt"), "clip", run_id=train_id, tracking_uri=tracking, echo=quiet)
    after = client.get_run(train_id).info
    assert (after.status, after.end_time) == ("FINISHED", finished.end_time)
    monkeypatch.undo()
    # the train run deleted (in the UI's trash) since: the registration logs into a new run
    client.delete_run(train_id)
    version = registry.register(str(tmp_path / "ckpt"), "clip", run_id=train_id, tracking_uri=tracking, echo=quiet)
    run_id = version["run_id"]
    assert run_id != train_id and client.get_run(run_id).info.run_name == "register"


def test_a_version_is_made_with_its_whole_lineage_at_once_and_names_a_registered_source_by_number(tmp_path,
                                                                                                 monkeypatch):
    from mlflow import MlflowClient

    tracking, quiet = f"sqlite:///{tmp_path / 'mlflow.db'}", lambda *_: None
    clip_core.save_checkpoint(briefly_trained(steps=1), tmp_path / "ckpt")
    # tags set one call at a time after the version existed: a stop in between (Ctrl-C, `ray job stop`) left
    # a version without the pipeline's key tag, which a rerun did not find and registered again
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", lambda *args, **kwargs: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    first = registry.register(str(tmp_path / "ckpt"), "clip", tracking_uri=tracking, echo=quiet,
                              tags={"rayclip.pipeline_key": "k1"})
    version = registry.client(tracking).get_model_version("clip", first["version"])
    assert version.tags["rayclip.pipeline_key"] == "k1" and version.tags["weights_sha256"]
    # registered again from the registry by its alias: the lineage names the version, not the alias that moves
    again = registry.register("models:/clip@challenger", "clip-prod", tracking_uri=tracking, echo=quiet)
    assert again["tags"]["checkpoint_source"] == f"models:/clip/{first['version']}"


def test_metrics_about_other_weights_are_not_registered_with_a_checkpoint(tmp_path, capsys):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clip_core.save_checkpoint(briefly_trained(steps=1), tmp_path / "ckpt")
    weights = json.loads((tmp_path / "ckpt" / "config.json").read_text())["weights_sha256"]
    metrics = {"model": {"uri": "elsewhere", "weights_sha256": "0" * 64}, "zeroshot": {"top1": 0.9, "digest": "d"}}
    with pytest.raises(registry.RegistryError, match=r"the metrics given are about other weights \(sha256 "
                                                     r"000000000000…\) than .*ckpt's \(" + weights[:12]):
        registry.register(str(tmp_path / "ckpt"), "clip", metrics=metrics, tracking_uri=tracking, echo=print)
    assert not registry.client(tracking).search_registered_models()
    metrics["model"]["weights_sha256"] = weights
    assert registry.register(str(tmp_path / "ckpt"), "clip", metrics=metrics, tracking_uri=tracking,
                             echo=print)["version"] == "1"
    # MLflow refusing a request it understood is no reason to check the server
    assert cli.main(["promote", "clip", "--version", "abc", "--mlflow-tracking-uri", tracking]) == 2
    error = capsys.readouterr().err
    assert "MLflow refused the request: " in error and "version" in error and "server is up" not in error, error


def test_evaluating_one_section_keeps_the_others_and_replaces_its_own(tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clip_core.save_checkpoint(briefly_trained(steps=1), tmp_path / "ckpt")
    registry.register(str(tmp_path / "ckpt"), "clip", metrics={
        "zeroshot": {"top1": 0.5, "digest": "sha256:z"},
        "retrieval": {"image_to_text_median_rank": 0.2, "text_to_image_median_rank": 3.0, "digest": "sha256:r"}},
        tracking_uri=tracking, echo=lambda *_: None)
    registry.record_metrics("clip", "1", {"retrieval": {"image_to_text_median_rank": 0.4, "digest": "sha256:r2"}},
                            tracking_uri=tracking)
    tags = registry.version_metrics(registry.client(tracking).get_model_version("clip", "1").tags)
    assert tags == {"zeroshot.top1": "0.5", "zeroshot.digest": "sha256:z", "retrieval.image_to_text_median_rank": "0.4",
                    "retrieval.digest": "sha256:r2"}, tags
    # a version whose weights are gone from the artifact store (an upload cut short) is refused when fetched,
    # not later in whatever loads it
    (weights,) = (tmp_path / "mlartifacts").rglob(f"checkpoint/{clip_core.checkpoint.WEIGHTS_FILE}")
    weights.unlink()
    with pytest.raises(registry.RegistryError, match=r"version 1\) has no checkpoint/model.safetensors in the "
                                                     r"artifact store: .* its upload was cut short"):
        registry.fetch_checkpoint("models:/clip/1", str(tmp_path / "fetched"), tracking_uri=tracking)


def test_lineage_names_the_data_a_checkpoint_trained_on_even_if_it_changed_since(sets, tmp_path):
    recorded = "sha256:" + "ab" * 32  # what train recorded; heldout2's manifest says otherwise now
    clip_core.save_checkpoint(briefly_trained(steps=1), tmp_path / "ckpt", extra={"train": {
        "step": 1, "config": {"data": [str(sets / "heldout2")], "data_digests": [recorded]}}})
    assert registry.lineage(str(tmp_path / "ckpt"))["dataset_digests"] == recorded
    # a checkpoint from before train recorded them: the manifest at its data URI
    assert registry.lineage(str(sets / "ckpt"))["dataset_digests"] == read_manifest(str(sets / "heldout2"))["digest"]


def test_a_checkpoint_on_s3_is_fetched_with_its_inference_files_only(sets, tmp_path, s3_bucket):
    from workflows import storage

    checkpoint = f"s3://{s3_bucket}/runs/checkpoint_00000005"
    written = {file.name: file.read_bytes() for file in (sets / "ckpt").iterdir()}
    for name in written:
        storage.copy(str(sets / "ckpt" / name), f"{checkpoint}/{name}")
    storage.write_bytes(f"{checkpoint}/train_state.pt", b"optimizer state the model does not need")

    source = registry.fetch_checkpoint(checkpoint, str(tmp_path / "fetched"))
    fetched = {file.name: file.read_bytes() for file in (tmp_path / "fetched" / "checkpoint").iterdir()}
    assert source.directory == str(tmp_path / "fetched" / "checkpoint") and source.uri == checkpoint
    assert fetched == {name: data for name, data in written.items() if name in registry.INFERENCE_FILES}, fetched.keys()
    assert clip_core.load_model(source.directory).config.name == "micro"
    # without our config the directory is still OpenCLIP's (its open_clip_config.json): made ours again
    storage.delete(f"{checkpoint}/config.json")
    again = registry.fetch_checkpoint(checkpoint, str(tmp_path / "again"))
    converted = clip_core.load_model(again.directory).state_dict()
    assert all(torch.equal(converted[k], v) for k, v in clip_core.load_model(sets / "ckpt").state_dict().items())
    storage.delete(f"{checkpoint}/open_clip_config.json")
    with pytest.raises(clip_core.CheckpointError, match="without config.json or open_clip_config.json"):
        registry.fetch_checkpoint(checkpoint, str(tmp_path / "once-more"))


def test_a_local_checkpoint_given_as_a_file_uri_or_from_home_is_fetched_as_a_path(tmp_path, monkeypatch):
    # the stages open the directory with Path: file:// and ~ are storage's, which checked they exist
    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), tmp_path / "my ckpt")
    monkeypatch.setenv("HOME", str(tmp_path))
    for given in (f"file://{tmp_path}/my%20ckpt", "~/my ckpt"):
        source = registry.fetch_checkpoint(given, str(tmp_path / "scratch"))
        assert (source.directory, source.uri) == (str(tmp_path / "my ckpt"), given)
        files, config = evaluate_module.inference_files(source)
        assert {"config.json", "model.safetensors"} <= set(files) and config.name == "micro"


def test_weights_in_the_formats_users_hold_register_evaluate_and_export_as_they_are(sets, tmp_path, capsys):
    """OpenAI's or OpenCLIP's weights and Hugging Face CLIPModel directories need no conversion by hand:
    fetching one for register, evaluate or serve makes a checkpoint of ours from it; and a registered
    version exports to either."""
    hf_clip().save_pretrained(tmp_path / "hf")
    trained = clip_core.load_model(sets / "ckpt")
    torch.save({"name": "micro", "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}},
               tmp_path / "epoch_5.pt")  # OpenCLIP's training checkpoint
    for uri, expected in ((tmp_path / "hf", clip_core.load_model(tmp_path / "hf")), (tmp_path / "epoch_5.pt", trained)):
        source = registry.fetch_checkpoint(str(uri), str(tmp_path / f"fetched-{uri.name}"))
        fetched = clip_core.load_model(source.directory)
        assert source.uri == str(uri) and source.directory.startswith(str(tmp_path / f"fetched-{uri.name}"))
        assert fetched.config.replace(name=None) == expected.config.replace(name=None)
        assert all(torch.equal(fetched.state_dict()[k], v) for k, v in expected.state_dict().items())
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        registry.fetch_checkpoint(str(tmp_path / "absent"), str(tmp_path / "fetched-absent"))

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["register", str(tmp_path / "hf"), "--name", "hf-clip", "--mlflow-tracking-uri", tracking]) == 0
    version = registry.client(tracking).get_model_version_by_alias("hf-clip", "challenger")
    assert version.tags["checkpoint_source"] == str(tmp_path / "hf")
    metrics = evaluate(EvaluateConfig(model=str(tmp_path / "hf"), zeroshot=str(sets / "heldout"), workers=1,
                                      mlflow_tracking_uri=tracking))
    assert 0.0 <= metrics["zeroshot"]["top1"] <= 1.0 and metrics["zeroshot"]["rows"] == 64

    registered = clip_core.load_model(tmp_path / "hf").state_dict()
    for to, output in (("hf", tmp_path / "exported-hf"), ("openclip", tmp_path / "exported.pt")):
        assert cli.main(["export", "models:/hf-clip@challenger", str(output), "--to", to,
                         "--mlflow-tracking-uri", tracking]) == 0
        assert f"-> {output}" in capsys.readouterr().out
        exported = clip_core.load_model(output, quick_gelu=True).state_dict()
        assert all(torch.equal(exported[k], v) for k, v in registered.items()), to


def test_quick_gelu_says_what_weights_were_trained_with_and_a_checkpoint_of_ours_keeps_its_own(sets, tmp_path,
                                                                                                 capsys, s3_bucket):
    """OpenCLIP issue #771's trap: a bare state dict says nothing of its activation (GELU is assumed, with a
    warning), and a file may imply the wrong one. --quick-gelu / --no-quick-gelu say it wherever weights
    are taken; a checkpoint of ours records its own."""
    torch.save(clip_core.load_model(sets / "ckpt").state_dict(), tmp_path / "bare.pt")
    bare = str(tmp_path / "bare.pt")
    with pytest.warns(UserWarning, match="does not say whether it was trained with QuickGELU"):
        assumed = registry.fetch_checkpoint(bare, str(tmp_path / "assumed"))
    assert not clip_core.load_model(assumed.directory).config.quick_gelu
    for quick_gelu in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said, so nothing to warn about
            told = registry.fetch_checkpoint(bare, str(tmp_path / f"told-{quick_gelu}"), quick_gelu=quick_gelu)
        assert clip_core.load_model(told.directory).config.quick_gelu is quick_gelu
    with pytest.warns(UserWarning, match="rayclip checkpoint trained with GELU and loads as such"):
        kept = registry.fetch_checkpoint(str(sets / "ckpt"), str(tmp_path / "kept"), quick_gelu=True)
    assert not clip_core.load_model(kept.directory).config.quick_gelu

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["register", bare, "--name", "bare", "--quick-gelu", "--mlflow-tracking-uri", tracking]) == 0
    assert cli.main(["export", "models:/bare@challenger", str(tmp_path / "hf"), "--to", "hf",
                     "--mlflow-tracking-uri", tracking]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["hidden_act"] == "quick_gelu"
    assert cli.main(["export", bare, str(tmp_path / "hf-gelu"), "--to", "hf", "--no-quick-gelu"]) == 0
    assert json.loads((tmp_path / "hf-gelu" / "config.json").read_text())["text_config"]["hidden_act"] == "gelu"
    # to S3 as to a local path (it wrote a local directory named `s3:`), the weights uploaded last
    exported = f"s3://{s3_bucket}/exports"
    assert cli.main(["export", bare, f"{exported}/hf", "--to", "hf", "--no-quick-gelu"]) == 0
    assert cli.main(["export", bare, f"{exported}/openclip.pt", "--to", "openclip", "--no-quick-gelu"]) == 0
    assert not (Path.cwd() / "s3:").exists()
    assert {storage.basename(uri) for uri in storage.list_files(exported)} >= {
        "config.json", "model.safetensors", "openclip.pt"}
    storage.download(f"{exported}/openclip.pt", str(tmp_path))
    assert torch.equal(clip_core.load_model(tmp_path / "openclip.pt", quick_gelu=False).logit_scale,
                       clip_core.load_model(sets / "ckpt").logit_scale)
    capsys.readouterr()
    # a rollout changes the model version, not how the app loads weights
    assert cli.main(["deploy", "--reload", "--quick-gelu", "--port", "8001"]) == 2
    assert "--port, --[no-]quick-gelu change how the app is deployed" in capsys.readouterr().err


def test_embed_writes_every_row_as_clip_core_embeds_it_as_parquet_any_reader_opens(sets, tmp_path, s3_bucket,
                                                                                      capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows import storage
    from workflows.embed import MAX_METADATA_BYTES, _to_table

    heldout, output = str(sets / "heldout"), f"s3://{s3_bucket}/embeddings/heldout"
    assert cli.main(["embed", str(sets / "ckpt"), heldout, output, "--batch-size", "24", "--rows-per-file", "40"]) == 0
    assert f"embed: 64 rows in {len(storage.list_files(f'{output}/embeddings'))} file(s) -> {output}" in \
        capsys.readouterr().out
    manifest = json.loads(storage.read_bytes(f"{output}/embeddings.json"))
    fs, path = storage.filesystem(f"{output}/embeddings")
    table = pq.read_table(path, filesystem=fs)  # plain pyarrow reads the directory: no rayclip types
    model = clip_core.load_model(sets / "ckpt")
    assert table.schema.field("image_embedding").type == pa.list_(pa.float32(), model.config.embed_dim)
    assert table.schema.field("text_embedding").type == pa.list_(pa.float32(), model.config.embed_dim)
    per_file = sorted(file["rows"] for file in manifest["files"])  # at least --rows-per-file but the last
    assert len(per_file) > 1 and min(per_file[1:]) >= 40 and sum(per_file) == manifest["rows"] == table.num_rows == 64
    assert manifest["dataset"]["digest"] == read_manifest(heldout)["digest"]
    assert manifest["model"]["weights_sha256"] == json.loads((sets / "ckpt" / "config.json").read_text())[
        "weights_sha256"]
    assert manifest["model"]["quick_gelu"] is clip_core.load_model(sets / "ckpt").config.quick_gelu

    prepared = read_prepared_table(heldout).to_pydict()
    rows = decode_batch(prepared, model.image_size)
    with torch.no_grad():
        image_features = model.encode_image(clip_core.transforms.normalize(torch.from_numpy(rows["image"])),
                                            normalize=True).numpy()
        text_features = model.encode_text(torch.from_numpy(rows["tokens"]), normalize=True).numpy()
    at = {key: i for i, key in enumerate(table["key"].to_pylist())}
    order = [at[key] for key in prepared["key"]]  # every prepared row once
    assert sorted(order) == list(range(64))
    written = table.take(order)
    assert written["caption"].to_pylist() == prepared["caption"] and written["label"].to_pylist() == prepared["label"]
    assert written["metadata"].to_pylist() == prepared["metadata"]  # the source's, as /v1/search returns it
    for column, expected in (("image_embedding", image_features), ("text_embedding", text_features)):
        np.testing.assert_allclose(np.stack(written[column].to_numpy(zero_copy_only=False)), expected, atol=2e-5)

    # an output holding files is refused before any work: nothing of it is lost or mixed
    assert cli.main(["embed", str(sets / "ckpt"), heldout, output]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert json.loads(storage.read_bytes(f"{output}/embeddings.json")) == manifest

    half = tmp_path / "half"
    assert cli.main(["embed", str(sets / "ckpt"), heldout, str(half), "--dtype", "float16", "--no-text"]) == 0
    small = pq.read_table(half / "embeddings")
    assert small.column_names == ["key", "caption", "label", "metadata", "image_id", "image_embedding"]
    assert small.schema.field("image_embedding").type.value_type == pa.float16()
    at = {key: i for i, key in enumerate(small["key"].to_pylist())}
    np.testing.assert_allclose(np.stack(small["image_embedding"].to_numpy(zero_copy_only=False))[
        [at[key] for key in prepared["key"]]].astype(np.float32), image_features, atol=2e-3)
    # a set without labels: nulls, not -1
    unlabeled = _to_table({"key": np.array(["a", "b"], object), "caption": np.array(["x", "y"], object),
                           "label": np.array([-1, -1]), "image_id": np.array(["i", "j"], object),
                           "metadata": np.array(['{"url": "http://x"}', "m" * (MAX_METADATA_BYTES + 1)], object),
                           "image_features": np.ones((2, 2), np.float32)}, "float32", False)
    assert unlabeled["label"].to_pylist() == [None, None]
    assert unlabeled["metadata"].to_pylist() == ['{"url": "http://x"}', None], "over its limit: not kept"


def _metrics(sets, top1: float, digest_of: str = "heldout") -> dict:
    return {"zeroshot": {"top1": top1, "top5": min(1.0, top1 + 0.2),
                         "digest": read_manifest(str(sets / digest_of))["digest"]}}


def test_a_stage_nested_in_a_pipeline_of_another_experiment_logs_to_a_new_run_and_mlflow_is_put_back(
        tmp_path, monkeypatch):
    from mlflow.tracking import fluent

    from workflows.tracking import set_experiment, start_run

    monkeypatch.chdir(tmp_path)  # MLflow's default store, ./mlflow.db
    tracking = f"sqlite:///{tmp_path / 'pipeline.db'}"
    mlflow.set_experiment("my-notebook")  # the caller's own store and experiment, left as they were
    mine = (mlflow.get_tracking_uri(), fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID"))
    with using(tracking):
        with start_run(None, "first", "train") as first:  # the run a checkpoint names
            pass
        set_experiment("renamed")  # a rerun after `mlflow.experiment` changed
        with mlflow.start_run(run_name="pipeline") as pipeline:
            with start_run(first.info.run_id, "renamed", "evaluate") as evaluate_run:
                mlflow.log_metric("eval.top1", 0.5)
        assert evaluate_run.info.run_id != first.info.run_id
        assert evaluate_run.info.experiment_id == pipeline.info.experiment_id
        assert evaluate_run.data.tags.get("mlflow.parentRunId", pipeline.info.run_id) == pipeline.info.run_id
        set_experiment("first")
        with mlflow.start_run(run_name="pipeline"):
            with start_run(first.info.run_id, "first", "evaluate") as reopened:  # same experiment: reopened
                assert reopened.info.run_id == first.info.run_id
    assert (mlflow.get_tracking_uri(), fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID")) == mine


def test_register_promote_gate_and_rollback(sets, tmp_path, capsys, s3_bucket):
    from workflows import storage

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flags = ["--mlflow-tracking-uri", tracking]
    storage.write_bytes(f"s3://{s3_bucket}/m1.json", json.dumps(_metrics(sets, 0.50)).encode())  # as evaluate --json
    assert cli.main(["register", str(sets / "ckpt"), "--name", "clip", "--metrics", f"s3://{s3_bucket}/m1.json",
                     *flags]) == 0
    assert torch.is_grad_enabled(), "registering (MLflow runs the pyfunc on the input example) left autograd off"
    client = registry.client(tracking)
    v1 = client.get_model_version_by_alias("clip", "challenger")
    assert str(v1.version) == "1"
    assert v1.tags["dataset_digests"] == read_manifest(str(sets / "heldout2"))["digest"]
    assert v1.tags["git_commit"] == "0123abcd" and v1.tags["config_hash"].startswith("sha256:")
    assert v1.tags["eval.zeroshot.top1"] == "0.5"
    # the model says what it takes and gives, and pins what it needs
    with using(tracking):
        model_dir = mlflow.artifacts.download_artifacts(artifact_uri="models:/clip/1", dst_path=str(tmp_path / "model"))
    signature = mlflow.models.Model.load(model_dir).signature
    assert signature.inputs.input_names() == ["image", "text"]
    assert signature.outputs.input_names() == ["label", "score", "labels", "scores", "embedding"]
    assert [param.name for param in signature.params.params] == ["labels", "templates", "top_k"]
    requirements = (tmp_path / "model" / "requirements.txt").read_text().splitlines()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert os.path.isfile(tmp_path / "model" / "serving_input_example.json")
    # the sqlite store keeps its artifacts beside the database, not in ./mlruns
    assert client.get_run(v1.run_id).info.artifact_uri.startswith(f"file://{tmp_path}/mlartifacts/")

    # the first champion must reach the floor
    assert cli.main(["promote", "clip", "--floor", "0.6", *flags]) == 1
    assert "champion" not in client.get_registered_model("clip").aliases
    assert cli.main(["promote", "clip", "--floor", "0.3", *flags]) == 0
    assert str(client.get_registered_model("clip").aliases["champion"]) == "1"

    # a worse challenger leaves the champion where it is, and the decision is on both versions
    registry.register(str(sets / "ckpt"), "clip", metrics=_metrics(sets, 0.40), tracking_uri=tracking, echo=print,
                      tags={pipeline.PIPELINE_KEY_TAG: "0123"})
    assert cli.main(["promote", "clip", *flags]) == 1
    assert str(client.get_registered_model("clip").aliases["champion"]) == "1"
    v2 = client.get_model_version("clip", "2")
    assert v2.tags["validation_status"] == "failed" and v2.tags[pipeline.PIPELINE_KEY_TAG] == "0123"
    decision = json.loads(v2.tags["promotion.decision"])
    assert (decision["challenger_value"], decision["champion_value"]) == (0.4, 0.5)
    assert json.loads(client.get_model_version("clip", "1").tags["promotion.last_comparison"]) == decision
    # a pipeline rerun that evaluated the version again: its metrics in place of the old ones
    registry.record_metrics("clip", "2", {"zeroshot": {"top1": 0.45, "digest": "sha256:x"}}, tracking_uri=tracking)
    tags = client.get_model_version("clip", "2").tags
    assert (tags["eval.zeroshot.top1"], tags["eval.zeroshot.digest"]) == ("0.45", "sha256:x")
    assert "eval.zeroshot.top5" not in tags

    # within the allowed drop: promoted; metrics on another eval set cannot be compared
    registry.register(str(sets / "ckpt"), "clip", metrics=_metrics(sets, 0.497), tracking_uri=tracking)
    assert registry.promote("clip", tracking_uri=tracking)["decision"] == "passed"
    registry.register(str(sets / "ckpt"), "clip", metrics=_metrics(sets, 0.9, digest_of="heldout2"),
                      tracking_uri=tracking)
    refused = registry.promote("clip", tracking_uri=tracking)
    assert refused["decision"] == "failed" and "same eval set" in refused["reason"]
    assert str(client.get_registered_model("clip").aliases["champion"]) == "3"
    forced = registry.promote("clip", force=True, tracking_uri=tracking)
    assert (forced["decision"] == "forced"
            and client.get_model_version("clip", "4").tags["validation_status"] == "forced")

    # rollback walks the champion history back
    assert cli.main(["rollback", "clip", *flags]) == 0
    assert str(client.get_registered_model("clip").aliases["champion"]) == "3"
    assert client.get_model_version("clip", "4").tags["validation_status"] == "rolled_back"
    registry.rollback("clip", tracking_uri=tracking)
    assert str(client.get_registered_model("clip").aliases["champion"]) == "1"
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback("clip", tracking_uri=tracking)

    capsys.readouterr()
    assert cli.main(["models", "clip", *flags]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["version", "aliases", "status", "zeroshot.top1"]
    assert [line.split()[0] for line in table[1:]] == ["4", "3", "2", "1"]
    assert "champion" in table[4] and "rolled_back" in table[1]

    # a rolled-back version goes live again only when forced
    with pytest.raises(registry.RegistryError, match="version 4 of 'clip' was rolled back"):
        registry.promote("clip", "4", tracking_uri=tracking)
    assert str(client.get_registered_model("clip").aliases["champion"]) == "1"
    assert registry.promote("clip", "3", force=True, tracking_uri=tracking)["decision"] == "passed"
    assert registry.promote("clip", "4", force=True, tracking_uri=tracking)["decision"] == "forced"
    # a previous champion deleted since is passed over on the way back
    client.delete_model_version("clip", "3")
    registry.rollback("clip", tracking_uri=tracking)
    assert str(client.get_registered_model("clip").aliases["champion"]) == "1"
    # nor does a rerun of the pipeline that registered it (which promotes its version unless it is the champion)
    rerun = pipeline.Pipeline(pipeline.load_config(None, [f"mlflow.tracking_uri={tracking}"]), echo=print)
    assert rerun.promote("4") is False and rerun.outcome["stages"]["promote"] == "skipped"
    assert "version 4 was rolled back" in capsys.readouterr().out
    assert str(client.get_registered_model("clip").aliases["champion"]) == "1"


def test_registry_errors_name_the_problem(sets, tmp_path, capsys, monkeypatch):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvaluateConfig(model=str(sets / "ckpt"))
    assert cli.main(["evaluate", str(sets / "ckpt"), "--zeroshot", str(tmp_path / "nowhere")]) == 2
    assert "no prepared dataset" in capsys.readouterr().err
    assert cli.main(["register", str(tmp_path), "--name", "clip", "--mlflow-tracking-uri", tracking]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    (tmp_path / "classnames.txt").write_text("red circle\n\nblue square\n\n")  # the blank would shift every label
    assert cli.main(["evaluate", str(sets / "ckpt"), "--zeroshot", str(sets / "heldout"),
                     "--classnames", str(tmp_path / "classnames.txt")]) == 2
    assert "classnames.txt, line 2: blank line" in capsys.readouterr().err
    with pytest.raises(registry.RegistryError, match="no registered model 'nope'"):
        registry.promote("nope", tracking_uri=tracking)
    registry.register(str(sets / "ckpt"), "clip", tracking_uri=tracking, echo=lambda *_: None)
    decision = registry.promote("clip", tracking_uri=tracking, echo=lambda *_: None)
    assert decision["decision"] == "failed" and "no zeroshot.top1 metric" in decision["reason"]
    with pytest.raises(registry.RegistryError, match="has no alias 'champion'"):
        registry.rollback("clip", tracking_uri=tracking)

    # an MLflow that cannot be reached: a clear error, after bounded retries, without the URI's password
    unreachable = ["--mlflow-tracking-uri", f"http://admin:hunter2@127.0.0.1:{free_port()}"]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # the same retries, without the ~30 s of waiting
    capsys.readouterr()
    assert cli.main(["models", "clip", *unreachable]) == 2
    error = capsys.readouterr().err
    assert "rayclip models: error: MLflow failed" in error and "Connection refused" in error, error
    assert "***@127.0.0.1" in error and "hunter2" not in error

    # weights swapped in the artifact store (with a config that matches them) are refused at load
    version = registry.client(tracking).get_model_version("clip", "1")
    assert version.tags["weights_sha256"] == json.loads((sets / "ckpt" / "config.json").read_text())["weights_sha256"]
    [stored] = list(tmp_path.glob("mlartifacts/**/artifacts/checkpoint"))
    clip_core.save_checkpoint(clip_core.create_model("tiny"), stored)
    with pytest.raises(registry.RegistryError, match="the version records " + version.tags["weights_sha256"]):
        registry.fetch_checkpoint("models:/clip/1", str(tmp_path / "fetched"), tracking_uri=tracking)


def test_registration_retries_5xx_and_a_failed_one_leaves_no_version_behind(sets, mlflow_server, monkeypatch):
    # MLflow's own retry policy, bounded by our defaults; no backoff here: the count is what is tested
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    quiet = lambda *_: None  # noqa: E731
    with FaultyProxy(mlflow_server.uri) as proxy:
        proxy.fail("/model-versions/create", times=2)  # the version with its tags, in one request
        proxy.fail("/registered-models/alias", times=1)
        first = registry.register(str(sets / "ckpt"), "clip-flaky", tracking_uri=proxy.uri, echo=quiet)
        assert proxy.statuses("/model-versions/create") == [503, 503, 200]
        assert proxy.statuses("/registered-models/alias") == [503, 200]
        assert not proxy.statuses("/model-versions/set-tag")

        proxy.fail("/registered-models/alias")  # for good
        with pytest.raises(registry.RegistryError, match=r"registering clip-flaky version 2 stopped before alias "
                                                         r"'challenger'.*version 2 was deleted.*503"):
            registry.register(str(sets / "ckpt"), "clip-flaky", tracking_uri=proxy.uri, echo=quiet)
        assert proxy.statuses("/registered-models/alias")[2:] == [503] * 4  # the request and 3 retries
        client = registry.client(mlflow_server.uri)
        assert {k: str(v) for k, v in client.get_registered_model("clip-flaky").aliases.items()} == {"challenger": "1"}
        assert [str(v.version) for v in client.search_model_versions("name = 'clip-flaky'")] == ["1"]
        assert client.get_model_version("clip-flaky", "1").tags == first["tags"]

        # a promotion whose alias move fails leaves the champion history as it was: rollback cannot
        # later jump to the version that never became champion
        proxy.faults.clear()
        registry.promote("clip-flaky", force=True, tracking_uri=proxy.uri, echo=quiet)
        registry.register(str(sets / "ckpt"), "clip-flaky", tracking_uri=proxy.uri, echo=quiet)
        proxy.fail("/registered-models/alias")
        with pytest.raises(MlflowException, match="503"):
            registry.promote("clip-flaky", force=True, tracking_uri=proxy.uri, echo=quiet)
    assert str(client.get_registered_model("clip-flaky").aliases["champion"]) == "1"
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback("clip-flaky", tracking_uri=mlflow_server.uri, echo=quiet)


def test_registered_model_on_mlflow_server_evaluates_promotes_and_loads_in_a_fresh_process(
        sets, mlflow_server, tmp_path):
    tracking = mlflow_server.uri
    registered = registry.register(str(sets / "ckpt"), "clip-remote", tracking_uri=tracking, echo=lambda *_: None)
    assert registered["version"] == "1"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=mlflow_server.bucket).get("Contents", [])]
    assert any(k.endswith("artifacts/checkpoint/model.safetensors") for k in keys), keys

    (tmp_path / "classnames.txt").write_text("\n".join(read_manifest(str(sets / "heldout"))["classnames"]) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na rendering of a {}.\n")
    assert cli.main(["evaluate", "models:/clip-remote@challenger", "--zeroshot", str(sets / "heldout"),
                     "--classnames", str(tmp_path / "classnames.txt"), "--templates", str(tmp_path / "templates.txt"),
                     "--json", str(tmp_path / "metrics.json"), "--mlflow-tracking-uri", tracking]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"]["version"] == "1" and metrics["zeroshot"]["templates"] == 2
    version = registry.client(tracking).get_model_version("clip-remote", "1")
    assert float(version.tags["eval.zeroshot.top1"]) == metrics["zeroshot"]["top1"]
    assert registry.promote("clip-remote", tracking_uri=tracking, echo=lambda *_: None)["decision"] == "passed"
    # over REST (versions as str, aliases left out of search results): the gate, rollback and the table
    worse = {"zeroshot": {**metrics["zeroshot"], "top1": metrics["zeroshot"]["top1"] - 0.1}}
    registry.register(str(sets / "ckpt"), "clip-remote", metrics=worse, tracking_uri=tracking, echo=lambda *_: None)
    assert registry.promote("clip-remote", tracking_uri=tracking, echo=lambda *_: None)["decision"] == "failed"
    assert registry.promote("clip-remote", force=True, tracking_uri=tracking, echo=lambda *_: None)["forced"]
    registry.rollback("clip-remote", tracking_uri=tracking, echo=lambda *_: None)
    rows = registry.list_versions("clip-remote", tracking_uri=tracking)
    assert [(row["version"], row["aliases"], row["status"]) for row in rows] == [
        ("2", ["challenger"], "rolled_back"), ("1", ["champion"], "passed")]

    images = [sample.image_bytes() for sample in samples(3, split="heldout", seed=5, image_size=64)]
    labels = ["red circle", "blue square", "green triangle"]
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/clip-remote@champion')\n"
        "images = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]\n"
        f"out = model.predict(pd.DataFrame({{'image': images}}), params={{'labels': {labels!r}, 'top_k': 2}})\n"
        "emb = model.predict(pd.DataFrame({'text': ['a red circle']}))\n"
        "refused = []\n"
        "no_rows = pd.DataFrame({'text': pd.Series([], dtype=object)})\n"
        "for bad, params in (({'text': ['a dog', 'a cat']}, None), (pd.DataFrame({'image': images}),\n"
        "                    {'labels': ['a'], 'top_k': 0}), (no_rows, None)):\n"
        "    try:\n"
        "        model.predict(bad, params=params)\n"
        "    except Exception as exc:\n"
        "        refused.append(str(exc))\n"
        "print(json.dumps({'labels': out['labels'].tolist(), 'scores': out['scores'].tolist(),\n"
        "                  'dim': len(emb['embedding'][0]), 'refused': refused,\n"
        "                  'norm': float(sum(x * x for x in emb['embedding'][0]))}))\n")
    # load_model leaves its download in a temporary directory for the caller to keep: this test's, not /tmp
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps([i.hex() for i in images]),
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(answer["labels"]) == 3 and all(len(row) == 2 and set(row) <= set(labels) for row in answer["labels"])
    assert all(1 >= row[0] >= row[1] >= 0 for row in answer["scores"])
    assert answer["dim"] == 64 and answer["norm"] == pytest.approx(1.0, abs=1e-4)
    # a dict's list is one row holding a list (not a text per item), top_k=0, no rows: each a clear error
    assert len(answer["refused"]) == 3, answer["refused"]
    assert "row 0: 'text' must be a string, got list" in answer["refused"][0]
    assert "top_k=0: ask for at least 1" in answer["refused"][1] and "no rows" in answer["refused"][2]
    # the served answer is the checkpoint's own zero-shot prediction
    model = clip_core.load_model(sets / "ckpt")
    classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), labels)
    transform = clip_core.image_transform(64)
    _, top = clip_core.predict(model, torch.stack([transform(i) for i in images]), classifier, top_k=1)
    assert [row[0] for row in answer["labels"]] == [labels[i] for i in top[:, 0].tolist()]
    assert np.isfinite(answer["scores"]).all()


def test_basic_auth_server_credentials_come_from_the_environment_and_are_never_stored(sets, mlflow_auth_server,
                                                                                      monkeypatch, capsys, tmp_path):
    user, password = mlflow_auth_server.credentials
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)  # MLflow's run links printed
    flags = ["--mlflow-tracking-uri", mlflow_auth_server.uri]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-Password-7")
    assert cli.main(["models", "clip-auth", *flags]) == 2
    error = capsys.readouterr().err
    assert "401" in error and "MLFLOW_TRACKING_PASSWORD" in error and "not-the-Password-7" not in error, error

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    (tmp_path / "m1.json").write_text(json.dumps(_metrics(sets, 0.5)))
    assert cli.main(["register", str(sets / "ckpt"), "--name", "clip-auth", "--metrics", str(tmp_path / "m1.json"),
                     *flags]) == 0
    assert cli.main(["promote", "clip-auth", *flags]) == 0
    # credentials in the URI work too (requests sends them), and are never printed
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    in_uri = mlflow_auth_server.uri.replace("http://", f"http://{user}:{password}@")
    assert cli.main(["models", "clip-auth", "--mlflow-tracking-uri", in_uri]) == 0
    assert cli.main(["models", "nope", "--mlflow-tracking-uri", in_uri]) == 2
    # a run that ends prints MLflow's "View run ... at <host>" link, which would hold the password
    assert cli.main(["register", str(sets / "ckpt"), "--name", "clip-auth", "--metrics", str(tmp_path / "m1.json"),
                     "--mlflow-tracking-uri", in_uri]) == 0
    printed = capsys.readouterr()
    assert "champion" in printed.out and "no registered model 'nope' in http://***@127.0.0.1" in printed.err
    assert password not in printed.out + printed.err

    client = registry.client(in_uri)
    version = client.get_model_version("clip-auth", "1")
    assert str(client.get_registered_model("clip-auth").aliases["champion"]) == "1"
    run = client.get_run(version.run_id)
    stored = json.dumps([version.tags, client.get_registered_model("clip-auth").tags, run.data.params, run.data.tags])
    assert "validation_status" in stored and password not in stored
    with pytest.raises(MlflowException, match="401"):  # the server does authenticate
        registry.client(mlflow_auth_server.uri).search_registered_models()
