"""`rayclip run CONFIG`: preprocess → train → evaluate → register → promote → deploy from one config.

Each stage's output is keyed by a digest of what it depends on (sources and options, dataset
content digests, the resolved train config, the checkpoint), so a rerun skips every stage whose
output exists and resumes a training run that was interrupted from its latest checkpoint. A key
holds only the values that differ from their defaults, so upgrading rayclip to a release that adds
an option keeps every output made before (see `stage_key`).
A parent MLflow run (`pipeline`) holds the stage runs as children: dataset digest → train run →
model version → deployment.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import storage
from .preprocess import OUTPUT_VERSION, PreprocessOptions, preprocess, read_manifest
from .registry import Gate
from .tracking import redacted, set_experiment, sqlite_uri, using, without_credentials

PIPELINE_KEY_TAG = "rayclip.pipeline_key"  # on a model version: the train key of the checkpoint it holds
# fields of the stage configs that the pipeline sets itself (from data/model/storage/mlflow sections)
_TRAIN_OWNED = {"data", "val", "zeroshot", "output", "storage", "model", "init", "resume", "run_name",
                "mlflow_tracking_uri", "mlflow_experiment", "mlflow_parent_run_id", "data_digests"}
# fields that do not change what a stage computes, so not part of its key: where it logs, and the train
# stage's inputs (keyed by their content digests instead), chaos rehearsal and logging cadence
_TRACKING = {"mlflow_tracking_uri", "mlflow_experiment", "mlflow_parent_run_id", "mlflow_run_id"}
_TRAIN_UNKEYED = {"data", "val", "zeroshot", "fault_injection", "max_failures", "log_every", "data_digests",
                  "run_name", "git_commit", *_TRACKING}
# evaluation: its checkpoint is keyed by the train key, its sets by their digests (so moving storage.root reruns
# nothing)
_EVAL_UNKEYED = {"model", "zeroshot", "retrieval", "output_json", *_TRACKING}
# Bump when a release changes what a default computes (a default's value, or what a stage does with it): stage
# keys leave defaults out, so nothing else tells an earlier output from the new one.
KEY_VERSION = 1
_EVAL_OWNED = {"model", "zeroshot", "retrieval", "linear_probe", "classnames", "output_json", "mlflow_tracking_uri",
               "mlflow_experiment", "mlflow_run_id", "mlflow_parent_run_id"}
_SERVE_OWNED = {"model", "mlflow_tracking_uri"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _absolute(value: str | None) -> str | None:
    """A local path made absolute against this process's directory (Ray's workers run elsewhere);
    URIs (s3://, synthetic://, models:/) and None as they are."""
    if value is None or value.startswith("models:/"):
        return value
    prefix, sep, path = value.partition(":") if value.startswith(("openai:", "openclip:")) else ("", "", value)
    return f"{prefix}{sep}{storage.absolute(path)}"


class DataSection(_Section):
    train: str = Field("synthetic://train?count=4096&seed=0", description="raw captioned pairs (any preprocess source)")
    val: str | None = Field("synthetic://train?count=256&seed=101", description="raw pairs for retrieval and "
                            "validation loss")
    zeroshot: str | None = Field("synthetic://heldout?count=512&seed=102", description="raw labeled set for zero-shot "
                                 "(the synthetic one: colour-shape combinations never seen in training)")
    index: str | None = Field(None, description="raw captioned pairs to embed with the champion (`rayclip embed`) "
                              "and serve at POST /v1/search (default: none)")
    preprocess: PreprocessOptions = PreprocessOptions(image_size=64, rows_per_shard=2048)

    _local_paths = field_validator("train", "val", "zeroshot", "index")(_absolute)
    split_options: dict[Literal["train", "val", "zeroshot", "index"], dict[str, Any]] = Field(
        {}, description="per split, PreprocessOptions fields over `preprocess` (e.g. zeroshot: {label_key: cls, "
        "classnames: [...]})")

    def options(self, split: str) -> PreprocessOptions:
        base = self.preprocess.model_dump()
        return PreprocessOptions(**{**base, **self.split_options.get(split, {})})

    @model_validator(mode="after")
    def _zeroshot_has_class_names(self):
        # a synthetic set brings its own, an imagefolder its folders'; without them evaluate would fail only
        # after training
        options = {**self.preprocess.model_dump(), **self.split_options.get("zeroshot", {})}
        if self.zeroshot and not self.zeroshot.startswith("synthetic://") and \
                not (options.get("classnames") or options.get("format") == "imagefolder"):
            raise ValueError("zero-shot scoring needs the class names: set data.split_options.zeroshot.classnames "
                             "to a list, or to a file (local or s3://) with one per line, line i naming label i; "
                             "or, for a folder of images per class, data.split_options.zeroshot.format: imagefolder")
        return self


class ModelSection(_Section):
    name: str = Field("tiny", description="preset, or a JSON file with a model config")
    init: str | None = Field(None, description="pretrained weights (openai:PATH | openclip:PATH | PATH)")

    @field_validator("name")
    @classmethod
    def _model_file(cls, value: str) -> str:
        return _absolute(value) if value.endswith(".json") else value  # else a preset's name

    _weights = field_validator("init")(_absolute)


class RegistrySection(_Section):
    name: str = "clip"
    gate: Gate = Gate()
    force: bool = False


class StorageSection(_Section):
    root: str | None = Field(None, description="local directory or s3:// prefix for data, runs and checkpoints "
                             "(default: $RAYCLIP_STORAGE, else ./work)")


class MlflowSection(_Section):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite under "
                                     "storage.root (a local root only)")
    experiment: str = "rayclip"


