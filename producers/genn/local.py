"""The `local` and `smollm2` backends: a Hugging Face checkpoint directory run with transformers.

torch and transformers are imported only here, when the backend is opened (`scf.ml.genn`
holds the code); the GenN process with the `search` or `http` backend never loads them.
"""

from __future__ import annotations

from pathlib import Path

from scf.producers.genn import GenNError, GennSettings


def open_local(settings: GennSettings, *, home: Path | None = None, offline: bool = False):
    try:
        from scf.ml import genn as mg
    except ImportError as exc:
        raise GenNError(f"the {'smollm2' if offline else 'local'} backend needs torch and transformers ({exc.name} is missing): "
                        "pip install 'scf[train,genn]'") from None
    if settings.checkpoint:
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
                                 backend="smollm2" if offline and not settings.checkpoint else "local")
    except mg.ModelError as exc:
        raise GenNError(str(exc)) from None


__all__ = ["open_local"]
