"""Ray Train overhead: samples/s of the train stage (Ray Data decoding, Ray Train worker, DDP
wrapper, checkpoint reporting) vs a plain single-process torch loop over the same model, data,
batch and augmentation on this machine; and Ray Train's scaling with workers (1, 2, 4; the batch
per worker fixed). Writes bench/results/train.md, train.png and train_scaling.png.

    python bench/bench_train.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_core  # noqa: E402
from bench.common import markdown_table, plot_bars, plot_lines, write_report  # noqa: E402
from workflows.preprocess import PreprocessOptions, preprocess, read_prepared_table  # noqa: E402
from workflows.preprocess import decode_batch  # noqa: E402
from workflows.runtime import init_ray  # noqa: E402
from workflows.train import TrainConfig, contrastive_step, default_cpus_per_worker, train  # noqa: E402
from workflows.train_data import Augment  # noqa: E402


def plain_loop(data_uri: str, model_name: str, batch_size: int, steps: int, warmup: int) -> float:
    """samples/s of an ordinary torch loop: decode, augment, forward/backward, AdamW, in one process."""
    torch.manual_seed(0)
    model = clip_core.create_model(model_name)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    rows = read_prepared_table(data_uri, columns=["image", "tokens"]).to_pydict()
    augment = Augment(model.image_size, train=True, generator=torch.Generator().manual_seed(0))
    loss_fn = clip_core.ClipLoss()
    started = None
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        start = (step * batch_size) % (len(rows["image"]) - batch_size)
        batch = decode_batch({k: v[start : start + batch_size] for k, v in rows.items()}, model.image_size)
        images = augment(torch.from_numpy(batch["image"]))
        optimizer.zero_grad(set_to_none=True)
        contrastive_step(model, loss_fn, images, torch.from_numpy(batch["tokens"]), 1,
                         torch.autocast("cpu", enabled=False))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return (steps - warmup) * batch_size / (time.perf_counter() - started)


SCALING_WORKERS = (1, 2, 4)


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def prepared(tmp: str, model: str, count: int) -> str:
    data = str(Path(tmp) / f"data-{count}")
    image_size = clip_core.get_config(model).vision.image_size
    preprocess(f"synthetic://train?count={count}&image_size={image_size}", data,
               PreprocessOptions(image_size=image_size), echo=lambda *_: None)
    return data


def ray_train(data: str, storage: str, model: str, batch_size: int, steps: int, window: int, **scaling) -> dict:
    """Ray Train's metrics over the last `window` of `steps` steps."""
    return train(TrainConfig(data=[data], model=model, batch_size=batch_size, steps=steps, warmup_steps=1,
                             log_every=window, checkpoint_every=steps, storage=storage, **scaling),
                 echo=lambda *_: None).metrics


def overhead(args, tmp: str, steps: int, window: int, rounds: int) -> list[str]:
    """Ray Train (one worker, default CPUs) vs the plain loop, interleaved round by round."""
    # one epoch of fresh data, and the same steps over a 5-batch dataset, where the measured steps
    # cross epoch boundaries (Ray Data runs the dataset again at each)
    boundaries = sum(1 for step in range(steps - window + 1, steps + 1) if step > 1 and (step - 1) % 5 == 0)
    layouts = {"one epoch": args.batch_size * (steps + 4), "5-batch epochs": args.batch_size * 5}
    rows, ratios = [], {}
    for layout, count in layouts.items():
        data = prepared(tmp, args.model, count)
        plain, ray_rates, data_waits = [], [], []
        # one pair swings by a third on a shared 2-core machine: interleave pairs, compare medians
        for round_ in range(rounds):
            plain.append(plain_loop(data, args.model, args.batch_size, steps, warmup=steps - window))
            metrics = ray_train(data, str(Path(tmp) / f"runs-{count}-{round_}"), args.model, args.batch_size,
                                steps, window)
            ray_rates.append(metrics["samples_per_s"])
            data_waits.append(metrics["data_wait_fraction"])
            print(f"{layout}, round {round_ + 1}: plain {plain[-1]:.1f}, Ray Train {ray_rates[-1]:.1f} "
                  f"samples/s, data wait {data_waits[-1]:.1%}", flush=True)
        plain_rate, ray_rate = statistics.median(plain), statistics.median(ray_rates)
        # each round's pair ran back to back, so its ratio cancels the machine's drift between rounds
        paired = sorted(1 - r / p for p, r in zip(plain, ray_rates))
        overhead = statistics.median(paired)
        print(f"{layout} median: plain {plain_rate:.1f}, Ray Train {ray_rate:.1f} samples/s, "
              f"overhead {overhead:.1%} ({paired[0]:+.1%} to {paired[-1]:+.1%})", flush=True)
        rows.append([f"{args.model}, batch {args.batch_size}, {layout}", f"{plain_rate:.1f} ({spread(plain)})",
                     f"{ray_rate:.1f} ({spread(ray_rates)})", f"{statistics.median(data_waits):.1%}",
                     f"**{overhead:+.1%}** ({paired[0]:+.1%} to {paired[-1]:+.1%})"])
        ratios[f"{args.model} batch {args.batch_size}, {layout}"] = {"Ray Train / plain": 1 - overhead}
    return [
        "## Ray Train vs a plain torch loop", "",
        f"Samples/s over the last {window} of {steps} steps (start-up excluded), fp32, {os.cpu_count()} cores; "
        f"median of {rounds} interleaved plain/Ray rounds (range in brackets). "
        "Plain: one process decodes, augments and steps. Ray Train: one worker with all cores; Ray Data decodes "
        "in separate tasks; the worker augments and steps, and reports a checkpoint at the end.",
        "One epoch: the steps never reach the end of the data. 5-batch epochs: the data is "
        f"{layouts['5-batch epochs']} rows, so the measured steps cross {boundaries} epoch boundaries, where Ray "
        "Data runs the dataset again (the plain loop wraps around its in-memory table).",
        "Overhead is 1 - Ray/plain of each round's pair, the median of the rounds (their range in brackets; "
        "negative: Ray is faster, its decoding overlapping the step). "
        "Data wait is the fraction of the Ray worker's time spent waiting for the next batch.",
        "",
        markdown_table(["run", "plain loop samples/s", "Ray Train samples/s", "data wait", "overhead"], rows),
        "",
        plot_bars("train", "Ray Train vs a plain torch loop (CPU)", ratios, "throughput ratio (x)"),
    ]


