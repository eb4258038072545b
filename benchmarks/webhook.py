"""The webhook receiver under load: 1,000 deliveries on loopback from 10 concurrent senders, 30% of them
duplicates (half redeliveries of the same webhook-id, half the same checkpoint under a new id), against
a real Prefect server with the deployments registered. Side by side, the floor: the same number of
`create_flow_run` calls straight to the Prefect API (what the receiver does once it has verified and
validated a delivery), from the same 10 threads.

    python benchmarks/webhook.py [--deliveries 1000] [--senders 10] [--duplicates 0.3]

Prints p50/p99 latency, deliveries/s, the ratio to the floor, and checks that every (run_id, step) got
exactly one flow run. A benchmark, not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up")


@contextlib.contextmanager
def services(home: Path) -> Iterator[tuple[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MICROSCOPE_"))}
    env |= {"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env |= {"PREFECT_UI_ENABLED": "false", "MICROSCOPE_HOME": str(home / "ms"), "MICROSCOPE_WEBHOOK_SECRET": SECRET}
    pport, rport = free_port(), free_port()
    api = f"http://127.0.0.1:{pport}/api"
    logs = open(home / "services.log", "w")
    procs = [
        subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pport)],
            env=env,
            stdout=logs,
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        wait(f"{api}/health")
        env["PREFECT_API_URL"] = api
        subprocess.run(
            [sys.executable, "deployments/register.py", "--pool-type", "process"],
            cwd=REPO,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        procs.append(
            subprocess.Popen(
                [str(BIN / "microscope"), "webhook", "serve", "--port", str(rport)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=logs,
            )
        )
        wait(f"http://127.0.0.1:{rport}/healthz")
        yield api, f"http://127.0.0.1:{rport}"
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
        logs.close()


def plan(n: int, dup_share: float, run_id: str) -> list[tuple[str, str]]:
    """(webhook-id, body) per delivery: unique checkpoints, then duplicates mixed in at random places."""
    n_dup = int(n * dup_share)
    unique = [
        (
            f"msg_{uuid.uuid4().hex}",
            json.dumps({"checkpoint": f"s3://ckpts/{run_id}/step-{i}", "run_id": run_id, "step": i}),
        )
        for i in range(n - n_dup)
    ]
    rng = random.Random(0)
    dups = []
    for k in range(n_dup):
        msg_id, body = rng.choice(unique)
        dups.append((msg_id if k % 2 == 0 else f"msg_{uuid.uuid4().hex}", body))
    out = unique + dups
    rng.shuffle(out)
    return out


def headers(msg_id: str, body: str) -> dict[str, str]:
    from standardwebhooks.webhooks import Webhook

    now = datetime.now(UTC)
    sig = Webhook(SECRET).sign(msg_id, now, body)
    ts = str(int(now.timestamp()))
    return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": sig, "content-type": "application/json"}


def run(jobs: list, senders: int, send) -> tuple[list[float], float, list]:
    """Send `jobs` from `senders` threads; latencies (s), wall time (s), responses."""
    lat: list[float] = []
    out: list = []
    lock = threading.Lock()
    it = iter(jobs)

    def worker() -> None:
        with httpx.Client(timeout=60) as c:
            while True:
                with lock:
                    job = next(it, None)
                if job is None:
                    return
                t0 = time.perf_counter()
                r = send(c, job)
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    out.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0, out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deliveries", type=int, default=1000)
    ap.add_argument("--senders", type=int, default=10)
    ap.add_argument("--duplicates", type=float, default=0.3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp)) as (api, receiver):
        run_id = f"bench-{uuid.uuid4().hex[:8]}"
        jobs = plan(a.deliveries, a.duplicates, run_id)

        def deliver(c: httpx.Client, job: tuple[str, str]) -> tuple[int, dict]:
            r = c.post(f"{receiver}/v1/checkpoints", content=job[1], headers=headers(*job))
            return r.status_code, r.json()

        lat, wall, resp = run(jobs, a.senders, deliver)

        # the floor: the same number of create_flow_run calls straight to Prefect, same threads
        dep = httpx.get(f"{api}/deployments/name/audit/checkpoint").json()["id"]
        floor_run = f"floor-{uuid.uuid4().hex[:8]}"

        def direct(c: httpx.Client, job: tuple[str, str]) -> int:
            step = json.loads(job[1])["step"]
            body = {"parameters": {"model": "s3://x", "run_id": floor_run, "step": step}}
            body["idempotency_key"] = f"{floor_run}-{step}"
            return c.post(f"{api}/deployments/{dep}/create_flow_run", json=body).status_code

        flat, fwall, _ = run(jobs, a.senders, direct)

        # count flow runs per (run_id, step) over every page
        per_step: dict[int, int] = {}
        offset = 0
        while True:
            page = httpx.post(
                f"{api}/flow_runs/filter",
                json={"flow_runs": {"tags": {"all_": ["webhook"]}}, "limit": 200, "offset": offset},
            ).json()
            for fr in page:
                if fr["parameters"].get("run_id") == run_id:
                    per_step[fr["parameters"]["step"]] = per_step.get(fr["parameters"]["step"], 0) + 1
            if len(page) < 200:
                break
            offset += 200
        statuses: dict[int, int] = {}
        for code, _ in resp:
            statuses[code] = statuses.get(code, 0) + 1
        unique = len({json.loads(b)["step"] for _, b in jobs})
        report = {
            "deliveries": len(jobs),
            "senders": a.senders,
            "unique_checkpoints": unique,
            "statuses": statuses,
            "duplicates_reported": sum(1 for code, body in resp if code == 202 and body.get("duplicate")),
            "flow_runs": sum(per_step.values()),
            "steps_with_one_flow_run": sum(1 for v in per_step.values() if v == 1),
            "receiver": {
                "p50_ms": round(pct(lat, 0.5) * 1000, 1),
                "p99_ms": round(pct(lat, 0.99) * 1000, 1),
                "deliveries_per_s": round(len(jobs) / wall, 1),
            },
            "prefect_direct_floor": {
                "p50_ms": round(pct(flat, 0.5) * 1000, 1),
                "p99_ms": round(pct(flat, 0.99) * 1000, 1),
                "creates_per_s": round(len(jobs) / fwall, 1),
            },
        }
        report["throughput_fraction_of_floor"] = round(
            report["receiver"]["deliveries_per_s"] / report["prefect_direct_floor"]["creates_per_s"], 3
        )
        report["exactly_one_per_step"] = report["flow_runs"] == unique == report["steps_with_one_flow_run"]
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
