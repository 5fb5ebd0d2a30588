"""The weekly release: the best production checkpoint per domain, packaged with its cards,
metrics and lineage, described by an in-toto Statement v1 with a SLSA provenance v1
predicate in a DSSE envelope signed with the release key (docs/proofs.md).

    $SCF_HOME/release_history/week-YYYY-MM-DD/      (the Monday of the ISO week, UTC)
      release.json                 what was selected, from which archive rows
      <domain>/model_card.md       per selected checkpoint
      <domain>/metrics.json
      <domain>/dataset_card.md
      <domain>/lineage.json        the archive sequence ranges of its events
      RELEASE_NOTES.md
      provenance.intoto.json       the in-toto Statement (subjects: every file above, sha256)
      provenance.dsse.json         the DSSE envelope over it, Ed25519 (role `release`)

Everything is a function of the archive rows published before the week's end and of the
release key (Ed25519 signatures are deterministic): building the same week again gives the
same bytes, so a second run either reproduces the release byte for byte or is refused.
`verify_release` needs only the directory and the release public key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from scf.bus import events as ev
from scf.bus.errors import SCFError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://scf.local/release/weekly/v1"
ENVELOPE = "provenance.dsse.json"
STATEMENT = "provenance.intoto.json"


class ReleaseError(SCFError):
    """A release cannot be built or does not verify (the message says which and why)."""


# --------------------------------------------------------------------------- selection


@dataclass
class Candidate:
    checkpoint_id: str
    domain: str
    uri: str = ""
    sha256: str = ""
    size: int = 0
    job_id: str = ""
    config_hash: str = ""
    train_metrics: dict[str, float] = field(default_factory=dict)
    verified_metrics: dict[str, float] = field(default_factory=dict)
    version: int = 0
    promoted_at: int = 0  # µs
    seqs: list[int] = field(default_factory=list)  # CHECKPOINTS sequences of its events
    job_seqs: list[int] = field(default_factory=list)  # TRAINING sequences of its job's events
    data: dict = field(default_factory=dict)  # the job's data selection (FOSSILS range), as dispatched
    kind: str = ""  # the promotion's model kind: ebdm | optimiser | code ("" before kinds: see `kind_of`)


CODE_DOMAIN = "genn"  # as producers/verify.py: code models' domain (a projection does not import producers)


def kind_of(c: Candidate) -> str:
    """The candidate's model kind; a promotion before kinds existed was an EBDM's (a code model's in `genn`)."""
    return c.kind or ("code" if c.domain == CODE_DOMAIN else "ebdm")


def entry_of(c: Candidate) -> str:
    """Its name in the release: the domain for the domain's first kind (an EBDM; a code model in
    `genn`), as releases before kinds named it; `<domain>/<kind>` for another kind."""
    first = "code" if c.domain == CODE_DOMAIN else "ebdm"
    return c.domain if kind_of(c) == first else f"{c.domain}/{kind_of(c)}"


# each kind is ranked by its own measure (smaller is better), never one kind against another
MEASURES = {
    "ebdm": "held-out `heldout_dsm`, then training `loss`",
    "optimiser": "held-out `decision_regret` (the share of achievable savings its decisions miss), else the learned "
                 "cost's held-out error `cost_heldout_mae_rel`, then training `loss`",
    "code": "held-out `code_mean_reward`, then `code_sandbox_pass_rate`, then `code_gate_pass_rate` (larger is better)",
}


def selection_key(c: Candidate) -> tuple:
    """How production checkpoints of one kind are ranked (smaller is better; `MEASURES`): an
    EBDM by the held-out denoising score-matching loss the daemon's verification measured
    (`heldout_dsm`), else the training `loss`; a learned optimiser by its held-out decision
    regret, else its learned cost's held-out error; a code model by its held-out mean reward,
    sandbox and gate pass rates; then the newest promotion. Kinds are never ranked against
    each other (`select` picks one per domain and kind)."""
    inf = float("inf")
    v, t = c.verified_metrics, c.train_metrics
    kind = kind_of(c)
    if kind == "optimiser":
        head: tuple = (v.get("decision_regret", inf), v.get("cost_heldout_mae_rel", inf), t.get("loss", inf))
    elif kind == "code":
        head = tuple(-v.get(m, -inf) for m in ("code_mean_reward", "code_sandbox_pass_rate", "code_gate_pass_rate"))
    else:
        head = (v.get("heldout_dsm", inf), t.get("loss", inf))
    return (*head, -c.promoted_at, c.checkpoint_id)


def week_of(day: dt.date) -> tuple[dt.date, dt.datetime]:
    """(the Monday of `day`'s ISO week, the week's end: the next Monday 00:00 UTC)."""
    monday = day - dt.timedelta(days=day.weekday())
    end = dt.datetime.combine(monday + dt.timedelta(days=7), dt.time(), tzinfo=dt.timezone.utc)
    return monday, end


def candidates(store, end: dt.datetime) -> tuple[dict[str, Candidate], dict[str, int]]:
    """Checkpoints promoted to production before `end`, by id; and the archive position used
    (the last CHECKPOINTS sequence before `end`)."""
    import pyarrow as pa
    import pyarrow.compute as pac

    table = store.read("CHECKPOINTS")
    end_us = int(end.timestamp() * 1_000_000)
    table = table.filter(pac.less(table.column("published_at").cast(pa.int64()), end_us))
    by_id: dict[str, Candidate] = {}
    promoted: set[str] = set()
    last_seq = 0
    dec = {
        "checkpoint.produced": msgspec.json.Decoder(ev.CheckpointInfo),
        "checkpoint.verified": msgspec.json.Decoder(ev.CheckpointVerification),
        "checkpoint.promoted": msgspec.json.Decoder(ev.Promotion),
    }
    cols = [table.column(n).to_pylist() for n in ("seq", "type", "payload")]
    pub = table.column("published_at").cast(pa.int64()).to_pylist()
    for seq, typ, payload, at in zip(*cols, pub):
        last_seq = max(last_seq, seq)
        d = dec.get(typ)
        if d is None:
            continue
        try:
            data = d.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # not ours to judge here: the views show it
        c = by_id.setdefault(data.checkpoint_id, Candidate(data.checkpoint_id, data.domain))
        c.seqs.append(seq)
        if isinstance(data, ev.CheckpointInfo):
            c.uri, c.sha256, c.size, c.job_id = data.uri, data.sha256, data.size, data.job_id
            c.config_hash, c.train_metrics = data.config_hash, dict(data.metrics)
        elif isinstance(data, ev.CheckpointVerification):
            c.verified_metrics = dict(data.metrics)
        elif data.alias == "production":
            promoted.add(data.checkpoint_id)
            c.version, c.promoted_at, c.kind = data.version, at, data.kind
            c.uri, c.sha256 = c.uri or data.uri, c.sha256 or data.sha256
    chosen = {k: v for k, v in by_id.items() if k in promoted}
    jobs = _jobs(store, end_us, {c.job_id for c in chosen.values() if c.job_id})
    for c in chosen.values():
        c.job_seqs, c.data = jobs.get(c.job_id, ([], {}))
    return chosen, {"CHECKPOINTS": last_seq}


def _jobs(store, end_us: int, wanted: set[str]) -> dict[str, tuple[list[int], dict]]:
    """For each wanted job id: the TRAINING sequences of its events and its data selection."""
    import pyarrow as pa
    import pyarrow.compute as pac

    table = store.read("TRAINING")
    table = table.filter(pac.less(table.column("published_at").cast(pa.int64()), end_us))
    out: dict[str, tuple[list[int], dict]] = {}
    spec = msgspec.json.Decoder(ev.JobSpec)
    cols = [table.column(n).to_pylist() for n in ("seq", "subject", "type", "payload")]
    pub = table.column("published_at").cast(pa.int64()).to_pylist()
    for seq, subject, typ, payload, at in zip(*cols, pub):
        job_id = subject.rsplit(".", 1)[-1]
        if job_id not in wanted:
            continue
        seqs, data = out.setdefault(job_id, ([], {}))
        seqs.append(seq)
        if typ == "job.dispatched" and not data:
            try:
                sel = spec.decode(payload).data
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if sel is not None:
                data.update(msgspec.structs.asdict(sel))
                if not sel.end_seq:  # "up to the last at dispatch time": resolve it from the archive
                    data["end_seq"] = _last_seq_before(store, sel.stream, at)
    return out


def _last_seq_before(store, stream: str, t_us: int) -> int:
    import pyarrow as pa
    import pyarrow.compute as pac
    import pyarrow.parquet as pq

    last = 0
    for f in store.files(stream):
        t = pq.read_table(f.path, columns=["seq", "published_at"])
        mask = pac.less_equal(t.column("published_at").cast(pa.int64()), t_us)
        seqs = t.column("seq").filter(mask)
        if len(seqs):
            last = max(last, pac.max(seqs).as_py())
    return last


def select(cands: dict[str, Candidate]) -> dict[str, Candidate]:
    """The best candidate per domain and model kind, by `entry_of` (each kind by its own measure)."""
    best: dict[str, Candidate] = {}
    for c in cands.values():
        e = entry_of(c)
        if e not in best or selection_key(c) < selection_key(best[e]):
            best[e] = c
    return dict(sorted(best.items()))


# --------------------------------------------------------------------------- DSSE


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def dsse_sign(payload: bytes, key) -> bytes:
    sig = key.sign(pae(PAYLOAD_TYPE, payload))
    env = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(), "signatures": [{"keyid": key.kid, "sig": sig}]}
    return (json.dumps(env, indent=2, sort_keys=True) + "\n").encode()


