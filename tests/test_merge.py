"""Merge: merged model equals the adapter-applied model for every method (rel. error <= 1e-5)."""

import pytest
import torch

from edgetune.errors import ModelError, OutputExistsError
from edgetune.merge import load_adapted, merge
from edgetune.models import load_model
from edgetune.train import TrainConfig, train


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "qdora"])
def test_merged_equals_adapter_applied(method, tiny_model, task_data, tmp_path):
    cfg = TrainConfig(model=str(tiny_model), data=str(task_data[0]), out=str(tmp_path / "run"),
                      method=method, max_steps=4, batch_size=4, lr=1e-2, rank=4, alpha=8,
                      seq_len=128, save_every=100)
    run = train(cfg, progress=False)
    merged = merge(tiny_model, run / "adapter", tmp_path / "merged")
    x = torch.randint(0, 2000, (2, 32))
    with torch.no_grad():
        want = load_adapted(tiny_model, run / "adapter").eval()(x).logits
        got = load_model(merged).eval()(x).logits
        base = load_model(tiny_model).eval()(x).logits
    assert rel_err(got, want) <= 1e-5
    assert rel_err(base, want) > 1e-3  # the adapter did change the model
    if method.startswith("q"):
        # merging into the original fp weights instead is measurably wrong
        wrong = load_adapted(tiny_model, run / "adapter", base_quantization="none").merge_and_unload()
        with torch.no_grad():
            assert rel_err(wrong.eval()(x).logits, want) > 100 * rel_err(got, want)


def test_merge_refuses_existing_output_and_missing_adapter(tiny_model, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        merge(tiny_model, tmp_path / "adapter", tmp_path / "out")
    with pytest.raises(ModelError, match="adapter_config.json"):
        merge(tiny_model, tmp_path / "adapter", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