def scaling(args, tmp: str, steps: int, window: int, rounds: int) -> list[str]:
    """Ray Train samples/s at 1, 2 and 4 workers, weak scaling: the batch per worker stays fixed."""
    cores = os.cpu_count() or 1
    # one epoch for the largest global batch: no run reaches the end of the data
    data = prepared(tmp, args.model, args.worker_batch * max(SCALING_WORKERS) * (steps + 4))
    # a worker gets at most one core's worth of torch threads, so 1 -> `cores` workers scale over cores; beyond
    # that workers share cores. The train stage's default keeps Ray Data a logical CPU (else the run waits forever).
    cpus = {n: min(1.0, cores / n, default_cpus_per_worker(n)) for n in SCALING_WORKERS}
    rates: dict[int, list[float]] = {n: [] for n in SCALING_WORKERS}
    waits: dict[int, list[float]] = {n: [] for n in SCALING_WORKERS}
    for round_ in range(rounds):  # interleaved, so drift hits every worker count alike
        for n in SCALING_WORKERS:
            metrics = ray_train(data, str(Path(tmp) / f"scaling-{n}-{round_}"), args.model, args.worker_batch * n,
                                steps, window, workers=n, cpus_per_worker=cpus[n])
            rates[n].append(metrics["samples_per_s"])
            waits[n].append(metrics["data_wait_fraction"])
            print(f"scaling, round {round_ + 1}: {n} worker(s) x {cpus[n]:g} CPU: {rates[n][-1]:.1f} samples/s, "
                  f"data wait {waits[n][-1]:.1%}", flush=True)
    rate = {n: statistics.median(values) for n, values in rates.items()}
    rows = []
    for n in SCALING_WORKERS:
        efficiency = rate[n] / (n * rate[1])
        print(f"scaling median: {n} worker(s) {rate[n]:.1f} samples/s, efficiency {efficiency:.0%}", flush=True)
        rows.append([n, f"{cpus[n]:g} ({max(1, int(cpus[n]))})", args.worker_batch * n,
                     f"{rate[n]:.1f} ({spread(rates[n])})", f"{rate[n] / n:.1f}", f"**{efficiency:.0%}**",
                     f"{statistics.median(waits[n]):.1%}"])
    oversubscribed = [n for n in SCALING_WORKERS if n > cores]
    return [
        "## Scaling with workers", "",
        f"Weak scaling: {args.worker_batch} samples per worker per step, so the global batch is "
        f"{args.worker_batch} x workers; {args.model}, fp32, one epoch of fresh data, samples/s over the last "
        f"{window} of {steps} steps, median of {rounds} round(s) (range in brackets), the worker counts "
        "interleaved in each round. Each worker gets at most one core's worth of torch threads (torch threads in "
        f"brackets); Ray Data decodes in separate tasks on the rest of the machine's {cores} cores.",
        f"1 -> {min(cores, max(SCALING_WORKERS))} workers is real scaling over this machine's {cores} "
        "cores" + (f"; {', '.join(map(str, oversubscribed))} workers are oversubscribed: more workers than cores, "
                   f"each still on 1 torch thread, all sharing {cores} cores with each other and with Ray Data's "
                   "decoding, so any gain there comes from overlapping one worker's waits with another's work, "
                   "not from more compute." if oversubscribed else "."),
        "Efficiency is rate(n) / (n x rate(1)) on the medians (100%: linear). Data wait is the fraction of the "
        "rank-0 worker's time spent waiting for its next batch.",
        "",
        markdown_table(["workers", "CPUs per worker (threads)", "global batch", "samples/s", "samples/s per worker",
                        "efficiency", "data wait"], rows),
        "",
        plot_lines("train_scaling", "Ray Train: scaling with workers (CPU, weak scaling)",
                   {"Ray Train (median)": {n: rate[n] for n in SCALING_WORKERS},
                    "linear from 1 worker": {n: n * rate[1] for n in SCALING_WORKERS}},
                   "workers", "samples/s", dashed=("linear from 1 worker",)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64, help="Ray Train vs plain: the batch")
    parser.add_argument("--worker-batch", type=int, default=32, help="scaling: the batch per worker")
    parser.add_argument("--rounds", type=int, help="rounds of each comparison, interleaved (default 7 for the "
                        "overhead, whose goal is within the noise of fewer, 3 for scaling; quick 1)")
    args = parser.parse_args()
    steps = 12 if args.quick else 40
    window = 4 if args.quick else 20  # Ray's figure: the last `window` steps, after start-up
    rounds = args.rounds or (1 if args.quick else 3)
    overhead_rounds = args.rounds or (1 if args.quick else 7)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(dashboard=True)  # as train() starts it: Ray Train's placement-group cleaner asks the state API
    with tempfile.TemporaryDirectory() as tmp:
        sections = overhead(args, tmp, steps, window, overhead_rounds)
        sections += ["", *scaling(args, tmp, steps, window, rounds)]
    path = write_report("train", "Train: Ray Train overhead and scaling with workers (CPU)", sections)
    print(path.read_text())


if __name__ == "__main__":
    main()
