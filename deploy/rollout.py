"""Operating the Serve application on a cluster: start Serve and deploy the app (deploy/serve.py) from
a config as `serve deploy` does, roll it to another model version without dropping a request, and read
what runs. Through Serve's controller, so it works from any driver connected to the cluster."""

from __future__ import annotations

import time
from collections.abc import Collection

from ray import serve

from .serve import APP_NAME, IMPORT_PATH, INGRESS, TOWERS, ServeConfig, live_model, load_served_model


# Ray Serve's high-throughput mode (Ray >= 2.55): HAProxy instead of Serve's Python proxy, sending HTTP
# straight to the ingress replicas ("direct ingress"), and gRPC between replicas. Ray reads these when its
# Serve processes start: set them in the nodes' environment (a local Ray that `rayclip serve` starts
# inherits the caller's). bench/bench_serve.py measures both proxies; docs/scaling.md has the figures.
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


class DeployError(ValueError):
    """The Serve application is not in a state the command can work with; the message says why."""


class RolloutFailed(DeployError):
    """A rollout to `model` (an exact version) did not happen; the app serves what it served."""

    def __init__(self, message: str, model: str):
        super().__init__(message)
        self.model = model


class CannotLoad(RolloutFailed):
    """A rollout found that `model` cannot be loaded."""


class NotReady(RolloutFailed):
    """A rollout's replicas were not ready on `model` in time (replicas still starting: a node being
    added, a slow download); the app serves what it served, and a later try may succeed."""


def deploy_file_options(document: dict, name: str = APP_NAME, source: str = "the serve config") -> tuple[dict, str]:
    """A `serve deploy` file (deploy/serve_config.yaml) → app `name`'s ServeConfig fields, with
    `http_options`' host and port, and its route prefix."""
    apps = {app.get("name"): app for app in document.get("applications") or []}
    if name not in apps:
        raise ValueError(f"{source} has no application {name!r}, only {sorted(map(str, apps))}: choose one with --name")
    app = apps[name]
    if app.get("import_path") != IMPORT_PATH:
        raise ValueError(f"application {name!r} in {source} imports {app.get('import_path')!r}, not {IMPORT_PATH!r}")
    uncarried = sorted(set(app) - {"name", "route_prefix", "import_path", "args"})
    if uncarried:  # dropping them silently would deploy another app than the file describes
        raise ValueError(f"application {name!r} in {source} sets {', '.join(uncarried)}, which `rayclip deploy` "
                         f"does not carry (it deploys the args): deploy the file with `serve deploy {source}`, or "
                         "move those settings into args")
    http = document.get("http_options") or {}
    return {**{key: http[key] for key in ("host", "port") if key in http}, **(app.get("args") or {})}, \
        app.get("route_prefix", "/")


