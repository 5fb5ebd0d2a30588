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
with the reason; an answer larger than `max_answer_bytes`, or not complete 2 x `timeout_s`
after its connection was made (a trickle of headers or body that each read's timeout never
catches), is cut off there, its connection shut down, and rejected with the reason (a body
cut is not retried; headers cut count as a failed connection, retried); nothing raises out
of `generate`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from scf.producers.genn import Candidate, CodeRequest, GenNError, GennSettings, Identity, extract_code

log = logging.getLogger("scf.genn.http")


class _Bounded:
    """The openai client's HTTP client, reading at most `limit` bytes of any answer and shutting
    a connection down 2 x `timeout_s` after it was made (the openai client reads a whole body,
    however large, and its timeout bounds each read, not the answer: headers or a body
    trickled a byte at a time never end it). Connections are
    not kept alive: one per request, so each has its own deadline. `refused` is the error a
    cut answer raises (an OpenAIError: the client passes it on as is, with no retry); `cut`
    whether the last request's connection was shut down at its deadline."""

    def __init__(self, openai, limit: int, timeout_s: float) -> None:
        import httpx2

        class Refused(openai.OpenAIError):
            pass

        # twice the read timeout: a plain hang is the read timeout's ("no answer within"), a trickle this one's
        self.refused, self.cut, self._timer, self.cut_after = Refused, False, None, 2 * timeout_s

        owner = self

        class Capped(httpx2.SyncByteStream):
            def __init__(self, inner) -> None:
                self.inner = inner

            def __iter__(self):
                seen = 0
                try:
                    for chunk in self.inner:
                        seen += len(chunk)
                        if seen > limit:
                            raise Refused(f"answer larger than [genn] max_answer_bytes ({limit} bytes): cut off unread")
                        yield chunk
                except Refused:
                    raise
                except Exception:
                    if owner.cut:  # the deadline shut the connection down mid-answer: the endpoint's answer, not retried
                        raise Refused(f"answer still arriving {owner.cut_after:g}s after connecting (2 x [genn] timeout_s): cut off") from None
                    raise

            def close(self) -> None:
                owner._stop_timer()
                self.inner.close()

        def trace(name: str, info: dict) -> None:
            if name.endswith("connect_tcp.complete") or name.endswith("connect_unix_socket.complete"):
                sock = info["return_value"].get_extra_info("socket")
                if sock is not None:
                    self._stop_timer()
                    self._timer = threading.Timer(self.cut_after, self._shut, (sock,))
                    self._timer.daemon = True
                    self._timer.start()

        def ask(request) -> None:
            request.headers["Accept-Encoding"] = "identity"  # so the cap bounds what is decoded
            request.extensions = {**request.extensions, "trace": trace}

        def cap(response) -> None:
            encoding = response.headers.get("content-encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                response.close()
                raise Refused(f"answer compressed ({encoding[:40]}) though an uncompressed one was asked: its size cannot be bounded")
            declared = response.headers.get("content-length", "").strip()
            if declared.isdigit() and int(declared) > limit:
                response.close()
                raise Refused(f"answer of {int(declared)} bytes, larger than [genn] max_answer_bytes ({limit} bytes): not read")
            response.stream = Capped(response.stream)

        self.http = openai.DefaultHttpxClient(timeout=timeout_s, limits=httpx2.Limits(max_keepalive_connections=0),
                                              event_hooks={"request": [ask], "response": [cap]})

    def _shut(self, sock) -> None:
        self.cut = True  # before the shutdown: the blocked request fails as soon as it happens
        try:
            sock.shutdown(socket.SHUT_RDWR)  # a recv blocked on a trickle returns: the request fails
        except OSError:  # already closed (that request failed otherwise, e.g. timed out): nothing was cut
            self.cut = False

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def begin(self) -> None:
        self._stop_timer()
        self.cut = False


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
        self._bounded = _Bounded(openai, settings.max_answer_bytes, settings.timeout_s)
        self.client = openai.OpenAI(
            base_url=settings.base_url, api_key=key or "none", timeout=settings.timeout_s, max_retries=max(0, settings.retries),
            http_client=self._bounded.http,
        )
        self.identity = Identity(
            backend="http", model=settings.model, sha256=settings.model_sha256,
            sampling={"temperature": settings.temperature, "top_p": settings.top_p, "max_new_tokens": settings.max_new_tokens,
                      "base_url": settings.base_url},
        )

    def _one(self, request: CodeRequest, seed: int) -> Candidate:
        s, openai = self.settings, self._openai
        self._bounded.begin()
        try:
            r = self.client.chat.completions.create(
                model=s.model, messages=request.messages(), temperature=s.temperature, top_p=s.top_p,
                max_tokens=s.max_new_tokens, seed=seed, n=1,
            )
        except self._bounded.refused as exc:
            return Candidate("", f"endpoint {s.base_url}: {exc}")
        except openai.APITimeoutError:
            return Candidate("", self._cut_reason() or f"endpoint {s.base_url}: no answer within {s.timeout_s:g}s after {s.retries} retries")
        except openai.APIConnectionError as exc:
            return Candidate("", self._cut_reason() or f"endpoint {s.base_url}: cannot connect ({exc.__cause__ or exc}) after {s.retries} retries")
        except openai.APIStatusError as exc:
            return Candidate("", f"endpoint {s.base_url}: HTTP {exc.status_code}: {str(exc.message)[:200]}")
        except openai.APIResponseValidationError as exc:
            return Candidate("", f"endpoint {s.base_url}: not a chat completion ({str(exc)[:200]})")
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            return Candidate("", f"endpoint {s.base_url}: malformed response ({type(exc).__name__}: {str(exc)[:200]})")
        finally:
            self._bounded.begin()  # no deadline outlives its request
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

    def _cut_reason(self) -> str:
        s = self.settings
        if not self._bounded.cut:
            return ""
        return (f"endpoint {s.base_url}: no complete answer {self._bounded.cut_after:g}s after connecting (2 x [genn] timeout_s): "
                f"the connection was cut ({s.retries} retries)")

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
