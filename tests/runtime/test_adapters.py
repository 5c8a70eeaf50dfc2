"""Adapters served unmerged (``runtime.adapters``) compute what the merged model computes.

Over an fp32 bundle of the base, a LoRA and a DoRA adapter applied at run time give the
merged bundle's logits (rel. error <= 3e-4: the merged model keeps the base's dtype, fp16 for
the tiny model, and rounding W + sBA to it is the whole difference); over the
int4 base they are at least as close to the fp32 merged model as the int4 merged bundle is
(the update stays in fp32 instead of being rounded to 4 bits with the weight). Sequences
with different adapters (and none) share one batched pass and each gets its own result.
Adapters that do not fit are refused naming the tensor, the module or the base hash.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from peft_adapters import random_adapter
from safetensors.numpy import load_file, save_file

from edgetune.bundle import read_manifest
from edgetune.errors import ModelError
from edgetune.export import ExportConfig, export
from edgetune.merge import ADAPTER_META, merge
from edgetune.runtime.adapters import load_adapter
from edgetune.runtime.native import NativeDecoder

PROMPT = list(range(40, 72))
QUIET = {"log": lambda s: None}


def decoder(bundle) -> NativeDecoder:
    return NativeDecoder(bundle, read_manifest(bundle), threads=2)


def logits(dec: NativeDecoder, adapter=None, prompt=PROMPT) -> np.ndarray:
    rows = dec.step([(np.array(prompt), dec.new_cache())], last_only=False, adapters=[adapter])
    return rows[0]


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    """Base bundles (fp32, int4), and per method: the adapter and its merged bundles."""
    root = tmp_path_factory.mktemp("adapters")
    fp32 = ExportConfig(quant="none", eval_tokens=40)
    int4 = ExportConfig(eval_tokens=40)
    out = {
        "base-fp32": export(tiny_model, root / "base-fp32", fp32, **QUIET),
        "base-int4": export(tiny_model, root / "base-int4", int4, **QUIET),
    }
    for method in ("lora", "dora"):
        adapter = random_adapter(tiny_model, root / method, method=method, rank=8)
        merged = merge(tiny_model, adapter, root / f"{method}-merged")
        out[method] = adapter
        out[f"{method}-fp32"] = export(merged, root / f"{method}-fp32", fp32, **QUIET)
        out[f"{method}-int4"] = export(merged, root / f"{method}-int4", int4, **QUIET)
    return out


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_unmerged_equals_merged_over_fp32(built, method):
    base = decoder(built["base-fp32"])
    adapter = load_adapter(built[method], base, read_manifest(built["base-fp32"]), name=method)
    assert adapter.method == method
    got = logits(base, adapter)
    want = logits(decoder(built[f"{method}-fp32"]))
    assert rel(got, want) <= 3e-4
    assert rel(logits(base), want) > 1e-2  # the adapter really changes the model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_unmerged_over_int4_is_as_close_as_the_merged_int4_bundle(built, method):
    base = decoder(built["base-int4"])
    adapter = load_adapter(built[method], base, read_manifest(built["base-int4"]))
    want = logits(decoder(built[f"{method}-fp32"]))
    unmerged = rel(logits(base, adapter), want)
    merged = rel(logits(decoder(built[f"{method}-int4"])), want)
    assert unmerged <= 1.25 * merged, (unmerged, merged)


def test_mixed_adapters_in_one_batch_equal_each_alone(built):
    base = decoder(built["base-int4"])
    manifest = read_manifest(built["base-int4"])
    lora = load_adapter(built["lora"], base, manifest)
    dora = load_adapter(built["dora"], base, manifest)
    prompts = [PROMPT, list(range(5, 12)), list(range(90, 105))]
    chosen = [lora, None, dora]
    alone = [logits(base, a, p) for a, p in zip(chosen, prompts, strict=True)]
    batch = [(np.array(p), base.new_cache()) for p in prompts]
    together = base.step(batch, last_only=False, adapters=chosen)
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a, b)


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it(built, tmp_path):
    bad = copy_adapter(built["lora"], tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    name = next(n for n in tensors if "lora_A" in n and "o_proj" in n)
    tensors[name] = np.zeros((8, 7), np.float32)
    save_file(tensors, bad / "adapter_model.safetensors")
    base = decoder(built["base-int4"])
    with pytest.raises(ModelError, match="o_proj"):
        load_adapter(bad, base, read_manifest(built["base-int4"]))


def test_a_module_the_bundle_lacks_is_refused_naming_it(built, tmp_path):
    bad = copy_adapter(built["lora"], tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    renamed = {n.replace("layers.1.", "layers.9."): t for n, t in tensors.items()}
    save_file(renamed, bad / "adapter_model.safetensors")
    base = decoder(built["base-int4"])
    with pytest.raises(ModelError, match=r"layers\.9\."):
        load_adapter(bad, base, read_manifest(built["base-int4"]))


def test_an_adapter_trained_on_other_weights_is_refused(built, tmp_path):
    bad = copy_adapter(built["lora"], tmp_path / "bad")
    meta = json.loads((bad / ADAPTER_META).read_text())
    (bad / ADAPTER_META).write_text(json.dumps({**meta, "base_weights_sha256": "ab" * 32}))
    base = decoder(built["base-int4"])
    with pytest.raises(ModelError, match="SHA-256 abababab"):
        load_adapter(bad, base, read_manifest(built["base-int4"]), name="home")


def test_a_classification_adapter_is_refused(built, tmp_path):
    bad = copy_adapter(built["lora"], tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "SEQ_CLS"}))
    base = decoder(built["base-int4"])
    with pytest.raises(ModelError, match="SEQ_CLS"):
        load_adapter(bad, base, read_manifest(built["base-int4"]))
