"""A bounded headless locust run against a rec server already listening on 127.0.0.1 (start one
with `make run`). Writes loadtest/results/latest.json with per-endpoint rps and latency
percentiles, and the client's own CPU time (it shares the machine's cores)."""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--seconds", type=int, default=30)
    args = p.parse_args()
    if not args.host.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("load tests only target this machine (127.0.0.0/8, localhost, ::1)")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    prefix = out / "locust"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
           "--host", args.host, "-u", str(args.users), "-r", str(args.users),
           "-t", f"{args.seconds}s", "--csv", str(prefix), "--only-summary"]
    subprocess.run(cmd, check=False)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - t0
    rows = []
    with open(f"{prefix}_stats.csv") as f:
        for r in csv.DictReader(f):
            rows.append({"name": r["Name"], "requests": int(r["Request Count"]),
                         "errors": int(r["Failure Count"]), "rps": float(r["Requests/s"]),
                         "p50_ms": float(r["50%"]), "p95_ms": float(r["95%"]),
                         "p99_ms": float(r["99%"])})
    result = {"machine": f"{platform.node()} {platform.machine()}", "users": args.users,
              "seconds": args.seconds, "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "client_cpu_share": round((usage.ru_utime + usage.ru_stime) / wall, 2),
              "endpoints": rows}
    (out / "latest.json").write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['name']:<28} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:6.0f}  "
              f"p99 {r['p99_ms']:6.0f} ms  errors {r['errors']}")
    print(f"client CPU {result['client_cpu_s']} s over {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
