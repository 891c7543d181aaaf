"""LLM calls through litellm: `provider::model` strings, key checks before any work, parallel calls with
a concurrency limit, retries with backoff on rate limits and transient errors, and a usage record.

    client = LLMClient(["openai::gpt-4.1", "anthropic::claude-sonnet-4-5"])
    client.complete("openai::gpt-4.1", [{"role": "user", "content": "..."}])

A local OpenAI-compatible server (vLLM, Ollama, the tests' recorded-response server) is
`openai::<model>` with `api_base="http://host:port/v1"`; it needs no key.
"""
from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# provider -> (litellm prefix, environment variables one of which must be set)
PROVIDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "openai": ("openai", ("OPENAI_API_KEY",)),
    "anthropic": ("anthropic", ("ANTHROPIC_API_KEY",)),
    "together": ("together_ai", ("TOGETHERAI_API_KEY", "TOGETHER_API_KEY")),
    "aws": ("bedrock", ("AWS_ACCESS_KEY_ID", "AWS_PROFILE")),
    "gcp": ("vertex_ai", ("VERTEXAI_PROJECT", "GOOGLE_APPLICATION_CREDENTIALS")),
}
_INFER = (("claude", "anthropic"), ("gpt", "openai"), ("o1", "openai"), ("o3", "openai"), ("o4", "openai"),
          ("gemini", "gcp"), ("meta-llama/", "together"), ("Qwen/", "together"), ("deepseek-ai/", "together"))


class LLMConfigError(ValueError):
    """A model string or credentials problem, reported before any work starts."""


class LLMCallError(RuntimeError):
    """A call that still failed after its retries."""


@dataclass(frozen=True)
class ModelSpec:
    """One configured model: `provider::name` as the user wrote it, and what litellm is given."""

    text: str
    provider: str
    name: str

    @property
    def litellm_model(self) -> str:
        return f"{PROVIDERS[self.provider][0]}/{self.name}"


def parse_model(text: str) -> ModelSpec:
    """`provider::model`, or a bare model name whose provider is inferred from its name."""
    provider, sep, name = text.partition("::")
    if not sep:
        name = text
        provider = next((p for prefix, p in _INFER if text.startswith(prefix)), "")
        if not provider:
            raise LLMConfigError(f"cannot infer the provider of model {text!r}; write provider::model with provider one "
                                 f"of {sorted(PROVIDERS)}")
    if provider not in PROVIDERS:
        raise LLMConfigError(f"unknown provider {provider!r} in {text!r}; choose one of {sorted(PROVIDERS)}")
    if not name:
        raise LLMConfigError(f"model string {text!r} names no model")
    return ModelSpec(text, provider, name)


def uses_api_base(spec: ModelSpec, api_base: str | None) -> bool:
    """A custom `api_base` is an OpenAI-compatible server: it serves the `openai::` models only."""
    return bool(api_base) and spec.provider == "openai"


def check_credentials(specs: Sequence[ModelSpec], api_base: str | None = None, env: dict[str, str] | None = None) -> None:
    """Raise one clear line naming the missing variable; models served by a custom `api_base` need no key."""
    env = os.environ if env is None else env
    for spec in specs:
        names = PROVIDERS[spec.provider][1]
        if not uses_api_base(spec, api_base) and not any(env.get(n) for n in names):
            local = " (or pass --api-base for a local OpenAI-compatible server)" if spec.provider == "openai" else ""
            raise LLMConfigError(f"model {spec.text}: set {' or '.join(names)}{local}")


@dataclass
class Usage:
    calls: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["per_model"] = {m: dict(counts) for m, counts in self.per_model.items()}
        return d


