"""``edgetune export MODEL --target fpga --out DIR``: an HLS project for a real model.

DIR/
  hls/                   the kernels (q4q8_gemv.h, nf4_dequant.h, top.cpp) and config.h
  weights/               every quantized projection: packed codes, zero points and
                         fixed-point scales as .mem ($readmemh), .coe (block RAM) and .h (csim)
  tb_layer0.cpp          testbench: layer 0's projections on activations recorded from the
                         model, compared bit for bit with the golden model
  tb_layer0_vectors.h    those activations and the golden outputs
  run_hls.tcl            Vitis HLS: csim + csynth of q4q8_gemv_top
  fpga.json              layers, shapes, Q-formats
  README.md              the data layout
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import kernels
from ..bundle import MANIFEST, commit_dir
from ..errors import ConfigError, OutputExistsError
from ..kernels import fixed_point as fx
from ..models import check_model_dir
from .hls import c_array, hls_sources
from .memimage import write_coe, write_mem

PART = "xczu7ev-ffvc1156-2-e"  # a Zynq UltraScale+ part (ZCU104); change in run_hls.tcl


def _projection_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """name -> (out, in) fp32 weight of every decoder linear projection."""
    from safetensors.numpy import load_file

    weights: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, arr in load_file(str(f)).items():
            if ".layers." in name and name.endswith("proj.weight") and arr.ndim == 2:
                weights[name[: -len(".weight")]] = arr.astype(np.float32)
    return weights


def _record_layer0_inputs(model_dir: Path, prompt: str) -> dict[str, np.ndarray]:
    """Inputs (last token) of layer 0's projections while the model reads ``prompt``."""
    import torch

    from ..models import load_model, load_tokenizer

    model = load_model(model_dir).eval()
    tok = load_tokenizer(model_dir)
    seen: dict[str, np.ndarray] = {}
    hooks = []
    for name, mod in model.named_modules():
        if ".layers.0." in name and isinstance(mod, torch.nn.Linear):
            hooks.append(
                mod.register_forward_hook(
                    lambda m, inp, out, name=name: seen.__setitem__(
                        name, inp[0][0, -1].detach().numpy()
                    )
                )
            )
    with torch.no_grad():
        model(torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]]))
    for h in hooks:
        h.remove()
    return seen


