"""Run every benchmark in turn (each writes its report under bench/results/), then gather the
reports into one, bench/RESULTS.md.

    python bench/run_all.py [--quick]     # run them all, then write RESULTS.md
    python bench/run_all.py --report-only # only gather the latest reports
"""

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = ["bench_clip_core.py", "bench_preprocess.py", "bench_train.py", "bench_serve.py"]
# gathered when present, not run here: real data (bench_openclipart.py needs Debian's openclipart packages and
# trains for about 50 minutes) and the GPU checks (written on a GPU machine by bench/device_run.sh)
OTHER_REPORTS = ["openclipart", "gpu_check", "gpu_check_compiled", "gpu_train", "gpu_train_compiled", "serve_gpu"]
HERE = Path(__file__).parent


def gather(results: Path = HERE / "results") -> str:
    """One markdown report from the per-benchmark ones: headings one level down, links into results/."""
    parts = ["# rayclip benchmarks", "",
             "Each section is one benchmark's latest report (`bench/results/`), every candidate measured side by "
             "side with its peer in one run; the line under each title says when and on which machine. "
             "`make bench` reruns the four CPU benchmarks and rewrites this file; the real-data report "
             "(`bench/bench_openclipart.py`) and the GPU ones (`bench/device_run.sh`) are rerun by hand.", ""]
    names = [name.removeprefix("bench_").removesuffix(".py") for name in BENCHMARKS]
    for name in names + [name for name in OTHER_REPORTS if (results / f"{name}.md").exists()]:
        report = results / f"{name}.md"
        if not report.exists():
            parts += [f"## bench_{name}.py: no report yet (run `python bench/bench_{name}.py`)", ""]
            continue
        text = report.read_text(encoding="utf-8")
        text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE)
        text = re.sub(r"\]\((?!https?:|/)([^)]+)\)", rf"]({results.name}/\1)", text)
        parts += [text.rstrip(), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if "--report-only" not in arguments:
        for name in BENCHMARKS:
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, str(HERE / name), *arguments], check=True)
    (HERE / "RESULTS.md").write_text(gather(), encoding="utf-8")
    print(f"wrote {HERE / 'RESULTS.md'}")
