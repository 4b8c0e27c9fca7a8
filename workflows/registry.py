"""Registry stage: checkpoints become MLflow model versions with their lineage, and a gate decides
which version is `champion` (the live one).

    register  checkpoint → pyfunc model version (models-from-code), tags, alias `challenger`
    promote   challenger vs champion on the same eval set → `champion` moves only if the gate passes
    rollback  `champion` back to the previous champion
    models    a table of versions, aliases, metrics and lineage

Every decision is recorded as tags on the versions involved; the champion history is a tag on the
registered model. Versions are compared as strings: they come back as int from sqlite stores and
as str over REST, and `search_model_versions` leaves aliases out, so aliases are read from
`get_registered_model`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from clip_core.checkpoint import CONFIG_FILE, OPENCLIP_CONFIG_FILE, WEIGHTS_FILE

from . import storage
from .tracking import failure, guard_output, is_missing, is_mlflow_error, log_into, redact, using

CHALLENGER, CHAMPION = "challenger", "champion"
EVAL_SECTIONS = ("zeroshot", "retrieval", "linear_probe")  # what `rayclip evaluate` writes
HISTORY_TAG = "rayclip.champion_history"
# the champions a rollback can walk back through: a tag value is at most 5000 characters in MLflow's SQL stores
HISTORY_KEPT = 500
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc artifact: artifacts/checkpoint inside the model
INFERENCE_FILES = (WEIGHTS_FILE, CONFIG_FILE, OPENCLIP_CONFIG_FILE)
CONFIG_MAX_BYTES = 1 << 20  # a checkpoint's config.json is a few kB
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
# what the pyfunc imports at serving time (its own code and clip_core travel with the model)
PYFUNC_REQUIREMENTS = ("torch", "numpy", "pillow", "safetensors", "ftfy", "regex", "pandas")

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class RegistryError(ValueError):
    """A registry operation that cannot go ahead, saying why and what to do."""


def client(tracking_uri: str | None = None):
    import mlflow

    guard_output(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """`models:/NAME@ALIAS` → (NAME, ALIAS, None); `models:/NAME/3` → (NAME, None, "3"); else None."""
    match = _MODEL_URI.match(uri)
    if not match:
        if uri.startswith("models:/"):
            raise RegistryError(f"{uri!r} is not a model URI this tool reads: use models:/NAME@ALIAS or "
                                "models:/NAME/VERSION")
        return None
    return match["name"], match["alias"], match["version"]


def get_version(name: str, alias: str | None = None, version: str | int | None = None, *, tracking_uri=None):
    """The model version by alias or number, with a message that names what exists when it does not."""
    from mlflow.exceptions import MlflowException

    model = get_registered_model(name, tracking_uri)
    if alias is not None:
        if alias not in model.aliases:
            raise RegistryError(f"model {name!r} has no alias {alias!r}; aliases: {dict(model.aliases) or 'none'}")
        version = model.aliases[alias]
    try:
        return client(tracking_uri).get_model_version(name, str(version))
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        raise RegistryError(f"model {name!r} has no version {version}") from None


def _store(tracking_uri: str | None) -> str:
    import mlflow

    return redact(tracking_uri or mlflow.get_tracking_uri())


# ------------------------------------------------------------------------------ checkpoints


@dataclass
class ModelSource:
    """A checkpoint ready to load locally, and where it came from."""

    directory: str
    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None  # the MLflow run that holds the model (registered) or trained it
    tags: dict[str, str] = field(default_factory=dict)  # a registered version's tags (lineage, metrics)


def fetch_checkpoint(uri: str, destination: str, *, tracking_uri: str | None = None,
                     quick_gelu: bool | None = None) -> ModelSource:
    """The inference files of a checkpoint (local dir, s3:// prefix, or models:/…) in a local directory.

    Weights in another format become a checkpoint of ours on the way; `quick_gelu` says which activation
    they were trained with, overriding what they imply (clip_core.load_model). A checkpoint of ours
    records its activation and keeps it."""
    source = _fetch(uri, destination, tracking_uri, quick_gelu)
    recorded = bool(checkpoint_description(source.directory)["model"].get("quick_gelu"))
    if quick_gelu is not None and quick_gelu != recorded:
        warnings.warn(f"{uri} is a rayclip checkpoint trained with {'QuickGELU' if recorded else 'GELU'} and loads "
                      f"as such: quick_gelu={quick_gelu} (--{'' if quick_gelu else 'no-'}quick-gelu) is for "
                      "weights in other formats, which imply theirs (or say nothing, or the wrong thing)", stacklevel=2)
    return source


def _fetch(uri: str, destination: str, tracking_uri: str | None, quick_gelu: bool | None) -> ModelSource:
    parsed = parse_model_uri(uri)
    if parsed:
        import mlflow

        name, alias, number = parsed
        model_version = get_version(name, alias, number, tracking_uri=tracking_uri)
        checkpoint = f"models:/{name}/{model_version.version}/artifacts/{CHECKPOINT_ARTIFACT}"
        with using(tracking_uri):
            # the inference files alone, never whatever else a registry writer put beside them (a disk's worth)
            stored = {posixpath.basename(info.path) for info in mlflow.artifacts.list_artifacts(artifact_uri=checkpoint)
                      if not info.is_dir}
            for required in (CONFIG_FILE, WEIGHTS_FILE):  # here, not in whatever loads it later (Ray actors)
                if required not in stored:
                    raise RegistryError(f"{uri} (version {model_version.version}) has no {CHECKPOINT_ARTIFACT}/"
                                        f"{required} in the artifact store: it is not a rayclip model version, or "
                                        "its upload was cut short; register the checkpoint again")
            downloaded = [mlflow.artifacts.download_artifacts(artifact_uri=f"{checkpoint}/{file}", dst_path=destination)
                          for file in INFERENCE_FILES if file in stored]
        directory = os.path.dirname(downloaded[0])  # <destination>/artifacts/checkpoint, each file in it
        # the checkpoint must claim the registered weights; load_model then checks the file against its claim
        recorded = (model_version.tags or {}).get("weights_sha256")
        if recorded and (claimed := checkpoint_description(directory).get("weights_sha256")) != recorded:
            raise RegistryError(f"{uri} (version {model_version.version}): its {CONFIG_FILE} records weights sha256 "
                                f"{claimed} but the version records {recorded}: the artifact store holds other weights "
                                "than were registered; register the checkpoint again")
        return ModelSource(directory, uri, name, str(model_version.version), model_version.run_id,
                           dict(model_version.tags or {}))
    description = storage.join(uri, CONFIG_FILE)
    if not (storage.exists(description) and _is_ours(storage.read_bytes(description, max_bytes=CONFIG_MAX_BYTES))):
        return _converted(uri, destination, quick_gelu)
    if not storage.is_s3(uri):  # a path as the stages open it: file:// and ~ resolved
        return ModelSource(storage.absolute(uri), uri, run_id=_train_run_id(uri))
    directory = os.path.join(destination, CHECKPOINT_ARTIFACT)
    os.makedirs(directory, exist_ok=True)
    for file in INFERENCE_FILES:
        if storage.exists(storage.join(uri, file)):
            storage.copy(storage.join(uri, file), os.path.join(directory, file))
    return ModelSource(directory, uri, run_id=_train_run_id(directory))


def _is_ours(config_json: bytes) -> bool:
    from clip_core.checkpoint import FORMAT

    try:
        return json.loads(config_json).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def _converted(uri: str, destination: str, quick_gelu: bool | None) -> ModelSource:
    """Weights in another format users hold (OpenAI's release, OpenCLIP's, a Hugging Face CLIPModel
    directory, a bare state dict; local or s3://) as a checkpoint of ours in `destination`."""
    import clip_core

    if not storage.exists(uri):
        raise FileNotFoundError(f"no checkpoint at {uri}: expected a checkpoint directory (the train stage's "
                                "--output), weights clip_core.load_model reads, or a models:/ URI")
    with storage.local_copy(uri) as local:
        model = clip_core.load_model(local, quick_gelu=quick_gelu)
    directory = clip_core.save_checkpoint(model, os.path.join(destination, CHECKPOINT_ARTIFACT))
    return ModelSource(str(directory), uri)


def checkpoint_description(directory: str) -> dict:
    """A checkpoint's config.json, local or s3:// (at most CONFIG_MAX_BYTES: it may come from someone else's
    store)."""
    return json.loads(storage.read_bytes(storage.join(directory, CONFIG_FILE), max_bytes=CONFIG_MAX_BYTES))


def _train_run_id(directory: str) -> str | None:
    return checkpoint_description(directory).get("train", {}).get("mlflow_run_id")


def lineage(directory: str) -> dict[str, str]:
    """Version tags that say where a checkpoint came from: datasets, train run, commit, config hash."""
    description = checkpoint_description(directory)
    train = description.get("train", {})
    train_config = train.get("config", {})
    digests = train_config.get("data_digests") or []
    if not digests:  # a checkpoint from before train recorded them: what its data URIs hold now
        from .preprocess import read_manifest

        for uri in train_config.get("data", []):
            try:
                digests.append(read_manifest(uri)["digest"])
            except (OSError, ValueError, KeyError):
                digests.append(f"unreadable:{uri}")
    config_hash = hashlib.sha256(json.dumps({"model": description.get("model"), "train": train_config},
                                            sort_keys=True).encode()).hexdigest()
    tags = {"dataset_digests": ",".join(digests), "train_run_id": train.get("mlflow_run_id") or "",
            "git_commit": train_config.get("git_commit") or "", "config_hash": f"sha256:{config_hash}",
            "model_config": description.get("model", {}).get("name") or "",
            "weights_sha256": description.get("weights_sha256") or "", "train_steps": str(train.get("step", ""))}
    return {key: value for key, value in tags.items() if value}


# ------------------------------------------------------------------------------ metrics as tags


def metric_tags(metrics: dict) -> dict[str, str]:
    """`{"zeroshot": {"top1": 0.7, "digest": "sha256:…"}}` → `{"eval.zeroshot.top1": "0.7", …}`."""
    tags = {}
    for section in EVAL_SECTIONS:
        for key, value in metrics.get(section, {}).items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                tags[f"eval.{section}.{key}"] = str(value)
    return tags


def version_metrics(tags: dict[str, str] | None) -> dict[str, str]:
    """`{"zeroshot.top1": "0.7", "zeroshot.digest": "sha256:…"}` from a model version's eval tags."""
    return {key.removeprefix("eval."): value for key, value in (tags or {}).items() if key.startswith("eval.")}


def record_metrics(name: str, version: str, metrics: dict, *, tracking_uri: str | None = None) -> None:
    """Put `metrics` on the version as its eval tags, each section in `metrics` in place of that section's
    tags (a section's earlier figures, on another set, would mix with the new); the other sections stay
    (evaluating retrieval alone keeps the zero-shot figures the gate compares)."""
    registry, tags = client(tracking_uri), metric_tags(metrics)
    for key in version_metrics(registry.get_model_version(name, str(version)).tags):
        if key.split(".", 1)[0] in metrics and f"eval.{key}" not in tags:
            registry.delete_model_version_tag(name, str(version), f"eval.{key}")
    for key, value in tags.items():
        registry.set_model_version_tag(name, str(version), key, value)


# ------------------------------------------------------------------------------ register


def _requirements() -> list[str]:
    pins = []
    for package in PYFUNC_REQUIREMENTS:
        try:
            pins.append(f"{package}=={package_version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def _example_image() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    from .pyfunc_model import DEFAULT_PARAMS

    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "text", required=False)])
    # with labels: the best label and score, and the top_k of each; without: the embedding
    outputs = Schema([ColSpec("string", "label", required=False), ColSpec("double", "score", required=False),
                      ColSpec(Array("string"), "labels", required=False),
                      ColSpec(Array("double"), "scores", required=False),
                      ColSpec(Array("float"), "embedding", required=False)])
    params = ParamSchema([ParamSpec("labels", "string", DEFAULT_PARAMS["labels"], shape=(-1,)),
                          ParamSpec("templates", "string", DEFAULT_PARAMS["templates"], shape=(-1,)),
                          ParamSpec("top_k", "long", DEFAULT_PARAMS["top_k"])])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def register(checkpoint: str, name: str, *, metrics: dict | None = None, tracking_uri: str | None = None,
             experiment: str = "rayclip", run_id: str | None = None, alias: str = CHALLENGER,
             quick_gelu: bool | None = None, tags: dict[str, str] | None = None, echo=print) -> dict:
    """Log `checkpoint` as a pyfunc model in its train run (or a new `register` run), register it
    as a new version of `name` with lineage, eval metrics and `tags` as tags, and point `alias` at it.
    `quick_gelu`: the activation of weights in another format (see fetch_checkpoint)."""
    import mlflow
    import pandas as pd

    import clip_core

    with using(tracking_uri), tempfile.TemporaryDirectory() as scratch:
        source = fetch_checkpoint(checkpoint, scratch, tracking_uri=tracking_uri, quick_gelu=quick_gelu)
        staged = os.path.join(scratch, "staged", CHECKPOINT_ARTIFACT)  # the artifact's name inside the model
        os.makedirs(staged)
        for file in INFERENCE_FILES:
            if Path(source.directory, file).is_file():
                shutil.copy(Path(source.directory, file), staged)
        clip_core.load_model(staged)  # refuse a checkpoint that does not load before registering it
        # a registered version by its number: an alias (models:/clip@champion) moves on
        origin = f"models:/{source.name}/{source.version}" if source.name else checkpoint
        tags = {**lineage(staged), **metric_tags(metrics or {}), "checkpoint_source": origin, **(tags or {})}
        evaluated = ((metrics or {}).get("model") or {}).get("weights_sha256")
        if evaluated and tags.get("weights_sha256") and evaluated != tags["weights_sha256"]:
            raise RegistryError(f"the metrics given are about other weights (sha256 {evaluated[:12]}…) than "
                                f"{checkpoint}'s ({tags['weights_sha256'][:12]}…): evaluate this checkpoint "
                                "(`rayclip evaluate CHECKPOINT ... --json FILE`) and register with that file")
        with log_into(run_id or source.run_id, experiment, "register", {"rayclip.stage": "register"}):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={CHECKPOINT_ARTIFACT: staged}, code_paths=[str(Path(clip_core.__file__).parent)],
                signature=_signature(), input_example=(pd.DataFrame({"image": [_example_image()]}),
                                                       {"labels": ["red", "blue"]}),
                pip_requirements=_requirements())
        # the version with its lineage in one request: tagged one call at a time, a stop in between (Ctrl-C,
        # `ray job stop`) left a version without the pipeline's key tag, which a rerun registered again
        version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    registry = client(tracking_uri)
    try:  # the alias last: a version that someone may load carries its whole lineage
        registry.set_registered_model_alias(name, alias, version)
    except Exception as exc:
        if not is_mlflow_error(exc):
            raise
        raise RegistryError(f"registering {name} version {version} stopped before alias {alias!r} pointed at it; "
                            f"{_discard(registry, name, version)}. {failure(exc)}") from exc
    echo(f"register: {name} version {version} ({alias}) from {checkpoint}")
    return {"name": name, "version": version, "alias": alias, "run_id": info.run_id, "model_uri": info.model_uri,
            "tags": tags}


