"""Evaluate stage: zero-shot classification, retrieval and linear-probe metrics of a checkpoint or a
registered model, computed by Ray Data batch inference (a pool of model actors), logged to MLflow,
recorded on the model version, and written as metrics.json.

    {"zeroshot":     {"top1", "top5", "mean_per_class_recall", "per_class_recall": {class: recall}, "digest", ...},
     "retrieval":    {"image_to_text_R1", ..., "text_to_image_median_rank", "digest", ...},
     "linear_probe": {"full_top1", "k1_top1", ..., "k16_top1", "digest", "train_digest", ...}}

Every section names the prepared dataset and its content digest, so the registry compares
versions only on the same eval sets. Rows are ordered by key before scoring: the numbers do
not depend on how Ray splits the work.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

import clip_core
from clip_core.checkpoint import CONFIG_FILE, described_config

from . import registry, storage
from .preprocess import decode_batch, load_prepared, open_prepared_image, read_manifest, read_prepared_table
from .tracking import log_into, using

TEMPLATE_SETS = {"default": clip_core.DEFAULT_TEMPLATES, "simple": clip_core.SIMPLE_TEMPLATES,
                 "imagenet": clip_core.IMAGENET_TEMPLATES}


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint directory, s3:// prefix, or models:/NAME@ALIAS | models:/NAME/N; "
                       "also weights in other formats clip_core.load_model reads (OpenAI, OpenCLIP, Hugging Face)")
    quick_gelu: bool | None = Field(None, description="the activation of weights in another format: True QuickGELU, "
                                    "False GELU, overriding what they imply; a rayclip checkpoint keeps its own")
    zeroshot: str | None = Field(None, description="labeled prepared set for zero-shot top-1/top-5")
    classnames: list[str] | None = Field(None, description="default: the zero-shot set's manifest")
    templates: list[str] | Literal["default", "simple", "imagenet"] = "default"
    retrieval: str | None = Field(None, description="captioned prepared set for image↔text recall")
    linear_probe: tuple[str, str] | None = Field(None, description="(train, test) labeled prepared sets")
    shots: list[int] = Field([1, 2, 4, 8, 16], description="few-shot linear probes, examples per class")
    batch_size: int = Field(256, gt=0)
    workers: int = Field(1, gt=0, description="model actors")
    use_gpu: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    output_json: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "rayclip"
    mlflow_run_id: str | None = Field(None, description="log here; default: the model's run, else a new run")
    mlflow_parent_run_id: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if not (self.zeroshot or self.retrieval or self.linear_probe):
            raise ValueError("nothing to evaluate: give a zero-shot set (--zeroshot), a retrieval set (--retrieval) "
                             "or linear-probe sets (--linear-probe TRAIN TEST)")
        if isinstance(self.templates, list):
            clip_core.zeroshot.check_templates(self.templates)
        if any(k <= 0 for k in self.shots):
            raise ValueError(f"shots must be positive, got {self.shots}")
        return self

    @property
    def template_list(self) -> list[str]:
        return list(TEMPLATE_SETS[self.templates]) if isinstance(self.templates, str) else self.templates


# ------------------------------------------------------------------------------ inference on Ray


def _load(files: dict[str, bytes], use_gpu: bool) -> tuple[clip_core.CLIP, torch.device]:
    device = torch.device("cuda" if use_gpu else "cpu")
    with tempfile.TemporaryDirectory(prefix="rayclip-eval-") as directory:
        for name, data in files.items():
            Path(directory, name).write_bytes(data)
        return clip_core.load_model(directory, device=device), device


def _autocast(precision: str, device: torch.device):
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class Embedder:
    """Ray Data actor: decoded rows → normalized image features, and text features for the rows of
    the sets in `text_sets` (zeros elsewhere); the rows' other columns pass through."""

    def __init__(self, files_ref: list, use_gpu: bool, precision: str, text_sets: list[int]):
        import ray

        self.model, self.device = _load(ray.get(files_ref[0]), use_gpu)
        self.precision, self.text_sets = precision, text_sets

    def __call__(self, batch: dict) -> dict:
        images = torch.from_numpy(batch["image"]).to(self.device)
        out = {name: column for name, column in batch.items() if name not in ("image", "tokens")}
        with torch.inference_mode(), _autocast(self.precision, self.device):
            image_features = self.model.encode_image(clip_core.transforms.normalize(images), normalize=True).float()
            text_features = torch.zeros_like(image_features)
            wanted = torch.from_numpy(np.isin(batch["eval_set"], self.text_sets))
            if wanted.any():
                tokens = torch.from_numpy(batch["tokens"][wanted.numpy()]).to(self.device)
                text_features[wanted.to(self.device)] = self.model.encode_text(tokens, normalize=True).float()
        out["image_features"], out["text_features"] = image_features.cpu().numpy(), text_features.cpu().numpy()
        return out


