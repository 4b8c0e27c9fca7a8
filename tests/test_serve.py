"""The Serve app on a real local Ray Serve, loading a registered champion from a sqlite MLflow store."""

import asyncio
import collections
import base64
import hashlib
import io
import json
import time

import boto3
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import clip_core
from deploy import rollout
from deploy import serve as served
from workflows import registry
from workflows.embed import EmbedConfig, embed
from workflows.preprocess import PreprocessOptions, preprocess
from workflows.synthetic import samples

from micro import briefly_trained
from ports import free_port

pytestmark = pytest.mark.usefixtures("ray_session")
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, ray_session):
    """The app serving models:/clip-serve@champion, with auth on and small limits."""
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    clip_core.save_checkpoint(briefly_trained(), root / "ckpt")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    quiet = lambda *_: None  # noqa: E731
    registry.register(str(root / "ckpt"), "clip-serve", metrics={"zeroshot": {"top1": 0.5, "digest": "sha256:x"}},
                      tracking_uri=tracking, echo=quiet)
    registry.promote("clip-serve", tracking_uri=tracking, echo=quiet)
    preprocess("synthetic://heldout?count=48&seed=3&image_size=64", str(root / "data"),
               PreprocessOptions(image_size=64), echo=quiet)
    embed(EmbedConfig(model=str(root / "ckpt"), data=str(root / "data"), output=str(root / "index")), echo=quiet)
    port = free_port()
    bucket = "serve-images"  # the one bucket requests may name images in (moto's S3)
    boto3.client("s3").create_bucket(Bucket=bucket)
    boto3.client("s3").put_object(Bucket=bucket, Key="shapes/one.png", Body=base64.b64decode(_png(_images(1)[0])))
    config = served.ServeConfig(model="models:/clip-serve@champion", mlflow_tracking_uri=tracking, port=port,
                                max_batch_size=8, batch_wait_timeout_s=0.05, auth_token=TOKEN, image_buckets=[bucket],
                                index=str(root / "index"),
                                limits=served.Limits(max_images=4, max_texts=16, max_labels=20, max_search_results=20,
                                                     max_body_bytes=2**20, max_image_bytes=512 * 2**10,
                                                     max_image_pixels=1_000_000, max_request_pixels=2_500_000,
                                                     max_prompts=60))
    url = rollout.start(config)
    yield {"url": url, "model": clip_core.load_model(root / "ckpt"), "config": config, "root": root,
           "tracking": tracking, "bucket": bucket}
    serve.shutdown()


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _images(count: int, seed: int = 7) -> list[Image.Image]:
    return [s.image for s in samples(count, split="all", seed=seed, image_size=64)]


def _post(app, route: str, payload, headers=AUTH, **kwargs) -> httpx.Response:
    return httpx.post(app["url"] + route, json=payload, headers=headers, timeout=60, **kwargs)


def _image_features(model, images) -> torch.Tensor:
    transform = clip_core.image_transform(model.image_size)
    with torch.no_grad():
        return model.encode_image(torch.stack([transform(i) for i in images]), normalize=True)


def test_classify_ranks_labels_as_clip_core_does(app):
    images, labels = _images(3), ["red circle", "blue square", "green triangle", "yellow star"]
    response = _post(app, "/v1/classify", {"images": [_png(i) for i in images], "labels": labels, "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "clip-serve", "version": "1"}

    model = app["model"]
    classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), labels)
    probs, top = clip_core.predict(model, torch.stack([clip_core.image_transform(64)(i) for i in images]),
                                   classifier, top_k=3)
    for row, expected_probs, expected_top in zip(body["results"], probs.tolist(), top.tolist()):
        assert [r["label"] for r in row] == [labels[j] for j in expected_top]
        assert [r["score"] for r in row] == pytest.approx(expected_probs, abs=1e-4)


def test_a_checkpoint_served_from_a_path_is_a_version_by_its_weights(tmp_path):
    # a path names no version: weights written there again (a training rerun into the same --output) were
    # the same "version", so a reload did nothing, and a replica started later loaded them beside the old
    from micro import micro_config

    checkpoint = tmp_path / "final"
    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), checkpoint)
    first = served.live_model(str(checkpoint), None)
    digest = json.loads((checkpoint / "config.json").read_text())["weights_sha256"]
    assert first == {"model": f"{checkpoint}#weights_sha256={digest[:16]}", "alias": None}
    loaded = served.load_served_model(first["model"], None)
    assert loaded.info["name"] == "final" and loaded.info["weights_sha256"] == digest
    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), checkpoint)  # trained again, other weights
    second = served.live_model(str(checkpoint), None)
    assert second["model"] != first["model"]
    served.load_served_model(second["model"], None)
    with pytest.raises(clip_core.CheckpointError, match=rf"the checkpoint at {checkpoint} holds other weights .* "
                                                        rf"than were rolled out \({digest[:16]}\): it was written "
                                                        "again since; roll the app to them with `rayclip deploy"):
        served.load_served_model(first["model"], None)
    # weights of another format (OpenAI's .pt) record no digest: the path, as before
    assert served.live_model(str(tmp_path / "ViT-B-32.pt"), None) == {"model": str(tmp_path / "ViT-B-32.pt"),
                                                                       "alias": None}


def test_a_siglip_models_info_carries_its_bias_and_its_probabilities_are_each_labels_own_sigmoid(tmp_path):
    """The tower reports a SigLIP model's logit bias (load_served_model's info), and `probabilities`, which
    /v1/classify and /v1/rank score with, gives it sigmoids, as clip_core.predict does, not a softmax."""
    clip_core.save_checkpoint(clip_core.create_model("tiny", init_logit_bias=-10.0), tmp_path / "siglip")
    info = served.load_served_model(str(tmp_path / "siglip"), None).info
    assert info["logit_bias"] == -10.0
    cosine = np.array([[0.3, 0.1, -0.2]])
    scale = info["logit_scale"]
    np.testing.assert_allclose(served.probabilities(info, cosine), 1 / (1 + np.exp(-(scale * cosine - 10))),
                               rtol=1e-6)
    softmax = served.probabilities({**info, "logit_bias": None}, cosine)
    np.testing.assert_allclose(softmax, np.exp(scale * cosine) / np.exp(scale * cosine).sum(), rtol=1e-6)


def test_embeddings_and_rank_match_clip_core(app):
    model, images, texts = app["model"], _images(2, seed=9), ["a red circle", "a small blue square on grey"]
    expected_images = _image_features(model, images).numpy()
    with torch.no_grad():
        expected_texts = model.encode_text(clip_core.get_tokenizer()(texts), normalize=True).numpy()

    body = _post(app, "/v1/embed/image", {"images": [_png(i) for i in images]}).json()
    assert np.allclose(body["embeddings"], expected_images, atol=1e-4)
    body = _post(app, "/v1/embed/text", {"texts": texts, "encoding": "base64-float16"}).json()
    decoded = [np.frombuffer(base64.b64decode(e), dtype="<f2") for e in body["embeddings"]]
    assert np.allclose(decoded, expected_texts, atol=2e-3)

    ranked = _post(app, "/v1/rank", {"image": _png(images[0]), "texts": texts}).json()["results"]
    cosine = expected_texts @ expected_images[0]
    assert [r["text"] for r in ranked] == [texts[j] for j in np.argsort(-cosine)]
    assert sum(r["score"] for r in ranked) == pytest.approx(1.0)
    ranked = _post(app, "/v1/rank", {"text": texts[1], "images": [_png(i) for i in images]}).json()["results"]
    assert [r["image"] for r in ranked] == list(np.argsort(-(expected_images @ expected_texts[1])))
    assert ranked[0]["cosine"] == pytest.approx(float(np.max(expected_images @ expected_texts[1])), abs=1e-4)


