"""GPU check: bf16 training throughput and MFU of a CLIP preset (default ViT-B/16 at batch 256).

Runs forward + backward + fused AdamW under bf16 autocast with attention restricted to fused
SDPA kernels (flash / memory-efficient / cuDNN: the run fails rather than fall back to the
unfused math path). FLOPs are counted by torch's FlopCounterMode on one real step, so MFU is
achieved FLOP/s over the accelerator's dense bf16 peak (H200: ~790 TFLOP/s, as the issue states;
pass --peak-tflops for another part).

    python bench/gpu_check.py                      # on the H200
    python bench/gpu_check.py --device cpu --dtype fp32 --model tiny --batch-size 4 --steps 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_core  # noqa: E402
from bench.common import markdown_table, write_report  # noqa: E402
from workflows import synthetic  # noqa: E402

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step, device: torch.device, steps: int = 2) -> str:
    """The ops that take the most time over `steps` steps, by their own device time on a GPU (CPU
    time on a CPU): what to fuse or replace first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        _synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense peak of the device at --dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also profile two steps: the ops that take the most device time, in the report")
    parser.add_argument("--report", default="gpu_check", help="name of the bench/results report ('' for none)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --device cpu for a smoke run")
    torch.manual_seed(0)
    model = clip_core.create_model(args.model, device=device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.train()
    runnable = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2,
                                  fused=device.type == "cuda")
    loss_fn = clip_core.ClipLoss()
    size = model.image_size
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    captions = [s.caption for s in synthetic.samples(args.batch_size, image_size=16)]
    tokens = clip_core.get_tokenizer()(captions).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step() -> torch.Tensor:
        with autocast, sdpa_kernel(FUSED):
            loss = loss_fn(*runnable(images, tokens)[:3])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale_()
        return loss.detach()

    step()
    with FlopCounterMode(display=False) as counter:  # counted on the eager model: its hooks are not compiled in
        step()
    flops_per_step = counter.get_total_flops()
    if args.compile:
        runnable = torch.compile(model)
    for _ in range(args.warmup):  # with --compile, the first compiles
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _synchronize(device)
    seconds = (time.perf_counter() - started) / args.steps

    achieved = flops_per_step / seconds
    profiled = profile_steps(step, device) if args.profile else None
    result = {
        "model": args.model, "batch_size": args.batch_size, "dtype": args.dtype, "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "samples_per_s": args.batch_size / seconds, "step_ms": seconds * 1e3,
        "tflops_per_step": flops_per_step / 1e12, "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (args.peak_tflops * 1e12), "peak_tflops": args.peak_tflops, "final_loss": float(loss),
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "sdpa": "fused only (flash / efficient / cuDNN)",
    }
    print(json.dumps(result, indent=2))
    if args.report:
        rows = [[key, f"{value:.4g}" if isinstance(value, float) else value] for key, value in result.items()]
        sections = [markdown_table(["", "value"], rows)]
        if profiled:
            sections += ["", "## Where a step's time goes (torch.profiler, two steps)", "", "```", profiled, "```"]
        write_report(args.report, f"GPU check: {args.model} {args.dtype} training", sections)
    return result


if __name__ == "__main__":
    main()
