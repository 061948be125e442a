"""Bad and heavy input: each gets its HTTP status and an OpenAI-shaped error, and the server keeps serving."""

import json

import pytest
import requests

from conftest import API_KEY, MAX_BODY_BYTES, Server


def post(server, path, body, key=API_KEY, raw=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers.update(Server.auth(key))
    data = raw if raw is not None else json.dumps(body)
    return requests.post(f"http://127.0.0.1:{server.port}{path}", data=data, headers=headers, timeout=120)


def assert_openai_error(response, status, code=None, param=None):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def chat_body(server, **extra):
    body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "temperature": 0}
    body.update(extra)
    return body


CASES = [
    # (name, request builder, status, code, param)
    ("malformed JSON", lambda s: dict(raw='{"model": "x", "messages": ['), 400, "invalid_json", None),
    ("body not an object", lambda s: dict(raw="[1, 2, 3]"), 400, None, None),
    ("temperature of the wrong type", lambda s: dict(body=chat_body(s, temperature="hot")), 400, None, "temperature"),
    ("max_tokens of the wrong type", lambda s: dict(body=chat_body(s, max_tokens="many")), 400, None, "max_tokens"),
    ("messages of the wrong type", lambda s: dict(body=chat_body(s, messages="Hi")), 400, None, "messages"),
    ("stop of the wrong type", lambda s: dict(body=chat_body(s, stop=5)), 400, None, "stop"),
    ("stream of the wrong type", lambda s: dict(body=chat_body(s, stream="yes")), 400, None, "stream"),
    ("body over the limit", lambda s: dict(body=chat_body(s, messages=[{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1)}])),
     413, "request_too_large", None),
    ("max_tokens over the context", lambda s: dict(body=chat_body(s, max_tokens=s.max_context)), 400,
     "context_length_exceeded", "max_tokens"),
    ("unknown model", lambda s: dict(body=chat_body(s, model="gpt-unknown")), 404, "model_not_found", "model"),
    ("unknown kv_scheme", lambda s: dict(body=chat_body(s, kv_scheme="kvq9")), 400, "invalid_kv_scheme", "kv_scheme"),
    ("wrong API key", lambda s: dict(body=chat_body(s), key="not-the-key"), 401, "invalid_api_key", None),
    ("no API key", lambda s: dict(body=chat_body(s), key=None), 401, "missing_api_key", None),
]


@pytest.mark.parametrize("name,build,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, name, build, status, code, param):
    kwargs = build(server)
    response = post(server, "/v1/chat/completions", kwargs.get("body"), key=kwargs.get("key", API_KEY),
                    raw=kwargs.get("raw"))
    assert_openai_error(response, status, code, param)
    assert server.alive()
    ok = post(server, "/v1/chat/completions", chat_body(server))
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_raises_the_matching_exceptions(server):
    import openai
    good = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        good.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                     max_tokens=server.max_context)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        good.completions.create(model=server.model, prompt="Hi", max_tokens=2, extra_body={"kv_scheme": "nope"})
    bad_key = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    assert server.alive()


def test_unknown_path_and_wrong_method(server):
    assert_openai_error(requests.get(f"http://127.0.0.1:{server.port}/v2/nothing", timeout=30), 404)
    assert_openai_error(requests.get(f"{server.base_url}/chat/completions", headers=Server.auth(), timeout=30), 405)
    assert server.alive()


def test_health_needs_no_key(server):
    response = requests.get(f"http://127.0.0.1:{server.port}/health", timeout=30)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