def dsse_open(envelope: bytes, public_raw: bytes) -> bytes:
    """The payload of a DSSE envelope signed by `public_raw` (checked before it is parsed)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        env = json.loads(envelope)
        payload = base64.b64decode(env["payload"], validate=True)
        ptype = env["payloadType"]
        sigs = env["signatures"]
    except (ValueError, KeyError, TypeError):
        raise ReleaseError(f"{ENVELOPE} is not a DSSE envelope (payloadType, payload, signatures)") from None
    if ptype != PAYLOAD_TYPE:
        raise ReleaseError(f"{ENVELOPE} carries {ptype!r}, not an in-toto statement")
    pub = Ed25519PublicKey.from_public_bytes(public_raw)
    for s in sigs if isinstance(sigs, list) else []:
        try:
            pub.verify(base64.b64decode(s["sig"], validate=True), pae(ptype, payload))
            return payload
        except (InvalidSignature, ValueError, KeyError, TypeError):
            continue
    raise ReleaseError(f"{ENVELOPE} is not signed by the release key given: the release was altered or signed by another key")


# --------------------------------------------------------------------------- building


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _files(c: Candidate, week: str, lineage: dict) -> dict[str, bytes]:
    entry, kind = entry_of(c), kind_of(c)
    d = entry.replace(":", "_").replace("/", "_")
    head = 2 if kind == "ebdm" else 3
    metrics = {"verified": c.verified_metrics, "training": c.train_metrics, "selection_key": list(selection_key(c)[:head])}
    model = {
        "ebdm": "energy-based diffusion model (EBDM) over the domain's fossils",
        "optimiser": "learned optimiser (`scf-opt/1`: a proposal network, repaired to the domain's constraints; what edge sites run)",
        "code": "code model (the foundry's generator of controllers)",
    }.get(kind, f"model of kind {kind}")
    card = (
        f"# Model card: {entry}, {week}\n\n"
        f"- checkpoint: `{c.checkpoint_id}` (production version {c.version})\n"
        f"- artifact: `{c.uri}`, sha256 `{c.sha256}`, {c.size} bytes\n"
        f"- model: {model}; training job `{c.job_id}`, config `{c.config_hash}`\n"
        f"- selected by: `scf.projections.release.selection_key` ({MEASURES.get(kind, MEASURES['ebdm'])})\n"
        f"- held-out metrics: {json.dumps(c.verified_metrics, sort_keys=True)}\n"
        f"- limits: metrics are the daemon's held-out evaluation, not decision quality in the field\n"
    )
    sel = c.data
    span = (
        f"{sel.get('stream', 'FOSSILS')} sequences {sel.get('start_seq', 1)}–{sel.get('end_seq') or 'the end at dispatch'}"
        f"{', subject ' + sel['subject'] if sel.get('subject') else ''}, {sel.get('count', 0)} fossils"
        if sel else "not recorded (the job's dispatch event is not in the archive)"
    )
    dataset = (
        f"# Dataset card: {c.domain}, {week}\n\n"
        f"- source: fossils of `{c.domain}`, as the training job `{c.job_id}` selected them: {span}\n"
        f"- held-out split: the daemon's hash split of fossil subjects (`heldout`)\n"
        f"- lineage: the archive sequence ranges in `lineage.json`; every row is a leaf of the transparency log\n"
    )
    return {
        f"{d}/model_card.md": card.encode(),
        f"{d}/metrics.json": _json(metrics),
        f"{d}/dataset_card.md": dataset.encode(),
        f"{d}/lineage.json": _json(lineage),
    }


def build(store, day: dt.date, key, *, log_checkpoint: str | None = None) -> dict[str, bytes]:
    """Every file of the week's release, as bytes (nothing written)."""
    monday, end = week_of(day)
    week = f"week-{monday.isoformat()}"
    cands, position = candidates(store, end)
    chosen = select(cands)
    if not chosen:
        raise ReleaseError(f"no checkpoint was promoted to production before {end:%Y-%m-%d %H:%M} UTC: nothing to release for {week}")
    files: dict[str, bytes] = {}
    domains = {}
    for domain, c in chosen.items():
        archive = {"CHECKPOINTS": [min(c.seqs), max(c.seqs)]}
        if c.job_seqs:
            archive["TRAINING"] = [min(c.job_seqs), max(c.job_seqs)]
        if c.data:
            archive[c.data.get("stream", "FOSSILS")] = [c.data.get("start_seq", 1), c.data.get("end_seq", 0)]
        lineage = {
            "checkpoint_id": c.checkpoint_id, "job_id": c.job_id, "archive": archive, "data_selection": c.data,
            "sequences": {"CHECKPOINTS": sorted(c.seqs), "TRAINING": sorted(c.job_seqs)},
        }
        files.update(_files(c, week, lineage))
        domains[domain] = {"checkpoint_id": c.checkpoint_id, "uri": c.uri, "sha256": c.sha256, "size": c.size, "version": c.version}
    manifest = {"week": week, "until": end.isoformat(), "archive_position": position, "domains": domains}
    if log_checkpoint:
        manifest["transparency_log_checkpoint"] = log_checkpoint
    files["release.json"] = _json(manifest)
    notes = [f"# SCF release {week}\n", f"Production checkpoints as of {end:%Y-%m-%d} 00:00 UTC, the best per domain"
             f"{' and model kind' if any(entry_of(c) != c.domain for c in chosen.values()) else ''}:\n"]
    for domain, c in chosen.items():
        notes.append(f"- **{domain}**: `{c.checkpoint_id}` v{c.version}, held-out {json.dumps(c.verified_metrics, sort_keys=True)}")
    notes.append("\nVerify offline: `scf release verify DIR --key release.pub`.\n")
    files["RELEASE_NOTES.md"] = "\n".join(notes).encode()
    subjects = [{"name": name, "digest": {"sha256": hashlib.sha256(data).hexdigest()}} for name, data in sorted(files.items())]
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"week": week},
                "internalParameters": {"selection": "scf.projections.release.selection_key", "archive_position": position},
                "resolvedDependencies": [
                    {"uri": c.uri, "digest": {"sha256": c.sha256}, "name": c.checkpoint_id} for c in chosen.values()
                ],
            },
            "runDetails": {
                "builder": {"id": "https://scf.local/release/weekly"},
                "metadata": {"invocationId": week, "finishedOn": end.isoformat().replace("+00:00", "Z")},
            },
        },
    }
    files[STATEMENT] = _json(statement)
    files[ENVELOPE] = dsse_sign(files[STATEMENT], key)
    return files


