"""The streaming exporter: same bundle bytes and tokens as Optimum's traced export, memory
flat in depth, and clear errors on a damaged checkpoint with nothing left behind."""

import json
import multiprocessing as mp
import shutil
import struct

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgetune.errors import EdgetuneError, ModelError
from edgetune.export import ExportConfig, export
from edgetune.export.stream import DecoderWriter
from edgetune.export.writer import ExternalDataWriter
from edgetune.runtime.ort_backend import OrtDecoder

FAMILIES = ["llama", "mistral", "qwen2", "phi3"]


def _optimum_bundle(model_dir, out, cfg):
    """The pre-streaming path: Optimum's traced fp32 export, then the proto rewrite."""
    from edgetune.export.onnx_export import optimum_export
    from edgetune.export.quantize import quantize_weights

    model = onnx.load(str(optimum_export(model_dir, out / "fp32", 18)))
    quantize_weights(model, cfg)
    return model


def _stream_bundle(model_dir, out, cfg):
    out.mkdir(parents=True)
    DecoderWriter(model_dir, cfg, progress=False).write(out, "model.onnx", "model.onnx.data", 18)
    return out / "model.onnx"


def _greedy(decoder: OrtDecoder, ids: list[int], steps: int) -> list[int]:
    logits, past = decoder.forward(np.array([ids]))
    out = []
    for _ in range(steps):
        out.append(int(logits[0, -1].argmax()))
        logits, past = decoder.forward(np.array([[out[-1]]]), past)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_bundle_equals_optimum_export(family, family_model, tmp_path):
    """Same MatMulNBits bytes for every projection and the same greedy tokens in ONNX Runtime."""
    model_dir = family_model(family)
    cfg = ExportConfig()
    ref = _optimum_bundle(model_dir, tmp_path / "optimum", cfg)
    path = _stream_bundle(model_dir, tmp_path / "stream", cfg)
    got = onnx.load(str(path))
    q_ref = {
        i.name: numpy_helper.to_array(i)
        for i in ref.graph.initializer
        if i.name.endswith(("_Q4", "_Q8", "_scales"))
    }
    q_got = {
        i.name: numpy_helper.to_array(i)
        for i in got.graph.initializer
        if i.name.endswith(("_Q4", "_Q8", "_scales"))
    }
    assert q_ref.keys() == q_got.keys() and len(q_ref) >= 2 * 4 * 2
    for name, arr in q_ref.items():
        assert np.array_equal(arr.reshape(-1), q_got[name].reshape(-1)), name
    onnx.save_model(
        ref,
        str(tmp_path / "optimum" / "q.onnx"),
        save_as_external_data=True,
        location="q.onnx.data",
    )
    ids = list(range(5, 45))
    assert _greedy(OrtDecoder(str(path)), ids, 12) == _greedy(
        OrtDecoder(str(tmp_path / "optimum" / "q.onnx")), ids, 12
    )