def _from_bundle(bundle: Path, prompt: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Q4 weights exactly as the bundle ships them, and layer 0's inputs recorded while the
    native backend (torch-free) reads ``prompt``."""
    from ..runtime import Model
    from ..runtime.native import NativeDecoder

    model = Model.load(bundle, backend="native")
    dec = model.decoder
    assert isinstance(dec, NativeDecoder)  # backend="native" loads a NativeDecoder
    weights = {name: lin.q4 for name, lin in dec.lin.items() if lin.kind == "q4"}
    seen: dict[str, np.ndarray] = {}
    plain = dec.linear

    def recording(x, name, groups=()):
        if name.startswith("model.layers.0."):
            seen[name] = np.array(x[-1])
        return plain(x, name, groups)

    dec.linear = recording  # type: ignore[method-assign]  # this decoder only: records layer 0
    dec.forward(np.array([model.encode(prompt)]))
    return weights, seen


def _safe(name: str) -> str:
    return name.replace(".", "_")


def _write_layer_files(wdir: Path, name: str, layer: fx.FixedQ4Layer) -> dict:
    packed = layer.packed()
    base = _safe(name)
    note = f"{name}: (N={layer.n}, K={layer.k}), block {layer.block}"
    write_mem(wdir / f"{base}.w.mem", packed, 1, note + ", packed 4-bit codes, low nibble first")
    write_coe(wdir / f"{base}.w.coe", packed, 1, note + ", packed 4-bit codes, low nibble first")
    write_mem(wdir / f"{base}.scale.mem", layer.ws_fx, 2, note + f", int16 scales Q{layer.ws_frac}")
    write_coe(wdir / f"{base}.scale.coe", layer.ws_fx, 2, note + f", int16 scales Q{layer.ws_frac}")
    write_mem(wdir / f"{base}.zp.mem", layer.zero_points, 1, note + ", 4-bit zero points")
    (wdir / f"{base}.h").write_text(
        f"// {note}\n"
        + c_array(f"{base.upper()}_W", "unsigned char", packed)
        + c_array(f"{base.upper()}_ZP", "unsigned char", layer.zero_points)
        + c_array(f"{base.upper()}_SCALE", "short", layer.ws_fx)
    )
    return {
        "name": name,
        "k": layer.k,
        "n": layer.n,
        "block": layer.block,
        "scale_frac_bits": layer.ws_frac,
        "files": sorted(p.name for p in wdir.glob(f"{base}.*")),
    }


def _layer0_testbench(
    layers: dict[str, fx.FixedQ4Layer], inputs: dict[str, np.ndarray]
) -> tuple[str, str]:
    """(tb_layer0.cpp, tb_layer0_vectors.h) for layer 0's projections."""
    vec, calls = ["// generated by edgetune: recorded activations and golden outputs\n"], []
    for i, (name, layer) in enumerate(layers.items()):
        act = fx.fixed_activation(inputs[name], layer.block)
        y = fx.q4q8_gemv_fixed(layer, act)
        packed = layer.packed()
        vec.append(
            f"namespace p{i} {{  // {name}\n"
            + c_array("W", "unsigned char", packed)
            + c_array("ZP", "unsigned char", layer.zero_points)
            + c_array("WS", "short", layer.ws_fx)
            + c_array("X", "signed char", act.xq)
            + c_array("XS", "short", act.xs_fx)
            + c_array("Y", "long long", y)
            + "}\n"
        )
        shift = layer.ws_frac + act.xs_frac - fx.OUT_FRAC
        calls.append(
            f'    bad += check_gemv<{layer.k}, {layer.n}, {layer.block}>("{name}", p{i}::W, '
            f"p{i}::ZP, p{i}::WS, p{i}::X, p{i}::XS, {shift}, p{i}::Y);"
        )
    tb = (
        """// Runs every projection of decoder layer 0 on activations recorded from the model and
// compares the HLS kernel's outputs with the golden model's, bit for bit. Exit 0 = all equal.
#include <cstdio>

#include "tb_check.h"
#include "tb_layer0_vectors.h"

int main() {
    int bad = 0;
"""
        + "\n".join(calls)
        + """
    std::printf("%s: %d mismatches\\n", bad ? "FAIL" : "PASS", bad);
    return bad != 0;
}
"""
    )
    return tb, "".join(vec)


def _tcl() -> str:
    return f"""# Vitis HLS: C simulation and synthesis of the Q4 x Q8 GEMV for one projection shape.
#   vitis_hls -f run_hls.tcl
open_project -reset edgetune_q4q8
set_top q4q8_gemv_top
add_files hls/top.cpp -cflags "-Ihls -std=c++14"
add_files -tb tb_layer0.cpp -cflags "-Ihls -I. -std=c++14"
open_solution -reset solution1 -flow_target vivado
set_part {{{PART}}}
create_clock -period 4 -name default
csim_design
csynth_design
exit
"""


def export_fpga(
    model_dir: str | Path,
    out: str | Path,
    block: int = 32,
    force: bool = False,
    prompt: str = "turn on the kitchen lights at 7pm",
) -> Path:
    """Write the HLS project for a merged HF model dir (quantized here with ``block``) or a
    bundle (its own int4 weights, as shipped); returns ``out``."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: output exists (use --force to replace it)")
    if (model_dir / MANIFEST).is_file():
        q4, inputs = _from_bundle(model_dir, prompt)
        if not q4:
            raise ConfigError(
                f"{model_dir}: bundle has no int4 projections; export it with --quant int4 first"
            )
        block = next(iter(q4.values())).block
    else:
        check_model_dir(model_dir)
        q4 = {
            name: kernels.q4_quantize(np.ascontiguousarray(w.T), block)
            for name, w in _projection_weights(model_dir).items()
        }
        inputs = _record_layer0_inputs(model_dir, prompt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "hls").mkdir()
        (tmp / "weights").mkdir()
        for f in ("q4q8_gemv.h", "q4_dequant.h", "nf4_dequant.h", "top.cpp", "tb_check.h"):
            shutil.copy(hls_sources() / f, tmp / "hls" / f)
        layers, entries = {}, []
        for name, w in q4.items():
            layers[name] = fx.fixed_layer(w)
            entries.append(_write_layer_files(tmp / "weights", name, layers[name]))
        layer0 = {n: lay for n, lay in layers.items() if n.startswith("model.layers.0.")}
        tb, vectors = _layer0_testbench(layer0, inputs)
        (tmp / "tb_layer0.cpp").write_text(tb)
        (tmp / "tb_layer0_vectors.h").write_text(vectors)
        top = next(iter(layer0.values()))
        (tmp / "hls" / "config.h").write_text(
            f"// shape of the synthesised GEMV (the first projection of layer 0)\n"
            f"#define ET_K {top.k}\n#define ET_N {top.n}\n#define ET_BLOCK {top.block}\n"
            f"#define ET_NF4_NUMEL {top.k * top.n}\n"
        )
        (tmp / "run_hls.tcl").write_text(_tcl())
        (tmp / "fpga.json").write_text(
            json.dumps(
                {
                    "model": str(model_dir.resolve()),
                    "block": block,
                    "out_frac_bits": fx.OUT_FRAC,
                    "activation": "int8 codes, int16 block scales Q(xs_frac) chosen per vector",
                    "layers": entries,
                },
                indent=2,
            )
            + "\n"
        )
        (tmp / "README.md").write_text(README)
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


README = """# edgetune HLS project

Integer decode datapath of a Q4 model, verified against edgetune's numpy golden model
(`kernels/fixed_point.py` in edgetune).

## Data layout (per projection, `weights/`)

| file | words | meaning |
|---|---|---|
| `*.w.mem` / `*.w.coe` | 1 byte, N x K/2 | 4-bit weight codes, row n of the (N, K) weight, two codes a byte, element 2j in the low nibble (ONNX Runtime MatMulNBits order) |
| `*.zp.mem` | 1 byte, N x K/B | zero point of each block of B codes (8 when symmetric) |
| `*.scale.mem` / `*.scale.coe` | 2 bytes, N x K/B | int16 block scales, Q(scale_frac_bits) from `fpga.json` |
| `*.h` | | the same arrays as C headers for C simulation |

`.mem` files hold one hexadecimal word a line after `@0` (for `$readmemh`); multi-byte
words are little-endian in memory. `.coe` files use `memory_initialization_radix=16`.

## Arithmetic

    s[n,b]  = sum_{k in b} (q[n,k] - zp[n,b]) * xq[k]                 int32
    acc[n]  = sum_b s[n,b] * ws[n,b] * xs[b]                            int64
    y[n]    = sat32((acc[n] + 2^(sh-1)) >> sh),  sh = ws_frac + xs_frac - 16   (Q15.16)

## Run

    g++ -std=c++14 -I<ap_types> -Ihls -I. tb_layer0.cpp -o tb && ./tb     # C simulation
    vitis_hls -f run_hls.tcl                                              # csim + csynth
"""
