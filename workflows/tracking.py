"""MLflow helpers every stage shares."""

from __future__ import annotations


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
    import os

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
