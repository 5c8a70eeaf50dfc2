"""An Ollama Modelfile for a GGUF: FROM, the chat template as a Go template, stop tokens
and sampling defaults.

Ollama's TEMPLATE is a Go template, the model's chat template is Jinja: the two cannot be
translated in general, so the template is *measured* instead. Each role's message is
rendered alone with a sentinel content, which gives that role's prefix and suffix, and the
generation prompt is what ``add_generation_prompt`` adds. The pieces are then checked: a
four-message conversation rendered by the Jinja template must equal the pieces
concatenated (``render``). A template whose messages depend on each other (a system prompt
folded into the first user turn, a BOS only at the start) fails that check; the Modelfile
then carries no TEMPLATE and Ollama falls back to the GGUF's own ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
from pathlib import Path

SENTINEL = "\x00EDGETUNE-CONTENT\x00"
ROLES = ("system", "user", "assistant")
PROBE = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Turn on the lights."},
    {"role": "assistant", "content": "Done."},
    {"role": "user", "content": "And the fan?"},
]


def _render(tokenizer, messages, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def template_pieces(tokenizer) -> dict[str, tuple[str, str]] | None:
    """{role: (prefix, suffix)} plus ``"generation": (prompt, "")``, or None when the chat
    template is not a per-message concatenation."""
    if not tokenizer.chat_template:
        return None
    pieces: dict[str, tuple[str, str]] = {}
    for role in ROLES:
        try:
            text = _render(tokenizer, [{"role": role, "content": SENTINEL}], False)
        except Exception:  # a template may refuse a lone system or assistant message
            continue
        if text.count(SENTINEL) != 1:
            return None
        before, after = text.split(SENTINEL)
        pieces[role] = (before, after)
    user = [{"role": "user", "content": SENTINEL}]
    plain, with_gen = _render(tokenizer, user, False), _render(tokenizer, user, True)
    if not with_gen.startswith(plain):
        return None
    pieces["generation"] = (with_gen[len(plain) :], "")
    for gen in (False, True):
        msgs = [m for m in PROBE if m["role"] in pieces]
        if render(pieces, msgs, gen) != _render(tokenizer, msgs, gen):
            return None
    return pieces


def render(pieces: dict[str, tuple[str, str]], messages: list[dict], gen: bool) -> str:
    """What the Go template built from ``pieces`` renders for ``messages``."""
    text = "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in messages)
    if gen and messages and messages[-1]["role"] != "assistant":
        text += pieces["generation"][0]
    return text


def go_template(pieces: dict[str, tuple[str, str]]) -> str:
    """The Go template of ``render``: no trim markers, so every piece keeps its whitespace."""
    branches = [
        f'{"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}{{{{ '
        for i, (role, (pre, post)) in enumerate((r, pieces[r]) for r in ROLES if r in pieces)
    ]
    return (
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}{{ "
        + "".join(branches)
        + 'end }}{{ if and $last (ne .Role "assistant") }}'
        + pieces["generation"][0]
        + "{{ end }}{{ end }}"
    )


def modelfile(gguf_name: str, tokenizer, stops: list[str], generation: dict) -> str:
    """The Modelfile's text for ``gguf_name`` (a file beside it)."""
    lines = [f"# written by edgetune export --format gguf\nFROM ./{gguf_name}"]
    pieces = template_pieces(tokenizer)
    tpl = go_template(pieces) if pieces else None
    if (
        pieces
        and tpl
        and '"""' not in tpl
        and not any("{{" in p or "}}" in p for pair in pieces.values() for p in pair)
    ):
        lines.append(f'TEMPLATE """{tpl}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not per-message; Ollama reads the GGUF's")
    for s in stops:
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    for key in ("temperature", "top_p", "top_k"):
        if key in generation and generation.get("do_sample", True):
            lines.append(f"PARAMETER {key} {generation[key]}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer, eos_ids: list[int], model_dir: Path) -> Path:
    """Write ``FILE.Modelfile`` beside ``FILE.gguf``; returns its path."""
    gen_path = model_dir / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids]
    path = gguf_path.with_suffix(".Modelfile")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(modelfile(gguf_path.name, tokenizer, stops, generation))
    tmp.replace(path)
    return path
