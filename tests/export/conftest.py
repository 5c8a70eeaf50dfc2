"""Bundles of the quickstart model in the other export variants, one export each, shared
by the export tests (small ``report_tokens``: the fp32 parity is checked on ``int4_bundle``)."""

import pytest

from edgetune.export import ExportConfig, export


def _export(merged_model, task_data, tmp_path_factory, name, **kw):
    out = tmp_path_factory.mktemp("variants") / name
    cfg = ExportConfig(eval_data=str(task_data[1]), report_tokens=2, **kw)
    return export(merged_model, out, cfg, log=lambda s: None)


@pytest.fixture(scope="session")
def hqq_bundle(merged_model, task_data, tmp_path_factory):
    return _export(merged_model, task_data, tmp_path_factory, "hqq", algo="hqq")


@pytest.fixture(scope="session")
def gptq_bundle(merged_model, task_data, tmp_path_factory):
    """GPTQ calibrated on the training split, scored on the held-out one."""
    return _export(
        merged_model, task_data, tmp_path_factory, "gptq", algo="gptq", calib_data=str(task_data[0])
    )


@pytest.fixture(scope="session")
def emb4_bundle(merged_model, task_data, tmp_path_factory):
    return _export(merged_model, task_data, tmp_path_factory, "emb4", embedding="int4")


@pytest.fixture(scope="session")
def int8_bundle(merged_model, task_data, tmp_path_factory):
    return _export(merged_model, task_data, tmp_path_factory, "int8", quant="int8")


@pytest.fixture(scope="session")
def int8_dynamic_bundle(merged_model, task_data, tmp_path_factory):
    return _export(merged_model, task_data, tmp_path_factory, "int8-dyn", quant="int8-dynamic")
