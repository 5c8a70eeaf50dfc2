"""onnxruntime-genai loads an edgetune bundle and decodes the same greedy tokens."""

import numpy as np
import pytest

from edgetune.runtime import Model, SamplingConfig

og = pytest.importorskip("onnxruntime_genai")


def test_genai_greedy_equals_edgetune_ort_backend(int4_bundle):
    ours = Model.load(int4_bundle)
    ids = ours.encode(ours.render_chat([{"role": "user", "content": "dim the hallway lights to 20%"}]))
    want = list(ours.generate_ids(ids, SamplingConfig(max_new_tokens=40)))

    model = og.Model(str(int4_bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 40, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    if got and got[-1] in ours.eos_ids:
        got = got[:-1]  # genai returns the eos token; edgetune stops before it
    assert got == want