@dataclass
class ReleaseResult:
    directory: Path
    status: str  # "written" | "reproduced"
    domains: list[str]
    envelope_sha256: str

    def line(self) -> str:
        verb = "wrote" if self.status == "written" else "reproduced byte for byte (unchanged)"
        return f"{verb} {self.directory} ({', '.join(self.domains)})"


def weekly(store, history: Path, day: dt.date, key, *, log_checkpoint: str | None = None) -> ReleaseResult:
    """Write the week's release under `history`, or check that the one there is the same."""
    files = build(store, day, key, log_checkpoint=log_checkpoint)
    week = json.loads(files["release.json"])["week"]
    target = Path(history) / week
    domains = sorted(json.loads(files["release.json"])["domains"])
    digest = hashlib.sha256(files[ENVELOPE]).hexdigest()
    if target.exists():
        have = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
        if have != files:
            changed = sorted(set(have) ^ set(files) | {k for k in have.keys() & files.keys() if have[k] != files[k]})
            raise ReleaseError(
                f"{target} exists and differs ({', '.join(changed[:3])}): releases are immutable; "
                f"a week is released once (move it away only if you mean to replace a published release)"
            )
        return ReleaseResult(target, "reproduced", domains, digest)
    Path(history).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{week}.", dir=history))
    try:
        for name, data in files.items():
            p = tmp / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            os.chmod(p, 0o444)
        os.rename(tmp, target)  # all or nothing; refuses if another run got there first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReleaseResult(target, "written", domains, digest)


