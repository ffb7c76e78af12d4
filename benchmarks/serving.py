"""Our model server against ``mlflow models serve`` on the same registered model, same machine, same run.

    python -m benchmarks.serving [--seconds 10]

Trains the digits demo once and registers it, starts ``gitops-ml serve`` and
``mlflow models serve -m models:/<name>/1 --env-manager local`` on loopback, then
drives each with ``wrk`` (Debian package; loopback only, fixed duration) at batch 1
and batch 32, with 1 and 8 concurrent connections.  Each server gets its native
request: ours a PNG body (batch 1) or JSON base64 PNGs (batch 32), so it also decodes
and resizes; MLflow a JSON tensor (``{"inputs": ...}``).  Peak memory is the VmHWM
of each server's process tree.

The same run also serves the same trained model through our server's previous path (the Keras
model loaded with its Python code and called through ``training.compile_predictor``), registered
under a second model name without the code-free artifact, against the exported TF SavedModel that
every version now carries (``ours``): the serving cost of serving without model code.

Then, for our server only: how long a good request (one PNG) waits while a
worst-case request is in flight (16 flat 2000x2000 PNGs in one JSON body: 64
megapixels, the per-request pixel budget; a few hundred ms of decoding), against
the same good request on an idle server. Median of several rounds.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks._common import OUT_DIR, free_port, fresh_home

BIN = Path(sys.executable).parent
LUA = """
wrk.method = "POST"
local f = io.open(os.getenv("BODY_FILE"), "rb")
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
"""


def wait(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def tree_peak_rss_mb(pid: int) -> float:
    pids, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        for child in map(int, children):
            pids.add(child)
            frontier.append(child)
    total = 0
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
        except (OSError, AttributeError):
            pass
    return total / 1024


def wrk(url: str, body: Path, content_type: str, connections: int, seconds: int, script: Path) -> dict:
    out = subprocess.run(
        ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BODY_FILE": str(body), "CONTENT_TYPE": content_type},
    ).stdout

    def pct(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def worst_case_body() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((2000, 2000), 128, np.uint8), "L").save(buf, "PNG")
    return json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()] * 16}).encode()


def good_request_beside_worst_case(url: str, good: bytes, rounds: int = 7) -> dict:
    """Latency of a good request alone and while a worst-case request is being decoded (medians, ms)."""
    import statistics
    import threading

    worst = worst_case_body()
    alone, beside, worst_s = [], [], []
    with httpx.Client(timeout=120) as http:
        for _ in range(rounds):
            started = time.perf_counter()
            assert http.post(url, content=good, headers={"content-type": "image/png"}).status_code == 200
            alone.append((time.perf_counter() - started) * 1000)

            def send_worst() -> None:
                began = time.perf_counter()
                httpx.post(url, content=worst, headers={"content-type": "application/json"}, timeout=120)
                worst_s.append(time.perf_counter() - began)

            sender = threading.Thread(target=send_worst)
            sender.start()
            time.sleep(0.05)  # the worst-case request is being decoded now
            started = time.perf_counter()
            assert http.post(url, content=good, headers={"content-type": "image/png"}).status_code == 200
            beside.append((time.perf_counter() - started) * 1000)
            sender.join()
    return {
        "alone_ms": statistics.median(alone),
        "beside_worst_ms": statistics.median(beside),
        "beside_worst_max_ms": max(beside),
        "worst_s": statistics.median(worst_s),
    }


def comparison_table(table: dict, ours: str, baseline: str, ours_label: str, baseline_label: str) -> None:
    """Markdown rows: requests/s of ``ours`` and ``baseline`` per batch and client count, their ratio, latencies."""
    print(
        f"\n| batch | clients | {ours_label} req/s | {baseline_label} req/s | ratio | {ours_label} p50 / p99 ms | "
        f"{baseline_label} p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 32):
        for clients in (1, 8):
            o, b = table[(ours, batch, clients)], table[(baseline, batch, clients)]
            print(
                f"| {batch} | {clients} | {o['rps']:.0f} | {b['rps']:.1f} | {o['rps'] / b['rps']:.2f}x | "
                f"{o['p50_ms']:.2f} / {o['p99_ms']:.2f} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    ours_port, mlflow_port = free_port(), free_port()
    home = fresh_home("serving-", ours_port)
    out_dir = OUT_DIR
    import numpy as np

    from gitops_ml import demo, flow, registry
    from gitops_ml.config import Settings

    settings = Settings.from_env()
    info = demo.init_demo(home / "demo-repo", str(home / "dvc-remote"))
    result = flow.run_local(settings, info["commit_sha"], deploy_model=False)
    registry.set_alias(settings, result.model_version)
    # The same trained model without the serving artifact: the server falls back to the Keras path.
    keras_path = settings.with_overrides(model_name=f"{settings.model_name}-keras-path")
    version = registry.get_version(settings, result.model_version)
    model, meta = registry.load_model(settings, version)
    logged = registry.log_training(
        keras_path,
        "keras-path",
        {},
        {},
        model,
        {},
        meta,
        np.zeros((1, meta["height"], meta["width"], meta["channels"]), np.float32),
    )
    old = registry.register(
        keras_path,
        logged["run_id"],
        logged["model_uri"],
        {**registry.version_tags(version), "commit_sha": info["commit_sha"]},
    )
    registry.set_alias(keras_path, str(old.version))
    keras_port = free_port()
    os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # `mlflow models serve` execs `uvicorn`

    images = sorted((settings.work_dir / info["commit_sha"] / "data" / "images").rglob("*.png"))[:32]
    pngs = [p.read_bytes() for p in images]
    from PIL import Image

    arrays = [(np.asarray(Image.open(p), dtype=np.float32) / 255.0)[..., None].tolist() for p in images]
    bodies = {
        ("ours", 1): (pngs[0], "image/png"),
        ("ours", 32): (
            json.dumps({"images": [base64.b64encode(b).decode() for b in pngs]}).encode(),
            "application/json",
        ),
        ("ours-keras", 1): (pngs[0], "image/png"),
        ("ours-keras", 32): (
            json.dumps({"images": [base64.b64encode(b).decode() for b in pngs]}).encode(),
            "application/json",
        ),
        ("mlflow", 1): (json.dumps({"inputs": arrays[:1]}).encode(), "application/json"),
        ("mlflow", 32): (json.dumps({"inputs": arrays}).encode(), "application/json"),
    }
    script = out_dir / "post.lua"
    script.write_text(LUA)
    servers = {
        "ours": (
            subprocess.Popen(
                [str(BIN / "gitops-ml"), "serve", "--port", str(ours_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            ),
            f"http://127.0.0.1:{ours_port}",
            "/predict",
            "/health",
        ),
        "ours-keras": (
            subprocess.Popen(
                [str(BIN / "gitops-ml"), "serve", "--port", str(keras_port)],
                env={**os.environ, "GITOPS_ML_MODEL_NAME": keras_path.model_name},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            ),
            f"http://127.0.0.1:{keras_port}",
            "/predict",
            "/health",
        ),
        "mlflow": (
            subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "models",
                    "serve",
                    "-m",
                    f"models:/{settings.model_name}/{result.model_version}",
                    "--env-manager",
                    "local",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(mlflow_port),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            ),
            f"http://127.0.0.1:{mlflow_port}",
            "/invocations",
            "/ping",
        ),
    }
    rows = []
    try:
        for name, (_proc, base, _path, ready) in servers.items():
            started = time.monotonic()
            wait(base + ready)
            print(f"{name} ready after {time.monotonic() - started:.1f} s", flush=True)
        for name, (proc, base, path, _) in servers.items():
            for batch in (1, 32):
                body, ctype = bodies[(name, batch)]
                body_file = out_dir / f"body-{name}-{batch}"
                body_file.write_bytes(body)
                check = httpx.post(base + path, content=body, headers={"content-type": ctype}, timeout=30)
                assert check.status_code == 200, (name, batch, check.text[:300])
                for connections in (1, 8):
                    r = wrk(base + path, body_file, ctype, connections, args.seconds, script)
                    rows.append({"server": name, "batch": batch, "clients": connections, **r})
                    print(
                        f"{name:10} batch {batch:2} clients {connections}: {r['rps']:8.1f} req/s "
                        f"({r['rps'] * batch:8.1f} images/s)  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                        f"non-2xx {r['non_2xx']}",
                        flush=True,
                    )
            if name == "ours":
                fairness = good_request_beside_worst_case(base + path, bodies[("ours", 1)][0])
                rows.append({"server": name, "fairness": fairness})
                print(
                    f"ours good request alone {fairness['alone_ms']:.1f} ms, beside a worst-case request "
                    f"{fairness['beside_worst_ms']:.1f} ms (max {fairness['beside_worst_max_ms']:.1f} ms); "
                    f"the worst-case request took {fairness['worst_s']:.2f} s",
                    flush=True,
                )
            rows.append({"server": name, "peak_rss_mb": tree_peak_rss_mb(proc.pid)})
    finally:
        for proc, *_ in servers.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    table = {(r["server"], r["batch"], r["clients"]): r for r in rows if "batch" in r}
    rss = {r["server"]: r["peak_rss_mb"] for r in rows if "peak_rss_mb" in r}
    comparison_table(table, "ours", "mlflow", "ours", "mlflow")
    print("\nserving artifact (TF SavedModel, no model code) vs the previous path (Keras model + tf.function):")
    comparison_table(table, "ours", "ours-keras", "artifact", "Keras path")
    fair = next(r["fairness"] for r in rows if "fairness" in r)
    print(
        f"\ngood request (batch 1) alone {fair['alone_ms']:.1f} ms; while a worst-case request (64 MP) is in "
        f"flight {fair['beside_worst_ms']:.1f} ms median, {fair['beside_worst_max_ms']:.1f} ms max; "
        f"worst-case request {fair['worst_s']:.2f} s"
    )
    print(
        f"\npeak RSS: ours {rss['ours']:.0f} MB (Keras path {rss['ours-keras']:.0f} MB), "
        f"mlflow models serve {rss['mlflow']:.0f} MB"
    )
    (out_dir / "serving.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
