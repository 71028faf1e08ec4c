"""Load benchmark of the Serve app (issue 10 item 6), with an asyncio HTTP client (aiohttp).

    .venv/bin/python bench/serve_load.py --segmenter DIR_OR_REF --generator DIR_OR_REF --data SHARDS \
        [--duration 20] [--clients 1,4,16] [--soak 180] --out bench/results/serve_load

1. In-process baseline: the work the app does for /v1/segment without Serve (decode the PNG,
   segment, encode the label map PNG) in this process, one request at a time: p50/p99 and img/s.
2. /v1/segment over HTTP at 1, 4 and 16 concurrent clients, batched (max_batch_size 8) and unbatched
   (max_batch_size 1), one Segmenter replica (autoscaling off), `duration` seconds each.
3. Autoscaling: the Segmenter with min 1 / max 3 replicas; 16 clients for a while, then 1; the
   replica count and the p99 of each second, with timestamps (a picture).
4. Soak: `soak` seconds of 4 clients, good requests interleaved with garbage (not an image, a
   truncated PNG, malformed JSON, absurd sampling parameters, unknown classes, an oversized body):
   the 5xx count (goal 0) and the replicas' memory (RSS) at the start and the end.

Everything runs on one machine: the client shares the cores with Ray, so throughput is a lower
bound of what the server does with the cores to itself.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summary(lat_ms: list[float], seconds: float, statuses: list[tuple[int, bool]]) -> dict:
    """``statuses``: (HTTP status, whether the request was a good one)."""
    ok = sum(1 for s, good in statuses if good and s == 200)
    return {"requests": len(statuses), "ok": ok, "good_not_ok": sum(1 for s, good in statuses if good and s != 200),
            "garbage_4xx": sum(1 for s, good in statuses if not good and 400 <= s < 500),
            "garbage_not_4xx": sum(1 for s, good in statuses if not good and not 400 <= s < 500),
            "5xx": sum(1 for s, _ in statuses if s >= 500),
            "p50_ms": pct(lat_ms, 50), "p99_ms": pct(lat_ms, 99), "throughput_rps": ok / seconds}


# ------------------------------------------------------------------ the client

async def load(url: str, bodies, clients: int, seconds: float, record=None) -> dict:
    """``clients`` concurrent loops posting ``bodies()`` (-> (path, form factory, expect_ok)) for ``seconds``."""
    import aiohttp

    lat, statuses = [], []
    counter = itertools.count()        # one sequence over all clients: garbage interleaves with good requests
    end = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def client():
            while time.monotonic() < end:
                path, form, good = bodies(next(counter))
                t0 = time.monotonic()
                try:
                    async with session.post(url + path, data=form()) as r:
                        await r.read()
                        status = r.status
                except aiohttp.ClientError:
                    status = 599            # a dropped connection counts as a server failure
                dt = 1000 * (time.monotonic() - t0)
                statuses.append((status, good))
                if good:
                    lat.append(dt)
                if record is not None:
                    record(time.monotonic(), dt, status, good)

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        took = time.monotonic() - t0
    return summary(lat, took, statuses)


def segment_body(images: list[bytes]):
    import aiohttp

    def body(k: int):
        def form():
            f = aiohttp.FormData()
            f.add_field("image", images[k % len(images)], filename="x.png", content_type="image/png")
            return f
        return "/v1/segment", form, True
    return body


def garbage_bodies(images: list[bytes], label_map: bytes, max_upload: int):
    """Every 4th request is garbage, cycling through the kinds a careless client sends."""
    import aiohttp

    good = segment_body(images)
    truncated = images[0][: len(images[0]) // 2]

    def form_of(**fields):
        def form():
            f = aiohttp.FormData()
            for name, (value, filename) in fields.items():
                if filename:
                    f.add_field(name, value, filename=filename, content_type="application/octet-stream")
                else:
                    f.add_field(name, value)
            return f
        return form

    bad = [
        ("/v1/segment", form_of(image=(b"not an image at all", "x.png"))),
        ("/v1/segment", form_of(image=(truncated, "x.png"))),
        ("/v1/synthesize", form_of(label_map=(label_map, "l.png"), params=('{"steps": 3', None))),
        ("/v1/synthesize", form_of(label_map=(label_map, "l.png"), params=('{"steps": 1000000}', None))),
        ("/v1/synthesize", form_of(label_map=(label_map, "l.png"), params=('{"guidance": NaN}', None))),
        ("/v1/edit", form_of(image=(images[0], "x.png"), params=('{"operation": "remove", "classes": ["unicorn"]}', None))),
        ("/v1/segment", form_of(image=(os.urandom(max_upload + 1), "x.png"))),
    ]

    def body(k: int):
        if k % 4 == 3:
            path, form = bad[(k // 4) % len(bad)]
            return path, form, False
        return good(k)
    return body


# ------------------------------------------------------------------ Serve

def replicas(deployment: str = "Segmenter") -> int:
    from ray import serve

    app = serve.status().applications.get("genseg")
    if app is None or deployment not in app.deployments:
        return 0
    return int(app.deployments[deployment].replica_states.get("RUNNING", 0))


def replica_rss_mb() -> dict[str, float]:
    import psutil
    from ray.util.state import list_actors

    out = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")]):
        if a.class_name.startswith("ServeReplica:genseg:") and a.pid:
            try:
                out[f"{a.class_name.split(':')[-1]}:{a.pid}"] = psutil.Process(a.pid).memory_info().rss / 2 ** 20
            except psutil.NoSuchProcess:
                pass
    return out


def deploy(args, port: int, max_batch: int, seg_autoscaling: dict) -> None:
    from ray import serve

    from serve_app.app import compose

    app = compose({"segmenter": args.segmenter, "generator": args.generator, "workdir": args.workdir,
                     "poll_interval_s": 0, "max_batch_size": max_batch, "max_steps": 50},
                    {"Segmenter": {"autoscaling_config": seg_autoscaling, "max_ongoing_requests": 32}})
    serve.run(app, name="genseg", route_prefix="/")
    deadline = time.time() + 120
    while replicas() < seg_autoscaling["min_replicas"] and time.time() < deadline:
        time.sleep(0.5)


def fixed(n: int) -> dict:
    return {"min_replicas": n, "max_replicas": n, "target_ongoing_requests": 2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segmenter", required=True)
    p.add_argument("--generator", required=True)
    p.add_argument("--data", required=True, help="shards whose val images are the requests")
    p.add_argument("--workdir", default="genseg-runs")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--soak", type=float, default=180.0)
    p.add_argument("--out", default="bench/results/serve_load")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from genseg import tracking
    from genseg.data.shards import decode_batch
    from pipelines.shards import iter_split
    from genseg.loading import load as load_model
    from jobs.runtime import Runtime, init_ray
    from serve_app.server import free_port

    args.workdir = str(Path(args.workdir).resolve())
    uri = tracking.setup(args.workdir)
    images_np = [im for b in iter_split(args.data, "val", limit=args.num_images) for im, _ in decode_batch(b)]
    images = [png(im) for im in images_np]
    levels = [int(c) for c in args.clients.split(",")]
    res: dict = {"images": len(images), "image_size": list(images_np[0].shape[:2]), "cpus": os.cpu_count(),
                 "date": time.strftime("%Y-%m-%d"), "args": vars(args)}

    # 1. in-process baseline: the same work as the app's /v1/segment, without Serve
    seg = load_model(tracking.resolve(args.segmenter, uri), expect="segmenter")
    import torch

    torch.set_num_threads(1)   # as in the replica (AppOptions.threads)
    from genseg import imageio

    lat, bare = [], []
    end = time.monotonic() + args.duration
    k = 0
    while time.monotonic() < end:
        t0 = time.monotonic()
        im = imageio.read_image(images[k % len(images)])
        t1 = time.monotonic()
        labels = seg.segment_batch(im[None])[0]
        t2 = time.monotonic()
        imageio.png_bytes(labels.astype(np.uint8))
        lat.append(1000 * (time.monotonic() - t0))
        bare.append(1000 * (t2 - t1))
        k += 1
    res["in_process"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "throughput_rps": len(lat) / args.duration,
                         "model_only_p50_ms": pct(bare, 50), "requests": len(lat)}
    print(f"in-process: p50 {res['in_process']['p50_ms']:.1f} ms, p99 {res['in_process']['p99_ms']:.1f} ms, "
          f"{res['in_process']['throughput_rps']:.1f} req/s (model alone p50 {res['in_process']['model_only_p50_ms']:.1f} ms)",
          flush=True)

    init_ray(Runtime(Path(args.workdir), uri, None))
    from ray import serve

    port = free_port(preferred=8000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"

    # 2. batched vs unbatched at 1 / 4 / 16 clients, one Segmenter replica
    res["http"] = {}
    for mode, batch in (("batched", 8), ("unbatched", 1)):
        deploy(args, port, batch, fixed(1))
        asyncio.run(load(url, segment_body(images), 4, 5))     # warm-up
        for c in levels:
            r = asyncio.run(load(url, segment_body(images), c, args.duration))
            res["http"][f"{mode}_{c}"] = r
            print(f"{mode:9s} {c:2d} clients: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                  f"{r['throughput_rps']:.1f} req/s, {r['5xx']} 5xx", flush=True)
    res["overhead_p50_ms"] = {mode: res["http"][f"{mode}_1"]["p50_ms"] - res["in_process"]["p50_ms"]
                              for mode in ("batched", "unbatched")} if 1 in levels else None
    res["batched_speedup_16"] = (res["http"]["batched_16"]["throughput_rps"] /
                                 res["http"]["unbatched_16"]["throughput_rps"]) if 16 in levels else None

    # 3. autoscaling under a load step
    # one ongoing request at the Segmenter is a batch (the ingress keeps up to 4 in flight)
    auto = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 2,
            "downscale_delay_s": 10, "metrics_interval_s": 1, "look_back_period_s": 3}
    deploy(args, port, 8, auto)
    timeline: list = []
    t_start = time.monotonic()

    async def autoscale_run():
        stop = asyncio.Event()

        async def watch():
            while not stop.is_set():
                timeline.append({"t": time.monotonic() - t_start, "replicas": await asyncio.to_thread(replicas)})
                await asyncio.sleep(1)

        w = asyncio.create_task(watch())
        lat_by_s: dict = {}

        def rec(t, dt, status, good):
            lat_by_s.setdefault(int(t - t_start), []).append(dt)

        await load(url, segment_body(images), 16, 40, rec)
        await load(url, segment_body(images), 1, 40, rec)
        stop.set()
        await w
        return {s: pct(v, 99) for s, v in sorted(lat_by_s.items())}

    p99_by_s = asyncio.run(autoscale_run())
    res["autoscaling"] = {"config": auto, "timeline": timeline, "p99_by_second": p99_by_s,
                          "max_replicas_seen": max(x["replicas"] for x in timeline),
                          "replicas_at_end": timeline[-1]["replicas"]}
    up = next((x["t"] for x in timeline if x["replicas"] > 1), None)
    down = next((x["t"] for x in timeline if x["t"] > 40 and x["replicas"] == 1), None)
    res["autoscaling"].update(first_upscale_s=up, back_to_one_s=down)
    print(f"autoscaling: up to {res['autoscaling']['max_replicas_seen']} replicas, first added at {up} s of load, "
          f"back to 1 at {down} s (load dropped at 40 s)", flush=True)

    # 4. soak with garbage
    deploy(args, port, 8, fixed(1))
    lm = np.zeros(tuple(seg_size_of(args, uri)), np.uint8)
    rss0 = replica_rss_mb()
    soak = asyncio.run(load(url, garbage_bodies(images, png(lm), 10 * 1024 * 1024), 4, args.soak))
    rss1 = replica_rss_mb()
    res["soak"] = {**soak, "seconds": args.soak, "rss_mb_start": rss0, "rss_mb_end": rss1,
                   "rss_growth_mb": {k: rss1[k] - rss0[k] for k in rss0 if k in rss1}}
    print(f"soak {args.soak:.0f} s: {soak['requests']} requests, {soak['ok']} good ones answered 200 "
          f"({soak['good_not_ok']} did not), {soak['garbage_4xx']} garbage ones 4xx ({soak['garbage_not_4xx']} not), "
          f"{soak['5xx']} 5xx; "
          f"replica RSS growth (MB): " + ", ".join(f"{k.split(':')[0]} {v:+.0f}" for k, v in
                                                   res['soak']['rss_growth_mb'].items()), flush=True)
    serve.shutdown()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(res, indent=2, default=str))
    picture(res, Path(f"{out}_autoscaling.png"))
    print(f"wrote {out}.json and {out}_autoscaling.png")
    return 0


def seg_size_of(args, uri) -> tuple[int, int]:
    from genseg import tracking
    from genseg.loading import load as load_model

    return load_model(tracking.resolve(args.generator, uri), expect="generator").image_size


def picture(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = res["autoscaling"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    t = [x["t"] for x in a["timeline"]]
    ax.step(t, [x["replicas"] for x in a["timeline"]], where="post", color="C0", label="Segmenter replicas")
    ax.set_xlabel("seconds (16 clients until 40 s, then 1)")
    ax.set_ylabel("replicas", color="C0")
    ax.set_ylim(0, a["config"]["max_replicas"] + 0.5)
    ax.axvline(40, color="grey", ls=":")
    ax2 = ax.twinx()
    secs = sorted(int(s) for s in a["p99_by_second"])
    ax2.plot(secs, [a["p99_by_second"][s] if s in a["p99_by_second"] else a["p99_by_second"][str(s)] for s in secs],
             color="C3", label="p99 latency")
    ax2.set_ylabel("p99 of the second (ms)", color="C3")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