class RaySection(_Section):
    address: str | None = Field(None, description="default: $RAY_ADDRESS, else a local Ray")


class PipelineConfig(_Section):
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    train: dict[str, Any] = Field({"steps": 100}, description="TrainConfig fields (recipe, workers, checkpoints); "
                                  "a section given replaces the default's 100 steps, and what it leaves unset "
                                  "comes from the preset's recipe")
    eval: dict[str, Any] = Field({}, description="EvaluateConfig fields (templates, batch_size, workers)")
    registry: RegistrySection = RegistrySection()
    serve: dict[str, Any] = Field({}, description="ServeConfig fields; enabled: false skips the deploy stage")
    storage: StorageSection = StorageSection()
    mlflow: MlflowSection = MlflowSection()
    ray: RaySection = RaySection()

    @field_validator("storage", mode="before")
    @classmethod
    def _storage_shorthand(cls, value):
        return {"root": value} if isinstance(value, str) else value  # `storage: s3://…` for `storage.root`

    @field_validator("train", mode="before")
    @classmethod
    def _ray_spelling(cls, value):
        # Ray's ScalingConfig(num_workers=…) spelling, kept under one key (TrainConfig takes both)
        if isinstance(value, dict) and "num_workers" in value and "workers" not in value:
            value = {("workers" if key == "num_workers" else key): item for key, item in value.items()}
        return value

    def root(self) -> str:
        root = storage.absolute(self.storage.root or os.environ.get("RAYCLIP_STORAGE") or "work")
        if "://" in root and not storage.is_s3(root):
            raise storage.UnsupportedURI(f"storage.root {root!r}: give a local directory or an s3:// prefix")
        return root

    def serving(self) -> bool:
        """Whether the pipeline ends with its deploy stage (serve.enabled, true unless set false)."""
        enabled = self.serve.get("enabled", True)
        if not isinstance(enabled, bool):  # "false" in quotes would deploy
            raise ValueError(f"serve.enabled must be true or false, not {enabled!r}")
        return enabled

    def tracking_uri(self) -> str:
        uri = self.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        if storage.is_s3(self.root()):
            raise ValueError("mlflow.tracking_uri: set it (or $MLFLOW_TRACKING_URI) to an MLflow server when "
                             "storage.root is on S3")
        return sqlite_uri(os.path.join(self.root(), "mlflow.db"))

    def path(self, *parts: str) -> str:
        return storage.join(self.root(), *parts)