def test_search_returns_the_index_rows_nearest_to_a_text_an_image_or_an_embedding(app):
    import pyarrow.parquet as pq

    stored = pq.read_table(app["root"] / "index" / "embeddings")
    rows = {row["key"]: row for row in stored.to_pylist()}
    model, image = app["model"], _images(1, seed=21)[0]
    with torch.no_grad():
        text_query = model.encode_text(clip_core.get_tokenizer()(["a red circle"]), normalize=True).numpy()[0]
    image_query = _image_features(model, [image]).numpy()[0]

    for payload, query, against in (({"text": "a red circle", "k": 5}, text_query, "image"),
                                    ({"image": _png(image), "against": "text", "k": 20}, image_query, "text")):
        response = _post(app, "/v1/search", payload)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": "clip-serve", "version": "1"} and body["index"]["rows"] == len(rows) == 48
        results = body["results"]
        assert len(results) == payload["k"] and len({r["key"] for r in results}) == payload["k"]
        for result in results:  # each row as embed stored it, and its cosine to the query
            row = rows[result["key"]]
            assert (result["caption"], result["label"]) == (row["caption"], row["label"])
            assert result["metadata"] == json.loads(row["metadata"]) and "classname" in result["metadata"]
            assert result["cosine"] == pytest.approx(float(np.dot(row[f"{against}_embedding"], query)), abs=1e-4)
        # the k nearest of all rows, nearest first
        every = np.sort([np.dot(row[f"{against}_embedding"], query) for row in rows.values()])[::-1]
        assert [r["cosine"] for r in results] == pytest.approx(list(every[:payload["k"]]), abs=1e-4)
        assert all(a["cosine"] >= b["cosine"] for a, b in zip(results, results[1:]))

    # an embedding as /v1/embed returns it (floats or base64 float16) finds what its text finds, scaled or not
    by_text = _post(app, "/v1/search", {"text": "a red circle", "k": 5}).json()["results"]
    halved = base64.b64encode((text_query / 2).astype("<f2").tobytes()).decode()
    for embedding in ([float(x) * 3 for x in text_query], halved):
        found = _post(app, "/v1/search", {"embedding": embedding, "k": 5}).json()["results"]
        assert [r["key"] for r in found] == [r["key"] for r in by_text]
        assert [r["cosine"] for r in found] == pytest.approx([r["cosine"] for r in by_text], abs=2e-3)

    for payload, status, kind in (({"text": "a", "image": _png(image)}, 422, "invalid_request"),
                                  ({"text": "a", "embedding": [1.0] * len(text_query)}, 422, "invalid_request"),
                                  ({"embedding": [1.0] * 7}, 422, "invalid_embedding"),
                                  ({"embedding": [0.0] * len(text_query)}, 422, "invalid_embedding"),
                                  ({"embedding": "not base64!"}, 422, "invalid_embedding"),
                                  ({"k": 3}, 422, "invalid_request"),
                                  ({"text": "a", "k": 21}, 422, "too_many"),
                                  ({"text": "a", "against": "audio"}, 422, "invalid_request"),
                                  ({"text": " "}, 422, "empty_text")):
        response = _post(app, "/v1/search", payload)
        assert (response.status_code, response.json()["error"]["type"]) == (status, kind), payload
    assert _post(app, "/v1/search", {"text": "a"}, headers={}).status_code == 401
    counted = httpx.get(app["url"] + "/metrics", headers=AUTH).text  # one ingress replica: it saw them all
    assert _metric(counted, "rayclip_requests_total", route="/v1/search", status="200") >= 2
    assert _metric(counted, "rayclip_requests_total", route="/v1/search", status="422") >= 9
    # an index that is not there fails the deployment before any replica starts
    missing = app["config"].model_copy(update={"index": str(app["root"] / "no-index")})
    with pytest.raises(FileNotFoundError, match="no embeddings at .*no-index: embeddings.json is missing"):
        rollout.deploy(missing, name="never-deployed")


def _metric(text: str, name: str, default: float | None = None, **labels) -> float:
    """A sample's value; `default` where it is absent (a counter no request has touched yet)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"no {name}{{{wanted}}} in /metrics")


def test_the_index_replica_reserves_the_memory_its_embeddings_take(app):
    from workflows.embed import read_embeddings_manifest

    manifest = read_embeddings_manifest(str(app["root"] / "index"))
    assert manifest["rows"] == 48 and manifest["dtype"] == "float32"
    # 48 rows x (image and text x 64 dims x (float32 matrix + float32 as stored) + 512 for key and caption),
    # and twice the metadata's bytes (each row's {"classname": …})
    assert manifest["metadata_bytes"] > 48 * len('{"classname": ""}')
    expected = 48 * (2 * manifest["embed_dim"] * 8 + 512) + 2 * manifest["metadata_bytes"]
    assert served.index_memory(manifest) == expected
    assert served.index_memory({**manifest, "dtype": "float16", "columns": ["key", "image_embedding"],
                                "metadata_bytes": 0}) == 48 * (manifest["embed_dim"] * 6 + 512)
    deployments = rollout._application(served.APP_NAME)["deployments"]
    options = deployments[served.INDEX]["deployment_config"]["ray_actor_options"]
    assert options["memory"] == expected, options


def test_the_rows_an_image_with_several_captions_stands_for_are_its_first():
    import pyarrow as pa

    ids = pa.chunked_array([["b", "a", "b"], ["c", "a"], []])
    assert served.first_rows(ids).tolist() == [0, 1, 3]
    assert served.first_rows(pa.chunked_array([], pa.string())).tolist() == []


def test_search_breaks_ties_by_row_order_also_at_the_kth_place():
    rng = np.random.default_rng(0)
    scores = rng.choice(np.float32([0.1, 0.5, 0.9]), size=1000)  # duplicate images embed identically
    reference = np.lexsort((np.arange(1000), -scores))
    for k in (1, 3, 10, 100, 999, 1000, 5000):
        assert served.top_k(scores, k).tolist() == reference[:k].tolist()
    assert served.top_k(np.zeros(0, np.float32), 5).tolist() == []


def test_an_index_compares_with_the_live_model_only_on_the_same_weights_and_activation():
    index = {"model": {"name": "clip", "uri": "models:/clip/1", "version": "1"}, "weights_sha256": "a",
             "quick_gelu": False, "embed_dim": 512}
    live = {"name": "clip", "version": "1", "weights_sha256": "a", "quick_gelu": False, "embed_dim": 512}
    assert served.index_mismatch(index, live) is None
    assert served.index_mismatch({**index, "quick_gelu": None}, live) is None  # an index from before it was kept
    assert "embedded with clip version 1, not the live model (clip version 2)" in served.index_mismatch(
        index, {**live, "version": "2", "weights_sha256": "b"})
    assert "running GELU, and the live model (clip version 1) runs QuickGELU" in served.index_mismatch(
        index, {**live, "quick_gelu": True})
    # another width failed the whole search batch in its matrix product; no digest on either side tells nothing
    assert "in 512 dimensions, and the live model (clip version 1) embeds in 768" in served.index_mismatch(
        index, {**live, "embed_dim": 768})
    assert "cannot be told apart" in served.index_mismatch({**index, "weights_sha256": None},
                                                           {**live, "weights_sha256": None})


def test_a_rows_metadata_comes_back_as_its_json_unless_nested_past_what_an_answer_can_hold():
    assert served.document('{"url": "https://example.com/a.jpg", "size": [1, 2]}') == {
        "url": "https://example.com/a.jpg", "size": [1, 2]}
    assert served.document("not json") == "not json" and served.document(None) is None
    for deep in ("[" * 2048 + "]" * 2048, "[" * 254 + "]" * 254):  # 4 KiB: json.loads recursed out of the stack
        assert served.document(deep) == deep
    nested = "[" * served.MAX_METADATA_DEPTH + "]" * served.MAX_METADATA_DEPTH
    assert served.document(nested) == json.loads(nested)


def test_a_query_embedding_of_any_finite_scale_is_taken_as_its_direction():
    for value in ([1e20] * 8, [1e-25] * 8, [3.0] * 8):  # float32's norm overflowed or underflowed
        np.testing.assert_allclose(served.decode_vector(value, 8), np.full(8, 8 ** -0.5, np.float32), rtol=1e-6)
    for value in ([0.0] * 8, [1.0] * 7 + [float("inf")]):
        with pytest.raises(served.RequestError, match="not finite, or is all zeros"):
            served.decode_vector(value, 8)
    halves = base64.b64encode(np.full(8, 2.0, "<f2").tobytes()).decode()
    np.testing.assert_allclose(served.decode_vector(halves, 8), np.full(8, 8 ** -0.5, np.float32), rtol=1e-6)


def test_concurrent_requests_are_batched_and_classifiers_cached(app):
    async def burst():
        async with httpx.AsyncClient(base_url=app["url"], headers=AUTH, timeout=60) as client:
            texts = [f"a photo of shape number {i}" for i in range(24)]
            return await asyncio.gather(*(client.post("/v1/embed/text", json={"texts": [t]}) for t in texts))

    before = httpx.get(app["url"] + "/metrics").text
    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    after = httpx.get(app["url"] + "/metrics").text
    ran = (_metric(after, "rayclip_batch_size_count", tower="text")
           - _metric(before, "rayclip_batch_size_count", 0.0, tower="text"))
    single = (_metric(after, "rayclip_batch_size_bucket", tower="text", le="1.0")
              - _metric(before, "rayclip_batch_size_bucket", 0.0, tower="text", le="1.0"))
    assert ran == 24 and single < 24, "no request shared a batch with another"

    payload = {"images": [_png(_images(1)[0])], "labels": ["cat", "dog"]}
    for _ in range(2):
        assert _post(app, "/v1/classify", payload).status_code == 200
    hits = httpx.get(app["url"] + "/metrics").text
    assert _metric(hits, "rayclip_classifier_cache_total", result="hit") >= 1
    assert _metric(hits, "rayclip_requests_total", route="/v1/classify", status="200") >= 2
    assert _metric(hits, "rayclip_request_seconds_count", route="/v1/classify", status="200") >= 2


def test_concurrent_cold_classify_requests_build_the_classifier_once_and_a_failed_build_is_not_kept():
    """The cache /v1/classify keeps its classifiers in: identical gets on a cold cache (all requests right
    after a rollout) share one build, so the text tower encodes the prompts once, not once per request."""
    builds = []

    async def build(key: str, fail: bool = False) -> str:
        builds.append(key)
        await asyncio.sleep(0.01)
        if fail:
            raise served.RequestError(503, "overloaded", "the model replicas are at capacity")
        return f"weights of {key}"

    async def scenario():
        cache = served.SingleFlightCache(size=2)
        got = await asyncio.gather(*(cache.get("a", lambda: build("a")) for _ in range(8)))
        assert got == [("weights of a", True)] + [("weights of a", False)] * 7 and builds == ["a"]

        failed = await asyncio.gather(*(cache.get("b", lambda: build("b", fail=True)) for _ in range(3)),
                                      return_exceptions=True)
        assert all(isinstance(error, served.RequestError) for error in failed) and builds.count("b") == 1
        assert await cache.get("b", lambda: build("b")) == ("weights of b", True), "a failure was kept"

        # a request that goes away (its client hung up) does not take the build from those waiting on it
        first = asyncio.ensure_future(cache.get("c", lambda: build("c")))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(cache.get("c", lambda: build("c")))
        await asyncio.sleep(0)
        first.cancel()
        assert await second == ("weights of c", False) and builds.count("c") == 1

        # at most `size` kept, the least recently used dropped: b and c now, then c and a
        assert await cache.get("a", lambda: build("a")) == ("weights of a", True)
        assert await cache.get("c", lambda: build("c")) == ("weights of c", False)
        assert await cache.get("b", lambda: build("b")) == ("weights of b", True)

        # and at most max_bytes of them: a client sending label sets of its own cannot grow the ingress past it
        async def weights(rows: int) -> np.ndarray:
            return np.zeros((rows, 256), np.float32)  # 1 KiB a row

        sized = served.SingleFlightCache(size=100, max_bytes=10 * 1024)
        for key, rows in (("four", 4), ("five", 5), ("three", 3)):
            await sized.get(key, lambda rows=rows: weights(rows))
        assert list(sized._values) == ["five", "three"] and sized.bytes == 8 * 1024
        await sized.get("eleven", lambda: weights(11))  # over the bound alone: not kept, nor anything else
        assert not sized._values and sized.bytes == 0

    asyncio.run(scenario())


def test_a_bug_in_a_route_answers_a_json_500_that_is_counted():
    from fastapi import FastAPI
    from prometheus_client import generate_latest

    metrics = served.Metrics()
    api = FastAPI()
    api.add_middleware(served.CountRequests, metrics=lambda: metrics)

    @api.get("/broken")
    async def broken():
        raise RuntimeError("a bug")

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test") as client:
            return await client.get("/broken"), await client.get("/nowhere")

    failed, missing = asyncio.run(call())
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "internal_error"
    assert "a bug" not in failed.text  # logged, not told
    assert missing.status_code == 404
    counted = generate_latest(metrics.registry).decode()
    assert _metric(counted, "rayclip_requests_total", route="/broken", status="500") == 1
    assert _metric(counted, "rayclip_request_seconds_count", route="/broken", status="500") == 1
    assert _metric(counted, "rayclip_requests_total", route="other", status="404") == 1


def test_a_model_that_failed_to_deploy_answers_503_with_retry_after_not_a_500():
    """Tower replicas that cannot start (MLflow unreachable from the cluster) make their handles raise
    DeploymentUnavailableError: each request is told to come back, not answered 500 with a traceback."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    async def call():  # as a handle's response raises it when awaited
        raise DeploymentUnavailableError(DeploymentID(name="TextTower", app_name="rayclip"))

    with pytest.raises(served.RequestError) as raised:
        asyncio.run(served.call_towers(lambda: [call()], retry_after_s=2.0))
    assert (raised.value.status, raised.value.kind, raised.value.headers) == (503, "model_unavailable",
                                                                              {"Retry-After": "2"})
    assert "retry in 2 s" in raised.value.message


