"""The `http` backend: any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, llama.cpp
server, LM Studio, a hosted API) through the `openai` client (the `genn` extra).

Settings `[genn]`: `base_url`, `model`, `api_key_env` (the key is read from that environment
variable, never from the file), `timeout_s`, `retries` (the client's own retry with backoff
on connection errors, 408/409/429 and 5xx), `temperature`, `top_p`, `max_new_tokens`,
`model_sha256` (what the endpoint serves, when the operator knows it). Every failure of a
request after its retries (refused connection, timeout, an error status, a body that is not
a chat completion) and every malformed answer becomes a candidate with the reason; nothing
raises out of `generate`.
"""

from __future__ import annotations

import logging
import os

from scf.producers.genn import Candidate, CodeRequest, GenNError, GennSettings, Identity, extract_code

log = logging.getLogger("scf.genn.http")


class HttpGenerator:
    def __init__(self, settings: GennSettings) -> None:
        try:
            import openai
        except ImportError:
            raise GenNError("the http backend needs the openai client: pip install 'scf[genn]'") from None
        if not settings.model:
            raise GenNError("[genn] model is empty: name the model the endpoint serves (e.g. model = \"qwen2.5-coder-7b\")")
        key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        self._openai = openai
        self.settings = settings
        self.client = openai.OpenAI(
            base_url=settings.base_url, api_key=key or "none", timeout=settings.timeout_s, max_retries=max(0, settings.retries),
        )
        self.identity = Identity(
            backend="http", model=settings.model, sha256=settings.model_sha256,
            sampling={"temperature": settings.temperature, "top_p": settings.top_p, "max_new_tokens": settings.max_new_tokens,
                      "base_url": settings.base_url},
        )

    def _one(self, request: CodeRequest, seed: int) -> Candidate:
        s, openai = self.settings, self._openai
        try:
            r = self.client.chat.completions.create(
                model=s.model, messages=request.messages(), temperature=s.temperature, top_p=s.top_p,
                max_tokens=s.max_new_tokens, seed=seed, n=1,
            )
        except openai.APITimeoutError:
            return Candidate("", f"endpoint {s.base_url}: no answer within {s.timeout_s:g}s after {s.retries} retries")
        except openai.APIConnectionError as exc:
            return Candidate("", f"endpoint {s.base_url}: cannot connect ({exc.__cause__ or exc}) after {s.retries} retries")
        except openai.APIStatusError as exc:
            return Candidate("", f"endpoint {s.base_url}: HTTP {exc.status_code}: {str(exc.message)[:200]}")
        except openai.APIResponseValidationError as exc:
            return Candidate("", f"endpoint {s.base_url}: not a chat completion ({str(exc)[:200]})")
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            return Candidate("", f"endpoint {s.base_url}: malformed response ({type(exc).__name__}: {str(exc)[:200]})")
        choices = getattr(r, "choices", None)
        if not choices:
            return Candidate("", f"endpoint {s.base_url}: malformed response (no choices)")
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        if not isinstance(content, str):
            return Candidate("", f"endpoint {s.base_url}: malformed response (the message has no text content)")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): no event could carry it
            return Candidate("", f"endpoint {s.base_url}: malformed response (the text is not valid Unicode: lone surrogates)")
        c = extract_code(content)
        return c if c.code or c.error else Candidate(content, c.error)

    def generate(self, request: CodeRequest, n: int, seed: int) -> list[Candidate]:
        # one request per candidate with its own seed: servers differ in `n` support
        out = []
        for i in range(n):
            c = self._one(request, seed * 1000 + i)
            if c.error:
                log.info("genn http: candidate %d for %s rejected: %s", i, request.intent.intent_id, c.error)
            out.append(c)
        return out

    def close(self) -> None:
        self.client.close()


__all__ = ["HttpGenerator"]
