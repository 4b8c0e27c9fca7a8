import contextlib
import dataclasses
import logging
import pathlib
import random

import pytest
import torch

import clip_core
from ports import free_port

# OpenCLIP logs a warning for every model created without pretrained weights
logging.getLogger().setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    random.seed(0)


def _mlflow_globals() -> tuple:
    import os

    import mlflow

    return (mlflow.get_tracking_uri(), mlflow.get_registry_uri(),
            os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))


@pytest.fixture(autouse=True)
def _leaves_mlflow_pointing_where_it_did():
    """Every stage takes its tracking URI as an argument; none may leave MLflow's process-wide URIs
    (or the environment variables MLflow's setters write) changed: the next caller in a notebook or a
    test session would log into the wrong store."""
    before = _mlflow_globals()
    yield
    assert _mlflow_globals() == before, "MLflow's process-wide tracking/registry URI changed"


@pytest.fixture(scope="session")
def tokenize():
    return clip_core.get_tokenizer()


def captions_sample() -> list[str]:
    return ["a dog", "a photo of a small red triangle on a grey background, top left", "", "two cats!"]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; the AWS environment points boto3, pyarrow and Ray's workers at it."""
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole test session (4 logical CPUs: see workflows.runtime)."""
    import os

    import ray

    from workflows.runtime import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture
def s3_bucket(s3_server, request):
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@dataclasses.dataclass(frozen=True)
class MlflowServer:
    uri: str  # tracking URI, http://127.0.0.1:<port>
    log: pathlib.Path  # the server's combined stdout/stderr
    bucket: str | None = None  # moto S3 bucket the server proxies artifacts to, under s3://<bucket>/mlflow
    credentials: tuple[str, str] | None = None  # (user, password) of an authenticating server's admin


@contextlib.contextmanager
def _mlflow_server(tmp: pathlib.Path, artifacts: str, *args: str, env: dict | None = None, **details):
    """A real `mlflow server` subprocess on 127.0.0.1 (sqlite backend, 1 worker) serving its artifacts from
    `artifacts`, ready when this yields."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", *args,
           "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
           "--serve-artifacts", "--artifacts-destination", artifacts,
           "--workers", "1", "--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp / "server.log"
    # MLflow's job runner (GenAI jobs, which the project never submits) starts 8 more processes that take
    # ~40 CPU-s importing mlflow in the minute after the server is ready: off
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)

    def fail(why):
        proc.kill()
        proc.wait()
        pytest.fail(f"mlflow server {why}; log:\n{log_path.read_text(errors='replace')[-5000:]}")

    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            fail(f"exited with {proc.returncode} before becoming ready")
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            fail("not ready after 60 s")
        time.sleep(0.2)
    try:
        yield MlflowServer(uri=uri, log=log_path, **details)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real `mlflow server` proxying artifacts to the moto S3: ``.uri`` (the tracking URI), ``.bucket``
    (artifacts land under ``s3://<bucket>/mlflow/``) and ``.log`` (the server's log file)."""
    import uuid

    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    with _mlflow_server(tmp_path_factory.mktemp("mlflow-server"), f"s3://{bucket}/mlflow",
                        env={"MLFLOW_S3_ENDPOINT_URL": s3_server}, bucket=bucket) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` whose admin is ``.credentials``; unauthenticated requests get 401."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    user, password = "admin", "correct-Horse-battery-9"
    (tmp / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp}/auth.db\n"
        f"admin_username = {user}\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(tmp / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only"}
    with _mlflow_server(tmp, str(tmp / "artifacts"), "--app-name", "basic-auth", env=env,
                        credentials=(user, password)) as server:
        yield server
