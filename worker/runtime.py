"""What a worker process keeps between tasks: Redis clients, the store, the original model,
reward functions; plus the lock that keeps unlearn jobs one at a time."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Ignore

from quark.online.params import reward_spec
from quark.online.scoring import score_pending
from quark.rewards import RewardFn, build_reward
from quark.service.aux_heads import AuxHeads
from quark.service.jobs import JobRegistry
from quark.service.keys import RedisKeys
from quark.service.redis_client import connect
from quark.service.redis_pool import RedisPool
from quark.service.settings import ServiceSettings
from quark.service.store import ModelStore, RedisVersionPointer, ensure_initial_version

if TYPE_CHECKING:
    from quark.models import QuarkModel
    from quark.online.job import UnlearnDeps

log = logging.getLogger(__name__)

SCORE_LOCK_S = 600  # a scorer that dies frees the lock after this
BOOTSTRAP_LOCK_S = 900  # converting and publishing v0000 takes minutes on a cold cache
#: Read timeout of the worker's Redis client: above the longest single command it sends.
WORKER_REDIS_TIMEOUT_S = 30.0

# Set when the worker starts a warm shutdown: a running job checkpoints and is re-queued.
SHUTTING_DOWN = threading.Event()

CANCELLED = "CANCELLED"  # the Celery state of a cancelled job


@dataclass
class Runtime:
    settings: ServiceSettings
    client: redis.Redis
    pool: RedisPool
    store: ModelStore
    pointer: RedisVersionPointer
    jobs: JobRegistry

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.settings.key_prefix)

    @property
    def scoring_spec(self) -> str:
        return reward_spec(self.settings.unlearn.task, self.settings.unlearn.reward)

    def ensure_active(self) -> str:
        return ensure_initial_version(
            self.store,
            self.settings.model,
            self.settings.num_quantiles,
            self.pointer.lock("bootstrap", timeout_s=BOOTSTRAP_LOCK_S),
        )

    def score(self, blocking_s: float = 0.0) -> int | None:
        """Score pending pool records; None when another scorer holds the lock."""
        lock = self.client.lock(
            self.keys.lock("score"), timeout=SCORE_LOCK_S, blocking_timeout=blocking_s
        )
        if not lock.acquire(blocking=blocking_s > 0):
            return None
        try:
            return score_pending(
                self.pool, reward_fn(self.scoring_spec), self.settings.score_batch_size
            )
        finally:
            _release(lock)

    @contextmanager
    def unlearn_lock(self, job_id: str, wait_s: float) -> Iterator[bool]:
        """Hold the one-job-at-a-time lock, renewed (with the job's heartbeat) by a thread;
        yields False if it stayed taken for ``wait_s``. A dead worker's lock expires in TTL."""
        ttl = self.settings.job_lock_ttl_s
        # thread_local=False: the keeper thread renews the token this thread acquired.
        lock = self.client.lock(self.keys.lock("unlearn"), timeout=ttl, thread_local=False)
        if not self._acquire(lock, job_id, wait_s):
            yield False
            return
        stop = threading.Event()
        keeper = threading.Thread(
            target=_keep_alive, args=(lock, self.jobs, job_id, ttl, stop), daemon=True
        )
        keeper.start()
        try:
            yield True
        finally:
            stop.set()
            keeper.join(timeout=5)
            self.jobs.clear_heartbeat(job_id)
            _release(lock)

    def _acquire(self, lock: Any, job_id: str, wait_s: float) -> bool:
        """Try for ``wait_s``, renewing the job's heartbeat meanwhile (waiting is alive)."""
        ttl = self.settings.job_lock_ttl_s
        deadline = time.monotonic() + wait_s
        while True:
            self.jobs.heartbeat(job_id, ttl)
            slice_s = min(ttl / 3, max(0.0, deadline - time.monotonic()))
            if lock.acquire(blocking=slice_s > 0, blocking_timeout=slice_s or None):
                self.jobs.heartbeat(job_id, ttl)
                return True
            if time.monotonic() >= deadline:
                self.jobs.clear_heartbeat(job_id)
                return False

    def unlearn_locked(self) -> bool:
        return bool(self.client.exists(self.keys.lock("unlearn")))


def _keep_alive(
    lock: Any, jobs: JobRegistry, job_id: str, ttl: float, stop: threading.Event
) -> None:
    while not stop.wait(ttl / 3):
        try:
            lock.reacquire()
            jobs.heartbeat(job_id, ttl)
        except redis.RedisError as exc:  # Redis restarting: try again next round
            log.warning("could not renew the unlearn lock: %s", exc)


def _release(lock: Any) -> None:
    try:
        lock.release()
    except redis.RedisError as exc:  # expired meanwhile (Redis restart): nothing to free
        log.warning("lock already gone: %s", exc)


@functools.cache
def runtime() -> Runtime:
    import torch
    from transformers.utils import logging as hf_logging

    settings = ServiceSettings()
    hf_logging.disable_progress_bar()  # every job loads models: no bars in the worker log
    if settings.worker_torch_threads:
        torch.set_num_threads(settings.worker_torch_threads)
    client = connect(settings.redis_url, read_timeout_s=WORKER_REDIS_TIMEOUT_S)
    pointer = RedisVersionPointer(client, settings.key_prefix)
    return Runtime(
        settings=settings,
        client=client,
        pool=RedisPool(client, settings.key_prefix, settings.pool_max_records),
        store=ModelStore(settings.store_dir, pointer),
        pointer=pointer,
        jobs=JobRegistry(client, settings.key_prefix),
    )


@functools.cache
def reward_fn(spec: str) -> RewardFn:
    return build_reward(spec)


@functools.cache
def original_model(source: str, device: str) -> QuarkModel:
    """The frozen original model, loaded once per worker process (the KL reference)."""
    from quark.models import load_model

    qm = load_model(source, device=device)
    qm.model.requires_grad_(False)
    qm.model.eval()
    return qm


def job_deps(rt: Runtime, spec: str) -> UnlearnDeps:
    """What a job of either kind needs, from the worker's caches."""
    from quark.online.job import UnlearnDeps

    return UnlearnDeps(
        store=rt.store,
        pool=rt.pool,
        original=original_model(rt.settings.model, rt.settings.device),
        reward_fn=reward_fn(spec),
        device=rt.settings.device,
        rescore=spec != rt.scoring_spec,  # an admin override: score the window again
        utility_text=rt.settings.utility_text,
        heads=AuxHeads(rt.store),
    )


def progress_reporter(
    task: Task, jobs: JobRegistry, job_id: str, state: dict[str, Any]
) -> Callable[[dict[str, Any]], None]:
    """A job's progress callback: merges each event into ``state`` and records it in Celery's
    task state and in the registry (which outlives Celery's meta: the result replaces it)."""

    def progress(event: dict[str, Any]) -> None:
        state.update(event)
        try:
            task.update_state(state="PROGRESS", meta=dict(state))
            jobs.set_progress(job_id, state)
        except redis.RedisError as exc:  # progress is best effort: training goes on
            log.warning("job %s: progress not recorded (%s)", job_id, exc)

    return progress


def cancel_check(jobs: JobRegistry, job_id: str) -> Callable[[], bool]:
    """A job's ``should_stop``: whether it was cancelled (False while Redis cannot tell)."""

    def cancelled() -> bool:
        try:
            return jobs.cancelled(job_id)
        except redis.RedisError:
            return False  # cannot tell during a Redis outage: keep going

    return cancelled


def cancel_task(
    task: Task,
    jobs: JobRegistry | None,
    reason: str,
    state: dict[str, Any] | None = None,
) -> NoReturn:
    """End a task as CANCELLED; also in ``jobs``, the job registry, first (None: it is
    recorded there already)."""
    meta = {**(state or {}), "phase": "cancelled", "reason": reason}
    # The registry first: a reader that sees Celery's CANCELLED must also find the result.
    if jobs is not None:
        jobs.set_result(str(task.request.id), {"status": "cancelled", "reason": reason})
    task.update_state(state=CANCELLED, meta=meta)
    raise Ignore()
