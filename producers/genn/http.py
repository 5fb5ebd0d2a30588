"""The `http` backend: any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, llama.cpp
server, LM Studio, a hosted API) through the `openai` client (the `genn` extra).

Settings `[genn]`: `base_url`, `model`, `api_key_env` (the key is read from that environment
variable, never from the file), `timeout_s`, `retries` (the client's own retry with backoff
on connection errors, 408/409/429 and 5xx), `temperature`, `top_p`, `max_new_tokens`,
`model_sha256` (what the endpoint serves, when the operator knows it), `max_answer_bytes`
(4 MiB: the most of one answer that is read, error bodies included; the endpoint is asked for
an uncompressed answer and a compressed one is refused, so the bound holds for what is
decoded). Every failure of a request after its retries (refused connection, timeout, an error
status, a body that is not a chat completion) and every malformed answer becomes a candidate
with the reason; an answer larger than `max_answer_bytes`, or still arriving `timeout_s`
after its headers (a trickle that each read's timeout never catches), is cut off there, its
connection closed, and rejected with the reason; nothing raises out of `generate`.
"""

from __future__ import annotations

import logging
import os
import time

from scf.producers.genn import Candidate, CodeRequest, GenNError, GennSettings, Identity, extract_code

log = logging.getLogger("scf.genn.http")


def _capped_client(openai, limit: int, timeout_s: float):
    """The openai client's HTTP client, reading at most `limit` bytes of any answer and for at
    most `timeout_s` after its headers (the openai client itself reads a whole body, however
    large, and its timeout bounds each read, not the answer)."""
    import httpx2

    class Refused(openai.OpenAIError):  # an OpenAIError: the client passes it on as is, with no retry
        pass

    class Capped(httpx2.SyncByteStream):
        def __init__(self, inner, deadline: float) -> None:
            self.inner, self.deadline = inner, deadline

        def __iter__(self):
            seen = 0
            for chunk in self.inner:
                seen += len(chunk)
                if seen > limit:
                    raise Refused(f"answer larger than [genn] max_answer_bytes ({limit} bytes): cut off unread")
                if time.monotonic() > self.deadline:
                    raise Refused(f"answer still arriving {timeout_s:g}s after its headers ([genn] timeout_s): cut off")
                yield chunk

        def close(self) -> None:
            self.inner.close()

    def ask_identity(request) -> None:
        request.headers["Accept-Encoding"] = "identity"

    def cap(response) -> None:
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise Refused(f"answer compressed ({encoding[:40]}) though an uncompressed one was asked: its size cannot be bounded")
        declared = response.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            response.close()
            raise Refused(f"answer of {int(declared)} bytes, larger than [genn] max_answer_bytes ({limit} bytes): not read")
        response.stream = Capped(response.stream, time.monotonic() + timeout_s)

    return openai.DefaultHttpxClient(timeout=timeout_s, event_hooks={"request": [ask_identity], "response": [cap]}), Refused


class HttpGenerator:
    def __init__(self, settings: GennSettings) -> None:
        try:
            import openai
        except ImportError:
            raise GenNError("the http backend needs the openai client: pip install 'scf[genn]'") from None
        if not settings.model:
            raise GenNError("[genn] model is empty: name the model the endpoint serves (e.g. model = \"qwen2.5-coder-7b\")")
        if not settings.max_answer_bytes > 0:
            raise GenNError(f"[genn] max_answer_bytes = {settings.max_answer_bytes}: give the most bytes of one answer to read (e.g. 4194304)")
        key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        self._openai = openai
        self.settings = settings
        http, self._refused = _capped_client(openai, settings.max_answer_bytes, settings.timeout_s)
        self.client = openai.OpenAI(
            base_url=settings.base_url, api_key=key or "none", timeout=settings.timeout_s, max_retries=max(0, settings.retries),
            http_client=http,
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
        except self._refused as exc:
            return Candidate("", f"endpoint {s.base_url}: {exc}")
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
