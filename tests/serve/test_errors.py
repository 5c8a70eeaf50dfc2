"""Every error class in OpenAI's error object with its status, and the server keeps serving.

400 a bad body, a refused parameter, an unsupported schema keyword, a prompt over the context
(naming the limit); 401 a missing or wrong key; 404 an unknown model or route; 413 a body
over the limit; 429 a full queue. Plus the start-up refusals: a public address without a key.
"""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from .conftest import Running, run_cli, wait_for

MESSAGES = [{"role": "user", "content": "hello"}]


@dataclass
class Reply:
    status_code: int
    text: str

    def json(self):
        return json.loads(self.text)


def request(url: str, method: str = "GET", body=None, headers=None) -> Reply:
    """One HTTP request with the standard library (a raw body, no client-side checks);
    ``body``: a dict (sent as JSON), bytes, or an iterable of bytes (sent chunked)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    headers = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    if body is not None:
        headers.setdefault("content-type", "application/json")
    chunked = body is not None and not isinstance(body, bytes)
    try:
        conn.request(method, parts.path, body=body, headers=headers, encode_chunked=chunked)
        r = conn.getresponse()
        return Reply(r.status, r.read().decode())
    finally:
        conn.close()


def error_of(response: Reply, status: int) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


def post(server, path: str, body, headers=None) -> Reply:
    return request(f"{server.url}{path}", "POST", body, headers)


def test_bad_bodies_are_400_naming_the_field(server):
    err = error_of(post(server, "/chat/completions", {"model": "tiny"}), 400)
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 5}
    assert error_of(post(server, "/chat/completions", body), 400)["param"] == "temperature"
    body = {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
    assert error_of(post(server, "/chat/completions", body), 400)["param"].startswith("messages")
    body = {"model": "tiny", "messages": MESSAGES, "n": 2}
    assert error_of(post(server, "/chat/completions", body), 400)["param"] == "n"
    body = {"model": "tiny", "messages": MESSAGES, "no_such_field": 1}
    assert error_of(post(server, "/chat/completions", body), 400)["param"] == "no_such_field"
    error_of(post(server, "/chat/completions", b"{not json"), 400)


def test_unsupported_schema_keyword_is_400_naming_it(server):
    import openai

    rf = {"type": "json_schema",
          "json_schema": {"name": "x", "schema": {"type": "object", "dependentSchemas": {}}}}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny", messages=MESSAGES, response_format=rf)
    assert "dependentSchemas" in e.value.body["message"]
    assert e.value.body["param"] == "response_format.json_schema.schema"


def test_prompt_over_the_context_is_400_with_the_limit(server):
    import openai

    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="lights on " * 400, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    assert "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="lights", max_tokens=600)
    assert e.value.body["param"] == "max_tokens" and "512" in e.value.body["message"]


def test_unknown_model_and_route_are_404(server):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.code == "model_not_found" and "tiny" in e.value.body["message"]
    error_of(request(f"{server.url}/models/gpt-4o"), 404)
    error_of(request(f"{server.url}/no/such/route"), 404)


def test_server_keeps_serving_after_errors(server):
    for _ in range(3):
        post(server, "/chat/completions", {"model": "tiny"})
    r = server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=2, temperature=0
    )
    assert r.choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def keyed(base_int4):
    s = Running([str(base_int4), "--name", "tiny", "--max-body-bytes", "4096"],
                env={"EDGETUNE_API_KEY": "sekret"})  # fmt: skip
    yield s
    s.stop()


def test_key_is_required_except_for_health(keyed):
    import openai

    assert request(f"{keyed.root}/health").status_code == 200
    err = error_of(request(f"{keyed.url}/models"), 401)
    assert err["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        keyed.client(api_key="wrong").models.list()
    assert [m.id for m in keyed.client(api_key="sekret").models.list()] == ["tiny"]


def test_body_over_the_limit_is_413(keyed):
    headers = {"authorization": "Bearer sekret"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 8000}]}
    err = error_of(post(keyed, "/chat/completions", body, headers=headers), 413)
    assert "4096" in err["message"]

    def chunks():  # no Content-Length: the limit counts what arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    error_of(post(keyed, "/chat/completions", chunks(), headers), 413)
    ok = post(keyed, "/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 1},
              headers=headers)  # fmt: skip
    assert ok.status_code == 200


def test_full_queue_is_429(base_int4):
    """One running, one waiting: of six requests sent at once, the rest get 429 (and the
    two admitted ones complete)."""
    s = Running([str(base_int4), "--name", "tiny", "--max-batch", "1", "--max-queue", "1"])
    try:
        body = {"model": "tiny", "prompt": "lights", "max_tokens": 400, "temperature": 0}
        results: list[Reply] = []
        start = threading.Barrier(6)

        def send():
            start.wait(30)
            results.append(post(s, "/completions", body))

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = sorted(r.status_code for r in results)
        assert len(codes) == 6 and set(codes) <= {200, 429} and codes.count(200) >= 2, codes
        assert 429 in codes
        err = error_of(next(r for r in results if r.status_code == 429), 429)
        assert err["type"] == "rate_limit_error" and "--max-queue 1" in err["message"]
        assert wait_for(lambda: request(f"{s.root}/health").json()["running"] == 0)
    finally:
        s.stop()


def test_public_address_without_key_is_refused(base_int4):
    done = run_cli("serve", str(base_int4), "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert done.returncode != 0
    assert "API key" in done.stderr and "--insecure" in done.stderr


def test_adapter_for_another_base_is_refused(fp32_bundle, trained_adapter):
    """The adapter was trained on the tiny base; the merged bundle is another model."""
    done = run_cli("serve", str(fp32_bundle), "--adapter", f"home={trained_adapter}",
                   "--port", "0", timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "home" in done.stderr and "base" in done.stderr
