"""Ranker throughput on CPU and CUDA: candidates scored per second at 1/16/128 requests x 500.

    python -m loadtest.gpu_ranker --out $OUT/gpu_ranker.json     # from the repository root

Builds `rec.ranker.Ranker` with the project's `RankerConfig` defaults (untrained weights: the
cost does not depend on their values) for a realistic catalogue, and times, per device and per
batch of B requests x C candidates (the rows `Recommender.rank_many` concatenates into one
model call):

* `predict_requests`: `Ranker.predict_requests` end to end, numpy in -> numpy out (one user
  vector per request, host-to-device copies, the net, Platt scaling, the copy back and
  `expit`): what a serving replica pays (`Recommender.rank_many` calls it);
* `predict (per row)`: `Ranker.predict` on the same rows with the user vector repeated per
  candidate (the training-time forward);
* `net requests fp32`: the raw `RankerNet.forward_requests` (the first layer's user terms folded
  into per-request weights) on inputs already on the device, in inference mode;
* `net fp32`, `net bf16 autocast`, `net bf16 weights`: the raw per-row `RankerNet` forward;
* `ref mlp ...`: the issue's reference, a 256->512->256->1 ReLU MLP on [B*C, 256] inputs (quoted
  at 0.16 ms for 128 x 500 in bf16 on an H200).

Each figure is the median of many calls after warm-up, each call timed between
`torch.cuda.synchronize()` calls on CUDA; `b2b_ms` is the mean of back-to-back calls with one
synchronize at the end (launch overhead overlapped). CPU always runs (with a small time budget
per figure); CUDA runs when `torch.cuda.is_available()`.

Needs torch, numpy, scipy, safetensors, pydantic and pyyaml (rec.ranker imports scipy and
safetensors, rec.config imports pydantic and yaml); not ray.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# import name -> distribution name, for the message when one is missing
REQUIRED = {
    "torch": "torch",
    "numpy": "numpy",
    "scipy": "scipy",
    "safetensors": "safetensors",
    "pydantic": "pydantic",
    "yaml": "pyyaml",
}
ROOT = HERE.parent
REF_QUOTE_MS = 0.16  # the figure: 256->512->256->1 bf16 MLP, 128 x 500 rows, H200


def check_deps() -> None:
    missing = [dist for mod, dist in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise SystemExit(
            f"loadtest.gpu_ranker needs {', '.join(missing)} (not installed). "
            f"Install them with: pip install {' '.join(missing)}"
        )
    if importlib.util.find_spec("rec") is None:
        raise SystemExit("loadtest.gpu_ranker must run from the repository root (rec/ not found)")


def n_dense_features() -> int:
    """len(rec.features.DENSE_FEATURES): the ranker's first layer is sized by it. Importing
    rec.features pulls the recall stack (hnswlib among it); where that is not installed (a GPU
    machine with torch alone) pass --dense with the figure printed here."""
    try:
        from rec.features import DENSE_FEATURES
    except ImportError as e:
        raise SystemExit(
            f"rec.features does not import here ({e}); pass --dense N, N being "
            "len(rec.features.DENSE_FEATURES) where rec is installed"
        ) from e
    return len(DENSE_FEATURES)


def measure(fn, sync, *, warmup: int, repeats: int, budget_s: float, b2b: bool) -> dict:
    """Median (and p90) ms per synchronised call, plus the mean of back-to-back calls (`b2b`,
    only meaningful where calls are asynchronous, i.e. on CUDA)."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    b2b_ms = None
    if b2b:
        sync()
        t = time.perf_counter()
        for _ in range(len(times)):
            fn()
        sync()
        b2b_ms = round((time.perf_counter() - t) * 1e3 / len(times), 4)
    times.sort()
    return {
        "ms": round(statistics.median(times), 4),
        "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4),
        "b2b_ms": b2b_ms,
        "repeats": len(times),
    }


