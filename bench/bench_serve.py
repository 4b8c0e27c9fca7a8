"""Serve load test: /v1/classify with 10 labels at concurrency 1, 8, 32, 64, dynamic batching on
(max_batch_size 32) vs off (max_batch_size 1), both apps side by side on one local Ray Serve, under
each HTTP front end (Serve's Python proxy, HAProxy with direct ingress); and Serve's per-request
overhead vs calling the model in-process.

    python bench/bench_serve.py [--quick] [--proxy haproxy]
    python bench/bench_serve.py --model ViT-B-16 --num-gpus 0.25   # on a GPU: both apps' 4 towers share one

Goal (issue: serve): >= 4x throughput with batching at concurrency 32, at equal or better p99.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import clip_core  # noqa: E402
from bench.common import markdown_table, plot_cdf, write_report  # noqa: E402
from deploy import rollout  # noqa: E402
from deploy import serve as served  # noqa: E402
from workflows.synthetic import samples  # noqa: E402

LABELS = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon", "orange cross",
          "white circle", "black square", "pink triangle", "brown star"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _payloads(count: int) -> list[dict]:
    out = []
    for sample in samples(count, split="all", seed=42, image_size=224):
        buffer = io.BytesIO()
        sample.image.save(buffer, format="JPEG", quality=90)
        out.append({"images": [base64.b64encode(buffer.getvalue()).decode()], "labels": LABELS})
    return out


def _cpu_seconds(roles: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """CPU seconds (user + system) so far of this machine's processes in each role: those whose command
    line starts with one of its prefixes (Ray's workers name themselves `ray::CLASS`), or whose program
    has that name (HAProxy). Linux /proc; a process that ended meanwhile is left out."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = dict.fromkeys(roles, 0.0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            command = Path(entry.path, "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for role, names in roles.items():
            if command.startswith(names) or os.path.basename(command) in names:
                totals[role] += (int(fields[11]) + int(fields[12])) / tick
    return totals


def _roles(app: str) -> dict[str, tuple[str, ...]]:
    """The processes that work on an app's requests, by role."""
    return {"front end": ("ray::ProxyActor", "haproxy"), "ingress": (f"ray::ServeReplica:{app}:Ingress",),
            "towers": (f"ray::ServeReplica:{app}:ImageTower", f"ray::ServeReplica:{app}:TextTower")}


async def _load(url: str, payloads: list[dict] | None, concurrency: int, requests: int,
                roles: dict[str, tuple[str, ...]]) -> dict:
    """/v1/classify with `payloads` at `concurrency`; with none, GET /healthz (Serve's HTTP path alone).
    With aiohttp: its C parser costs this client 0.15 ms of CPU a request, httpx's 3 ms, which capped
    /healthz at this client's ~500 requests/s on a core of its own (2,000 with aiohttp, HAProxy's).
    Also the CPU each of `roles`' processes and this client spent per request (ms)."""
    import aiohttp

    bodies = [json.dumps(payload).encode() for payload in payloads or ()]
    latencies: list[float] = []
    failures = 0
    queue: list[int] = []

    async def worker(session):
        nonlocal failures
        while queue:
            i = queue.pop()
            started = time.perf_counter()
            request = (session.post(f"{url}/v1/classify", data=bodies[i % len(bodies)],
                                    headers={"Content-Type": "application/json"}) if bodies
                       else session.get(f"{url}/healthz"))
            async with request as response:
                await response.read()
            if response.status == 200:  # a quick 503 is no request served
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        queue[:] = list(range(min(requests, 2 * concurrency)))  # warm up: connections, batch sizes
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        latencies.clear()
        failures = 0
        queue[:] = list(range(requests))
        cpu, client = _cpu_seconds(roles), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        client = time.process_time() - client
        cpu = {role: 1000 * (spent - cpu[role]) / requests for role, spent in _cpu_seconds(roles).items()}
    ordered = sorted(latencies)
    if not ordered:
        raise RuntimeError(f"none of the {requests} requests to {url} was answered with 200 ({failures} failed)")

    def pct(p):
        return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {"rps": len(latencies) / elapsed, "p50": pct(50), "p95": pct(95), "p99": pct(99), "failures": failures,
            "latencies_ms": [1000 * latency for latency in ordered],
            "cpu_ms": {**cpu, "client": 1000 * client / requests}}


def _direct_ms(checkpoint: str, payloads: list[dict], repeats: int, device: str) -> float:
    """One request's work in-process: base64 + decode + crop + image tower (bf16 on a GPU, as the
    replicas run it) + cached classifier."""
    import torch

    from clip_core.transforms import normalize

    model = clip_core.load_model(checkpoint).to(device)
    limits = served.Limits()
    classifier = clip_core.zero_shot_classifier(model, clip_core.get_tokenizer(), LABELS).float().cpu().numpy()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        data = served.decode_base64(payloads[i % len(payloads)]["images"][0], 0, limits)
        pixels = served.prepare_image(data, 0, model.image_size, limits)
        with torch.inference_mode(), autocast:
            # a copy, as the replicas' np.stack makes (the decoded array is read-only)
            features = model.encode_image(normalize(torch.tensor(pixels[None]).to(device)), normalize=True)
            served.softmax(float(model.logit_scale.exp()) * features.float().cpu().numpy() @ classifier)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


# The HTTP front ends measured: Serve's Python proxy (Ray's default) and HAProxy with direct ingress (Ray's
# high-throughput mode). The second also listens for its stats and metrics on fixed ports (moved to free
# ones here) and drains a stopping ingress replica for 30 s (1 s here: nothing is in flight by then).
PROXIES = {"serve": {}, "haproxy": rollout.HIGH_THROUGHPUT_ENV}


def _proxy_env(proxy: str) -> dict[str, str]:
    """This process's environment with `proxy`'s settings (and without the other's)."""
    env = {key: value for key, value in os.environ.items() if key not in rollout.HIGH_THROUGHPUT_ENV}
    env.update(PROXIES[proxy])
    if PROXIES[proxy]:
        env.update(RAY_SERVE_HAPROXY_STATS_PORT=str(_free_port()), RAY_SERVE_HAPROXY_METRICS_PORT=str(_free_port()),
                   RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1")
    return env


def measure(checkpoint: str, num_gpus: float, ingress_replicas: int, quick: bool) -> dict:
    """Both apps (batching on and off) side by side on one local Ray Serve started here, under the HTTP
    front end this process's environment names: each level's results, and the ceiling without the model."""
    import ray
    from ray import serve

    levels = [1, 8, 32] if quick else [1, 8, 32, 64]
    per_level = 64 if quick else 256
    payloads = _payloads(32)
    # no access log: a line per request and per tower call, forwarded to this process, costs the
    # replicas and the load generator CPU that both modes would share
    base = dict(model=checkpoint, port=_free_port(), num_cpus=0.5, num_gpus=num_gpus, max_ongoing_requests=64,
                autoscaling=served.Autoscaling(min_replicas=1, max_replicas=1), access_log=False,
                ingress_replicas=ingress_replicas)
    apps = {"batching on": ("batched", 32, 0.005), "batching off": ("unbatched", 1, 0.0)}
    urls = {mode: rollout.start(served.ServeConfig(**base, max_batch_size=size, batch_wait_timeout_s=wait),
                                name=app, route_prefix=f"/{app}") for mode, (app, size, wait) in apps.items()}
    results = {}
    for concurrency in levels:
        for mode, url in urls.items():  # side by side at each level
            result = results[f"{mode}|{concurrency}"] = asyncio.run(_load(url, payloads, concurrency, per_level,
                                                                          _roles(apps[mode][0])))
            print(mode, concurrency, {k: v for k, v in result.items() if k != "latencies_ms"}, flush=True)
    # the ceiling Serve's HTTP front end and the ingress set without the model: a route that calls no tower
    ceiling = asyncio.run(_load(urls["batching off"], None, 32, 2 * per_level, _roles(apps["batching off"][0])))
    serve.shutdown()
    ray.shutdown()
    return {"levels": levels, "per_level": per_level, "results": results, "ceiling": ceiling["rps"],
            "ceiling_cpu_ms": ceiling["cpu_ms"]}


def main(quick: bool = False, model: str = "tiny", num_gpus: float = 0.0, ingress_replicas: int = 1,
         proxies: tuple[str, ...] = tuple(PROXIES)) -> None:
    """Each proxy's run in its own process (Ray reads the proxy's settings when it starts); the report
    is written again after each, so a run stopped by a time limit keeps the proxies it measured."""
    import subprocess

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = os.path.join(scratch, "model")
        clip_core.save_checkpoint(clip_core.create_model(model), checkpoint)
        direct = _direct_ms(checkpoint, _payloads(32), 30 if quick else 100, "cuda" if num_gpus else "cpu")
        for proxy in proxies:
            out = os.path.join(scratch, "run.json")
            env = {**_proxy_env(proxy), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
            env.pop(served.TOKEN_ENV, None)
            print(f"== {proxy}", flush=True)
            subprocess.run([sys.executable, __file__, "--measure", checkpoint, out, "--num-gpus", str(num_gpus),
                            "--ingress-replicas", str(ingress_replicas), *(["--quick"] if quick else [])],
                           env=env, check=True)
            runs[proxy] = json.loads(Path(out).read_text())
            print(_report(runs, direct, model, num_gpus, ingress_replicas), flush=True)


def _report(runs: dict[str, dict], direct: float, model: str, num_gpus: float, ingress_replicas: int) -> Path:
    name = "serve_gpu" if num_gpus else "serve"  # the report's files: a GPU run keeps the CPU run's
    proxies = tuple(runs)
    levels, per_level = runs[proxies[0]]["levels"], runs[proxies[0]]["per_level"]

    def result(proxy, mode, concurrency):
        return runs[proxy]["results"][f"{mode}|{concurrency}"]

    def ratio(proxy, concurrency, key):
        return result(proxy, "batching on", concurrency)[key] / result(proxy, "batching off", concurrency)[key]

    rows = [[proxy, c, mode, f"{r['rps']:.1f}", f"{r['p50']:.1f}", f"{r['p95']:.1f}", f"{r['p99']:.1f}", r["failures"]]
            for proxy in proxies for c in levels for mode in ("batching off", "batching on")
            for r in [result(proxy, mode, c)]]
    ratios = [[proxy, c, f"{ratio(proxy, c, 'rps'):.2f}x", f"{ratio(proxy, c, 'p99'):.2f}"]
              for proxy in proxies for c in levels]
    fronts = [[proxy, f"{result(proxy, 'batching off', 1)['p50']:.1f}",
               f"{result(proxy, 'batching off', 1)['p50'] - direct:.1f}", f"{runs[proxy]['ceiling']:.0f}"]
              for proxy in proxies]

    def cpu_row(proxy, requests, spent):
        bound = ingress_replicas * 1000 / spent["ingress"] if spent.get("ingress") else float("nan")
        return [proxy, requests, *(f"{spent[role]:.2f}" for role in ("front end", "ingress", "towers", "client")),
                f"{bound:.0f}"]

    cpus = [cpu_row(proxy, f"/v1/classify, {mode}", result(proxy, mode, 32)["cpu_ms"])
            for proxy in proxies for mode in ("batching on", "batching off")]
    cpus += [cpu_row(proxy, "/healthz", {"towers": 0.0, **runs[proxy]["ceiling_cpu_ms"]}) for proxy in proxies]
    sections = [
        f"`/v1/classify`, one 224 px JPEG and 10 labels per request, `{model}` preset "
        f"{f'on a GPU (bf16, {num_gpus:g} GPU' if num_gpus else 'on CPU (0.5 CPU'} per tower replica), one replica per "
        f"tower, {ingress_replicas} ingress replica(s) (decoding and cropping), Serve's access log off, "
        f"{per_level} requests per level after a warm-up, an aiohttp client in the same machine. Each HTTP front "
        "end on its own local Ray: `serve`, Serve's Python proxy (Ray's default), and `haproxy`, HAProxy sending "
        "requests straight to the ingress replicas (Ray's high-throughput mode: `" + " ".join(f"{k}={v}" for k, v in
                                                                        rollout.HIGH_THROUGHPUT_ENV.items()) + "`).",
        "", markdown_table(["proxy", "concurrency", "mode", "req/s", "p50 ms", "p95 ms", "p99 ms", "failed"], rows), "",
        "## Batching on vs off", "",
        markdown_table(["proxy", "concurrency", "throughput ratio (on/off)", "p99 ratio (on/off, < 1 is better)"],
                       ratios), "",
        "## Serve's per-request overhead", "",
        f"The same request's work in-process (base64, decode, crop, image tower, cached classifier): {direct:.1f} ms "
        "median. Through Serve at concurrency 1 (batching off) the rest is Serve's (HTTP front end, ingress, handle "
        "call to the tower); without the model (`GET /healthz` at concurrency 32: front end and ingress only) the "
        "app answers at a rate no mode can pass.", "",
        markdown_table(["proxy", "p50 ms at concurrency 1", "Serve adds (ms)", "ceiling: /healthz req/s"], fronts),
        "", "## Where a request's CPU goes", "",
        "Milliseconds of CPU (user + system, from /proc around each measured run) per request at concurrency 32, by "
        "the processes that spent it: the HTTP front end (Serve's proxy actor; with HAProxy, HAProxy and the proxy "
        "actor Serve keeps beside it), the ingress replicas, the two tower replicas and the load generator. An "
        "ingress replica is one Python process, so it answers at most 1,000 / its ms requests a second: the last "
        f"column, times the {ingress_replicas} replica(s).", "",
        markdown_table(["proxy", "requests", "front end", "ingress", "towers", "client", "ingress bound req/s"], cpus),
        "", "## Latency distribution", "",
        plot_cdf(f"{name}_latency", "Serve: /v1/classify latency CDF, concurrency 32",
                 {f"{proxy}, {mode}": result(proxy, mode, 32)["latencies_ms"]
                  for proxy in proxies for mode in ("batching on", "batching off")}),
    ]
    bars = {f"c={c}": {f"{proxy}: batching on / off": ratio(proxy, c, "rps") for proxy in proxies} for c in levels}
    return write_report(name, f"Serve: dynamic batching under load ({model}, {'GPU' if num_gpus else 'CPU'})",
                        sections, bars, bar_label="throughput ratio (x)")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="tiny", help="preset to serve (random weights)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPU per tower replica (0: CPU)")
    parser.add_argument("--ingress-replicas", type=int, default=1, help="replicas decoding and cropping the images")
    parser.add_argument("--proxy", action="append", choices=list(PROXIES),
                        help="HTTP front end(s) to measure (default: each)")
    parser.add_argument("--measure", nargs=2, metavar=("CHECKPOINT", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # one proxy's run, in the environment main() gives it
        result = measure(args.measure[0], args.num_gpus, args.ingress_replicas, args.quick)
        Path(args.measure[1]).write_text(json.dumps(result))
    else:
        main(args.quick, args.model, args.num_gpus, args.ingress_replicas, tuple(args.proxy or PROXIES))
