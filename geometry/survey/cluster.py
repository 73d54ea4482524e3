"""The survey's module tasks on a Dask cluster (:mod:`dask.distributed`; no scheduler of our own).

``run_survey(..., runner=dask_runner(client))`` submits one :class:`geometry.survey.ModuleTask` per
module to the cluster; each worker reads the safetensors files itself (the task carries paths or
URLs, a few hundred bytes per adapter, never arrays), computes the module with
:func:`geometry.survey.compute_module` and sends back the condensed distances
(``N (N - 1) / 2 x 9`` float64); the client writes each module's Parquet file as it arrives, so
resuming and the output are the same as in one process.

* **Local**: :func:`start_client` with no address starts a ``LocalCluster`` (worker processes,
  one task at a time each, torch threads = cores / workers); with ``dask_cuda`` installed and
  GPUs visible, a ``LocalCUDACluster`` (one worker per GPU) instead.
* **A cluster**: ``start_client("tcp://scheduler:8786")`` connects to a running scheduler
  (``dask scheduler`` on one machine, ``dask worker tcp://scheduler:8786 --nthreads 1
  --memory-limit 8GB`` on each node, the repository installed there). The adapter files must be
  readable by every worker under the same path (a shared filesystem: NFS, Lustre) or by URL
  (``s3://bucket/adapters/...`` through ``fsspec``, with ``s3fs`` installed on the workers).
  Workers with a GPU use it (``geometry.device.default_device`` on the worker).
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable, Sequence

from geometry.survey import ModuleTask, compute_module


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def start_client(scheduler: str | None = None, workers: int | None = None, *, memory_gb: float | None = None,
                 processes: bool = True, threads_per_worker: int = 1):
    """A ``dask.distributed.Client``: connected to ``scheduler``, or to a new local cluster of ``workers``.

    Local: ``workers`` defaults to the number of GPUs (``LocalCUDACluster`` when ``dask_cuda`` is
    installed) or to 1; ``memory_gb`` is each worker's limit (Dask pauses a worker at 80 % of it).
    ``processes=False`` runs the workers as threads of this process (tests). Close it with
    ``client.close()`` and ``client.cluster.close()`` (or use it as a context manager).
    """
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    memory = f"{memory_gb * 1.25:.2f}GiB" if memory_gb else "auto"
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # pragma: no cover
        gpus = 0
    if gpus and processes:
        try:
            from dask_cuda import LocalCUDACluster

            return Client(LocalCUDACluster(n_workers=workers or gpus, threads_per_worker=1, memory_limit=memory))
        except ImportError:
            pass
    cluster = LocalCluster(n_workers=workers or 1, threads_per_worker=threads_per_worker, processes=processes,
                           memory_limit=memory, dashboard_address=None, silence_logs=logging.ERROR)
    return Client(cluster)


def _run(task: ModuleTask, threads: int | None) -> dict:
    """One task on a worker, with ``threads`` torch CPU threads (module-level: picklable by reference)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return compute_module(task)


def _warm() -> bool:
    import geometry.survey  # noqa: F401  (torch, safetensors, the engine)

    return True


def warm(client) -> None:
    """Import the engine on every worker (the first task would otherwise pay for it)."""
    client.run(_warm)


def worker_count(client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def dask_runner(client, threads: int | None = None) -> Callable[[Sequence[ModuleTask], Callable[[dict], None]], None]:
    """A ``runner`` for :func:`geometry.survey.run_survey` submitting every task to ``client``'s cluster.

    ``threads``: torch CPU threads per task (default: this machine's cores divided by the workers,
    at least 1: meant for a local cluster; pass it explicitly for remote workers).
    """
    from dask.distributed import as_completed

    def run(tasks: Sequence[ModuleTask], on_result: Callable[[dict], None]) -> None:
        if not tasks:
            return
        n = threads or max(1, _cores() // max(1, worker_count(client)))
        futures = [client.submit(_run, task, n, pure=False, key=f"survey-{task.index}-{os.getpid()}-{id(tasks)}")
                   for task in tasks]
        try:
            for fut in as_completed(futures):
                result = fut.result()
                fut.release()
                on_result(result)
        finally:
            client.cancel([f for f in futures if not f.done()])

    return run


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_peak_rss(client) -> dict[str, int]:
    """Peak resident memory of each worker process, in bytes (``ru_maxrss``)."""
    return client.run(_peak_rss)
