"""Ray Train's DataConfig for the train stage: a resumed run's data stream starts in the pass over
the data (and so in the shard order) where its checkpoint stopped. Apart from train.py so that
importing the stage does not import Ray Train."""

from __future__ import annotations

import ray.train

from . import storage


class PassDataConfig(ray.train.DataConfig):
    """Ray Data reshuffles the rows or shard order on every run of a dataset, seeded by how many runs it has
    had (one per pass over the data). A worker group restarted after a failure, like a run resumed
    by hand, gets the dataset with that count at 0 again: it would read the first pass's order
    while skipping the batches it trained on in pass p's, seeing some rows twice and others never.
    The workers ask for their shards after loading the checkpoint, so here the count is set to the
    pass of the checkpoint they resume from (`resume_pass`)."""

    def __init__(self, run_path: str, resume_from: str | None, **kwargs):
        super().__init__(**kwargs)
        self._run_path, self._resume_from = run_path, resume_from

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        data_pass = resume_pass(self._run_path, self._resume_from)
        for dataset in datasets.values():
            dataset.context._execution_idx = data_pass  # no public setter for Ray Data's run count
        return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)


def resume_pass(run_path: str, resume_from: str | None) -> int:
    """The pass over the data the workers resume in: that of the run's latest checkpoint as Ray Train
    registered it (what `ray.train.get_checkpoint()` hands them), else that of the one resumed from
    by hand, else the first."""
    checkpoint = registered_checkpoint(run_path) or resume_from
    return checkpoint_pass(checkpoint) if checkpoint else 0


def registered_checkpoint(run_path: str) -> str | None:
    """A run's latest registered checkpoint, read from the snapshot Ray Train's checkpoint manager
    writes on each registration. Listing the run's directories instead could also find one whose
    upload finished but whose worker died before `report()` registered it."""
    fs, path = storage.filesystem(run_path)
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no run there yet, or none of its checkpoints registered
        return None
    return storage.to_uri(fs, result.checkpoint.path) if result.checkpoint is not None else None


def train_record(uri: str) -> dict:
    """A train checkpoint's own account of itself (config.json's `train`: step, data pass, MLflow run); a
    config.json over 1 MiB (a rayclip one is a few kB) is refused unread (storage.TooLarge)."""
    from .registry import checkpoint_description

    return checkpoint_description(uri).get("train") or {}


def checkpoint_pass(uri: str) -> int:
    """The pass over the data a train checkpoint stopped in: its config.json says so; checkpoints
    from before passes only have the epoch in train_state.pt, and each of their epochs was one run
    of the dataset (as the train loop reads them too)."""
    import io

    import torch

    from .train import TRAIN_STATE

    train = train_record(uri)
    if "data_pass" in train:
        return int(train["data_pass"])
    data = storage.read_bytes(storage.join(uri, TRAIN_STATE))
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return int(state.get("epoch", 0))
