"""Serve stage: zero-shot CLIP endpoints on Ray Serve.

    HTTP ──▶ Ingress (FastAPI: auth, limits, image decoding, classifier cache, ranking)
               ├──▶ ImageTower  (@serve.batch: uint8 crops → normalized image embeddings)
               └──▶ TextTower   (@serve.batch: texts → normalized text embeddings; classifiers)

The ingress does all CPU work on the request (base64, decoding, resizing), so the tower
replicas only run tensors, in dynamic batches gathered across requests. `model` (models:/NAME@ALIAS,
models:/NAME/N, or a checkpoint directory) is resolved to an exact version that every deployment
gets as its user_config; the towers are multiplexed by version, and each request names the
version the ingress held when it started, so a rollout (`deploy.rollout.reload`) never mixes two
models in one answer. Classifiers for a (labels, templates) set are kept in an LRU cache keyed by the
version. Starting, deploying and rolling the app on a cluster: deploy/rollout.py.
"""

# no `from __future__ import annotations`: FastAPI must see real types through Serve's class-based views

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Awaitable, Callable, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

APP_NAME = "rayclip"
serve_batch = serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # sizes set from the config per replica
TOKEN_ENV = "RAYCLIP_SERVE_TOKEN"
TOKEN_DIGEST_ENV = "RAYCLIP_SERVE_TOKEN_SHA256"  # its SHA-256 in hex: for a job's environment, which Ray shows


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(32 * 2**20, gt=0)
    max_image_bytes: int = Field(10 * 2**20, gt=0, description="one decoded-from-base64 image")
    max_image_pixels: int = Field(40_000_000, gt=0, description="width x height; above is a decompression bomb")
    max_request_pixels: int = Field(100_000_000, gt=0, description="the images of a request together: what "
                                    "bounds the CPU one request costs the ingress")
    max_aspect_ratio: float = Field(50.0, ge=1.0, description="longer / shorter side; a thin strip's resize to "
                                    "the model's size would otherwise take gigabytes")
    max_images: int = Field(32, gt=0, description="images per request")
    max_texts: int = Field(256, gt=0, description="texts per request")
    max_labels: int = Field(1000, gt=0)
    max_templates: int = Field(100, gt=0)
    max_prompts: int = Field(8192, gt=0, description="labels x templates of a classifier not yet cached: each is a "
                             "text the text tower encodes (ImageNet's 1000 classes x 80 templates needs 80000)")
    max_text_chars: int = Field(1000, gt=0)
    max_search_results: int = Field(1000, gt=0, description="k of /v1/search")
    body_timeout_s: float = Field(30.0, gt=0, description="to receive a request's body: a client that sends it "
                                  "slower holds an ingress slot until then, then gets a 408")


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(60, ge=0)


class ServeConfig(BaseModel):
    """Everything the Serve app needs; `rayclip serve` flags and deploy/serve_config.yaml map onto it."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # an error must not print the token
    model: str = Field("models:/clip@champion", description="models:/NAME@ALIAS, models:/NAME/N or a checkpoint dir")
    quick_gelu: bool | None = Field(None, description="the activation of weights in another format: True QuickGELU, "
                                    "False GELU, overriding what they imply; a rayclip checkpoint keeps its own")
    mlflow_tracking_uri: str | None = None
    index: str | None = Field(None, description="embeddings `rayclip embed` wrote (a directory or s3:// prefix) "
                              "that POST /v1/search looks through; made with the served model")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, lt=65536)
    max_batch_size: int = Field(32, gt=0)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    autoscaling: Autoscaling = Autoscaling()
    num_cpus: float = Field(0.5, ge=0, description="per tower replica")
    num_gpus: float = Field(0, ge=0, description="per tower replica (a fraction shares a GPU)")
    ingress_replicas: int = Field(1, gt=0, description="ingress replicas (auth, decoding, the zero-shot "
                                  "arithmetic: a request's CPU work), unless ingress_autoscaling sizes them")
    ingress_autoscaling: Autoscaling | None = Field(None, description="autoscale the ingress replicas on their "
                                                    "ongoing requests instead of running ingress_replicas")
    ingress_num_cpus: float = Field(0, ge=0, description="per ingress replica: on a cluster, reserve its cores "
                                    "(it decodes on 4 threads), so that replicas spread onto nodes with room and "
                                    "the autoscaler adds nodes for them; 0 fits any node, the head's included")
    max_ongoing_requests: int = Field(64, gt=0, description="per tower replica; at least max_batch_size")
    max_queued_requests: int = Field(256, ge=-1, description="per tower caller; beyond, 503 + Retry-After "
                                     "(-1: unbounded)")
    ingress_max_queued_requests: int = Field(1024, ge=-1, description="requests queued for an ingress replica "
                                             "(by Serve's proxy, or behind HAProxy by the replica); beyond, a "
                                             "plain-text 503 + Retry-After from Serve")
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After an overloaded server answers with")
    access_log: bool = Field(True, description="Serve's access log: a line per request and per tower call")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Serve's logs: the controller's and proxies' when this starts Serve, and the app's")
    classifier_cache_size: int = Field(256, ge=0, description="label sets whose classifiers an ingress keeps")
    classifier_cache_bytes: int = Field(256 * 2**20, ge=0, description="and at most this much of them (1,000 "
                                        "labels of a 768-wide model are 3 MB)")
    image_buckets: list[str] = Field([], description="S3 buckets whose objects a request may name as "
                                     "s3://BUCKET/KEY instead of sending the bytes (none by default)")
    limits: Limits = Limits()
    auth_token: str | None = Field(None, description=f"bearer token; default: ${TOKEN_ENV} when set. Serve "
                                   "stores only its SHA-256 (auth_token_sha256), never the token")
    auth_token_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$",
                                          description="the bearer token's SHA-256 in hex, instead of the token")
    auth_token_file: str | None = Field(None, description="a file holding the bearer token (a mounted secret), "
                                        "read where the app runs, when each ingress replica starts")
    require_auth: bool = Field(False, description="refuse to run without a token (the shipped cluster configs set "
                                                  "it): else an app without one serves anyone, with a warning")

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials_in_the_uri(cls, uri: str | None) -> str | None:
        if uri and urllib.parse.urlsplit(uri).password is not None:
            raise ValueError("the tracking URI holds a password, which Serve would keep in the application's config "
                             "and show on its dashboard: give the URI without it and set $MLFLOW_TRACKING_USERNAME "
                             "and $MLFLOW_TRACKING_PASSWORD where the app runs (a KubeRay secret, or the environment "
                             "`rayclip serve` starts in)")
        return uri

    @model_validator(mode="after")
    def _one_way_to_size_the_ingress(self) -> "ServeConfig":
        if self.ingress_autoscaling is not None:
            if self.ingress_replicas != 1:
                raise ValueError("set ingress_replicas (a fixed number) or ingress_autoscaling, not both")
            if self.ingress_autoscaling.min_replicas < 1:
                raise ValueError("ingress_autoscaling.min_replicas must be at least 1: the ingress answers every "
                                 "request, /healthz included")
        return self

    def token(self) -> str | None:
        """The bearer token where this process knows it (auth_token, else auth_token_file's, else
        ${TOKEN_ENV}): what a client sends."""
        if self.auth_token:
            return self.auth_token
        if self.auth_token_file:
            try:
                token = Path(self.auth_token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"auth_token_file: cannot read the token: {exc}") from None
            if not token:
                raise ValueError(f"auth_token_file: {self.auth_token_file} is empty")
            return token
        return os.environ.get(TOKEN_ENV) or None

    def token_digest(self) -> str | None:
        """SHA-256 (hex) of the bearer token requests must send: auth_token's, else auth_token_sha256,
        else ${TOKEN_ENV}'s (in the replica's environment); None: no auth."""
        if self.auth_token_sha256 and not self.auth_token:
            return self.auth_token_sha256
        token = self.token()
        return sha256_hex(token) if token else None

    def stored(self) -> "ServeConfig":
        """This config as Serve may keep it (application args, deployment init args): the token replaced
        by its digest, since Serve shows an application's config to anyone who can read the dashboard."""
        if not self.auth_token:
            return self
        return self.model_copy(update={"auth_token": None, "auth_token_sha256": sha256_hex(self.auth_token)})


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKEN_FIELDS = ("auth_token", "auth_token_sha256", "auth_token_file")  # the ServeConfig fields that set a token
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # where Serve listens for this machine alone
NO_TOKEN = (f"require_auth: the app has no token: set {TOKEN_ENV} where it runs (the nodes' environment), or give "
            "auth_token_sha256 or auth_token_file in its config")