def test_a_401_names_the_bearer_scheme_the_server_wants():
    """RFC 9110 requires WWW-Authenticate on a 401; generic clients and gateways choose their scheme by it."""
    from starlette.datastructures import Headers

    digest = served.sha256_hex(TOKEN)
    served.authorize(Headers(AUTH), digest)
    served.authorize(Headers(), None)  # no token set: no auth
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        with pytest.raises(served.RequestError) as raised:
            served.authorize(Headers(headers), digest)
        response = asyncio.run(served.api.exception_handlers[served.RequestError](None, raised.value))
        assert response.status_code == 401 and json.loads(response.body)["error"]["type"] == "unauthorized"
        assert response.headers["www-authenticate"] == 'Bearer realm="rayclip"', headers


def test_a_body_over_the_limit_or_trickled_in_past_the_timeout_is_refused():
    """A client that sends its body a byte at a time (or stops) held an ingress slot for as long as it liked."""
    from starlette.requests import Request

    def request(chunks: list[bytes], stall: bool = False, length: int | None = None) -> Request:
        messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]

        async def receive():
            if messages:
                return messages.pop(0)
            if stall:
                await asyncio.Event().wait()  # never set: the client sends nothing more
            return {"type": "http.request", "body": b"", "more_body": False}

        headers = [(b"content-length", str(length).encode())] if length is not None else []
        return Request({"type": "http", "method": "POST", "headers": headers}, receive)

    async def read(r: Request, timeout_s: float = 5.0) -> bytes:
        return await served.read_body(r, limit=10, timeout_s=timeout_s)

    assert asyncio.run(read(request([b"abc", b"def"]))) == b"abcdef"
    for r, status, kind in ((request([b"x"] * 11), 413, "body_too_large"),  # streamed past the limit
                            (request([], length=11), 413, "body_too_large"),  # said so at once
                            (request([b"ab"], stall=True), 408, "body_timeout")):
        with pytest.raises(served.RequestError) as raised:
            asyncio.run(read(r, timeout_s=0.2))
        assert (raised.value.status, raised.value.kind) == (status, kind)


def test_serve_keeps_the_tokens_digest_never_the_token(app):
    stored = json.dumps(rollout._application(served.APP_NAME))  # what the dashboard shows of the app
    assert TOKEN not in stored and hashlib.sha256(TOKEN.encode()).hexdigest() in stored
    # the spec `rayclip deploy` sends (Ray's schema accepts it) holds the digest and the logging switches
    from ray.serve.schema import ServeApplicationSchema

    spec = rollout.app_spec(served.ServeConfig(model="x", auth_token=TOKEN, access_log=False, log_level="WARNING"))
    ServeApplicationSchema(**spec)
    assert TOKEN not in json.dumps(spec)
    assert spec["logging_config"] == {"enable_access_log": False, "log_level": "WARNING"}
    assert '"enable_access_log": true' in stored and '"enable_access_log": false' not in stored  # the default
    # a config that holds only the digest authorizes the same token
    digest_only = served.ServeConfig(model="x", auth_token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())
    assert digest_only.token_digest() == app["config"].token_digest() == app["config"].stored().auth_token_sha256
    # the scheme's case is the client's choice (RFC 9110); the token's is not
    assert _post(app, "/v1/embed/text", {"texts": ["a"]}, headers={"Authorization": f"bearer {TOKEN}"}
                 ).status_code == 200
    assert _post(app, "/v1/embed/text", {"texts": ["a"]}, headers={"Authorization": f"Bearer {TOKEN.upper()}"}
                 ).status_code == 401


def test_the_python_client_splits_long_lists_into_requests_within_the_limits_and_raises_the_servers_errors(
        app, tmp_path):
    from deploy.client import Client, ClientError

    model, images = app["model"], _images(6, seed=31)
    texts = [f"a photo of shape number {i}" for i in range(37)]  # over the server's 16 texts a request
    with torch.no_grad():
        expected_texts = model.encode_text(clip_core.get_tokenizer()(texts), normalize=True).numpy()
    images[0].save(tmp_path / "first.png")
    given = [str(tmp_path / "first.png"), base64.b64decode(_png(images[1])), *images[2:]]  # path, bytes, PIL
    with Client(app["url"], token=TOKEN, concurrency=3) as clip:
        assert clip.model()["limits"]["max_texts"] == 16 and clip.model()["version"] == "1"
        embedded = clip.embed_texts(texts)
        assert embedded.shape == expected_texts.shape and embedded.dtype == np.float32
        np.testing.assert_allclose(embedded, expected_texts, atol=2e-3)  # float16 on the wire, in order
        np.testing.assert_allclose(clip.embed_images(given), _image_features(model, images).numpy(), atol=2e-3)
        labels = ["red circle", "blue square", "green triangle"]
        ranked = clip.classify(given, labels, top_k=2)  # 6 images over the server's 4 a request
        direct = _post(app, "/v1/classify", {"images": [_png(i) for i in images[:4]], "labels": labels,
                                             "top_k": 2}).json()["results"]
        assert len(ranked) == 6 and [[r["label"] for r in row] for row in ranked[:4]] == \
            [[r["label"] for r in row] for row in direct]
        assert [r["score"] for row in ranked[:4] for r in row] == \
            pytest.approx([r["score"] for row in direct for r in row], abs=1e-4)
        assert [r["key"] for r in clip.search(embedding=embedded[0], k=3)] == \
            [r["key"] for r in clip.search(text=texts[0], k=3)]
        direct_rank = _post(app, "/v1/rank", {"image": _png(images[0]), "texts": labels}).json()["results"]
        assert [r["text"] for r in clip.rank(image=given[0], texts=labels)] == [r["text"] for r in direct_rank]
        assert clip.embed_texts([]).shape == (0, embedded.shape[1])
        # requests also within the body limit, not by count alone (the app: 1 MiB; ~0.65 MB of base64 each)
        big = [Image.effect_noise((400, 400), 64).convert("RGB") for _ in range(4)]
        np.testing.assert_allclose(clip.embed_images(big), _image_features(model, big).numpy(), atol=2e-3)
        with pytest.raises(ClientError) as error:
            clip.search(text=" ")
        assert (error.value.status, error.value.kind) == (422, "empty_text")
    with Client(app["url"]) as anonymous, pytest.raises(ClientError) as error:
        anonymous.embed_texts(["a"])
    assert error.value.status == 401 and "Bearer" in error.value.message