def start(config: ServeConfig, *, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Start Serve on `config.host:port` (joining or starting Ray), deploy the app and wait until it
    runs; returns its URL."""
    from workflows.runtime import init_ray

    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port}, logging_config={"log_level": config.log_level})
    deploy(config, name=name, route_prefix=route_prefix)
    return f"http://{config.host}:{config.port}{route_prefix.rstrip('/')}"


def stop(name: str = APP_NAME) -> None:
    """Take app `name` down as its command ends: Serve with it where this process started Ray itself, only
    the app on a cluster it joined (RAY_ADDRESS, or `ray start`'s on this node), where other apps keep
    running."""
    from workflows.runtime import joined_cluster

    if joined_cluster():
        serve.delete(name)
    else:
        serve.shutdown()


def deploy(config: ServeConfig, *, name: str = APP_NAME, route_prefix: str = "/", timeout_s: float = 600) -> None:
    """Deploy (or replace) app `name` on the running Serve as `serve deploy` does (from a config, so that
    a rollout can reconfigure its replicas in place), and wait until it runs."""
    if config.index:  # a missing index fails here, not as replicas that never start
        from workflows.embed import read_embeddings_manifest

        read_embeddings_manifest(config.index)
    # every deployment on the version the model URI names now: Serve rebuilds an app only when its args
    # change, so deploying the same config again after a reload would otherwise put the replicas back on
    # the version resolved when the app was first built
    _roll(name, app_spec(config, name, route_prefix), live_model(config.model, config.mlflow_tracking_uri),
          _user_config(_application(name), INGRESS), timeout_s)


def app_spec(config: ServeConfig, name: str = APP_NAME, route_prefix: str = "/") -> dict:
    """The application as Serve's deploy config holds it (one entry of serve_config.yaml's `applications`)."""
    return {"name": name, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
            "args": config.stored().model_dump(mode="json", exclude_defaults=True),
            "logging_config": {"enable_access_log": config.access_log, "log_level": config.log_level}}


def reload(name: str = APP_NAME, model: str | None = None, *, timeout_s: float = 600, echo=print,
           skip: Collection[str] = ()) -> dict:
    """Roll app `name` to the version its model URI names now (after `rayclip promote` moved the alias),
    or to `model`, without dropping a request: the towers load it beside the old one and report ready,
    then the ingress switches. Returns the live model ({"model", "alias"}); a no-op when unchanged or
    when the version is one of `skip`. Raises CannotLoad when the version cannot be loaded."""
    running = _application(name)
    if not running.get("deployed_app_config"):
        raise DeployError(f"no Serve application {name!r} deployed from a config on this cluster: start it with "
                          "`rayclip serve`, `rayclip deploy` or `serve deploy deploy/serve_config.yaml`")
    app = running["deployed_app_config"]
    config = ServeConfig(**app["args"])
    target = live_model(model or config.model, config.mlflow_tracking_uri)
    current = _user_config(running, INGRESS)
    if current == target or target["model"] in skip:
        return current
    echo(f"deploy: {name}: rolling {current and current['model']} → {target['model']}")
    try:  # here first: a replica that cannot load it stops, and its replacements fail the same way
        load_served_model(target["model"], config.mlflow_tracking_uri, quick_gelu=config.quick_gelu)
    except Exception as exc:
        from workflows.tracking import redact

        raise CannotLoad(f"{name}: {target['model']} cannot be loaded, so the app keeps serving "
                         f"{current and current['model']}: {redact(str(exc))[:1000]}", target["model"]) from exc
    _roll(name, app, target, current, timeout_s)
    echo(f"deploy: {name} serves {target['model']}")
    return target


def _roll(name: str, app: dict, target: dict, current: dict | None, timeout_s: float) -> None:
    """Apply `app` with every deployment on `target`. Where the ingress runs another version (`current`),
    the towers first (the ingress kept on `current`), so it never asks them for a version they lack; if
    they cannot load `target` (a replica whose reconfigure fails is stopped, and its replacements fail the
    same way), they are put back on `current` before the error is raised, and the app serves it again:
    CannotLoad when Serve gave up on them, NotReady when they were only not ready within `timeout_s`."""
    overrides = {d["name"]: d for d in app.get("deployments", [])}

    def pin(deployments, user_config: dict) -> None:
        for deployment in deployments:
            overrides[deployment] = {**overrides.get(deployment, {}), "name": deployment, "user_config": user_config}

    def apply(deployments, user_config: dict) -> None:
        pin(deployments, user_config)
        app["deployments"] = list(overrides.values())
        _apply(name, app)
        _wait(name, dict.fromkeys(deployments, user_config), timeout_s)

    if current in (None, target):
        return apply((*TOWERS, INGRESS), target)
    pin((INGRESS,), current)
    try:
        apply(TOWERS, target)
    except (TimeoutError, DeployError) as exc:
        try:
            apply(TOWERS, current)
            back = f"so they were put back on {current['model']}, which the app serves again"
        except (TimeoutError, DeployError) as failed:  # still a RolloutFailed: the follower backs off
            back = (f"and putting them back on {current['model']} (which the ingress still serves) did not "
                    f"finish: {failed}")
        if isinstance(exc, TimeoutError):  # not proof the version is broken: the cluster may still be adding nodes
            raise NotReady(f"{name}: the towers were not ready on {target['model']} within {timeout_s:g} s, {back}; "
                           "try again (a longer timeout, or once the cluster has the resources): "
                           f"{exc}", target["model"]) from exc
        raise CannotLoad(f"{name}: the towers could not load {target['model']}, {back}: {exc}",
                         target["model"]) from exc
    apply((INGRESS,), target)


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def deployed_config(name: str = APP_NAME) -> ServeConfig | None:
    """The ServeConfig app `name` runs with on this cluster (as stored: the token as its digest); None
    when Serve is not running or the app was not deployed from a config."""
    try:
        app = _application(name).get("deployed_app_config")
    except Exception:  # noqa: BLE001 - Serve not started on this cluster
        return None
    return ServeConfig(**app["args"]) if app else None


def runs_as(running: ServeConfig, wanted: ServeConfig) -> bool:
    """Whether an app running with `running` already is `wanted`, apart from where Serve listens (fixed
    when Serve started): then a new champion is a `reload`, else the app must be deployed again."""
    where = {"host": wanted.host, "port": wanted.port}
    return running.model_copy(update=where) == wanted.stored()


def _details() -> dict:
    return _client().get_serve_details()


def _application(name: str) -> dict:
    """Serve's details of app `name` (status, deployments, the config it was deployed from); {} if none."""
    return _details().get("applications", {}).get(name) or {}


def _user_config(app: dict, deployment: str) -> dict | None:
    return ((app.get("deployments", {}).get(deployment) or {}).get("deployment_config") or {}).get("user_config")


def _apply(name: str, app: dict) -> None:
    """Deploy `app`, keeping the other config-deployed applications as they are."""
    from ray.serve.schema import ServeDeploySchema

    others = [a["deployed_app_config"] for key, a in _details().get("applications", {}).items()
              if key != name and a.get("deployed_app_config")]
    _client().deploy_apps(ServeDeploySchema(applications=[*others, app]))


def _wait(name: str, user_configs: dict[str, dict], timeout_s: float) -> None:
    """Until app `name` has deployed (Serve calls it DEPLOYING from the apply on) with every deployment in
    `user_configs` healthy on that user_config. A DeployError only for what was applied: Serve gave up on
    one of those deployments, or could not build the app. An app UNHEALTHY or DEPLOY_FAILED through
    another deployment (an Index replica OOM-killed, a lost node) says nothing of the version being rolled:
    that is waited out, ending at most in a TimeoutError (NotReady, tried again)."""
    deadline = time.monotonic() + timeout_s
    while True:
        app = _application(name)
        status, deployments = app.get("status"), app.get("deployments", {})
        if status == "DEPLOY_FAILED":  # a deployment's own status may still be the last deploy's until then
            failed = [d for d in user_configs if (deployments.get(d) or {}).get("status") == "DEPLOY_FAILED"]
            if failed:
                reasons = "; ".join(f"{d}: {deployments[d].get('message', '')}" for d in failed)
                raise DeployError(f"Serve gave up on {', '.join(failed)} of application {name!r}: "
                                  f"{reasons[-2000:]}")
            if all(d.get("status") != "DEPLOY_FAILED" for d in deployments.values()):
                raise DeployError(f"Serve could not build application {name!r}: {app.get('message', '')[-2000:]}")
        if status in ("RUNNING", "UNHEALTHY") and all(
                (deployments.get(d) or {}).get("status") == "HEALTHY" and _user_config(app, d) == wanted
                for d, wanted in user_configs.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve application {name!r} not running after {timeout_s:g} s (status {status}"
                               + (f": {app['message'][-500:]})" if app.get("message") else ")"))
        time.sleep(0.2)