def test_fp32_graph_equals_pytorch_past_longrope_switch(family_model, tmp_path):
    """Phi-3 longrope: logits equal PyTorch's below and above the original context (256)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = family_model("phi3")
    path = _stream_bundle(model_dir, tmp_path / "b", ExportConfig(quant="none"))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    dec = OrtDecoder(str(path))
    for n in (40, 300):
        ids = [(7 * i) % 2000 + 3 for i in range(n)]
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        got = dec.forward(np.array([ids]))[0][0]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), n


def test_external_data_is_aligned_for_memory_mapping(int4_bundle):
    model = onnx.load(str(int4_bundle / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: int(e.value) for e in t.external_data if e.key != "location"}
            if info["length"] >= 1 << 16:
                assert info["offset"] % (1 << 16) == 0, t.name


# -- bad input -------------------------------------------------------------------------------


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def _nothing_left(out):
    assert not out.exists()
    assert not out.parent.exists() or not [
        p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")
    ]


def test_truncated_safetensors_is_named(family_model, tmp_path):
    d = _copy_model(family_model("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ModelError, match=r"model\.safetensors.*truncated"):
        export(d, out, log=lambda s: None)
    _nothing_left(out)


def test_missing_shard_is_named(family_model, tmp_path):
    d = _copy_model(family_model("llama"), tmp_path / "m")
    index = {
        "metadata": {},
        "weight_map": {
            "lm_head.weight": "model-00002-of-00002.safetensors",
            "model.norm.weight": "model.safetensors",
        },
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors.*missing"):
        export(d, out, log=lambda s: None)
    _nothing_left(out)


def test_wrong_shape_names_the_tensor(family_model, tmp_path):
    d = _copy_model(family_model("qwen2"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out" / "bundle"
    with pytest.raises(
        ModelError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[128, 64\].*\[96, 64\]"
    ):
        export(d, out, log=lambda s: None)
    _nothing_left(out)


def test_disk_full_is_a_clear_error(tmp_path):
    w = ExternalDataWriter(tmp_path / "x.data")
    w._f.close()
    w._f = open("/dev/full", "wb", buffering=0)
    with pytest.raises(EdgetuneError, match="disk full while writing big"):
        w.tensor("big", np.zeros(1 << 16, np.float32))


def _export_with_file_limit(model_dir, out, limit, q):
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        export(model_dir, out, ExportConfig(report_tokens=1), log=lambda s: None)
        q.put("ok")
    except EdgetuneError as e:
        q.put(str(e))


def test_full_disk_during_export_leaves_nothing(family_model, tmp_path):
    """The data file hits the file-size limit part way: one clear error, no bundle, no temp dir."""
    d = family_model("llama")
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_export_with_file_limit, args=(d, out, 200_000, q))
    p.start()
    p.join(120)
    msg = q.get(timeout=5)
    assert "model.onnx.data" in msg and "disk full" in msg, msg
    _nothing_left(out)


def test_safetensors_header_damage_is_named(tmp_path):
    from edgetune.tensors import SafetensorsSource

    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(ModelError, match="damaged safetensors header"):
        SafetensorsSource(d)


# -- memory ----------------------------------------------------------------------------------


def _export_peak(model_dir, out, eval_txt, q):
    from edgetune.bench import peak_rss_bytes

    export(
        model_dir,
        out,
        ExportConfig(eval_data=str(eval_txt), report_tokens=2, report_ort_bytes=0),
        log=lambda s: None,
    )
    q.put(peak_rss_bytes() / 2**20)


def test_export_peak_memory_is_flat_in_depth(tmp_path):
    """Child-process VmHWM of a whole export (stream + layer-by-layer report) on two models that
    differ only in depth: 2 and 6 layers of 67 MB fp32 each. The pre-streaming path grew ~4x
    fp32 per layer. ONNX Runtime's check of the bundle is off, as at real size (a session
    holds the whole bundle, so it grows with depth by design)."""
    from edgetune.bench.random_model import make_random_model

    eval_txt = tmp_path / "eval.txt"
    eval_txt.write_text(
        "\n\n".join(f"paragraph {i}: " + "words and more words " * 8 for i in range(4))
    )
    ctx = mp.get_context("spawn")
    peaks = {}
    for layers in (2, 6):
        src = make_random_model(
            tmp_path / f"m{layers}",
            layers,
            hidden=1024,
            intermediate=4096,
            heads=8,
            kv_heads=8,
            vocab=4096,
            family="llama",
        )
        q = ctx.Queue()
        p = ctx.Process(target=_export_peak, args=(src, tmp_path / f"b{layers}", eval_txt, q))
        p.start()
        peaks[layers] = q.get(timeout=600)
        p.join(60)
    layer_mb = (4 * 1024 * 1024 + 3 * 1024 * 4096) * 4 / 2**20  # one layer in fp32
    assert peaks[6] - peaks[2] <= 0.5 * layer_mb, (peaks, layer_mb)


def test_chunked_tensor_must_fill_its_shape(tmp_path):
    """A tensor written from chunks gets exactly its shape's bytes, or a clear error."""
    w = ExternalDataWriter(tmp_path / "x.data")
    t = w.chunked(
        "table", (4, 1 << 14), np.float32, (np.full((1, 1 << 14), i, np.float32) for i in range(4))
    )
    with pytest.raises(EdgetuneError, match="tensor short got .* needs"):
        w.chunked("short", (4, 1 << 14), np.float32, [np.zeros((3, 1 << 14), np.float32)])
    w.close()
    info = {e.key: int(e.value) for e in t.external_data if e.key != "location"}
    data = np.fromfile(tmp_path / "x.data", np.float32, count=4 << 14, offset=info["offset"])
    assert info["length"] == 4 << 16 and info["offset"] % (1 << 16) == 0
    assert np.array_equal(data.reshape(4, -1)[:, 0], [0, 1, 2, 3])


def test_parity_report_scores_at_most_eval_tokens(family_model, tmp_path):
    from edgetune.export import budget

    assert budget([[1] * 5, [2] * 5, [3] * 5], 8) == [[1] * 5, [2] * 3]
    assert budget([[1], [2] * 4], 3) == [[2] * 3]  # a 1-token text scores nothing
    out = export(
        family_model("llama"), tmp_path / "b", ExportConfig(eval_tokens=40), log=lambda s: None
    )
    report = json.loads((out / "report.json").read_text())
    # positions scored = tokens - 1 per text, all texts together within the budget
    assert 0 < report["quant_vs_fp32"]["tokens"] <= 40 - report["eval_texts"]
