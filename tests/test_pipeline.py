"""The pipeline: one config drives every stage, `rayclip demo` runs it end to end and asks the live
service, a rerun skips every stage already done, and config mistakes name the key and its line."""

import json
import os
import re
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import clip_core
from workflows import cli, demo, pipeline, synthetic
from workflows.preprocess import read_manifest
from workflows.tracking import redact, without_credentials

from micro import micro_config
from ports import free_port


def test_config_mistakes_name_each_key_with_its_file_and_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "pipeline.yaml"
    path.write_text("data:\n  preprocess:\n    image_size: big\nregistry:\n  gate:\n    max_drop: -1\n")
    with pytest.raises(pipeline.ConfigError) as error:
        pipeline.load_config(str(path))
    assert f"data.preprocess.image_size: Input should be a valid integer, unable to parse string as an integer " \
           f"({path}, line 3)" in str(error.value)
    assert f"registry.gate.max_drop: Input should be greater than or equal to 0 ({path}, line 6)" in str(error.value)

    path.write_text("train:\n  steps: 10\n  stepz: 3\n")  # a stage section checks against the stage's own config
    with pytest.raises(pipeline.ConfigError, match=rf"train\.stepz: Extra inputs are not permitted \({path}, line 3\)"):
        pipeline.load_config(str(path))
    path.write_text("train:\n  data: [elsewhere]\n")
    with pytest.raises(ValueError, match="train: data set by the pipeline"):
        pipeline.load_config(str(path))
    with pytest.raises(ValueError, match="serve: index set by the pipeline"):  # it embeds data.index itself
        pipeline.load_config(None, ["data.index=synthetic://train?count=8", "serve.index=/elsewhere/index"])
    with pytest.raises(pipeline.ConfigError, match=r"--set 'train': write KEY\.PATH=VALUE"):
        pipeline.load_config(None, ["train"])
    path.write_text("data:\n  zeroshot: s3://bucket/imagenet/val.csv\n")  # labels, but nothing names them
    with pytest.raises(pipeline.ConfigError, match=rf"data: .*needs the class names: set data\.split_options\."
                                                   rf"zeroshot\.classnames .*\({path}, line 1\)"):
        pipeline.load_config(str(path))

    config = pipeline.load_config(None, ["train.steps=7", "serve.port=9001", "registry.gate.floor=0.25"])
    assert (config.train["steps"], config.serve["port"], config.registry.gate.floor) == (7, 9001, 0.25)
    # --set changes one key of a section as it would be without it: the embedded 100 steps stay
    assert pipeline.load_config(None, ["train.seed=1"]).train == {"steps": 100, "seed": 1}
    path.write_text("registry:\n  name: other\n")  # a file without a train section: its default too
    assert pipeline.load_config(str(path), ["train.seed=1"]).train == {"steps": 100, "seed": 1}
    # and so in a nested section: the embedded 64 px preprocessing stays 64 px
    options = pipeline.load_config(None, ["data.preprocess.dedupe=false"]).data.preprocess
    assert (options.dedupe, options.image_size, options.rows_per_shard) == (False, 64, 2048)
    # DESIGN's cluster spellings: `storage: URI` for storage.root, Ray's num_workers for train.workers
    path.write_text("storage: s3://bucket/runs\nmlflow:\n  tracking_uri: http://127.0.0.1:5000\ntrain:\n"
                    "  num_workers: 4\n  use_gpu: true\n")
    cluster = pipeline.load_config(str(path))
    assert cluster.root() == "s3://bucket/runs" and cluster.train == {"workers": 4, "use_gpu": True}
    assert "  workers: 4\n" in pipeline.show(cluster) and "num_workers" not in pipeline.show(cluster)
    assert pipeline.load_config(None, ["storage.root=~/runs"]).root() == os.path.expanduser("~/runs")
    (tmp_path / "short.yaml").write_text("storage: s3://bucket/runs\nmlflow:\n  tracking_uri: http://127.0.0.1:5000\n")
    assert pipeline.load_config(str(tmp_path / "short.yaml"), ["storage.root=s3://other/runs"]).root() == \
        "s3://other/runs"
    assert pipeline.load_config(None, ["storage.root=file:///data/runs"]).root() == "/data/runs"
    with pytest.raises(pipeline.ConfigError, match="storage.root 'gs://b/runs': give a local directory or an s3://"):
        pipeline.load_config(None, ["storage.root=gs://b/runs"])
    # local paths are pinned to this directory: Ray's workers (and a job's driver) run elsewhere
    local = pipeline.load_config(None, ["model.name=micro.json", "data.train=shards/{0..3}.tar"])
    assert (local.model.name, local.data.train) == (os.path.abspath("micro.json"), os.path.abspath("shards/{0..3}.tar"))
    shown = pipeline.show(config)
    assert "steps: 7" in shown and "lr: 0.001" in shown  # the tiny preset's recipe, resolved
    path.write_text("train:\n  steps: [1\n")  # what `rayclip run` and `config show` answer: no traceback
    assert cli.main(["config", "show", str(path)]) == 2
    assert "rayclip config: error: not valid YAML: while parsing a flow sequence" in capsys.readouterr().err
    assert cli.main(["config", "show", "--set", "train.steps={"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    with pytest.raises(pipeline.ConfigError, match=r"registry.gate.metric 'zeroshot.top1': the pipeline's "
                                                   r"evaluation would not produce it"):
        pipeline.load_config(None, ["data.zeroshot=null"])  # after training, no version could ever be promoted
    pipeline.load_config(None, ["data.zeroshot=null", "registry.gate.metric=retrieval.image_to_text_R1"])
    with pytest.raises(pipeline.ConfigError, match=r"serve.enabled must be true or false, not 'false'"):
        pipeline.load_config(None, ["serve.enabled='false'"])
    # the deploy stage cannot hand a URI's password to Serve's replicas: refused before any work, unless
    # they can read it from MLflow's variables (or there is no deploy stage)
    secret_overrides = ["mlflow.tracking_uri=http://ops:hunter2@127.0.0.1:5000", "serve.auth_token=token-Secret-42"]
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(pipeline.ConfigError, match="set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        pipeline.load_config(None, secret_overrides)
    with pytest.raises(pipeline.ConfigError, match=r"serve from an MLflow tracking server \(http://\)"):
        pipeline.load_config(None, ["mlflow.tracking_uri=postgresql://mlflow:s3cret@db/mlflow"])
    assert not pipeline.load_config(None, [*secret_overrides, "serve.enabled=false"]).serving()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ops")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    secret = pipeline.load_config(None, secret_overrides)
    shown = pipeline.show(secret)  # what `rayclip config show` prints and the pipeline run logs
    assert "http://***@127.0.0.1:5000" in shown and "auth_token: '***'" in shown
    assert redact("at https://u:p@ss@host:5000/api, then s3://b/k@1") == "at https://***@host:5000/api, then s3://b/k@1"
    assert without_credentials("https://u:p@ss@host/api") == "https://host/api"
    assert "hunter2" not in shown and "token-Secret-42" not in shown
    # Serve would show the app's config on its dashboard: its replicas get the URI without the password
    assert pipeline.StageConfigs.build(secret)[2].mlflow_tracking_uri == "http://127.0.0.1:5000"


def test_stage_keys_outlive_releases_that_add_options(tmp_path):
    """Upgrading rayclip must not rerun a user's preprocessing and training (days on a cluster): a stage's key
    holds only the values that differ from their defaults. If the recorded keys below change, every earlier
    output is orphaned: change them only together with pipeline.KEY_VERSION, on purpose."""
    config = pipeline.PipelineConfig()  # the embedded default, as `make demo` runs it
    train, evaluate, _ = pipeline.StageConfigs.build(config)
    digests = {"train": "sha256:0", "val": "sha256:1"}
    eval_digests = {"zeroshot": "sha256:2", "retrieval": "sha256:1"}
    keys = {"data": pipeline.data_key(config.data.options("train"), config.data.train),
            "train": pipeline.stage_key(train, digests, unkeyed=pipeline._TRAIN_UNKEYED),
            "eval": pipeline.stage_key(evaluate, eval_digests, unkeyed=pipeline._EVAL_UNKEYED)}
    # (the data key also holds preprocess.OUTPUT_VERSION: bumped, it prepares the data again, and trains again
    # only if the data's digest changed)
    assert keys == {"data": "df8241843f420923", "train": "636cdfa4323bb5e8", "eval": "45fbe26b3c52d6ce"}

    # a class-names file is keyed by what it names: edited (two classes swapped), its labels are others
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n")
    options = config.data.options("zeroshot").model_copy(update={"classnames": str(names)})
    before = pipeline.data_key(options, "labeled.parquet")
    assert before == pipeline.data_key(options.model_copy(update={"classnames": ["cat", "dog"]}), "labeled.parquet")
    names.write_text("dog\ncat\n")
    assert pipeline.data_key(options, "labeled.parquet") != before

    def train_key(**update):
        return pipeline.stage_key(train.model_copy(update=update), digests, unkeyed=pipeline._TRAIN_UNKEYED)

    # an option at its default, written out, is no option; set otherwise it is another run
    assert train_key(patch_dropout=0.0, grad_clip_norm=1.0) == keys["train"]
    assert train_key(patch_dropout=0.5) != keys["train"] and train_key(steps=101) != keys["train"]
    assert pipeline.stage_key(train, {**digests, "train": "sha256:2"}, unkeyed=pipeline._TRAIN_UNKEYED) != keys["train"]
    # where a run logs is no part of what it computes
    assert train_key(mlflow_tracking_uri="http://127.0.0.1:5001", mlflow_experiment="other") == keys["train"]
    # nor where the storage root puts the checkpoint and the prepared sets: evaluation keys their content
    moved = evaluate.model_copy(update={"model": "/elsewhere/checkpoints/train-x", "zeroshot": "/elsewhere/z",
                                        "retrieval": "/elsewhere/v", "output_json": "/elsewhere/eval.json"})
    assert pipeline.stage_key(moved, eval_digests, unkeyed=pipeline._EVAL_UNKEYED) == keys["eval"]
    assert pipeline.stage_key(evaluate.model_copy(update={"templates": "simple"}), eval_digests,
                              unkeyed=pipeline._EVAL_UNKEYED) != keys["eval"]
    assert pipeline.stage_key(evaluate, {**eval_digests, "zeroshot": "sha256:3"},
                              unkeyed=pipeline._EVAL_UNKEYED) != keys["eval"]

    # Defaults are left out of keys, so a changed default goes unseen: each recorded one must hold (a new
    # option may be added to the record); one that changes needs KEY_VERSION bumped and the record rewritten.
    recorded = json.loads((Path(__file__).parent / "stage_defaults.json").read_text())
    assert recorded.pop("key_version") == pipeline.KEY_VERSION
    for stage in (type(config.data.preprocess), type(train), type(evaluate)):
        defaults = recorded[stage.__name__]
        now = {name: stage.model_fields[name].get_default(call_default_factory=True) for name in defaults
               if name in stage.model_fields}
        assert now == defaults, f"{stage.__name__}'s defaults changed: bump pipeline.KEY_VERSION"


def test_editing_the_model_file_or_the_init_weights_trains_again(tmp_path):
    model_file, weights = tmp_path / "model.json", tmp_path / "init"
    model_file.write_text(json.dumps(micro_config().to_dict()))
    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), weights)
    config = pipeline.load_config(None, [f"model.name={model_file}", f"model.init={weights}"])
    train = pipeline.StageConfigs.build(config)[0]

    def key():
        return pipeline.stage_key(train, {"train": "sha256:0"}, *pipeline.train_inputs(train),
                                  unkeyed=pipeline._TRAIN_UNKEYED)

    before = key()
    assert key() == before  # nothing read differently: the rerun skips training
    model_file.write_text(json.dumps(micro_config().replace(embed_dim=48).to_dict()))
    edited = key()
    assert edited != before
    os.utime(weights / "model.safetensors", ns=(1, 1))  # weights copied in anew
    assert key() != edited
    # a preset trained from scratch keys as it always did (test_stage_keys_outlive_releases_that_add_options)
    assert pipeline.train_inputs(pipeline.StageConfigs.build(pipeline.PipelineConfig())[0]) == []


def test_a_root_whose_path_holds_url_characters_keeps_mlflow_and_its_artifacts_in_it(tmp_path, monkeypatch):
    """The default tracking store is a sqlite database under storage.root: a '?' in that path would end
    SQLAlchemy's database name there, a '%20' would become a space, and a '#' would cut the artifact URI."""
    from workflows.tracking import set_experiment, using

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "run 1%20a#b?c=d"
    root.mkdir()
    config = pipeline.load_config(None, [f"storage.root={root}"])
    uri = config.tracking_uri()
    with using(uri):
        experiment = set_experiment("x")
        with mlflow.start_run(experiment_id=experiment.experiment_id):
            mlflow.log_text("hello", "note.txt")
    assert (root / "mlflow.db").is_file() and sorted(p.name for p in root.iterdir()) == ["mlartifacts", "mlflow.db"]
    assert [p.read_text() for p in (root / "mlartifacts").rglob("note.txt")] == ["hello"]


def test_the_pipelines_service_takes_the_token_of_the_environment_it_runs_in(monkeypatch):
    """As `rayclip serve` does: the replicas, wherever they run, get the token's digest in their config."""
    from deploy.serve import TOKEN_ENV, open_warning, sha256_hex

    monkeypatch.setenv(TOKEN_ENV, "tok-Pipeline-1")
    serve = pipeline.StageConfigs.build(pipeline.load_config(None, ["serve.host=0.0.0.0"]))[2]
    assert serve.auth_token_sha256 == sha256_hex("tok-Pipeline-1") and open_warning(serve) is None
    monkeypatch.delenv(TOKEN_ENV)
    serve = pipeline.StageConfigs.build(pipeline.load_config(None, ["serve.host=0.0.0.0"]))[2]
    assert serve.auth_token_sha256 is None and "listens on 0.0.0.0:8000 without auth" in open_warning(serve)


def test_the_demo_on_a_config_of_its_own_reports_that_zero_shot_set_and_asks_no_synthetic_questions(
        tmp_path, monkeypatch):
    """The chance figure and the classify requests are about the built-in synthetic heldout classes: on another
    zero-shot set (ImageNet, say) the demo reports that set's top-1 and sends the service no synthetic shapes."""
    from deploy import rollout

    outcome = {"metrics": {"zeroshot": {"top1": 0.5, "classes": 1000}}, "url": "http://127.0.0.1:1",
               "mlflow_run_id": "0123", "model_version": "1"}
    monkeypatch.setattr(pipeline, "run", lambda config, echo: dict(outcome))
    posted = []
    monkeypatch.setattr(demo, "_post", lambda url, route, payload, token: posted.append(route) or [])
    monkeypatch.setattr(rollout, "stop", lambda *_: None)
    lines = []
    demo.run_demo([f"storage.root={tmp_path}", "data.zeroshot=/data/imagenet/val",
                   "data.split_options.zeroshot.classnames=[tench, goldfish]"], echo=lines.append)
    assert "zero-shot top-1 on /data/imagenet/val: 50.0% (1000 classes, chance 0.1%)" in lines, lines
    assert posted == [] and not any("never seen in training" in line or "/v1/classify" in line for line in lines)

    demo.run_demo([f"storage.root={tmp_path}"], echo=lines.append)  # the embedded default: the synthetic set
    assert "zero-shot top-1 on colour-shape combinations never seen in training: 50.0% (chance 6.2%)" in lines
    assert posted == ["/v1/classify"]


def test_a_command_on_a_node_where_ray_start_made_a_cluster_joins_it(tmp_path):
    """A cluster launcher's node: `ray start` ran there and RAY_ADDRESS is unset; `rayclip run` after `ray attach`
    joins that cluster, as plain ray.init() does (init_ray passed a local Ray's options, which Ray refuses when
    joining: every command failed there)."""
    import contextlib
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    system_temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: unix socket paths; Ray's is <it>/ray
    env = {**os.environ, "RAY_TMPDIR": system_temp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                             *(f"--{name}={free_port()}" for name in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                 "runtime-env-agent-port", "node-manager-port", "object-manager-port"))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        recorded = Path(system_temp, "ray", "ray_current_cluster")
        deadline = time.monotonic() + 120
        while not recorded.exists():  # polling for the file `ray start` writes once its cluster is up
            assert head.poll() is None and time.monotonic() < deadline, "ray start did not come up"
            time.sleep(0.2)
        joined = subprocess.run([sys.executable, "-c", "from workflows.runtime import init_ray, joined_cluster; "
                                 "init_ray(dashboard=True); import ray; "
                                 "print(joined_cluster(), ray.get_runtime_context().gcs_address)"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert joined.returncode == 0, joined.stderr[-3000:]
        # and knows it joined: `rayclip serve` ending there takes down its own app, not the cluster's Serve
        assert joined.stdout.strip().startswith("True ") and joined.stdout.strip().endswith(f":{port}"), joined.stdout
    finally:
        head.send_signal(signal.SIGINT)  # `ray start --block` stops its processes on SIGINT, only its own
        try:
            head.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)


def _micro_pipeline(tmp_path) -> list[str]:
    """--set overrides for a pipeline small enough for a test: the micro model, a few steps, little data."""
    model_file = tmp_path / "micro.json"
    model_file.write_text(json.dumps(micro_config().to_dict()))
    return [f"storage.root={tmp_path / 'work'}", f"model.name={model_file}", "train.steps=6",
            "train.batch_size=32", "train.checkpoint_every=3", "eval.batch_size=64",
            "data.train=synthetic://train?count=192&seed=0", "data.val=synthetic://train?count=48&seed=5",
            "data.zeroshot=synthetic://heldout?count=48&seed=6", f"serve.port={free_port()}"]


def test_the_demo_as_a_ray_job_stopped_in_training_resumes_serves_answers_then_a_rerun_skips_every_stage(
        tmp_path, ray_session, monkeypatch, capsys):
    """`ray job submit` to a local head (real job submission over 127.0.0.1). The first job (`rayclip run`)
    is stopped (`ray job stop`) while training; `rayclip demo` submitted on the same config skips
    preprocessing, resumes training from the checkpoint, completes every later stage and answers from the
    live service as the trained checkpoint does; a rerun then skips every stage."""
    import contextlib
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import yaml

    bin_dir = Path(sys.executable).parent
    # a stopped job's driver gets 30 s between SIGTERM and SIGKILL (Ray's default, 3 s, is tight on 2 loaded cores)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_JOB_STOP_WAIT_TIME_S": "30"}
    env.pop("RAY_ADDRESS", None)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "micro.json").write_text(json.dumps(micro_config().to_dict()))
    overrides = dict(item.split("=", 1) for item in _micro_pipeline(tmp_path))
    config = {"model": {"name": "micro.json"},  # a path in the job's working directory
              "storage": {"root": overrides["storage.root"]},
              "train": {"steps": 6, "batch_size": 32, "checkpoint_every": 3}, "eval": {"batch_size": 64},
              "data": {split: overrides[f"data.{split}"] for split in ("train", "val", "zeroshot")},
              "serve": {"port": int(overrides["serve.port"])}}
    (job_dir / "pipeline.yaml").write_text(yaml.safe_dump(config))
    dashboard = f"http://127.0.0.1:{free_port()}"
    # its own temp dir (short: unix socket paths), so nothing else on this machine joins this cluster
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    log = open(tmp_path / "head.log", "w+")
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={free_port()}",
                             "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
                             f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}",
                             # not the defaults: this session's own Ray already holds them (its job agent
                             # would never come up, and the job server answers "no available agent")
                             *(f"--{name}={free_port()}" for name in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                 "runtime-env-agent-port"))],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    marker = tmp_path / "hung"
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        deadline = time.monotonic() + 180
        while True:  # the job server answers before its agent takes jobs: that refusal says "try again later"
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                # the first job's rank 0 stops making progress at step 5 (after the step-3 checkpoint)
                jobs = JobSubmissionClient(dashboard)
                first = jobs.submit_job(entrypoint=f"rayclip run pipeline.yaml --set 'train.fault_injection="
                                        f"{{rank: 0, step: 5, marker: {marker}, action: hang}}'",
                                        runtime_env={"working_dir": str(job_dir)})
                break
            except (ConnectionError, RuntimeError) as exc:
                assert time.monotonic() < deadline, f"the head's job server took no job in 180 s: {exc}"
                time.sleep(1)
        deadline = time.monotonic() + 400
        while not marker.exists():
            assert jobs.get_job_status(first) in (JobStatus.PENDING, JobStatus.RUNNING), jobs.get_job_logs(first)
            assert time.monotonic() < deadline, "the first job did not reach training step 5 in 400 s"
            time.sleep(1)
        assert jobs.stop_job(first)
        deadline = time.monotonic() + 60
        while jobs.get_job_status(first) == JobStatus.RUNNING and time.monotonic() < deadline:
            time.sleep(0.5)  # Ray sends SIGTERM, then SIGKILL RAY_JOB_STOP_WAIT_TIME_S later
        first_logs = jobs.get_job_logs(first)
        assert jobs.get_job_status(first) == JobStatus.STOPPED, first_logs[-5000:]
        assert "[preprocess train] done" in first_logs and "[train]" not in first_logs, first_logs[-5000:]
        assert "rayclip run: interrupted" in first_logs, first_logs[-5000:]

        job = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", dashboard, "--working-dir",
                              str(job_dir), "--", "rayclip", "demo", "--config", "pipeline.yaml"],
                             env=env, capture_output=True, text=True, timeout=600)
        output = job.stdout + job.stderr
        lines = output.splitlines()
        assert job.returncode == 0 and "succeeded" in output, output[-5000:]
        for line in ("[preprocess train] skipped", "[preprocess val] skipped", "[preprocess zeroshot] skipped",
                     "[evaluate] done", "[register] done: clip version 1", "[promote] passed", "[deploy] done",
                     "pipeline: done", "zero-shot top-1 on colour-shape combinations never seen",
                     "mlflow ui --backend-store-uri"):
            assert line in output, (line, output[-5000:])
        (trained,) = [line for line in lines if line.startswith("[train] done")]
        assert "step 6" in trained and trained.split("resumed from ")[1].split(" ")[0] \
            .endswith("checkpoint_00000003"), trained
        checkpoint = trained.rsplit("→ ", 1)[1].strip()

        def uri_of(split):
            (skipped,) = [line for line in lines if line.startswith(f"[preprocess {split}] skipped: ")]
            return skipped.split(": ", 1)[1].split(" exists")[0]

        assert uri_of("index") == uri_of("val")  # the demo indexes the validation pairs: prepared once
        counts = read_manifest(uri_of("train"))["counts"]
        assert counts["read"] == 192 and counts["kept"] + counts["rejected"] == 192
        # zero-shot is scored among the combinations never seen in training only
        assert read_manifest(uri_of("zeroshot"))["classnames"] == synthetic.heldout_class_names()

        # the live service answered the demo's questions as the trained checkpoint does (printed to the %)
        model = clip_core.load_model(checkpoint)
        labels = synthetic.heldout_class_names()
        images = [s.image for s in synthetic.samples(3, split="heldout", seed=2026, image_size=64)]
        with torch.no_grad():
            classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), labels)
            probs, top = clip_core.predict(model, torch.stack([clip_core.image_transform(64)(i) for i in images]),
                                           classifier, top_k=3)
        answers = [line.split(" → ", 1)[1].split(", ") for line in lines if line.startswith("POST ")
                   and "/v1/classify" in line]
        assert len(answers) == 3, output[-5000:]
        for answer, expected_probs, expected_top in zip(answers, probs.tolist(), top.tolist()):
            ranked = [item.rsplit(" ", 1) for item in answer]
            assert [label for label, _ in ranked] == [labels[j] for j in expected_top], (answer, expected_top)
            for (_, score), expected in zip(ranked, expected_probs):
                # within half a percent, plus the service's float32 rounding at the edge of one
                assert abs(float(score.rstrip("%")) - 100 * expected) <= 0.51, (answer, expected_probs)

        # the demo embedded the validation pairs with the champion and searched them through the service
        (indexed,) = [line for line in lines if line.startswith("[index] done: ")]
        stored = pq.read_table(Path(indexed.rsplit("→ ", 1)[1].strip()) / "embeddings")
        assert stored.num_rows == read_manifest(uri_of("val"))["counts"]["kept"] > 40
        assert f"{stored.num_rows} rows embedded by clip version 1" in indexed, indexed
        with torch.no_grad():
            query = model.encode_text(clip_core.get_tokenizer()([demo.SEARCH]), normalize=True).numpy()[0]
        cosines = np.stack(stored["image_embedding"].to_numpy(zero_copy_only=False)) @ query
        (searched,) = [line.split(" → ", 1)[1].split("; ") for line in lines if line.startswith("POST ")
                       and "/v1/search" in line]
        printed = [item.rsplit(" ", 1) for item in searched]
        assert [float(cosine) for _, cosine in printed] == pytest.approx(sorted(cosines)[::-1][:3], abs=0.006)
        captions = stored["caption"].to_pylist()
        for caption, cosine in printed:  # each a validation row's caption at its printed cosine
            assert any(abs(cosines[j] - float(cosine)) <= 0.006 for j in range(len(captions))
                       if captions[j] == caption), (caption, cosine)

        # MLflow: the stopped job's pipeline run ended as killed and holds the stage runs as children; the
        # demo's finished, continuing the interrupted training run (one train run, finished at step 6)
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("rayclip").experiment_id],
                                  order_by=["attributes.start_time ASC"])
        pipelines = [r for r in runs if r.data.tags.get("rayclip.stage") == "pipeline"]
        assert [r.info.status for r in pipelines] == ["KILLED", "FINISHED"], [(r.info, r.data.tags) for r in runs]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipelines[0].info.run_id]
        assert sorted(r.data.tags["rayclip.stage"] for r in children) == ["preprocess"] * 3 + ["train"]
        (training,) = [r for r in runs if r.data.tags.get("rayclip.stage") == "train"]
        assert training.info.status == "FINISHED" and "eval.zeroshot.top1" in training.data.metrics
        assert max(m.step for m in client.get_metric_history(training.info.run_id, "loss")) == 6
        assert pipelines[1].data.tags["rayclip.model_version"] == "clip/1"
        assert pipelines[1].data.tags["rayclip.promoted"] == "True"
        assert client.get_registered_model("clip").aliases == {"champion": 1, "challenger": 1}
        version = client.get_model_version("clip", "1")
        assert version.tags["dataset_digests"] == read_manifest(uri_of("train"))["digest"]
        assert version.tags["train_run_id"] == training.info.run_id
        assert version.tags["weights_sha256"] == clip_core.checkpoint.file_sha256(f"{checkpoint}/model.safetensors")

        # the stages' own commands find the demo's registry as the demo says
        (hint,) = [line.split()[1:4] for line in lines if line.lstrip().startswith("registry:")]
        assert hint[1:] == ["rayclip", "models"] and hint[0].startswith("MLFLOW_TRACKING_URI=")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", hint[0].partition("=")[2])
        capsys.readouterr()
        assert cli.main(["models", "clip"]) == 0
        assert re.search(r"^1 +\S*champion", capsys.readouterr().out, re.MULTILINE)
        monkeypatch.delenv("MLFLOW_TRACKING_URI")

        # a rerun with the same inputs (here, in this process and its Ray) does no work again, and serves nothing
        (described,) = [line for line in lines if line.lstrip().startswith("train: ") and " on 1 worker(s)" in line]
        model_file = described.split("train: ", 1)[1].split(" on 1 worker(s)")[0]  # the job's copy of micro.json
        again = pipeline.run(pipeline.load_config(str(job_dir / "pipeline.yaml"),
                                                  [f"model.name={model_file}", "serve.enabled=false"]),
                             echo=lambda *_: None)
        assert set(again["stages"].values()) == {"skipped"}, again["stages"]
        assert [str(v.version) for v in client.search_model_versions("name = 'clip'")] == ["1"]
    finally:
        # `ray start --block` stops its processes in ~2 s on SIGINT (on SIGTERM: ~34 s here)
        head.send_signal(signal.SIGINT)
        try:
            head.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever did not stop (nothing, normally)
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
