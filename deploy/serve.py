"""Serve stage: zero-shot CLIP endpoints on Ray Serve.

    HTTP ──▶ Ingress (FastAPI: auth, limits, image decoding, classifier cache, ranking)
               ├──▶ ImageTower  (@serve.batch: uint8 crops → normalized image embeddings)
               └──▶ TextTower   (@serve.batch: texts → normalized text embeddings; classifiers)

The ingress does all CPU work on the request (base64, decoding, resizing), so the tower
replicas only run tensors, in dynamic batches gathered across requests. Each tower loads the
model named by `model` (models:/NAME@ALIAS, models:/NAME/N, or a checkpoint directory).
Classifiers for a (labels, templates) set are kept in an LRU cache keyed by the model version.
"""

# no `from __future__ import annotations`: FastAPI must see real types through Serve's class-based views

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

APP_NAME = "rayclip"
serve_batch = serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # sizes set from the config per replica
TOKEN_ENV = "RAYCLIP_SERVE_TOKEN"


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(32 * 2**20, gt=0)
    max_image_bytes: int = Field(10 * 2**20, gt=0, description="one decoded-from-base64 image")
    max_image_pixels: int = Field(40_000_000, gt=0, description="width x height; above is a decompression bomb")
    max_images: int = Field(32, gt=0, description="images per request")
    max_texts: int = Field(256, gt=0, description="texts per request")
    max_labels: int = Field(1000, gt=0)
    max_templates: int = Field(100, gt=0)
    max_text_chars: int = Field(1000, gt=0)


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(60, ge=0)


class ServeConfig(BaseModel):
    """Everything the Serve app needs; `rayclip serve` flags and deploy/serve_config.yaml map onto it."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("models:/clip@champion", description="models:/NAME@ALIAS, models:/NAME/N or a checkpoint dir")
    mlflow_tracking_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, lt=65536)
    max_batch_size: int = Field(32, gt=0)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    autoscaling: Autoscaling = Autoscaling()
    num_cpus: float = Field(0.5, ge=0, description="per tower replica")
    num_gpus: float = Field(0, ge=0, description="per tower replica (a fraction shares a GPU)")
    ingress_replicas: int = Field(1, gt=0)
    max_ongoing_requests: int = Field(64, gt=0, description="per tower replica; at least max_batch_size")
    max_queued_requests: int = Field(256, ge=-1, description="per tower caller; beyond, 503 + Retry-After "
                                     "(-1: unbounded)")
    ingress_max_queued_requests: int = Field(1024, ge=-1, description="requests the HTTP proxy queues for the "
                                             "ingress; beyond, a plain-text 503 + Retry-After from Serve")
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After an overloaded server answers with")
    classifier_cache_size: int = Field(256, ge=0)
    limits: Limits = Limits()
    auth_token: str | None = Field(None, description=f"bearer token; default: ${TOKEN_ENV} when set")

    def token(self) -> str | None:
        return self.auth_token or os.environ.get(TOKEN_ENV) or None


# ------------------------------------------------------------------------------ request bodies


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1, description="base64-encoded images")
    labels: list[str] = Field(min_length=1)
    templates: list[str] | None = None
    top_k: int = Field(5, gt=0)


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


class RequestError(Exception):
    """A request that cannot be answered: becomes `{"error": {"type", "message"}}` with `status`."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


# ------------------------------------------------------------------------------ the model towers


def load_served_model(uri: str, tracking_uri: str | None):
    """(model, info): the CLIP model and what /v1/model reports about it."""
    import clip_core
    from workflows import registry

    with tempfile.TemporaryDirectory(prefix="rayclip-serve-") as scratch:
        source = registry.fetch_checkpoint(uri, scratch, tracking_uri=tracking_uri)
        model = clip_core.load_model(source.directory)
    info = {"uri": uri, "name": source.name or os.path.basename(os.path.normpath(uri)),
            "version": source.version, "alias": registry.parse_model_uri(uri)[1] if source.name else None,
            "metrics": {}, "lineage": {}}
    if source.name:
        version = registry.get_version(source.name, version=source.version, tracking_uri=tracking_uri)
        tags = version.tags or {}
        info["metrics"] = registry.version_metrics(version)
        info["lineage"] = {key: tags[key] for key in ("dataset_digests", "train_run_id", "git_commit", "config_hash")
                           if key in tags}
        info["run_id"] = version.run_id
    info["image_size"] = model.image_size
    info["embed_dim"] = model.config.embed_dim
    info["logit_scale"] = float(model.logit_scale.detach().exp().clamp(max=100))
    return model.eval(), info