def _discard(registry, name: str, version: str) -> str:
    """Delete a version whose registration failed half-way, or say what is left."""
    try:
        registry.delete_model_version(name, version)
        return f"version {version} was deleted"
    except Exception as exc:  # noqa: BLE001 - the server that failed the registration may fail this too
        if not is_mlflow_error(exc):
            raise
        return (f"version {version} is left without alias and perhaps without all its tags: delete it "
                f"(MlflowClient().delete_model_version({name!r}, {version!r})) or leave it, no alias names it")


# ------------------------------------------------------------------------------ promote / rollback


_GATE_METRICS = re.compile(r"zeroshot\.(top1|top5|mean_per_class_recall)"
                           r"|retrieval\.(image_to_text|text_to_image)_(R\d+|mean_rank|median_rank)"
                           r"|linear_probe\.(full|k\d+)_top1")


class Gate(BaseModel):
    """Promotion rule: the challenger's `metric` may not be worse than the champion's by more than
    `max_drop` (on the same eval set); with no champion it must reach `floor`."""

    model_config = ConfigDict(extra="forbid")
    metric: str = Field("zeroshot.top1", description="section.metric as `rayclip evaluate` writes it")
    max_drop: float = Field(0.005, ge=0, description="tolerated loss, in the metric's units (0.005 = 0.5 points)")
    floor: float | None = Field(None, description="what a first champion must reach: at least this, or at most "
                                "for a rank or loss (lower is better); none: any value")

    @field_validator("metric")
    @classmethod
    def _known(cls, metric: str) -> str:
        """A metric `rayclip evaluate` records (R@k as OpenCLIP spells it, too: MLflow keys cannot hold '@');
        a misspelt one would pass a whole pipeline run to fail at promotion, as a version without it."""
        metric = metric.replace("R@", "R")
        if not _GATE_METRICS.fullmatch(metric):
            raise ValueError(f"gate metric {metric!r} is not one `rayclip evaluate` records: zeroshot.top1, "
                             "zeroshot.top5, zeroshot.mean_per_class_recall, retrieval.image_to_text_R1 (or R5, R10, "
                             "mean_rank, median_rank; text_to_image_ likewise), linear_probe.full_top1 or "
                             "linear_probe.k<shots>_top1")
        return metric

    @property
    def lower_is_better(self) -> bool:
        return self.metric.endswith(("rank", "loss"))

    @property
    def section(self) -> str:
        return self.metric.split(".", 1)[0]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _exists(name: str, version: str, tracking_uri: str | None) -> bool:
    try:
        get_version(name, None, version, tracking_uri=tracking_uri)
    except RegistryError:
        return False
    return True


