"""Ray Train overhead: samples/s of the train stage (Ray Data decoding, Ray Train worker, DDP
wrapper, checkpoint reporting) vs a plain single-process torch loop over the same model, data,
batch and augmentation on this machine. Writes bench/results/train.md and train.png.

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
from bench.common import markdown_table, write_report  # noqa: E402
from workflows.preprocess import PreprocessOptions, preprocess, read_prepared_table  # noqa: E402
from workflows.preprocess import decode_batch  # noqa: E402
from workflows.train import Augment, TrainConfig, contrastive_step, train  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, help="plain/Ray pairs, interleaved (default 3, quick 1)")
    args = parser.parse_args()
    steps = 12 if args.quick else 40
    window = 4 if args.quick else 20  # Ray's figure: the last `window` steps, after start-up
    rounds = args.rounds or (1 if args.quick else 3)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # one epoch of fresh data, and the same steps over a 5-batch dataset, where the measured steps
    # cross epoch boundaries (Ray Data runs the dataset again at each)
    boundaries = sum(1 for step in range(steps - window + 1, steps + 1) if step > 1 and (step - 1) % 5 == 0)
    layouts = {"one epoch": args.batch_size * (steps + 4), "5-batch epochs": args.batch_size * 5}
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout, count in layouts.items():
            data = str(Path(tmp) / f"data-{count}")
            image_size = clip_core.get_config(args.model).vision.image_size
            preprocess(f"synthetic://train?count={count}&image_size={image_size}", data,
                       PreprocessOptions(image_size=image_size), echo=lambda *_: None)
            plain, ray_rates, data_waits = [], [], []
            # one pair swings by a third on a shared 2-core machine: interleave pairs, compare medians
            for round_ in range(rounds):
                plain.append(plain_loop(data, args.model, args.batch_size, steps, warmup=steps - window))
                result = train(TrainConfig(data=[data], model=args.model, batch_size=args.batch_size, steps=steps,
                                           warmup_steps=1, log_every=window, checkpoint_every=steps,
                                           storage=str(Path(tmp) / f"runs-{count}-{round_}")), echo=lambda *_: None)
                ray_rates.append(result.metrics["samples_per_s"])
                data_waits.append(result.metrics["data_wait_fraction"])
                print(f"{layout}, round {round_ + 1}: plain {plain[-1]:.1f}, Ray Train {ray_rates[-1]:.1f} "
                      f"samples/s, data wait {data_waits[-1]:.1%}", flush=True)
            plain_rate, ray_rate = statistics.median(plain), statistics.median(ray_rates)
            overhead = 1 - ray_rate / plain_rate
            print(f"{layout} median: plain {plain_rate:.1f}, Ray Train {ray_rate:.1f} samples/s, "
                  f"overhead {overhead:.1%}", flush=True)
            spread = lambda values: f"{min(values):.1f}-{max(values):.1f}"  # noqa: E731
            rows.append([f"{args.model}, batch {args.batch_size}, {layout}", f"{plain_rate:.1f} ({spread(plain)})",
                         f"{ray_rate:.1f} ({spread(ray_rates)})", f"{statistics.median(data_waits):.1%}",
                         f"**{overhead:+.1%}**"])
            ratios[f"{args.model} batch {args.batch_size}, {layout}"] = {"Ray Train / plain": ray_rate / plain_rate}
    notes = [
        f"Samples/s over the last {window} of {steps} steps (start-up excluded), fp32, {os.cpu_count()} cores; "
        f"median of {rounds} interleaved plain/Ray rounds (range in brackets). "
        "Plain: one process decodes, augments and steps. Ray Train: one worker with all cores; Ray Data decodes "
        "in separate tasks; the worker augments and steps, and reports a checkpoint at the end.",
        "One epoch: the steps never reach the end of the data. 5-batch epochs: the data is "
        f"{layouts['5-batch epochs']} rows, so the measured steps cross {boundaries} epoch boundaries, where Ray "
        "Data runs the dataset again (the plain loop wraps around its in-memory table).",
        "Overhead is 1 - Ray/plain on the medians (negative: Ray is faster, its decoding overlapping the step). "
        "Data wait is the fraction of the Ray worker's time spent waiting for the next batch.",
        "",
        markdown_table(["run", "plain loop samples/s", "Ray Train samples/s", "data wait", "overhead"], rows),
    ]
    path = write_report("train", "Train: Ray Train vs a plain torch loop (CPU)", notes, ratios,
                        bar_label="throughput ratio (x)")
    print(path.read_text())


if __name__ == "__main__":
    main()