class ConfigError(ValueError):
    """A config that does not validate; the message names each key, its file and line."""


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(config: BaseModel, *inputs, unkeyed: set[str] = frozenset()) -> str:
    """The key of a stage's output: `inputs` and the values of `config` that differ from their defaults
    (`unkeyed` fields left out). A new option, at a default that computes what the release before
    computed, leaves every key as it was; a changed default must bump KEY_VERSION."""
    return _digest([KEY_VERSION, config.model_dump(mode="json", exclude=set(unkeyed), exclude_defaults=True), *inputs])


def data_key(options: PreprocessOptions, source: str) -> str:
    """The key of `source` prepared with `options`: and with what this release's preprocessing makes of them.
    A class-names file counts by its lines, not its path: edited, the labels it names are others."""
    if isinstance(options.classnames, str):
        options = options.model_copy(update={"classnames": storage.read_lines(options.classnames)})
    return stage_key(options, source, {"preprocess_output": OUTPUT_VERSION})


def train_inputs(config) -> list:
    """What the train key holds beside the config and the data: the content of a model config file and
    what tells one set of init weights from another (each file's size and modification time: hashing
    gigabytes per run would cost minutes), so that editing either trains again instead of reusing the
    checkpoint of the file's former content. Nothing for a preset trained from scratch."""
    from .train import init_source

    inputs = []
    if config.model.endswith(".json"):
        inputs.append({"model_file": hashlib.sha256(storage.read_bytes(config.model, 2**20)).hexdigest()})
    if config.init:
        path = init_source(config.init)[1]
        files = storage.list_files(path) if storage.is_dir(path) else [path]
        inputs.append({"init": [(file[len(path):], (info := storage.info(file)).size, str(info.mtime))
                                for file in files]})
    return inputs


# ------------------------------------------------------------------------------ loading


def _lines(text: str) -> dict[tuple, int]:
    """YAML key path → line number (1-based), for error messages."""
    import yaml

    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, key.value)] = key.start_mark.line + 1
                walk(value, (*path, key.value))

    walk(yaml.compose(text), ())
    return lines


def _set(values: dict, assignment: str, root: type[BaseModel] | None = None) -> None:
    """--set KEY.PATH=VALUE (VALUE as YAML) into `values`, a `root` config's (default: the pipeline's)."""
    import yaml

    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: write KEY.PATH=VALUE, e.g. --set train.steps=50")
    *parents, leaf = key.split(".")
    root = root or PipelineConfig
    if root is PipelineConfig and "storage" in values:  # the file's `storage: PATH` shorthand, for storage.root
        values["storage"] = PipelineConfig._storage_shorthand(values["storage"])
    node, model = values, root
    for part in parents:
        field = model.model_fields.get(part) if model else None
        if part not in node:  # --set writes one key into the section's default (data.preprocess's image size…)
            default = field.get_default(call_default_factory=True) if field else None
            node[part] = (default.model_dump(mode="json", exclude_unset=True) if isinstance(default, BaseModel)
                          else copy.deepcopy(default) if isinstance(default, dict) else {})
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a section")
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    node[leaf] = yaml.safe_load(raw)


def load_config(path: str | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """The pipeline config in `path` (YAML; none: the embedded defaults) with `--set` overrides applied;
    every stage config is built once here, so a wrong key or type fails before any work starts."""
    import yaml

    text = Path(path).read_text(encoding="utf-8") if path else ""
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the pipeline config must be a mapping of sections")
    for assignment in overrides:
        _set(values, assignment)
    lines = _lines(text) if text.strip() else {}
    try:
        config = PipelineConfig(**values)
        StageConfigs.build(config)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, (), lines, path)) from None
    except _SectionError as exc:
        raise ConfigError(_explain(exc.error, exc.section, lines, path)) from None
    except ValueError as exc:  # a rule across sections
        raise ConfigError(f"invalid pipeline config: {exc}") from None
    return config


