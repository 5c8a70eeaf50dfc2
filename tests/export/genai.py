"""onnxruntime-genai's greedy decoding, for tests that compare it with edgetune's backends."""

import numpy as np


def genai_greedy(bundle, ids, steps, eos_ids):
    """onnxruntime-genai's greedy tokens, without the eos it returns and edgetune stops before."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    return got[:-1] if got and got[-1] in eos_ids else got
