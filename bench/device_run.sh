#!/usr/bin/env bash
# Every GPU check the open issues name, in one call on the GPU machine (its time is scarce: 15 minutes a
# session, start-up included). Most important first; each step gets at most its own limit and what is
# left of TOTAL seconds (default 560: the first run took 415 s of its 500 with one proxy measured, and
# the machine's start ~80 s of the session's 900; the ~230 s left after can still rerun a short step
# on the warm machine).
#
#   here:  python3 bench/device_wheels.py          # .whl/: Ray, pydantic, ftfy, FastAPI... for Python 3.12
#   there: device `run` with carry [".whl"], timeout_s 590:   bash bench/device_run.sh
#          one step again:   STEPS=gpu_train TOTAL=240 bash bench/device_run.sh
#          the train stage compiled (issue 4's MFU; not in the default plan, which has no room for its
#          compile warm-up): STEPS=gpu_train_compiled TOTAL=300 bash bench/device_run.sh
#   rehearsal on a CPU (tiny models, same steps), in a scratch clone (the reports land in its bench/results):
#          SMOKE=1 PYTHON=python-without-ray WHEELS=dir-of-wheels-for-it bash bench/device_run.sh
#
# What comes back ($OUT, at most 8 files): run.log (everything printed) and each step's report.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-bench/results/device}
TOTAL=${TOTAL:-560}
STEPS=${STEPS:-gpu_check gpu_check_compiled gpu_train serve_gpu}
SMOKE=${SMOKE:-}
DEADLINE=$((SECONDS + TOTAL))
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1

site=$(mktemp -d /tmp/site.XXXX)
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl || exit 1
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
"$PYTHON" -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv

step() {  # step NAME LIMIT_S COMMAND...: run it under the smaller of its limit and the time left
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS - 5))
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    if ((left < 30)); then echo "== $name: skipped, ${left} s left"; return; fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit} s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$PYTHON" "$@"
    echo "== $name: exit $? after $((SECONDS - started)) s"
    # a timed-out step's local Ray (not in a rehearsal: this machine's other Ray sessions stay)
    [[ -z $SMOKE ]] && pkill -9 -f "ray::|raylet|gcs_server|ray/dashboard" 2> /dev/null
    return 0
}

if [[ -n $SMOKE ]]; then
    step gpu_check 120 bench/gpu_check.py --device cpu --dtype fp32 --model tiny --batch-size 4 --steps 1 --warmup 1 \
        --profile
    step gpu_train 300 bench/gpu_train.py --device cpu --model tiny --batch-size 16 --samples 256 --steps 6
    step serve_gpu 300 bench/bench_serve.py --quick --model tiny
else
    step gpu_check 60 bench/gpu_check.py --profile                                      # issue 2: bf16 MFU
    step gpu_check_compiled 120 bench/gpu_check.py --compile --report gpu_check_compiled  # issue 2: --compile
    step gpu_train 240 bench/gpu_train.py                                               # issue 4: from shards
    step gpu_train_compiled 300 bench/gpu_train.py --compile --report gpu_train_compiled  # only when asked for
    # issue 6: batching; 4 ingress replicas (one bounded both modes at ~100 req/s), under Serve's proxy and
    # HAProxy with direct ingress (on 2 CPU cores: 1.7x the batched requests/s at c32, 8x without the model)
    # (HAProxy first: the report is written after each proxy, so a step cut short keeps it)
    step serve_gpu 200 bench/bench_serve.py --model ViT-B-16 --num-gpus 0.25 --ingress-replicas 4 \
        --proxy haproxy --proxy serve
fi
for file in bench/results/*.md bench/results/*.png; do  # the reports this run wrote
    [[ $file -nt "$site" ]] && cp "$file" "$OUT/"
done
ls -la "$OUT"