def _explain(exc: ValidationError, prefix: tuple, lines: dict, path: str | None) -> str:
    problems = []
    for error in exc.errors():
        loc = (*prefix, *[str(p) for p in error["loc"]])
        where = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        at = f" ({path}, line {where})" if where and path else ""
        problems.append(f"{'.'.join(loc)}: {error['msg']}{at}")
    return "invalid pipeline config:\n  " + "\n  ".join(problems)


class _SectionError(Exception):
    def __init__(self, section: tuple[str, ...], error: ValidationError):
        super().__init__(section)
        self.section, self.error = section, error


class StageConfigs:
    """The configs of the stages that take their own (train, evaluate, serve), built from the sections."""

    @staticmethod
    def _build(section: str, schema, values: dict, owned: set[str], given: dict):
        taken = sorted(set(values) & owned)
        if taken:
            raise ValueError(f"{section}: {', '.join(taken)} set by the pipeline from its data/model/storage/mlflow "
                             "sections; set them there")
        try:
            return schema(**values, **given)
        except ValidationError as exc:
            raise _SectionError((section,), exc) from None

    @classmethod
    def build(cls, config: PipelineConfig, data: dict[str, str] | None = None, checkpoint: str = "CHECKPOINT"):
        from deploy.serve import ServeConfig, with_environment_token

        from .evaluate import EvaluateConfig
        from .train import TrainConfig

        for split in config.data.split_options:
            try:
                config.data.options(split)
            except ValidationError as exc:
                raise _SectionError(("data", "split_options", split), exc) from None
        data = data or {"train": "TRAIN", "val": "VAL" if config.data.val else None,
                        "zeroshot": "ZEROSHOT" if config.data.zeroshot else None}
        tracking = config.tracking_uri()
        train = cls._build("train", TrainConfig, config.train, _TRAIN_OWNED, dict(
            data=[data["train"]], val=data["val"], zeroshot=data["zeroshot"], model=config.model.name,
            init=config.model.init, mlflow_tracking_uri=tracking, mlflow_experiment=config.mlflow.experiment))
        evaluate = None
        if data["zeroshot"] or data["val"]:
            evaluate = cls._build("eval", EvaluateConfig, config.eval, _EVAL_OWNED, dict(
                model=checkpoint, zeroshot=data["zeroshot"], retrieval=data["val"], mlflow_tracking_uri=tracking,
                mlflow_experiment=config.mlflow.experiment))
        gate = config.registry.gate  # the sections the pipeline's evaluation writes, by the set each needs
        if not config.registry.force and gate.section not in {section for section, split in (
                ("zeroshot", config.data.zeroshot), ("retrieval", config.data.val)) if split}:
            raise ValueError(f"registry.gate.metric {gate.metric!r}: the pipeline's evaluation would not produce it, "
                             "so no version could be promoted: gate on a zeroshot metric (with data.zeroshot set) "
                             "or a retrieval one (with data.val set), or set registry.force: true")
        serve_values = {k: v for k, v in config.serve.items() if k != "enabled"}
        owned = _SERVE_OWNED | ({"index"} if config.data.index else set())  # the pipeline embeds data.index
        if config.serving() and without_credentials(tracking) != tracking and not (
                tracking.startswith(("http://", "https://")) and os.environ.get("MLFLOW_TRACKING_PASSWORD")):
            raise ValueError(
                "serve: the tracking URI holds a user and password, which the deploy stage cannot hand to Serve's "
                "replicas (Serve shows an app's config on its dashboard): "
                + ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD here and on the cluster's nodes, "
                   "which the replicas read" if tracking.startswith(("http://", "https://")) else
                   "serve from an MLflow tracking server (http://) in front of this database")
                + ", or set serve.enabled=false")
        # Serve keeps (and shows) an app's config: its replicas take MLflow's credentials from its variables
        serve = cls._build("serve", ServeConfig, with_environment_token(serve_values), owned, dict(
            model=f"models:/{config.registry.name}@champion", mlflow_tracking_uri=without_credentials(tracking)))
        return train, evaluate, serve


