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
            a = json.loads(ex.messages[-1][1])
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
