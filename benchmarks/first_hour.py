"""A new user's first hour, timed: a cold audit, the same audit again with every stage cached (with
Prefect's temporary server, and with `microscope up` running: its server, the command forked from its warm
process; the median of three), and checkpoint-to-verdict latency
through the laptop stack (a checkpoint written, announced the way the Lightning callback does, audited by
the served deployment, judged against the previous step).

    python benchmarks/first_hour.py [--workspace /tmp/first-hour] [--steps 3]

The checkpoints are the demo's GPT-2 (examples/train_demo_lm.py) at random initialisation, perturbed per
step; the audit config is examples/demo_lm.yaml (every stage but robustness, gate included). Prints each
figure and its ratio to the cold audit; JSON in build/benchmarks/first_hour.json. A benchmark, not a test:
no assertion on time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "examples"))
STAGES = "ingest,quantize,trace,sae,metrics,report"

from demo import free_port, start_stack, wait_stack  # noqa: E402

from flows.local_stack import secret_file  # noqa: E402


def checkpoints(root: Path, corpus: Path, n: int) -> list[Path]:
    """n HF folders of the demo LM: step k's weights are step k-1's plus small noise (a training run's drift)."""
    import torch
    from train_demo_lm import DemoLM, train_tokenizer

    tok = train_tokenizer(corpus, root / "tokenizer")
    torch.manual_seed(0)
    lm = DemoLM(tok)
    out = []
    for k in range(1, n + 1):
        with torch.no_grad():
            for p in lm.model.parameters():
                p.add_(0.002 * torch.randn_like(p))
        d = root / f"step-{k}"
        lm.model.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(d)
    return out


def timed_run(env: dict[str, str], model: Path, corpus: Path, *extra: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(
        [str(BIN / "microscope"), "run", "--model", str(model), "--dataset", str(corpus), "--config", "demo_lm",
         "--stages", STAGES, *extra],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if p.returncode != 0:
        sys.exit(f"audit failed: {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def verdict_of(home: Path, run_id: str, step: int) -> str | None:
    for f in (home / "artifacts" / "audits").glob("*.json"):
        rec = json.loads(f.read_text())
        if rec.get("run_id") == run_id and rec.get("step") == step:
            gate = rec["stages"].get("gate") or {}
            return (gate.get("details") or {}).get("verdict") or rec["status"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/first-hour"))
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    shutil.rmtree(args.workspace, ignore_errors=True)
    home = args.workspace / "home"
    home.mkdir(parents=True)
    env = {**os.environ, "MICROSCOPE_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    corpus = args.workspace / "corpus.txt"
    subprocess.run([sys.executable, str(REPO / "examples/make_demo_corpus.py"), str(corpus)], check=True)
    ckpts = checkpoints(args.workspace / "ckpts", corpus, args.steps + 1)
    out: dict[str, float] = {}

    out["cold_s"] = timed_run(env, ckpts[0], corpus)
    out["cached_temporary_server_s"] = timed_run(env, ckpts[0], corpus)
    env["MICROSCOPE_WEBHOOK_SECRET"] = secret_file(home)
    stack = start_stack(home, env, free_port(), free_port())
    try:
        info = wait_stack(home, stack)
        # finds the stack through home/stack.json and forks from its warm process; the median of three
        out["cached_with_stack_s"] = sorted(timed_run(env, ckpts[0], corpus) for _ in range(3))[1]
        env |= {"PREFECT_API_URL": info["prefect_api_url"], "MICROSCOPE_WEBHOOK_URL": info["webhook_url"]}
        latencies = []
        for step, ckpt in enumerate(ckpts[1:], start=1):  # each judged against the one before
            t0 = time.perf_counter()
            subprocess.run(
                [str(BIN / "microscope"), "notify", "--checkpoint", str(ckpt), "--run-id", "bench", "--step",
                 str(step), "--dataset", str(corpus), "--config", "demo_lm", "--stages", STAGES],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            while (v := verdict_of(home, "bench", step)) is None:
                if time.perf_counter() - t0 > 900:
                    sys.exit(f"step {step}: no verdict within 15 minutes")
                time.sleep(0.2)
            latencies.append(time.perf_counter() - t0)
            print(f"step {step}: verdict {v} {latencies[-1]:.1f} s after the checkpoint was announced")
        out["checkpoint_to_verdict_s_max"] = max(latencies)
        out["checkpoint_to_verdict_s_mean"] = sum(latencies) / len(latencies)
    finally:
        stack.terminate()
        stack.wait(60)
    for k, v in out.items():
        print(f"{k:<32} {v:7.1f} s   {v / out['cold_s']:.2f} of the cold audit")
    dest = REPO / "build" / "benchmarks"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "first_hour.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
