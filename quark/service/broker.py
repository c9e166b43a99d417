"""The Celery app's configuration: Redis broker and result backend, two queues, settings for
long GPU jobs. The workers (``worker.celery_app``) and the API (which sends tasks by name and
reads their state) build their app here, so both agree on every key and queue.

Run one training worker per GPU (a job holds the whole GPU), e.g.::

    celery -A worker.celery_app worker --pool solo -Q scoring,training -n quark@%h
    celery -A worker.celery_app beat            # continuous mode, scoring ticks

``--pool solo`` runs tasks in the worker process itself; Celery enforces its time limits
only in the prefork pool (``--pool prefork --concurrency 1``), so the unlearn task also
checks the soft limit itself (it checkpoints and is retried, resuming).

Building an app connects to nothing (Celery connects lazily) and imports no torch.
"""

from __future__ import annotations

import contextlib

from celery import Celery
from kombu import Exchange, Queue

from quark.service.keys import RedisKeys
from quark.service.settings import ServiceSettings
from quark.service.tasks import (
    QUEUES,
    SCORE_TASK,
    SCORING_QUEUE,
    TICK_TASK,
    TRAINING_QUEUE,
    UNLEARN_TASK,
)


def visibility_timeout_s(settings: ServiceSettings) -> int:
    """Seconds before Redis re-delivers an unacknowledged message (that of a job whose worker
    died): ``QUARK_BROKER_VISIBILITY_TIMEOUT_S``, by default the hard time limit + 600."""
    return settings.broker_visibility_timeout_s or settings.job_hard_time_limit_s + 600


def make_celery(settings: ServiceSettings) -> Celery:
    """A Celery app for ``settings``; every broker/result key lives under the key prefix."""
    # Beat keeps its schedule file in the data dir and does not create the directory (on a
    # read-only filesystem beat is started with --schedule elsewhere).
    with contextlib.suppress(OSError):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("quark", broker=settings.redis_url, backend=settings.redis_url)
    keyprefix = RedisKeys(settings.key_prefix).celery
    app.conf.update(
        # Each queue has its own exchange and routing key: queues sharing the default
        # exchange's key would each receive a copy of every message.
        task_queues=tuple(Queue(q, Exchange(q), routing_key=q) for q in QUEUES),
        task_default_queue=SCORING_QUEUE,
        task_default_exchange=SCORING_QUEUE,
        task_default_routing_key=SCORING_QUEUE,
        task_routes={
            SCORE_TASK: {"queue": SCORING_QUEUE},
            TICK_TASK: {"queue": SCORING_QUEUE},
            UNLEARN_TASK: {"queue": TRAINING_QUEUE},
        },
        # A job is acknowledged when it ends, so a worker that dies mid-job loses nothing;
        # prefetch 1 keeps a busy worker from sitting on jobs another worker could run.
        task_acks_late=True,
        task_reject_on_worker_lost=False,  # a job that kills its worker must not loop forever
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_track_started=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # A Redis blip must not kill an hour-long job: keep it running (its message stays
        # unacknowledged, so nothing is lost) and retry result writes until Redis is back.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        result_backend_always_retry=True,
        result_backend_max_retries=30,
        broker_transport_options={
            # Redis re-delivers an unacknowledged message after this: above the longest job,
            # or a running job would be delivered a second time elsewhere (the unlearn task
            # drops such a duplicate, and records a job whose worker died as failed).
            "visibility_timeout": visibility_timeout_s(settings),
            "global_keyprefix": keyprefix,
        },
        result_backend_transport_options={"global_keyprefix": keyprefix},
        beat_schedule={
            "tick": {
                "task": TICK_TASK,
                "schedule": settings.beat_tick_s,
                # Ticks queued behind a long job are worthless later: let them expire.
                "options": {"queue": SCORING_QUEUE, "expires": max(5.0, settings.beat_tick_s)},
            }
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
    )
    return app
