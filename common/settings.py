"""Process settings: one typed object read from the environment (prefix ``EMC_``).

Nested fields use ``__``: ``EMC_STORE__KIND=s3``, ``EMC_STORE__ENDPOINT=127.0.0.1:9000``.
Everything that changes numbers lives in the experiment file (:mod:`common.experiment`),
not here: settings say *where* things run, the experiment says *what* is computed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseModel):
    """Where artifacts live: a local directory (embedded default) or S3/MinIO."""

    kind: Literal["fs", "s3"] = "fs"
    root: Path | None = Field(
        default=None, description="fs: directory of the store (default: <home>/store)"
    )
    endpoint: str | None = Field(default=None, description="s3: host:port of MinIO/S3")
    bucket: str = "emc"
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    secure: bool = Field(default=False, description="s3: use https")
    region: str | None = None

    @model_validator(mode="after")
    def _check_s3(self) -> StoreSettings:
        if self.kind == "s3" and not self.endpoint:
            raise ValueError(
                "store.endpoint is required when store.kind is 's3': "
                "set EMC_STORE__ENDPOINT=host:port (e.g. 127.0.0.1:9000)"
            )
        return self


class Settings(BaseSettings):
    """Settings of every emc process (CLI, workers, review UI)."""

    model_config = SettingsConfigDict(
        env_prefix="EMC_", env_nested_delimiter="__", extra="ignore", env_file=None
    )

    home: Path = Field(
        default=Path("var"),
        description="state directory of the embedded system (store, redis, model cache)",
    )
    broker_url: str | None = Field(
        default=None,
        description="Redis URL; unset = the embedded default starts a private Redis",
    )
    broker_port: int = Field(default=6399, description="port of the embedded Redis")
    visibility_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="lease of a task message (s): a task whose worker stopped renewing its "
        "lease (killed, OOM, machine lost) goes back to its queue after this long. Live "
        "workers renew the leases of every message they hold (common/leases.py), so tasks "
        "may run far longer than this without being handed out twice.",
    )
    lease_renew_s: float = Field(
        default=15.0,
        gt=0,
        description="how often (s) a worker renews the leases of the messages it holds; "
        "must be below half of visibility_timeout_s",
    )
    unacked_restore_s: float = Field(
        default=10.0,
        gt=0,
        description="how often (s) a worker looks for tasks of dead workers whose lease ran "
        "out (kombu unacked_restore_interval)",
    )
    unacked_restore_throttle: int = Field(
        default=1,
        ge=1,
        description="scan Redis on every Nth look only (sweep period = unacked_restore_s × this)",
    )
    breaker_probe_s: float = Field(
        default=30.0,
        gt=0,
        description="while a queue's external service (the judge's LLM endpoint) is down, how "
        "often (s) a worker asks it whether it answers again (common/breaker.py)",
    )
    max_restarts: int = Field(
        default=3,
        ge=0,
        description="`emc up`: restarts of a process that died before the whole system stops",
    )
    generate_every_s: float = Field(
        default=30.0, gt=0, description="streaming: how often beat asks the generator for a batch"
    )
    gpu_lanes: Literal["split", "shared"] = Field(
        default="split",
        description="`emc up`: 'split' runs one GPU worker per lane (gpu_fast: top-k, "
        "continuations, steering; gpu: graphs), so new prompts never wait for a running graph "
        "(each process loads the models); 'shared' runs one GPU worker serving both, fast lane "
        "first (one copy of the models; a fast task waits at most for the graph in progress)",
    )
    store: StoreSettings = Field(default_factory=StoreSettings)
    experiment: Path | None = Field(
        default=None, description="experiment YAML; unset = the toy model organism"
    )
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    ui_host: str = "127.0.0.1"
    ui_port: int = 5077
    secret_key: SecretStr | None = Field(
        default=None, description="Flask session secret; unset = generated once into <home>"
    )
    log_level: str = "INFO"
    malloc_arena_max: int = Field(
        default=1,
        ge=0,
        description="glibc malloc arenas of a worker process (common/malloc.py): 1 keeps a "
        "GPU worker's memory flat over weeks; 0 = glibc's default",
    )

    @model_validator(mode="after")
    def _check_lease(self) -> Settings:
        if self.lease_renew_s * 2 > self.visibility_timeout_s:
            raise ValueError(
                f"lease_renew_s ({self.lease_renew_s}) must be at most half of "
                f"visibility_timeout_s ({self.visibility_timeout_s}), else a live worker's "
                "task can be handed out twice: lower EMC_LEASE_RENEW_S or raise "
                "EMC_VISIBILITY_TIMEOUT_S"
            )
        return self

    @property
    def sweep_s(self) -> float:
        """How often a worker puts back tasks whose lease ran out."""
        return self.unacked_restore_s * self.unacked_restore_throttle

    @property
    def store_root(self) -> Path:
        """Root of the local object store: ``EMC_STORE__ROOT``, else ``<home>/store``."""
        return self.store.root or (self.home / "store")

    @property
    def cache_dir(self) -> Path:
        """Where emc caches derived data (e.g. file digests): ``<home>/cache``."""
        return self.home / "cache"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (read once; tests call ``get_settings.cache_clear()``)."""
    return Settings()