def rolled_back(model_version) -> bool:
    """Whether `rollback` took this version off (it goes live again only by force)."""
    return (model_version.tags or {}).get("validation_status") == "rolled_back"


def _history(registry, name: str) -> list[str]:
    model = registry.get_registered_model(name)
    history = json.loads(model.tags.get(HISTORY_TAG, "[]"))
    current = model.aliases.get(CHAMPION)
    if current is not None and (not history or history[-1] != str(current)):
        history.append(str(current))  # an alias moved by hand joins the history
    return history


def _metric(model_version, gate: Gate) -> tuple[float | None, str | None, str | None]:
    """(value, eval set digest, setup digest): figures compare only on the same set and the same setup
    (zero-shot: class names and templates; linear probe: training set, shots, seed)."""
    values = version_metrics(model_version.tags)
    raw = values.get(gate.metric)
    return ((float(raw) if raw is not None else None), values.get(f"{gate.section}.digest"),
            values.get(f"{gate.section}.setup_digest"))


def evaluate_gate(challenger, champion, gate: Gate) -> tuple[bool, str, dict]:
    """(passed, reason, compared values) for a challenger against the champion (or None)."""
    value, digest, setup = _metric(challenger, gate)
    compared = {"metric": gate.metric, "challenger_version": str(challenger.version), "challenger_value": value,
                "eval_digest": digest, "eval_setup_digest": setup}
    if value is None:
        return False, (f"version {challenger.version} has no {gate.metric} metric: run `rayclip evaluate "
                       f"models:/{challenger.name}/{challenger.version} ...` first"), compared
    if not math.isfinite(value):
        return False, (f"version {challenger.version}'s {gate.metric} is {value}: its evaluation went wrong (a "
                       "diverged model?); evaluate it again or register another"), compared
    sign = -1 if gate.lower_is_better else 1
    champion_value, champion_digest, champion_setup = (_metric(champion, gate) if champion is not None
                                                       else (None, None, None))
    if champion is not None and champion_value is not None and not math.isfinite(champion_value):
        compared.update(champion_version=str(champion.version), champion_value=champion_value)
        champion = None  # nothing to compare with: a broken champion must not block every challenger
    if champion is None:
        compared["floor"] = gate.floor
        nobody = ("no champion yet" if "champion_version" not in compared else
                  f"champion version {compared['champion_version']}'s {gate.metric} is {compared['champion_value']}")
        if gate.floor is None:
            return True, f"{nobody} and no floor; {gate.metric} {value:.4g}", compared
        passed = sign * (value - gate.floor) >= 0
        return passed, (f"{nobody}; {gate.metric} {value:.4g} {'meets' if passed else 'misses'} the floor "
                        f"{gate.floor:.4g}"), compared
    compared.update(champion_version=str(champion.version), champion_value=champion_value, max_drop=gate.max_drop)
    legacy = champion_setup is None and setup is not None  # evaluated before setups were recorded: set alone
    if champion_value is None or champion_digest != digest or (champion_setup != setup and not legacy):
        return False, (f"champion version {champion.version} has no {gate.metric} on the same eval set ({digest}) "
                       f"and setup ({setup}: the class names and templates, or a probe's training set, shots and "
                       f"seed): evaluate models:/{champion.name}@{CHAMPION} as the challenger was, then promote "
                       "again"), compared
    drop = sign * (champion_value - value)
    passed = drop <= gate.max_drop + 1e-12
    return passed, (f"{gate.metric} {value:.4g} vs champion {champion_value:.4g}: "
                    f"{'within' if passed else 'worse than'} the allowed drop of {gate.max_drop:.4g}"
                    + (" (the champion's figure predates setup digests: compared on the same set alone; evaluate "
                       "it again to compare setups too)" if legacy else "")), compared


