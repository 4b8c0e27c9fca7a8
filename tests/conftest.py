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