def with_environment_token(values: dict) -> dict:
    """ServeConfig `values` with the digest of ${TOKEN_ENV} (or ${TOKEN_DIGEST_ENV}, the digest itself), when
    one is set here and `values` name no token: the replicas may run where this environment is not (a
    cluster joined through RAY_ADDRESS), so they get the token's digest in their config instead of reading
    the variable themselves. A Ray job's environment is shown by `ray job list` and the dashboard: hand a
    job the digest, never the token."""
    if any(values.get(k) for k in TOKEN_FIELDS):
        return values
    if os.environ.get(TOKEN_ENV):
        return {**values, "auth_token_sha256": sha256_hex(os.environ[TOKEN_ENV])}
    if os.environ.get(TOKEN_DIGEST_ENV):
        return {**values, "auth_token_sha256": os.environ[TOKEN_DIGEST_ENV].strip().lower()}
    return values


def replica_token_digest(config: "ServeConfig") -> str | None:
    """The token digest an ingress replica checks requests against (config.token_digest(), read where it
    runs); without one, refused (ValueError) when the config require_auth, else said in its log."""
    digest = config.token_digest()
    if digest is None:  # `serve deploy` of a file without a token, where none is set
        if config.require_auth:
            raise ValueError(NO_TOKEN)
        if config.host in LOCAL_HOSTS:  # as open_warning: this machine's own (the demo) needs none
            return None
        logging.getLogger(__name__).warning(
            "the API answers without auth: anyone who reaches Serve's port can use the model; set %s where the "
            "app runs, or auth_token_sha256 / auth_token_file in its config", TOKEN_ENV)
    return digest


def check_token(config: "ServeConfig") -> None:
    """Refuse (ValueError) a pipeline that would deploy an app that require_auth without a token, before
    any work (its ingress replicas would refuse to start after the training): the pipeline hands them the
    digest of the token in its environment."""
    if config.require_auth and not any(getattr(config, k) for k in TOKEN_FIELDS):
        raise ValueError(f"require_auth: the app has no token: set {TOKEN_ENV} or {TOKEN_DIGEST_ENV} where the "
                         "pipeline runs (the job's environment), or give auth_token_sha256 or auth_token_file in "
                         "its serve section, or set serve.enabled=false")


def open_warning(config: "ServeConfig") -> str | None:
    """What to say when the app listens beyond this machine without a token (said, not refused: a private
    network may be meant)."""
    if config.host in LOCAL_HOSTS or any(getattr(config, k) for k in TOKEN_FIELDS):
        return None
    return (f"warning: the app listens on {config.host}:{config.port} without auth: anyone who reaches that port "
            f"can use the model; set {TOKEN_ENV} (where the command runs) or auth_token_file")


# ------------------------------------------------------------------------------ request bodies


class ClassifyForm(BaseModel):
    """/v1/classify's fields besides the images (a multipart upload sends these as form fields)."""

    model_config = ConfigDict(extra="forbid")
    labels: list[str] = Field(min_length=1)
    templates: list[str] | None = Field(None, description="prompt templates with one '{}' (default: a built-in set)")
    top_k: int = Field(5, gt=0)


class ClassifyRequest(ClassifyForm):
    images: list[str] = Field(min_length=1, description="base64-encoded images (or s3://BUCKET/KEY in a bucket "
                              "the server's image_buckets allows)")


class EmbedImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1)
    encoding: str = Field("float32", pattern="^(float32|base64-float16)$")


class EmbedTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1)
    encoding: str = Field("float32", pattern="^(float32|base64-float16)$")


