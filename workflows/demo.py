"""`rayclip demo`: the embedded default, end to end on this machine.

The whole pipeline on the embedded defaults (local Ray, sqlite MLflow under the work dir, the
built-in synthetic shapes, the `tiny` model on CPU): preprocess → train → evaluate → register →
promote → serve, with the validation pairs embedded for search (unless the config names its own
`data.index`); then a few zero-shot requests to the live service for colour-shape combinations
the model never saw in training, a search, and where to look next.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request

from . import pipeline, synthetic
from .tracking import redact


SEARCH = "a blue star"  # a combination the training set shows


def _post(url: str, route: str, payload: dict, token: str | None) -> list:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"{url}{route}", json.dumps(payload).encode(), headers)
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - our own local server
        return json.loads(response.read())["results"]


def _classify(url: str, images, labels: list[str], token: str | None) -> list[list[dict]]:
    payload = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payload.append(base64.b64encode(buffer.getvalue()).decode())
    return _post(url, "/v1/classify", {"images": payload, "labels": labels, "top_k": 3}, token)


def run_demo(overrides: list[str] = (), *, config_path: str | None = None, keep_serving: bool = False,
             echo=print) -> dict:
    # the demo prints the service's answers itself: no access log line per request (overridable)
    config = pipeline.load_config(config_path, ["serve.access_log=false", "serve.log_level=WARNING", *overrides])
    if config.data.index is None and config.data.val and "index" not in config.serve:
        config = config.model_copy(update={"data": config.data.model_copy(update={"index": config.data.val})})
    outcome = pipeline.run(config, echo=echo)
    zeroshot = outcome.get("metrics", {}).get("zeroshot", {})
    # the chance figure and the questions below are about the built-in held-out shapes, not a config's own set
    heldout = (config.data.zeroshot or "").startswith("synthetic://heldout")
    if "top1" in zeroshot and heldout:
        echo(f"zero-shot top-1 on colour-shape combinations never seen in training: {zeroshot['top1']:.1%} "
             f"(chance {1 / len(synthetic.heldout_class_names()):.1%})")
    elif "top1" in zeroshot:
        classes = zeroshot.get("classes")
        echo(f"zero-shot top-1 on {config.data.zeroshot}: {zeroshot['top1']:.1%}"
             + (f" ({classes} classes, chance {1 / classes:.1%})" if classes else ""))
    if "url" not in outcome:
        return outcome

    _, _, serve_config = pipeline.StageConfigs.build(config)  # the serve settings the pipeline deployed
    token = serve_config.token()
    if heldout:
        size = config.data.preprocess.image_size
        samples = list(synthetic.samples(3, split="heldout", seed=2026, image_size=size))
        outcome["answers"] = _classify(outcome["url"], [s.image for s in samples], synthetic.heldout_class_names(),
                                       token)
        outcome["asked"] = [s.classname for s in samples]
        for sample, answer in zip(samples, outcome["answers"]):
            ranked = ", ".join(f"{a['label']} {a['score']:.0%}" for a in answer)
            echo(f"POST {outcome['url']}/v1/classify  (a {sample.classname}) → {ranked}")
    if "index" in outcome:
        outcome["found"] = _post(outcome["url"], "/v1/search", {"text": SEARCH, "k": 3}, token)
        found = "; ".join(f"{row['caption']} {row['cosine']:.2f}" for row in outcome["found"])
        echo(f"POST {outcome['url']}/v1/search  (\"{SEARCH}\" among the validation images) → {found}")
    tracking = redact(config.tracking_uri())  # printed, and kept in a job's logs
    ui = tracking if tracking.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {tracking}"
    echo("where to look:")
    echo(f"  MLflow UI:   {ui}   (run {outcome['mlflow_run_id']}, "
         f"model {config.registry.name} version {outcome['model_version']})")
    echo(f"  registry:    MLFLOW_TRACKING_URI={tracking} rayclip models {config.registry.name}   "
         "(and promote, rollback, serve)")
    if outcome.get("dashboard"):
        echo(f"  Ray:         dashboard http://{outcome['dashboard']}")
    echo(f"  playground:  {outcome['url']}/   API docs: {outcome['url']}/docs")
    if keep_serving:
        serve_until_interrupted(echo)
    else:
        from deploy import rollout

        rollout.stop()
    return outcome


def serve_until_interrupted(echo) -> None:
    from deploy import rollout

    from .runtime import stop_on_signals

    stopping = stop_on_signals()
    echo("serving until Ctrl-C")
    stopping.wait()
    rollout.stop()
