"""Shared by the benchmarks: timing side by side, and writing a markdown table and a PNG plot."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def time_side_by_side(candidates: dict[str, Callable[[], object]], repeats: int = 5,
                      warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, interleaved round by round so drift hits all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {device}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(name: str, title: str, sections: list[str], bars: dict[str, dict[str, float]] | None = None,
                 bar_label: str = "speed-up vs peer (x)") -> Path:
    """bench/results/<name>.md, and <name>.png with one bar group per entry of `bars`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"# {title}", "", f"Measured {stamp} on {machine()}.", "", *sections]
    if bars:
        body += ["", plot_bars(name, title, bars, bar_label)]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(body) + "\n")
    return path


def plot_cdf(name: str, title: str, samples: dict[str, list[float]], unit: str = "ms") -> str:
    """bench/results/<name>.png: one empirical CDF per entry of `samples`; returns the markdown image line."""
    figure, axis = _figure()
    for label, values in samples.items():
        ordered = sorted(values)
        axis.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label)
    axis.set_xscale("log")
    axis.set_xlabel(f"latency ({unit}, log scale)")
    axis.set_ylabel("fraction of requests")
    axis.grid(True, which="both", alpha=0.3)
    return _save(figure, axis, name, title)


def plot_lines(name: str, title: str, lines: dict[str, dict[float, float]], xlabel: str, ylabel: str,
               dashed: tuple[str, ...] = ()) -> str:
    """bench/results/<name>.png: one line (x -> y) per entry of `lines`, those named in `dashed` dashed;
    returns the markdown image line."""
    figure, axis = _figure()
    xs_all = sorted({x for points in lines.values() for x in points})
    few = len(xs_all) <= 12  # a few measured points are marked and ticked; a long curve is just drawn
    for label, points in lines.items():
        xs = sorted(points)
        axis.plot(xs, [points[x] for x in xs], linestyle="--" if label in dashed else "-",
                  marker="o" if few and label not in dashed else None, label=label)
    if few:
        axis.set_xticks(xs_all)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)
    return _save(figure, axis, name, title)


def plot_bars(name: str, title: str, bars: dict[str, dict[str, float]], label: str) -> str:
    """bench/results/<name>.png: one bar group per entry of `bars`, a dashed line at 1; returns the markdown
    image line."""
    names = list(bars)
    series = sorted({peer for values in bars.values() for peer in values})
    figure, axis = _figure(width=max(6, 1.6 * len(names)))
    width = 0.8 / max(1, len(series))
    for i, peer in enumerate(series):
        xs = [n + i * width for n in range(len(names))]
        axis.bar(xs, [bars[name].get(peer, 0.0) for name in names], width, label=peer)
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axis.set_xticks([n + width * (len(series) - 1) / 2 for n in range(len(names))], names, rotation=15)
    axis.set_ylabel(label)
    return _save(figure, axis, name, title)


def _figure(width: float = 7, height: float = 4):
    """A figure and its one axis, drawn off-screen (the bench machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _save(figure, axis, name: str, title: str) -> str:
    import matplotlib.pyplot as plt

    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(figure)
    return f"![{title}]({name}.png)"