def promote(name: str, version: str | int | None = None, *, gate: Gate | None = None, force: bool = False,
            tracking_uri: str | None = None, echo=print) -> dict:
    """Move `champion` to `version` (default: the challenger) when the gate passes, or with `force`.
    The decision is recorded on both versions either way."""
    gate = gate or Gate()
    registry = client(tracking_uri)
    challenger = get_version(name, None if version is not None else CHALLENGER, version, tracking_uri=tracking_uri)
    if rolled_back(challenger) and not force:
        raise RegistryError(f"version {challenger.version} of {name!r} was rolled back (its rollback.decision tag "
                            "says when and from what): it goes live again only with force (`rayclip promote "
                            "--force`); or register a fixed model as a new version")
    while True:  # the gate against the champion that is still the champion when the alias moves
        champion = _champion(registry, name)
        if champion is not None and str(champion.version) == str(challenger.version):
            raise RegistryError(f"version {challenger.version} of {name!r} is already the champion")
        passed, reason, compared = evaluate_gate(challenger, champion, gate)
        # MLflow has no compare-and-set on aliases: this check narrows the window of two promotes at once to
        # one request; promotes that must never race need a lock of their own (one pipeline job at a time)
        now = _champion(registry, name)
        if (now and str(now.version)) == (champion and str(champion.version)):
            break
    status = "passed" if passed else ("forced" if force else "failed")
    decision = {"decision": status, "reason": reason, "forced": force and not passed, "timestamp": _now(),
                "gate": gate.model_dump(), **compared}
    record = json.dumps(decision, sort_keys=True)
    registry.set_model_version_tag(name, str(challenger.version), "validation_status", status)
    registry.set_model_version_tag(name, str(challenger.version), "promotion.decision", record)
    if champion is not None:
        registry.set_model_version_tag(name, str(champion.version), "promotion.last_comparison", record)
    if passed or force:
        # the alias before the history: an alias moved without its history entry joins it on the next read
        history = _history(registry, name) + [str(challenger.version)]
        registry.set_registered_model_alias(name, CHAMPION, str(challenger.version))
        registry.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEPT:]))
        if champion is not None:
            registry.set_model_version_tag(name, str(champion.version), "superseded_by", str(challenger.version))
    echo(f"promote: {name} version {challenger.version}: {status} — {reason}")
    return decision


