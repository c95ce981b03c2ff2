"""The batch on a Ray cluster, with Ray Data: the same rows as the local batch, computed by a pool of model replicas.

The driver lists the images (`discover`, as the local batch does) and reads OUT_DIR for the keys already done. Ray
tasks hash the images and drop the done ones (keys from a copy of the driver's `Runner`); a pool of Ray actors,
each a `Runner` that loads the model once (from a path every node can read), captions the rest into rows made by the
local batch's own `image_row`; the driver appends the rows to OUT_DIR as they arrive. A killed actor is restarted
by Ray and the images it held are captioned again; a killed driver loses only the rows in flight, and a rerun skips
every image whose row it wrote. The result cache is each node's own ($MOLMOCAP_CACHE_DIR there), not shared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray's usage statistics go to the internet: off unless asked

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402

from molmocap.cluster.parts import ResultsDir  # noqa: E402
from molmocap.runtime.batch import Runner, Summary, file_sha256, image_row  # noqa: E402
from molmocap.runtime.cache import ResultCache  # noqa: E402
from molmocap.runtime.errors import InputError, ModelError, MolmocapError  # noqa: E402
from molmocap.runtime.request import Request  # noqa: E402

PENDING_SCHEMA = pa.schema([("image", pa.string()), ("sha256", pa.string())])
BATCH = 4  # images per Ray task, at most: few enough that a killed worker costs little, and no worker waits idle
WORKERS_PER_HASHER = 8  # hashing tasks run beside the workers (no CPU reserved), one per this many workers


def sorted_keys(keys: set[str]) -> np.ndarray:
    """Result keys as one sorted array: every task reads it in place from Ray's object store, however many."""
    return np.array(sorted(keys), dtype="S64")


def pending(batch: pa.Table, runner: Runner, request: Request, done: np.ndarray, cwd: str) -> pa.Table:
    """The images of `batch` whose keys are not in `done` (`sorted_keys`), with their sha256 (null when the file
    cannot be read: the worker then writes its error row, as the local batch does). Relative paths are the
    driver's, from `cwd`."""
    images, digests = [], []
    for path in batch.column("image").to_pylist():
        try:
            digest = file_sha256(os.path.join(cwd, path))
        except InputError:
            digest = None
        if digest is not None:
            key = runner.key(digest, request).encode()
            at = np.searchsorted(done, key)
            if at < len(done) and done[at] == key:
                continue
        images.append(path)
        digests.append(digest)
    return pa.table({"image": images, "sha256": digests}, schema=PENDING_SCHEMA)


class CaptionWorker:
    """A Ray actor: one replica of the model, opened on its first cache miss, that turns batches of images into
    results rows (as JSON text, so that rows of any style travel as one column)."""

    def __init__(self, runner_args: dict, model_id: str, request: Request, use_cache: bool, cwd: str) -> None:
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative image paths are the driver's, and rows name them as given
        self.runner = Runner(**runner_args, cache=ResultCache() if use_cache else None)
        if self.runner.model_id != model_id:
            raise ModelError(f"the model at {runner_args['model_dir']} on this node is not the driver's "
                             f"(manifest {self.runner.model_id[:12]}, driver {model_id[:12]})")
        self.request = request

    def __call__(self, batch: pa.Table) -> dict[str, list[str]]:
        rows = [image_row(self.runner, path, self.request, digest)
                for path, digest in zip(batch.column("image").to_pylist(), batch.column("sha256").to_pylist())]
        return {"row": [json.dumps(row, ensure_ascii=False) for row in rows]}


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (else $RAY_ADDRESS), or start Ray on this machine without its dashboard;
    returns False when Ray was already initialized in this process (the caller then leaves it running)."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level="warning")
    else:
        ray.init(include_dashboard=False, logging_level="warning")
    return True


def run_on_ray(paths: Sequence[str], out_dir: str | os.PathLike, runner: Runner, runner_args: dict,
               request: Request, use_cache: bool = True, address: str | None = None, workers: int | None = None,
               threads: int = 1, on_error: Callable[[str], None] | None = None) -> Summary:
    """Answer `request` about `paths` (images) into part files in `out_dir`, skipping the images it holds rows for
    and retrying those it holds error rows for.

    `runner` is the driver's (its keys decide what is done); every worker builds its own from `runner_args` (the
    `Runner` arguments but the cache, with an absolute model directory) and must find the same model. `workers`
    actors (default: the cluster's CPUs divided by `threads`) each reserve `threads` CPUs (and a GPU with device
    cuda) and run ONNX Runtime on that many threads; each Ray task captions up to `BATCH` images, fewer when that
    spreads a small job over all the workers (a killed worker costs the batches it held, captioned again
    elsewhere). An image that fails is an error row and a call of `on_error(message)`; a failure of the job itself
    (a worker that cannot start) is a `MolmocapError`.
    """
    summary = Summary(total=len(paths))
    with ResultsDir(out_dir) as results:
        done = sorted_keys(results.open(retry=paths))
        started = connect(address)
        try:
            if workers is None:
                workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
            batch_size = max(1, min(BATCH, len(paths) // workers))
            cwd = os.getcwd()
            dataset = (
                ray.data.from_items([{"image": path} for path in paths],  # a block per batch: a task per batch
                                    override_num_blocks=-(-len(paths) // batch_size))
                .map_batches(pending, batch_format="pyarrow", num_cpus=0,  # I/O only; the workers hold the CPUs
                             concurrency=max(1, workers // WORKERS_PER_HASHER),
                             fn_kwargs={"runner": runner, "request": request, "done": done, "cwd": cwd})
                .map_batches(CaptionWorker, batch_format="pyarrow", batch_size=batch_size, concurrency=workers,
                             num_cpus=threads, num_gpus=1 if runner_args.get("device") == "cuda" else 0,
                             fn_constructor_kwargs={"runner_args": runner_args, "model_id": runner.model_id,
                                                    "request": request, "use_cache": use_cache, "cwd": cwd}))
            for item in dataset.iter_rows():
                row = json.loads(item["row"])
                results.append(row)
                if row["error"]:
                    summary.failed += 1
                    if on_error is not None:
                        on_error(row["error"])
                elif row["timings"].get("cached"):
                    summary.cached += 1
                else:
                    summary.computed += 1
        except ray.exceptions.RayError as exc:
            raise MolmocapError(f"the Ray job failed: {_last_line(exc)}") from None
        finally:
            if started:
                ray.shutdown()
    summary.skipped = summary.total - summary.computed - summary.cached - summary.failed
    return summary


def _last_line(exc: BaseException) -> str:
    """The line of a Ray error that names the cause (Ray's own message carries the remote traceback), without the
    module path of a molmocap error's class."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1].removeprefix("molmocap.runtime.errors.") if lines else type(exc).__name__
