"""The native backend's batched step: several sequences, each with its own KV cache, at
different lengths and positions, through one set of GEMMs per layer. Every sequence gets
exactly the logits (so the greedy tokens) it gets alone: on the quickstart bundle and on a
grouped-query-attention Llama, with a sequence joining (its prompt prefilled) while the
others decode."""

import numpy as np
import pytest

from edgetune.bundle import read_manifest
from edgetune.runtime.native import NativeDecoder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _decoder(bundle) -> NativeDecoder:
    return NativeDecoder(bundle, read_manifest(bundle), threads=2)


def _alone(dec: NativeDecoder, prompt: list[int], steps: int):
    """Greedy tokens and every step's last-position logits of one sequence by itself."""
    cache = dec.new_cache()
    (logits,) = dec.step([(np.array(prompt), cache)])
    out, seen = [], [logits]
    for _ in range(steps):
        out.append(int(logits[-1].argmax()))
        (logits,) = dec.step([(np.array([out[-1]]), cache)])
        seen.append(logits)
    return out, seen


def _batched(dec: NativeDecoder, prompts: list[list[int]], steps: int, join_at: int):
    """The same greedy decoding, all sequences in one step each: all but the last prompt are
    prefilled together, the last joins after ``join_at`` decode steps (its prompt in the same
    step as the others' next tokens)."""
    caches = [dec.new_cache() for _ in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    seen: list[list[np.ndarray]] = [[] for _ in prompts]
    pending = {j: np.array(p) for j, p in enumerate(prompts[:-1])}
    tick = 0
    while any(len(o) < steps + 1 for o in outs):
        if tick == join_at:
            pending[len(prompts) - 1] = np.array(prompts[-1])
        live = sorted(pending)
        results = dec.step([(pending[j], caches[j]) for j in live])
        pending = {}
        for j, logits in zip(live, results, strict=True):
            seen[j].append(logits)
            outs[j].append(int(logits[-1].argmax()))
            if len(outs[j]) <= steps:
                pending[j] = np.array([outs[j][-1]])
        tick += 1
    return [o[:steps] for o in outs], seen


def _check(dec: NativeDecoder, prompts: list[list[int]], steps: int = 8, join_at: int = 3):
    got, got_logits = _batched(dec, prompts, steps, join_at)
    for j, prompt in enumerate(prompts):
        want, want_logits = _alone(dec, prompt, steps)
        assert got[j] == want, f"sequence {j}"
        for a, b in zip(got_logits[j], want_logits, strict=True):
            np.testing.assert_array_equal(a, b)


def test_batched_step_equals_each_sequence_alone_on_the_quickstart_bundle(int4_bundle):
    dec = _decoder(int4_bundle)
    prompts = [list(range(5, 40)), [7, 8, 9], list(range(100, 117)), list(range(60, 71))]
    _check(dec, prompts)


def test_batched_step_equals_alone_with_grouped_query_attention(family_model, tmp_path):
    from edgetune.export import ExportConfig, export

    bundle = export(
        family_model("llama"), tmp_path / "b", ExportConfig(eval_tokens=40), log=lambda s: None
    )
    dec = _decoder(bundle)
    assert dec.n_kv < dec.n_heads  # 4 query heads share 2 key/value heads
    _check(dec, [list(range(20, 50)), [3, 4], list(range(200, 211))], join_at=2)


def test_batched_step_refuses_bad_batches(int4_bundle):
    dec = _decoder(int4_bundle)
    cache = dec.new_cache()
    with pytest.raises(ValueError, match=r"batch\[1\]: a cache appears twice"):
        dec.step([(np.array([5]), cache), (np.array([6]), cache)])
    with pytest.raises(ValueError, match=r"batch\[1\]: no new tokens"):
        dec.step([(np.array([5]), dec.new_cache()), (np.array([], np.int64), dec.new_cache())])
    with pytest.raises(ValueError, match="context of .* exceeded"):
        dec.step([(np.arange(dec.context + 1) % 50, dec.new_cache())])
    assert dec.step([]) == []
