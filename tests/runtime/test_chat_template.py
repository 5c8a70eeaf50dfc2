"""Chat templates render, at run time, the exact prompt and tokens transformers renders.

Real templates of four model families (tests/data/chat_templates, sources in SOURCES.md) are
rendered by ``edgetune.runtime.chat_template`` and by ``apply_chat_template`` on the shipped
tiny tokenizer given that model's special tokens; strings and token ids must be equal."""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import pytest

from edgetune.runtime.chat_template import PromptError, render

DATA = Path(__file__).parent.parent / "data" / "chat_templates"
SPECIAL = json.loads((DATA / "special_tokens.json").read_text(encoding="utf-8"))
MODELS = sorted(SPECIAL)
# each family's control tokens, added to the tiny vocab so they tokenize as one piece
CONTROL = {
    "phi3-mini-4k-instruct": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    "llama-3.1-8b-instruct": [
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|python_tag|>",
    ],
    "qwen2.5-7b-instruct": ["<|im_start|>", "<tool_call>", "</tool_call>"],
    "mistral-7b-instruct-v0.3": [
        "[INST]",
        "[/INST]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_CALLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
    ],
}
SUPPORTS_TOOLS = {"llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "mistral-7b-instruct-v0.3"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Das Wetter in einer Stadt (Zürich, 東京) — °C",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "Stadt, z. B. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

CHATS = {
    "user only": [{"role": "user", "content": "Wie ist das Wetter in Zürich? 🌤️"}],
    "system, multi-turn, non-ASCII": [
        {"role": "system", "content": "Du bist ein hilfreicher Assistent. 日本語も話せます。"},
        {"role": "user", "content": "Grüezi! Was heißt „Danke“ auf 日本語?"},
        {"role": "assistant", "content": "ありがとう (arigatō) 🙏"},
        {"role": "user", "content": "Und „Zürich“ auf Japanisch? 🇨🇭"},
    ],
}

TOOL_CHAT = [
    {"role": "system", "content": "You help with the weather."},
    {"role": "user", "content": "Wie warm ist es in Zürich?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call00001",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call00001", "content": '{"temp": 21, "sky": "☀️"}'},
    {"role": "assistant", "content": "In Zürich sind es 21 °C ☀️."},
    {"role": "user", "content": "Und in 東京?"},
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name -> (transformers tokenizer with that model's special tokens and chat template,
    the runtime's ``tokenizers.Tokenizer`` from the same saved tokenizer.json)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from edgetune.models import tiny_model_path

    made = {}
    for name in MODELS:
        tok = AutoTokenizer.from_pretrained(tiny_model_path())
        special = SPECIAL[name]
        tok.add_special_tokens({k: v for k, v in special.items() if v is not None})
        for k, v in special.items():
            if v is None:
                setattr(tok, k, None)
        tok.add_tokens(CONTROL[name], special_tokens=True)
        tok.chat_template = (DATA / f"{name}.jinja").read_text(encoding="utf-8")
        out = tmp_path_factory.mktemp(name)
        tok.save_pretrained(out)
        made[name] = (tok, Tokenizer.from_file(str(out / "tokenizer.json")))
    return made


def both(family, name, chat, tools=None, add_generation_prompt=True, **extra):
    """(edgetune's text, transformers' text) for one chat, rendered the same way export
    records it: the tokenizer's special_tokens_map is what the template is given."""
    tok, _ = family[name]
    ours = render(
        tok.chat_template,
        chat,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        special_tokens=dict(tok.special_tokens_map),
        **extra,
    )
    theirs = tok.apply_chat_template(
        chat, tokenize=False, tools=tools, add_generation_prompt=add_generation_prompt, **extra
    )
    return ours, theirs


def assert_same_tokens(family, name, text):
    tok, runtime_tok = family[name]
    ids = runtime_tok.encode(text, add_special_tokens=False).ids
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    return ids


def test_special_tokens_are_the_models(family):
    for name in MODELS:
        tok, _ = family[name]
        want = {k: v for k, v in SPECIAL[name].items() if v is not None}
        assert {k: v for k, v in tok.special_tokens_map.items() if k in SPECIAL[name]} == want


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("name", MODELS)
def test_chat_equals_transformers(family, name, chat, add_generation_prompt):
    ours, theirs = both(family, name, CHATS[chat], add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert "Zürich" in ours or "日本語" in ours  # non-ASCII kept as is
    assert_same_tokens(family, name, ours)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(SUPPORTS_TOOLS))
def test_tools_and_tool_calls_equal_transformers(family, name, add_generation_prompt):
    ours, theirs = both(
        family, name, TOOL_CHAT, tools=TOOLS, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert "get_weather" in ours and "Zürich, 東京" in ours  # tojson keeps non-ASCII
    assert "\\u00fc" not in ours
    assert_same_tokens(family, name, ours)


def test_tools_only_equal_transformers(family):
    """Tools offered on a plain chat; Phi-3's template has no tools and ignores them."""
    for name in MODELS:
        ours, theirs = both(family, name, CHATS["system, multi-turn, non-ASCII"], tools=TOOLS)
        assert ours == theirs
        assert ("get_weather" in ours) == (name in SUPPORTS_TOOLS)


def test_template_variables_pass_through(family):
    """Extra variables reach the template as in apply_chat_template (Llama-3.1's)."""
    chat = CHATS["system, multi-turn, non-ASCII"]
    ours, theirs = both(
        family,
        "llama-3.1-8b-instruct",
        chat,
        tools=TOOLS,
        date_string="01 Jan 2025",
        tools_in_user_message=False,
    )
    assert ours == theirs
    assert "Today Date: 01 Jan 2025" in ours and "Environment: ipython" in ours
    ours, _ = both(family, "llama-3.1-8b-instruct", chat)
    assert "Today Date: 26 Jul 2024" in ours  # the template's own default


def test_llama_bos_and_mistral_eos_come_from_special_tokens(family):
    ours, _ = both(family, "llama-3.1-8b-instruct", CHATS["user only"])
    assert ours.startswith("<|begin_of_text|><|start_header_id|>system")
    ours, _ = both(family, "mistral-7b-instruct-v0.3", CHATS["system, multi-turn, non-ASCII"])
    assert ours.startswith("<s>[INST]") and "(arigatō) 🙏</s>" in ours
    ids = assert_same_tokens(family, "mistral-7b-instruct-v0.3", ours)
    tok, _ = family["mistral-7b-instruct-v0.3"]
    assert ids[0] == tok.convert_tokens_to_ids("<s>")


# -- the environment, feature by feature --------------------------------------------------

# Llama-3.2's date logic (its 3.1 template has a fixed date): today's date from strftime_now
STRFTIME = (
    "{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        "
    '{%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n        '
    '{%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}\n'
    '{{- "Today Date: " + date_string }}'
)
FEATURES = {
    "strftime_now": STRFTIME,
    "loopcontrols": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}|{% endfor %}"
    ),
    "generation": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
        "{% endfor %}"
    ),
    "tojson": (
        "{{ tools | tojson }}\n{{ tools[0] | tojson(indent=2, sort_keys=true) }}\n"
        "{{ messages | tojson(separators=(',', ':')) }}\n{{ (tools | tojson) + '<b>&' }}"
    ),
    "trim and lstrip blocks": "  {% for m in messages %}\n    {{ m.role }}\n  {% endfor %}\n",
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_environment_feature_equals_transformers(family, feature):
    tok, _ = family["phi3-mini-4k-instruct"]
    chat = CHATS["system, multi-turn, non-ASCII"]
    ours = render(FEATURES[feature], chat, tools=TOOLS, special_tokens=dict(tok.special_tokens_map))
    theirs = tok.apply_chat_template(
        chat,
        chat_template=FEATURES[feature],
        tokenize=False,
        tools=TOOLS,
        add_generation_prompt=True,
    )
    assert ours == theirs
    if feature == "strftime_now":
        assert ours == "Today Date: " + datetime.now().strftime("%d %b %Y")
    if feature == "loopcontrols":
        assert ours == "Grüezi! Was heißt „Danke“ auf 日本語?|"
    if feature == "tojson":
        assert "Zürich" in ours and ours.endswith("<b>&")  # no \\u escapes, no HTML escaping


def test_raise_exception_is_a_prompt_error(family):
    """Mistral's template refuses roles that do not alternate, as in transformers."""
    tok, _ = family["mistral-7b-instruct-v0.3"]
    chat = [{"role": "user", "content": "eins"}, {"role": "user", "content": "zwei"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        tok.apply_chat_template(chat, tokenize=False)
    with pytest.raises(PromptError, match="chat template: After the optional system message"):
        render(tok.chat_template, chat, special_tokens=dict(tok.special_tokens_map))
    with pytest.raises(PromptError, match="single tool-calls"):  # Llama-3.1: one call at once
        call = TOOL_CHAT[2]["tool_calls"][0]
        two_calls = [TOOL_CHAT[1], {"role": "assistant", "tool_calls": [call, call]}]
        render(family["llama-3.1-8b-instruct"][0].chat_template, two_calls)


@pytest.mark.parametrize("name", MODELS)
def test_continue_final_message_equals_transformers(family, name):
    """A reply begun for the model ("Sure: {"): the prompt ends inside that turn."""
    tok, _ = family[name]
    chat = [
        {"role": "user", "content": "Température à Zürich ? Réponds en JSON."},
        {"role": "assistant", "content": 'Voici : {"ville": "Zürich", '},
    ]
    ours, theirs = both(
        family, name, chat, add_generation_prompt=False, continue_final_message=True
    )
    assert ours == theirs and ours.rstrip().endswith('"ville": "Zürich",')
    assert_same_tokens(family, name, ours)
    with pytest.raises(PromptError, match="exclude each other"):
        render(tok.chat_template, chat, continue_final_message=True)


def test_template_errors_are_prompt_errors():
    with pytest.raises(PromptError, match="chat template: line 1"):
        render("{% for m in messages %}", [])
    with pytest.raises(PromptError, match="chat template failed"):  # content missing
        render("{{ 'x' + messages[0]['content'] }}", [{"role": "assistant"}])
    with pytest.raises(PromptError, match="JSON-schema"):
        render("{{ tools }}", [], tools=[print])  # type: ignore[list-item]


def test_compiled_once_per_template():
    from edgetune.runtime.chat_template import compile_template

    template = "{{ messages | length }}"
    assert compile_template(template) is compile_template(template)
    assert render(template, [{"role": "user", "content": "a"}]) == "1"


# -- end to end: an exported bundle ---------------------------------------------------------


def test_bundle_renders_as_training_side(fp32_bundle, tiny_model):
    from edgetune.models import load_tokenizer
    from edgetune.runtime import Model

    train_tok = load_tokenizer(tiny_model)
    m = Model.load(fp32_bundle, threads=1)
    assert m.manifest["tokenizer"]["special_tokens"] == dict(train_tok.special_tokens_map)
    chat = CHATS["system, multi-turn, non-ASCII"]
    for add_generation_prompt in (True, False):
        prompt = m.render_chat(chat, add_generation_prompt=add_generation_prompt)
        assert prompt == train_tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert m.encode(prompt) == train_tok(prompt, add_special_tokens=False)["input_ids"]
    # an assistant tool call without content passes the check; this template needs content
    with pytest.raises(PromptError, match="chat template failed"):
        m.render_chat(TOOL_CHAT[1:3], tools=TOOLS)
    with pytest.raises(PromptError, match="tool_calls"):
        m.render_chat([{"role": "user"}])