def _champion(registry, name: str):
    aliases = registry.get_registered_model(name).aliases
    return registry.get_model_version(name, str(aliases[CHAMPION])) if CHAMPION in aliases else None


def rollback(name: str, *, tracking_uri: str | None = None, echo=print) -> dict:
    """Point `champion` back at the previous champion; the decision is recorded on both versions."""
    registry = client(tracking_uri)
    get_version(name, CHAMPION, tracking_uri=tracking_uri)  # names the problem when there is no champion
    history = _history(registry, name)
    current = history[-1]
    while len(history) >= 2 and not _exists(name, history[-2], tracking_uri):
        del history[-2]  # a previous champion deleted since: the one before it
    if len(history) < 2:
        raise RegistryError(f"model {name!r} has no previous champion to roll back to (history: {history})")
    previous = history[-2]
    decision = {"decision": "rolled_back", "from_version": current, "to_version": previous, "timestamp": _now()}
    record = json.dumps(decision, sort_keys=True)
    # the history before the alias: a history cut back without the alias move heals on the next read
    registry.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
    registry.set_registered_model_alias(name, CHAMPION, previous)
    registry.set_model_version_tag(name, current, "validation_status", "rolled_back")
    registry.set_model_version_tag(name, current, "rollback.decision", record)
    registry.set_model_version_tag(name, previous, "rollback.decision", record)
    echo(f"rollback: {name} champion {current} → {previous}")
    return decision