class _Tower:
    """A replica holding one model (the version named by `model`, resolved when the replica starts)."""

    def __init__(self, config: dict):
        import torch

        self.config = ServeConfig(**config)
        self.device = "cuda" if self.config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model, self.info = load_served_model(self.config.model, self.config.mlflow_tracking_uri)
        self.model = self.model.to(self.device)
        self.encode.set_max_batch_size(self.config.max_batch_size)
        self.encode.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    def model_info(self) -> dict:
        return self.info

    def _autocast(self):
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda")


class ImageTower(_Tower):
    @serve_batch
    async def encode(self, images: list[np.ndarray]) -> list[tuple[str | None, np.ndarray, int]]:
        """uint8 centre crops [S, S, 3] → (model version, normalized embedding, batch size) each."""
        import torch

        from clip_core.transforms import normalize

        pixels = torch.from_numpy(np.stack(images)).to(self.device)
        with torch.inference_mode(), self._autocast():
            features = self.model.encode_image(normalize(pixels), normalize=True).float().cpu().numpy()
        return [(self.info["version"], row, len(images)) for row in features]


class TextTower(_Tower):
    def __init__(self, config: dict):
        super().__init__(config)
        import clip_core

        self.tokenize = clip_core.get_tokenizer(self.model.config.text.context_length)

    @serve_batch
    async def encode(self, texts: list[str]) -> list[tuple[str | None, np.ndarray, int]]:
        import torch

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_text(self.tokenize(texts).to(self.device), normalize=True).float().cpu().numpy()
        return [(self.info["version"], row, len(texts)) for row in features]

    def classifier(self, labels: list[str], templates: list[str]) -> tuple[str | None, np.ndarray]:
        import torch

        import clip_core

        with torch.inference_mode(), self._autocast():
            weights = clip_core.zero_shot_classifier(self.model, self.tokenize, labels, templates)
        return self.info["version"], weights.float().cpu().numpy()


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


