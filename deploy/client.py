"""A Python client of the Serve app's API (deploy/serve.py), as clip-as-service's `Client`: lists of any
length split into requests within the server's limits and sent a few at a time, images given as paths,
bytes or PIL images, embeddings back as numpy arrays, and an error answer raised as a ClientError that
carries its type and message.

    from deploy.client import Client
    clip = Client("http://127.0.0.1:8000", token=os.environ.get("RAYCLIP_SERVE_TOKEN"))
    texts = clip.embed_texts(["a dog", "a cat"])             # float32 [2, embed_dim], unit rows
    images = clip.embed_images(["dog.jpg", open("cat.png", "rb").read()])
    clip.classify(["dog.jpg"], ["dog", "cat"])              # per image, the labels ranked with scores
    clip.search(text="a red bicycle", k=5)                  # the served index's nearest rows
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

Image = Any  # a path, the file's bytes, a PIL image, or s3://BUCKET/KEY in a bucket the server allows


class ClientError(Exception):
    """An answer other than 200: `status`, and the server's error `type` and `message`."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


class Client:
    """The app at `url` (with its route prefix), `token` its bearer token (None: an app without auth).
    `concurrency` requests at once carry a long list's chunks."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0, concurrency: int = 4):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.concurrency = concurrency
        self._model: dict | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def model(self) -> dict:
        """The live model (name, version, metrics, lineage) and the server's request limits."""
        self._model = self._call("GET", "/v1/model")
        return self._model

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), embed_dim], L2-normalized."""
        return self._embed("/v1/embed/text", "texts", list(texts))

    def embed_images(self, images: Sequence[Image]) -> np.ndarray:
        """float32 [len(images), embed_dim], L2-normalized."""
        return self._embed("/v1/embed/image", "images", [_encode(image) for image in images])

    def classify(self, images: Sequence[Image], labels: Sequence[str], templates: Sequence[str] | None = None,
                 top_k: int = 5) -> list[list[dict]]:
        """Per image, its top_k labels as {"label", "score"}, best first."""
        options = {"labels": list(labels), "top_k": top_k, **({"templates": list(templates)} if templates else {})}
        answers = self._chunked(self._split([_encode(image) for image in images], "images", options),
                                lambda chunk: self._call("POST", "/v1/classify", {"images": chunk, **options}))
        return [result for answer in answers for result in answer["results"]]

    def rank(self, *, image: Image | None = None, texts: Sequence[str] | None = None, text: str | None = None,
             images: Sequence[Image] | None = None) -> list[dict]:
        """An image against texts, or a text against images: the candidates best first, with scores."""
        body = {"image": _encode(image) if image is not None else None, "texts": list(texts) if texts else None,
                "text": text, "images": [_encode(i) for i in images] if images else None}
        return self._call("POST", "/v1/rank", {k: v for k, v in body.items() if v is not None})["results"]

    def search(self, *, text: str | None = None, image: Image | None = None, embedding: Sequence[float] | None = None,
               k: int = 10, against: str = "image") -> list[dict]:
        """The served index's k rows nearest to a text, an image or an embedding (of the live model)."""
        body = {"text": text, "image": _encode(image) if image is not None else None,
                "embedding": [float(x) for x in embedding] if embedding is not None else None}
        return self._call("POST", "/v1/search", {**{key: v for key, v in body.items() if v is not None},
                                                  "k": k, "against": against})["results"]

    def _embed(self, route: str, field: str, items: list) -> np.ndarray:
        options = {"encoding": "base64-float16"}
        answers = self._chunked(self._split(items, field, options),
                                lambda chunk: self._call("POST", route, {field: chunk, **options}))
        vectors = [np.frombuffer(base64.b64decode(e), dtype="<f2") for a in answers for e in a["embeddings"]]
        if not vectors:
            return np.zeros((0, (self._model or self.model())["embed_dim"]), np.float32)
        return np.stack(vectors).astype(np.float32)

    def _split(self, items: list[str], field: str, options: dict) -> list[list[str]]:
        """`items` (base64 images or texts, under `field`) in requests within the server's limits a request:
        their number, the body's bytes with the rest of the request (`options`: a classification's labels
        and templates go with every chunk), and the images' pixels (a file's read from its header; an
        s3:// image counts by number only)."""
        limits = (self._model or self.model())["limits"]
        room = limits["max_body_bytes"] - len(_json({**options, field: []}))
        most, images = limits["max_images" if field == "images" else "max_texts"], field == "images"
        chunks, chunk, size, pixels = [], [], 0, 0
        for item in items:
            cost, area = len(_json(item)) + 1, _pixels(item) if images else 0  # +1: the comma before it
            if chunk and (len(chunk) == most or size + cost > room or pixels + area > limits["max_request_pixels"]):
                chunks.append(chunk)
                chunk, size, pixels = [], 0, 0
            chunk, size, pixels = [*chunk, item], size + cost, pixels + area
        return [*chunks, chunk] if chunk else chunks

    def _chunked(self, chunks: list[list], send: Callable[[list], dict]) -> list[dict]:
        if len(chunks) <= 1:
            return [send(chunk) for chunk in chunks]
        with ThreadPoolExecutor(self.concurrency) as pool:  # answers in the chunks' order
            return list(pool.map(send, chunks))

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        # encoded here, as _split measures it (httpx's own encoding has changed between its versions)
        response = self._http.request(method, route, content=None if body is None else _json(body),
                                      headers=None if body is None else {"Content-Type": "application/json"})
        if response.status_code != 200:
            try:
                error = response.json()["error"]
                kind, message = error["type"], error["message"]
            except (ValueError, KeyError, TypeError):  # not the app's JSON (a proxy's page, Serve's 503)
                kind, message = "http_error", response.text[:500]
            raise ClientError(response.status_code, kind, message)
        return response.json()


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _pixels(encoded: str) -> int:
    """An image's width x height from its header (0 where it is an s3:// URI or Pillow cannot tell: the
    server judges it)."""
    if encoded.startswith("s3://"):
        return 0
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(base64.b64decode(encoded))) as opened:  # reads the header only
            return opened.width * opened.height
    except Exception:  # noqa: BLE001 - not an image the client can read: the server says why
        return 0


def _encode(image: Image) -> str:
    """An image as the API takes it: base64 of its file's bytes (a PIL image is sent as PNG), or its s3:// URI."""
    if isinstance(image, str) and image.startswith("s3://"):
        return image  # read by the server, from a bucket its image_buckets allows
    if isinstance(image, bytes):
        data = image
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            data = f.read()
    elif hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(f"an image is a path, bytes or a PIL image, not a {type(image).__name__}")
    return base64.b64encode(data).decode()