def image_ids(images) -> np.ndarray:
    """Each prepared image's id: rows of the same pixels (an image with several captions, a row each) hold
    the same bytes, as preprocess encodes them, and so the same id."""
    return np.asarray([hashlib.blake2b(bytes(data), digest_size=16).hexdigest() for data in images], dtype=object)


def _decode(batch: dict, image_size: int) -> dict:
    """decode_batch, keeping every row's key, set, caption and metadata (when read), and its `image_ids`."""
    out = decode_batch(batch, image_size)
    out["image_id"] = image_ids(batch["image"])
    for name in ("key", "caption", "metadata"):
        if name in batch:
            out[name] = np.asarray(batch[name], dtype=object)
    out["eval_set"] = np.asarray(batch["eval_set"], dtype=np.int64)
    return out


def _classifier(files: dict[str, bytes], classnames: list[str], templates: list[str], use_gpu: bool,
                precision: str) -> np.ndarray:
    model, device = _load(files, use_gpu)
    tokenize = clip_core.get_tokenizer(model.config.text.context_length)
    with _autocast(precision, device):
        return clip_core.zero_shot_classifier(model, tokenize, classnames, templates).float().cpu().numpy()


def embedded(uris: list[str], files_ref, image_size: int, *, batch_size: int, workers: int, use_gpu: bool,
             precision: str, with_text: list[bool], columns: tuple[str, ...] = ()):
    """The prepared sets as one Ray Dataset (lazy) of "key", "label", "eval_set" (the set's index),
    "image_features", "text_features" and `columns`, through one pool of model actors."""
    from ray.data import ActorPoolStrategy

    datasets = []
    for index, uri in enumerate(uris):
        dataset = load_prepared(uri).select_columns(["key", "image", "tokens", "label", *columns])
        datasets.append(dataset.add_column("eval_set", lambda batch, i=index: np.full(len(batch["key"]), i),
                                           batch_format="numpy"))
    dataset = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    dataset = dataset.map_batches(_decode, batch_size=batch_size, batch_format="numpy",
                                  fn_kwargs={"image_size": image_size})
    return dataset.map_batches(Embedder, batch_size=batch_size, batch_format="numpy",
                               compute=ActorPoolStrategy(size=workers), num_gpus=1 if use_gpu else 0,
                               fn_constructor_kwargs={"files_ref": [files_ref], "use_gpu": use_gpu,
                                                      "precision": precision,
                                                      "text_sets": [i for i, text in enumerate(with_text) if text]})


