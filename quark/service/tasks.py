"""Celery task and queue names: the contract between the API (which sends tasks by name)
and the workers (which register them). Torch-free and Celery-free."""

SCORE_TASK = "score_pool"
UNLEARN_TASK = "unlearn_job"
TICK_TASK = "beat_tick"
SCORING_QUEUE = "scoring"
TRAINING_QUEUE = "training"
QUEUES = (SCORING_QUEUE, TRAINING_QUEUE)
