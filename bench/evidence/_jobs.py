"""Run independent experiment jobs one after another here, or several at once in single-threaded
worker processes (a 2-core machine trains two small models faster side by side than one with two
threads)."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, TypeVar

import torch
from tqdm import tqdm

T = TypeVar("T")


def _single_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def run_jobs(fn: Callable[..., T], jobs: Sequence[tuple], workers: int, what: str,
             processes: bool = True) -> List[T]:
    """``[fn(*job) for job in jobs]``, with ``workers`` concurrent workers when above 1 (processes,
    or threads for jobs that start their own subprocesses). Results keep the order of ``jobs``."""
    results: List[T] = [None] * len(jobs)  # type: ignore[list-item]
    bar = tqdm(total=len(jobs), desc=what, unit="run", disable=None)
    if workers <= 1:
        for i, job in enumerate(jobs):
            results[i] = fn(*job)
            bar.update()
        bar.close()
        return results
    if processes:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_single_thread)
    else:
        pool = ThreadPoolExecutor(workers)
    with pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    bar.close()
    return results


@contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Send this process's log records to ``path`` (and only there) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved, level = root.handlers[:], root.level
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        handler.close()
        root.handlers, root.level = saved, level
