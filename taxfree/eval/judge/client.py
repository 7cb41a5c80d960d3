"""Talking to the judge: the `openai` client against any OpenAI-compatible endpoint.

Transport retries are the client's own: a timeout, a dropped connection, HTTP 408/409/429 and
5xx are retried up to `max_retries` times with exponential backoff (honouring a server's
Retry-After). What is left after that becomes one of:

- `JudgeUnavailable` (a TaxfreeError): the endpoint cannot serve this run (unreachable after the
  retries, the key refused, the model unknown). The stage stops with one line; everything
  judged so far is in the cache, so running again continues from there.
- `JudgeRejected`: the endpoint refused this one request (e.g. 400, the prompt too long for
  the judge's context). The caller records it as a failure of that item, with the error text.
"""

from __future__ import annotations

from taxfree.errors import TaxfreeError


class JudgeUnavailable(TaxfreeError):
    """The judge endpoint cannot be used; nothing more can be judged in this run."""


class JudgeRejected(Exception):
    """The endpoint answered this request with a client error; its message says why."""


class JudgeClient:
    def __init__(self, endpoint: str, model: str, api_key: str | None, timeout_s: float, max_retries: int,
                 temperature: float = 0.0, max_tokens: int = 2048):
        import openai

        self.endpoint, self.model = endpoint, model
        self.temperature, self.max_tokens = temperature, max_tokens
        # Servers without authentication (vLLM, llama.cpp by default) take any key; the client needs one.
        self._client = openai.OpenAI(base_url=endpoint, api_key=api_key or "no-key", timeout=timeout_s,
                                     max_retries=max_retries)
        self.max_retries = max_retries

    def close(self) -> None:
        self._client.close()

    def _unavailable(self, e: Exception) -> JudgeUnavailable:
        import openai

        where = f"judge endpoint {self.endpoint}"
        if isinstance(e, openai.AuthenticationError):
            return JudgeUnavailable(f"{where}: the API key was refused (HTTP 401; check evaluate.judge.api_key_env)")
        if isinstance(e, openai.PermissionDeniedError):
            return JudgeUnavailable(f"{where}: permission denied for model {self.model!r} (HTTP 403)")
        if isinstance(e, openai.NotFoundError):
            return JudgeUnavailable(f"{where}: no model {self.model!r} there, or not an OpenAI-compatible API "
                                    "(HTTP 404; check evaluate.judge.endpoint and .model)")
        if isinstance(e, openai.APITimeoutError):
            why = f"timed out after {self.max_retries} retries (evaluate.judge.timeout_s)"
        elif isinstance(e, openai.APIConnectionError):
            why = f"unreachable after {self.max_retries} retries ({e.__cause__ or e})"
        elif isinstance(e, openai.APIStatusError):
            why = f"HTTP {e.status_code} after {self.max_retries} retries ({_message(e)})"
        else:
            why = str(e)
        return JudgeUnavailable(" ".join(f"{where}: {why}; judgements so far are cached, run again to continue".split()))

    def check(self) -> None:
        """Raise JudgeUnavailable unless the endpoint answers (its model list, or a 404 for servers without one)."""
        import openai

        try:
            self._client.models.list()
        except openai.NotFoundError:
            return  # reachable; some servers do not list models
        except openai.OpenAIError as e:
            raise self._unavailable(e) from None

    def ask(self, messages: list[dict]) -> str:
        """The judge's reply text to one conversation."""
        import openai

        try:
            out = self._client.chat.completions.create(model=self.model, messages=messages, n=1,
                                                       temperature=self.temperature, max_tokens=self.max_tokens)
        except (openai.APITimeoutError, openai.APIConnectionError, openai.AuthenticationError,
                openai.PermissionDeniedError, openai.NotFoundError, openai.RateLimitError,
                openai.InternalServerError) as e:
            raise self._unavailable(e) from None
        except openai.APIStatusError as e:
            if e.status_code >= 500 or e.status_code in (408, 409, 429):
                raise self._unavailable(e) from None
            raise JudgeRejected(" ".join(f"HTTP {e.status_code}: {_message(e)}".split())) from None
        except openai.APIResponseValidationError as e:
            raise JudgeRejected(f"malformed response: {e}") from None
        choices = getattr(out, "choices", None) or []
        if not choices:
            raise JudgeRejected("the response has no choices")
        return choices[0].message.content or ""


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(e, "message", e))
