"""Evaluate, register, promote and roll back on a real local Ray, sqlite MLflow, and a real
`mlflow server` whose artifacts live on moto's S3 server."""

import json
import os
import subprocess
import sys

import boto3
import mlflow
import numpy as np
import pytest
import torch

import clip_core
from workflows import cli, registry
from workflows.evaluate import EvaluateConfig, evaluate
from workflows.preprocess import PreprocessOptions, decode_batch, preprocess, read_manifest, read_prepared_table
from workflows.synthetic import samples

from micro import briefly_trained

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


def _in_process_metrics(checkpoint, uri) -> dict:
    """The reference: the same metrics computed in this process, without Ray."""
    model = clip_core.load_model(checkpoint)
    rows = decode_batch(read_prepared_table(uri).to_pydict(), model.image_size)
    with torch.no_grad():
        image_features = model.encode_image(clip_core.transforms.normalize(torch.from_numpy(rows["image"])),
                                            normalize=True)
        text_features = model.encode_text(torch.from_numpy(rows["tokens"]), normalize=True)
    classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), read_manifest(uri)["classnames"])
    logits = clip_core.zeroshot.zero_shot_logits(image_features, classifier)
    return {"zeroshot": clip_core.zeroshot.accuracy(logits, torch.from_numpy(rows["label"])),
            "retrieval": clip_core.retrieval_metrics(image_features, text_features)}


