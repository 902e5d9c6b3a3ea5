"""The official `openai` Python client against vllm-router: chat, stream and non-stream."""
import openai
import pytest


@pytest.fixture()
def client(router_url):
    return openai.OpenAI(base_url=f"{router_url}/v1", api_key="unused", max_retries=0)


def test_chat_non_stream(client):
    seen = set()
    for i in range(3):
        resp = client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=3)
        assert resp.object == "chat.completion"
        assert resp.choices[0].message.content == "the of and "
        assert resp.usage.completion_tokens == 3
        seen.add(resp.system_fingerprint)
    # round_robin over three workers: three consecutive requests hit all three.
    assert seen == {"w0", "w1", "w2"}


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "stream please"}], max_tokens=5,
        stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "the of and to in "
    assert usage is not None and usage.completion_tokens == 5


def test_completion_and_models(client):
    resp = client.completions.create(model="sim-model", prompt="once upon a time", max_tokens=2)
    assert resp.choices[0].text == "the of "
    assert [m.id for m in client.models.list()] == ["sim-model"]


def test_router_error_is_an_openai_error(client, router_url):
    import httpx
    r = httpx.post(f"{router_url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