def test_the_python_clients_requests_stay_within_the_body_limit_with_what_goes_with_every_chunk():
    # a classification's labels and templates go with each chunk of images, and texts have bytes too: a fixed
    # allowance for "the JSON around the images" let requests past the server's body limit (its 413)
    from deploy.client import Client

    limits = served.Limits(max_body_bytes=200_000, max_images=64, max_texts=256, max_request_pixels=10**9)
    bodies = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"limits": limits.model_dump(), "embed_dim": 2})
        body = json.loads(request.content)
        bodies.append((request.url.path, len(request.content), body))
        count = len(body.get("images") or body.get("texts"))
        if request.url.path == "/v1/classify":
            return httpx.Response(200, json={"results": [[{"label": "a", "score": 1.0}]] * count})
        vector = base64.b64encode(np.ones(2, "<f2").tobytes()).decode()
        return httpx.Response(200, json={"embeddings": [vector] * count})

    images = [base64.b64decode(_png(Image.effect_noise((64, 64), 64).convert("RGB"))) for _ in range(20)]
    labels = [f"a label of ninety-odd characters, number {i}, long as a whole description of the class" for i in
              range(1000)]
    with Client("http://rayclip.test") as clip:
        clip._http = httpx.Client(base_url="http://rayclip.test", transport=httpx.MockTransport(server))
        assert len(clip.classify(images, labels)) == 20
        assert clip.embed_texts([f"text {i} " + "é" * 2000 for i in range(100)]).shape == (100, 2)
    sent = {path: [(size, len(body.get("images") or body.get("texts"))) for p, size, body in bodies if p == path]
            for path in ("/v1/classify", "/v1/embed/text")}
    assert sum(count for _, count in sent["/v1/classify"]) == 20 and sum(count for _, count in sent["/v1/embed/text"]) \
        == 100
    assert len(sent["/v1/classify"]) > 1 and len(sent["/v1/embed/text"]) > 1, "both had to be split by bytes"
    assert all(size <= limits.max_body_bytes for chunks in sent.values() for size, _ in chunks), sent
    assert all(body["labels"] == labels for path, _, body in bodies if path == "/v1/classify")


def test_model_info_health_and_docs(app):
    info = httpx.get(app["url"] + "/v1/model", headers=AUTH).json()
    assert (info["name"], info["version"], info["alias"]) == ("clip-serve", "1", "champion")
    assert info["limits"]["max_images"] == app["config"].limits.max_images  # what a client splits lists by
    assert info["metrics"]["zeroshot.top1"] == "0.5" and "config_hash" in info["lineage"]
    assert httpx.get(app["url"] + "/healthz").json() == {"status": "ok"}
    assert httpx.get(app["url"] + "/readyz", headers=AUTH).json()["model"]["version"] == "1"
    assert httpx.get(app["url"] + "/readyz").json() == {"status": "ready"}, "the model is named only with the token"
    assert httpx.get(app["url"] + "/docs").status_code == 200
    paths = httpx.get(app["url"] + "/openapi.json").json()["paths"]
    classify = paths["/v1/classify"]["post"]["requestBody"]["content"]
    assert set(classify) == {"application/json", "multipart/form-data"}
    assert {"images", "labels", "top_k"} <= set(classify["application/json"]["schema"]["properties"])
    assert "texts" in (paths["/v1/embed/text"]["post"]["requestBody"]["content"]["application/json"]
                       ["schema"]["properties"])


def _bomb() -> str:
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, format="PNG")  # 4 Mpx in a few kB
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("case, payload, headers, status, kind", [
    ("no token", {"texts": ["a"]}, {}, 401, "unauthorized"),
    ("wrong token", {"texts": ["a"]}, {"Authorization": "Bearer nope"}, 401, "unauthorized"),
    ("malformed json", b"{not json", {**AUTH, "Content-Type": "application/json"}, 400, "invalid_json"),
    ("json nested 20,000 deep", b"[" * 20_000 + b"]" * 20_000, {**AUTH, "Content-Type": "application/json"}, 400,
     "invalid_json"),
    ("wrong content type", b"texts=a", {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type"),
    ("missing field", {"images": []}, AUTH, 422, "invalid_request"),
    ("unknown field", {"texts": ["a"], "colour": 1}, AUTH, 422, "invalid_request"),
    ("empty text", {"texts": ["  "]}, AUTH, 422, "empty_text"),
    ("too many texts", {"texts": ["a"] * 17}, AUTH, 422, "too_many"),
    ("body too large", {"texts": ["a" * 900] * 1200}, AUTH, 413, "body_too_large"),
])
def test_bad_text_requests_get_a_4xx_with_a_json_error(app, case, payload, headers, status, kind):
    if isinstance(payload, bytes):
        response = httpx.post(app["url"] + "/v1/embed/text", content=payload, headers=headers, timeout=60)
    else:
        response = _post(app, "/v1/embed/text", payload, headers=headers)
    assert response.status_code == status, (case, response.text)
    assert response.json()["error"]["type"] == kind, case
    assert response.json()["error"]["message"]
    if status == 401:  # through Serve's proxy too
        assert response.headers["www-authenticate"] == 'Bearer realm="rayclip"', case


@pytest.mark.parametrize("case, images, labels, status, kind", [
    ("not base64", ["%%%"], ["a"], 400, "invalid_base64"),
    ("not an image", [base64.b64encode(b"hello world").decode()], ["a"], 415, "unsupported_image_format"),
    ("truncated image", ["TRUNCATED"], ["a"], 400, "invalid_image"),
    ("decompression bomb", ["BOMB"], ["a"], 413, "image_too_large"),
    ("image bytes over the limit", [base64.b64encode(b"\0" * (600 * 2**10)).decode()], ["a"], 413, "image_too_large"),
    # 100 bytes of PNG whose resize to the model's size alone would take gigabytes
    ("a thin strip", ["STRIP"], ["a"], 422, "extreme_aspect_ratio"),
    ("too many images", ["PNG"] * 5, ["a"], 422, "too_many"),
    ("empty labels", ["PNG"], [], 422, "invalid_request"),
    ("blank label", ["PNG"], ["cat", ""], 422, "empty_label"),
    ("too many labels", ["PNG"], [f"l{i}" for i in range(21)], 422, "too_many"),
    ("a template without {}", ["PNG"], {"labels": ["a"], "templates": ["a photo"]}, 422, "invalid_template"),
    ("a template with another field", ["PNG"], {"labels": ["a"], "templates": ["a {} of {kind}"]}, 422,
     "invalid_template"),
    ("a template with a stray brace", ["PNG"], {"labels": ["a"], "templates": ["a {} }"]}, 422, "invalid_template"),
    # each a prompt for the text tower to encode: 20 x 4 is over the 60 allowed
    ("labels x templates", ["PNG"], {"labels": [f"l{i}" for i in range(20)],
                                     "templates": ["a {}", "the {}", "one {}", "my {}"]}, 422, "too_many"),
    # three flat 1000x1000 PNGs of a few kB each: 3 megapixels to decode, over the request's 2.5
    ("megapixels of a request", ["FLAT"] * 3, ["a"], 413, "images_too_large"),
])
def test_bad_classify_requests_get_a_4xx_and_the_replicas_survive(app, case, images, labels, status, kind):
    png = _png(_images(1)[0])
    full = base64.b64decode(png)
    strip = io.BytesIO()
    Image.new("L", (40000, 1)).save(strip, format="PNG")
    flat = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(flat, format="PNG")
    substitutes = {"PNG": png, "TRUNCATED": base64.b64encode(full[: len(full) // 2]).decode(), "BOMB": _bomb(),
                   "STRIP": base64.b64encode(strip.getvalue()).decode(),
                   "FLAT": base64.b64encode(flat.getvalue()).decode()}
    payload = {"images": [substitutes.get(i, i) for i in images],
               **(labels if isinstance(labels, dict) else {"labels": labels})}
    response = _post(app, "/v1/classify", payload)
    assert response.status_code == status, (case, response.text)
    assert response.json()["error"]["type"] == kind, case
    assert _post(app, "/v1/classify", {"images": [png], "labels": ["a", "b"]}).status_code == 200


def test_a_thin_strip_allowed_by_a_raised_aspect_limit_is_still_refused_when_its_resize_is_too_large():
    buffer = io.BytesIO()
    Image.new("L", (40_000, 20)).save(buffer, format="PNG")  # 2,000:1, and 224 px high it would be 100 MP
    with pytest.raises(served.RequestError) as info:
        served.prepare_image(buffer.getvalue(), 3, 224, served.Limits(max_aspect_ratio=5000))
    assert (info.value.status, info.value.kind) == (413, "image_too_large")
    assert "images[3]" in info.value.message and "crop it" in info.value.message


def test_classify_takes_multipart_uploads_and_allow_listed_s3_images_and_never_fetches_urls(app):
    images, labels = _images(1), ["red circle", "blue square", "green triangle"]
    expected = _post(app, "/v1/classify", {"images": [_png(images[0])], "labels": labels, "top_k": 2,
                                           "templates": ["a photo of a {}.", "{}"]}).json()["results"]
    png = base64.b64decode(_png(images[0]))
    form = {"labels": labels, "top_k": "2", "templates": ["a photo of a {}.", "{}"]}
    uploaded = httpx.post(app["url"] + "/v1/classify", headers=AUTH, data=form, timeout=60,
                          files=[("images", ("one.png", png, "image/png")), ("images", ("two.png", png, "image/png"))])
    assert uploaded.status_code == 200, uploaded.text
    assert [[r["label"] for r in row] for row in uploaded.json()["results"]] == [[r["label"] for r in expected[0]]] * 2
    assert [r["score"] for r in uploaded.json()["results"][1]] == pytest.approx([r["score"] for r in expected[0]],
                                                                                abs=1e-5)
    from_s3 = _post(app, "/v1/classify", {"images": [f"s3://{app['bucket']}/shapes/one.png"], "labels": labels,
                                          "top_k": 2, "templates": ["a photo of a {}.", "{}"]})
    assert from_s3.status_code == 200, from_s3.text
    assert from_s3.json()["results"] == expected

    def error(response) -> tuple[int, str]:
        return response.status_code, response.json()["error"]["type"]

    def upload(headers=AUTH, **kwargs) -> httpx.Response:
        return httpx.post(app["url"] + "/v1/classify", headers=headers, timeout=60, **kwargs)

    one = [("images", ("one.png", png, "image/png"))]
    assert error(upload(data={"labels": "a", "colour": "red"}, files=one)) == (422, "invalid_request")
    assert error(upload(data={"labels": "a"},
                        files=[("other", ("x.png", png, "image/png"))])) == (422, "invalid_request")
    assert error(upload(files=one + [("labels", ("l.txt", b"a", "text/plain"))])) == (422, "invalid_request")
    assert error(upload(data={"labels": "a"}, files=one * 5)) == (422, "too_many")
    assert error(upload(data={"labels": [f"l{i}" for i in range(150)]}, files=one)) == (422, "too_many")  # > fields
    assert error(upload(content=b"--x\r\nnonsense", headers={**AUTH, "Content-Type": "multipart/form-data"})
                 ) == (400, "invalid_multipart")
    for source, expected_error in ((f"s3://{app['bucket']}/shapes/missing.png", (422, "image_not_found")),
                                   ("s3://someone-elses-bucket/cat.png", (403, "image_source_not_allowed")),
                                   # a key that climbs out of the allow-listed bucket
                                   (f"s3://{app['bucket']}/../someone-elses-bucket/cat.png",
                                    (422, "invalid_image_source")),
                                   (f"s3://{app['bucket']}/shapes//one.png", (422, "invalid_image_source")),
                                   ("http://127.0.0.1:1/cat.png", (422, "urls_not_allowed"))):
        assert error(_post(app, "/v1/classify", {"images": [source], "labels": ["a"]})) == expected_error, source


@pytest.mark.parametrize("high_throughput", [False, True], ids=["serve-proxy", "haproxy"])
def test_rayclip_serve_runs_in_the_foreground_and_stops_cleanly_on_sigterm(tmp_path, high_throughput):
    """Here on weights in another format: a bare state dict, which does not say its activation, served
    with the one --quick-gelu names. Also in Ray's high-throughput mode, HAProxy sending the requests
    straight to the ingress replica (its stats and metrics on free ports: another Serve may run here; a
    stopping ingress replica drained for 1 s instead of 30), and with a token."""
    import os
    import signal
    import subprocess
    import sys
    import time

    torch.save(briefly_trained(steps=1).state_dict(), tmp_path / "bare.pt")
    port, stats_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in rollout.HIGH_THROUGHPUT_ENV}
    env.pop("RAYCLIP_SERVE_TOKEN", None)
    headers = AUTH if high_throughput else {}
    if high_throughput:
        env.update(rollout.HIGH_THROUGHPUT_ENV, RAY_SERVE_HAPROXY_STATS_PORT=str(stats_port),
                   RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()), RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1",
                   RAYCLIP_SERVE_TOKEN=TOKEN)
    log = open(tmp_path / "serve.log", "w+")
    command = ["serve", "--model", str(tmp_path / "bare.pt"), "--quick-gelu", "--port", str(port),
               "--poll-registry", "0.5"]
    process = subprocess.Popen([sys.executable, "-m", "workflows.cli", *command], stdout=log,
                               stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops" not in (tmp_path / "serve.log").read_text():
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "rayclip serve did not come up in 240 s"
            time.sleep(0.5)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", headers=headers, timeout=30).json()
        assert ready["model"]["name"] == "bare.pt"
        response = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"text": "a"}, headers=headers, timeout=30)
        assert (response.status_code, response.json()["error"]["type"]) == (404, "no_index")
        texts = ["a red circle", "a small blue square on grey"]
        served_texts = np.array(httpx.post(f"http://127.0.0.1:{port}/v1/embed/text", json={"texts": texts},
                                           headers=headers, timeout=30).json()["embeddings"])
        for quick_gelu, close in ((True, True), (False, False)):  # GELU's differ by ~3e-3
            with torch.no_grad():
                expected = clip_core.load_model(tmp_path / "bare.pt", quick_gelu=quick_gelu).encode_text(
                    clip_core.get_tokenizer()(texts), normalize=True).numpy()
            assert np.allclose(served_texts, expected, atol=1e-4) is close, quick_gelu
        if high_throughput:  # HAProxy answered, from the ingress replica's own HTTP server
            import csv

            stats = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=30).text
            servers = [row for row in csv.DictReader(stats.removeprefix("# ").splitlines())
                       if row["svname"].startswith(f"SERVE_REPLICA_rayclip-{served.INGRESS}-")]
            assert servers and int(servers[0]["stot"]) >= 1, stats  # the requests above went through it
            unauthorized = httpx.post(f"http://127.0.0.1:{port}/v1/embed/text", json={"texts": texts}, timeout=30)
            assert (unauthorized.status_code, unauthorized.json()["error"]["type"]) == (401, "unauthorized")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
        output = (tmp_path / "serve.log").read_text()
        assert "shutting down" in output and "registry poll failed" not in output, output[-3000:]
    finally:
        if process.poll() is None:
            process.kill()