# --------------------------------------------------------------------------- verifying


def verify_release(directory: Path, public_raw: bytes, *, log_proof: bytes | None = None, log_key: str | None = None) -> dict:
    """Check a release offline: the envelope's signature (before parsing its payload), the
    statement's types, and that the files are exactly its subjects with their digests. With
    `log_proof` (an inclusion bundle of its `proof.release` event) and the log's verifier
    key: that the transparency log holds this very release."""
    directory = Path(directory)
    present = _regular_files(directory)  # first: nothing is read from a symlink or a FIFO
    if ENVELOPE not in present:
        raise ReleaseError(f"{directory} has no {ENVELOPE}: not a release directory")
    envelope = (directory / ENVELOPE).read_bytes()
    payload = dsse_open(envelope, public_raw)
    try:
        statement = json.loads(payload)
        if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
            raise ReleaseError("the signed statement is not an in-toto Statement v1 with a SLSA provenance v1 predicate")
        subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
        week = statement["predicate"]["buildDefinition"]["externalParameters"]["week"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ReleaseError("the signed statement is malformed (subjects, digests or the week are missing)") from None
    if any(not isinstance(n, str) or n.startswith("/") or ".." in Path(n).parts for n in subjects):
        raise ReleaseError("the signed statement names a file outside the release directory")
    present -= {ENVELOPE}
    if STATEMENT not in present:
        raise ReleaseError(f"{directory} has no {STATEMENT}: the release is incomplete; copy the whole release directory")
    extra = sorted(present - set(subjects) - {STATEMENT})
    if extra:
        raise ReleaseError(f"{directory} holds files the statement does not list: {', '.join(extra[:5])}")
    for name, want in subjects.items():
        p = directory / name
        if name not in present:
            raise ReleaseError(f"{name} is listed in the statement but missing from {directory}")
        if hashlib.sha256(p.read_bytes()).hexdigest() != want:
            raise ReleaseError(f"{name} does not match its digest in the signed statement: the release was altered")
    if (directory / STATEMENT).read_bytes() != payload:
        raise ReleaseError(f"{STATEMENT} differs from the statement the envelope signs")
    out = {"week": week, "files": len(subjects)}
    if log_proof is not None:
        out["log"] = _verify_logged(log_proof, log_key or "", week, hashlib.sha256(envelope).hexdigest())
    return out


def _regular_files(directory: Path) -> set[str]:
    """Every file under `directory` (relative POSIX paths). A release holds regular files
    and directories only: a symlink (a listed file pointing elsewhere can be retargeted
    after it verified; a linked directory hid unlisted files from the walk), a FIFO (reading
    it blocks) or a device is refused (tests/test_release.py)."""
    out: set[str] = set()
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = Path(root) / name
            mode = p.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            rel = p.relative_to(directory).as_posix()
            if not stat.S_ISREG(mode):
                kind = "symlink" if stat.S_ISLNK(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"
                raise ReleaseError(f"{rel} in {directory} is a {kind}: a release holds only regular files; replace it with the file itself or remove it")
            out.add(rel)
    return out


def _verify_logged(bundle: bytes, vkey: str, week: str, envelope_sha256: str) -> dict:
    from scf.projections import proofcheck

    try:
        summary = proofcheck.verify_bundle(bundle, vkey)
    except proofcheck.ProofError as exc:
        raise ReleaseError(f"the log proof does not hold: {exc}") from None
    entry = summary.get("entry") or {}
    if summary["kind"] != "inclusion" or entry.get("type") != "proof.release":
        raise ReleaseError("the log proof is not the inclusion proof of a proof.release event: pass `scf proof inclusion <its event id>`")
    try:
        record = json.loads(entry.get("payload") or "")
    except ValueError:
        record = {}
    if not isinstance(record, dict) or record.get("week") != week or record.get("envelope_sha256") != envelope_sha256:
        raise ReleaseError(f"the logged release is not this one (week {record.get('week') if isinstance(record, dict) else '?'}, another envelope)")
    return {"origin": summary["origin"], "tree_size": summary["tree_size"], "leaf_index": summary["leaf_index"]}


def release_logged_event(result: ReleaseResult, key, source: str):
    return ev.ReleaseLogged.new(
        ev.ReleaseRecord(week=result.directory.name, envelope_sha256=result.envelope_sha256, domains=result.domains, kid=key.kid),
        source=source,
    )
