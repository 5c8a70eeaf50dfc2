"""Dataset loading: every bad line is named by file, line and field; masks cover answers only."""

import json

import pytest

from edgetune.data import load_examples, smart_home, tokenize_examples
from edgetune.data.tokenize import IGNORE
from edgetune.errors import DataError


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
)


@pytest.mark.parametrize(
    "line, field",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"foo": 1}), "no 'messages', 'prompt'/'completion' or 'text'"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "messages[0].role"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
        (json.dumps({"messages": [{"role": "user"}]}), "messages[0]"),
        (json.dumps({"prompt": "x"}), "'completion' is missing"),
        (json.dumps({"text": 3}), "field 'text' must be a string"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, line, field):
    p = write(tmp_path, [GOOD, "", line])
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert f"{p}:3" in str(e.value) and field in str(e.value)


def test_empty_and_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_examples(write(tmp_path, [""]))
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "nope.jsonl")


def test_non_utf8_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        load_examples(p)


def test_three_formats_load(tmp_path):
    p = write(
        tmp_path,
        [GOOD, json.dumps({"prompt": "a", "completion": "b"}), json.dumps({"text": "plain"})],
    )
    assert [e.kind for e in load_examples(p)] == ["messages", "prompt", "text"]


def test_loss_only_on_assistant_tokens(tiny_tokenizer, tmp_path):
    p = write(
        tmp_path,
        [
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "sys"},
                        {"role": "user", "content": "turn on"},
                        {"role": "assistant", "content": '{"a": 1}'},
                        {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "ok"},
                    ]
                }
            )
        ],
    )
    (t,) = tokenize_examples(tiny_tokenizer, load_examples(p), 256)
    learned = tiny_tokenizer.decode([i for i in t.labels if i != IGNORE])
    assert learned == '{"a": 1}<|end|>\nok<|end|>\n'
    assert len(t.labels) == len(t.input_ids)


def test_too_long_truncates_or_refuses(tiny_tokenizer, tmp_path):
    p = write(tmp_path, [json.dumps({"prompt": "a " * 10, "completion": "b " * 50})])
    with pytest.warns(UserWarning, match="longer than --seq-len 16"):
        (t,) = tokenize_examples(tiny_tokenizer, load_examples(p), 16, source=str(p))
    assert len(t.input_ids) == 16
    with pytest.raises(DataError, match=r"d.jsonl:1.*--strict"):
        tokenize_examples(tiny_tokenizer, load_examples(p), 16, source=str(p), strict=True)


def test_smart_home_heldout_combinations_unseen(tmp_path):
    train, heldout = smart_home.generate(tmp_path, n_train=300, n_heldout=60, seed=0)

    def combos(path):
        out = set()
        for ex in load_examples(path):
            a = json.loads(ex.as_chat()[-1]["content"])
            out.add((a["device"], a["action"], a["room"]))
        return out

    tr, he = combos(train), combos(heldout)
    assert tr and he and not (tr & he)
    assert {(d, a) for d, a, _ in he} <= {(d, a) for d, a, _ in tr}
    again, _ = smart_home.generate(tmp_path / "again", n_train=300, n_heldout=60, seed=0)
    assert again.read_text() == train.read_text()  # fixed seed, same data


def test_messages_without_chat_template_name_the_line(tiny_model, tmp_path):
    from edgetune.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    tok.chat_template = None
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok"},
                ]
            }
        )
        + "\n"
    )
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*chat template"):
        tokenize_examples(tok, load_examples(p), seq_len=64)


# -- the full chat format (Azure AI Foundry / OpenAI fine-tuning) ----------------------------


def chat_line(*messages, **extra):
    return json.dumps({"messages": list(messages), **extra}, ensure_ascii=False)


def user(text):
    return {"role": "user", "content": text}


def test_byte_order_mark_is_skipped(tmp_path):
    p = tmp_path / "windows.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    assert [e.as_chat()[1]["content"] for e in load_examples(p)] == ["hello", "hello"]


def test_developer_role_and_content_parts(tmp_path):
    parts = [{"type": "text", "text": "dim the "}, {"type": "text", "text": "lights"}]
    line = chat_line(
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    )
    (ex,) = load_examples(write(tmp_path, [line]))
    assert ex.as_chat() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "dim the lights"},
        {"role": "assistant", "content": "ok"},
    ]


