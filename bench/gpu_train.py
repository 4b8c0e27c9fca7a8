"""GPU check of the train stage: bf16 samples/s, data-wait fraction and MFU with real decoding.

The whole stage as users run it, on one machine: the preprocess stage writes synthetic image-text
pairs at the model's resolution as JPEG shards (Ray Data), then the train stage trains on them (Ray
Train, one GPU worker, bf16 autocast, SDPA) while Ray Data tasks on the machine's other cores decode
and crop every batch. samples/s and the fraction of time the worker waited for data come from the
stage's own metrics over the second half of the steps (the first half holds start-up and warm-up);
FLOPs per sample are counted by torch's FlopCounterMode on a forward+backward of the same model, so
MFU = samples/s x FLOPs per sample / the device's dense bf16 peak (H200: ~790 TFLOP/s).

    python bench/gpu_train.py                   # on the H200
    python bench/gpu_train.py --device cpu --model tiny --batch-size 16 --samples 256 --steps 6   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_core  # noqa: E402
from bench.bench_train import prepared  # noqa: E402
from bench.common import markdown_table, write_report  # noqa: E402
from workflows import synthetic  # noqa: E402
from workflows.preprocess import read_manifest  # noqa: E402
from workflows.runtime import init_ray  # noqa: E402
from workflows.train import TrainConfig, train  # noqa: E402
from workflows.train_rows import training_dataset  # noqa: E402

DECODE_PER_CORE = 2833  # photo-like 224 px JPEGs decoded + cropped per second per core (docs/scaling.md)


def flops_per_sample(model_name: str, batch_size: int = 256, samples: int = 2) -> float:
    """Forward + backward FLOPs of one training sample (contrastive loss included), counted on the CPU
    for `samples` rows: attention on the math path (FlopCounterMode has no formula for the CPU's fused
    kernel, whose FLOPs it left out), and captions as long as the longest of a `batch_size` batch (the
    text tower runs to the batch's last [EOT], so two short captions undercounted it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = clip_core.create_model(model_name)
    tokenize = clip_core.get_tokenizer()
    captions = [p.caption for p in synthetic.samples(batch_size, image_size=16)]
    longest = max(captions, key=lambda caption: int(tokenize([caption]).argmax(dim=-1)))
    images = torch.randn(samples, 3, model.image_size, model.image_size)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        clip_core.ClipLoss()(*model(images, tokenize([longest] * samples))[:3]).backward()
    return counter.get_total_flops() / samples


def data_only(config: TrainConfig, image_size: int, device: str) -> dict:
    """The train stage's data path without the model: the same dataset (read, shuffle, decode on Ray
    Data's tasks) taken in batches onto the device as the worker takes them, for a second pass (the
    first starts Ray Data's workers): rows/s, and the wait for the pass's first batch; with every row
    shuffled each pass (what the training used: the set is under 1 GiB) and streamed in shard order.
    Data keeps up when its rows/s is well above the training's samples/s."""
    manifests = [read_manifest(uri) for uri in config.data]
    return {f"data_only_{name}_{key}": value
            for name, shuffle in (("shuffled", True), ("streamed", False))
            for key, value in _pass_rate(config.model_copy(update={"global_shuffle": shuffle}), manifests,
                                         image_size, device).items()}


def _pass_rate(config: TrainConfig, manifests: list[dict], image_size: int, device: str) -> dict:
    dataset = training_dataset(config, manifests, image_size)
    for _ in range(2):
        started, first, rows = time.perf_counter(), None, 0
        for batch in dataset.iter_torch_batches(batch_size=config.batch_size, drop_last=True, device=device,
                                                pin_memory=device == "cuda"):
            first = first if first is not None else time.perf_counter() - started
            rows += len(batch["tokens"])
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return {"rows_per_s": rows / seconds, "first_batch_s": first}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16384, help="prepared pairs (passes repeat over them)")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak of the device")
    parser.add_argument("--compile", action="store_true", help="the train stage's `compile: true` (torch.compile)")
    parser.add_argument("--report", default="gpu_train", help="name of the bench/results report ('' for none)")
    args = parser.parse_args(argv)
    use_gpu = args.device == "cuda"
    if use_gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --device cpu for a smoke run")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    init_ray(dashboard=True)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        data = prepared(scratch, args.model, args.samples)
        prepare_s = time.perf_counter() - started
        rows = read_manifest(data)["counts"]["kept"]
        config = TrainConfig(data=[data], model=args.model, steps=args.steps, compile=args.compile,
                             batch_size=args.batch_size, workers=1, use_gpu=use_gpu, log_every=args.steps // 2,
                             checkpoint_every=args.steps, storage=f"{scratch}/runs", output=f"{scratch}/final")
        started = time.perf_counter()
        result = train(config, echo=print)
        train_s = time.perf_counter() - started
        data_path = data_only(config, clip_core.get_config(args.model).vision.image_size, args.device)

    per_sample = flops_per_sample(args.model)
    samples_per_s = result.metrics["samples_per_s"]
    achieved = samples_per_s * per_sample
    report = {
        "model": args.model, "batch_size": args.batch_size, "steps": args.steps, "compile": args.compile, "device":
        torch.cuda.get_device_name() if use_gpu else "cpu", "cpus": os.cpu_count(),
        "prepared_rows": rows, "prepare_s": prepare_s, "train_s": train_s,
        "samples_per_s": samples_per_s, "data_wait_fraction": result.metrics["data_wait_fraction"],
        "gflops_per_sample": per_sample / 1e9, "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (args.peak_tflops * 1e12), "peak_tflops": args.peak_tflops,
        "cores_to_decode_photos": samples_per_s / DECODE_PER_CORE, "final_loss": result.metrics["loss"],
        **data_path,
    }
    print(json.dumps(report, indent=2))
    if args.report:
        rows = [[key, f"{value:.4g}" if isinstance(value, float) else value] for key, value in report.items()]
        run = "bf16 on a GPU" if use_gpu else "fp32 on the CPU (smoke run)"
        write_report(args.report, f"Train stage from prepared shards: {args.model}, {run}", [
            "The train stage (Ray Train, 1 worker) on JPEG shards the preprocess stage wrote, decoded and "
            "cropped by Ray Data tasks on the other cores; samples/s and data wait over the second half of the "
            f"steps. The synthetic shapes decode faster than photos: `cores_to_decode_photos` is samples/s over "
            f"{DECODE_PER_CORE} photo-like images/s per core. `data_only_*`: the same data path without the model "
            "(one pass onto the device after a first), with every row shuffled each pass as trained and streamed in "
            "shard order: rows/s it can feed, and its wait for a pass's first batch.",
            "", markdown_table(["", "value"], rows)])
    return report


if __name__ == "__main__":
    main()
