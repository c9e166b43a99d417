"""Online unlearning over the service's pool: job parameters, the unlearn job, the promotion
gate and held-out split, scoring, pool statistics. Plain functions and classes: no Celery,
no web code; the store and pool are passed in (protocols in ``quark.online.scoring`` and
``quark.online.job``)."""
