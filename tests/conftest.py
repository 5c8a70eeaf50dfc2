"""Shared fixtures: the shipped tiny model and one quickstart run reused by stage tests."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model():
    from edgetune.models import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from edgetune.models import load_tokenizer

    return load_tokenizer(tiny_model)