def usage_sum(a: dict[str, Any], b: dict[str, Any], sign: int = 1) -> dict[str, Any]:
    """`a + sign * b` field by field over `Usage.to_dict()` records (numbers, and `per_model` counts)."""
    out = {k: v for k, v in a.items() if k != "per_model"}
    for key, value in b.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            base = out.get(key, 0)
            out[key] = (base if isinstance(base, (int, float)) else 0) + sign * value
    models: dict[str, dict[str, Any]] = {}
    for source, factor in ((a.get("per_model"), 1), (b.get("per_model"), sign)):
        for model, counts in (source if isinstance(source, dict) else {}).items():
            mine = models.setdefault(model, {})
            for key, value in (counts if isinstance(counts, dict) else {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    mine[key] = mine.get(key, 0) + factor * value
    out["per_model"] = {m: c for m, c in models.items() if any(c.values())}
    return out


def reply_text(response: Any) -> str:
    """The first choice's text; a reply without one is a failed call (not retried)."""
    try:
        return response.choices[0].message.content or ""
    except (AttributeError, IndexError, KeyError, TypeError) as exc:
        raise LLMCallError(f"malformed reply without a choice ({type(exc).__name__}: {exc})") from None


def _transient(exc: BaseException) -> bool:
    import litellm

    kinds = tuple(k for k in (getattr(litellm, n, None) for n in (
        "RateLimitError", "APIConnectionError", "Timeout", "ServiceUnavailableError", "InternalServerError",
        "BadGatewayError")) if isinstance(k, type))
    return isinstance(exc, kinds)


class LLMClient:
    """Calls the configured models; thread-safe; `complete_many` runs calls in parallel."""

    def __init__(self, models: Sequence[str], api_base: str | None = None, max_concurrency: int = 8,
                 timeout_s: float = 300.0, max_retries: int = 4, backoff_s: float | None = None, temperature: float = 0.7,
                 completion_fn: Callable[..., Any] | None = None):
        if not models:
            raise LLMConfigError("no LLM models configured")
        self.specs = {m: parse_model(m) for m in models}
        check_credentials(list(self.specs.values()), api_base)
        self.api_base = api_base
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        # first retry waits ~backoff_s, doubling after each; $AUTOCOMP_LLM_BACKOFF_S sets the default
        self.backoff_s = backoff_s if backoff_s is not None else float(os.environ.get("AUTOCOMP_LLM_BACKOFF_S", 2.0))
        self.temperature = temperature
        self.usage = Usage()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max_concurrency)
        self._max_concurrency = max_concurrency
        self._completion = completion_fn

    def _litellm_completion(self) -> Callable[..., Any]:
        if self._completion is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
            try:
                import litellm
            except ImportError:
                raise LLMConfigError("LLM models need litellm: pip install 'autocomp-compile[llm]'") from None
            litellm.suppress_debug_info = True  # its "Give Feedback" banner on every failed call; the run reports failures
            self._completion = litellm.completion
        return self._completion

    def complete(self, model: str, messages: list[dict[str, str]]) -> str:
        """The text of one completion, retried with exponential backoff (and jitter) on transient errors."""
        spec = self.specs.get(model) or parse_model(model)
        completion = self._litellm_completion()
        # Retries are ours (counted, with backoff): the SDKs underneath must not retry on their own.
        kwargs: dict[str, Any] = {"model": spec.litellm_model, "messages": messages, "timeout": self.timeout_s,
                                  "temperature": self.temperature, "max_retries": 0, "num_retries": 0}
        if uses_api_base(spec, self.api_base):
            kwargs.update(api_base=self.api_base, api_key=os.environ.get("OPENAI_API_KEY", "none"))
        for attempt in range(self.max_retries + 1):
            t0 = time.perf_counter()
            try:
                with self._slots:
                    response = completion(**kwargs)
                text = reply_text(response)
            except Exception as exc:  # litellm raises its own hierarchy; only transient ones are retried
                if attempt < self.max_retries and _transient(exc):
                    with self._lock:
                        self.usage.retries += 1
                    time.sleep(self.backoff_s * (2 ** attempt) * (0.5 + random.random()))
                    continue
                with self._lock:
                    self.usage.failures += 1
                raise LLMCallError(f"{model}: {type(exc).__name__}: {str(exc)[:300]}") from exc
            self._record(spec, response, time.perf_counter() - t0)
            return text
        raise AssertionError("unreachable")

    def _record(self, spec: ModelSpec, response: Any, seconds: float) -> None:
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = 0.0
        try:
            import litellm

            cost = float(litellm.completion_cost(completion_response=response) or 0.0)
        except Exception:  # unknown model or local server: no price known
            cost = 0.0
        with self._lock:
            u = self.usage
            u.calls += 1
            u.prompt_tokens += prompt
            u.completion_tokens += completion
            u.cost_usd += cost
            u.seconds += seconds
            m = u.per_model.setdefault(spec.text, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0})
            m["calls"] += 1
            m["prompt_tokens"] += prompt
            m["completion_tokens"] += completion
            m["cost_usd"] += cost

    def complete_many(self, requests: Sequence[tuple[str, list[dict[str, str]]]]) -> list[str | LLMCallError]:
        """Several (model, messages) calls in parallel; a failed call is returned as its error, in place."""
        def one(req: tuple[str, list[dict[str, str]]]) -> str | LLMCallError:
            try:
                return self.complete(*req)
            except LLMCallError as exc:
                return exc
            except Exception as exc:  # a bug below must not end the whole search
                return LLMCallError(f"{req[0]}: {type(exc).__name__}: {str(exc)[:300]}")

        with ThreadPoolExecutor(max(1, min(self._max_concurrency, len(requests)))) as pool:
            return list(pool.map(one, requests))
