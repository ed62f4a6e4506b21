"""One settings object for every process. Each field reads the env var INFERSTREAM_<FIELD>.

The defaults describe the local stack (`inferstream stack up`); production points the same code
at Apache Kafka, MinIO, PostgreSQL and Redis by setting the env vars.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERSTREAM_", env_file=".env", extra="ignore",
                                      populate_by_name=True)

    # Kafka (any Kafka-protocol broker)
    # Unset: the local stack's broker (127.0.0.1:<broker_port>).
    kafka_bootstrap: str = ""
    # Consumer fetch waits (streams/kafka/fetch_wait.py; README "Fetch waits and idle CPU"). Tansu
    # looks for records only at 1/2, 3/4, 7/8... of a fetch's wait and holds the connection
    # meanwhile; Apache Kafka answers as soon as a record arrives. Each empty fetch costs the
    # broker and the client ~0.5-1 ms of CPU.
    # The wait of consumers on the latency path (worker, client replies) while records flow:
    # each hop on Tansu then takes a few ms.
    kafka_fetch_max_wait_ms: int = 10
    # Without a record for this long, such a consumer is idle.
    kafka_idle_after_s: float = Field(default=2.0, gt=0)
    # Idle, and off the latency path (registry follower): fetches this far apart (`wake`) or with
    # this wait (`long-poll`, and the registry follower): ~1 fetch a second per consumer.
    kafka_idle_fetch_max_wait_ms: int = Field(default=1000, ge=0)
    # `wake` (Tansu): an idle consumer polls once per idle wait with no fetch outstanding between,
    # and clients wake it when they send (the reply consumer directly, workers through Redis), so
    # a request after a quiet spell is not held by a long poll. `long-poll` (Apache Kafka): idle
    # consumers long-poll and the broker answers when a record arrives; no wakes are sent.
    kafka_idle_mode: Literal["wake", "long-poll"] = "wake"
    # A worker that stops heartbeating leaves its consumer group after this long. Apache Kafka
    # refuses less than its `group.min.session.timeout.ms` (6 s by default); Tansu delays a new
    # group's first join by about half of it.
    kafka_session_timeout_s: float = Field(default=6.0, ge=1, le=300)
    app_id: str = "inferstream"
    topic_prefix: str = "inferstream"
    request_partitions: int = 4
    model_partitions: int = 4
    reply_partitions: int = 4
    result_partitions: int = 4
    deadletter_partitions: int = 1
    # Requests are kept long enough to replay them (7 days).
    request_retention_ms: int = 7 * 24 * 3600 * 1000
    result_retention_ms: int = 7 * 24 * 3600 * 1000
    reply_retention_ms: int = 24 * 3600 * 1000
    deadletter_retention_ms: int = 30 * 24 * 3600 * 1000

    # S3 / MinIO
    s3_endpoint: str = ""  # unset: the local stack's S3 server (127.0.0.1:<s3_port>)
    s3_access_key: str = "inferstream"
    s3_secret_key: str = "inferstream-secret"
    s3_bucket: str = "inferstream"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    # Buckets a caller's s3:// references (inputs_ref, batch inputs) may name; empty: only
    # `s3_bucket`. Outside them a reference is refused (FORBIDDEN), whatever the credentials reach.
    s3_caller_buckets: list[str] = Field(default_factory=list)
    # Buckets a registration's s3:// artifact may name; empty: only `s3_bucket`.
    s3_artifact_buckets: list[str] = Field(default_factory=list)

    # PostgreSQL and Redis
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/inferstream"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Models
    # Relative paths are taken from the working directory at startup (the checkout, for the
    # local stack; the image sets both).
    model_repository: Path = Path("models/repository")
    models: list[str] = Field(default_factory=list, description="models to serve; empty = all built")
    onnx_intra_op_threads: int = 0  # 0 = onnxruntime's default (one per core)
    # onnxruntime's CPU memory arena keeps the largest call's activations for reuse: ~70 MB for
    # ResNet18 at onnx_cpu_max_rows 8 (~250 MB at 32 rows). Off, it saves those and costs CPU per
    # image: +0-9% ResNet18, +50-70% EfficientNet-Lite0 (bench/README.md, onnxruntime options).
    onnx_cpu_mem_arena: bool = True
    # Intra-op threads that spin while they wait take cores the broker, client and other
    # threads need on a small shared box; off, they sleep.
    onnx_allow_spinning: bool = False
    # Rows per onnxruntime call on the CPU provider (0: the model's max_batch_size). More rows
    # gain nothing on CPU (ResNet18: the same img/s at 8 and 32) while a call's activations grow
    # with them (~190 MB at 32 rows, ~50 MB at 8): a worker's batch runs as calls of this many.
    onnx_cpu_max_rows: int = Field(default=8, ge=0)
    registry_cache_ttl_s: int = 60

    # Micro-batching and flow control
    max_batch_size: int = 32
    max_batch_delay_ms: float = 5.0
    max_inflight: int = 512
    take_max: int = 512  # events pulled from a stream per agent step

    # Payloads: tensor bundles larger than this travel by S3 reference (claim check).
    claim_check_bytes: int = 256 * 1024
    max_message_bytes: int = 4 * 1024 * 1024
    deadletter_inline_bytes: int = 256 * 1024  # dead-lettered originals over this are stored in S3

    # Sink
    sink_batch_size: int = 500
    sink_max_delay_ms: float = 200.0

    # Local stack
    state_dir: Path = Path(".inferstream")
    broker_port: int = 9092
    s3_port: int = 9000
    broker_storage: str = "s3"  # "s3" (durable, on the S3 server) or "memory"

    # Clients and the HTTP bridge
    produce_timeout_s: float = 3.0  # a broker that takes longer is reported as unavailable
    bridge_host: str = "127.0.0.1"
    # With auth off, the bridge binds only a loopback address unless this says otherwise (a
    # network that is itself the boundary): anyone who reaches it could change the registry.
    bridge_open_without_auth: bool = False
    bridge_port: int = 8000
    bridge_instance: str = ""  # names the bridge's own reply topic; unset: random per process
    bridge_timeout_s: float = 30.0  # default request deadline
    bridge_max_body_bytes: int = 64 * 1024 * 1024
    bridge_max_elements: int = 16_000_000
    bridge_max_json_depth: int = 32
    batch_max_items: int = 100_000
    batch_rate: float = 200.0  # items per second fanned out per batch, by default
    batch_timeout_s: float = 3600.0  # a batch not complete by then is marked incomplete

    # Auth and rate limits (the intake's gatekeeping stage)
    auth_required: bool = False  # False: requests without credentials pass as tenant "anonymous"
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["HS256", "RS256"])
    jwt_hs_secret: str = ""
    jwt_public_key: str = ""  # PEM text, or a path to a PEM file
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_s: float = 0.0
    jwt_require_exp: bool = True  # False: tokens without an `exp` claim are accepted (never expire)
    api_key_pepper: str = "inferstream-dev-pepper"
    api_key_cache_ttl_s: float = 30.0
    rate_limit_per_minute: int = 100  # per authenticated tenant; overridable per tenant
    rate_limit_fail_open: bool = False  # when Redis is unreachable: refuse (default) or admit

    # Internal events (model topics, results, batch commands, registry records) carry a seal: an
    # HMAC under this secret, shared by every worker, bridge and CLI of a deployment. Consumers
    # serve only events whose seal opens. Set a long random value in production.
    cluster_secret: str = "inferstream-dev-cluster-secret"
    # reply_to must name an existing topic; the topic list is cached this long (a name not in it
    # triggers a refresh, at most once per `reply_topics_refresh_s`).
    reply_topics_cache_s: float = 30.0
    reply_topics_refresh_s: float = 1.0

    # Backends
    triton_timeout_s: float = 10.0
    triton_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost"])  # where backends may be
    breaker_failures: int = 3  # consecutive failures that open a backend's breaker
    breaker_cooldown_s: float = 5.0  # before a half-open probe

    # Worker
    worker_web_port: int = 6066
    # > 0: the worker serves its Prometheus metrics on this port's /metrics (KEDA scales on the
    # consumer lag there); with `--workers N` each process takes the next port.
    metrics_port: int = 0
    # Where /metrics and /healthz listen: loopback unless a scraper or probe comes from outside
    # (the images set 0.0.0.0).
    metrics_host: str = "127.0.0.1"
    # Only one worker of a group needs to export the group's consumer lag.
    metrics_lag: bool = True
    # `worker --workers N` restarts a worker that died, unless it died more often in a minute.
    worker_restarts_per_minute: int = Field(default=5, ge=0)
    # A live worker refreshes its heartbeat in Redis (and writes its model statistics) this often;
    # the heartbeat expires after three intervals, so a dead worker stops counting as ready then.
    heartbeat_interval_s: float = Field(default=2.0, gt=0, le=60)

    # Logs and traces
    log_level: str = "info"
    log_format: Literal["json", "text"] = "json"
    # The share of traces whose requests get one line per stage, with their request and trace
    # ids: 1 all, 0.01 one in a hundred (picked by trace id: a trace is logged whole), 0 none.
    # Sampled by default: a line per request and stage costs more CPU than the rest of a tiny
    # model's request.
    log_requests: float = Field(default=0.01, ge=0.0, le=1.0)
    # OTLP/HTTP collector (e.g. http://jaeger:4318); unset: trace context is still carried in
    # Kafka headers and logs, but no span is exported. OTEL_EXPORTER_OTLP_ENDPOINT works too.
    otlp_endpoint: str = Field(
        default="", validation_alias=AliasChoices("INFERSTREAM_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    )
    # Total lag one worker is expected to carry; `inferstream lag` suggests workers from it.
    scale_lag_per_worker: int = 5000

    @model_validator(mode="after")
    def _local_stack_endpoints(self) -> Settings:
        self.kafka_bootstrap = self.kafka_bootstrap or f"127.0.0.1:{self.broker_port}"
        self.s3_endpoint = self.s3_endpoint or f"127.0.0.1:{self.s3_port}"
        # Absolute, so that the processes this one starts in other directories read the same.
        self.model_repository = self.model_repository.absolute()
        self.state_dir = self.state_dir.absolute()
        return self


# Bytes of a secret below which it is taken for a placeholder: a random 32-byte value is the
# least an HMAC key (JWT HS256, API key pepper) should have.
MIN_SECRET_BYTES = 32
# Parts of the values that examples and templates use; compared without case and punctuation.
PLACEHOLDER_MARKS = ("changeme", "placeholder", "replaceme", "example", "inferstreamdev")


def placeholder_reason(value: str) -> str | None:
    """Why `value` cannot be a real secret (empty, too short, a template's marker), or None."""
    if not value:
        return "is empty"
    if len(value.encode()) < MIN_SECRET_BYTES:
        return f"is shorter than {MIN_SECRET_BYTES} bytes"
    folded = "".join(ch for ch in value.lower() if ch.isalnum())
    mark = next((m for m in PLACEHOLDER_MARKS if m in folded), None)
    return f"looks like a placeholder ({mark!r})" if mark else None


def refuse_placeholder_secrets(settings: Settings) -> None:
    """With auth required, a known or guessable JWT secret lets anyone forge tokens and a known
    pepper weakens every stored API key hash: a worker or bridge refuses to start with one. An
    empty JWT secret passes where a public key verifies the tokens (RS256 only)."""
    if not settings.auth_required:
        return
    problems = []
    jwt_reason = placeholder_reason(settings.jwt_hs_secret)
    if settings.jwt_hs_secret or not settings.jwt_public_key:
        problems += [f"INFERSTREAM_JWT_HS_SECRET {jwt_reason}"] if jwt_reason else []
    pepper_reason = placeholder_reason(settings.api_key_pepper)
    problems += [f"INFERSTREAM_API_KEY_PEPPER {pepper_reason}"] if pepper_reason else []
    if problems:
        raise ValueError(f"auth is required but {' and '.join(problems)}: set a random value of at least "
                         f"{MIN_SECRET_BYTES} bytes (e.g. `openssl rand -base64 48`)")


@lru_cache
def get_settings() -> Settings:
    return Settings()