def test_overload_gets_quick_503s_with_retry_after_and_the_service_recovers(app):
    from ray import serve

    config = app["config"].model_copy(update={"max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
                                              "batch_wait_timeout_s": 0.0, "retry_after_s": 2.0})
    url = rollout.start(config, name="overload", route_prefix="/overload")

    async def burst():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
            texts = [f"a long caption about shape number {i} " * 8 for i in range(48)]
            return await asyncio.gather(*(client.post("/v1/embed/text", json={"texts": [t]}) for t in texts))

    try:
        responses = asyncio.run(burst())
        statuses = collections.Counter(r.status_code for r in responses)
        assert set(statuses) <= {200, 503} and statuses[503] > 0 and statuses[200] > 0, statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers.get("retry-after") == "2", (rejected.headers, rejected.text)
        assert rejected.json()["error"]["type"] == "overloaded"
        assert rejected.elapsed.total_seconds() < 5
        assert httpx.post(url + "/v1/embed/text", json={"texts": ["a"]}, headers=AUTH, timeout=60).status_code == 200
        # counted by route under a route prefix too (the prefix is not part of the route's label)
        assert httpx.get(url + "/v1/nothing-here", headers=AUTH).status_code == 404
        counted = httpx.get(url + "/metrics", headers=AUTH).text
        assert _metric(counted, "rayclip_requests_total", route="other", status="404") == 1  # not a label per path
        assert "nothing-here" not in counted
        assert _metric(counted, "rayclip_requests_total", route="/v1/embed/text", status="503") == statuses[503]
        assert _metric(counted, "rayclip_requests_total", route="/v1/embed/text", status="200") == statuses[200] + 1
    finally:
        serve.delete("overload")


def test_the_ingress_autoscales_on_its_ongoing_requests_without_failing_one(app):
    from ray import serve

    scaling = served.Autoscaling(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0,
                                 downscale_delay_s=600)
    config = app["config"].model_copy(update={"ingress_autoscaling": scaling, "index": None})
    url = rollout.start(config, name="autoscaled", route_prefix="/autoscaled")

    def running() -> int:
        states = serve.status().applications["autoscaled"].deployments[served.INGRESS].replica_states
        return states.get("RUNNING", 0)

    async def load_until_scaled() -> tuple[list[int], int]:
        statuses, done = [], asyncio.Event()

        async def caller(client, i):
            while not done.is_set():
                response = await client.post("/v1/embed/text", json={"texts": [f"shape number {i}"]})
                statuses.append(response.status_code)

        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
            callers = [asyncio.create_task(caller(client, i)) for i in range(16)]
            deadline = time.monotonic() + 120
            while (replicas := await asyncio.to_thread(running)) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)  # polling Serve's status, not waiting for it
            done.set()
            await asyncio.gather(*callers)
        return statuses, replicas

    try:
        assert running() == 1
        statuses, replicas = asyncio.run(load_until_scaled())
        assert replicas == 2, "16 callers against a target of 1 ongoing request per replica did not add one"
        assert statuses and set(statuses) == {200}, collections.Counter(statuses)
    finally:
        serve.delete("autoscaled")


def test_the_ingress_is_sized_one_way():
    with pytest.raises(ValueError, match="set ingress_replicas .* or ingress_autoscaling, not both"):
        served.ServeConfig(ingress_replicas=2, ingress_autoscaling=served.Autoscaling(max_replicas=4))
    with pytest.raises(ValueError, match="ingress_autoscaling.min_replicas must be at least 1"):
        served.ServeConfig(ingress_autoscaling=served.Autoscaling(min_replicas=0, max_replicas=4))


