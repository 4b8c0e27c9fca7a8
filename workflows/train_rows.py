"""The train stage's rows: the prepared datasets mixed and ordered afresh on every pass over them,
decoded by Ray Data tasks on the cluster's CPUs. Without torch: those tasks' workers import it."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from . import storage
from .preprocess import decode_batch, load_prepared, shard_uris

if TYPE_CHECKING:
    from .train import TrainConfig


def training_dataset(config: TrainConfig, manifests: list[dict], image_size: int):
    """The prepared rows to train on (`mixed_rows`), decoded by Ray Data tasks."""
    # a globally shuffled pass comes in blocks of GATHERED_BLOCK_ROWS: taking each whole lets one task
    # gather and decode it (with a batch size, Ray Data split them into two operators, and its tasks
    # each took 4,096 rows: a pass's first batch waited for all of them)
    batch_size = None if shuffles_globally(config, manifests) else config.decode_batch_size
    return mixed_rows(config, manifests).map_batches(decode_batch, batch_size=batch_size, batch_format="numpy",
                                                     fn_kwargs={"image_size": image_size})


# Rows a task of a globally shuffled pass gathers and decodes: enough to outweigh a task's own cost (16,384
# rows of 224 px on 2 cores: a pass took 8.2 s in blocks of 64 rows, 6.2 s of 128, 5.1 s of 256, 3.7 s
# of 512), few enough that a pass's first batch comes soon (0.35 s) and a pass has tasks for every core.
GATHERED_BLOCK_ROWS = 512

# Up to this much prepared data (stored bytes) is shuffled row by row on every pass by default: the
# encoded rows stay in the object store for the run (`permuted_rows`); larger sets get the streaming
# shuffle (shard order + buffer), as webdataset's loaders do.
GLOBAL_SHUFFLE_MAX_BYTES = 1 << 30


def shuffles_globally(config: TrainConfig, manifests: list[dict]) -> bool:
    """`global_shuffle` as set, or by default whether the prepared data (`config.data`'s manifests) is
    at most GLOBAL_SHUFFLE_MAX_BYTES."""
    if config.global_shuffle is not None:
        return config.global_shuffle
    return stored_bytes(manifests) <= GLOBAL_SHUFFLE_MAX_BYTES


def stored_bytes(manifests: list[dict]) -> int:
    return sum(shard["bytes"] for manifest in manifests for shard in manifest["shards"])


def mixed_rows(config: TrainConfig, manifests: list[dict]):
    """The prepared datasets' rows (`config.data`, as their `manifests` list them), mixed by weight (an
    epoch keeps the datasets' total size; each dataset's share follows `data_weights`, a part of a
    dataset sampled afresh each pass), in a new order on every pass over the data: all rows shuffled
    (`global_shuffle`: `permuted_rows`), else the shard order.
    Each pass's order depends only on the seed and the pass, so a resumed run reads its pass as it
    was (`PassDataConfig`)."""
    if shuffles_globally(config, manifests):
        return permuted_rows(config, manifests)
    from ray.data import RandomSeedConfig

    per_pass = RandomSeedConfig(seed=config.seed, reseed_after_execution=True)
    datasets = [load_prepared(uri, manifest=manifest, shuffle_files=True, seed=config.seed)
                for uri, manifest in zip(config.data, manifests, strict=True)]
    weights = _weights(config)
    if weights:
        sizes, mixed = _sizes(manifests), []
        for dataset, size, (repeats, remainder) in zip(datasets, sizes, shares(sizes, weights)):
            mixed += [dataset] * repeats
            if remainder:
                mixed.append(dataset.random_sample(remainder / size, seed=per_pass))
        datasets = mixed
    dataset = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    if len(config.data) > 1:
        dataset = dataset.randomize_block_order(seed=per_pass)
    return dataset


def _sizes(manifests: list[dict]) -> tuple[int, ...]:
    return tuple(manifest["counts"]["kept"] for manifest in manifests)


def _weights(config: TrainConfig) -> tuple[float, ...] | None:
    return tuple(config.data_weights) if config.data_weights and len(config.data) > 1 else None


def shares(sizes: tuple[int, ...], weights: tuple[float, ...]) -> list[tuple[int, int]]:
    """Each dataset's part of a pass as (whole repeats, rows sampled besides): the pass keeps the
    datasets' total size, shared by weight."""
    total, weight_sum = sum(sizes), sum(weights)
    return [divmod(round(total * weight / weight_sum), size) for size, weight in zip(sizes, weights)]


