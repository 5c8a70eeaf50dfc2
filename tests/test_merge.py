"""Merge: the streamed merge equals PEFT's in-memory merge (rel. error <= 1e-6 per tensor) for
every method, the merged model equals the adapter-applied one (logits, rel. error <= 1e-5),
the output keeps the base's dtype and loads in transformers, sharded in and out, bad adapters
are refused before anything is written, and peak memory is flat in the number of layers."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft_adapters import random_adapter

from edgetune.errors import ModelError, OutputExistsError
from edgetune.merge import ADAPTER_META, load_adapted, merge, nf4_weights
from edgetune.models import TOKENIZER_FILES, copy_tokenizer, load_model
from edgetune.tensors import INDEX, SafetensorsSource, read_header


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def peft_merged(model_dir, adapter):
    """PEFT's in-memory merge (fp32) over the base as training saw it: {name: tensor}."""
    merged = load_adapted(model_dir, adapter, merged_base=True).merge_and_unload()
    return {k: v.detach().float() for k, v in merged.state_dict().items()}


def assert_weights_match(out, want, tol=1e-6):
    src = SafetensorsSource(out)
    assert set(src.names()) == set(want)
    errs = {n: rel_err(torch.from_numpy(src.array(n)), want[n]) for n in src.names()}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, (worst, errs[worst])


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


@pytest.mark.parametrize("family", ["phi3", "llama"])  # fused q|k|v, gate|up and separate ones
@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "qdora"])
def test_streamed_merge_equals_peft_merge(method, family, family_model, tmp_path):
    base = family_model(family)
    adapter = random_adapter(base, tmp_path / "adapter", method)
    out = merge(base, adapter, tmp_path / "merged")
    assert_weights_match(out, peft_merged(base, adapter))

    x = torch.randint(0, 2048, (2, 24))
    with torch.no_grad():
        want = load_adapted(base, adapter).eval()(x).logits  # NF4 layers for q*
        got = load_model(out).eval()(x).logits
        plain = load_model(base).eval()(x).logits
    assert rel_err(got, want) <= 1e-5
    assert rel_err(plain, want) > 1e-3  # the adapter did change the model
    if method.startswith("q"):
        # merging into the original fp weights instead is measurably wrong
        wrong = load_adapted(base, adapter, base_quantization="none").merge_and_unload().eval()
        with torch.no_grad():
            assert rel_err(wrong(x).logits, want) > 100 * rel_err(got, want)


def test_rslora_rank_pattern_and_modules_to_save(family_model, tmp_path):
    """alpha / sqrt(r), per-module ranks, and a trained LM head that replaces the base's."""
    base = family_model("llama")
    adapter = random_adapter(
        base,
        tmp_path / "adapter",
        "qdora",
        targets=["q_proj", "down_proj"],
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        modules_to_save=["lm_head"],
    )
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.lm_head.weight" in f.keys()
        head = f.get_tensor("base_model.model.lm_head.weight")
    out = merge(base, adapter, tmp_path / "merged")
    want = peft_merged(base, adapter)
    assert_weights_match(out, want)
    assert torch.equal(torch.from_numpy(SafetensorsSource(out).array("lm_head.weight")), head)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_lora_on_the_embedding(family_model, tmp_path):
    """PEFT's embedding LoRA ((B @ A).T) and the base embedding it saves beside it."""
    base = family_model("phi3")
    adapter = random_adapter(base, tmp_path / "adapter", "lora", targets=["embed_tokens", "o_proj"])
    out = merge(base, adapter, tmp_path / "merged")
    want = peft_merged(base, adapter)
    assert_weights_match(out, want)
    before = torch.from_numpy(SafetensorsSource(base).array("model.embed_tokens.weight"))
    assert rel_err(before, want["model.embed_tokens.weight"]) > 1e-3


