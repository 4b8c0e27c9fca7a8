"""The MLflow pyfunc a registered rayclip model loads as (models-from-code: MLflow copies this file
into the model; it imports only clip_core, which travels with the model as code).

    model = mlflow.pyfunc.load_model("models:/clip@champion")
    model.predict(pd.DataFrame({"image": [png_bytes]}), params={"labels": ["dog", "cat"]})
        → columns label, score (the best), labels, scores (top_k, best first)
    model.predict(pd.DataFrame({"text": ["a dog"]}))  → column embedding (normalized float32)

Rows hold an `image` (encoded bytes) or a `text`. With `labels` every row must be an image and is
classified zero-shot; without, each row is embedded (its image when it has one, else its text). Over
`mlflow models serve`'s REST API a request holds one kind of row: MLflow's JSON reader base64-decodes
every cell of the binary `image` column, empty ones too, and refuses a text row's.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch

import clip_core
from clip_core.transforms import DEFAULT_MAX_PIXELS

MAX_IMAGE_BYTES = 32 * 2**20
MAX_LABELS = 1000
CLASSIFIER_CACHE_SIZE = 64
DEFAULT_PARAMS = {"labels": [], "templates": list(clip_core.DEFAULT_TEMPLATES), "top_k": 5}


class CLIPPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model = clip_core.load_model(context.artifacts["checkpoint"]).eval()
        self.tokenize = clip_core.get_tokenizer(self.model.config.text.context_length)
        self.transform = clip_core.image_transform(self.model.image_size, max_pixels=DEFAULT_MAX_PIXELS)
        self._classifiers: dict[tuple, torch.Tensor] = {}

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        images = _column(model_input, "image")
        texts = _column(model_input, "text")
        if not len(model_input):
            raise ValueError("no rows: send one row per image or text")
        labels = [str(label) for label in params["labels"]]
        if int(params["top_k"]) < 1:
            raise ValueError(f"top_k={params['top_k']}: ask for at least 1 label per image")
        with torch.inference_mode():
            if labels:
                return self._classify(images, labels, list(params["templates"]), int(params["top_k"]))
            return self._embed(images, texts)

    def _classify(self, images: list, labels: list[str], templates: list[str], top_k: int) -> pd.DataFrame:
        if len(labels) > MAX_LABELS:
            raise ValueError(f"{len(labels)} labels: at most {MAX_LABELS} per call")
        missing = [i for i, image in enumerate(images) if image is None]
        if missing:
            raise ValueError(f"rows {missing[:5]} have no image: classification needs an 'image' on every row")
        key = (tuple(labels), tuple(templates))
        if key not in self._classifiers:
            if len(self._classifiers) >= CLASSIFIER_CACHE_SIZE:
                self._classifiers.pop(next(iter(self._classifiers)))  # the oldest
            self._classifiers[key] = clip_core.zero_shot_classifier(self.model, self.tokenize, labels, templates)
        probs, indices = clip_core.predict(self.model, self._pixels(images), self._classifiers[key], top_k=top_k)
        ranked = [[labels[j] for j in row] for row in indices.tolist()]
        scores = [[float(p) for p in row] for row in probs.tolist()]
        return pd.DataFrame({"label": [r[0] for r in ranked], "score": [s[0] for s in scores],
                             "labels": ranked, "scores": scores})

    def _embed(self, images: list, texts: list) -> pd.DataFrame:
        embeddings: list = [None] * len(images)
        image_rows = [i for i, image in enumerate(images) if image is not None]
        text_rows = [i for i, image in enumerate(images) if image is None and texts[i] is not None]
        empty = sorted(set(range(len(images))) - set(image_rows) - set(text_rows))
        if empty:
            raise ValueError(f"rows {empty[:5]} have neither an image nor a text")
        if image_rows:
            features = self.model.encode_image(self._pixels([images[i] for i in image_rows]), normalize=True)
            for i, row in zip(image_rows, features.float().numpy()):
                embeddings[i] = row.astype(np.float32)
        if text_rows:
            wrong = next((i for i in text_rows if not isinstance(texts[i], str)), None)
            if wrong is not None:  # MLflow makes {"text": ["a", "b"]} one row holding the list
                raise ValueError(f"row {wrong}: 'text' must be a string, got {type(texts[wrong]).__name__}: send "
                                 "one text per row (a DataFrame, or dataframe_records over REST)")
            features = self.model.encode_text(self.tokenize([texts[i] for i in text_rows]), normalize=True)
            for i, row in zip(text_rows, features.float().numpy()):
                embeddings[i] = row.astype(np.float32)
        return pd.DataFrame({"embedding": embeddings})

    def _pixels(self, images: list) -> torch.Tensor:
        tensors = []
        for i, data in enumerate(images):
            if not isinstance(data, (bytes, bytearray)):
                raise ValueError(f"row {i}: 'image' must be encoded image bytes (PNG, JPEG, WebP...), "
                                 f"got {type(data).__name__}")
            if len(data) > MAX_IMAGE_BYTES:
                raise ValueError(f"row {i}: image of {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte limit")
            try:
                tensors.append(self.transform(bytes(data)))
            except clip_core.ImageError as exc:
                raise ValueError(f"row {i}: {exc}") from exc
        return torch.stack(tensors)


def _column(frame: pd.DataFrame, name: str) -> list:
    if name not in frame.columns:
        return [None] * len(frame)
    return [None if value is None or (isinstance(value, float) and np.isnan(value)) else value
            for value in frame[name].tolist()]


mlflow.models.set_model(CLIPPyfunc())
