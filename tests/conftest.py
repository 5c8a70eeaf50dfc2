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


@pytest.fixture(scope="session")
def task_data(tmp_path_factory):
    """The bundled smart-home task, small: (train.jsonl, heldout.jsonl)."""
    from edgetune.data import smart_home

    return smart_home.generate(tmp_path_factory.mktemp("data"), n_train=400, n_heldout=40, seed=0)


@pytest.fixture(scope="session")
def merged_model(tiny_model, task_data, tmp_path_factory):
    """A short QLoRA fine-tune of the tiny model, merged: a real trained model for export tests."""
    from edgetune.merge import merge
    from edgetune.train import TrainConfig, train

    root = tmp_path_factory.mktemp("pipeline")
    cfg = TrainConfig(model=str(tiny_model), data=str(task_data[0]), out=str(root / "run"),
                      max_steps=30, batch_size=8, lr=3e-3, rank=8, alpha=16, seq_len=128,
                      save_every=1000)
    run = train(cfg, progress=False)
    return merge(tiny_model, run / "adapter", root / "merged")


@pytest.fixture(scope="session")
def int4_bundle(merged_model, task_data, tmp_path_factory):
    from edgetune.export import ExportConfig, export

    out = tmp_path_factory.mktemp("bundles") / "int4"
    return export(merged_model, out, ExportConfig(quant="int4", eval_data=str(task_data[1])),
                  log=lambda s: None)