ANSWER = {"role": "assistant", "content": "ok"}


@pytest.mark.parametrize(
    "line, field",
    [
        (
            chat_line(
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                ANSWER,
            ),
            "messages[0].content[0].type",
        ),
        (chat_line({**user("x"), "weight": 0}, ANSWER), "messages[0].weight"),
        (chat_line(user("x"), {**ANSWER, "weight": 2}), "messages[1].weight"),
        (chat_line(user("x"), {**ANSWER, "weight": 0}), "only weight-0 assistant turns"),
        (
            chat_line(
                user("x"),
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "f", "arguments": "{"}}
                    ],
                },
            ),
            "messages[1].tool_calls[0].function.arguments",
        ),
        (chat_line({**user("x"), "tool_calls": []}, ANSWER), "messages[0].tool_calls"),
        (chat_line(user("x"), ANSWER, tools={"name": "f"}), "field 'tools'"),
        (chat_line(user("x"), ANSWER, tools=[{"type": "function"}]), "tools[0].function"),
    ],
)
def test_bad_chat_fields_are_named(tmp_path, line, field):
    p = write(tmp_path, [GOOD, line])
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert f"{p}:2" in str(e.value) and field in str(e.value)


def _expected_labels(tokenizer, ids, text, answers):
    """Labels built independently of tokenize.py: a token is learned iff its characters lie
    inside one of the ``answers`` character spans of the rendered ``text``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    return [
        i if any(a <= s and e <= b for a, b in answers) else IGNORE
        for i, (s, e) in zip(ids, enc["offset_mapping"], strict=True)
    ]


def test_weight_zero_turn_is_context_only(tiny_tokenizer, tmp_path):
    turns = [
        user("first"),
        {"role": "assistant", "content": "A1", "weight": 1},
        user("second"),
        {"role": "assistant", "content": "A2 wrong", "weight": 0},
        user("third"),
        {"role": "assistant", "content": "A3"},
    ]
    (ex,) = load_examples(write(tmp_path, [chat_line(*turns)]))
    (t,) = tokenize_examples(tiny_tokenizer, [ex], 256)
    (on_prompt,) = tokenize_examples(tiny_tokenizer, [ex], 256, train_on_prompt=True)
    text = tiny_tokenizer.apply_chat_template(ex.as_chat(), tokenize=False)
    spans = [(text.index(a), text.index(a) + len(a) + len("<|end|>\n")) for a in ("A1", "A3")]
    assert t.labels == _expected_labels(tiny_tokenizer, t.input_ids, text, spans)
    assert tiny_tokenizer.decode([i for i in t.labels if i != IGNORE]) == ("A1<|end|>\nA3<|end|>\n")
    # train_on_prompt learns the prompt, never a weight-0 turn
    a2 = (text.index("A2 wrong"), text.index("A2 wrong") + len("A2 wrong<|end|>\n"))
    in_a2 = _expected_labels(tiny_tokenizer, t.input_ids, text, [a2])
    assert on_prompt.labels == [
        IGNORE if x != IGNORE else i for i, x in zip(t.input_ids, in_a2, strict=True)
    ]


TOOL_TEMPLATE = (
    "{% if tools %}<|tools|>{{ tools | tojson }}<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n"
    "{% for c in m.tool_calls or [] %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</tool_call>{% endfor %}{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

TOOL_TURNS = (
    user("Weather in Zürich?"),
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 4}'},
    {"role": "assistant", "content": "4 °C in Zürich."},
)


def test_tool_calls_and_tools_render_through_the_template(tiny_model, tmp_path):
    from edgetune.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    tok.chat_template = TOOL_TEMPLATE
    (ex,) = load_examples(write(tmp_path, [chat_line(*TOOL_TURNS, tools=[WEATHER])]))
    assert ex.as_chat()[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Zürich"}
    (t,) = tokenize_examples(tok, [ex], 512)
    text = tok.decode(t.input_ids)
    assert text.startswith("<|tools|>") and '"get_weather"' in text
    call = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call><|end|>\n'
    )
    final = "4 °C in Zürich.<|end|>\n"
    assert tok.decode([i for i in t.labels if i != IGNORE]) == call + final
    # a template that leaves tool calls out would train the model to answer nothing
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'messages\[1\].tool_calls'"):
        tokenize_examples(load_tokenizer(tiny_model), [ex], 512)