def embed_sets(uris: list[str], files_ref, image_size: int, config: EvaluateConfig,
               with_text: list[bool]) -> list[dict]:
    """Per prepared set: {"key", "label", "image_features", and "text_features" where `with_text`},
    ordered by key. All sets run through one pipeline, so the model actors start once. Each set's rows are
    written into arrays of its manifest's size as they stream in: gathering the batches and then the
    sets held the features (and zeros for texts no set asked for) four times over."""
    dataset = embedded(uris, files_ref, image_size, batch_size=config.batch_size, workers=config.workers,
                       use_gpu=config.use_gpu, precision=config.precision, with_text=with_text)
    dataset.context.execution_options.preserve_order = True
    sizes = [read_manifest(uri)["counts"]["kept"] for uri in uris]
    names = [("key", "label", "image_features", *(["image_id", "text_features"] if text else []))
             for text in with_text]
    out: list[dict] = [{} for _ in uris]
    filled = [0] * len(uris)
    for part in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for index in np.unique(part["eval_set"]):
            rows = part["eval_set"] == index
            start, count = filled[index], int(rows.sum())
            for name in names[index]:
                column = part[name][rows]
                if name not in out[index]:
                    out[index][name] = np.empty((sizes[index], *column.shape[1:]), dtype=column.dtype)
                out[index][name][start : start + count] = column
            filled[index] += count
    if filled != sizes:  # never expected: a changed dataset or a bug, not bad input
        raise RuntimeError(f"embedded {filled} rows of {uris}, whose manifests count {sizes}")
    for data in out:
        order = np.argsort(data["key"].astype(str), kind="stable")
        for name in data:
            data[name] = data[name][order]
    return out


def inference_files(source: registry.ModelSource) -> tuple[dict[str, bytes], clip_core.CLIPConfig]:
    """The checkpoint's files a model actor loads from, and the model's config."""
    files = {path.name: path.read_bytes() for path in Path(source.directory).iterdir()
             if path.name in registry.INFERENCE_FILES}
    return files, described_config(json.loads(files[CONFIG_FILE]), source.directory)


# ------------------------------------------------------------------------------ metrics


def zeroshot_metrics(image_features: np.ndarray, labels: np.ndarray, classifier: np.ndarray) -> tuple[dict, np.ndarray]:
    """top-1/top-5/mean per-class recall, and the confusion matrix [true, predicted]."""
    logits = clip_core.zeroshot.zero_shot_logits(torch.from_numpy(image_features), torch.tensor(classifier))
    labels_t = torch.from_numpy(labels).long()
    metrics = clip_core.zeroshot.accuracy(logits, labels_t, ks=(1, 5))
    classes = classifier.shape[1]
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, logits.argmax(dim=1).numpy()), 1)
    return metrics, confusion


def per_class_recall(confusion: np.ndarray, classnames: list[str]) -> dict[str, float]:
    """Each class's top-1 recall, for the classes the eval set has images of (their mean is
    mean_per_class_recall), by name; a name that two classes share gets its label: 'crane (134)'."""
    images, repeated = confusion.sum(axis=1), collections.Counter(classnames)
    return {name if repeated[name] == 1 else f"{name} ({c})": float(confusion[c, c] / images[c])
            for c, name in enumerate(classnames) if images[c]}


def gallery(ordered: dict) -> tuple[np.ndarray, np.ndarray]:
    """(the first row of each distinct image, each row's image among those): rows that share an image (COCO's
    and Flickr's five captions, one row each) are one image with several captions, as clip_benchmark counts."""
    _, first, inverse = np.unique(ordered["image_id"], return_index=True, return_inverse=True)
    return first, inverse


def retrieval(ordered: dict) -> dict:
    """Recall@k and ranks both ways over a set's distinct images and all its captions: an image is found at
    the best rank of any of its captions, a caption finds its image among the distinct ones."""
    first, inverse = gallery(ordered)
    out = clip_core.retrieval_metrics(torch.from_numpy(ordered["image_features"][first]),
                                      torch.from_numpy(ordered["text_features"]), torch.from_numpy(inverse))
    return {**{key.replace("R@", "R"): value for key, value in out.items()},  # MLflow keys cannot hold '@'
            "images": len(first), "captions": len(inverse)}


def linear_probes(train: dict, test: dict, shots: list[int], seed: int) -> dict:
    train_x, train_y = torch.from_numpy(train["image_features"]), torch.from_numpy(train["label"])
    test_x, test_y = torch.from_numpy(test["image_features"]), torch.from_numpy(test["label"])
    out = {"full_top1": clip_core.linear_probe(train_x, train_y, test_x, test_y, seed=seed)["top1"]}
    for k in shots:
        chosen = clip_core.zeroshot.few_shot_indices(train_y, k, seed=seed)
        if len(chosen) < 2:
            continue
        out[f"k{k}_top1"] = clip_core.linear_probe(train_x[chosen], train_y[chosen], test_x, test_y, seed=seed)["top1"]
    return out


