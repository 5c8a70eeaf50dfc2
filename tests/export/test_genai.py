"""onnxruntime-genai loads an edgetune bundle and decodes the same greedy tokens."""

import pytest

from edgetune.runtime import Model, SamplingConfig

from .genai import genai_greedy

pytest.importorskip("onnxruntime_genai")


def test_genai_greedy_equals_edgetune_ort_backend(int4_bundle):
    ours = Model.load(int4_bundle)
    ids = ours.encode(
        ours.render_chat([{"role": "user", "content": "dim the hallway lights to 20%"}])
    )
    want = list(ours.generate_ids(ids, SamplingConfig(max_new_tokens=40)))

    assert genai_greedy(int4_bundle, ids, 40, ours.eos_ids) == want
