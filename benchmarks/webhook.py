"""The webhook receiver under load: 1,000 deliveries on loopback from 10 concurrent senders, 30% of them
duplicates (half redeliveries of the same webhook-id, half the same checkpoint under a new id), against
a real Prefect server with the deployments registered. Side by side, the floor: the same number of
`create_flow_run` calls straight to the Prefect API (what the receiver does once it has verified and
validated a delivery), from the same 10 threads.

    python benchmarks/webhook.py [--deliveries 1000] [--senders 10] [--duplicates 0.3]

Prefect runs on the local PostgreSQL with Redis messaging, as in production (`--sqlite` for the embedded
default, which serialises writers and answers many concurrent creates with 503s). Senders retry a 503
as real ones do. Prints p50/p99 latency (per delivery, retries included), deliveries/s, the ratio to the
floor, and checks that every (run_id, step) got exactly one flow run. A benchmark, not a test: no
assertion on time.
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
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL (the production configuration's Prefect backend)."""
    import psycopg2

    name = f"microscope_bench_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@contextlib.contextmanager
def services(home: Path, database_url: str | None) -> Iterator[tuple[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MICROSCOPE_"))}
    env |= {"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if database_url:  # Prefect on PostgreSQL with Redis messaging, as in production (SQLite serialises writers)
        env |= {"PREFECT_API_DATABASE_CONNECTION_URL": database_url}
        env |= {
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        }
        env |= {"PREFECT_REDIS_MESSAGING_URL": "redis://127.0.0.1:6379/8"}
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
    ap.add_argument("--sqlite", action="store_true", help="Prefect on SQLite instead of PostgreSQL + Redis")
    a = ap.parse_args()
    db = contextlib.nullcontext(None) if a.sqlite else postgres_database()
    with tempfile.TemporaryDirectory() as tmp, db as url, services(Path(tmp), url) as (api, receiver):
        run_id = f"bench-{uuid.uuid4().hex[:8]}"
        jobs = plan(a.deliveries, a.duplicates, run_id)

        def deliver(c: httpx.Client, job: tuple[str, str]) -> tuple[int, dict]:
            """One delivery as a sender makes it: a 503 is retried (same id, new signature) after a jittered
            pause, so the latency is the delivery's, retries included."""
            for attempt in range(20):
                r = c.post(f"{receiver}/v1/checkpoints", content=job[1], headers=headers(*job))
                if r.status_code != 503:
                    return r.status_code, r.json() | {"attempts": attempt + 1}
                time.sleep(random.uniform(0.05, 0.5))
            return r.status_code, r.json() | {"attempts": 20}

        lat, wall, resp = run(jobs, a.senders, deliver)

        # the floor: the same number of create_flow_run calls straight to Prefect, same threads
        dep = httpx.get(f"{api}/deployments/name/audit/checkpoint").json()["id"]
        floor_run = f"floor-{uuid.uuid4().hex[:8]}"

        def direct(c: httpx.Client, job: tuple[str, str]) -> int:
            step = json.loads(job[1])["step"]
            body = {"parameters": {"model": "s3://x", "run_id": floor_run, "step": step}}
            body["idempotency_key"] = f"{floor_run}-{step}"
            for _ in range(20):
                with contextlib.suppress(httpx.TransportError):
                    code = c.post(f"{api}/deployments/{dep}/create_flow_run", json=body).status_code
                    if code < 500:
                        return code
                time.sleep(random.uniform(0.05, 0.5))
            return 503

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
            "retried_503": sum(1 for _, body in resp if body.get("attempts", 1) > 1),
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