def permuted_rows(config: TrainConfig, manifests: list[dict]):
    """Every pass's rows (`pass_order`) gathered block by block, so a pass streams from its first block.
    The encoded rows are read once into the object store (by one task, checked against the manifests)
    and stay there for the run: `global_shuffle` is for data that fits in it. Ray Data's
    `random_shuffle` instead exchanges every row between tasks on every pass, and the pass's first
    batch waits for the whole exchange: at 16,384 rows of 224 px on 2 cores, 2.2 s into a 6.1 s pass,
    against 0.35 s into a 3.6 s pass here (0.9 s into 5.2 s streamed in shard order)."""
    import ray

    from .runtime import init_ray

    init_ray()
    needed = stored_bytes(manifests)
    capacity = max(node["Resources"].get("object_store_memory", 0) for node in ray.nodes() if node["Alive"])
    if needed > capacity / 2:
        raise ValueError(f"global_shuffle keeps the prepared rows ({needed / 2**30:.1f} GiB) in one node's "
                         f"object store for the run: more than half of the largest one ({capacity / 2**30:.1f} "
                         f"GiB); set global_shuffle: false (shard order and a shuffle buffer) or give the "
                         f"nodes more object store memory")
    uris = [shard_uris(uri, manifest) for uri, manifest in zip(config.data, manifests, strict=True)]
    sizes, weights = _sizes(manifests), _weights(config)
    table, counts = ray.remote(_read_rows).options(num_returns=2).remote(uris)
    counts = ray.get(counts)  # a read error surfaces here, before any worker starts
    for uri, size, count in zip(config.data, sizes, counts):
        if count != size:
            raise ValueError(f"the prepared dataset at {uri} holds {count} rows where its manifest lists "
                             f"{size}: its shards changed after preprocessing; prepare it again")
    rows, block = len(pass_order(config.seed, 0, sizes, weights)), GATHERED_BLOCK_ROWS
    blocks = -(-rows // block)
    return ray.data.range(blocks, override_num_blocks=blocks).map_batches(
        _gather, batch_size=None, batch_format="numpy",
        fn_kwargs={"table": table, "seed": config.seed, "sizes": sizes, "weights": weights, "block": block})


def _read_rows(uris: list[list[str]]):
    """The prepared datasets' rows, one after another (each its shards in manifest order), and how many
    each has."""
    import pyarrow as pa

    tables = [storage.read_parquet(shards) for shards in uris]
    table = pa.concat_tables(tables, promote_options="default")
    # one chunk per column, as taking rows from a column of many chunks first joins them (16,384 rows
    # in 17 shards: 20 ms a block against 0.2 ms), with 64-bit offsets to join more than 2 GiB
    large = {pa.binary(): pa.large_binary(), pa.string(): pa.large_string()}
    table = table.cast(pa.schema([field.with_type(large.get(field.type, field.type)) for field in table.schema]))
    return table.combine_chunks(), [len(table) for table in tables]


def _gather(batch: dict, table, seed: int, sizes: tuple[int, ...], weights: tuple[float, ...] | None,
            block: int):
    """Ray Data UDF: the rows of blocks `batch["id"]` of this run's pass."""
    import ray
    from ray.data import DataContext

    # the dataset's run count, as Ray Data's own per-run seeds read it in a task (PassDataConfig sets
    # it for a resumed run)
    order = pass_order(seed, DataContext.get_current()._execution_idx, sizes, weights)
    rows = np.concatenate([order[int(i) * block:][:block] for i in batch["id"]])
    return ray.get(table).take(rows)


@functools.lru_cache(maxsize=2)  # a task worker process serves many blocks of a pass
def pass_order(seed: int, data_pass: int, sizes: tuple[int, ...], weights: tuple[float, ...] | None) -> np.ndarray:
    """The rows of one pass (indices into the datasets' rows one after another) in its order: every
    row once, or with `weights` each dataset's `shares` (the rows sampled besides drawn afresh each
    pass)."""
    rng = np.random.default_rng([seed, data_pass])
    if not weights:
        return rng.permutation(sum(sizes))
    parts, offset = [], 0
    for size, (repeats, remainder) in zip(sizes, shares(sizes, weights)):
        parts += [offset + np.tile(np.arange(size), repeats), offset + rng.choice(size, remainder, replace=False)]
        offset += size
    return rng.permutation(np.concatenate(parts))