def bench_device(device_name: str, args: argparse.Namespace, n_dense: int) -> list[dict]:
    """Every case at every batch size on one device (CPU at torch's current thread count)."""
    import numpy as np
    import torch
    from torch import nn

    from rec.config import RankerConfig, RecallConfig
    from rec.ranker import Ranker

    device = torch.device(device_name)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    budget = args.gpu_budget_s if cuda else args.cpu_budget_s
    opts = {
        "warmup": args.gpu_warmup if cuda else 1,
        "repeats": args.gpu_repeats if cuda else args.cpu_repeats,
        "budget_s": budget,
        "b2b": cuda,
    }
    user_dim = RecallConfig().embedding_dim
    config = RankerConfig(**{**json.loads(args.ranker_config), "device": device_name})
    ranker = Ranker(config, args.items, user_dim, n_dense)
    net = ranker.net.eval()
    net_bf16 = copy.deepcopy(net).to(torch.bfloat16)
    ref = (
        nn.Sequential(
            nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 1)
        )
        .to(device)
        .eval()
    )
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    rng = np.random.default_rng(args.seed)
    rows_out = []
    label = device_name if cuda else f"cpu/{torch.get_num_threads()}t"

    for batch in args.batches:
        rows = batch * args.candidates
        # B requests: each has one user vector broadcast over its candidates (as rank_inputs).
        users = rng.standard_normal((batch, user_dim)).astype(np.float32) * 0.1
        idx = rng.integers(0, args.items, rows)
        user_vec = np.repeat(users, args.candidates, axis=0)
        item_vec = rng.standard_normal((rows, user_dim)).astype(np.float32) * 0.1
        dense = rng.standard_normal((rows, n_dense)).astype(np.float32)
        t_in = [torch.from_numpy(a).to(device) for a in (idx, user_vec, item_vec, dense)]
        t_req = [
            torch.from_numpy(users).to(device),
            [args.candidates] * batch,
            t_in[0],
            t_in[2],
            t_in[3],
        ]
        t_in_bf16 = [t_in[0], *(t.to(torch.bfloat16) for t in t_in[1:])]
        x_ref = torch.randn(rows, 256, device=device)
        x_ref_bf16 = x_ref.to(torch.bfloat16)

        def autocast():
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

        def fwd(model, inputs, amp=False):
            def call():
                with torch.inference_mode():
                    if amp:
                        with autocast():
                            return model(*inputs)
                    return model(*inputs)

            return call

        sizes = [args.candidates] * batch
        cases = [
            (
                "predict_requests",
                lambda a=(users, sizes, idx, item_vec, dense): ranker.predict_requests(*a),
            ),
            (
                "predict (per row)",
                lambda a=(idx, user_vec, item_vec, dense): ranker.predict(*a),
            ),
            ("net requests fp32", fwd(net.forward_requests, t_req)),
            ("net fp32", fwd(net, t_in)),
            ("net bf16 autocast", fwd(net, t_in, amp=True)),
            ("net bf16 weights", fwd(net_bf16, t_in_bf16)),
            ("ref mlp fp32", fwd(ref, [x_ref])),
            ("ref mlp bf16 autocast", fwd(ref, [x_ref], amp=True)),
            ("ref mlp bf16 weights", fwd(ref_bf16, [x_ref_bf16])),
        ]
        for name, fn in cases:
            m = measure(fn, sync, **opts)
            row = {
                "device": device_name,
                "threads": None if cuda else torch.get_num_threads(),
                "what": name,
                "requests": batch,
                "candidates": args.candidates,
                "rows": rows,
                **m,
                "candidates_per_s": round(rows / (m["ms"] / 1e3)),
                "candidates_per_s_b2b": round(rows / (m["b2b_ms"] / 1e3)) if m["b2b_ms"] else None,
            }
            if name.startswith("ref mlp"):
                flops = 2 * rows * (256 * 512 + 512 * 256 + 256)
                row["tflops"] = round(flops / (m["ms"] / 1e3) / 1e12, 2)
            rows_out.append(row)
            b2b = f"{m['b2b_ms']:>10.4f}" if m["b2b_ms"] else f"{'-':>10}"
            print(
                f"{label:>8} {name:<24} {batch:>4} x {args.candidates:<4} {m['ms']:>10.4f} "
                f"{m['p90_ms']:>10.4f} {b2b} {row['candidates_per_s']:>14,} "
                f"{m['repeats']:>5}",
                flush=True,
            )
    return rows_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--items", type=int, default=50_000, help="catalogue size (embedding rows)")
    p.add_argument(
        "--batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16, 128],
        help="requests per model call (comma list)",
    )
    p.add_argument("--candidates", type=int, default=500, help="candidates per request")
    p.add_argument(
        "--devices", default="auto", help="'auto' (cpu, and cuda when present) or a list"
    )
    p.add_argument(
        "--cpu-threads",
        default="1,all",
        help="torch thread counts for the CPU runs: 1 is what a serving replica uses "
        "(pin_threads), 'all' is torch's default",
    )
    p.add_argument("--cpu-repeats", type=int, default=20)
    p.add_argument(
        "--cpu-budget-s", type=float, default=0.5, help="time per CPU figure (min 3 calls)"
    )
    p.add_argument("--gpu-warmup", type=int, default=20)
    p.add_argument("--gpu-repeats", type=int, default=300)
    p.add_argument("--gpu-budget-s", type=float, default=5.0)
    p.add_argument(
        "--ranker-config",
        default="{}",
        help="JSON overrides of RankerConfig fields (device is set per run)",
    )
    p.add_argument(
        "--dense",
        type=int,
        default=None,
        help="dense features per candidate (default: len(rec.features.DENSE_FEATURES))",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "gpu_ranker.json"))
    args = p.parse_args(argv)
    check_deps()

    import torch

    all_threads = torch.get_num_threads()
    cpu_threads = sorted(
        {all_threads if t.strip() == "all" else int(t) for t in args.cpu_threads.split(",")}
    )
    n_dense = args.dense or n_dense_features()
    devices = (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if args.devices == "auto"
        else args.devices.split(",")
    )
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": cpu_threads,
        "torch_default_threads": all_threads,
        "node": platform.node(),
        "n_dense": n_dense,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    from rec.config import RankerConfig, RecallConfig

    ranker_cfg = RankerConfig(**json.loads(args.ranker_config)).model_dump(mode="json")
    print(
        f"torch {env['torch']} (cuda {env['torch_cuda']}), devices {devices}, "
        f"{env.get('gpu', 'no GPU')}, CPU at {cpu_threads} threads (torch default {all_threads})"
    )
    print(
        f"Ranker: {args.items:,} items, user_dim {RecallConfig().embedding_dim}, {n_dense} dense "
        f"features (rec.features.DENSE_FEATURES), item_embedding_dim {ranker_cfg['item_embedding_dim']}, hidden "
        f"{ranker_cfg['hidden']}"
    )
    print(
        f"{'dev':>8} {'what':<24} {'batch':>11} {'median ms':>10} {'p90 ms':>10} {'b2b ms':>10} "
        f"{'candidates/s':>14} {'calls':>5}"
    )
    results = []
    for dev in devices:
        for threads in cpu_threads if dev == "cpu" else [all_threads]:
            torch.set_num_threads(threads)
            results += bench_device(dev, args, n_dense)

    ref = [r for r in results if r["what"] == "ref mlp bf16 weights" and r["requests"] == 128]
    for r in ref:
        where = r["device"] if r["threads"] is None else f"cpu, {r['threads']} threads"
        b2b = f" (back-to-back {r['b2b_ms']} ms)" if r["b2b_ms"] else ""
        print(
            f"reference MLP bf16 weights, 128 x {args.candidates} on {where}: {r['ms']} ms{b2b} "
            f"vs {REF_QUOTE_MS} ms quoted on an H200"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "env": env,
                "ranker_config": ranker_cfg,
                "items": args.items,
                "reference_quote_ms": REF_QUOTE_MS,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
