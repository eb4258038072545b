"""`make demo`: Microscope's story in about five minutes on a laptop's CPU.

1. `microscope up` (a Prefect server, the audit deployment served here, the webhook receiver).
2. A training run: examples/train_demo_lm.py trains a small GPT-2 with Lightning; Microscope's callback
   sends each checkpoint to the receiver, which starts its audit; each audit is gated against the run's
   previous checkpoint. Then a damaged copy of the last checkpoint (one attention matrix ×3) is sent the
   same way, and its gate fails.
3. The pretrained MiniLM's SAE features (`microscope run`, on the same Prefect server).
4. The digits CNN's robustness: AutoAttack (APGD-CE, L∞) and PGD/FGSM ε-sweeps.

    python examples/demo.py [--workspace .microscope] [--full]

`--full` is the longer demo of earlier releases (every MiniLM stage with int8/nf4 and attacks on both
models; about 12 minutes) instead of steps 3 and 4 here. Everything lands in one store: `make view`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.local_stack import secret_file

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
RUN_ID = "demo-lm"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def start_stack(home: Path, env: dict[str, str], port: int, webhook_port: int) -> subprocess.Popen:
    """`microscope up` on the given ports, in the background (its log: home/up.log)."""
    (home / "stack.json").unlink(missing_ok=True)
    args = [str(BIN / "microscope"), "up", "--port", str(port), "--webhook-port", str(webhook_port)]
    log = open(home / "up.log", "w")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_stack(home: Path, proc: subprocess.Popen) -> dict[str, str]:
    """The stack's stack.json, once its audit deployment is served."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo: `microscope up` exited with {proc.returncode}; see {home / 'up.log'}")
        try:
            info = json.loads((home / "stack.json").read_text())
            api_json(f"{info['prefect_api_url']}/deployments/name/audit/checkpoint")
            return info
        except (OSError, ValueError, KeyError):
            time.sleep(0.5)
    proc.terminate()
    sys.exit(f"demo: the stack did not come up within 4 minutes; see {home / 'up.log'}")


def damaged_copy(last: Path, out: Path) -> Path:
    """The last checkpoint with one attention matrix scaled ×3: what a bad optimiser step can do."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(last, out, dirs_exist_ok=True)
    weights = load_file(out / "model.safetensors")
    weights["transformer.h.1.attn.c_attn.weight"] *= 3.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def wait_for_run(api: str, n: int, timeout_s: float) -> list[dict]:
    """The training run's latest audit flow run per step, once `n` steps have one and each has ended (an
    interrupted earlier demo leaves runs that failed: the receiver audits such a checkpoint again)."""
    deadline = time.monotonic() + timeout_s
    while True:
        latest: dict[int, dict] = {}
        for fr in sorted(api_json(f"{api}/flow_runs/filter", {"limit": 200}), key=lambda fr: fr["created"]):  # type: ignore[arg-type]
            if fr["parameters"].get("run_id") == RUN_ID:
                latest[fr["parameters"]["step"]] = fr
        runs = [latest[s] for s in sorted(latest)]
        if len(runs) >= n and all(fr["state_type"] in FINAL for fr in runs):
            return runs
        if time.monotonic() > deadline:
            states = ", ".join(f"step {fr['parameters']['step']} {fr['state_type']}" for fr in runs)
            sys.exit(f"demo: the run's audits did not finish within {timeout_s:.0f} s ({states or 'none started'})")
        time.sleep(1)


def run_cli(*args: str, env: dict[str, str]) -> None:
    p = subprocess.run([str(BIN / "microscope"), *args], env=env)
    if p.returncode != 0:
        sys.exit(f"demo: `microscope {' '.join(args)}` exited with {p.returncode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=Path(".microscope"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--full", action="store_true", help="the long demo: every stage of MiniLM, attacks on both")
    args = ap.parse_args()
    t0 = time.monotonic()
    home = args.workspace.resolve()
    demo = home / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MICROSCOPE_HOME": str(home)}
    corpus = demo / "corpus.txt"
    made = subprocess.run(
        [sys.executable, str(HERE / "make_demo_corpus.py"), str(corpus), "--print-model-path"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    minilm = made.stdout.strip()

    # The stack and the training start together: the callback retries until the receiver answers
    port, webhook_port = free_port(), free_port()
    env["MICROSCOPE_WEBHOOK_SECRET"] = secret_file(home)  # made first: the trainer starts before the stack
    stack = start_stack(home, env, port, webhook_port)
    env |= {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    env["MICROSCOPE_WEBHOOK_URL"] = f"http://127.0.0.1:{webhook_port}/v1/checkpoints"
    try:
        lm = demo / "lm"
        shutil.rmtree(lm / "ckpts", ignore_errors=True)  # a re-run sends the same steps again: same audits
        train = [sys.executable, str(HERE / "train_demo_lm.py"), str(corpus), str(lm), "--run-id", RUN_ID]
        trainer = subprocess.Popen([*train, "--steps", str(args.steps), "--every", str(args.every)], env=env)
        info = wait_stack(home, stack)
        say(
            f"stack up in {time.monotonic() - t0:.0f} s: Prefect {info['prefect_api_url']}, webhook {info['webhook_url']}"
        )
        if args.full:
            run_cli("run", "--model", minilm, "--dataset", str(corpus), "--config", "demo", env=env)
        else:
            run_cli(
                "run", "--model", minilm, "--dataset", str(corpus), "--config", "demo_minilm",
                "--stages", "ingest,trace,sae,metrics,report", env=env,
            )  # fmt: skip
        if trainer.wait() != 0:
            sys.exit(f"demo: training exited with {trainer.returncode}")
        exports = sorted((lm / "ckpts").glob("*.hf"), key=lambda p: p.stat().st_mtime)
        bad_step = args.steps + args.every // 2
        bad = damaged_copy(exports[-1], lm / f"step={bad_step}-damaged.hf")
        say(f"sending a damaged copy of the last checkpoint as step {bad_step} (transformer.h.1.attn.c_attn ×3)")
        run_cli(
            "notify", "--checkpoint", str(bad), "--run-id", RUN_ID, "--step", str(bad_step),
            "--dataset", str(corpus), "--config", "demo_lm", "--stages",
            "ingest,quantize,trace,sae,metrics,landscape,reliability,attribution,report",
            "--tag", "damaged=attn x3", env=env,
        )  # fmt: skip
        digits = demo / "digits"
        subprocess.run([sys.executable, str(HERE / "train_digits_cnn.py"), str(digits)], env=env, check=True)
        run_cli(
            "run", "--model", str(digits / "digits_cnn.safetensors"), "--dataset", str(digits / "digits_test.npz"),
            "--config", "demo_digits" if args.full else "demo_digits_quick", env=env,
        )  # fmt: skip
        n = args.steps // args.every + 1
        runs = wait_for_run(info["prefect_api_url"], n, 600)
    finally:
        stack.terminate()
        stack.wait(60)
    print()
    say(f"training run {RUN_ID}: {len(runs)} checkpoints audited as they were saved, each gated against the one before")
    run_cli("list", "--run", RUN_ID, env=env)
    say(f"the served audits' stage lines: {home / 'up.log'}; `microscope up` brings the Prefect UI back with every run")
    say(f"finished in {time.monotonic() - t0:.0f} s; `make view` opens the viewer on all of it")


if __name__ == "__main__":
    main()
