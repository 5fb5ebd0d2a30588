"""The `local` and `smollm2` backends: a Hugging Face checkpoint directory run with transformers.

torch and transformers are imported only here, when the backend is opened (`scf.ml.genn`
holds the code); the GenN process with the `search` or `http` backend never loads them.
"""

from __future__ import annotations

from pathlib import Path

from scf.producers.genn import GenNError, GennSettings

PROMOTED_DIR = "genn-{alias}"  # model_zoo/genn-production: the promoted code model, unpacked


def _ml(what: str):
    try:
        from scf.ml import genn as mg
    except ImportError as exc:
        raise GenNError(f"{what} needs torch and transformers ({exc.name} is missing): pip install 'scf[train,genn]'") from None
    return mg


def open_local(settings: GennSettings, *, home: Path | None = None, offline: bool = False, promoted: bool = False):
    mg = _ml(f"the {'smollm2' if offline else 'promoted' if promoted else 'local'} backend")
    if promoted:
        if home is None:
            raise GenNError("the promoted backend reads $SCF_HOME/model_zoo/genn-production: set SCF_HOME")
        directory = Path(home) / "model_zoo" / PROMOTED_DIR.format(alias="production")
        if not (directory / "scf-promoted.json").is_file():
            raise GenNError(f"no promoted code model in {directory}: fetch it with `scf genn model --promoted` "
                            "(after `scf genn publish DIR` and the daemon's promotion); `scf run genn` fetches it itself")
    elif settings.checkpoint:
        directory = Path(settings.checkpoint).expanduser()
    elif offline:
        if home is None:
            raise GenNError("the smollm2 backend converts its model into $SCF_HOME/model_zoo: set SCF_HOME")
        directory = mg.offline_model(Path(home) / "model_zoo")
    else:
        raise GenNError("[genn] checkpoint is empty: give a Hugging Face checkpoint directory, or use --backend smollm2")
    try:
        return mg.LocalGenerator(directory, temperature=settings.temperature, top_p=settings.top_p,
                                 max_new_tokens=settings.max_new_tokens, device=settings.device, threads=settings.threads,
                                 backend="promoted" if promoted else "smollm2" if offline and not settings.checkpoint else "local")
    except mg.ModelError as exc:
        raise GenNError(str(exc)) from None


def _eval_metrics(directory: Path) -> dict[str, float]:
    """The tuned side of `scf-eval.json` as checkpoint metrics (code_* names, finite floats)."""
    import json
    import math

    path = Path(directory) / "scf-eval.json"
    if not path.is_file():
        return {}
    tuned = json.loads(path.read_text()).get("tuned", {})
    names = {"code_rate": "code_rate", "gate_pass_rate": "code_gate_pass_rate", "sandbox_pass_rate": "code_sandbox_pass_rate",
             "mean_reward": "code_mean_reward", "nll": "code_heldout_nll"}
    return {new: float(tuned[old]) for old, new in names.items() if isinstance(tuned.get(old), (int, float)) and math.isfinite(tuned[old])}


async def publish_code_model(bus, settings, directory: Path, *, job_id: str | None = None):
    """`scf genn publish DIR`: pack a fine-tuned code model (`scf-code-model/1`, one safetensors
    file), put it in the artifact store and publish its `checkpoint.produced.genn`: the daemon
    verifies it on held-out contracts and promotes it if it is not worse than production.
    Returns the event (ids derive from the job and the file's digest: publishing twice is one event)."""
    import asyncio

    mg = _ml("publishing a code model")
    directory = Path(directory)
    if not directory.is_dir():
        raise GenNError(f"{directory} is not a checkpoint directory: give the --out directory of scf genn finetune")
    work = Path(settings.path("model_zoo", "genn-publish"))
    try:
        sha = await asyncio.to_thread(mg.weights_sha256, directory)
        packed = await asyncio.to_thread(mg.pack_code_model, directory, work / f"genn-{sha[:16]}.safetensors")
    except mg.ModelError as exc:
        raise GenNError(str(exc)) from None
    return await publish_checkpoint(bus, settings, packed, f"genn/{packed.name}", {"format": mg.CODE_MODEL_FORMAT, "weights_sha256": sha},
                                    job_id or f"genn-finetune-{sha[:16]}", _eval_metrics(directory))