@pytest.mark.parametrize("kind", ["bf16-sharded", "fp16"])
def test_dtype_kept_and_loads_in_transformers(kind, family_model, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    if kind == "fp16":
        base, dtype, torch_dtype = tiny_model, "F16", torch.float16
    else:  # a bf16 base in HF's own sharded layout
        base, dtype, torch_dtype = tmp_path / "base", "BF16", torch.bfloat16
        load_model(family_model("phi3")).to(torch.bfloat16).save_pretrained(
            base, max_shard_size="200KB"
        )
        copy_tokenizer(family_model("phi3"), base)
        assert (base / INDEX).is_file()
    adapter = random_adapter(base, tmp_path / "adapter", "qlora")
    out = merge(base, adapter, tmp_path / "merged")

    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == ["model.safetensors"]  # small: one file
    assert {i.dtype for f in files for i in read_header(f).values()} == {dtype}
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert abs(size(out) - size(base)) < 0.02 * size(base)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == str(torch_dtype).removeprefix("torch.")
    for name in TOKENIZER_FILES + ("generation_config.json",):
        assert (out / name).is_file() == (base / name).is_file()

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert model.dtype == torch_dtype
    want = peft_merged(base, adapter)
    got = model.state_dict()
    for n, w in want.items():  # PEFT's fp32 merge rounded once to the base dtype
        assert rel_err(got[n], w.to(torch_dtype)) <= 1e-4, n


def test_sharded_base_and_sharded_output(family_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import edgetune.merge as m

    base = tmp_path / "base"
    load_model(family_model("llama")).save_pretrained(base, max_shard_size="150KB")
    copy_tokenizer(family_model("llama"), base)
    adapter = random_adapter(base, tmp_path / "adapter", "dora")
    monkeypatch.setattr(m, "MIN_SHARD_BYTES", 0)  # shards of max(largest tensor, one layer)
    out = merge(base, adapter, tmp_path / "merged")

    src = SafetensorsSource(base)
    limit = max(
        max(i.nbytes for i in src.tensors.values()),
        sum(i.nbytes for n, i in src.tensors.items() if n.startswith("model.layers.0.")),
    )
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(src.names())
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in src.tensors.values())
    for f in shards:
        assert sum(i.nbytes for i in read_header(out / f).values()) <= limit
    for layer in ("model.layers.0.", "model.layers.1."):  # a layer is never split
        assert len({f for n, f in index["weight_map"].items() if n.startswith(layer)}) == 1
    model = AutoModelForCausalLM.from_pretrained(str(out))
    want = peft_merged(base, adapter)
    assert max(rel_err(v, want[k]) for k, v in model.state_dict().items()) <= 1e-6


def _rewrite_adapter(adapter, edit):
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, match",
    [
        ("absent-module", r"adapter_model\.safetensors: tensor .*layers\.7\.self_attn\.q_proj"),
        ("wrong-shape", r"adapter_model\.safetensors: tensor .*layers\.1\.mlp\.down_proj\.lora_B"),
        ("missing-file", r"adapter_model\.safetensors: missing"),
    ],
)
def test_bad_adapter_is_refused_before_writing(damage, match, family_model, tmp_path):
    base = family_model("llama")
    adapter = random_adapter(base, tmp_path / "adapter", "lora")
    if damage == "absent-module":  # the base has 2 layers

        def edit(t):
            for part in ("lora_A", "lora_B"):
                t[f"base_model.model.model.layers.7.self_attn.q_proj.{part}.weight"] = t.pop(
                    f"base_model.model.model.layers.0.self_attn.q_proj.{part}.weight"
                )

        _rewrite_adapter(adapter, edit)
    elif damage == "wrong-shape":

        def edit(t):
            k = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
            t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])

        _rewrite_adapter(adapter, edit)
    else:
        (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match=match):
        merge(base, adapter, tmp_path / "merged")
    assert leftovers(tmp_path, "merged") == []


def test_merge_refuses_existing_output_and_missing_adapter(tiny_model, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        merge(tiny_model, tmp_path / "adapter", tmp_path / "out")
    with pytest.raises(ModelError, match="adapter_config.json"):
        merge(tiny_model, tmp_path / "adapter", tmp_path / "out2")
    assert leftovers(tmp_path, "out2") == []


@pytest.mark.parametrize("family", ["llama", "phi3", "mistral", "qwen2"])
def test_nf4_weights_are_the_ones_training_quantizes(family, family_config):
    from transformers import AutoModelForCausalLM

    from edgetune.train.adapters import ADAPTER_META as TRAIN_META
    from edgetune.train.nf4 import linear_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(family_config(family))
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert nf4_weights(shapes) == {f"{t}.weight" for t in linear_targets(model)}
    assert ADAPTER_META == TRAIN_META


_PEAK_CHILD = """
import sys
from edgetune.merge import merge
merge(*sys.argv[1:4], base_quantization=sys.argv[4])
print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')))
"""


def merge_peak_rss(model, adapter, out, quantization="auto") -> int:
    """VmHWM of a fresh interpreter that only merges."""
    r = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, str(model), str(adapter), str(out), quantization],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


def test_peak_memory_is_flat_in_depth(tmp_path):
    from edgetune.bench.random_model import make_random_model
    from edgetune.bench.scale_stages import write_random_adapter

    h, i = 768, 3072
    shape = dict(
        hidden=h, intermediate=i, heads=12, kv_heads=12, vocab=2048, family="phi3", dtype="BF16"
    )
    layer_fp32 = 4 * h * (3 * h + h + 2 * i + i)  # qkv, o, gate|up, down
    peaks = {}
    for layers in (2, 8):
        model = make_random_model(tmp_path / f"m{layers}", layers, **shape)
        adapter = write_random_adapter(model, tmp_path / f"a{layers}", rank=16)
        # the LoRA path (the NF4 round trip is per tensor too, but seconds per layer)
        peaks[layers] = merge_peak_rss(model, adapter, tmp_path / f"o{layers}", "none")
        shutil.rmtree(model)
    assert peaks[8] - peaks[2] < 1.5 * layer_fp32, peaks
    assert peaks[8] < 0.6 * 8 * layer_fp32, peaks  # about one tensor's work, not the model