def test_evaluate_matches_in_process_metrics_and_logs_to_mlflow(sets, tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = EvaluateConfig(model=str(sets / "ckpt"), zeroshot=str(sets / "heldout"), retrieval=str(sets / "heldout"),
                            linear_probe=(str(sets / "heldout2"), str(sets / "heldout")), shots=[2], batch_size=48,
                            output_json=str(tmp_path / "metrics.json"), mlflow_tracking_uri=tracking)
    metrics = evaluate(config, echo=lambda *_: None)

    # batches that cut across both sets, rows in any order: the in-process numbers
    expected = _in_process_metrics(sets / "ckpt", str(sets / "heldout"))
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert metrics["zeroshot"][key] == pytest.approx(expected["zeroshot"][key], abs=1e-9)
    for key, value in expected["retrieval"].items():
        assert metrics["retrieval"][key.replace("R@", "R")] == pytest.approx(value, abs=1e-9)
    assert metrics["zeroshot"]["digest"] == read_manifest(str(sets / "heldout"))["digest"]
    assert set(metrics["linear_probe"]) >= {"full_top1", "k2_top1", "digest", "train_digest"}
    assert 0 <= metrics["linear_probe"]["k2_top1"] <= 1
    assert json.loads((tmp_path / "metrics.json").read_text())["zeroshot"] == metrics["zeroshot"]

    client = mlflow.MlflowClient(tracking)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["eval.zeroshot.top1"] == metrics["zeroshot"]["top1"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert artifacts == {"eval/metrics.json", "eval/confusion_matrix.png", "eval/retrieval_examples.png"}


def _metrics(sets, top1: float, digest_of: str = "heldout") -> dict:
    return {"zeroshot": {"top1": top1, "top5": min(1.0, top1 + 0.2), "digest": read_manifest(str(sets / digest_of))["digest"]}}


def test_register_promote_gate_and_rollback(sets, tmp_path, capsys):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flags = ["--mlflow-tracking-uri", tracking]
    (tmp_path / "m1.json").write_text(json.dumps(_metrics(sets, 0.50)))
    assert cli.main(["register", str(sets / "ckpt"), "--name", "clip", "--metrics", str(tmp_path / "m1.json"), *flags]) == 0
    assert torch.is_grad_enabled(), "registering (MLflow runs the pyfunc on the input example) left autograd off"
    client = registry.client(tracking)
    v1 = client.get_model_version_by_alias("clip", "challenger")
    assert str(v1.version) == "1"
    assert v1.tags["dataset_digests"] == read_manifest(str(sets / "heldout2"))["digest"]
    assert v1.tags["git_commit"] == "0123abcd" and v1.tags["config_hash"].startswith("sha256:")
    assert v1.tags["eval.zeroshot.top1"] == "0.5"
    # the sqlite store keeps its artifacts beside the database, not in ./mlruns
    assert client.get_run(v1.run_id).info.artifact_uri.startswith(f"file://{tmp_path}/mlartifacts/")

    # the first champion must reach the floor
    assert cli.main(["promote", "clip", "--floor", "0.6", *flags]) == 1
    assert "champion" not in client.get_registered_model("clip").aliases
    assert cli.main(["promote", "clip", "--floor", "0.3", *flags]) == 0
    assert str(client.get_registered_model("clip").aliases["champion"]) == "1"

    # a worse challenger leaves the champion where it is, and the decision is on both versions
    registry.register(str(sets / "ckpt"), "clip", metrics=_metrics(sets, 0.40), tracking_uri=tracking, echo=print)
    assert cli.main(["promote", "clip", *flags]) == 1
    assert str(client.get_registered_model("clip").aliases["champion"]) == "1"
    v2 = client.get_model_version("clip", "2")
    assert v2.tags["validation_status"] == "failed"
    decision = json.loads(v2.tags["promotion.decision"])
    assert (decision["challenger_value"], decision["champion_value"]) == (0.4, 0.5)
    assert json.loads(client.get_model_version("clip", "1").tags["promotion.last_comparison"]) == decision

    # within the allowed drop: promoted; metrics on another eval set cannot be compared
    registry.register(str(sets / "ckpt"), "clip", metrics=_metrics(sets, 0.497), tracking_uri=tracking)
    assert registry.promote("clip", tracking_uri=tracking)["decision"] == "passed"
    registry.register(str(sets / "ckpt"), "clip", metrics=_metrics(sets, 0.9, digest_of="heldout2"), tracking_uri=tracking)
    refused = registry.promote("clip", tracking_uri=tracking)
    assert refused["decision"] == "failed" and "same eval set" in refused["reason"]
    assert str(client.get_registered_model("clip").aliases["champion"]) == "3"
    forced = registry.promote("clip", force=True, tracking_uri=tracking)
    assert forced["decision"] == "forced" and client.get_model_version("clip", "4").tags["validation_status"] == "forced"

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


def test_registry_errors_name_the_problem(sets, tmp_path, capsys):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvaluateConfig(model=str(sets / "ckpt"))
    assert cli.main(["evaluate", str(sets / "ckpt"), "--zeroshot", str(tmp_path / "nowhere")]) == 2
    assert "no prepared dataset" in capsys.readouterr().err
    assert cli.main(["register", str(tmp_path), "--name", "clip", "--mlflow-tracking-uri", tracking]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(registry.RegistryError, match="no registered model 'nope'"):
        registry.promote("nope", tracking_uri=tracking)
    registry.register(str(sets / "ckpt"), "clip", tracking_uri=tracking, echo=lambda *_: None)
    decision = registry.promote("clip", tracking_uri=tracking, echo=lambda *_: None)
    assert decision["decision"] == "failed" and "no zeroshot.top1 metric" in decision["reason"]
    with pytest.raises(registry.RegistryError, match="has no alias 'champion'"):
        registry.rollback("clip", tracking_uri=tracking)


def test_registered_model_on_mlflow_server_evaluates_promotes_and_loads_in_a_fresh_process(sets, mlflow_server, tmp_path):
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

    images = [sample.image_bytes() for sample in samples(3, split="heldout", seed=5, image_size=64)]
    labels = ["red circle", "blue square", "green triangle"]
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/clip-remote@champion')\n"
        "images = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]\n"
        f"out = model.predict(pd.DataFrame({{'image': images}}), params={{'labels': {labels!r}, 'top_k': 2}})\n"
        "emb = model.predict(pd.DataFrame({'text': ['a red circle']}))\n"
        "print(json.dumps({'labels': out['labels'].tolist(), 'scores': out['scores'].tolist(),\n"
        "                  'dim': len(emb['embedding'][0]), 'norm': float(sum(x * x for x in emb['embedding'][0]))}))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps([i.hex() for i in images]),
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(answer["labels"]) == 3 and all(len(row) == 2 and set(row) <= set(labels) for row in answer["labels"])
    assert all(1 >= row[0] >= row[1] >= 0 for row in answer["scores"])
    assert answer["dim"] == 64 and answer["norm"] == pytest.approx(1.0, abs=1e-4)
    # the served answer is the checkpoint's own zero-shot prediction
    model = clip_core.load_model(sets / "ckpt")
    classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), labels)
    transform = clip_core.image_transform(64)
    _, top = clip_core.predict(model, torch.stack([transform(i) for i in images]), classifier, top_k=1)
    assert [row[0] for row in answer["labels"]] == [labels[i] for i in top[:, 0].tolist()]
    assert np.isfinite(answer["scores"]).all()
