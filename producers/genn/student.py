"""The `student` backend: a packed code student (`scf-ternary-lm/1`, one safetensors file written
by `scf.ml.code_student.save_student`; docs/distill.md "The code student") writes the code,
with numpy only — no torch, no transformers.

    [genn] backend = "student", checkpoint = "<the student file>", model_sha256 = "<its sha256>" (optional)

The file is checked before use: its sha256 against `model_sha256` when one is configured,
then its format, packing and layers (`consumers.edge.ternary_lm.TernaryLM`, which runs the
network); each problem is one line naming the file and the fix. The tokenizer's files travel
in the file's metadata: `tokenizer.json` is read with the `tokenizers` package (a Rust wheel
with no torch) and the chat template (`chat_template.jinja`, or `tokenizer_config.json`'s
`chat_template`) is rendered with jinja2 in a sandbox the way transformers'
`apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, the
special tokens as variables, its `tojson`, `raise_exception` and guarded `namespace`; jinja2
3.1.6 or later: the template is the file's, untrusted), then encoded without
added special tokens — so the student is served the ids its teacher was trained and served
with (tests/test_genn_student.py compares them with transformers'). The user turn is
`scf.projections.cfr_prompt`'s, as for every backend: byte-identical to the CFR dataset's.

Sampling: `temperature`, `top_p`, `max_new_tokens` from `[genn]`, each candidate from a numpy
generator seeded with seed × 1000 + its index (as the `local` backend seeds torch), greedy at
temperature 0. An answer ends at `<|im_end|>`, `<|im_start|>` or the tokenizer's end of
sequence (`ternary_lm.stop_ids`). Every proposal names the backend `student`, the file's stem
and its sha256 (`Identity`), so the CFR dataset knows which student wrote it.

Needs `tokenizers` and `jinja2`: both come with `pip install 'scf[genn]'` (transformers and
TRL require them), or alone with `pip install tokenizers jinja2`.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from scf.producers.genn import Candidate, GenNError, GennSettings, Identity, answered

BACKEND = "student"
INSTALL = "pip install 'scf[genn]' (or just: pip install tokenizers jinja2; no torch needed)"
SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _version(text: str) -> tuple[int, ...]:
    """A version's leading numbers ("3.2.0rc1" → (3, 2, 0))."""
    import re

    return tuple(int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in text.split(".")[:3])


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json states it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def check_libraries() -> None:
    """`tokenizers` and jinja2 ≥ 3.1.6 importable, or one line saying what to install."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
        import tokenizers  # noqa: F401
    except ImportError as exc:
        raise GenNError(f"the student backend tokenises with `tokenizers` and renders the chat template with `jinja2` "
                        f"({exc.name} is missing): {INSTALL}") from None
    if _version(jinja2.__version__) < (3, 1, 6):  # the template is the file's: untrusted input to a sandbox
        raise GenNError(f"jinja2 {jinja2.__version__} has known sandbox escapes and the chat template comes from the student file: "
                        "pip install -U 'jinja2>=3.1.6'")


class ChatTokenizer:
    """The student file's tokenizer and chat template, without transformers."""

    def __init__(self, files: dict[str, str], where: str) -> None:
        check_libraries()
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        if "tokenizer.json" not in files:
            raise GenNError(f"{where} carries no tokenizer.json in its metadata: the file is damaged or not written by save_student")
        try:
            self.tok = Tokenizer.from_str(files["tokenizer.json"])
            config = json.loads(files.get("tokenizer_config.json") or "{}")
        except Exception as exc:  # noqa: BLE001 - an untrusted file: any decoding failure is named
            raise GenNError(f"{where}: its tokenizer does not load ({type(exc).__name__}: {str(exc)[:160]}): the file is damaged") from None
        if not isinstance(config, dict):
            raise GenNError(f"{where}: its tokenizer_config.json holds a {type(config).__name__}, not an object: the file is damaged")
        template = files.get("chat_template.jinja") or config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(template, str) or not template.strip():
            raise GenNError(f"{where} carries no chat template: the student cannot be served the teacher's prompts (the file is damaged)")
        self.special = {k: t for k in SPECIAL if (t := _token_text(config.get(k))) is not None}
        self.vocab = self.tok.get_vocab(with_added_tokens=True)

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # transformers' (no HTML escaping)
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class Namespace(jinja2.utils.Namespace):  # as transformers': no underscore-prefixed attributes stored
            def __init__(*args, **kwargs):
                self, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for name in attrs:
                    Namespace._check(name)
                jinja2.utils.Namespace.__init__(self, attrs)

            def __setitem__(self, name, value):
                Namespace._check(name)
                jinja2.utils.Namespace.__setitem__(self, name, value)

            @staticmethod
            def _check(name):
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError(f"a chat template may not store {name!r} on a namespace")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["namespace"] = Namespace
        try:
            self.template = env.from_string(template)
        except jinja2.exceptions.TemplateError as exc:
            raise GenNError(f"{where}: its chat template does not compile ({type(exc).__name__}: {str(exc)[:160]}): "
                            "the file is damaged or not written by save_student") from None
        try:
            self.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        except ValueError as exc:
            raise GenNError(f"{where}: {exc}: the file is damaged or not written by save_student") from None

    @property
    def eos(self) -> str | None:
        return self.special.get("eos_token")

    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat as text, ready for the assistant's answer (add_generation_prompt); a template
        that fails on these messages raises ValueError (a rejected candidate, not a crash)."""
        try:
            return self.template.render(messages=[dict(m) for m in messages], add_generation_prompt=True, tools=None, documents=None,
                                        **self.special)
        except Exception as exc:  # noqa: BLE001 - the file's template: whatever it raises is a rejected candidate, named
            raise ValueError(f"its chat template fails ({type(exc).__name__}: {str(exc)[:160]})") from None

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tok.encode(self.render(messages), add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


SIDE_BY_SIDE = 8  # answers decoded as one batch (each row's key/value cache: ≈ 33 MB at 2,048 positions for 512 × 8)


class StudentGenerator:
    """GenN's `student` backend (module docstring)."""

    def __init__(self, path: Path, *, temperature: float, top_p: float, max_new_tokens: int, sha256: str = "") -> None:
        from scf.bus.files import sha256_file
        from scf.consumers.edge.ternary import TernaryError
        from scf.consumers.edge.ternary_lm import TernaryLM, stop_ids

        check_libraries()  # before reading a file of tens of MB
        path = Path(path).expanduser()
        if not path.is_file():
            raise GenNError(f"code student file {path} does not exist: set [genn] checkpoint to a file written by `scf distill` "
                            "for the code model (scf-ternary-lm/1)")
        digest, _ = sha256_file(path)
        if sha256 and digest != sha256.lower():
            raise GenNError(f"{path} has sha256 {digest}, not the configured {sha256} ([genn] model_sha256): "
                            "give the file that was configured, or correct model_sha256")
        try:
            self.lm = TernaryLM(path)
        except TernaryError as exc:
            raise GenNError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - an untrusted file: safetensors' errors (not one class) are named in one line
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            raise GenNError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {first}): "
                            "give a code student written by save_student (scf-ternary-lm/1)") from None
        try:
            files = json.loads(self.lm.metadata.get("tokenizer") or "{}")
        except ValueError:
            files = None
        if not isinstance(files, dict):
            raise GenNError(f"{path}: its tokenizer metadata does not decode: the file is damaged")
        self.tokenizer = ChatTokenizer(files, str(path))
        rows, top = self.lm.embed.shape[0], max(self.tokenizer.vocab.values(), default=-1)
        if top >= rows:
            raise GenNError(f"{path}: its tokenizer's ids reach {top}, its embedding has {rows} rows: the file is damaged")
        self.path = path
        self.stops = stop_ids(self.tokenizer.vocab, self.tokenizer.eos)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.lock = threading.Lock()  # one sequence at a time: the runtime's key/value cache is its state
        self.identity = Identity(backend=BACKEND, model=path.stem, sha256=digest,
                                 sampling={"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens})

    def completions(self, messages: list[dict[str, str]], seeds: list[int]) -> list[list[int]]:
        """One answer's token ids per seed (the last a stop id when the answer ended before the
        limit), decoded side by side (`TernaryLM.generate_many`: each the answer its seed gives alone)."""
        ids = self.tokenizer.prompt_ids(messages)
        room = self.lm.max_positions - len(ids)
        if room <= 0:
            raise ValueError(f"the prompt has {len(ids)} tokens, the student {self.lm.max_positions} positions")
        seeds, out = list(seeds), []
        with self.lock:
            for i in range(0, len(seeds), SIDE_BY_SIDE):  # the cache grows with the rows: at most SIDE_BY_SIDE at once
                out += self.lm.generate_many(ids, seeds[i : i + SIDE_BY_SIDE], min(self.max_new_tokens, room), self.stops,
                                             temperature=self.temperature, top_p=self.top_p)  # fmt: skip
        return out

    def completion(self, messages: list[dict[str, str]], seed: int) -> list[int]:
        """The answer's token ids (the last a stop id when the answer ended before the limit)."""
        return self.completions(messages, [seed])[0]

    def answer(self, messages: list[dict[str, str]], seed: int) -> str:
        return self.tokenizer.decode(self.completion(messages, seed))

    def answers_many(self, prompts: list[list[dict[str, str]]], n: int, seed: int) -> list[list[str]]:
        """`n` answers to each prompt (the k-th of all from seed × 1000 + k), a prompt's decoded
        side by side; a prompt whose answers cannot be generated gets empty ones (no code:
        judged as such)."""
        out = []
        for j, messages in enumerate(prompts):
            try:
                texts = self.texts(messages, [seed * 1000 + j * n + i for i in range(n)])
            except (ValueError, FloatingPointError, MemoryError):
                texts = [""] * n
            out.append(texts)
        return out

    def texts(self, messages: list[dict[str, str]], seeds: list[int]) -> list[str]:
        """One answer's text per seed, decoded side by side (`completions`)."""
        return [self.tokenizer.decode(c) for c in self.completions(messages, seeds)]

    def generate(self, request, n: int, seed: int) -> list[Candidate]:
        return answered(self.answer, request, n, seed, (ValueError, FloatingPointError, MemoryError), many=self.texts)

    def close(self) -> None:
        pass


def open_student(settings: GennSettings) -> StudentGenerator:
    if not settings.checkpoint:
        raise GenNError("[genn] checkpoint is empty: give the code student file (scf-ternary-lm/1) for the student backend, or run "
                        "`scf run genn --backend student`, which fetches the promoted student (`scf genn model --promoted --student`)")
    return StudentGenerator(Path(settings.checkpoint), temperature=settings.temperature, top_p=settings.top_p,
                            max_new_tokens=settings.max_new_tokens, sha256=settings.model_sha256)


# --------------------------------------------------------------------------- on the bus: published, judged, promoted, served

PROMOTED_STUDENT_DIR = "genn-student-{alias}"  # model_zoo/genn-student-edge: the promoted code student, as fetched
STUDENT_FILE = "student.safetensors"
TEACHER_KEY = "teacher_checkpoint_id"  # a lineage entry's key naming the teacher's checkpoint (optional in the file)
STUDENT_JOB_PREFIX = "distill-"  # as an EBDM student's: job distill-<teacher checkpoint id> (producers/verify.py)


def student_format(path: Path) -> str | None:
    """The format a safetensors file states in its metadata (None: unreadable, no format)."""
    from scf.consumers.edge.ternary import read_metadata

    try:
        return read_metadata(path).get("format")
    except Exception:  # noqa: BLE001 - unreadable is "not a student"; the caller names the file
        return None


def is_student_file(path: Path) -> bool:
    """Whether `path` is a code student file (`scf-ternary-lm/1`, by its stated format)."""
    from scf.consumers.edge.ternary_lm import FORMAT

    return Path(path).is_file() and student_format(Path(path)) == FORMAT


def lineage_teacher(metadata: dict[str, str]) -> str | None:
    """The teacher's checkpoint id where the file's lineage states one (`teacher_checkpoint_id`
    in its last entry that has it), else None."""
    try:
        lineage = json.loads(metadata.get("lineage") or "[]")
    except ValueError:
        return None
    found = [e[TEACHER_KEY] for e in lineage if isinstance(lineage, list) and isinstance(e, dict) and isinstance(e.get(TEACHER_KEY), str)]
    return found[-1] if found else None


def teacher_of(job_id: str) -> str | None:
    """The teacher a code student's checkpoint.produced names (job `distill-<teacher id>`)."""
    return (job_id.removeprefix(STUDENT_JOB_PREFIX) or None) if job_id.startswith(STUDENT_JOB_PREFIX) else None


def _file_metrics(metadata: dict[str, str]) -> dict[str, float]:
    """The finite numbers among the file's `metrics` (what its distillation measured)."""
    import math

    try:
        metrics = json.loads(metadata.get("metrics") or "{}")
    except ValueError:
        return {}
    if not isinstance(metrics, dict):
        return {}
    return {str(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


async def _code_model_produced(bus, checkpoint_id: str):
    """The checkpoint.produced.genn event of `checkpoint_id`, or None."""
    from scf.bus import events as ev
    from scf.bus.codec import Codec
    from scf.bus.reader import read
    from scf.producers.verify import CODE_DOMAIN

    codec = Codec([ev.CheckpointProduced])
    found = None
    for msg in await read(bus, "CHECKPOINTS", f"checkpoint.produced.{CODE_DOMAIN}"):
        e = codec.decode(msg.data)
        if isinstance(e, ev.CheckpointProduced) and e.data.checkpoint_id == checkpoint_id:
            found = e
    return found


async def publish_code_student(bus, settings, path: Path, *, teacher: str | None = None, job_id: str | None = None):
    """`scf genn publish FILE.safetensors`: a code student (`scf-ternary-lm/1`), checked as the
    student backend opens it, put in the artifact store as it is and published as
    `checkpoint.produced.genn` with job `distill-<teacher checkpoint id>` (`teacher`, else the
    file's lineage's `teacher_checkpoint_id`; with none known: `genn-student-<sha256>`). The
    daemon judges it with this backend on held-out contracts against its teacher's rates and
    promotes it to the student alias (`edge`). Ids derive from the job and the file's digest:
    publishing twice is one event."""
    import asyncio

    from scf.bus.files import sha256_file
    from scf.consumers.edge.ternary import read_metadata
    from scf.consumers.edge.ternary_lm import FORMAT
    from scf.producers.genn.local import publish_checkpoint
    from scf.producers.verify import CODE_DOMAIN

    path = Path(path).expanduser()
    if not is_student_file(path):
        raise GenNError(f"{path} is not a code student (format {student_format(path)!r}, expected {FORMAT!r}): give a file written by "
                        "save_student, or a fine-tuned code model's directory")
    await asyncio.to_thread(StudentGenerator, path, temperature=0.0, top_p=1.0, max_new_tokens=1)  # a damaged file: refused here, unpublished
    meta = await asyncio.to_thread(read_metadata, path)
    stated = lineage_teacher(meta)
    teacher = teacher or stated
    if teacher:
        if stated and stated != teacher:
            raise GenNError(f"--teacher {teacher}, but {path}'s lineage names {stated}: give the student's own teacher (or leave --teacher out)")
        if await _code_model_produced(bus, teacher) is None:
            raise GenNError(f"no code model {teacher} on the bus (no checkpoint.produced.{CODE_DOMAIN}): give the checkpoint id "
                            "`scf genn publish DIR` printed for the student's teacher")
        job = f"{STUDENT_JOB_PREFIX}{teacher}"
        if job_id and job_id != job:
            raise GenNError(f"--job {job_id}: a code student's job is {job} (it names its teacher): leave --job out")
    else:
        if job_id and job_id.startswith(STUDENT_JOB_PREFIX):
            raise GenNError(f"--job {job_id}: a distill- job names the student's teacher: give --teacher CHECKPOINT_ID instead")
        job = ""
    sha, _ = await asyncio.to_thread(sha256_file, path)
    job = job or job_id or f"genn-student-{sha[:16]}"
    return await publish_checkpoint(bus, settings, path, f"genn/student-{sha[:16]}.safetensors", {"format": FORMAT}, job, _file_metrics(meta))


async def fetch_promoted_student(bus, settings, *, alias: str = "edge") -> tuple[Path, Any]:
    """The code student at the head of `alias` (checkpoint.promoted.genn, kind `code`), fetched
    (sha256 and size checked by the store against the promotion) into
    model_zoo/genn-student-<alias>/student.safetensors with `scf-promoted.json` naming it;
    already there with that digest: not fetched again. Returns (the file, the promotion)."""
    import asyncio
    import os

    from scf.bus.files import sha256_file
    from scf.bus.ids import subject_token
    from scf.consumers.edge.ternary_lm import FORMAT
    from scf.producers.genn.local import fetch_head, promoted_head, promoted_marker
    from scf.producers.verify import CODE

    head = await promoted_head(bus, alias, kind=CODE, what="code student", publish="scf genn publish FILE.safetensors")
    directory = Path(settings.path("model_zoo", PROMOTED_STUDENT_DIR.format(alias=subject_token(alias))))
    dest, marker = directory / STUDENT_FILE, directory / "scf-promoted.json"
    want = head.sha256.removeprefix("sha256:").lower()
    if marker.is_file() and dest.is_file() and json.loads(marker.read_text()).get("checkpoint_id") == head.checkpoint_id \
            and (await asyncio.to_thread(sha256_file, dest))[0] == want:
        return dest, head
    path = await fetch_head(bus, settings, head)
    if student_format(path) != FORMAT:
        raise GenNError(f"the head of {alias!r} in genn, {head.checkpoint_id}, is not a code student (format {student_format(path)!r}): "
                        f"fetch it with `scf genn model --promoted --alias {alias}` (a code model)")
    directory.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    marker.write_text(promoted_marker(head))
    return dest, head


__all__ = ["BACKEND", "ChatTokenizer", "StudentGenerator", "check_libraries", "open_student", "publish_code_student",
           "fetch_promoted_student", "is_student_file", "lineage_teacher", "teacher_of", "PROMOTED_STUDENT_DIR"]