# ------------------------------------------------------------------------------ plots


def confusion_png(confusion: np.ndarray, classnames: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * len(classnames), 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(classnames) <= 60:
        ax.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classnames)), classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("zero-shot confusion (row-normalized)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def retrieval_png(uri: str, ordered: dict, path: str, queries: int = 4, top: int = 5) -> None:
    """For the first `queries` captions: the caption and its top retrieved images (true one in green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ordered["key"].astype(str)
    first, inverse = gallery(ordered)
    scores = ordered["text_features"][:queries] @ ordered["image_features"][first].T  # the distinct images
    shown = [np.argsort(-row)[:top] for row in scores]  # each caption's nearest distinct images
    wanted = sorted({keys[first[i]] for row in shown for i in row} | {keys[q] for q in range(len(scores))})
    table = read_prepared_table(uri, columns=["key", "image", "caption"],  # only the images drawn
                                filters=[("key", "in", wanted)]).to_pydict()
    by_key = {key: (image, caption) for key, image, caption in zip(table["key"], table["image"], table["caption"])}
    fig, axes = plt.subplots(len(scores), top, figsize=(2 * top, 2.3 * len(scores)), squeeze=False)
    for q, row in enumerate(scores):
        for rank, image in enumerate(shown[q]):
            ax, key = axes[q][rank], str(keys[first[image]])
            ax.imshow(open_prepared_image(by_key[key][0], where=f"the image of key {key!r} in {uri}"))
            ax.set_xticks([])
            ax.set_yticks([])
            color = "green" if image == inverse[q] else "red"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            ax.set_xlabel(f"{row[image]:.3f}", fontsize=7)
        axes[q][0].set_title(by_key[keys[q]][1][:60], fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------ the stage


def _setup_digest(*setup) -> str:
    """What a section's figures depend on beside the eval set: the gate compares them only when it is equal."""
    return "sha256:" + hashlib.sha256(json.dumps(setup).encode()).hexdigest()


def _dataset_info(uri: str) -> dict:
    manifest = read_manifest(uri)
    return {"dataset": uri, "digest": manifest["digest"], "rows": manifest["counts"]["kept"]}


def _classnames(config: EvaluateConfig) -> list[str]:
    classnames = config.classnames or read_manifest(config.zeroshot).get("classnames")
    if not classnames:
        raise ValueError(f"{config.zeroshot} has no class names in its manifest: pass --classnames FILE "
                         "(one name per line, line i is label i)")
    return classnames


def _require_labels(uri: str, data: dict, classes: int | None = None) -> None:
    """A label on every row of `data` (decoded: -1 for none), and below `classes` when given."""
    unlabeled = int((data["label"] < 0).sum())
    if unlabeled:
        raise ValueError(f"{uri} has {unlabeled} unlabeled rows: prepare it with --label-key (and --classnames)")
    if classes is not None and int(data["label"].max()) >= classes:
        raise ValueError(f"{uri} has label {int(data['label'].max())} but only {classes} class names were given")


def evaluate(config: EvaluateConfig, echo=print) -> dict:
    from .runtime import init_ray

    for uri in [config.zeroshot, config.retrieval, *(config.linear_probe or ())]:
        if uri:
            read_manifest(uri)  # a missing set fails before any work starts
    init_ray()
    with tempfile.TemporaryDirectory(prefix="rayclip-eval-") as scratch:
        source = registry.fetch_checkpoint(config.model, scratch, tracking_uri=config.mlflow_tracking_uri,
                                           quick_gelu=config.quick_gelu)
        artifacts = os.path.join(scratch, "eval")
        os.makedirs(artifacts)
        metrics = _evaluate(config, source, artifacts, echo)
        if source.name:
            registry.record_metrics(source.name, source.version, metrics, tracking_uri=config.mlflow_tracking_uri)
        if config.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
            metrics["mlflow_run_id"] = _log_to_mlflow(config, source, metrics, artifacts)
        if config.output_json:  # last: the pipeline skips an evaluation whose file exists, MLflow's part included
            storage.write_bytes(config.output_json, (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics


def _evaluate(config: EvaluateConfig, source: registry.ModelSource, artifacts: str, echo) -> dict:
    import ray

    files, model_config = inference_files(source)
    image_size, files_ref = model_config.vision.image_size, ray.put(files)
    metrics: dict = {"model": {"uri": config.model, "name": source.name, "version": source.version,
                               # what `register --metrics` checks these figures are about
                               "weights_sha256": json.loads(files[CONFIG_FILE]).get("weights_sha256")}}
    echo(f"evaluate: {config.model} (image size {image_size}) on {config.workers} model actor(s)")

    uses = [(config.zeroshot, False), (config.retrieval, True), *((uri, False) for uri in config.linear_probe or ())]
    uris = list(dict.fromkeys(uri for uri, _ in uses if uri))
    with_text = [any(text for used, text in uses if used == uri) for uri in uris]
    data = dict(zip(uris, embed_sets(uris, files_ref, image_size, config, with_text)))

    if config.zeroshot:
        classnames, templates = _classnames(config), config.template_list
        _require_labels(config.zeroshot, data[config.zeroshot], len(classnames))
        classifier = ray.get(ray.remote(_classifier).options(num_gpus=1 if config.use_gpu else 0).remote(
            files_ref, classnames, templates, config.use_gpu, config.precision))
        scores, confusion = zeroshot_metrics(data[config.zeroshot]["image_features"], data[config.zeroshot]["label"],
                                             classifier)
        metrics["zeroshot"] = {**scores, "per_class_recall": per_class_recall(confusion, classnames),
                               **_dataset_info(config.zeroshot), "classes": len(classnames),
                               "templates": len(templates), "setup_digest": _setup_digest(classnames, templates)}
        confusion_png(confusion, classnames, os.path.join(artifacts, "confusion_matrix.png"))
    if config.retrieval:
        ordered = data[config.retrieval]
        metrics["retrieval"] = {**retrieval(ordered),
                                **_dataset_info(config.retrieval)}
        retrieval_png(config.retrieval, ordered, os.path.join(artifacts, "retrieval_examples.png"))
    if config.linear_probe:
        train_uri, test_uri = config.linear_probe
        _require_labels(train_uri, data[train_uri])
        _require_labels(test_uri, data[test_uri])
        metrics["linear_probe"] = {**linear_probes(data[train_uri], data[test_uri], config.shots, config.seed),
                                   **_dataset_info(test_uri), "train_digest": read_manifest(train_uri)["digest"]}
        metrics["linear_probe"]["setup_digest"] = _setup_digest(metrics["linear_probe"]["train_digest"], config.shots,
                                                                config.seed)
    for section in registry.EVAL_SECTIONS:
        if section in metrics:
            echo(f"evaluate: {section}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics[section].items()
                                                        if isinstance(v, float)))
    Path(artifacts, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _log_to_mlflow(config: EvaluateConfig, source: registry.ModelSource, metrics: dict, artifacts: str) -> str:
    import mlflow

    tags = {"rayclip.stage": "evaluate"}
    if config.mlflow_parent_run_id:
        tags["mlflow.parentRunId"] = config.mlflow_parent_run_id
    with using(config.mlflow_tracking_uri), \
            log_into(config.mlflow_run_id or source.run_id, config.mlflow_experiment, "evaluate", tags) as run:
        mlflow.log_metrics({key: float(value) for key, value in registry.metric_tags(metrics).items()
                            if _is_number(value)})
        mlflow.log_artifacts(artifacts, artifact_path="eval")
        return run.info.run_id


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False
