"""The workers' Celery app: ``celery -A worker.celery_app worker|beat``.

Importing it reads the settings and builds the app (no Redis connection, no torch); the
tasks register from ``worker.tasks``.
"""

from quark.service.broker import make_celery
from quark.service.settings import ServiceSettings

settings = ServiceSettings()
app = make_celery(settings)
app.conf.imports = ("worker.tasks",)
