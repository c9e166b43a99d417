"""Service settings shared by the API server and the workers (env prefix ``QUARK_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from quark.models import default_cache_dir


def _default_data_dir() -> Path:
    return default_cache_dir() / "data"


class ServiceSettings(BaseSettings):
    """Every ``QUARK_*`` setting of the service; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="QUARK_", extra="ignore")

    # -- model -------------------------------------------------------------------------
    model: str = Field(
        "default", description="'default' (SmolLM2-135M-Instruct), a HF dir or .gguf"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted-model cache")
    data_dir: Path = Field(
        default_factory=_default_data_dir, description="spool, model store, redis"
    )
    num_quantiles: int = Field(5, ge=2, description="reward tokens (K) added to a base model")
    task: str = Field(
        "toxicity", description="what the workers unlearn: toxicity|sentiment|repetition"
    )
    reward: str = Field("", description="reward spec for scoring (empty = the task's default)")

    # -- server ------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address of the API server")
    port: int = Field(8000, ge=1, le=65535, description="port of the API server")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated keys for generation endpoints (empty=open)",
    )
    admin_token: str = Field(
        "", description="bearer token for /admin (required unless insecure_dev)"
    )
    insecure_dev: bool = Field(False, description="allow an open /admin for local development")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest accepted request body")
    served_model_name: str = Field(
        "quark", description="model id in /v1/models and the 'model' field OpenAI clients send"
    )
    log_level: str = Field("info", description="log level of the service (debug, info, warning)")

    # -- generation engine ---------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, description="rows per generation batch")
    batch_wait_ms: float = Field(5.0, ge=0, description="wait for more requests before a batch")
    max_queue: int = Field(256, ge=1, description="queued rows before 503 + Retry-After")
    max_n: int = Field(16, ge=1, description="largest n (completions per request)")
    max_new_tokens_limit: int = Field(512, ge=1, description="largest max_new_tokens")
    default_max_new_tokens: int = Field(20, ge=1, description="max_new_tokens when not given")
    max_prompt_tokens: int = Field(
        2048, ge=1, description="longest prompt in tokens (also capped by the model's context)"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with a 503")
    torch_threads: int = Field(
        0, ge=0, description="torch threads of the engine (0 = CPU cores - 1, at least 1)"
    )

    # -- pool logging --------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis for pool, broker, versions"
    )
    key_prefix: str = Field("quark", description="prefix of every Redis key")
    logging_enabled: bool = Field(True, description="log generations to the pool (privacy switch)")
    pool_max_records: int = Field(1_000_000, ge=1, description="retention bound of the pool stream")
    spool_max_records: int = Field(
        100_000, ge=1, description="on-disk spool bound while Redis is down"
    )
    spool_segment_records: int = Field(
        1000, ge=1, description="records per spool file (replayed, then deleted, one by one)"
    )
    pool_buffer_records: int = Field(
        10_000, ge=1, description="records held in memory on their way to Redis or the spool"
    )
    redis_timeout_s: float = Field(
        1.0, gt=0, description="Redis connect/read timeout of the pool writer"
    )
    redis_retry_s: float = Field(
        1.0, gt=0, description="seconds between Redis health checks and spool replays"
    )

    # -- model store and hot swap ----------------------------------------------------------
    store_retention: int = Field(
        5, ge=1, description="newest model versions kept (plus active, its parent, v0000)"
    )
    watch_versions: bool = Field(
        True, description="server follows the model store's active version (hot swap)"
    )
    watcher_poll_s: float = Field(
        5.0, gt=0, description="server re-reads the active version this often (pub/sub fallback)"
    )

    # -- workers: scoring and unlearn jobs -------------------------------------------------
    worker_torch_threads: int = Field(
        0,
        ge=0,
        description="torch threads of a worker (0 = torch's default, every core; `quark up` "
        "splits the cores between API and worker)",
    )
    score_batch_size: int = Field(64, ge=1, description="pool records scored per reward call")
    unlearn_steps: int = Field(100, ge=1, description="training steps per unlearn job")
    unlearn_batch_size: int = Field(8, ge=1, description="quantized samples per training step")
    unlearn_lr: float = Field(5e-5, gt=0, description="AdamW learning rate of unlearn jobs")
    unlearn_warmup_steps: int = Field(10, ge=0, description="LR warmup steps of each job")
    unlearn_kl_coef: float = Field(0.05, ge=0, description="KL weight against the original")
    unlearn_entropy_coef: float = Field(0.06, ge=0, description="entropy bonus weight")
    unlearn_window: int = Field(
        2000, ge=1, description="newest scored pool records a job trains on"
    )
    unlearn_min_records: int = Field(
        50, ge=2, description="a job with fewer scored records is skipped"
    )
    unlearn_explore_prompts: int = Field(
        0, ge=0, description="fresh top-token samples per exploration round (0 = traffic only)"
    )
    unlearn_sample_interval: int = Field(
        50, ge=1, description="explore again every N steps (when explore prompts > 0)"
    )
    unlearn_response_length: int = Field(
        20, ge=1, description="new tokens per exploration/evaluation sample"
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of pool prompts held out of training for evaluation"
    )
    eval_prompts: int = Field(32, ge=1, description="held-out prompts per evaluation")
    eval_samples: int = Field(2, ge=1, description="top-token samples per held-out prompt")
    gate_reward_tolerance: float = Field(
        0.0, ge=0, description="promote if reward >= active version's reward - this"
    )
    gate_max_perplexity_rise: float = Field(
        0.25, ge=0, description="promote if perplexity <= active version's x (1 + this)"
    )
    gate_max_kl: float | None = Field(
        None,
        gt=0,
        description="if set, promote only if mean per-token KL to the original <= this "
        "(caps drift summed over versions)",
    )
    job_soft_time_limit_s: int = Field(
        3600, ge=10, description="a job then checkpoints and is retried (resumes)"
    )
    job_hard_time_limit_s: int = Field(
        3900, ge=10, description="a job is killed (prefork pool); above the soft limit"
    )
    job_max_retries: int = Field(3, ge=0, description="retries of a failed/interrupted task")
    job_lock_ttl_s: float = Field(
        60.0, gt=0, description="unlearn lock expiry; renewed while the job is alive"
    )

    # -- continuous mode (celery beat) -------------------------------------------------------
    continuous: bool = Field(False, description="beat starts unlearn jobs by itself")
    continuous_interval_min: float = Field(
        30.0, gt=0, description="start a job at least this often (minutes)"
    )
    continuous_min_new_records: int = Field(
        500, ge=1, description="... or as soon as this many new records are scored"
    )
    beat_tick_s: float = Field(
        15.0, gt=0, description="beat scores the pool and checks the triggers this often"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"QUARK_DEFAULT_MAX_NEW_TOKENS={self.default_max_new_tokens} exceeds "
                f"QUARK_MAX_NEW_TOKENS_LIMIT={self.max_new_tokens_limit}"
                "; lower the default or raise the limit"
            )
        if self.max_n > self.max_batch_size:
            raise ValueError(
                f"QUARK_MAX_N={self.max_n} exceeds QUARK_MAX_BATCH_SIZE={self.max_batch_size}: "
                "all n completions of a request decode in one batch"
            )
        if self.max_n > self.max_queue:
            raise ValueError(f"QUARK_MAX_N={self.max_n} exceeds QUARK_MAX_QUEUE={self.max_queue}")
        if self.task not in ("toxicity", "sentiment", "repetition"):
            raise ValueError(f"QUARK_TASK={self.task!r}: use toxicity, sentiment or repetition")
        if self.job_hard_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError(
                f"QUARK_JOB_HARD_TIME_LIMIT_S={self.job_hard_time_limit_s} must exceed "
                f"QUARK_JOB_SOFT_TIME_LIMIT_S={self.job_soft_time_limit_s} "
                "(the soft limit checkpoints before the hard one kills)"
            )
        return self

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "models"
