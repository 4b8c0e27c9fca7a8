"""The project's promises about itself: the library's import boundary, the command line."""

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import clip_core
from workflows import cli, synthetic

from micro import micro_config

RAYCLIP = Path(sys.executable).parent / "rayclip"


def test_clip_core_never_imports_ray_mlflow_or_torchvision():
    code = ("import sys, clip_core; clip_core.create_model('tiny'); clip_core.get_tokenizer()('a');"
            "print(sorted(m for m in ('ray', 'mlflow', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_workflows_turn_ray_and_mlflow_telemetry_off_unless_asked():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY")}
    code = "import os, workflows; print(os.environ['RAY_USAGE_STATS_ENABLED'], os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["0", "true"]
    asked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**env, "RAY_USAGE_STATS_ENABLED": "1"}).stdout
    assert asked.split() == ["1", "true"]
    # the cluster's nodes run `ray start` from the image (cluster.yaml, the KubeRay pods), never importing
    # workflows: the image sets both itself
    image_env = dict(re.findall(r"^ENV .*?\b(RAY_USAGE_STATS_ENABLED|MLFLOW_DISABLE_TELEMETRY)=(\S+)",
                                (ROOT / "deploy" / "Dockerfile").read_text(), flags=re.MULTILINE))
    assert image_env == {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_cli_errors_are_one_clear_line():
    # a config mistake fails before Ray starts (the demo itself runs end to end in test_pipeline.py)
    result = subprocess.run([str(RAYCLIP), "demo", "--set", "train.stepz=1"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("rayclip demo: error: invalid pipeline config:\n"
                                     "  train.stepz: Extra inputs are not permitted")
    result = subprocess.run([str(RAYCLIP), "run", "nowhere.yaml"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "rayclip run: error: [Errno 2] No such file or directory: 'nowhere.yaml'"


def test_cli_reports_the_installed_version():
    result = subprocess.run([str(RAYCLIP), "--version"], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, f"rayclip {version('rayclip')}")


def test_the_git_commit_recorded_is_rayclips_checkout_never_a_repository_it_is_installed_into(tmp_path):
    import shutil
    import subprocess
    import sys

    from workflows.tracking import git_commit

    assert git_commit() == subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                          check=True).stdout.strip()
    project = tmp_path / "user-project"  # a user's repository, with rayclip installed in its virtualenv
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    subprocess.run(["git", "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=project, check=True)
    site = project / ".venv" / "site-packages"
    shutil.copytree(ROOT / "workflows", site / "workflows")
    found = subprocess.run([sys.executable, "-c", "from workflows.tracking import git_commit; print(git_commit())"],
                           cwd=site, capture_output=True, text=True, check=True).stdout.strip()
    assert found == "None"


def test_synthetic_heldout_classes_never_appear_in_training():
    heldout = set(synthetic.heldout_class_names())
    assert len(heldout) == 16
    seen = {sample.classname for sample in synthetic.samples(600, split="train")}
    assert seen and not seen & heldout
    # yet every colour and every shape is seen in training with some partner
    assert {name.split()[0] for name in seen} == set(synthetic.COLORS)
    assert {name.split()[1] for name in seen} == set(synthetic.SHAPES)
    assert {s.classname for s in synthetic.samples(200, split="heldout")} <= heldout


def test_synthetic_samples_are_deterministic():
    first = next(synthetic.samples(1, seed=7, start=5))
    again = next(synthetic.samples(1, seed=7, start=5))
    assert first.caption == again.caption and first.image.tobytes() == again.image.tobytes()
    assert first.classname.split()[0] in first.caption and first.classname.split()[1] in first.caption


def test_gpu_check_script_runs_end_to_end_on_cpu():
    from bench import gpu_check

    result = gpu_check.main(["--device", "cpu", "--dtype", "fp32", "--model", "tiny", "--batch-size", "4",
                             "--steps", "1", "--warmup", "1", "--report", ""])
    assert result["samples_per_s"] > 0
    # forward + backward ≈ 6 FLOPs per block weight per token: 6 blocks of 12 * 256^2 weights per tower,
    # 65 image tokens and ~15 caption tokens per sample, 4 samples
    expected = 4 * 6 * (6 * 12 * 256**2) * (65 + 15)
    assert 0.8 * expected < result["tflops_per_step"] * 1e12 < 1.2 * expected


ROOT = Path(__file__).resolve().parent.parent


def test_cluster_launcher_config_passes_rays_own_schema_and_has_the_node_groups():
    import json

    import jsonschema
    import ray.autoscaler
    import yaml

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws" and types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    cpu = [t for name, t in types.items() if name != config["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and cpu and all(t["max_workers"] > t["min_workers"] for t in gpu + cpu)  # both groups autoscale
    # the nodes run the image the KubeRay manifests run (deploy/Dockerfile: the versions CI tests), on an AMI
    # the user names (Ray's latest_dlami, Ubuntu 18.04, cannot install the pinned torch); no .venv uploaded
    kuberay = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    head_pod = kuberay["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert config["docker"]["image"] == head_pod["image"]
    assert all(t["node_config"]["ImageId"] != "latest_dlami" for t in types.values())
    assert ".venv" in (ROOT / ".gitignore").read_text() and config["rsync_filter"] == [".gitignore"]
    assert any("MLFLOW_TRACKING_URI" in c for c in config["setup_commands"])
    assert any("RAYCLIP_STORAGE" in c for c in config["setup_commands"])
    # the dashboard's job API runs any code: on the head's loopback, reached through `ray dashboard`'s tunnel
    (start,) = [command for command in config["head_start_ray_commands"] if command.startswith("ray start")]
    assert "--dashboard-host=127.0.0.1" in start
    assert subprocess.run([str(RAYCLIP.parent / "ray"), "up", "--help"], capture_output=True).returncode == 0


def test_kuberay_manifests_run_the_cluster_pipeline_and_serve_the_same_app_as_the_serve_config(monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from deploy import rollout
    from deploy.serve import TOKEN_DIGEST_ENV, TOKEN_ENV, ServeConfig
    from workflows import pipeline

    job = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"] == "rayclip run configs/cluster.yaml --set serve.enabled=false"
    # the service requires its token: the RayJob, which does not serve, runs without it; a run that serves
    # without one is refused before any work (the job gets it in its runtime_env, as README says)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_DIGEST_ENV, raising=False)
    serving = pipeline.load_config(str(ROOT / "configs" / "cluster.yaml"))  # `rayclip config show` needs none
    with pytest.raises(ValueError, match=f"require_auth: the app has no token: set {TOKEN_ENV} or "
                                         f"{TOKEN_DIGEST_ENV} where the pipeline runs"):
        pipeline.run(serving)  # refused before any work (nothing here reaches its S3 or MLflow)
    cluster_pipeline = pipeline.load_config(str(ROOT / "configs" / "cluster.yaml"), ["serve.enabled=false"])
    assert cluster_pipeline.root().startswith("s3://") and cluster_pipeline.train["use_gpu"] is True
    assert cluster_pipeline.train["precision"] == "bf16" and cluster_pipeline.train["batch_size"] == 32768
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups)
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    in_kuberay = ServeDeploySchema(**yaml.safe_load(service["spec"]["serveConfigV2"]))
    standalone = ServeDeploySchema(**yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text()))
    assert in_kuberay.applications == standalone.applications
    settings = ServeConfig(**in_kuberay.applications[0].args)
    assert settings.autoscaling.max_replicas > settings.autoscaling.min_replicas
    assert settings.ingress_autoscaling.max_replicas > settings.ingress_autoscaling.min_replicas
    # zero-shot over ImageNet's classes with its 80 templates, as the pipeline evaluates it, is within limits
    assert settings.limits.max_prompts >= settings.limits.max_labels * len(clip_core.IMAGENET_TEMPLATES) == 80000
    # every pod runs Serve in the high-throughput mode tests/test_serve.py serves the app in
    cluster = service["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {item["name"]: item for item in pod["template"]["spec"]["containers"][0]["env"]}
        assert rollout.HIGH_THROUGHPUT_ENV.items() <= {k: v.get("value") for k, v in env.items()}.items(), env
        # the API never serves without its token: a missing secret stops the pod instead
        assert env["RAYCLIP_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"].get("optional") is not True
    # the dashboard's job API runs any code: Ray's token auth on both clusters
    assert cluster["authOptions"] == job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    # what the pipeline registers and promotes is what the service serves, from the same MLflow, with the same
    # settings: `rayclip run` and `serve deploy` each find the other's app running as wanted
    assert settings.model == f"models:/{cluster_pipeline.registry.name}@champion"
    piped = pipeline.StageConfigs.build(cluster_pipeline)[2]
    assert rollout.runs_as(piped.stored(), settings) and rollout.runs_as(settings.stored(), piped)
    tracking = cluster_pipeline.tracking_uri()
    assert settings.mlflow_tracking_uri == tracking == yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"][
        "MLFLOW_TRACKING_URI"]
    # the zero-shot split can be scored: its class names are given (evaluate would fail after training)
    assert cluster_pipeline.data.options("zeroshot").classnames.startswith("s3://")
    # the image the manifests run is deploy/Dockerfile's, on the Ray version the project pins
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    pinned_ray = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pinned_ray)}-py311-gpu$", dockerfile, re.MULTILINE)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pinned_ray


def test_benchmark_reports_gather_into_one_with_links_into_results(tmp_path):
    from bench import run_all

    results = tmp_path / "results"
    results.mkdir()
    (results / "serve.md").write_text("# Serve\n\nMeasured now.\n\n## Ratios\n\n![Serve](serve.png) [x](https://a.b/c)\n")
    report = run_all.gather(results)
    assert "## Serve\n" in report and "### Ratios\n" in report and "# rayclip benchmarks" in report
    assert "![Serve](results/serve.png)" in report and "[x](https://a.b/c)" in report
    assert "## bench_train.py: no report yet" in report
    # the GPU machine's reports join when present, and only then
    assert "gpu_train" not in report
    (results / "gpu_train.md").write_text("# Train stage from prepared shards\n\n| mfu | 0.41 |\n")
    assert "## Train stage from prepared shards\n\n| mfu | 0.41 |" in run_all.gather(results)


def test_gpu_train_counts_the_training_flops_of_a_sample():
    from bench import gpu_train

    # forward + backward ≈ 6 FLOPs per block weight per token, as in the gpu_check test (one sample)
    expected = 6 * (6 * 12 * 256**2) * (65 + 15)
    assert 0.8 * expected < gpu_train.flops_per_sample("tiny") < 1.2 * expected


def test_device_wheels_leave_out_the_dropped_members_and_still_install(tmp_path):
    import subprocess
    import sys
    import zipfile

    from bench import device_wheels

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    files = {"demo/__init__.py": b"VALUE = 42\n", "demo/jars/big.jar": b"x" * 1000, "demo/app.js.map": b"{}",
             "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                         b"Tag: py3-none-any\n"}
    record = "".join(f"{name},{device_wheels._record_hash(data)},{len(data)}\n" for name, data in files.items())
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("demo-1.0.dist-info/RECORD", record + "demo-1.0.dist-info/RECORD,,\n")

    assert device_wheels.strip_wheel(wheel, ("demo/jars/", ".js.map")) > 0
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        kept_record = archive.read("demo-1.0.dist-info/RECORD").decode()
    assert "demo/jars/big.jar" not in names and "demo/app.js.map" not in names and "demo/__init__.py" in names
    assert "jars" not in kept_record and "js.map" not in kept_record
    assert f"demo/__init__.py,{device_wheels._record_hash(files['demo/__init__.py'])},11" in kept_record
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    assert (target / "demo" / "__init__.py").read_text() == "VALUE = 42\n"
    assert not (target / "demo" / "jars").exists()


def test_free_ports_are_never_given_twice_in_a_session():
    # the OS offers a closed probe's port again: a Ray head once got one port for two of its components
    from ports import free_port

    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)


@pytest.mark.parametrize("content", ["zeroshot top1 0.7", "[1, 2]", '{"zeroshot": 5}'])
def test_register_names_a_metrics_file_that_is_not_evaluate_json(tmp_path, capsys, content):
    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), tmp_path / "ckpt")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(content)
    assert cli.main(["register", str(tmp_path / "ckpt"), "--name", "clip", "--metrics", str(metrics),
                     "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    error = capsys.readouterr().err
    assert f"rayclip register: error: --metrics {metrics}: not the JSON object `rayclip evaluate --json` writes" \
        in error, error


@pytest.mark.parametrize("seconds", ["inf", "1e300", "nan", "0", "-1", "86401"])
def test_poll_interval_must_be_a_finite_number_of_seconds(capsys, seconds):
    # threading.Event.wait(inf) raises OverflowError: once the service is up, too late to say so
    for command in ("serve", "deploy"):
        with pytest.raises(SystemExit) as exited:
            cli.build_parser().parse_args([command, "--poll-registry", seconds])
        assert exited.value.code == 2
        assert f"rayclip {command}: error: argument --poll-registry: {seconds}: give a number of seconds " \
               "above 0, at most 86400 (a day)" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["serve", "--poll-registry", "86400"]).poll_registry == 86400


def test_the_preprocess_command_offers_every_source_format_and_no_other():
    # the command line lists them itself (parsing it does not import pyarrow, as sources does)
    from workflows import sources

    formats = next(action.choices for action in cli.build_parser()._subparsers._group_actions[0].choices[
        "preprocess"]._actions if action.dest == "format")
    assert tuple(formats) == sources.FORMATS


def test_a_flag_a_stages_config_refuses_is_one_line_naming_it(tmp_path, capsys):
    from workflows.registry import Gate

    # the gate's metric is one evaluate records (R@k as OpenCLIP spells it, too): a misspelt one passed a whole
    # pipeline run to fail at promotion as a version without it
    assert Gate(metric="retrieval.text_to_image_R@5").metric == "retrieval.text_to_image_R5"
    assert Gate(metric="linear_probe.k16_top1").metric == "linear_probe.k16_top1"
    assert cli.main(["promote", "clip", "--metric", "zeroshot.acc",
                     "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert capsys.readouterr().err == ("rayclip promote: error: metric: gate metric 'zeroshot.acc' is not one "
                                       "`rayclip evaluate` records: zeroshot.top1, zeroshot.top5, zeroshot.mean_per_"
                                       "class_recall, retrieval.image_to_text_R1 (or R5, R10, mean_rank, median_rank;"
                                       " text_to_image_ likewise), linear_probe.full_top1 or linear_probe.k<shots>_"
                                       "top1\n")
    assert cli.main(["train", "--data", "prepared", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "rayclip train: error: steps: Input should be greater than 0\n"