def prepare_image(data: bytes, index: int, image_size: int, limits: Limits) -> np.ndarray:
    """Encoded bytes → the uint8 [S, S, 3] centre crop the towers take."""
    import clip_core

    try:
        image = clip_core.open_image(data, max_pixels=limits.max_image_pixels)
    except clip_core.ImageError as exc:
        if exc.reason == "too_large":
            raise RequestError(413, "image_too_large", f"images[{index}]: {exc}") from None
        if "could not be decoded" in str(exc):  # Pillow does not recognise the format at all
            raise RequestError(415, "unsupported_image_format", f"images[{index}] is not an image format this "
                               "server reads (JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
        raise RequestError(400, "invalid_image", f"images[{index}]: {exc}") from None
    return np.asarray(clip_core.image_transform(image_size).crop(image), dtype=np.uint8)


def check_texts(texts: list[str], what: str, limit: int, limits: Limits) -> list[str]:
    if len(texts) > limit:
        raise RequestError(422, "too_many", f"{len(texts)} {what}: at most {limit} per request")
    for i, text in enumerate(texts):
        if not text.strip():
            raise RequestError(422, f"empty_{what.rstrip('s')}", f"{what}[{i}] is empty")
        if len(text) > limits.max_text_chars:
            raise RequestError(422, "text_too_long", f"{what}[{i}] is over {limits.max_text_chars} characters")
    return texts


def encode_vector(vector: np.ndarray, encoding: str):
    if encoding == "base64-float16":
        return base64.b64encode(vector.astype("<f2").tobytes()).decode()
    return [float(x) for x in vector.astype(np.float32)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


api = FastAPI(title="rayclip", description="Zero-shot CLIP: classify, embed and rank images and texts.",
              version="1")
PLAYGROUND = (Path(__file__).parent / "web" / "index.html").read_text(encoding="utf-8")
# the page is self-contained: no CDN, no third-party requests
PLAYGROUND_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
                  "connect-src 'self'")
_ROUTES = {"/v1/classify", "/v1/embed/image", "/v1/embed/text", "/v1/rank", "/v1/model", "/healthz", "/readyz",
           "/metrics", "/", "/docs", "/openapi.json"}


class Metrics:
    """Prometheus metrics of one ingress replica (Ray Serve's own are on Ray's metrics port)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("rayclip_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("rayclip_request_seconds", "HTTP request latency by route", ["route"],
                                 registry=self.registry)
        self.batch_sizes = Histogram("rayclip_batch_size", "dynamic batch sizes the towers ran", ["tower"],
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


@api.middleware("http")
async def _count_requests(request: Request, call_next):
    started = time.perf_counter()
    try:
        response = await call_next(request)
    except Exception:  # noqa: BLE001 - a bug must still answer JSON, and be counted
        import logging

        logging.getLogger(__name__).exception("unhandled error on %s", request.url.path)
        response = _error(500, "internal_error", "the server failed on this request; it has been logged")
    path = request.url.path if request.url.path in _ROUTES else "other"  # bounded label values
    metrics = serve.get_replica_context().servable_object.metrics
    metrics.requests.labels(path, str(response.status_code)).inc()
    metrics.latency.labels(path).observe(time.perf_counter() - started)
    return response


def _describe(errors) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                     for e in list(errors)[:5])


def _same(given: str, expected: str) -> bool:
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())


# Everything the class uses must be defined above it: serve.ingress pickles it as it decorates.
@serve.ingress(api)  # at import, so every process that imports this module binds the routes to the class
class Ingress:
    """Auth, limits, decoding and the zero-shot arithmetic; the towers do the model work."""

    def __init__(self, image_tower, text_tower, config: dict):
        import clip_core

        self.config = ServeConfig(**config)
        self.image_tower, self.text_tower = image_tower, text_tower
        self.default_templates = list(clip_core.DEFAULT_TEMPLATES)
        self._classifiers: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._info: dict | None = None
        self.metrics = Metrics()

    # -------------------------------------------------------------------------- routes

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> dict:
        """Zero-shot classification: per image, the labels ranked by probability."""
        body = await self._body(request, ClassifyRequest)
        limits = self.config.limits
        labels = check_texts(body.labels, "labels", limits.max_labels, limits)
        templates = body.templates or self.default_templates
        check_texts(templates, "templates", limits.max_templates, limits)
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise RequestError(422, "invalid_template", f"each template needs exactly one '{{}}': {bad[:3]}")
        pixels = await self._pixels(body.images)
        classifier = await self._classifier(labels, templates)
        _, features = await self._features("image", pixels)
        probs = softmax(self._info["logit_scale"] * features @ classifier)
        top_k = min(body.top_k, len(labels))
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:top_k]
            results.append([{"label": labels[j], "score": float(row[j])} for j in order])
        return {"model": self._model_ref(), "results": results}

    @api.post("/v1/embed/image")
    async def embed_image(self, request: Request) -> dict:
        body = await self._body(request, EmbedImageRequest)
        _, features = await self._features("image", await self._pixels(body.images))
        return {"model": self._model_ref(), "embeddings": [encode_vector(f, body.encoding) for f in features]}

    @api.post("/v1/embed/text")
    async def embed_text(self, request: Request) -> dict:
        body = await self._body(request, EmbedTextRequest)
        limits = self.config.limits
        texts = check_texts(body.texts, "texts", limits.max_texts, limits)
        await self.model_info()
        _, features = await self._features("text", texts)
        return {"model": self._model_ref(), "embeddings": [encode_vector(f, body.encoding) for f in features]}

    @api.post("/v1/rank")
    async def rank(self, request: Request) -> dict:
        """One image against many texts, or one text against many images (clip-as-service's /rank)."""
        body = await self._body(request, RankRequest)
        limits = self.config.limits
        if body.image is not None and body.texts and body.text is None and body.images is None:
            texts = check_texts(body.texts, "texts", limits.max_texts, limits)
            pixels = await self._pixels([body.image])
            (_, query), (_, candidates) = await asyncio.gather(self._features("image", pixels), self._features("text", texts))
            names = [{"text": t} for t in texts]
        elif body.text is not None and body.images and body.image is None and body.texts is None:
            check_texts([body.text], "texts", 1, limits)
            pixels = await self._pixels(body.images)
            (_, query), (_, candidates) = await asyncio.gather(self._features("text", [body.text]),
                                                               self._features("image", pixels))
            names = [{"image": i} for i in range(len(body.images))]
        else:
            raise RequestError(422, "invalid_request", "send either 'image' with 'texts', or 'text' with 'images'")
        cosine = (candidates @ query[0]).astype(np.float64)
        probs = softmax(self._info["logit_scale"] * cosine)
        order = np.argsort(-cosine, kind="stable")
        return {"model": self._model_ref(),
                "results": [{**names[j], "score": float(probs[j]), "cosine": float(cosine[j])} for j in order]}

    @api.get("/v1/model")
    async def model(self, request: Request) -> dict:
        """Name, version, alias, metrics and lineage of the live model."""
        self.authorize(request)
        return await self.model_info()

    @api.get("/", include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """A small page to try the model: drop an image, type labels, see the bars."""
        return HTMLResponse(PLAYGROUND, headers={"Content-Security-Policy": PLAYGROUND_CSP})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict:
        info = await self.model_info()
        return {"status": "ready", "model": {"name": info["name"], "version": info["version"]}}

    @api.get("/metrics")
    async def prometheus_metrics(self) -> PlainTextResponse:
        """This ingress replica's request, latency, batch-size and cache metrics (Prometheus text)."""
        return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -------------------------------------------------------------------------- helpers

    def authorize(self, request: Request) -> None:
        token = self.config.token()
        if token is None:
            return
        header = request.headers.get("authorization", "")
        if not (header.startswith("Bearer ") and _same(header.removeprefix("Bearer ").strip(), token)):
            raise RequestError(401, "unauthorized", f"send 'Authorization: Bearer <token>' (the server's {TOKEN_ENV})")

    async def _body(self, request: Request, schema: type[BaseModel]):
        self.authorize(request)
        limit = self.config.limits.max_body_bytes
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise RequestError(415, "unsupported_media_type", "send the request body as application/json")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "body_too_large", f"the body is over the {limit}-byte limit")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestError(413, "body_too_large", f"the body is over the {limit}-byte limit")
        try:
            json.loads(raw)
        except ValueError as exc:
            raise RequestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        try:
            return schema.model_validate_json(bytes(raw))
        except ValidationError as exc:
            raise RequestError(422, "invalid_request", _describe(exc.errors())) from None

    async def model_info(self) -> dict:
        if self._info is None:
            (self._info,) = await self._towers(lambda: [self.image_tower.model_info.remote()])
        return self._info

    def _model_ref(self) -> dict:
        return {"name": self._info["name"], "version": self._info["version"]}

    async def _pixels(self, images: list[str]) -> list[np.ndarray]:
        limits = self.config.limits
        if len(images) > limits.max_images:
            raise RequestError(422, "too_many", f"{len(images)} images: at most {limits.max_images} per request")
        size = (await self.model_info())["image_size"]
        return [prepare_image(decode_base64(data, i, limits), i, size, limits) for i, data in enumerate(images)]

    async def _towers(self, make_calls):
        """Make and await tower calls; a full tower queue (raised by the call or by its result) becomes
        503 + Retry-After instead of a wait."""
        try:
            return await asyncio.gather(*make_calls())
        except BackPressureError:
            retry = self.config.retry_after_s
            raise RequestError(503, "overloaded", f"the model replicas are at capacity; retry in {retry:g} s",
                               {"Retry-After": str(max(1, round(retry)))}) from None

    async def _features(self, tower: str, items: list) -> tuple[list[str | None], np.ndarray]:
        """One tower call per item (the tower batches them across requests): (versions, embeddings)."""
        handle = self.image_tower if tower == "image" else self.text_tower
        results = await self._towers(lambda: [handle.encode.remote(item) for item in items])
        for _, _, batch in results:
            self.metrics.batch_sizes.labels(tower).observe(batch)
        return [r[0] for r in results], np.stack([r[1] for r in results])

    async def _classifier(self, labels: list[str], templates: list[str]) -> np.ndarray:
        info = await self.model_info()
        key = hashlib.sha256(json.dumps([info["uri"], info["version"], labels, templates]).encode()).hexdigest()
        if key in self._classifiers:
            self._classifiers.move_to_end(key)
            self.metrics.classifier_cache.labels("hit").inc()
            return self._classifiers[key]
        self.metrics.classifier_cache.labels("miss").inc()
        ((_, weights),) = await self._towers(lambda: [self.text_tower.classifier.remote(labels, templates)])
        if self.config.classifier_cache_size:
            self._classifiers[key] = weights
            while len(self._classifiers) > self.config.classifier_cache_size:
                self._classifiers.popitem(last=False)
        return weights


# ------------------------------------------------------------------------------ the application


def build_app(config: ServeConfig):
    """The Serve application graph for `config` (what `serve.run` and `serve deploy` take)."""
    values = config.model_dump()
    scaling = config.autoscaling
    tower_options = dict(
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=max(config.max_ongoing_requests, config.max_batch_size),
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
        autoscaling_config={"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                            "target_ongoing_requests": scaling.target_ongoing_requests,
                            "upscale_delay_s": scaling.upscale_delay_s,
                            "downscale_delay_s": scaling.downscale_delay_s,
                            "initial_replicas": max(1, scaling.min_replicas)})
    image = serve.deployment(ImageTower, **tower_options).bind(values)
    text = serve.deployment(TextTower, **tower_options).bind(values)
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=config.ingress_replicas,
                               ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max(256, config.max_ongoing_requests * 4),
                               max_queued_requests=config.ingress_max_queued_requests,
                               backpressure_config=BackpressureConfig(status_code=503,
                                                                      retry_after_s=config.retry_after_s))
    return ingress.bind(image, text, values)


def start(config: ServeConfig, *, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Start Serve on `config.host:port` (joining or starting Ray) and deploy the app; returns its URL."""
    from workflows.runtime import init_ray

    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{config.host}:{config.port}{route_prefix.rstrip('/')}"


def app_builder(args: dict):
    """`serve deploy deploy/serve_config.yaml` entry point (`import_path: deploy.serve:app_builder`):
    the application's `args` are ServeConfig fields."""
    return build_app(ServeConfig(**args))
