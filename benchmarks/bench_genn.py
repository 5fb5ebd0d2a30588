"""GenN on the CPU: proposals per minute per backend, and what a tiny LoRA fine-tune changes.

    .venv/bin/python benchmarks/bench_genn.py                 # speed of every backend
    .venv/bin/python benchmarks/bench_genn.py --finetune      # + SFT/DPO of SmolLM2-135M on a judged dataset

Speed: `search` (program search, the baseline of the ratios), `http` against a canned
OpenAI-compatible endpoint started here (the client's own overhead, no model), `local` with a
tiny random Llama (the transformers path, no quality), `smollm2` (the offline 135M model).
Each backend's candidates are also judged (the capability gate, then the sandbox against the
simulator: `scf.ml.genn.judge`), so the rates say what the loop gets, not only how fast.

Fine-tune: a CFR-format dataset from search candidates judged by the gate and the sandbox
(approved = a full sandbox run), trained on grid:case14, grid:case30 and hvac:office3 intents,
held out: grid:case9 (a domain the model never saw in training). LoRA SFT then DPO on CPU,
a few steps: expect small changes, and they are reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scf.bus import events as ev
from scf.producers.genn import CodeRequest, GennSettings, open_generator
from scf.projections.cfr_prompt import messages

DOMAINS = ("grid:case14", "hvac:office3")


def request(domain: str, intent_id: str) -> CodeRequest:
    return CodeRequest.for_intent(ev.Intent(intent_id=intent_id, kind="codegen", domain=domain))


def timed(gen, n: int, domain: str, seed: int = 0) -> tuple[float, list]:
    t = time.perf_counter()
    out = gen.generate(request(domain, f"bench-{domain}"), n, seed)
    return time.perf_counter() - t, out


def judged(cands, domain: str) -> dict[str, float]:
    from scf.ml.genn import judge

    n = len(cands)
    gate = box = 0
    reward = 0.0
    for c in cands:
        if c.error:
            continue
        j = judge(c.code, domain, hours=2.0)
        gate += j.gate_ok
        box += j.sandbox_ok
        reward += j.reward
    return {"code": sum(1 for c in cands if not c.error) / n, "gate": gate / n, "sandbox": box / n, "reward": reward / n}


class _Canned(BaseHTTPRequestHandler):
    ANSWER = ""

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "canned", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": self.ANSWER}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Rows(list):
    """The table's rows, each printed as it is measured (a long run still shows what it has)."""

    def append(self, row) -> None:
        super().append(row)
        name, domain, n, s, j = row
        print(f"measured: {name} {domain}: {n} in {s:.2f} s = {n / s * 60:,.1f}/min; code {j['code']:.0%}, gate {j['gate']:.0%}, "
              f"sandbox {j['sandbox']:.0%}, reward {j['reward']:.3f}", flush=True)


