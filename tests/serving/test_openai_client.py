"""The official `openai` client against `kvshard serve` with the demo model."""

import concurrent.futures
import time

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]


def test_completion(client, server):
    response = client.completions.create(model=server.model, prompt="The capital of France is",
                                         max_tokens=12, temperature=0)
    assert response.object == "text_completion"
    assert response.model == server.model
    choice = response.choices[0]
    assert choice.text.strip()
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 0
    assert 0 < response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_completion_stop_string(client, server):
    whole = client.completions.create(model=server.model, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0)
    text = whole.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(model=server.model, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_completion(client, server):
    response = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=12,
                                              temperature=0, seed=1)
    assert response.object == "chat.completion"
    message = response.choices[0].message
    assert message.role == "assistant"
    assert message.content.strip()
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens > 0


def test_streaming_chat_equals_non_streaming_at_temperature_zero(client, server):
    kwargs = dict(model=server.model, messages=MESSAGES, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert roles == ["assistant"]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 1, "the answer should arrive in several chunks"
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_completion_equals_non_streaming(client, server):
    kwargs = dict(model=server.model, prompt="Once upon a time", max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs)
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert text == whole.choices[0].text


def test_seeded_sampling_is_reproducible(client, server):
    kwargs = dict(model=server.model, messages=MESSAGES, max_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_32_concurrent_streaming_clients_all_finish(client, server):
    import openai
    clients = 32
    deadline_seconds = 480

    def one(i):
        c = openai.OpenAI(base_url=server.base_url, api_key=client.api_key, max_retries=0, timeout=deadline_seconds)
        stream = c.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
            max_tokens=4, temperature=0, stream=True)
        text, finish = [], None
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
                finish = choice.finish_reason or finish
        return "".join(text), finish

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(one, i) for i in range(clients)]
        results = [f.result(timeout=deadline_seconds) for f in futures]
    assert time.monotonic() - start < deadline_seconds
    assert len(results) == clients
    for text, finish in results:
        assert finish in ("stop", "length")
        assert text or finish == "stop"
    assert server.alive()
