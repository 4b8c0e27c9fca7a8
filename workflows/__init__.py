"""rayclip's stages on Ray and MLflow: preprocess, train, evaluate, register/promote, the pipeline.

Nothing leaves the machines you configure: Ray's usage stats and MLflow's telemetry are off unless
the environment turns them on (set before Ray starts, so its workers inherit it).
"""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
