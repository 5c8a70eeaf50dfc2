"""``TextStream`` against the whole-sequence decoding it replaced: the same pieces at the
same tokens (stop strings included), adding up to ``tokenizer.decode(ids)``, for the shipped
byte-level BPE, a byte-level BPE and a SentencePiece-style byte-fallback BPE trained here;
and a bounded decoding window, so the work per token does not grow with the text."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from edgetune.models import tiny_model_path
from edgetune.runtime.reference import WholeDecodeStream
from edgetune.runtime.text import _KEEP, MAX_PENDING, TextStream

TEXTS = [
    "Set the bedroom fan to 3 at 6am, please!",
    "café ☕ at 7:45  (twice) — naïve résumé, Ærøskøbing, Øst",
    "emoji 😀👍🏽🇫🇷 and 👨‍👩‍👧 family",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "tabs\tand\nnew lines\n\n  spaced   out ",
    "mixed: ümlaut 😀 漢字 ok → done ✓",
]
WINDOW = 2 * (MAX_PENDING + _KEEP + 1)  # context + undecided ids, at most


# -- tokenizers ------------------------------------------------------------------------------

CORPUS = [t for t in TEXTS for _ in range(3)] + [
    "turn on the kitchen lights",
    "dim the office lights to 40% at 7pm",
    "lock the garage door and arm the alarm",
]
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|end|>"]


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _byte_fallback(decoder: str) -> Tokenizer:
    """A Llama-2 / Mistral shaped tokenizer.json: SentencePiece BPE over "▁"-joined words,
    byte tokens <0x00>..<0xFF> for what it never saw (CJK, emoji here); decoded by
    Replace + ByteFallback + Fuse + Strip (Llama-2) or by Metaspace (newer conversions)."""
    base = Tokenizer(models.BPE())  # pieces trained as SentencePiece's: "▁" starts a word
    base.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    ascii_only = [t.encode("ascii", "ignore").decode() for t in CORPUS]
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    base.train_from_iterator(ascii_only, trainer)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(base.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) for m in __import__("json").loads(base.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if decoder == "llama":
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]
        )
    tok.add_special_tokens(SPECIALS)
    return tok


TOKENIZERS = {
    "tiny": lambda: Tokenizer.from_file(str(tiny_model_path() / "tokenizer.json")),
    "byte-level": _byte_level,
    "byte-fallback-llama": lambda: _byte_fallback("llama"),
    "byte-fallback-metaspace": lambda: _byte_fallback("metaspace"),
}
_cache: dict[str, Tokenizer] = {}


def tokenizer(name: str) -> Tokenizer:
    if name not in _cache:
        _cache[name] = TOKENIZERS[name]()
    return _cache[name]


def _units(tok: Tokenizer) -> list[list[int]]:
    """What a byte-fallback model can emit: any non-byte token, or the byte tokens of one
    whole character (bytes of a character split across other tokens are not valid output)."""
    vocab = tok.get_vocab()
    out = sorted([i] for s, i in vocab.items() if not (len(s) == 6 and s.startswith("<0x")))
    for ch in "é😀日本語👍🏽ø→✓한":
        out.append([vocab[f"<0x{b:02X}>"] for b in ch.encode()])
    return out


def _ids(name: str, data, n: int) -> list[int]:
    tok = tokenizer(name)
    if name.startswith("byte-fallback"):
        units = _units(tok)
        picks = data.draw(st.lists(st.sampled_from(units), max_size=n))
        return [i for u in picks for i in u]
    return data.draw(st.lists(st.integers(0, tok.get_vocab_size() - 1), max_size=n))


def run(stream, ids: list[int]) -> tuple[list[str], str, bool]:
    pieces = [stream.push(i) for i in ids]
    return pieces, stream.finish(), stream.stopped


def check(tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> None:
    """Same pieces at the same tokens as the reference; bounded decoding work."""
    new = TextStream(tok, stop)
    old = WholeDecodeStream(lambda x: tok.decode(x, skip_special_tokens=True), stop)
    said, pieces = "", []
    fallback = "<0x41>" in tok.get_vocab()
    for i in ids:
        pieces.append(new.push(i))
        assert pieces[-1] == old.push(i)
        assert new.stopped == old.stopped
        if not new.stopped:
            now = old.text
            # an unfinished byte-fallback character: the old text was the whole group as
            # U+FFFD, the new one keeps the characters already shown (both release nothing)
            if not (fallback and (now.endswith("\ufffd") or said.endswith("\ufffd"))):
                assert new.text == now  # what the server's logprobs pieces come from
                assert new.added == (now[len(said) :] if now.startswith(said) else None)
            said = now
    tail = new.finish()
    assert tail == old.finish()
    assert "".join(pieces) + tail == new.emitted == old.emitted
    if not stop:
        assert new.emitted == tok.decode(ids, skip_special_tokens=True)
    assert new.max_window <= WINDOW
    assert new.decoded_ids <= (3 * WINDOW) * max(1, len(ids)) + WINDOW


# -- tests -----------------------------------------------------------------------------------

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", list(TOKENIZERS))
@SETTINGS
@given(data=st.data())
def test_random_ids_add_up_to_the_whole_decode(name, data):
    check(tokenizer(name), _ids(name, data, 60))


@pytest.mark.parametrize("name", list(TOKENIZERS))
@SETTINGS
@given(data=st.data())
def test_stop_strings_cut_where_the_reference_cuts(name, data):
    tok = tokenizer(name)
    ids = _ids(name, data, 60)
    whole = tok.decode(ids, skip_special_tokens=True)
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        if whole and data.draw(st.booleans()):  # a piece of the text itself: it will hit
            a = data.draw(st.integers(0, len(whole) - 1))
            stops.append(whole[a : a + data.draw(st.integers(1, 6))])
        else:
            stops.append(data.draw(st.text(max_size=4)))
    check(tok, ids, tuple(stops))


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("text", TEXTS)
def test_texts_stream_back_exactly(name, text):
    tok = tokenizer(name)
    ids = tok.encode(text, add_special_tokens=False).ids
    check(tok, ids)
    check(tok, ids, ("\n", "😀", "ok", " — "))
    if name != "tiny":  # the tokenizers built here round-trip every text
        assert tok.decode(ids) == text


def test_invalid_byte_runs_keep_the_window_bounded():
    """A long run of bytes that never form UTF-8 (a broken sampler) settles as U+FFFD in
    bounded windows; the text then goes on."""
    tok = tokenizer("tiny")
    cont = [i for i in range(tok.get_vocab_size()) if tok.decode([i]) == "\ufffd"]
    lead = tok.encode("é", add_special_tokens=False).ids
    ids = (
        [cont[0]] * 300 + lead + [cont[1]] * 200 + tok.encode(" fine", add_special_tokens=False).ids
    )
    check(tok, ids)
    check(tok, ids, ("fine",))


def test_work_per_token_is_constant_on_long_text():
    tok = tokenizer("tiny")
    ids = tok.encode(" ".join(TEXTS) * 40, add_special_tokens=False).ids
    stream = TextStream(tok, ("never appears",))
    out = "".join(stream.push(i) for i in ids) + stream.finish()
    assert out == tok.decode(ids)
    assert len(ids) > 2000 and stream.max_window <= WINDOW
    assert stream.decoded_ids <= 2 * WINDOW * len(ids)
