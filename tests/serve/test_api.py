"""``edgetune serve`` through the official ``openai`` client: what a user's script sees.

Greedy answers equal ``edgetune run``'s on the same bundle, a stream concatenates to the
same text, completions and logprobs have OpenAI's shapes, and a schema-constrained answer
always parses and validates.
"""

from __future__ import annotations

import json

import pytest

from .conftest import run_cli

MESSAGES = [{"role": "user", "content": "Turn on the kitchen lights, please."}]


def chat(client, **kw):
    args = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 24, **kw}
    return client.chat.completions.create(**args)


def test_models_lists_the_base(server):
    client = server.client()
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_greedy_equals_edgetune_run(server, base_int4):
    reply = chat(server.client())
    run = run_cli(
        "run", str(base_int4), "--prompt", MESSAGES[0]["content"], "--temperature", "0",
        "--max-new-tokens", "24", "--backend", "native",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == run.stdout.rstrip("\n")
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 24


def test_stream_concatenates_to_the_same_text(server):
    client = server.client()
    whole = chat(client).choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens > 0


def test_completions_with_logprobs(server, base_int4):
    from edgetune.runtime import Model

    model = Model.load(base_int4, backend="native")
    expected = model.generate("The lights in the", temperature=0, max_new_tokens=12)
    client = server.client()
    r = client.completions.create(
        model="tiny", prompt="The lights in the", max_tokens=12, temperature=0, logprobs=3
    )
    choice = r.choices[0]
    assert r.object == "text_completion"
    assert choice.text == expected
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(
        max(t.values()) == pytest.approx(v)
        for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_shape(server):
    r = chat(server.client(), logprobs=True, top_logprobs=2, max_tokens=6)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_seed_makes_sampling_reproducible(server):
    client = server.client()
    a = chat(client, temperature=0.9, top_p=0.95, seed=11, max_tokens=16)
    b = chat(client, temperature=0.9, top_p=0.95, seed=11, max_tokens=16)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_and_length(server):
    client = server.client()
    whole = chat(client, max_tokens=24).choices[0].message.content
    cut = whole.strip()[len(whole.strip()) // 2 :][:3]
    assert cut
    r = chat(client, max_tokens=24, stop=[cut])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == whole[: whole.index(cut)]
    r = chat(client, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "room": {"enum": ["kitchen", "hall", "bedroom"]},
        "level": {"type": "integer", "minimum": 0, "maximum": 100},
        "on": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "room", "level", "on", "tags"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 1), (1.0, 2), (1.3, 3)])
def test_json_schema_output_validates(server, temperature, seed):
    import jsonschema

    r = chat(
        server.client(),
        temperature=temperature,
        seed=seed,
        max_tokens=160,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "device", "schema": PERSON, "strict": True},
        },
    )
    assert r.choices[0].finish_reason == "stop"
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, PERSON)


def test_json_object_output_parses(server):
    r = chat(server.client(), temperature=0.7, seed=5, max_tokens=200,
             response_format={"type": "json_object"})  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert r.choices[0].message.content.startswith("{")


def test_structured_output_streams_the_same(server):
    client = server.client()
    rf = {"type": "json_schema", "json_schema": {"name": "d", "schema": PERSON}}
    whole = chat(client, max_tokens=160, response_format=rf).choices[0].message.content
    chunks = chat(client, max_tokens=160, response_format=rf, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_the_server_imports_no_torch():
    """The serve extra pulls no torch: the server's modules, the fine-tuning service's
    included (training runs in child processes), import without it."""
    import subprocess
    import sys

    code = (
        "import sys, edgetune.serve, edgetune.serve.app, edgetune.serve.ft_api, "
        "edgetune.serve.finetune, edgetune.serve.grammar, edgetune.runtime.adapters\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