def speed(args) -> None:
    from scf.producers.genn.search import SearchGenerator

    rows = _Rows()
    search = SearchGenerator()
    for domain in DOMAINS:
        s, c = timed(search, args.search_n, domain)
        rows.append(("search", domain, len(c), s, judged(c[: args.judge_n], domain)))
    base_rate = sum(r[2] for r in rows) / sum(r[3] for r in rows) * 60

    _Canned.ANSWER = "```python\n" + search.generate(request("grid:case14", "x"), 1, 0)[0].code + "```"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    http = open_generator(GennSettings(backend="http", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="canned",
                                       api_key_env="", retries=0))
    s, c = timed(http, args.http_n, "grid:case14")
    rows.append(("http (canned endpoint)", "grid:case14", len(c), s, judged(c[:1], "grid:case14")))
    http.close()
    server.shutdown()

    try:
        from scf.ml import genn as mg
    except ImportError:
        mg = None
    if mg is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = mg.tiny_model(Path(tmp) / "tiny")
            g = open_generator(GennSettings(backend="local", checkpoint=str(tiny), max_new_tokens=args.tokens, threads=args.threads))
            s, c = timed(g, args.local_n, "hvac:office3")
            rows.append((f"local (tiny random, {args.tokens} tokens)", "hvac:office3", len(c), s, judged(c, "hvac:office3")))
            home = Path(args.home)
            t0 = time.perf_counter()
            path = mg.offline_model(home / "model_zoo")
            print(f"offline model at {path} ({time.perf_counter() - t0:.0f} s to locate/convert), sha256 {mg.weights_sha256(path)[:16]}")
            g = open_generator(GennSettings(backend="local", checkpoint=str(path), max_new_tokens=args.tokens, threads=args.threads))
            for domain in DOMAINS:
                s, c = timed(g, args.smol_n, domain)
                rows.append((f"smollm2-135m ({args.tokens} tokens)", domain, len(c), s, judged(c, domain)))
                for cand in c[:1]:
                    print(f"--- a smollm2 answer for {domain} ({cand.error or 'parsed as code'}):\n{cand.code[:600]}")

    print(f"\nGenN proposals per minute on this machine (CPU, {os.cpu_count()} cores, shared), judged by gate + sandbox (2 h, 1 scenario)")
    print("| backend | domain | proposals | s | per minute | vs search | code | gate pass | sandbox pass | mean reward |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, domain, n, s, j in rows:
        rate = n / s * 60
        print(f"| {name} | {domain} | {n} | {s:.2f} | {rate:,.1f} | {rate / base_rate:.2g}x | {j['code']:.0%} | {j['gate']:.0%} | "
              f"{j['sandbox']:.0%} | {j['reward']:.3f} |")


def contract_params(domain: str, i: int, salt: str = "") -> dict[str, float]:
    """A code contract's parameters for the i-th intent on `domain` (seeded): its scenario, its
    objective's weight and its target (producers/genn/contract.py `CONTRACT_PARAMS`)."""
    import random

    g = random.Random(f"{domain}\x1f{i}\x1f{salt}")
    if domain.startswith("grid"):
        return {"load_scale": round(g.uniform(0.8, 1.2), 2), "voll": g.choice((500, 1000, 2000, 5000)), "target": g.choice((0.95, 0.98, 1.0))}
    return {"t_out_shift": round(g.uniform(-8.0, 8.0), 1), "comfort_weight": g.choice((5, 10, 20)), "target": g.choice((0.6, 0.8, 0.9, 1.0))}


def contract_request(domain: str, i: int, salt: str = "") -> CodeRequest:
    """The served request of a codegen intent under the i-th code contract on `domain`."""
    return CodeRequest.for_intent(ev.Intent(intent_id=f"ft-{domain}-{salt}{i}", kind="codegen", domain=domain,
                                            params=contract_params(domain, i, salt)))


def dataset(root: Path, train: dict[str, int], held_out: dict[str, int], per_intent: int, *, workers: int = 1,
            sft_per_prompt: int = 3) -> dict[str, int]:
    """CFR-format rows (the builder's formats, the served prompt) from judged search candidates,
    one code contract (distinct scenario, objective weight, target: a distinct prompt) per intent.
    SFT rows: code that passed the gate and the sandbox AND beats the status quo (relative cost
    < 1), the best `sft_per_prompt` of a contract (so the domain whose templates win most often
    does not flood the set); preference pairs: such code over refused code and over code that runs but
    costs more than the status quo; unpaired (KTO) rows: every candidate, label = beats the status quo."""
    from concurrent.futures import ThreadPoolExecutor

    from scf.ml.genn import judge
    from scf.producers.genn.search import SearchGenerator

    g = SearchGenerator(bug_rate=0.35)
    counts = {"approved": 0, "beats_status_quo": 0, "rejected": 0, "pairs": 0, "train_prompts": 0, "held_out_prompts": 0}
    for split, spec in (("train", train), ("validation", held_out)):
        sft, pref, un = [], [], []
        for domain, intents in spec.items():
            for i in range(intents):
                req = contract_request(domain, i, "h" if split == "validation" else "")
                cands = g.generate(req, per_intent, seed=i)
                params = contract_params(domain, i, "h" if split == "validation" else "")
                with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                    scored = list(zip(cands, pool.map(lambda c, d=domain, p=params: judge(c.code, d, hours=2.0, params=p), cands)))
                p = messages(req.user)
                good = [c for c, j in sorted(scored, key=lambda x: -x[1].reward) if j.beats_status_quo]
                runs = [c for c, j in scored if j.sandbox_ok and not j.beats_status_quo]
                bad = [c for c, j in scored if not j.sandbox_ok]
                counts["approved"] += sum(1 for _, j in scored if j.sandbox_ok)
                counts["beats_status_quo"] += len(good)
                counts["rejected"] += len(bad)
                counts[f"{'train' if split == 'train' else 'held_out'}_prompts"] += 1
                sft += [{"prompt": p, "completion": [{"role": "assistant", "content": c.code}]} for c in good[:sft_per_prompt]]
                un += [{"prompt": p, "completion": [{"role": "assistant", "content": c.code}], "label": c in good} for c in cands]
                pairs = [{"prompt": p, "chosen": [{"role": "assistant", "content": a.code}], "rejected": [{"role": "assistant", "content": b.code}]}
                         for a in good for b in runs[:1] + bad][:4]
                pref += pairs
                counts["pairs"] += len(pairs) if split == "train" else 0
        for name, rows in (("sft", sft), ("preference", pref), ("unpaired", un)):
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return counts


def finetune(args) -> None:
    from scf.ml import genn as mg

    base = mg.offline_model(Path(args.home) / "model_zoo")
    with tempfile.TemporaryDirectory() as tmp:
        ds = Path(tmp) / "cfr"
        t = time.perf_counter()
        counts = dataset(ds, {"grid:case14": args.intents, "grid:case30": args.intents, "hvac:office3": args.intents},
                         {"grid:case9": 2}, per_intent=4)
        print(f"dataset: {counts} in {time.perf_counter() - t:.0f} s (train: case14, case30, office3; held out: case9)")
        t = time.perf_counter()
        rep = mg.finetune(base, ds, Path(tmp) / "tuned", sft_steps=args.sft_steps, dpo_steps=args.dpo_steps, lr=args.lr, max_length=1024)
        print(f"fine-tune on CPU in {time.perf_counter() - t:.0f} s: SFT {rep['sft']}, DPO {rep['dpo']}")
        t = time.perf_counter()
        e = mg.evaluate(base, Path(tmp) / "tuned", ds, samples=args.eval_samples, max_new_tokens=args.tokens)
        print(f"evaluation in {time.perf_counter() - t:.0f} s")
        for line in mg.evaluation_lines(e):
            print("  " + line)
        print(json.dumps(e, indent=1, sort_keys=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune", action="store_true", help="also fine-tune SmolLM2 on a judged dataset (minutes on a CPU)")
    ap.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="measure the backends' speed")
    ap.add_argument("--home", default=os.environ.get("SCF_HOME", ".scf"), help="where model_zoo is (the offline model is converted once)")
    ap.add_argument("--search-n", type=int, default=200)
    ap.add_argument("--judge-n", type=int, default=20)
    ap.add_argument("--http-n", type=int, default=50)
    ap.add_argument("--local-n", type=int, default=4)
    ap.add_argument("--smol-n", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--intents", type=int, default=3, help="fine-tune: training intents per domain")
    ap.add_argument("--sft-steps", type=int, default=12)
    ap.add_argument("--dpo-steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-samples", type=int, default=3)
    args = ap.parse_args()
    if args.speed:
        speed(args)
    if args.finetune:
        finetune(args)


if __name__ == "__main__":
    main()
