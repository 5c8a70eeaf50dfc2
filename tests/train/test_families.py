"""The trainer runs on every supported family: tiny random-weight Llama and Qwen2 (with q/k/v
biases) models train with QDoRA / QLoRA (the loss falls, the saved adapter changes the
model), and for all four families quantize-while-loading gives the same NF4 model as loading
in full and quantizing after."""

import json

import pytest
import torch

from edgetune.data.smart_home import generate
from edgetune.merge import load_adapted
from edgetune.models import load_model
from edgetune.train import TrainConfig, train
from edgetune.train.nf4 import NF4Linear, load_model_nf4, quantize_model_nf4


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_quantize_while_loading_equals_quantize_after(family, family_model):
    src = family_model(family)
    streamed, full = load_model_nf4(src), quantize_model_nf4(load_model(src))
    a, b = streamed.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    n_nf4 = sum(isinstance(m, NF4Linear) for m in streamed.modules())
    assert n_nf4 == sum(isinstance(m, NF4Linear) for m in full.modules()) >= 2 * 4
    x = torch.randint(0, 2000, (1, 12))
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, full(x).logits)


# Phi-3 trains in the rest of the suite; Mistral is Llama's code path in transformers
@pytest.mark.parametrize("family,method", [("llama", "qdora"), ("qwen2", "qlora")])
def test_family_trains(family, method, family_model, tmp_path):
    data, _ = generate(tmp_path / "data", n_train=24, n_heldout=4, seed=1)
    cfg = TrainConfig(
        model=str(family_model(family)),
        data=str(data),
        out=str(tmp_path / "run"),
        method=method,
        max_steps=6,
        batch_size=4,
        seq_len=96,
        lr=1e-2,
        rank=4,
        alpha=8,
        eval_every=100,
        save_every=100,
    )
    run = train(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # from ~ln(2048) = 7.62 (random weights); measured: llama 7.614 -> 7.449, qwen2 7.611 -> 7.492
    assert len(losses) == 6 and sum(losses[-2:]) / 2 <= sum(losses[:2]) / 2 - 0.05, losses
    # the saved adapter loads with PEFT over the NF4 base and moves its logits (measured 29-45 %)
    adapted = load_adapted(family_model(family), run / "adapter").eval()
    x = torch.randint(6, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = adapted(x).logits
        with adapted.disable_adapter():
            base = adapted(x).logits
    assert float((got - base).norm() / base.norm()) > 0.05
