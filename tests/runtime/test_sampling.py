"""``select`` against the plain full-sort implementation it replaced (runtime/reference.py):
same kept tokens, same probabilities (<= 1e-12), same token drawn for the same seed."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetune.runtime.reference import probs_reference as probs_ref
from edgetune.runtime.reference import select_reference as select_ref
from edgetune.runtime.sampling import SamplingConfig, _kept, penalized, select


def _case(seed: int, vocab: int, ties: bool):
    g = np.random.default_rng(seed)
    scale = g.choice([0.5, 3.0, 10.0, 30.0])
    logits = (g.standard_normal(vocab) * scale).astype(np.float32)
    if ties:  # repeated values: top-k and top-p boundaries fall inside runs of equal logits
        logits = np.round(logits).astype(np.float32)
    cfg = SamplingConfig(
        temperature=float(g.choice([0.3, 0.7, 1.0, 1.5])),
        top_k=int(g.choice([0, 0, 1, 5, 50, vocab - 1, vocab + 3])),
        top_p=float(g.choice([1.0, 0.9, 0.5, 0.99, 0.999999, 0.01])),
        repetition_penalty=float(g.choice([1.0, 1.3, 0.8])),
    )
    context = g.integers(0, vocab, int(g.integers(0, 30))).tolist()
    return logits, context, cfg


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    vocab=st.sampled_from([2, 7, 64, 65, 200, 1000, 5000]),
    ties=st.booleans(),
)
def test_kept_tokens_and_probabilities_equal_the_reference(seed, vocab, ties):
    logits, context, cfg = _case(seed, vocab, ties)
    ref = probs_ref(logits, context, cfg)
    ids, probs = _kept(penalized(logits, context, cfg) / cfg.temperature, cfg.top_k, cfg.top_p)
    # a token whose exp() underflows is kept with probability 0: it can never be drawn
    assert ids[probs > 0].tolist() == np.flatnonzero(ref).tolist()
    assert np.abs(probs - ref[ids]).max() <= 1e-12


@pytest.mark.parametrize("vocab", [50, 32064])
def test_same_seed_draws_the_same_tokens(vocab):
    g = np.random.default_rng(vocab)
    draws = 0
    for case in range(40):
        logits, context, cfg = _case(case, vocab, ties=case % 4 == 0)
        cfg = SamplingConfig(**{**cfg.__dict__, "temperature": [0.0, 1.0, 0.8][case % 3]})
        r_new, r_ref = np.random.default_rng(case), np.random.default_rng(case)
        for _ in range(25):
            row = logits + g.standard_normal(vocab).astype(np.float32)
            assert select(row, context, cfg, r_new) == select_ref(row, context, cfg, r_ref)
            draws += 1
        assert r_new.random() == r_ref.random()  # the generators advanced alike
    assert draws == 1000
