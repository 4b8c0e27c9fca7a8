"""MLflow helpers every stage shares."""

from __future__ import annotations

import contextlib
import os


def run_exists(run_id: str) -> bool:
    """Whether `run_id` is a run in the current tracking store (a checkpoint may come from another)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


def set_experiment(name: str):
    """`mlflow.set_experiment`, except that a new experiment in a sqlite store keeps its artifacts
    beside the database (`<db dir>/mlartifacts`) instead of MLflow's default `./mlruns` in
    whatever directory the process happens to run in."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        database = uri.removeprefix("sqlite:///")
        location = os.path.join(os.path.dirname(os.path.abspath(database)), "mlartifacts")
        try:
            mlflow.create_experiment(name, artifact_location=f"file://{location}")
        except MlflowException:
            pass  # created meanwhile by another process
    return mlflow.set_experiment(name)


def start_run(run_id: str | None, experiment: str, run_name: str, tags: dict | None = None):
    """`mlflow.start_run` into `run_id` when it is a run of this tracking store (a checkpoint may name a run
    of another), else into a new run `run_name` with `tags` in `experiment`; inside an active run (the
    pipeline's), nested in it."""
    import mlflow

    nested = mlflow.active_run() is not None
    if run_id and run_exists(run_id):
        return mlflow.start_run(run_id=run_id, nested=nested)
    if not nested:
        set_experiment(experiment)
    return mlflow.start_run(run_name=run_name, tags=tags, nested=nested)


@contextlib.contextmanager
def using(uri: str | None):
    """MLflow's tracking and registry URIs set to `uri` for the block, then put back as they were,
    with $MLFLOW_TRACKING_URI and $MLFLOW_REGISTRY_URI (which MLflow's setters also write): a pipeline
    run in a longer-lived process (a notebook, a test session) leaves MLflow pointing where it did.
    `None` keeps whatever MLflow points at."""
    if not uri:
        yield
        return
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state  # no public way to read "unset"
    from mlflow.tracking._tracking_service import utils as tracking_state

    saved_tracking, saved_registry = tracking_state._tracking_uri, registry_state._registry_uri
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)  # None unsets it
        registry_state._registry_uri = saved_registry
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
