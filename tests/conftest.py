"""Shared fixtures. One real quickstart run (train -> merge -> export) serves every stage
test that needs a trained model or a bundle, so the suite trains once."""

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


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """``edgetune quickstart`` with its default settings: (table rows, output dir)."""
    from edgetune.quickstart import QuickstartConfig, quickstart

    out = tmp_path_factory.mktemp("quickstart") / "qs"
    rows = quickstart(QuickstartConfig(out=str(out)), log=lambda s: None)
    return rows, out


@pytest.fixture(scope="session")
def task_data(quickstart_run):
    """The bundled smart-home task as the quickstart generated it: (train, heldout)."""
    out = quickstart_run[1]
    return out / "data" / "train.jsonl", out / "data" / "heldout.jsonl"


@pytest.fixture(scope="session")
def merged_model(quickstart_run):
    return quickstart_run[1] / "merged"


@pytest.fixture(scope="session")
def int4_bundle(quickstart_run):
    return quickstart_run[1] / "bundle"


@pytest.fixture(scope="session")
def fp32_bundle(quickstart_run):
    return quickstart_run[1] / "bundle-fp32"
