"""Starting or joining Ray the same way from every stage."""

from __future__ import annotations

import os


def init_ray(*, dashboard: bool = False, **overrides) -> str | None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit` and on cluster nodes), else start a local one.

    A local Ray gets at least 4 logical CPUs: on 2 cores, pools of 1-CPU actors next to tasks
    (Ray Data's actor pools, Ray Train's workers) otherwise wait forever for resources. Its dashboard
    (≈1 GiB) starts only with `dashboard=True` (the pipeline and train: Ray Train's cleanup watcher and the
    state API need it). Returns the dashboard's address when this call started one.
    """
    import ray

    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **overrides)
        return None
    options = {"num_cpus": max(4, os.cpu_count() or 1), "include_dashboard": dashboard,
               "configure_logging": True, "logging_level": "WARNING"}
    options.update(overrides)
    return ray.init(**options).dashboard_url or None