def test_playground_page_classifies_a_dropped_image_and_searches_the_index_in_headless_chromium(app, tmp_path):
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    image = _images(1, seed=11)[0].resize((128, 128))
    image.save(tmp_path / "shape.png")
    labels = ["red circle", "blue square", "green triangle"]
    model = app["model"]
    classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), labels)
    _, top = clip_core.predict(model, clip_core.image_transform(64)(image)[None], classifier, top_k=1)
    artifacts = Path(__file__).resolve().parent.parent / "test-artifacts"
    artifacts.mkdir(exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            blocked = []
            page.on("request", lambda r: None if r.url.startswith(app["url"]) else blocked.append(r.url))
            page.goto(app["url"] + "/")
            page.wait_for_selector("text=model ready (the server names it to a caller with its API token)")
            page.fill("#token", TOKEN)
            page.locator("#token").dispatch_event("change")
            page.wait_for_selector("text=model: clip-serve v1")
            # the server writes its max_image_bytes (512 KiB here) into the page, which refuses larger files
            too_big = {"name": "big.png", "mimeType": "image/png", "buffer": bytes(600 * 2**10)}
            page.set_input_files("#file", too_big)
            page.wait_for_selector("text=the image is 600.0 KiB; this server takes at most 512.0 KiB")
            assert page.is_disabled("#classify")
            page.set_input_files("#file", str(tmp_path / "shape.png"))
            page.fill("#labels", ", ".join(labels))
            page.click("#classify")
            page.wait_for_selector("#results .row")
            shown = page.locator("#results .name").all_inner_texts()
            page.fill("#query", "a green square")
            page.click("#search")
            page.wait_for_selector("#found .row")
            found = page.locator("#found .caption").all_inner_texts()
            page.screenshot(path=str(artifacts / "playground.png"), full_page=True)

            # under a route prefix (`--route-prefix /clip` serves the page at /clip, no slash) the page asks the
            # app under it, not the origin's root (where another app would get the token): a proxy here
            def under_clip(route):
                path = route.request.url[len(app["url"] + "/clip"):]
                route.fulfill(response=route.fetch(url=app["url"] + (path or "/")))

            prefixed = browser.new_page()
            prefixed.route(app["url"] + "/clip**", under_clip)
            asked = []
            prefixed.on("request", lambda r: asked.append(r.url))
            prefixed.goto(app["url"] + "/clip")
            prefixed.wait_for_selector("text=model ready")
        finally:
            browser.close()
    assert asked and all(url.startswith(app["url"] + "/clip") for url in asked), asked
    assert sorted(shown) == sorted(labels) and shown[0] == labels[int(top[0, 0])]
    expected = _post(app, "/v1/search", {"text": "a green square", "k": 10}).json()["results"]
    assert found == [row["caption"] for row in expected] and len(found) == 10
    assert blocked == [], "the page reached beyond the server"
    assert (artifacts / "playground.png").stat().st_size > 1000


@pytest.mark.parametrize("joined", ["through RAY_ADDRESS", "as ray start made it on this node"])
def test_a_command_that_joined_a_cluster_takes_down_only_its_own_app(app, monkeypatch, joined):
    import ray
    from ray import serve

    from workflows import runtime

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Hello:
        async def __call__(self, request) -> str:
            return "hello"

    for name in ("bystander", "leaving"):
        serve.run(Hello.bind(), name=name, route_prefix=f"/{name}")
    if joined == "through RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)  # as under `ray job submit`
    else:  # a cluster launcher's head after `ray attach`: init_ray found `ray start`'s address (test_pipeline)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(runtime, "_joined", True)
    rollout.stop("leaving")
    try:
        assert set(serve.status().applications) == {served.APP_NAME, "bystander"}
        assert httpx.get(app["url"] + "/v1/model", headers=AUTH).status_code == 200
    finally:
        serve.delete("bystander")


def test_serve_config_yaml_is_a_valid_serve_deploy_config_that_builds_the_app(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parent.parent / "deploy" / "serve_config.yaml"
    config = ServeDeploySchema(**yaml.safe_load(path.read_text()))
    (application,) = config.applications
    module, _, name = application.import_path.partition(":")
    builder = getattr(__import__(module, fromlist=[name]), name)
    assert builder is served.app_builder
    clip_core.save_checkpoint(briefly_trained(steps=1), tmp_path / "ckpt")
    app = builder({**application.args, "model": str(tmp_path / "ckpt")})  # not the cluster's MLflow
    assert type(app).__name__ == "Application"
    quiet = builder({**application.args, "model": str(tmp_path / "ckpt"), "access_log": False, "log_level": "ERROR"})
    logging = quiet._bound_deployment.logging_config  # (no public reader) `serve deploy` passes args alone
    assert (logging["enable_access_log"], logging["log_level"]) == (False, "ERROR")
    settings = served.ServeConfig(**application.args)
    assert settings.num_gpus == 0.25 and settings.autoscaling.max_replicas == 8
    # the ingress does each request's CPU work: on a cluster it reserves a core, so it is placed where there is
    # one (a 0-CPU replica fits the head, whose num-cpus is 0 to keep work off it) and the autoscaler adds nodes
    assert app._bound_deployment.ray_actor_options["num_cpus"] == settings.ingress_num_cpus == 1
    assert settings.ingress_autoscaling.max_replicas == 8
    with pytest.raises(ValueError, match="unknown_option"):
        builder({**application.args, "unknown_option": 1})
    with pytest.raises(ValueError, match="auth_token in a serve deploy config would be kept and shown by Serve"):
        builder({**application.args, "auth_token": "tok-Secret-77"})  # Serve keeps args as given: refused
    with pytest.raises(ValueError) as invalid:
        served.ServeConfig(auth_token="tok-Secret-77", port="not a port")
    assert "tok-Secret" not in str(invalid.value)  # pydantic errors leave the input out

    # `rayclip deploy --config deploy/serve_config.yaml` (and `serve --config`) read the same file
    from workflows import cli

    parser = cli.build_parser()
    monkeypatch.setenv(served.TOKEN_ENV, "cluster-token")  # the file require_auth
    settings, route_prefix = cli._serve_config(parser.parse_args(["deploy", "--config", str(path)]))
    assert (settings.model, settings.host, settings.port, route_prefix) == ("models:/clip@champion", "0.0.0.0",
                                                                            8000, "/")
    assert settings.limits.max_images == 32 and settings.autoscaling.max_replicas == 8
    settings, route_prefix = cli._serve_config(parser.parse_args(
        ["serve", "--config", str(path), "--port", "9000", "--model", str(tmp_path / "ckpt")]))
    assert (settings.port, settings.model, settings.num_gpus) == (9000, str(tmp_path / "ckpt"), 0.25)
    with pytest.raises(ValueError, match=r"no application 'other', only \['rayclip'\]: choose one with --name"):
        cli._serve_config(parser.parse_args(["deploy", "--config", str(path), "--name", "other"]))
    document = yaml.safe_load(path.read_text())
    document["applications"][0]["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_USERNAME": "ops"}}
    (tmp_path / "with_env.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match=r"application 'rayclip' in .*with_env.yaml sets runtime_env, which "
                                         r"`rayclip deploy` does not carry .*`serve deploy "):
        cli._serve_config(parser.parse_args(["deploy", "--config", str(tmp_path / "with_env.yaml")]))
    assert parser.parse_args(["deploy", "--reload", "--poll-registry", "30"]).poll_registry == 30
    for command, seconds in (("deploy", "0"), ("serve", "-5")):  # a poll that never waits would spin
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--poll-registry", seconds])
        assert f"{seconds}: give a number of seconds above 0" in capsys.readouterr().err


def test_flags_override_the_config_file_which_overrides_the_environment(monkeypatch, capsys):
    from pathlib import Path

    from workflows import cli

    path = str(Path(__file__).resolve().parent.parent / "deploy" / "serve_config.yaml")
    parser = cli.build_parser()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///laptop.db")
    monkeypatch.setenv(served.TOKEN_ENV, "from-the-environment")
    settings, _ = cli._serve_config(parser.parse_args(["deploy", "--config", path]))
    assert settings.mlflow_tracking_uri == "http://mlflow.internal:5000", "the file's, not this shell's"
    # replicas on a cluster joined through RAY_ADDRESS do not see this shell's token: they get its digest
    assert settings.auth_token_sha256 == hashlib.sha256(b"from-the-environment").hexdigest()
    # a Ray job gets the digest instead (Ray shows a job's environment): the same config, never the token
    monkeypatch.delenv(served.TOKEN_ENV)
    monkeypatch.setenv(served.TOKEN_DIGEST_ENV, hashlib.sha256(b"from-the-environment").hexdigest().upper())
    assert cli._serve_config(parser.parse_args(["deploy", "--config", path]))[0] == settings
    monkeypatch.setenv(served.TOKEN_DIGEST_ENV, "not-a-digest")
    with pytest.raises(ValueError, match="auth_token_sha256"):
        cli._serve_config(parser.parse_args(["deploy", "--config", path]))
    monkeypatch.delenv(served.TOKEN_DIGEST_ENV)
    monkeypatch.setenv(served.TOKEN_ENV, "from-the-environment")
    assert cli._serve_config(parser.parse_args(["serve"]))[0].mlflow_tracking_uri == "sqlite:///laptop.db"
    flag = ["--mlflow-tracking-uri", "http://other:5000"]
    assert cli._serve_config(parser.parse_args(["deploy", "--config", path, *flag]))[0].mlflow_tracking_uri == \
        "http://other:5000"
    # --reload rolls the app on the registry its replicas read; another registry would name other versions
    with pytest.raises(ValueError, match="--mlflow-tracking-uri change how the app is deployed"):
        cli._deploy(parser.parse_args(["deploy", "--reload", *flag]))
    with pytest.raises(ValueError, match="holds a password, which Serve would keep") as info:
        cli._serve_config(parser.parse_args(["serve", "--mlflow-tracking-uri", "http://ops:hunter2@mlflow:5000"]))
    assert "hunter2" not in cli.redact(str(info.value))
    # listening beyond this machine without a token here: said, not refused (a private network may be meant;
    # the cluster's nodes may have the token); a config that require_auth is refused by its replicas there
    capsys.readouterr()
    monkeypatch.delenv(served.TOKEN_ENV)
    assert cli._serve_config(parser.parse_args(["deploy", "--config", path]))[0].require_auth
    assert "warning: the app listens on 0.0.0.0:8000 without auth" in capsys.readouterr().err
    cli._serve_config(parser.parse_args(["serve"]))
    assert "without auth" not in capsys.readouterr().err  # 127.0.0.1


def test_an_ingress_replica_without_a_token_refuses_to_start_where_required_else_warns(monkeypatch, caplog):
    """`serve deploy` of a file without a token, on nodes without the variable (the token came only with
    the pipeline's job), replaced a protected app with one that answers anyone, saying nothing."""
    monkeypatch.delenv(served.TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="require_auth: the app has no token"):
        served.replica_token_digest(served.ServeConfig(model="m", require_auth=True))
    assert served.replica_token_digest(served.ServeConfig(model="m")) is None
    assert "the API answers without auth" not in caplog.text, "listening on this machine alone (the demo)"
    assert served.replica_token_digest(served.ServeConfig(model="m", host="0.0.0.0")) is None
    assert "the API answers without auth" in caplog.text
    monkeypatch.setenv(served.TOKEN_ENV, "on-the-node")  # where the replica runs (KubeRay's pods)
    assert served.replica_token_digest(served.ServeConfig(model="m", require_auth=True)) == \
        hashlib.sha256(b"on-the-node").hexdigest()


def test_the_token_can_come_from_a_mounted_secret_file(tmp_path):
    (tmp_path / "token").write_text("from-a-secret\n")
    settings = served.ServeConfig(auth_token_file=str(tmp_path / "token"))
    assert settings.token_digest() == hashlib.sha256(b"from-a-secret").hexdigest()
    assert settings.stored() == settings, "only the file's path is stored, never the token"
    with pytest.raises(ValueError, match="auth_token_file: cannot read the token"):
        served.ServeConfig(auth_token_file=str(tmp_path / "absent")).token_digest()
    with pytest.raises(ValueError, match="auth_token_file: cannot read the token"):  # the replica does not start
        ingress = served.Ingress.__mro__[1]  # the class as written, under the wrapper @serve.ingress makes
        ingress(None, None, {"auth_token_file": str(tmp_path / "absent")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="auth_token_file: .*empty is empty"):
        served.ServeConfig(auth_token_file=str(tmp_path / "empty")).token_digest()


def test_a_running_app_is_reloaded_only_when_it_runs_the_wanted_settings():
    wanted = served.ServeConfig(model="models:/clip@champion", auth_token="s3cret", port=8123)
    stored = wanted.stored()  # what Serve keeps and `deployed_config` reads back: the token's digest
    assert stored.auth_token is None and rollout.runs_as(stored, wanted)
    assert rollout.runs_as(stored.model_copy(update={"port": 8000}), wanted), "Serve's port is fixed when it starts"
    assert not rollout.runs_as(stored.model_copy(update={"model": "models:/other@champion"}), wanted)
    assert not rollout.runs_as(stored.model_copy(update={"max_batch_size": 2}), wanted)
    assert not rollout.runs_as(served.ServeConfig(model="models:/clip@champion", auth_token="other").stored(), wanted)


def test_a_rollout_whose_replicas_are_slow_is_put_back_and_tried_again_less_often_not_passed_over(monkeypatch, capsys):
    """Towers not ready on the new version within the timeout (a cluster still adding a GPU node) are put
    back on the version the ingress serves, as for one they cannot load; but the version is not known to be
    broken, so the registry poll tries it again rather than passing it over for good."""
    v1, v2 = {"model": "models:/clip/1"}, {"model": "models:/clip/2"}
    applied = []
    monkeypatch.setattr(rollout, "_apply", lambda name, app: applied.append(
        {d["name"]: d["user_config"]["model"] for d in app["deployments"]}))

    def wait(name, user_configs, timeout_s):
        if v2 in user_configs.values():
            raise TimeoutError(f"Serve application {name!r} not running after {timeout_s:g} s (status DEPLOYING)")

    monkeypatch.setattr(rollout, "_wait", wait)
    with pytest.raises(rollout.NotReady, match=r"not ready on models:/clip/2 within 5 s, so they were put back on "
                                               r"models:/clip/1") as raised:
        rollout._roll("rayclip", {"deployments": []}, v2, v1, timeout_s=5)
    assert not isinstance(raised.value, rollout.CannotLoad) and raised.value.model == "models:/clip/2"
    back = {tower: "models:/clip/1" for tower in served.TOWERS} | {served.INGRESS: "models:/clip/1"}
    assert applied[-1] == back, applied

    import threading

    from workflows import cli

    calls, stopping = [], threading.Event()

    def reload(name, model, echo, skip):  # as the real one: a version in `skip` is not tried
        calls.append("models:/clip/2" not in skip)
        if len(calls) == 15:
            stopping.set()
        if calls[-1]:
            raise rollout.NotReady("rayclip: the towers were not ready on models:/clip/2", "models:/clip/2")

    monkeypatch.setattr(rollout, "reload", reload)
    cli._follow_registry(stopping, 0.01, "rayclip", now=True)  # the first try, at once, does not stop it either
    # tried at once, then after 1, 3 and 7 polls passed over: not loaded on every tower at every poll
    assert [poll for poll, tried in enumerate(calls) if tried] == [0, 2, 6, 14], calls
    out = capsys.readouterr().out
    assert "tried 3 time(s); the poll tries it again in 0.08 s" in out and out.count("tried ") == 4


def _serve_details(status: str, models: dict[str, str], message: str = "", **statuses: str) -> dict:
    """Serve's details of the app as rollout._application reads them: `models` maps each deployment to its
    user_config's model, `statuses` the deployments that are not HEALTHY."""
    return {"status": status, "message": message, "deployments": {
        name: {"status": statuses.get(name, "HEALTHY"), "deployment_config": {"user_config": {"model": model}},
               "message": "failed to start 3 times in a row" if name in statuses else ""}
        for name, model in models.items()}}


def test_a_rollout_fails_fast_only_on_the_deployments_it_rolls_not_on_another_one_being_unhealthy(monkeypatch):
    """Serve marks the whole app UNHEALTHY or DEPLOY_FAILED when any deployment is (an Index replica
    OOM-killed, a node lost): that says nothing of the version being rolled, which must not be passed
    over as one the towers cannot load."""
    v1, v2 = {"model": "models:/clip/1"}, {"model": "models:/clip/2"}
    states = []
    monkeypatch.setattr(rollout, "_apply", lambda name, app: None)
    monkeypatch.setattr(rollout, "_application", lambda name: states.pop(0) if len(states) > 1 else states[0])

    def models(towers_on: str, ingress_on: str) -> dict[str, str]:
        return {**dict.fromkeys(served.TOWERS, towers_on), served.INGRESS: ingress_on, served.INDEX: "models:/clip/1"}

    states[:] = [_serve_details("UNHEALTHY", models("models:/clip/1", "models:/clip/1"),
                                "The deployments ['Index'] are UNHEALTHY.", Index="UNHEALTHY"),
                 _serve_details("DEPLOY_FAILED", models("models:/clip/2", "models:/clip/1"),
                                "Failed to update the deployments ['Index'].", Index="DEPLOY_FAILED",
                                ImageTower="UPDATING"),
                 _serve_details("RUNNING", models("models:/clip/2", "models:/clip/2"))]
    rollout._roll("rayclip", {"deployments": []}, v2, v1, timeout_s=5)
    assert states == [_serve_details("RUNNING", models("models:/clip/2", "models:/clip/2"))]

    # one the rollout waits on that Serve gave up on: the towers cannot load it, and the reason is told
    states[:] = [_serve_details("DEPLOY_FAILED", models("models:/clip/2", "models:/clip/1"),
                                "Failed to update the deployments ['TextTower'].", TextTower="DEPLOY_FAILED"),
                 _serve_details("RUNNING", models("models:/clip/1", "models:/clip/1"))]
    with pytest.raises(rollout.CannotLoad, match=r"Serve gave up on TextTower of application 'rayclip': TextTower: "
                                                 "failed to start 3 times"):
        rollout._roll("rayclip", {"deployments": []}, v2, v1, timeout_s=5)

    # the Index unhealthy for good: the towers healthy on the new version are rolled all the same
    states[:] = [_serve_details("UNHEALTHY", models("models:/clip/2", "models:/clip/2"),
                                "The deployments ['Index'] are UNHEALTHY.", Index="UNHEALTHY")]
    rollout._roll("rayclip", {"deployments": []}, v2, v1, timeout_s=5)
    # towers not ready at the deadline, and not back in time either: not ready all the same (a RolloutFailed,
    # which the registry poll backs off from), not a bare TimeoutError the poll retries at once
    states[:] = [_serve_details("UNHEALTHY", models("models:/clip/2", "models:/clip/1"),
                                "The deployments ['Index'] are UNHEALTHY.", Index="UNHEALTHY", ImageTower="UPDATING")]
    with pytest.raises(TimeoutError, match=r"status UNHEALTHY: The deployments \['Index'\] are UNHEALTHY"):
        rollout._wait("rayclip", dict.fromkeys(served.TOWERS, v2), timeout_s=0.3)
    with pytest.raises(rollout.NotReady, match=r"not ready on models:/clip/2 within 0.3 s, and putting them back on "
                                               r"models:/clip/1 \(which the ingress still serves\) did not finish"):
        rollout._roll("rayclip", {"deployments": []}, v2, v1, timeout_s=0.3)

    # an app Serve could not build (an import failing on the cluster) is about what was applied
    states[:] = [_serve_details("DEPLOY_FAILED", models("models:/clip/1", "models:/clip/1"),
                                "Traceback ...\nModuleNotFoundError: No module named 'deploy'")]
    with pytest.raises(rollout.DeployError, match="could not build application 'rayclip': Traceback"):
        rollout._wait("rayclip", dict.fromkeys(served.TOWERS, v2), timeout_s=5)


def _classify_load(url: str, payload: dict, during) -> tuple[list[tuple[float, int, dict]], float]:
    """Four clients sending `payload` back to back while `during()` runs in a thread, each until two of its
    requests began after `during` returned: ((start time, status, body) per request, when `during` returned)."""
    async def run():
        results, finished = [], []
        loop = asyncio.get_running_loop()

        async def client_loop(client):
            after = 0
            while after < 2:
                started = loop.time()
                response = await client.post("/v1/classify", json=payload)
                results.append((started, response.status_code, response.json()))
                after += bool(finished) and started > finished[0]

        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
            loops = [asyncio.create_task(client_loop(client)) for _ in range(4)]
            await asyncio.to_thread(during)
            finished.append(loop.time())
            await asyncio.gather(*loops)
        return results, finished[0]

    return asyncio.run(run())


def test_alias_moves_and_the_app_rolls_to_the_new_version_under_load_without_a_failed_request(app, tmp_path,
                                                                                              monkeypatch):
    tracking, labels = app["tracking"], ["red circle", "blue square", "green triangle"]
    clip_core.save_checkpoint(briefly_trained(steps=5), tmp_path / "v2")
    quiet = lambda *_: None  # noqa: E731
    registry.register(str(tmp_path / "v2"), "clip-serve", metrics={"zeroshot": {"top1": 0.6, "digest": "sha256:x"}},
                      tracking_uri=tracking, echo=quiet)
    registry.promote("clip-serve", tracking_uri=tracking, echo=quiet)
    image = _images(1, seed=13)[0]
    expected = {}
    for version, model in (("1", app["model"]), ("2", clip_core.load_model(tmp_path / "v2"))):
        classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), labels)
        probs, _ = clip_core.predict(model, clip_core.image_transform(64)(image)[None], classifier, top_k=3)
        expected[version] = sorted(probs[0].tolist(), reverse=True)
    payload = {"images": [_png(image)], "labels": labels, "top_k": 3}

    try:
        results, finished = _classify_load(app["url"], payload, lambda: rollout.reload(echo=quiet))
        statuses = collections.Counter(status for _, status, _ in results)
        assert statuses == {200: len(results)}, statuses
        versions = [body["model"]["version"] for _, _, body in results]
        assert set(versions) == {"1", "2"}, collections.Counter(versions)
        assert all(body["model"]["version"] == "2" for started, _, body in results if started > finished)
        for _, _, body in results:  # each answer entirely from one version: towers never mixed
            scores = [r["score"] for r in body["results"][0]]
            assert scores == pytest.approx(expected[body["model"]["version"]], abs=1e-4)
        info = httpx.get(app["url"] + "/v1/model", headers=AUTH).json()
        assert (info["version"], info["alias"], info["metrics"]["zeroshot.top1"]) == ("2", "champion", "0.6")
        # deploying the same config again (`rayclip deploy --config`) serves what the alias names, not the
        # version the app was first built on (Serve does not rebuild an app whose args are unchanged)
        rollout.deploy(app["config"])
        assert httpx.get(app["url"] + "/v1/model", headers=AUTH).json()["version"] == "2"
        assert _post(app, "/v1/classify", payload).json()["model"]["version"] == "2"
        # the index holds version 1's embeddings: searching them with version 2's queries would mean nothing
        response = _post(app, "/v1/search", {"text": "a red circle"})
        assert (response.status_code, response.json()["error"]["type"]) == (409, "index_model_mismatch")
        assert "clip-serve version 2" in response.json()["error"]["message"]
        # a version that cannot be loaded (here, the artifact store holds other weights than were registered)
        # is found out before any replica is asked to load it: they would stop, and their replacements fail too
        registry.register(str(tmp_path / "v2"), "clip-serve", metrics={"zeroshot": {"top1": 0.6,
                          "digest": "sha256:x"}}, tracking_uri=tracking, echo=quiet)
        registry.client(tracking).set_model_version_tag("clip-serve", "3", "weights_sha256", "0" * 64)
        registry.promote("clip-serve", "3", force=True, tracking_uri=tracking, echo=quiet)
        with pytest.raises(rollout.CannotLoad, match=r"models:/clip-serve/3 cannot be loaded, so the app keeps "
                                                     r"serving models:/clip-serve/2: .*other weights"):
            rollout.reload(echo=quiet)
        assert _post(app, "/v1/classify", payload).json()["model"]["version"] == "2"
        # one the driver could load but the replicas cannot (they run elsewhere): the towers' replicas stop
        # and their replacements fail, so the towers are put back on the version the ingress still serves
        with monkeypatch.context() as patch:
            patch.setattr(rollout, "load_served_model", lambda *args, **kwargs: None)
            with pytest.raises(rollout.CannotLoad, match=r"the towers could not load models:/clip-serve/3, so they "
                                                         r"were put back on models:/clip-serve/2"):
                rollout.reload(echo=quiet)
        assert _post(app, "/v1/classify", payload).json()["model"]["version"] == "2"
        assert _post(app, "/v1/embed/text", {"texts": ["a red circle"]}).status_code == 200
        # the command line follows the alias: `rayclip deploy --reload --poll-registry`, its own driver on
        # this test session's Ray (as it would run as a Ray job beside `serve deploy`); it tries the version
        # that cannot be loaded once, not at every poll, and follows the alias back to version 1
        unloadable = "the poll will not try models:/clip-serve/3 again"

        def back_to_version_1():
            for _ in range(2):  # 3 → 2 → 1
                registry.rollback("clip-serve", tracking_uri=tracking, echo=quiet)

        log = _follow_the_registry_while(app, unloadable, back_to_version_1, tmp_path)
        assert log.count("cannot be loaded") == 1, log[-3000:]
        assert "deploy: rayclip: rolling models:/clip-serve/2 → models:/clip-serve/1" in log, log[-3000:]
    finally:  # the next tests find version 1, whatever failed here
        if str(registry.client(tracking).get_model_version_by_alias("clip-serve", "champion").version) != "1":
            registry.rollback("clip-serve", tracking_uri=tracking, echo=quiet)
        rollout.reload(echo=quiet)
    assert _post(app, "/v1/classify", payload).json()["model"]["version"] == "1"


