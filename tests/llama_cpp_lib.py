"""llama.cpp as a test oracle, from the build llama-cpp-python installs: ggml's quantizers
through ctypes (``libggml-base.so``), a GGUF's logits and greedy tokens, and PyTorch's on
the same model dir to compare them with."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from edgetune.models import load_tokenizer

CTX = 256  # <= every test model's original context: llama.cpp and HF both use short rope factors


def _ggml():
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return f


def ggml_quantize(x: np.ndarray, name: str) -> np.ndarray:
    """llama.cpp's bytes for ``x`` (rows, K) as ggml type ``name`` (any of its types)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, k = x.shape
    qtype = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, k // block * size), np.uint8)
    n = _ggml()(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, k, None)
    assert n == out.nbytes
    return out


def llama(path, logits_all=False):
    return llama_cpp.Llama(
        str(path), n_ctx=CTX, n_threads=2, logits_all=logits_all, verbose=False, seed=0
    )


def llama_logits(path, ids: list[int]) -> np.ndarray:
    llm = llama(path, logits_all=True)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(path, ids: list[int], n: int, stop: set[int]) -> list[int]:
    llm = llama(path)
    out: list[int] = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if t in stop or len(out) >= n:
            break
        out.append(t)
    return out


def torch_logits_and_greedy(model_dir, ids, n, stop):
    import torch

    from edgetune.models import load_model

    m = load_model(model_dir).eval().float()
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits[0].numpy()
        gen = m.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),  # else pad 1 = BOS masks
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=list(stop),
            pad_token_id=1,
        )[0, len(ids) :].tolist()
    while gen and gen[-1] in stop:
        gen = gen[:-1]
    return logits, gen


def chat_ids(model_dir, text):
    tok = load_tokenizer(model_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tok(prompt)["input_ids"], prompt
