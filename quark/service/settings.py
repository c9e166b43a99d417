"""Service settings shared by the API server and the workers (env prefix ``QUARK_``).

The unlearn job's parameters are not declared here: ``unlearn`` is derived from
``quark.online.params.UnlearnParams``, one environment variable per field
(``QUARK_UNLEARN_<FIELD>``, or the name its ``env`` metadata gives), same defaults, same
bounds, same help text. Importing this module does not import torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonDict
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from quark.config import BOUNDS
from quark.online.params import UnlearnParams
from quark.paths import default_cache_dir
from quark.precision import DTYPE_CHOICES, QUANTIZATION_CHOICES


def unlearn_env_name(field_name: str) -> str:
    """The environment variable of one UnlearnParams field."""
    meta = next(f.metadata for f in fields(UnlearnParams) if f.name == field_name)
    return "QUARK_" + str(meta.get("env") or f"unlearn_{field_name}").upper()


#: UnlearnParams field -> its environment variable.
UNLEARN_ENV = {f.name: unlearn_env_name(f.name) for f in fields(UnlearnParams)}


def params_model_fields(optional: bool, env: bool = False) -> dict[str, Any]:
    """Pydantic field definitions of UnlearnParams (type, bounds, help; default None when
    ``optional``, for request models whose absent fields keep the configured value; read
    from the field's environment variable when ``env``)."""
    types = UnlearnParams.field_types()
    definitions: dict[str, Any] = {}
    for f in fields(UnlearnParams):
        bounds = {k: f.metadata[k] for k in BOUNDS if k in f.metadata}
        kind: Any = Annotated[types[f.name], Field(**bounds)] if bounds else types[f.name]
        default = None if optional or f.default is MISSING else f.default
        alias = AliasChoices(UNLEARN_ENV[f.name]) if env else None
        # Choices are documented in the schema and checked by UnlearnParams (one message).
        choices = f.metadata.get("choices")
        extra: JsonDict | None = {"enum": list(choices)} if choices else None
        definitions[f.name] = (
            kind | None if optional else kind,
            Field(
                default,
                description=f.metadata["help"],
                validation_alias=alias,
                json_schema_extra=extra,
            ),
        )
    return definitions


def _unlearn_settings_class() -> type[BaseSettings]:
    definitions = params_model_fields(optional=False, env=True)
    return create_model(
        "UnlearnSettings",
        __base__=BaseSettings,
        __config__=None,
        **definitions,
    )


_UnlearnSettings = _unlearn_settings_class()


def unlearn_params_from_env() -> UnlearnParams:
    """UnlearnParams with every field read from its environment variable (else its default)."""
    values = _UnlearnSettings().model_dump()
    try:
        return UnlearnParams(**values)
    except ValueError as exc:
        named = [
            f"{name} is {env}"
            for name, env in UNLEARN_ENV.items()
            if re.search(rf"\b{name}=", str(exc))
        ]
        raise ValueError(f"{exc}; fix the environment ({', '.join(named)})") from exc


#: Settings that were renamed: an environment still setting the old name is refused at start-up
#: (settings ignore unknown variables, so it would otherwise be dropped without a word).
RENAMED_ENV = {
    "QUARK_UNLEARN_BF16_AUTOCAST": "QUARK_UNLEARN_TRAIN_PRECISION (auto, float32 or bfloat16)",
}


def _check_renamed(environ: Mapping[str, str]) -> None:
    old = [name for name in RENAMED_ENV if name in environ]
    if old:
        fixes = "; ".join(f"{name} is now {RENAMED_ENV[name]}" for name in old)
        raise ValueError(f"renamed settings in the environment: {fixes}; set the new name")


#: Settings whose value is one of a few names: field -> (what it is, the names).
_CHOICES = {
    "dtype": ("serving precision", DTYPE_CHOICES),
    "quantization": ("serving quantization", QUANTIZATION_CHOICES),
}


def _default_data_dir() -> Path:
    return default_cache_dir() / "data"


class ServiceSettings(BaseSettings):
    """Every ``QUARK_*`` setting of the service; see the README's configuration table."""

    # populate_by_name: a field read from an alias (utility_text) is still set by its name.
    model_config = SettingsConfigDict(env_prefix="QUARK_", extra="ignore", populate_by_name=True)

    # -- model -------------------------------------------------------------------------
    model: str = Field(
        "default", description="'default' (SmolLM2-135M-Instruct), a HF dir or .gguf"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: str = Field(
        "auto",
        description="precision of the served model: auto, float32, bfloat16, float16 (auto = "
        "bfloat16 on CUDA or a CPU with native bf16, else float32; training: "
        "QUARK_UNLEARN_TRAIN_PRECISION)",
    )
    quantization: str = Field(
        "none",
        description="serving weights: none, int8 or int4 (weight-only, CPU, QUARK_DTYPE float32 "
        "or bfloat16; both are faster for one stream). int4 (group-32, "
        "GGUF Q4_1's layout) keeps the default GGUF model as it is but rounds an unlearned "
        "version's changes away: use int8 with unlearning (docs/results.md)",
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted-model cache")
    data_dir: Path = Field(
        default_factory=_default_data_dir, description="spool, model store, redis"
    )

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
    unlearn: UnlearnParams = Field(
        default_factory=lambda: unlearn_params_from_env(),
        description="the unlearn job's parameters (QUARK_UNLEARN_*, ...; see UNLEARN_ENV)",
    )
    utility_text: Path | None = Field(
        None,
        # QUARK_ACFT_UTILITY_TEXT: its name while only ACFT read it, still accepted.
        validation_alias=AliasChoices("QUARK_UTILITY_TEXT", "QUARK_ACFT_UTILITY_TEXT"),
        description="plain-text file, a passage per line (lines of 12+ words): ACFT jobs mix "
        "its passages into their fine-tuning corpus, for fluency; Quark jobs add a KL to the "
        "original model on them when QUARK_UNLEARN_UTILITY_KL_COEF > 0 (unset = neither; "
        "also read from QUARK_ACFT_UTILITY_TEXT, its former name)",
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
    broker_visibility_timeout_s: int | None = Field(
        None,
        ge=1,
        description="Redis re-delivers an unacknowledged job after this (unset = the hard time "
        "limit + 600; a lower value is for tests)",
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

    @field_validator("dtype", "quantization", mode="after")
    @classmethod
    def _check_choice(cls, value: str, info: ValidationInfo) -> str:
        """A name from a fixed list, case and spaces ignored."""
        what, choices = _CHOICES[str(info.field_name)]
        name = value.strip().lower()
        if name not in choices:
            raise ValueError(
                f"QUARK_{str(info.field_name).upper()}={value!r} is not a {what}: use one of "
                f"{', '.join(choices)}"
            )
        return name

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        _check_renamed(os.environ)
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
        if self.job_hard_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError(
                f"QUARK_JOB_HARD_TIME_LIMIT_S={self.job_hard_time_limit_s} must exceed "
                f"QUARK_JOB_SOFT_TIME_LIMIT_S={self.job_soft_time_limit_s} "
                "(the soft limit checkpoints before the hard one kills)"
            )
        if self.utility_text is not None and not self.utility_text.is_file():
            raise ValueError(
                f"QUARK_UTILITY_TEXT={self.utility_text} (or QUARK_ACFT_UTILITY_TEXT) is not a "
                "file; point it at a plain-text file or unset it"
            )
        self._check_utility(self.unlearn)
        return self

    def _check_utility(self, params: UnlearnParams) -> None:
        """The utility KL term needs the utility text (refused at start, or with a 400)."""
        if params.utility_kl_coef > 0 and self.utility_text is None:
            raise ValueError(
                f"utility_kl_coef={params.utility_kl_coef} (QUARK_UNLEARN_UTILITY_KL_COEF) "
                "needs QUARK_UTILITY_TEXT, a plain-text file with a passage per line; set it "
                "or set the coefficient to 0"
            )

    def unlearn_params(self, overrides: dict[str, Any]) -> UnlearnParams:
        """One job's parameters: these settings, then an admin's overrides (validated)."""
        values = dict(overrides)
        if "task" in values and "reward" not in values:
            values["reward"] = ""  # another task means that task's default reward
        unknown = sorted(set(values) - set(UNLEARN_ENV))
        if unknown:
            raise ValueError(f"unknown unlearn parameters {unknown}; valid: {sorted(UNLEARN_ENV)}")
        params = replace(self.unlearn, **values)
        self._check_utility(params)
        return params

    @property
    def num_quantiles(self) -> int:
        return self.unlearn.num_quantiles

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "models"