# ------------------------------------------------------------------------------ listing


def list_versions(name: str, *, tracking_uri: str | None = None) -> list[dict]:
    """Every version of `name`, newest first, with aliases, status, eval metrics and lineage."""
    registry = client(tracking_uri)
    aliases: dict[str, list[str]] = {}
    for alias, number in get_registered_model(name, tracking_uri).aliases.items():
        aliases.setdefault(str(number), []).append(alias)
    rows = []
    for found in registry.search_model_versions(f"name = '{name}'"):
        model_version = registry.get_model_version(name, str(found.version))  # search results lack some tags
        tags = model_version.tags or {}
        rows.append({"version": str(model_version.version),
                     "aliases": sorted(aliases.get(str(model_version.version), [])),
                     "status": tags.get("validation_status", ""), "metrics": version_metrics(model_version.tags),
                     "dataset_digests": tags.get("dataset_digests", ""), "train_run_id": tags.get("train_run_id", ""),
                     "run_id": model_version.run_id, "git_commit": tags.get("git_commit", ""),
                     "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(model_version.creation_timestamp / 1000))})
    return sorted(rows, key=lambda row: int(row["version"]), reverse=True)


def get_registered_model(name: str, tracking_uri: str | None = None):
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_registered_model(name)
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        raise RegistryError(f"no registered model {name!r} in {_store(tracking_uri)}: "
                            f"`rayclip register CHECKPOINT --name {name}` creates it") from None


def format_versions(rows: list[dict], metric: str = "zeroshot.top1") -> str:
    header = ["version", "aliases", "status", metric, "eval set", "dataset", "train run", "commit", "created"]
    table = [header]
    for row in rows:
        table.append([row["version"], ",".join(row["aliases"]) or "-", row["status"] or "-",
                      row["metrics"].get(metric, "-"), _short(row["metrics"].get(f"{metric.split('.')[0]}.digest")),
                      _short(row["dataset_digests"].split(",")[0]), (row["train_run_id"] or "-")[:12],
                      (row["git_commit"] or "-")[:10], row["created"]])
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(r, widths)).rstrip() for r in table)


def _short(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "-"
