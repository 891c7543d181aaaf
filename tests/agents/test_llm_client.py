"""The litellm client against a local recorded-response server: parsing, keys, retries, parallelism, usage."""
from __future__ import annotations

import pytest

from autocomp_compile.agents.llm_client import (
    LLMCallError, LLMClient, LLMConfigError, check_credentials, parse_model,
)
from tests.agents.llm_server import RecordedServer, Reply

pytest.importorskip("litellm")


def test_model_strings():
    assert parse_model("openai::gpt-4.1").litellm_model == "openai/gpt-4.1"
    assert parse_model("anthropic::claude-sonnet-4-5").litellm_model == "anthropic/claude-sonnet-4-5"
    assert parse_model("together::meta-llama/Llama-3.3-70B").litellm_model == "together_ai/meta-llama/Llama-3.3-70B"
    assert parse_model("aws::anthropic.claude-v2").litellm_model == "bedrock/anthropic.claude-v2"
    assert parse_model("gcp::gemini-2.5-pro").litellm_model == "vertex_ai/gemini-2.5-pro"
    assert parse_model("claude-opus-4").provider == "anthropic"  # inferred
    assert parse_model("gpt-5").provider == "openai"
    with pytest.raises(LLMConfigError, match="unknown provider"):
        parse_model("azuree::x")
    with pytest.raises(LLMConfigError, match="cannot infer"):
        parse_model("mystery-model")


def test_missing_key_names_the_variable():
    with pytest.raises(LLMConfigError, match="ANTHROPIC_API_KEY"):
        check_credentials([parse_model("anthropic::claude-x")], env={})
    check_credentials([parse_model("anthropic::claude-x")], env={"ANTHROPIC_API_KEY": "k"})
    check_credentials([parse_model("openai::local")], api_base="http://127.0.0.1:1/v1", env={})


@pytest.fixture
def server():
    replies = {}
    srv = RecordedServer(lambda body, n: replies.get(n, Reply(f"answer {n}")))
    srv.replies = replies
    yield srv
    srv.close()


def test_retries_rate_limits_then_succeeds(server):
    server.replies.update({0: Reply(status=429), 1: Reply(status=429), 2: Reply("finally")})
    client = LLMClient(["openai::test-model"], api_base=server.api_base, backoff_s=0.01)
    assert client.complete("openai::test-model", [{"role": "user", "content": "hi"}]) == "finally"
    assert client.usage.retries == 2 and client.usage.calls == 1 and client.usage.prompt_tokens == 10
    assert server.requests[-1]["messages"][0]["content"] == "hi"


def test_gives_up_after_the_retries(server):
    for i in range(10):
        server.replies[i] = Reply(status=429)
    client = LLMClient(["openai::test-model"], api_base=server.api_base, backoff_s=0.01, max_retries=2)
    with pytest.raises(LLMCallError, match="RateLimitError"):
        client.complete("openai::test-model", [{"role": "user", "content": "hi"}])
    assert len(server.requests) == 3 and client.usage.failures == 1


def test_parallel_calls_keep_order_and_report_failures_in_place(server):
    server.replies.update({i: Reply(f"r{i}", delay_s=0.2) for i in range(4)})
    client = LLMClient(["openai::a", "openai::b"], api_base=server.api_base, max_concurrency=4, max_retries=0)
    reqs = [("openai::a" if i % 2 else "openai::b", [{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    out = client.complete_many(reqs)
    assert sorted(out) == ["r0", "r1", "r2", "r3"]
    assert client.usage.per_model["openai::a"]["calls"] == 2 and client.usage.per_model["openai::b"]["calls"] == 2
    server.replies[4] = Reply(status=500)
    (err,) = client.complete_many([("openai::a", [{"role": "user", "content": "x"}])])
    assert isinstance(err, LLMCallError)


def _fake_client(reply, models=("openai::fake",), api_base="http://127.0.0.1:9/v1", **kw):
    calls = []

    def completion(**kwargs):
        calls.append(kwargs)
        return reply(kwargs)

    client = LLMClient(list(models), api_base=api_base, completion_fn=completion, backoff_s=0.01, **kw)
    return client, calls


def _response(choices):
    from types import SimpleNamespace as NS
    return NS(choices=choices, usage=NS(prompt_tokens=1, completion_tokens=1))


def test_a_reply_without_choices_is_a_failed_call_not_a_crash():
    client, calls = _fake_client(lambda kw: _response([]))
    with pytest.raises(LLMCallError, match="without a choice"):
        client.complete("openai::fake", [{"role": "user", "content": "x"}])
    assert len(calls) == 1 and client.usage.failures == 1  # not retried
    (err,) = client.complete_many([("openai::fake", [{"role": "user", "content": "x"}])])
    assert isinstance(err, LLMCallError)


def test_complete_many_returns_any_error_in_place(monkeypatch):
    client, _ = _fake_client(lambda kw: _response([]))
    monkeypatch.setattr(client, "complete", lambda *a: (_ for _ in ()).throw(KeyError("boom")))
    (err,) = client.complete_many([("openai::fake", [{"role": "user", "content": "x"}])])
    assert isinstance(err, LLMCallError) and "KeyError" in str(err)


def test_api_base_serves_only_the_openai_models_of_an_ensemble(monkeypatch):
    from types import SimpleNamespace as NS
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    models = ("openai::local-coder", "anthropic::claude-x")
    with pytest.raises(LLMConfigError, match="ANTHROPIC_API_KEY"):
        _fake_client(lambda kw: None, models)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    client, calls = _fake_client(lambda kw: _response([NS(message=NS(content="ok"))]), models)
    client.complete("anthropic::claude-x", [{"role": "user", "content": "x"}])
    client.complete("openai::local-coder", [{"role": "user", "content": "x"}])
    assert "api_base" not in calls[0] and "api_key" not in calls[0]
    assert calls[1]["api_base"] == "http://127.0.0.1:9/v1"
