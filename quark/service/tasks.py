"""Celery task and queue names: the contract between the API (which sends tasks by name)
and the workers (which register them). Torch-free and Celery-free."""

SCORE_TASK = "score_pool"
UNLEARN_TASK = "unlearn_job"
TICK_TASK = "beat_tick"
AUX_TASK = "aux_head_job"  # ACFT's parallel scheme: the auxiliary head, on its own queue
SCORING_QUEUE = "scoring"
TRAINING_QUEUE = "training"
AUX_QUEUE = "aux"
QUEUES = (SCORING_QUEUE, TRAINING_QUEUE)  # the main worker's; an aux worker takes AUX_QUEUE
