"""Settings, read from the environment with the prefix `TASKRUNNER_`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BAR_URL = "https://www.whattimeisitrightnow.com/"


class Settings(BaseSettings):
    """Every tunable of taskrunner; each name carries its unit."""

    model_config = SettingsConfigDict(env_prefix="TASKRUNNER_", frozen=True, extra="ignore")

    # A `postgresql://` URL. Unset: the local commands start an embedded PostgreSQL.
    database_url: str | None = None
    # Set when connecting through pgbouncer (transaction mode) or RDS Proxy: disables
    # psycopg's automatic prepared statements and LISTEN/NOTIFY (workers poll instead).
    transaction_pooler: bool = False
    # Connections kept per process; 0 means no pool (a connection per use).
    db_pool_size: int = Field(default=10, ge=0)
    # How long to wait for a connection (to open one, or for a free one in the pool).
    db_connect_timeout_s: int = Field(default=5, ge=1)
    # The longest any statement may run; the server cancels it then (a frozen server is
    # given up on a second later). Every statement taskrunner runs is bounded and short.
    db_statement_timeout_s: float = Field(default=5.0, gt=0, le=600)

    # When set, every /tasks request needs `Authorization: Bearer <token>`; /healthz does not.
    api_token: str | None = None

    bar_url: str = DEFAULT_BAR_URL
    bar_timeout_s: float = Field(default=10.0, gt=0)
    # `bar` requests one worker has in flight at once; the rest wait their turn (claimed, not
    # yet started: their timeout starts with their request).
    bar_concurrency: int = Field(default=100, ge=1, le=10_000)
    # How long `foo` sleeps; the product says 3 seconds, tests shorten it.
    foo_delay_s: float = Field(default=3.0, ge=0)

    # A worker's lease: it renews it every third of this; when it lapses (the worker died or
    # stalled), the worker's tasks are rescued. It covers the worker, not a task, so it may be
    # far shorter than the tasks it runs. Below 3 s a renewal would have less than a second
    # to reach a busy database before the next one is due: refused rather than let a live
    # worker's tasks be rescued and run twice.
    lease_seconds: float = Field(default=60.0, ge=3.0)
    # Runs of one task, crashes included, before it is failed for good.
    max_attempts: int = Field(default=3, ge=1)
    # Retry n waits retry_base_s * 2**(n-1), capped at retry_max_s.
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_max_s: float = Field(default=300.0, ge=0)

    # Tasks one worker process runs at once, and the most one claim statement takes.
    concurrency: int = Field(default=10_000, ge=1)
    claim_batch: int = Field(default=1_000, ge=1)
    # Longest sleep between looks at the table when no notification can wake the worker.
    # At most queries.NOTIFY_HORIZON_S: tasks due later than that wake no worker.
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    # On SIGTERM, how long running tasks may take to finish before they are released.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Margin a tick keeps before its platform deadline: it claims nothing that would end after it.
    deadline_margin_s: float = Field(default=2.0, ge=0)
    # "drain": a scheduled tick runs what is due and returns. "poll": it keeps claiming
    # until near its deadline, so a once-a-minute schedule still starts tasks on time.
    tick_mode: Literal["drain", "poll"] = "drain"
