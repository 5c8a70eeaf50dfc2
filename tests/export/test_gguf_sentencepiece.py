"""The SentencePiece side of the GGUF vocabulary (``tokenizer.model``, as Phi-3-mini,
Mistral and Llama-2 ship it): a SentencePiece BPE model with byte fallback is trained here
on the bundled task's text, a Llama model is built over it, and llama.cpp must tokenize
text as Hugging Face does (merges, scores, byte fallback for what the model never saw) and
decode the same tokens as PyTorch from the f16 GGUF.

Measured but not asserted: after a special token (``<s>`` from a chat template) llama.cpp
inserts SentencePiece's dummy-prefix "▁" where transformers' ``legacy=False`` tokenizer
does not — llama.cpp's own behaviour for every SentencePiece GGUF (the converter writes
``add_space_prefix`` from the model's ``add_dummy_prefix``, as edgetune does by default)."""

from __future__ import annotations

import io
import random

import gguf
import numpy as np
import pytest
from llama_cpp_lib import llama, llama_greedy, llama_logits, torch_logits_and_greedy

from edgetune.data import smart_home
from edgetune.export.gguf import export_gguf
from edgetune.models import load_tokenizer

spm = pytest.importorskip("sentencepiece")
TEXTS = [
    "turn on the kitchen lights",
    "Set the bedroom fan to 3 at 6am, please!",
    "café ☕ at 7:45  (twice)",
]
TEMPLATE = (  # Phi-3-mini's shape: added special tokens around each turn
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def spm_model(family_config, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, LlamaTokenizerFast

    rng = random.Random(0)
    combos, _ = smart_home.split_combinations(seed=0)
    lines = []
    for _ in range(300):
        lines += [
            m["content"] for m in smart_home.make_example(rng, *rng.choice(combos))["messages"]
        ]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        remove_extra_whitespaces=False,  # as Llama-2's and Mistral's tokenizer.model
        minloglevel=2,
    )
    d = tmp_path_factory.mktemp("llama-spm")
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizerFast(
        vocab_file=str(d / "tokenizer.model"), legacy=False, add_prefix_space=True, from_slow=True
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    cfg = family_config("llama")
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = len(tok), 1, 2, None
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(6.0)
    m.save_pretrained(d)
    return d


def test_sentencepiece_vocab_in_llama_cpp(spm_model, tmp_path):
    out = export_gguf(spm_model, tmp_path / "spm-f16.gguf", "f16", log=lambda *_: None)
    f = gguf.GGUFReader(out).fields
    assert f["tokenizer.ggml.model"].contents() == "llama"
    assert len(f["tokenizer.ggml.tokens"].contents()) == len(load_tokenizer(spm_model)) == 403
    assert f["tokenizer.ggml.bos_token_id"].contents() == 1
    assert f["tokenizer.ggml.eos_token_id"].contents() == 2
    llm = llama(out)
    tok = load_tokenizer(spm_model)
    sp = spm.SentencePieceProcessor(model_file=str(spm_model / "tokenizer.model"))
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == [1, *sp.encode(text)], text  # the fixture: HF's ids are SentencePiece's
        assert ids[0] == 1 and 0 not in ids, text  # BOS added; nothing unknown (byte fallback)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
        # llama.cpp keeps the dummy prefix when detokenizing pieces without their BOS
        assert llm.detokenize(ids[1:]).decode().removeprefix(" ") == text, text
    ids = tok(TEXTS[1])["input_ids"]
    ref, greedy = torch_logits_and_greedy(spm_model, ids, 12, {2})
    assert np.abs(llama_logits(out, ids) - ref).max() <= 5e-3 * np.abs(ref).max()
    assert llama_greedy(out, ids, 12, {2}) == greedy


def test_added_special_tokens_in_llama_cpp(spm_model, tmp_path):
    """Phi-3-style turn markers added on top of tokenizer.model reach the GGUF as control
    tokens at their ids, and llama.cpp splits a rendered chat at them as transformers does
    — but for one "▁" llama.cpp puts after each special token (its SentencePiece tokenizer
    prefixes every text fragment that follows one; transformers' ``legacy=False`` does
    not). Every SentencePiece GGUF llama.cpp's converter writes behaves so; this pins it."""
    out = export_gguf(spm_model, tmp_path / "spm.gguf", "q8_0", log=lambda *_: None)
    tok = load_tokenizer(spm_model)
    f = gguf.GGUFReader(out).fields
    names = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    for t in ["<|user|>", "<|assistant|>", "<|end|>"]:
        i = tok.convert_tokens_to_ids(t)
        assert i >= 400 and names[i] == t and types[i] == gguf.TokenType.CONTROL
    llm = llama(out)
    for text in TEXTS:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        got = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        special = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
        space = tok.convert_tokens_to_ids("▁")
        extra = [i for i in range(1, len(got)) if got[i] == space and got[i - 1] in special]
        assert len(extra) == 3  # the newline after <|user|>, <|end|> and <|assistant|>
        assert [t for i, t in enumerate(got) if i not in extra] == ids, text