def _follow_the_registry_while(app, said: str, move_alias, tmp_path) -> str:
    """Runs `rayclip deploy --reload --poll-registry` in a subprocess, calls `move_alias()` once it has
    printed `said`, waits until /v1/model reports version 1, stops it with SIGTERM; returns its output."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    path = tmp_path / "follow.log"
    with open(path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "workflows.cli", "deploy", "--reload", "--poll-registry",
                                    "0.5"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 180

    def wait_for(condition, what: str) -> None:
        while not condition():
            assert process.poll() is None, path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{what} in 180 s: {path.read_text()[-3000:]}"
            time.sleep(0.2)

    try:
        wait_for(lambda: said in path.read_text(), f"the follower did not say {said!r}")
        move_alias()
        wait_for(lambda: httpx.get(app["url"] + "/v1/model", headers=AUTH).json()["version"] == "1",
                 "the app did not roll to version 1")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    return path.read_text()


def test_a_killed_tower_replica_is_replaced_under_load_and_only_requests_in_flight_may_fail(app, record_property):
    import time

    import ray

    payload = {"images": [_png(_images(1, seed=17)[0])], "labels": ["red circle", "blue square"], "top_k": 2}
    prefix = f"SERVE_REPLICA::{served.APP_NAME}#ImageTower#"

    def kill_and_wait_for_the_replacement():
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 180
        while not any(r["state"] == "RUNNING" and r["replica_id"] != name.removeprefix(prefix)
                      for r in rollout._application(served.APP_NAME)["deployments"]["ImageTower"]["replicas"]):
            assert time.monotonic() < deadline, "Serve did not replace the killed replica in 180 s"
            time.sleep(0.2)

    results, finished = _classify_load(app["url"], payload, kill_and_wait_for_the_replacement)
    failed = [(status, body) for _, status, body in results if status != 200]
    record_property("failed_requests", f"{len(failed)} of {len(results)}")
    # at most the four clients' requests in flight at the kill fail, each with a JSON 503 to retry on
    assert len(failed) <= 4, failed
    assert all(status == 503 and body["error"]["type"] == "replica_lost" for status, body in failed), failed
    assert all(status == 200 for started, status, _ in results if started > finished)