async def publish_checkpoint(bus, settings, path: Path, key: str, meta: dict[str, str], job: str, metrics: dict[str, float]):
    """A code model's or code student's file put in the artifact store under `key` and published as
    `checkpoint.produced.genn` of `job` (ids derive from the job and the file's digest: publishing
    twice is one event). Returns the event."""
    from scf.bus import events as ev
    from scf.bus.artifacts import open_store
    from scf.bus.ids import derived_id
    from scf.producers.verify import CODE_DOMAIN

    ref = await open_store(bus, settings).put(path, key, meta=meta)
    event = ev.CheckpointProduced.new(
        ev.CheckpointInfo(checkpoint_id=derived_id("checkpoint", job, ref.sha256), job_id=job, domain=CODE_DOMAIN, uri=ref.uri,
                          sha256=ref.sha256, size=ref.size, metrics=metrics),
        source=bus.source, id=derived_id("checkpoint.produced", job, ref.sha256),
    )
    await bus.publish(event)
    return event


async def promoted_head(bus, alias: str, *, kind: str | None = None, what: str = "code model", publish: str = "scf genn publish DIR"):
    """The promotion at the head of `alias` in domain genn, of model `kind` (None: any), or one
    line saying how to get one."""
    from scf.producers.verify import CODE_DOMAIN, current_promotion

    head = await current_promotion(bus, CODE_DOMAIN, alias, kind)
    if head is None:
        raise GenNError(f"no {what} is promoted to {alias!r} yet: publish one ({publish}) and let the daemon judge it")
    return head


async def fetch_head(bus, settings, head) -> Path:
    """A promotion's artifact, fetched into model_zoo/genn-fetch by the store, which checks its
    sha256 and size against the promotion (another size: refused unread). Shared by the
    promoted code model and the promoted code student (producers/genn/student.py)."""
    from scf.bus.artifacts import open_store
    from scf.bus.ids import subject_token

    work = Path(settings.path("model_zoo", "genn-fetch"))
    work.mkdir(parents=True, exist_ok=True)
    return Path(await open_store(bus, settings).get(head.uri, work / f"{subject_token(head.checkpoint_id)}.safetensors", sha256=head.sha256,
                                                     size=head.size or None))


def promoted_marker(head) -> str:
    """`scf-promoted.json`: which promotion a fetched model is."""
    import json

    return json.dumps({"checkpoint_id": head.checkpoint_id, "alias": head.alias, "version": head.version, "uri": head.uri,
                       "sha256": head.sha256}, indent=2, sort_keys=True) + "\n"


async def fetch_promoted(bus, settings, *, alias: str = "production") -> Path:
    """The code model at the head of `alias` (checkpoint.promoted.genn), fetched (digest checked
    by the store), unpacked into model_zoo/genn-<alias> with `scf-promoted.json` naming it;
    already there: not fetched again."""
    import asyncio
    import json

    from scf.bus.ids import subject_token

    mg = _ml("the promoted code model")
    head = await promoted_head(bus, alias)
    directory = Path(settings.path("model_zoo", PROMOTED_DIR.format(alias=subject_token(alias))))
    marker = directory / "scf-promoted.json"
    if marker.is_file() and json.loads(marker.read_text()).get("checkpoint_id") == head.checkpoint_id:
        return directory
    path = await fetch_head(bus, settings, head)
    try:
        await asyncio.to_thread(mg.unpack_code_model, path, directory)
    except mg.ModelError as exc:
        raise GenNError(f"the promoted code model {head.checkpoint_id}: {exc}") from None
    marker.write_text(promoted_marker(head))
    return directory


__all__ = ["open_local", "publish_code_model", "fetch_promoted", "promoted_head", "fetch_head", "promoted_marker", "PROMOTED_DIR"]
