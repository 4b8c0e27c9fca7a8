"""Run every benchmark in turn; each writes its own report under bench/results/.

    python bench/run_all.py [--quick]
"""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = ["bench_clip_core.py", "bench_preprocess.py", "bench_train.py", "bench_serve.py"]

if __name__ == "__main__":
    here = Path(__file__).parent
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(here / name), *sys.argv[1:]], check=True)