def show(config: PipelineConfig) -> str:
    """The config as YAML with the train, eval and serve sections resolved (presets' recipes, defaults)."""
    import yaml

    values = config.model_dump(mode="json")
    train, evaluate, serve = StageConfigs.build(config)
    for section, resolved, owned in (("train", train, _TRAIN_OWNED), ("eval", evaluate, _EVAL_OWNED),
                                     ("serve", serve, _SERVE_OWNED)):
        if resolved is not None:
            values[section] = {**resolved.model_dump(mode="json", exclude=owned), **config.model_dump()[section]}
    return yaml.safe_dump(_shown(values), sort_keys=False)


def _shown(values: dict) -> dict:
    """A dumped config fit to print or log: no URI credentials, no serve token."""
    values = redacted(values)
    if values.get("serve", {}).get("auth_token"):
        values["serve"]["auth_token"] = "***"
    return values


# ------------------------------------------------------------------------------ running


class Pipeline:
    def __init__(self, config: PipelineConfig, echo=print):
        self.config, self.echo = config, echo
        self.tracking = config.tracking_uri()
        self.outcome: dict[str, Any] = {"stages": {}}

    def _digest(self, uri: str) -> str:
        """A prepared set's manifest digest, as preprocess read it (in the outcome, by split)."""
        return next(item["digest"] for item in self.outcome["datasets"].values() if item["uri"] == uri)

    def _stage(self, name: str, status: str, detail: str) -> None:
        self.outcome["stages"][name] = status
        self.echo(f"[{name}] {status}: {detail}")

    def run(self) -> dict:
        with using(self.tracking):  # each stage also gets it in its own config
            return self._run()

    def _run(self) -> dict:
        import mlflow

        from deploy.serve import check_token

        from .runtime import init_ray

        config = self.config
        if config.serving():  # before any work: its replicas get the token's digest from this environment
            check_token(StageConfigs.build(config)[2])
        if not storage.is_s3(config.root()):
            os.makedirs(config.root(), exist_ok=True)

        if config.ray.address:
            os.environ["RAY_ADDRESS"] = config.ray.address
        self.outcome["dashboard"] = init_ray(dashboard=True)
        set_experiment(config.mlflow.experiment)
        config_digest = _digest(config.model_dump(mode="json"))
        with mlflow.start_run(run_name="pipeline", tags={"rayclip.stage": "pipeline",
                                                         "rayclip.config_digest": config_digest}) as parent:
            mlflow.log_dict(_shown(config.model_dump(mode="json")), "pipeline_config.json")
            self.outcome["mlflow_run_id"] = parent.info.run_id
            try:
                self._stages(parent.info.run_id)
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (`ray job stop`): Ray's handler exits
                while mlflow.active_run():
                    mlflow.end_run("KILLED")
                raise
        return self.outcome

    def _stages(self, parent_run_id: str) -> None:
        import mlflow

        config = self.config
        data = self.preprocess()
        train, evaluate, serve = StageConfigs.build(config, data)
        checkpoint, train_key = self.train(train, data, parent_run_id)
        metrics = self.evaluate(evaluate, checkpoint, train_key, parent_run_id) if evaluate else {}
        version = self.register(checkpoint, train_key, metrics)
        promoted = self.promote(version)
        mlflow.set_tags({"rayclip.model_version": f"{config.registry.name}/{version}",
                         "rayclip.promoted": str(promoted)})
        if data["index"]:
            serve = serve.model_copy(update={"index": self.index(data["index"], evaluate)})
            mlflow.set_tag("rayclip.index", serve.index)
        if self.config.serving():
            self.outcome["url"] = self.deploy(serve)
            mlflow.set_tag("rayclip.deployment", self.outcome["url"])
        else:
            self._stage("deploy", "skipped", "serve.enabled is false")

    # -------------------------------------------------------------------------- stages

    def preprocess(self) -> dict[str, str | None]:
        prepared: dict[str, str | None] = {}
        outputs: dict[str, str] = {}  # by stage key: a split with another's source and options shares its data
        for split in ("train", "val", "zeroshot", "index"):
            source = getattr(self.config.data, split)
            if source is None:
                prepared[split] = None
                continue
            options = self.config.data.options(split)
            key = data_key(options, source)
            output = outputs.setdefault(key, self.config.path("data", f"{split}-{key}"))
            try:
                manifest = read_manifest(output)
                self._stage(f"preprocess {split}", "skipped", f"{output} exists (digest {manifest['digest'][:19]}…)")
            except (FileNotFoundError, json.JSONDecodeError):  # not a newer schema: upgrade first
                manifest = preprocess(source, output, options, echo=lambda line: self.echo(f"  {line}"))
                self._stage(f"preprocess {split}", "done", f"{manifest['counts']['kept']:,} of "
                            f"{manifest['counts']['read']:,} rows kept → {output}")
            prepared[split] = output
            self.outcome.setdefault("datasets", {})[split] = {"uri": output, "digest": manifest["digest"]}
        return prepared

    def train(self, train_config, data: dict, parent_run_id: str) -> tuple[str, str]:
        from .train import latest_checkpoint, train

        digests = {split: self._digest(uri) for split, uri in data.items() if uri and split != "index"}
        key = stage_key(train_config, digests, *train_inputs(train_config), unkeyed=_TRAIN_UNKEYED)
        output = self.config.path("checkpoints", f"train-{key}")
        self.outcome["checkpoint"] = output
        if storage.exists(storage.join(output, "model.safetensors")):
            self._stage("train", "skipped", f"{output} exists")
            return output, key
        runs = self.config.path("runs", f"train-{key}")
        resume = latest_checkpoint(runs)
        config = train_config.model_copy(update={"output": output, "storage": runs, "resume": resume,
                                                 "mlflow_parent_run_id": parent_run_id})
        result = train(config, echo=lambda line: self.echo(f"  {line}"))
        loss = f", loss {result.metrics['loss']:.4f}" if "loss" in result.metrics else ""
        self._stage("train", "done", f"step {result.metrics.get('step')}{loss}"
                    + (f", resumed from {resume}" if resume else "") + f" → {output}")
        return output, key

    def evaluate(self, evaluate_config, checkpoint: str, train_key: str, parent_run_id: str) -> dict:
        from .evaluate import evaluate

        digests = {field: self._digest(uri) for field in ("zeroshot", "retrieval")
                   if (uri := getattr(evaluate_config, field))}
        key = stage_key(evaluate_config, digests, unkeyed=_EVAL_UNKEYED)
        output = self.config.path("eval", f"{train_key}-{key}.json")
        if storage.exists(output):
            metrics = json.loads(storage.read_bytes(output))
            self._stage("evaluate", "skipped", f"{output} exists")
        else:
            config = evaluate_config.model_copy(update={"model": checkpoint, "output_json": output,
                                                        "mlflow_parent_run_id": parent_run_id})
            metrics = evaluate(config, echo=lambda line: self.echo(f"  {line}"))
            self._stage("evaluate", "done", ", ".join(f"{section}.{k} {v:.3f}" for section in ("zeroshot", "retrieval")
                                                      for k, v in metrics.get(section, {}).items()
                                                      if k in ("top1", "image_to_text_R1", "text_to_image_R1")))
        self.outcome["metrics"] = metrics
        return metrics

    def register(self, checkpoint: str, train_key: str, metrics: dict) -> str:
        from . import registry

        name, client = self.config.registry.name, registry.client(self.tracking)
        # (search results lack some tags: each version is read whole)
        existing = [str(found.version) for found in client.search_model_versions(f"name = '{name}'")
                    if client.get_model_version(name, str(found.version)).tags.get(PIPELINE_KEY_TAG) == train_key]
        if existing:
            version = existing[0]
            # this run's evaluation (another eval config, say) is what the gate and `rayclip models` read
            registry.record_metrics(name, version, metrics, tracking_uri=self.tracking)
            self._stage("register", "skipped", f"{name} version {version} holds this checkpoint")
        else:
            version = registry.register(checkpoint, name, metrics=metrics, tracking_uri=self.tracking,
                                        tags={PIPELINE_KEY_TAG: train_key},  # before the alias moves
                                        echo=lambda line: self.echo(f"  {line}"))["version"]
            self._stage("register", "done", f"{name} version {version} (challenger)")
        self.outcome["model_version"] = version
        return version

    def promote(self, version: str) -> bool:
        from . import registry

        name, section = self.config.registry.name, self.config.registry
        champion = registry.get_registered_model(name, self.tracking).aliases.get(registry.CHAMPION)
        if str(champion) == str(version):
            self._stage("promote", "skipped", f"version {version} is already the champion")
            return True
        registered = registry.get_version(name, None, version, tracking_uri=self.tracking)
        if registry.rolled_back(registered) and not section.force:  # a rerun must not undo an operator's rollback
            self._stage("promote", "skipped", f"version {version} was rolled back: it goes live again only with "
                        "registry.force")
            return False
        decision = registry.promote(name, version, gate=section.gate, force=section.force, tracking_uri=self.tracking,
                                    echo=lambda line: self.echo(f"  {line}"))
        promoted = decision["decision"] in ("passed", "forced")
        self._stage("promote", decision["decision"], decision["reason"])
        if not promoted and champion is None:
            raise PipelineError(f"version {version} failed the gate and there is no champion to serve: "
                                f"{decision['reason']}")
        return promoted

    def index(self, data_uri: str, evaluate_config) -> str:
        """The champion's embeddings of the prepared `data_uri` for /v1/search, keyed by its weights and the
        data's digest: a new champion gets its own, a rerun finds them."""
        from . import registry
        from .embed import MANIFEST, EmbedConfig, embed

        name = self.config.registry.name
        champion = registry.get_version(name, registry.CHAMPION, tracking_uri=self.tracking)
        weights = (champion.tags or {}).get("weights_sha256") or f"{name}-{champion.version}"
        output = self.config.path("index", f"{weights[:16]}-{self._digest(data_uri).removeprefix('sha256:')[:16]}")
        if storage.exists(storage.join(output, MANIFEST)):
            self._stage("index", "skipped", f"{output} exists")
        else:
            storage.delete(output)  # what an interrupted run wrote (it writes its manifest last)
            actors = {key: getattr(evaluate_config, key) for key in ("batch_size", "workers", "use_gpu")
                      } if evaluate_config else {}
            manifest = embed(EmbedConfig(model=f"models:/{name}/{champion.version}", data=data_uri, output=output,
                                         mlflow_tracking_uri=self.tracking, **actors),
                             echo=lambda line: self.echo(f"  {line}"))
            self._stage("index", "done", f"{manifest['rows']:,} rows embedded by {name} version "
                        f"{champion.version} → {output}")
        self.outcome["index"] = output
        return output

    def deploy(self, serve_config) -> str:
        from deploy import rollout
        from deploy.serve import APP_NAME, open_warning

        if warning := open_warning(serve_config):
            self.echo(f"  {warning}")
        running = rollout.deployed_config()
        if running is not None and rollout.runs_as(running, serve_config):
            rollout.reload(echo=lambda line: self.echo(f"  {line}"))  # the alias may have moved: roll in place
            url = f"http://{serve_config.host}:{serve_config.port}"
            self._stage("deploy", "done", f"{APP_NAME} rolled to the champion at {url}")
        else:  # not running, or running another model or settings: deploy this pipeline's
            url = rollout.start(serve_config)
            replaced = f" (replacing {running.model})" if running is not None else ""
            self._stage("deploy", "done", f"{serve_config.model} at {url}{replaced}")
        return url


class PipelineError(RuntimeError):
    """A stage refused to go on (e.g. the gate failed with no champion to serve); the message says why."""


def run(config: PipelineConfig, echo=print) -> dict:
    started = time.monotonic()
    outcome = Pipeline(config, echo).run()
    echo(f"pipeline: done in {time.monotonic() - started:.0f} s")
    return outcome
