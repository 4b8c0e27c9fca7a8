"""Starting or joining Ray the same way from every stage."""

from __future__ import annotations

import os
import signal
import threading

IDLE_WORKERS_KEPT = 16  # worker processes a local Ray keeps before it stops idle ones (see init_ray)
_joined = False  # whether init_ray joined a running cluster (see joined_cluster)


def init_ray(*, dashboard: bool = False, **overrides) -> str | None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit` and on KubeRay's nodes), else the one `ray
    start` made on this machine (a cluster launcher's node, after `ray attach`), as plain `ray.init()` joins
    it, else start a local one.

    A local Ray gets at least 4 logical CPUs: on 2 cores, pools of 1-CPU actors next to tasks
    (Ray Data's actor pools, Ray Train's workers) otherwise wait forever for resources. It keeps up to
    16 worker processes (Ray's default: one per logical CPU) before it stops idle ones: a training run
    alone holds 8 actors (Ray Train's controller, workers and watchers, Ray Data's coordinator), and
    beyond the limit each read and decode task of its data stream waited for a fresh process (on 2
    cores: 0.9 s per task to schedule in a second fit of a session, 0.05 s with the higher limit; three
    fits started 43 worker processes, 25-34 with it). Its dashboard (≈1 GiB) starts only
    with `dashboard=True` (the pipeline and train: Ray Train's cleanup watcher and the state API need
    it). Returns the dashboard's address when this call started one.
    """
    import ray

    if ray.is_initialized():
        return None
    from ray._private.utils import read_ray_address  # Ray's record of the cluster `ray start` made here

    global _joined
    address = os.environ.get("RAY_ADDRESS") or read_ray_address()
    if address:  # a running cluster's resources and settings are its own: the local ones below are not asked
        ray.init(address=address, **overrides)
        _joined = True
        return None
    options = {"num_cpus": max(4, os.cpu_count() or 1), "include_dashboard": dashboard,
               "configure_logging": True, "logging_level": "WARNING"}
    options.update(overrides)
    options["_system_config"] = {"num_workers_soft_limit": max(IDLE_WORKERS_KEPT, options["num_cpus"]),
                                 **options.get("_system_config", {})}
    return ray.init(**options).dashboard_url or None


def joined_cluster() -> bool:
    """Whether this process runs on a cluster it did not start (RAY_ADDRESS, or the one `ray start` made
    here): then what it leaves behind is only its own, the cluster and its other apps stay up."""
    return _joined or bool(os.environ.get("RAY_ADDRESS"))


def stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set, for a foreground command to wait on (call it after Ray's init,
    which installs its own handlers)."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    return stopping
