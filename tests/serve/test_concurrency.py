"""Many adapters over one base, continuous batching, cancellation and memory under load.

An adapter request equals (greedy) its merged bundle; concurrent clients, mixing the base
and the adapter, each get what they would get alone; a client that disconnects mid-stream
has its sequence dropped at once; after a bounded load the server's memory is back to its
baseline. (That a long prompt does not stall running streams is checked pass by pass in
test_engine.)
"""

from __future__ import annotations

import json
import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from .conftest import wait_for


def heldout_prompts(task_data, n: int) -> list[list[dict]]:
    """The first ``n`` held-out conversations without their answer."""
    rows = [json.loads(line) for line in open(task_data[1])][:n]
    return [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]


def ask(client, model: str, messages, max_tokens: int = 32) -> str:
    r = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens
    )
    return r.choices[0].message.content


def test_models_list_the_base_and_the_adapter(adapter_server):
    client = adapter_server.client()
    models = {m.id: m for m in client.models.list()}
    assert list(models) == ["tiny", "home"]
    assert models["home"].parent == "tiny"


def test_adapter_answers_equal_the_merged_bundle(adapter_server, fp32_bundle, task_data):
    from edgetune.runtime import Model

    merged = Model.load(fp32_bundle, backend="native")
    client = adapter_server.client()
    differs = 0
    for messages in heldout_prompts(task_data, 4):
        want = merged.chat(messages, temperature=0, max_new_tokens=32)
        assert ask(client, "home", messages) == want
        differs += ask(client, "tiny", messages) != want
    assert differs  # the base alone answers otherwise: the adapter is applied


def test_concurrent_clients_get_what_they_get_alone(adapter_server, task_data):
    """8 clients x 4 requests, base and adapter mixed, all at once: every answer equals the
    one the same request got by itself, and the server's memory returns to its baseline."""
    client = adapter_server.client()
    prompts = heldout_prompts(task_data, 4)
    work = [(m, p) for m in ("home", "tiny") for p in range(4)]
    alone = {(m, p): ask(client, m, prompts[p]) for m, p in work}
    with ThreadPoolExecutor(8) as pool:  # warm-up: the allocator reaches its working set
        list(pool.map(lambda w: ask(client, w[0], prompts[w[1]]), work))
    before = adapter_server.rss_mb()
    jobs = [work[(c + i) % len(work)] for c in range(8) for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda w: ask(client, w[0], prompts[w[1]]), jobs))
    assert answers == [alone[w] for w in jobs]
    assert wait_for(lambda: idle(adapter_server), timeout=10)
    after = adapter_server.rss_mb()
    assert after - before < max(32.0, 0.1 * before), (before, after)


def health(server) -> dict:
    with urllib.request.urlopen(f"{server.root}/health", timeout=10) as r:
        return json.load(r)


def idle(server) -> bool:
    h = health(server)
    return h["running"] == 0 and h["waiting"] == 0


def test_a_client_that_leaves_is_cancelled(server):
    """Read two chunks of a long stream, hang up: the sequence leaves the batch at once."""
    host, port = server.root.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "tiny",
            "prompt": "lights",
            "max_tokens": 450,
            "stream": True,
            "temperature": 0,
        }  # fmt: skip
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        seen = b""
        while seen.count(b"data: ") < 2:
            seen += sock.recv(4096)
        assert b"200 OK" in seen
        before = health(server)["tokens"]
    assert wait_for(lambda: idle(server), timeout=5)
    tokens = health(server)["tokens"]
    assert tokens - before < 400  # it stopped well before its 450 tokens