class RankRequest(BaseModel):
    """One image against many texts, or one text against many images."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = None
    texts: list[str] | None = None
    text: str | None = None
    images: list[str] | None = None


class SearchRequest(BaseModel):
    """A text or an image; the rows of the index whose image (or caption) embeddings lie nearest to it."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="base64-encoded image (or s3://BUCKET/KEY as for /v1/classify)")
    embedding: list[float] | str | None = Field(None, description="an embedding of the live model (as /v1/embed "
                                                "returns it: floats, or base64 float16), e.g. a mean of several")
    against: Literal["image", "text"] = Field("image", description="the index's image or caption embeddings")
    k: int = Field(10, gt=0)


class RequestError(Exception):
    """A request that cannot be answered: becomes `{"error": {"type", "message"}}` with `status`."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


# ------------------------------------------------------------------------------ the model towers


# A checkpoint served from a path (or s3:// prefix) is a version by the weights it held when rolled out
WEIGHTS_MARK = "#weights_sha256="


def live_model(uri: str, tracking_uri: str | None) -> dict:
    """What a rollout deploys (every deployment's user_config): `{"model": the exact version to load,
    "alias": the alias it was resolved from}`: models:/NAME@ALIAS → models:/NAME/N; a checkpoint with the
    digest its config.json claims for its weights (`PATH#weights_sha256=…`): a path names no version, and
    weights written there again (a training rerun into the same --output) are another one, which
    `rayclip deploy --reload` rolls to and a replica started meanwhile refuses to load beside the old."""
    from clip_core.checkpoint import CONFIG_FILE
    from workflows import registry, storage

    parsed = registry.parse_model_uri(uri)
    if not parsed:
        described = registry.checkpoint_description(uri) if storage.exists(storage.join(uri, CONFIG_FILE)) else {}
        digest = described.get("weights_sha256")
        return {"model": f"{uri}{WEIGHTS_MARK}{digest[:16]}" if digest else uri, "alias": None}
    name, alias, number = parsed
    version = registry.get_version(name, alias, number, tracking_uri=tracking_uri)
    return {"model": f"models:/{name}/{version.version}", "alias": alias}


class Loaded(NamedTuple):
    model: object
    info: dict
    tokenize: object


def load_served_model(uri: str, tracking_uri: str | None, device: str = "cpu",
                      quick_gelu: bool | None = None) -> Loaded:
    """The CLIP model at `uri` (a `live_model` version) on `device`, what /v1/model reports about it, and its
    tokenizer."""
    import clip_core
    from workflows import registry

    location, _, rolled_out = uri.partition(WEIGHTS_MARK)
    with tempfile.TemporaryDirectory(prefix="rayclip-serve-") as scratch:
        source = registry.fetch_checkpoint(location, scratch, tracking_uri=tracking_uri, quick_gelu=quick_gelu)
        weights = registry.checkpoint_description(source.directory).get("weights_sha256")
        if rolled_out and not (weights or "").startswith(rolled_out):
            raise clip_core.CheckpointError(
                f"the checkpoint at {location} holds other weights (sha256 {(weights or 'unrecorded')[:16]}) than "
                f"were rolled out ({rolled_out}): it was written again since; roll the app to them with "
                "`rayclip deploy --reload`")
        model = clip_core.load_model(source.directory)  # checks the weights against the claim
    info = {"uri": uri, "name": source.name or os.path.basename(os.path.normpath(location)),
            "version": source.version, "metrics": {}, "lineage": {}, "weights_sha256": weights}
    if source.name:
        info["metrics"] = registry.version_metrics(source.tags)
        info["lineage"] = {key: source.tags[key] for key in ("dataset_digests", "train_run_id", "git_commit",
                                                             "config_hash") if key in source.tags}
        info["run_id"] = source.run_id
    info["quick_gelu"] = model.config.quick_gelu
    info["image_size"] = model.image_size
    info["embed_dim"] = model.config.embed_dim
    info["logit_scale"] = float(model.logit_scale.detach().exp().clamp(max=100))
    info["logit_bias"] = None if model.logit_bias is None else float(model.logit_bias.detach())  # SigLIP's
    return Loaded(model.eval().to(device), info, clip_core.get_tokenizer(model.config.text.context_length))


class _Tower:
    """A replica holding the model versions it is asked for (multiplexed by version: every call names one),
    at most two: during a rollout the old one keeps serving while the new one loads."""

    def __init__(self, config: dict):
        import torch

        self.config = ServeConfig(**config)
        self.device = "cuda" if self.config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.encode.set_max_batch_size(self.config.max_batch_size)
        self.encode.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict) -> None:
        """A rollout (or the replica's start): load the version it names before the ingress asks for it."""
        await self.load(user_config["model"])

    @serve.multiplexed(max_num_models_per_replica=2)
    async def load(self, uri: str) -> Loaded:
        # a thread, so the version already loaded keeps answering while this one loads
        return await asyncio.to_thread(load_served_model, uri, self.config.mlflow_tracking_uri, self.device,
                                       self.config.quick_gelu)

    async def model_info(self) -> dict:
        return (await self.load(serve.get_multiplexed_model_id())).info

    def _autocast(self):
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda")


class ImageTower(_Tower):
    @serve_batch
    async def encode(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """uint8 centre crops [S, S, 3] → (normalized embedding, batch size) each."""
        import torch

        from clip_core.transforms import normalize

        model = (await self.load(serve.get_multiplexed_model_id())).model  # Serve batches one version at a time
        pixels = torch.from_numpy(np.stack(images)).to(self.device)
        with torch.inference_mode(), self._autocast():
            features = model.encode_image(normalize(pixels), normalize=True).float().cpu().numpy()
        return [(row, len(images)) for row in features]


class TextTower(_Tower):
    @serve_batch
    async def encode(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        import torch

        model, _, tokenize = await self.load(serve.get_multiplexed_model_id())
        with torch.inference_mode(), self._autocast():
            features = model.encode_text(tokenize(texts).to(self.device), normalize=True).float().cpu().numpy()
        return [(row, len(texts)) for row in features]

    async def classifier(self, labels: list[str], templates: list[str]) -> np.ndarray:
        import torch

        import clip_core

        model, _, tokenize = await self.load(serve.get_multiplexed_model_id())

        def build() -> np.ndarray:  # in a thread: up to max_prompts texts, while the replica's batches go on
            with torch.inference_mode(), self._autocast():
                return clip_core.zero_shot_classifier(model, tokenize, labels, templates).float().cpu().numpy()

        return await asyncio.to_thread(build)


class Index:
    """The embeddings `rayclip embed` wrote, searched exactly: the queries of a batch in one matrix product
    (memory: rows x embed_dim x 4 bytes, plus the keys and captions)."""

    def __init__(self, config: dict):
        from workflows.embed import read_embeddings

        self.config = ServeConfig(**config)
        manifest, table = read_embeddings(self.config.index)
        self.vectors = {kind: _matrix(table[f"{kind}_embedding"]) for kind in ("image", "text")
                        if f"{kind}_embedding" in table.column_names}
        # the rows a kind's vectors stand for, where not every row in order: an image with several captions
        # (COCO's five, a row each) is one image to search, its first row, not found once per caption
        self.rows_of: dict[str, np.ndarray] = {}
        if "image" in self.vectors and "image_id" in table.column_names:
            self.rows_of["image"] = first_rows(table["image_id"])
            self.vectors["image"] = np.ascontiguousarray(self.vectors["image"][self.rows_of["image"]])
        self.rows = table.select([c for c in ("key", "caption", "label", "metadata") if c in table.column_names])
        self.about = {"uri": self.config.index, "rows": table.num_rows, "embeddings": sorted(self.vectors),
                      "weights_sha256": manifest["model"]["weights_sha256"], "embed_dim": manifest["embed_dim"],
                      "quick_gelu": manifest["model"].get("quick_gelu"),  # None: an index from before it was kept
                      "model": {key: manifest["model"][key] for key in ("uri", "name", "version")}}
        self.search.set_max_batch_size(self.config.max_batch_size)
        self.search.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    async def info(self) -> dict:
        return self.about

    @serve_batch
    async def search(self, queries: list[tuple[np.ndarray, str, int]]) -> list[list[dict]]:
        """(normalized query, "image" | "text", k) → the k nearest rows, nearest first (ties: row order)."""
        found: list[list[dict]] = [[] for _ in queries]
        for kind in {against for _, against, _ in queries}:
            members = [i for i, (_, against, _) in enumerate(queries) if against == kind]
            for i, rows in zip(members, self.nearest(kind, np.stack([queries[i][0] for i in members]),
                                                     [queries[i][2] for i in members])):
                found[i] = rows
        return found

    def nearest(self, kind: str, queries: np.ndarray, ks: list[int]) -> list[list[dict]]:
        """For each query [n, dim] against `kind`'s vectors, its k nearest rows, nearest first."""
        scores = self.vectors[kind] @ queries.T.astype(np.float32)
        found = []
        for column, k in enumerate(ks):
            column_scores = scores[:, column]
            nearest = top_k(column_scores, k)
            rows = self.rows.take(self.rows_of[kind][nearest] if kind in self.rows_of else nearest).to_pylist()
            found.append([{**row, **({"metadata": document(row["metadata"])} if "metadata" in row else {}),
                           "cosine": float(column_scores[j])} for row, j in zip(rows, nearest)])
        return found


MAX_METADATA_DEPTH = 32  # JSON nested deeper is answered as its text (~1,000 levels fit in 4 KiB)


def document(text: str | None):
    """A row's metadata as the JSON it holds (img2dataset's {"url": …}), or as the text it is: not JSON, or
    nested past MAX_METADATA_DEPTH (json.loads recursed out of the stack in the search replica, failing its
    whole batch, and FastAPI cannot write an answer 254 levels deep)."""
    if text is None:
        return None
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return text
    pending = [(parsed, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_METADATA_DEPTH:
                return text
            pending.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return parsed


INDEX_ROW_BYTES = 512  # an allowance a row for its key, caption and label beside its vectors


def index_memory(manifest: dict) -> int:
    """The bytes of memory an Index replica reserves for the embeddings `manifest` describes (Ray's `memory`
    resource: the replica goes to a node with that much to spare, and waits for one rather than run a node
    out of memory): each kind's float32 matrix, the vectors as stored while they are converted, and
    INDEX_ROW_BYTES a row."""
    kinds = sum(column.endswith("_embedding") for column in manifest["columns"])
    stored = np.dtype(manifest["dtype"]).itemsize
    return manifest["rows"] * (kinds * manifest["embed_dim"] * (4 + stored) + INDEX_ROW_BYTES) \
        + 2 * manifest.get("metadata_bytes", 0)  # its Arrow bytes, and a row's Python objects as it answers


def index_mismatch(index: dict, info: dict) -> str | None:
    """Why the index's embeddings (Index.about) do not compare with the live model's (its info), or None:
    other weights, or the same weights run with the other activation (a --quick-gelu override)."""
    made_with = index["model"]["name"] or index["model"]["uri"]
    if index["model"]["version"]:
        made_with += f" version {index['model']['version']}"
    live = f"{info['name']} version {info['version']}"
    if index.get("embed_dim", info["embed_dim"]) != info["embed_dim"]:
        return (f"the index was embedded with {made_with} in {index['embed_dim']} dimensions, and the live model "
                f"({live}) embeds in {info['embed_dim']}")
    if index["weights_sha256"] is None and info["weights_sha256"] is None:
        return (f"neither the index (embedded with {made_with}) nor the live model ({live}) records its weights' "
                "SHA-256 (a checkpoint saved before rayclip kept it), so they cannot be told apart: save the "
                "checkpoint again (clip_core.save_checkpoint records it) and embed with it")
    if index["weights_sha256"] != info["weights_sha256"]:
        return f"the index was embedded with {made_with}, not the live model ({live})"
    if index.get("quick_gelu") not in (None, info["quick_gelu"]):
        activation = {True: "QuickGELU", False: "GELU"}
        return (f"the index was embedded with {made_with} running {activation[index['quick_gelu']]}, and the live "
                f"model ({live}) runs {activation[info['quick_gelu']]}")
    return None


def first_rows(ids) -> np.ndarray:
    """The first row of each distinct value of the Arrow column `ids`, in row order (as int32 codes: not a
    Python string a row)."""
    codes = ids.combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False)
    return np.sort(np.unique(codes, return_index=True)[1])


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The rows of the k highest scores, highest first; ties in row order, also at the k-th place (so the
    first k of k + 1 are the k)."""
    k = min(k, len(scores))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
    candidates = np.flatnonzero(scores >= kth)  # every row tied with the k-th, not whichever partition kept
    return candidates[np.lexsort((candidates, -scores[candidates]))][:k]


def _matrix(column) -> np.ndarray:
    """A fixed-size-list column → a float32 [rows, dim] array."""
    vectors = column.combine_chunks()
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(vectors), vectors.type.list_size)


# ------------------------------------------------------------------------------ the ingress


def decode_base64(data: str, index: int, limits: Limits) -> bytes:
    if not isinstance(data, str) or not data:
        raise RequestError(400, "invalid_image", f"images[{index}] is empty: send base64-encoded image bytes")
    if data.startswith("data:"):  # data URLs from browsers
        data = data.partition(",")[2]
    if len(data) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(413, "image_too_large", f"images[{index}] is over {limits.max_image_bytes} bytes; "
                           "send a smaller or re-encoded image")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_base64", f"images[{index}] is not valid base64") from None


@contextlib.contextmanager
def _image_errors(index: int):
    """clip_core's ImageError for images[index] as the 4xx it is."""
    import clip_core

    try:
        yield
    except clip_core.ImageError as exc:
        if exc.reason == "too_large":
            raise RequestError(413, "image_too_large", f"images[{index}]: {exc}") from None
        if exc.reason == "unsupported":
            raise RequestError(415, "unsupported_image_format", f"images[{index}] is not an image format this "
                               "server reads (JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
        raise RequestError(400, "invalid_image", f"images[{index}]: {exc}") from None


def check_request_pixels(images: list[bytes], limits: Limits) -> None:
    """Refuse images whose pixels together are over the request's budget, from their headers alone: a
    few kilobytes of flat-colour PNG or WebP can each hold the most pixels one image may have."""
    from clip_core.transforms import peek_image

    total = 0
    for index, data in enumerate(images):
        with _image_errors(index):
            width, height = peek_image(data, max_pixels=limits.max_image_pixels).size
        total += width * height
    if total > limits.max_request_pixels:
        raise RequestError(413, "images_too_large", f"the images hold {total / 1e6:.1f} megapixels together, over "
                           f"{limits.max_request_pixels / 1e6:g} per request: send fewer or smaller images")


def prepare_image(data: bytes, index: int, image_size: int, limits: Limits) -> np.ndarray:
    """Encoded bytes → the uint8 [S, S, 3] centre crop the towers take."""
    import clip_core
    from clip_core.transforms import decode_image, peek_image

    with _image_errors(index):
        image = peek_image(data, max_pixels=limits.max_image_pixels)
        width, height = image.size
        if max(width, height) > limits.max_aspect_ratio * min(width, height):
            raise RequestError(422, "extreme_aspect_ratio", f"images[{index}] is {width}x{height}, over "
                               f"{limits.max_aspect_ratio:g}:1; crop it to the part to classify")
        image = decode_image(image, max_pixels=limits.max_image_pixels, reduce_to=image_size)
        # a thin strip's resize may be over the pixel limit even where its aspect ratio is allowed
        pixels = clip_core.image_transform(image_size, max_pixels=limits.max_image_pixels).crop(image)
    return np.asarray(pixels, dtype=np.uint8)


def check_texts(texts: list[str], what: str, limit: int, limits: Limits) -> list[str]:
    if len(texts) > limit:
        raise RequestError(422, "too_many", f"{len(texts)} {what}: at most {limit} per request")
    for i, text in enumerate(texts):
        if not text.strip():
            raise RequestError(422, f"empty_{what.rstrip('s')}", f"{what}[{i}] is empty")
        if len(text) > limits.max_text_chars:
            raise RequestError(422, "text_too_long", f"{what}[{i}] is over {limits.max_text_chars} characters")
    return texts


def decode_vector(value: list[float] | str, dim: int) -> np.ndarray:
    """A query embedding sent as floats or as base64 float16 (encode_vector's forms) → a unit float32 vector of
    the model's `dim`; RequestError 422 for another length, a value that is not finite, or a zero vector."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "invalid_embedding", "embedding: not base64 (send floats, or the base64 "
                               "float16 /v1/embed returns)") from None
        if len(raw) != 2 * dim:
            raise RequestError(422, "invalid_embedding", f"embedding: {len(raw)} bytes, not the {2 * dim} of "
                               f"{dim} float16 values (the live model's embed_dim)")
        vector = np.frombuffer(raw, dtype="<f2").astype(np.float64)
    else:
        if len(value) != dim:
            raise RequestError(422, "invalid_embedding", f"embedding: {len(value)} values, not the live model's "
                               f"embed_dim of {dim}")
        vector = np.asarray(value, dtype=np.float64)
    if not np.isfinite(vector).all() or not vector.any():
        raise RequestError(422, "invalid_embedding", "embedding: holds a value that is not finite, or is all zeros")
    vector /= np.abs(vector).max()  # the norm of [1e20, …] or [1e-25, …] within range
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def encode_vector(vector: np.ndarray, encoding: str):
    if encoding == "base64-float16":
        return base64.b64encode(vector.astype("<f2").tobytes()).decode()
    return [float(x) for x in vector.astype(np.float32)]


def probabilities(info: dict, cosine: np.ndarray) -> np.ndarray:
    """Scores of cosine similarities [..., C] as the model `info` describes was trained to give them: a
    softmax over the C candidates, or a SigLIP model's sigmoid of each (clip_core.zeroshot.probabilities)."""
    import torch

    from clip_core.zeroshot import probabilities as scores

    return scores(torch.from_numpy(info["logit_scale"] * cosine), info.get("logit_bias")).numpy()


api = FastAPI(title="rayclip", description="Zero-shot CLIP: classify, embed and rank images and texts.",
              version="1")
PLAYGROUND = (Path(__file__).parent / "web" / "index.html").read_text(encoding="utf-8")
# the page is self-contained: no CDN, no third-party requests
PLAYGROUND_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
                  "connect-src 'self'")


class Metrics:
    """Prometheus metrics of one ingress replica (Ray Serve's own are on Ray's metrics port)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("rayclip_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("rayclip_request_seconds", "HTTP request latency by route and status",
                                 ["route", "status"],
                                 registry=self.registry)
        # per item, as an ingress sees them (a batch's items come from several requests and replicas): a batch
        # of n counts n times, so the mean is the batch size an item ran in, not the mean batch size
        self.batch_sizes = Histogram("rayclip_batch_size", "per item sent to a tower, the size of the dynamic "
                                     "batch it ran in (a batch of n counts n times)", ["tower"],
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.classifier_cache = Counter("rayclip_classifier_cache", "classifier cache lookups", ["result"],
                                        registry=self.registry)


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


@api.exception_handler(RequestError)
async def _request_error(request, exc: RequestError):
    return _error(exc.status, exc.kind, exc.message, exc.headers)


@api.exception_handler(HTTPException)
async def _http_error(request, exc: HTTPException):
    return _error(exc.status_code, "http_error", str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError):
    return _error(422, "invalid_request", _describe(exc.errors()))


class CountRequests:
    """ASGI middleware: counts and times each request by route and status, and answers a bug's exception
    with a JSON 500 (logged). Plain ASGI: Starlette's BaseHTTPMiddleware (`@app.middleware`) runs each
    request in a task group and streams the response through a memory channel: measured side by side on 2
    cores under HAProxy, it took the ingress's CPU per request from 1.3 to 0.4 ms on /healthz and from 7.6
    to 3.1 ms on /v1/classify (tiny model)."""

    def __init__(self, app, metrics: Callable[[], Metrics]):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), None

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:  # noqa: BLE001 - a bug must still answer JSON, and be counted
            logging.getLogger(__name__).exception("unhandled error on %s", scope.get("path"))
            if status is None:  # nothing sent yet: the client gets an answer it can read
                await _error(500, "internal_error", "the server failed on this request; it has been logged")(
                    scope, receive, send)
            status = 500
        # the route that answered, as the app declares it (without the app's route prefix): a bounded set
        # of label values, where the request's own path is any string a client sends
        path = getattr(scope.get("route"), "path", None) or "other"
        code = str(status or 500)  # an app that answered nothing failed
        metrics = self.metrics()
        metrics.requests.labels(path, code).inc()
        metrics.latency.labels(path, code).observe(time.perf_counter() - started)


def _replica_metrics() -> Metrics:
    return serve.get_replica_context().servable_object.metrics


api.add_middleware(CountRequests, metrics=_replica_metrics)


def _describe(errors) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                     for e in list(errors)[:5])


def _validate(schema: type[BaseModel], raw: bytes):
    try:
        return schema.model_validate_json(raw)  # pydantic's parser bounds nesting depth: no RecursionError
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise RequestError(400, "invalid_json", f"the body is not valid JSON: {errors[0]['msg']}") from None
        raise RequestError(422, "invalid_request", _describe(errors)) from None


def _openapi_body(schema: type[BaseModel], form: dict | None = None) -> dict:
    """The request body for /docs (the routes read their bodies themselves, to enforce the limits first)."""
    content = {"application/json": {"schema": schema.model_json_schema()}}
    if form:
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content}}


CLASSIFY_FORM = {"type": "object", "required": ["images", "labels"], "properties": {
    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "labels": {"type": "array", "items": {"type": "string"}},
    "templates": {"type": "array", "items": {"type": "string"}},
    "top_k": {"type": "integer", "minimum": 1}}}


def _model_ref(info: dict) -> dict:
    return {"name": info["name"], "version": info["version"]}


def _same(given: str, expected_digest: str) -> bool:
    import hmac

    return hmac.compare_digest(sha256_hex(given), expected_digest)


def authorize(headers, token_digest: str | None) -> None:
    """A RequestError 401 unless `headers` carry the token whose digest is `token_digest` (None: no auth)."""
    if token_digest is None:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if not (scheme.lower() == "bearer" and _same(token.strip(), token_digest)):  # schemes are case-blind (RFC 9110)
        raise RequestError(401, "unauthorized", f"send 'Authorization: Bearer <token>' (the server's {TOKEN_ENV})",
                           {"WWW-Authenticate": f'Bearer realm="{APP_NAME}"'})  # a 401 must name it (RFC 9110)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request's body, refused (RequestError) over `limit` bytes (413: by its Content-Length at once,
    else as it streams in) or not received within `timeout_s` (408: a client trickling it in a byte at a
    time would hold an ingress slot for good)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "body_too_large", f"the body is over the {limit}-byte limit")
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise RequestError(413, "body_too_large", f"the body is over the {limit}-byte limit")
    except TimeoutError:
        raise RequestError(408, "body_timeout", f"the body did not arrive within {timeout_s:g} s") from None
    return bytes(raw)


async def call_towers(make_calls, retry_after_s: float) -> list:
    """Make and await tower calls. A full tower queue (raised by the call or by its result) becomes
    503 + Retry-After instead of a wait; calls lost with a dying replica are made once more (they
    have no side effects), then the same 503; so do towers that failed to deploy (`serve status` says
    why), where every request would otherwise be a 500 with a logged traceback."""
    retry = retry_after_s
    headers = {"Retry-After": str(max(1, round(retry)))}
    for attempt in (1, 2):
        try:
            return await asyncio.gather(*make_calls())
        except BackPressureError:
            raise RequestError(503, "overloaded", f"the model replicas are at capacity; retry in {retry:g} s",
                               headers) from None
        except DeploymentUnavailableError:
            raise RequestError(503, "model_unavailable", "the model replicas failed to start; retry in "
                               f"{retry:g} s", headers) from None
        except (RayActorError, ActorUnavailableError):
            if attempt == 2:
                raise RequestError(503, "replica_lost", "a model replica stopped while answering; it is being "
                                   f"replaced: retry in {retry:g} s", headers) from None


class SingleFlightCache:
    """An LRU cache of at most `size` values and `max_bytes` of them (their `nbytes`: a client sending label
    sets of its own fills it) that coroutines build, where concurrent gets of a key not yet kept share one
    build: N identical cold /v1/classify requests (all of them, after a rollout) make the text tower encode
    up to max_prompts prompts once, not N times. A failed build reaches its waiters and is not kept, so the
    next get builds again."""

    def __init__(self, size: int, max_bytes: int | None = None):
        self.size, self.max_bytes, self.bytes = size, max_bytes, 0
        self._values: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._building: dict[str, asyncio.Task] = {}

    async def get(self, key: str, build: Callable[[], Awaitable]) -> tuple[object, bool]:
        """(the value, whether this get built it)."""
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key], False
        task, built = self._building.get(key), False
        if task is None:
            task, built = asyncio.ensure_future(build()), True
            self._building[key] = task
            task.add_done_callback(lambda done: self._keep(key, done))
        # shielded: a request cancelled as its client hangs up does not cancel the build the others await
        return await asyncio.shield(task), built

    def _keep(self, key: str, task: asyncio.Task) -> None:
        del self._building[key]
        if task.cancelled() or task.exception() is not None or not self.size:
            return
        self._values[key] = task.result()
        self.bytes += getattr(task.result(), "nbytes", 0)
        while len(self._values) > self.size or (self.max_bytes is not None and self.bytes > self.max_bytes):
            self.bytes -= getattr(self._values.popitem(last=False)[1], "nbytes", 0)


# Threads of an ingress replica that decode and crop images: Pillow lets go of the GIL as it decodes and
# resizes, so the replica's event loop answers other requests meanwhile (2 cores, against decoding on the
# loop: 38 -> 42 requests/s with 12-MP photos, 120 -> 128 with small JPEGs); few, since each holds an image
# of up to max_image_pixels while it works.
DECODE_THREADS = 4


# Everything the class uses must be defined above it: serve.ingress pickles it as it decorates.
@serve.ingress(api)  # at import, so every process that imports this module binds the routes to the class
class Ingress:
    """Auth, limits, decoding and the zero-shot arithmetic; the towers do the model work."""

    def __init__(self, image_tower, text_tower, config: dict, index=None):
        import clip_core

        self.config = ServeConfig(**config)
        # once, here: an unreadable or empty token file fails the replica's start with its reason, instead
        # of every request answering 500 while /readyz says ready
        self._token_digest = replica_token_digest(self.config)
        self.image_tower, self.text_tower, self.index = image_tower, text_tower, index
        self._index_info: dict | None = None
        self.default_templates = list(clip_core.DEFAULT_TEMPLATES)
        self._classifiers = SingleFlightCache(self.config.classifier_cache_size, self.config.classifier_cache_bytes)
        self._live: dict | None = None  # the rollout's user_config: {"model", "alias"}
        self._infos: dict[str, dict] = {}  # what the towers report, by model version
        self.metrics = Metrics()
        self._decoder = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

    def reconfigure(self, user_config: dict) -> None:
        """A rollout's last step: requests that start from now on use the version it names (the towers
        loaded it first); requests in flight finish on the version they started with."""
        self._live = {"model": user_config["model"], "alias": user_config.get("alias")}

    # -------------------------------------------------------------------------- routes

    @api.post("/v1/classify", openapi_extra=_openapi_body(ClassifyRequest, CLASSIFY_FORM))
    async def classify(self, request: Request) -> dict:
        """Zero-shot classification: per image, the labels ranked by probability. JSON with base64 images,
        or a multipart upload: image files under `images`, a `labels` field per label."""
        media_type, raw = await self._read(request, ("application/json", "multipart/form-data"))
        if media_type == "multipart/form-data":
            images, body = await self._form(request, raw)
        else:
            body = _validate(ClassifyRequest, raw)
            images = body.images
        limits = self.config.limits
        labels = check_texts(body.labels, "labels", limits.max_labels, limits)
        templates = body.templates or self.default_templates
        check_texts(templates, "templates", limits.max_templates, limits)
        from clip_core.zeroshot import check_templates

        try:
            check_templates(templates)
        except ValueError as exc:
            raise RequestError(422, "invalid_template", str(exc)) from None
        if len(labels) * len(templates) > limits.max_prompts:
            raise RequestError(422, "too_many", f"{len(labels)} labels x {len(templates)} templates are "
                               f"{len(labels) * len(templates)} prompts to encode, over {limits.max_prompts}: send "
                               "fewer labels or templates")
        info = await self.model_info()
        pixels = await self._pixels(images, info)
        classifier, features = await asyncio.gather(self._classifier(info, labels, templates),
                                                    self._features(info, "image", pixels))
        probs = probabilities(info, features @ classifier)
        top_k = min(body.top_k, len(labels))
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:top_k]
            results.append([{"label": labels[j], "score": float(row[j])} for j in order])
        return {"model": _model_ref(info), "results": results}

    @api.post("/v1/embed/image", openapi_extra=_openapi_body(EmbedImageRequest))
    async def embed_image(self, request: Request) -> dict:
        body = await self._body(request, EmbedImageRequest)
        info = await self.model_info()
        features = await self._features(info, "image", await self._pixels(body.images, info))
        return {"model": _model_ref(info), "embeddings": [encode_vector(f, body.encoding) for f in features]}

    @api.post("/v1/embed/text", openapi_extra=_openapi_body(EmbedTextRequest))
    async def embed_text(self, request: Request) -> dict:
        body = await self._body(request, EmbedTextRequest)
        limits = self.config.limits
        texts = check_texts(body.texts, "texts", limits.max_texts, limits)
        info = await self.model_info()
        features = await self._features(info, "text", texts)
        return {"model": _model_ref(info), "embeddings": [encode_vector(f, body.encoding) for f in features]}

    @api.post("/v1/rank", openapi_extra=_openapi_body(RankRequest))
    async def rank(self, request: Request) -> dict:
        """One image against many texts, or one text against many images (clip-as-service's /rank, for one
        query a request)."""
        body = await self._body(request, RankRequest)
        limits = self.config.limits
        if body.image is not None and body.texts and body.text is None and body.images is None:
            texts = check_texts(body.texts, "texts", limits.max_texts, limits)
            info = await self.model_info()
            pixels = await self._pixels([body.image], info)
            query, candidates = await asyncio.gather(self._features(info, "image", pixels),
                                                     self._features(info, "text", texts))
            names = [{"text": t} for t in texts]
        elif body.text is not None and body.images and body.image is None and body.texts is None:
            check_texts([body.text], "texts", 1, limits)
            info = await self.model_info()
            pixels = await self._pixels(body.images, info)
            query, candidates = await asyncio.gather(self._features(info, "text", [body.text]),
                                                     self._features(info, "image", pixels))
            names = [{"image": i} for i in range(len(body.images))]
        else:
            raise RequestError(422, "invalid_request", "send either 'image' with 'texts', or 'text' with 'images'")
        cosine = (candidates @ query[0]).astype(np.float64)
        probs = probabilities(info, cosine)
        order = np.argsort(-cosine, kind="stable")
        return {"model": _model_ref(info),
                "results": [{**names[j], "score": float(probs[j]), "cosine": float(cosine[j])} for j in order]}

    @api.post("/v1/search", openapi_extra=_openapi_body(SearchRequest))
    async def search(self, request: Request) -> dict:
        """The index's rows nearest to a text, an image or an embedding (clip-retrieval's kNN service), by
        cosine."""
        body = await self._body(request, SearchRequest)
        if self.index is None:
            raise RequestError(404, "no_index", "this server has no index to search: serve one with `index` (the "
                               "output of `rayclip embed`, made with the served model)")
        if sum(query is not None for query in (body.text, body.image, body.embedding)) != 1:
            raise RequestError(422, "invalid_request", "send one of 'text', 'image' or 'embedding'")
        limits = self.config.limits
        if body.k > limits.max_search_results:
            raise RequestError(422, "too_many", f"k={body.k}: at most {limits.max_search_results} results")
        if self._index_info is None:
            (self._index_info,) = await self._towers(lambda: [self.index.info.remote()])
        index, info = self._index_info, await self.model_info()
        mismatch = index_mismatch(index, info)
        if mismatch:
            raise RequestError(409, "index_model_mismatch", f"{mismatch}: its embeddings are not comparable; embed "
                               "the data again with the live model (`rayclip embed`) and serve that index")
        if body.against not in index["embeddings"]:
            raise RequestError(422, "no_text_embeddings", "the index holds no caption embeddings (made with "
                               "`rayclip embed --no-text`): search against 'image'")
        if body.embedding is not None:
            query = decode_vector(body.embedding, info["embed_dim"])[None]
        elif body.text is not None:
            query = await self._features(info, "text", check_texts([body.text], "texts", 1, limits))
        else:
            query = await self._features(info, "image", await self._pixels([body.image], info))
        (found,) = await self._towers(lambda: [self.index.search.remote((query[0], body.against, body.k))])
        return {"model": _model_ref(info), "index": {"uri": index["uri"], "rows": index["rows"]}, "results": found}

    @api.get("/v1/model")
    async def model(self, request: Request) -> dict:
        """Name, version, alias, metrics and lineage of the live model, and the limits on a request."""
        self.authorize(request)
        return {**await self.model_info(), "limits": self.config.limits.model_dump()}

    @api.get("/", include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """A small page to try the model: drop an image, type labels, see the bars."""
        # an int, so nothing but digits lands in the page; it refuses larger files before reading them
        page = PLAYGROUND.replace("{{MAX_IMAGE_BYTES}}", str(int(self.config.limits.max_image_bytes)))
        return HTMLResponse(page, headers={"Content-Security-Policy": PLAYGROUND_CSP})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self, request: Request) -> dict:
        """Ready once the live model can be named; which model it is, only to a caller with the token (a
        probe needs none)."""
        info = await self.model_info()
        try:
            self.authorize(request)
        except RequestError:
            return {"status": "ready"}
        return {"status": "ready", "model": {"name": info["name"], "version": info["version"]}}

    @api.get("/metrics")
    async def prometheus_metrics(self) -> PlainTextResponse:
        """This ingress replica's request, latency, batch-size and cache metrics (Prometheus text)."""
        return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -------------------------------------------------------------------------- helpers

    def authorize(self, request: Request) -> None:
        authorize(request.headers, self._token_digest)

    async def _body(self, request: Request, schema: type[BaseModel]):
        _, raw = await self._read(request, ("application/json",))
        return _validate(schema, raw)

    async def _read(self, request: Request, media_types: tuple[str, ...]) -> tuple[str, bytes]:
        """(media type, body) of an authorized request, read up to the body limit."""
        self.authorize(request)
        limit = self.config.limits.max_body_bytes
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in media_types:
            raise RequestError(415, "unsupported_media_type", f"send the request body as {' or '.join(media_types)}")
        return media_type, await read_body(request, limit, self.config.limits.body_timeout_s)

    async def _form(self, request: Request, raw: bytes) -> tuple[list[bytes], ClassifyForm]:
        """A multipart /v1/classify body: (image files, the other fields)."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def body():
            yield raw

        limits = self.config.limits
        try:
            form = await MultiPartParser(request.headers, body(), max_files=limits.max_images,
                                         max_fields=limits.max_labels + limits.max_templates + 1,
                                         max_part_size=4 * limits.max_text_chars + 64).parse()
        except MultiPartException as exc:
            if exc.message.startswith("Too many files"):
                raise RequestError(422, "too_many", f"at most {limits.max_images} images per request") from None
            if exc.message.startswith("Too many fields"):  # as a JSON body with too many labels is answered
                raise RequestError(422, "too_many", f"at most {limits.max_labels} labels and {limits.max_templates} "
                                   "templates per request") from None
            raise RequestError(400, "invalid_multipart", f"the multipart body could not be read: {exc.message}") \
                from None
        unknown = sorted(set(form.keys()) - {"images", "labels", "templates", "top_k"})
        if unknown:
            raise RequestError(422, "invalid_request", f"unknown form fields {unknown}: send images (files), labels, "
                               "templates, top_k")
        files = form.getlist("images")
        if not files or not all(isinstance(f, UploadFile) for f in files):
            raise RequestError(422, "invalid_request", "images: send one or more image files under 'images'")
        fields = {"labels": form.getlist("labels"), "templates": form.getlist("templates") or None,
                  "top_k": form.get("top_k", 5)}
        if any(not isinstance(v, str) for v in [*fields["labels"], *(fields["templates"] or [])]):
            raise RequestError(422, "invalid_request", "labels and templates are text fields, not files")
        try:
            params = ClassifyForm.model_validate(fields)
        except ValidationError as exc:
            raise RequestError(422, "invalid_request", _describe(exc.errors())) from None
        return [await f.read() for f in files], params

    async def model_info(self) -> dict:
        """The live version's info (image size, logit scale, name, metrics, lineage); a request reads it
        once and uses that version for all its tower calls."""
        live = self._live
        info = self._infos.get(live["model"])
        if info is None:
            (reported,) = await self._towers(lambda: [self._tower("image", live["model"]).model_info.remote()])
            info = self._infos[live["model"]] = {**reported, "alias": live["alias"]}
            while len(self._infos) > 2:  # the live version and the one before it
                self._infos.pop(next(iter(self._infos)))
        return info

    def _tower(self, tower: str, uri: str):
        handle = self.image_tower if tower == "image" else self.text_tower
        return handle.options(multiplexed_model_id=uri)

    async def _pixels(self, images: list[str | bytes], info: dict) -> list[np.ndarray]:
        limits = self.config.limits
        if len(images) > limits.max_images:
            raise RequestError(422, "too_many", f"{len(images)} images: at most {limits.max_images} per request")
        encoded = [await self._image_bytes(data, i) for i, data in enumerate(images)]

        def prepare() -> list[np.ndarray]:
            check_request_pixels(encoded, limits)
            return [prepare_image(data, i, info["image_size"], limits) for i, data in enumerate(encoded)]

        return await asyncio.get_running_loop().run_in_executor(self._decoder, prepare)

    async def _image_bytes(self, data: str | bytes, index: int) -> bytes:
        """An image's encoded bytes: uploaded, base64, or read from an allow-listed S3 bucket."""
        limits = self.config.limits
        if isinstance(data, bytes):
            if len(data) > limits.max_image_bytes:
                raise RequestError(413, "image_too_large", f"images[{index}] is over {limits.max_image_bytes} bytes")
            return data
        if data.startswith(("http://", "https://")):
            raise RequestError(422, "urls_not_allowed", f"images[{index}]: this server does not fetch URLs; send "
                               "the image bytes (base64, or a multipart upload)")
        if data.startswith("s3://"):
            return await asyncio.to_thread(self._s3_image, data, index)
        return decode_base64(data, index, limits)

    def _s3_image(self, uri: str, index: int) -> bytes:
        from workflows import storage

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not key or any(part in ("", ".", "..") for part in key.split("/")):  # `..` would leave the bucket
            raise RequestError(422, "invalid_image_source", f"images[{index}]: {uri!r} is not s3://BUCKET/KEY with "
                               "a key of non-empty parts, none of them '.' or '..'")
        if bucket not in self.config.image_buckets:
            raise RequestError(403, "image_source_not_allowed", f"images[{index}]: bucket {bucket!r} is not one this "
                               "server reads from (its image_buckets); send the image bytes instead")
        try:
            return storage.read_bytes(uri, max_bytes=self.config.limits.max_image_bytes)
        except FileNotFoundError:
            raise RequestError(422, "image_not_found", f"images[{index}]: no object at {uri}") from None
        except storage.TooLarge:
            raise RequestError(413, "image_too_large", f"images[{index}]: {uri} is over "
                               f"{self.config.limits.max_image_bytes} bytes") from None
        except OSError as exc:
            raise RequestError(502, "image_source_unavailable", f"images[{index}]: could not read {uri}: {exc}") \
                from None

    async def _towers(self, make_calls):
        return await call_towers(make_calls, self.config.retry_after_s)

    async def _features(self, info: dict, tower: str, items: list) -> np.ndarray:
        """One tower call per item (the tower batches them across requests), all on `info`'s version."""
        handle = self._tower(tower, info["uri"])
        results = await self._towers(lambda: [handle.encode.remote(item) for item in items])
        for _, batch in results:
            self.metrics.batch_sizes.labels(tower).observe(batch)
        return np.stack([features for features, _ in results])

    async def _classifier(self, info: dict, labels: list[str], templates: list[str]) -> np.ndarray:
        key = hashlib.sha256(json.dumps([info["uri"], labels, templates]).encode()).hexdigest()

        async def build() -> np.ndarray:
            handle = self._tower("text", info["uri"])
            (weights,) = await self._towers(lambda: [handle.classifier.remote(labels, templates)])
            return weights

        weights, built = await self._classifiers.get(key, build)
        self.metrics.classifier_cache.labels("miss" if built else "hit").inc()
        return weights


# ------------------------------------------------------------------------------ the application


TOWERS = ("ImageTower", "TextTower")
INDEX = "Index"
INGRESS = "Ingress"


def build_app(config: ServeConfig, live: dict | None = None):
    """The Serve application graph for `config` (what `serve deploy` builds through `app_builder`);
    every deployment starts on `live` (default: `config.model` resolved now)."""
    live = live or live_model(config.model, config.mlflow_tracking_uri)
    values = config.stored().model_dump()
    # here too, not only in the app spec `rayclip deploy` applies: `serve deploy FILE` takes its args alone
    logging = {"logging_config": {"enable_access_log": config.access_log, "log_level": config.log_level}}
    tower_options = dict(
        **logging, ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=max(config.max_ongoing_requests, config.max_batch_size),
        max_queued_requests=config.max_queued_requests, user_config=live,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
        autoscaling_config=_autoscaling_config(config.autoscaling))
    image = serve.deployment(ImageTower, name=TOWERS[0], **tower_options).bind(values)
    text = serve.deployment(TextTower, name=TOWERS[1], **tower_options).bind(values)
    index = None
    if config.index:
        from workflows.embed import read_embeddings_manifest

        index_options = {**{key: value for key, value in tower_options.items() if key != "user_config"},
                         "ray_actor_options": {"num_cpus": config.num_cpus,  # numpy: no GPU share
                                               "memory": index_memory(read_embeddings_manifest(config.index))}}
        index = serve.deployment(Index, name=INDEX, **index_options).bind(values)
    sizing = ({"autoscaling_config": _autoscaling_config(config.ingress_autoscaling)} if config.ingress_autoscaling
              else {"num_replicas": config.ingress_replicas})
    ingress = serve.deployment(Ingress, name=INGRESS, **sizing, **logging,
                               ray_actor_options={"num_cpus": config.ingress_num_cpus},
                               user_config=live,
                               max_ongoing_requests=max(256, config.max_ongoing_requests * 4),
                               max_queued_requests=config.ingress_max_queued_requests,
                               backpressure_config=BackpressureConfig(status_code=503,
                                                                      retry_after_s=config.retry_after_s))
    return ingress.bind(image, text, values, index)


def _autoscaling_config(scaling: Autoscaling) -> dict:
    return {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests, "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s, "initial_replicas": max(1, scaling.min_replicas)}


IMPORT_PATH = f"{__name__}:app_builder"


def app_builder(args: dict):
    """`serve deploy deploy/serve_config.yaml` entry point (`import_path: deploy.serve:app_builder`):
    the application's `args` are ServeConfig fields."""
    if args.get("auth_token"):  # Serve keeps args as given, and shows them on its dashboard
        raise ValueError("auth_token in a serve deploy config would be kept and shown by Serve as written: give "
                         "auth_token_sha256 (the token's SHA-256 hex digest) or auth_token_file (a mounted secret) "
                         "instead, or deploy with `rayclip deploy`, which keeps only the digest")
    return build_app(ServeConfig(**args))
