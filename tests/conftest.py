import logging
import random

import pytest
import torch

import clip_core

# OpenCLIP logs a warning for every model created without pretrained weights
logging.getLogger().setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    random.seed(0)


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
