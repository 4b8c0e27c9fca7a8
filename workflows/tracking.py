"""MLflow helpers every stage shares."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

from . import storage

# MLflow's HTTP client retries with exponential backoff; its defaults (7 retries, factor 2, 120 s
# timeout) keep a command waiting about 4 minutes on a tracking server that is down. Ours give up
# after ~30 s (5 retries: 0, 2, 4, 8, 16 s, a 503's Retry-After respected); MLflow's variables,
# set by the user, win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
for _key, _value in HTTP_RETRY_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

_USERINFO = re.compile(r"(?<=://)[^/\s]*@")  # to the last @ before the path: a password may hold a raw @


def redact(text: str) -> str:
    """`text` with the credentials of any URI in it (`scheme://user:password@host`) replaced by `***`."""
    return _USERINFO.sub("***@", text)


def without_credentials(uri: str | None) -> str | None:
    """`uri` without its `user:password@` (MLflow then takes them from $MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    return _USERINFO.sub("", uri) if uri else uri


def guard_output(uri: str | None) -> None:
    """Before MLflow is pointed at `uri`: MLflow prints a "View run ... at" link as a run ends, with the
    tracking host as given, so for a URI that holds credentials it would print the password (into a Ray
    job's log, say); those lines are turned off in this process then ($MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
    unless set)."""
    if uri and redact(uri) != uri:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def redacted(value):
    """A copy of a JSON-like value (a dumped config) with every URI's credentials redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(item) for item in value)
    return value


def is_mlflow_error(exc: BaseException) -> bool:
    """Whether `exc` is MLflow's (a server that is down, refuses the credentials, or fails), without
    importing MLflow for the question."""
    errors = sys.modules.get("mlflow.exceptions")
    return errors is not None and isinstance(exc, errors.MlflowException)


def is_missing(exc: BaseException) -> bool:
    """Whether an MLflow error says the run, model or version asked for does not exist (and not that
    the server could not be asked)."""
    return is_mlflow_error(exc) and getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


# MLflow's answers to a request it understood and refused: the server is up, the request is what to change
REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
           "BAD_REQUEST"}


def failure(exc: BaseException) -> str:
    """One line for an MLflow failure: what MLflow said (credentials redacted) and what to do."""
    said = redact(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if getattr(exc, "error_code", None) in REFUSED:
        return f"MLflow refused the request: {said[:600]}"
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    return (f"MLflow failed: {said[:600]} (after up to {retries} retries, $MLFLOW_HTTP_REQUEST_MAX_RETRIES): check "
            "that the tracking server is up and, for an authenticating server, $MLFLOW_TRACKING_USERNAME and "
            "$MLFLOW_TRACKING_PASSWORD; then run the command again")


def run_exists(run_id: str) -> bool:
    """Whether `run_id` is a live run in the current tracking store (a checkpoint may come from another)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:  # a deleted run (in the UI's trash) cannot be reopened: missing too
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException as exc:
        if is_missing(exc):
            return False
        raise


def sqlite_uri(path: str) -> str:
    """The tracking URI of the sqlite database at `path`, made absolute and quoted: SQLAlchemy reads a
    '?' in the path as the start of options and unquotes '%20'."""
    import urllib.parse

    return "sqlite:///" + urllib.parse.quote(os.path.abspath(path))


def sqlite_path(uri: str) -> str | None:
    """The database file a sqlite tracking URI names (as SQLAlchemy, and so MLflow, reads it); None for
    another kind of URI."""
    if not uri.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine import make_url

    return make_url(uri).database


def set_experiment(name: str):
    """`mlflow.set_experiment`, except that a new experiment in a sqlite store keeps its artifacts
    beside the database (`<db dir>/mlartifacts`) instead of MLflow's default `./mlruns` in
    whatever directory the process happens to run in."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    database = sqlite_path(uri)
    if database and mlflow.get_experiment_by_name(name) is None:
        location = Path(database).resolve().parent / "mlartifacts"
        try:
            mlflow.create_experiment(name, artifact_location=location.as_uri())
        except MlflowException:
            pass  # created meanwhile by another process
    return mlflow.set_experiment(name)


def start_run(run_id: str | None, experiment: str, run_name: str, tags: dict | None = None):
    """`mlflow.start_run` into `run_id` when it is a run of this tracking store (a checkpoint may name a run
    of another), else into a new run `run_name` with `tags` in `experiment`; inside an active run (the
    pipeline's), nested in it."""
    import mlflow

    from mlflow.tracking import fluent

    nested = mlflow.active_run() is not None
    # MLflow reopens a run only in the active experiment: a rerun after `mlflow.experiment` changed finds
    # the checkpoint's run in the old one, and logs into a new run of the pipeline's instead
    if run_id and run_exists(run_id) and fluent._active_experiment_id in (
            None, mlflow.MlflowClient().get_run(run_id).info.experiment_id):
        return mlflow.start_run(run_id=run_id, nested=nested)
    if not nested:
        set_experiment(experiment)
    return mlflow.start_run(run_name=run_name, tags=tags, nested=nested)


@contextlib.contextmanager
def log_into(run_id: str | None, experiment: str, run_name: str, tags: dict | None = None):
    """`start_run`'s block for a stage that logs into a run another stage made (register and evaluate into
    the checkpoint's train run): when the block ends, that run's status and end time are put back as they
    were, so a registration that fails does not mark a finished training run FAILED, nor one still training
    end."""
    import mlflow

    before = mlflow.MlflowClient().get_run(run_id).info if run_id and run_exists(run_id) else None
    active = start_run(run_id, experiment, run_name, tags)
    try:
        with active:
            yield active
    finally:
        if before is not None and active.info.run_id == before.run_id:
            client = mlflow.MlflowClient()
            if before.status == "RUNNING":
                client.update_run(run_id, status="RUNNING")
            else:
                client.set_terminated(run_id, status=before.status, end_time=before.end_time)


@contextlib.contextmanager
def using(uri: str | None):
    """MLflow's tracking and registry URIs set to `uri` for the block, then put back as they were, with
    the active experiment and $MLFLOW_TRACKING_URI, $MLFLOW_REGISTRY_URI and $MLFLOW_EXPERIMENT_ID (which
    MLflow's setters also write): a pipeline run in a longer-lived process (a notebook, a test session)
    leaves MLflow pointing where it did. `None` keeps whatever MLflow points at."""
    if not uri:
        yield
        return
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_state  # no public way to read "unset"
    from mlflow.tracking._tracking_service import utils as tracking_state

    saved_tracking, saved_registry = tracking_state._tracking_uri, registry_state._registry_uri
    saved_experiment = fluent._active_experiment_id
    guard_output(uri)
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                                                      "MLFLOW_EXPERIMENT_ID")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)  # None unsets it
        registry_state._registry_uri = saved_registry
        fluent._active_experiment_id = saved_experiment
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def dataset_input(uri: str, digest: str):
    """An MLflow dataset input for the prepared set at `uri`, named by its last path part, with its
    content digest (`sha256:...`, shortened to MLflow's 36 characters)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow warns that a meta dataset has no schema
        warnings.simplefilter("ignore", UserWarning)
        return MetaDataset(source=resolve_dataset_source(uri), name=storage.basename(uri),
                           digest=digest.removeprefix("sha256:")[:36])


def flat_params(values: dict, prefix: str = "") -> dict:
    """A nested config as MLflow params: `section.key` names, lists as JSON."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def rayclip_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rayclip")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The commit of the checkout rayclip runs from, when it runs from one (not that of a repository it is
    installed into: a virtualenv inside a user's project)."""
    here = Path(__file__).resolve().parent
    try:
        top, commit = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
                                     check=True, cwd=here).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None
    return commit if Path(top).resolve() == here.parent else None
