"""Typed configuration: one pydantic model per component, all gathered in `RecConfig`.

Every field has a default that runs on a 2-core laptop and a description; unknown keys are
errors (`extra="forbid"`) so a typo in a YAML file never passes silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EventLogConfig(_Config):
    segment_max_records: int = Field(
        500_000, gt=0, description="Records per segment file before a new one is started."
    )
    tail_cache_records: int = Field(
        200_000,
        gt=0,
        description="Newest records kept in memory to serve followers without disk reads.",
    )
    tokens_kept: int = Field(
        100_000,
        gt=0,
        description="Append tokens (request ids) remembered in memory while the writer runs, "
        "so a caller's retry of an acknowledged append is not written twice; a restarted "
        "writer knows those of its active segment.",
    )
    max_batch_events: int = Field(
        10_000, gt=0, description="Largest batch accepted by one POST /events call."
    )
    retention_max_age_s: float | None = Field(
        None,
        gt=0,
        description="Retention by event time: behaviour records (events, impressions) of a "
        "sealed segment whose newest event is older than this are removed, once every kept "
        "checkpoint is past the segment. Catalogue records and tombstones are kept. None: "
        "kept forever.",
    )
    retention_max_bytes: int | None = Field(
        None,
        gt=0,
        description="Retention by size: while the log is larger than this, the behaviour "
        "records of its oldest sealed segments are removed (same rules as by age). None: no "
        "bound.",
    )


class ProfileConfig(_Config):
    max_recent: int = Field(
        200, gt=0, description="Recent interactions kept per user (the sequence)."
    )
    tag_half_life_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="Half-life of interest-tag weights, in seconds of event time.",
    )
    type_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "view": 1.0,
            "click": 2.0,
            "add_to_cart": 3.0,
            "purchase": 4.0,
            "rating": 1.0,
            "like": 3.0,
            "share": 3.0,
            "skip": -1.0,
            "dislike": -2.0,
        },
        description="Interaction strength per event type; negative types push the user away.",
    )
    rating_center: float = Field(
        3.0, description="A rating event's weight is value - rating_center (scaled to ±2 at most)."
    )


class RecallConfig(_Config):
    similarity: Literal["cosine", "pearson"] = Field(
        "cosine", description="Similarity for item-based and user-based CF."
    )
    itemcf_neighbors: int = Field(50, gt=0, description="Neighbours kept per item in item-CF.")
    usercf_neighbors: int = Field(50, gt=0, description="Similar users consulted in user-CF.")
    shrinkage: float = Field(
        10.0, ge=0, description="Similarity shrinkage toward 0 for small overlaps."
    )
    embedding_dim: int = Field(64, gt=0, description="Dimension of the item/user embeddings.")
    embedding_reg: float = Field(
        0.05, ge=0, description="Ridge regulariser λ of the embeddings' ALS (implicit's scale)."
    )
    gf_dim: int = Field(
        448, gt=0, description="Singular vectors in the graph filter's ideal low-pass."
    )
    gf_alpha: float = Field(
        0.2, ge=0, description="Weight of the ideal low-pass in the graph filter."
    )
    gf_sharpen: float = Field(
        0.0,
        ge=0,
        description="Graph filter (BSPM) sharpening time T when training cannot choose it on held-out data.",
    )
    gf_dense_max_items: int = Field(
        4096,
        ge=0,
        description="Largest catalogue whose graph filter training tabulates as a dense "
        "items² matrix (4096 items: 64 MB per model); larger ones are served factored "
        "(gf_neighbors, gf_rank, gf_candidates); 0 factors every catalogue.",
    )
    gf_neighbors: int = Field(
        512,
        gt=0,
        description="Factored graph filter: neighbours kept per item in its sparse "
        "item-item part (memory: items × this × 8 bytes).",
    )
    gf_rank: int = Field(
        448,
        gt=0,
        description="Factored graph filter: rank of its low-rank part (at most twice "
        "gf_dim; memory: items × this × 8 bytes).",
    )
    gf_candidates: int = Field(
        1000,
        gt=0,
        description="Factored graph filter: a request's candidates (the best by "
        "neighbour sum) that are scored in full before its top items are taken.",
    )
    ease_l2: float = Field(500.0, gt=0, description="EASE ridge regulariser λ.")
    ease_max_items: int = Field(
        20_000,
        ge=0,
        description="Largest catalogue the EASE source is fitted for (a dense items² "
        "matrix: 20k items take 1.6 GB); 0 turns it off.",
    )
    index: Literal["auto", "hnsw", "brute"] = Field(
        "auto",
        description="Index serving the embeddings: exact search ('brute'), HNSW, or "
        "'auto': exact up to `brute_max_items` catalogue items, HNSW beyond.",
    )
    brute_max_items: int = Field(
        20_000,
        ge=0,
        description="Largest catalogue 'auto' searches exactly. One query (64 dims, "
        "k 100, one thread) took 0.07 ms exact against 0.17 ms in HNSW at 1k items, 0.36 "
        "against 0.30 at 20k and 1.4 against 0.48 at 50k.",
    )
    hnsw_m: int = Field(16, gt=1, description="HNSW graph degree (M).")
    hnsw_ef_construction: int = Field(200, gt=0, description="HNSW build-time candidate list.")
    hnsw_ef_search: int = Field(256, gt=0, description="HNSW query-time candidate list.")
    index_headroom: int = Field(
        10_000,
        ge=0,
        description="Free slots pre-allocated in the index for items added while serving.",
    )
    per_source: int = Field(100, gt=0, description="Candidates asked from each recall source.")
    recent_for_itemcf: int = Field(
        20, gt=0, description="Most recent items that seed item-CF recall."
    )
    trending_half_life_s: float = Field(
        86400.0, gt=0, description="Half-life of the trending counter, in seconds of event time."
    )

    def index_kind(self, n_items: int) -> Literal["hnsw", "brute"]:
        """The index serving a catalogue of n_items: `index`, with 'auto' resolved."""
        if self.index == "auto":
            return "brute" if n_items <= self.brute_max_items else "hnsw"
        return self.index


class RankerConfig(_Config):
    item_embedding_dim: int = Field(
        0, ge=0, description="Learned item-id embedding size (0: none)."
    )
    hidden: list[int] = Field(
        default_factory=lambda: [128, 64], description="MLP hidden layer sizes."
    )
    dropout: float = Field(0.3, ge=0, lt=1, description="Dropout between MLP layers.")
    epochs: int = Field(8, gt=0, description="Training epochs over the assembled examples.")
    batch_size: int = Field(1024, gt=0, description="Training mini-batch size.")
    learning_rate: float = Field(2e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(1e-6, ge=0, description="Adam weight decay.")
    negatives: int = Field(
        16,
        gt=0,
        description="Negatives per training positive, drawn from the same answer's recall candidates.",
    )
    max_examples: int = Field(
        8_000,
        gt=0,
        description="Cap on training positives (spread evenly over the held-out events).",
    )
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu' or 'cuda[:N]'.")
    seed: int = Field(0, description="Seed for initialisation, sampling and shuffling.")


class AggregateConfig(_Config):
    default_k: int = Field(10, gt=0, description="Items returned when the request gives no k.")
    max_k: int = Field(200, gt=0, description="Largest k a request may ask for.")
    candidates: int = Field(300, gt=0, description="Merged candidates passed to the ranker.")
    explore_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of the list given to fresh/trending items (exploration).",
    )
    max_per_category: int | None = Field(
        None,
        gt=0,
        description="Diversity rule: at most this many items of one category (None: off).",
    )


class TrainConfig(_Config):
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="CPUs reserved per Train worker; keep the sum below what Serve leaves.",
    )
    use_gpu: bool = Field(False, description="Train on GPUs (Ray Train workers ask for one each).")
    worker_threads: int = Field(
        1,
        gt=0,
        description="Threads a Train worker computes with: torch's, and the embeddings' ALS "
        "(which would otherwise take every core of the node, next to the replicas).",
    )
    min_events: int = Field(10, ge=0, description="Retrain refuses to run on fewer events.")
    holdout: Literal["last", "random"] = Field(
        "last",
        description="Ranker examples: each user's last events, or a random share "
        "(for data whose order is not time).",
    )
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each user's events held out."
    )
    keep_versions: int = Field(
        3,
        ge=1,
        description="Model versions kept on disk; older ones (never the published one) are "
        "deleted after each retrain, with their Ray Train run folders.",
    )
    every_s: float | None = Field(
        3600.0,
        gt=0,
        description="Retrain periodically at this interval, when min_new_records have "
        "arrived since the served version's log offset (None: on demand only).",
    )
    min_new_records: int = Field(
        1000,
        ge=1,
        description="Records since the served version that a periodic retrain waits for.",
    )


class CheckpointConfig(_Config):
    every_s: float | None = Field(
        60.0,
        gt=0,
        description="How often the trainer checkpoints the live state (None: only before "
        "each retrain). Replicas start and swap models from the newest usable checkpoint and "
        "apply only the log records after it.",
    )
    min_records: int = Field(
        10_000,
        ge=1,
        description="A periodic checkpoint is skipped until the log holds this many records "
        "past the newest one.",
    )
    keep: int = Field(3, ge=1, description="Checkpoints kept on disk; older ones are deleted.")


class ServingConfig(_Config):
    topology: Literal["fused", "split"] = Field(
        "fused",
        description="'fused': one ingress deployment runs every stage in process (fewest hops); "
        "'split': Aggregator -> Profile -> Recall -> Ranker deployments.",
    )
    ann_shards: int = Field(
        0, ge=0, description="HNSW shard actors for the embedding index; 0 keeps it in process."
    )
    max_body_bytes: int = Field(4_000_000, gt=0, description="Largest accepted request body.")
    reload_poll_s: float = Field(1.0, gt=0, description="How often replicas check for a new model.")
    accept_unknown_items: bool = Field(
        True, description="Accept events on items not in the catalogue (the catalogue grows)."
    )
    ranker_num_gpus: float = Field(
        0.0, ge=0, description="GPUs per ranker replica (split topology)."
    )
    ranker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each ranker replica asks for (split topology), e.g. "
        "{'ranker_gpu': 1} where the GPU node type declares ranker_gpu: 1, so rankers run "
        "there alone; beside ranker_num_gpus, or in its place where a custom resource stands "
        "in for the GPU (the cluster tests).",
    )
    replica_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources every other Serve replica (ingress, profile, recall) "
        "and every index shard actor asks for, e.g. {'rec_worker': 0.01} where the CPU "
        "worker nodes declare rec_worker: they then stay off the head node, which runs the "
        "event log, the trainer and the HTTP proxy. Empty: any node.",
    )
    max_replicas_per_node: int | None = Field(
        None,
        gt=0,
        description="At most this many replicas of the ingress, profile and recall deployments "
        "each on one node (Serve's max_replicas_per_node): 1 spreads them, so the loss of a "
        "node leaves a replica of each serving elsewhere. None: no limit.",
    )
    replica_cpus: float = Field(0.25, gt=0, description="num_cpus reserved per Serve replica.")
    max_streams: int = Field(
        1000,
        ge=0,
        description="Open GET /stream connections per replica of the stream app; beyond it a "
        "new one is answered 503.",
    )
    health_check_period_s: float = Field(
        2.0,
        gt=0,
        description="How often Serve runs every replica's health check: a replica that died "
        "or reports a broken log follower or model is replaced, and no longer routed to, "
        "within about this long (Serve's own default is 10 s).",
    )
    log_impressions: bool = Field(
        True, description="Append what each /recommend showed to the log (training feedback)."
    )


Scope = Literal["read", "events", "catalog", "admin"]


class ApiKey(_Config):
    name: str = Field(min_length=1, description="Who holds the key (logs, 403 and 429 answers).")
    key: str = Field(min_length=16, description="The secret, sent in the X-API-Key header.")
    scopes: list[Scope] = Field(
        min_length=1,
        description="read: recommendations and lookups; events: POST /events; catalog: POST "
        "and DELETE /items; admin: DELETE /users, retrains, /admin (and every other scope).",
    )
    rate_per_s: float | None = Field(
        None, gt=0, description="This key's request rate per replica (None: access.rate_per_s)."
    )
    burst: float | None = Field(None, ge=1, description="This key's burst (None: access.burst).")


class AccessConfig(_Config):
    """API keys. With none configured, `rec serve` takes REC_API_KEY as the admin key, or
    generates one at first start under data_dir (loopback only)."""

    keys: list[ApiKey] = Field(default_factory=list, description="The keys and their scopes.")
    open_reads: bool = Field(
        True, description="Reads (/recommend, /similar, /items/{id}, /models) need no key."
    )
    rate_per_s: float | None = Field(
        None,
        gt=0,
        description="Requests a second per key and ingress replica (token bucket; 429 with "
        "Retry-After beyond it); None: unlimited.",
    )
    burst: float = Field(100.0, ge=1, description="Requests a key may send at once.")

    def with_admin(self, key: str) -> AccessConfig:
        """This config with `key` as its one key, an admin key."""
        return self.model_copy(update={"keys": [ApiKey(name="admin", key=key, scopes=["admin"])]})


class RecConfig(_Config):
    """Everything one rec deployment needs; loadable from and dumpable to YAML."""

    data_dir: Path = Field(Path("var"), description="Where the event log and model versions live.")
    seed: int = Field(0, description="Global seed.")
    eventlog: EventLogConfig = Field(default_factory=EventLogConfig, description="Event log.")
    profile: ProfileConfig = Field(default_factory=ProfileConfig, description="User profiles.")
    recall: RecallConfig = Field(default_factory=RecallConfig, description="Recall sources.")
    ranker: RankerConfig = Field(default_factory=RankerConfig, description="Ranking model.")
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig, description="Final list.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Retraining job.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Serve graph.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoints of the live state."
    )
    access: AccessConfig = Field(default_factory=AccessConfig, description="API keys.")

    @property
    def log_dir(self) -> Path:
        return Path(self.data_dir) / "log"

    @property
    def model_dir(self) -> Path:
        return Path(self.data_dir) / "models"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.data_dir) / "checkpoints"

    @classmethod
    def from_yaml(cls, path: str | Path) -> RecConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """docs/configuration.md: every RecConfig field with its type, default and description,
    from the models themselves (`python -m rec.config > docs/configuration.md`; a test fails
    when the file is stale)."""
    out = [
        "# Configuration",
        "",
        "Generated from `rec/config.py` by `python -m rec.config > docs/configuration.md`; do "
        "not edit by hand (tests/unit/test_project_files.py fails when it is stale).",
        "",
        "`rec serve --config FILE` and `serve deploy` (`args.config`) read a YAML file of these "
        "sections; a missing key takes its default, an unknown key is an error. "
        "`configs/rec.yaml` lists every default.",
        "",
    ]
    defaults = RecConfig()
    top = [(n, f) for n, f in RecConfig.model_fields.items() if not _is_section(f.annotation)]
    out += _table("Top level", RecConfig, top, defaults)
    for name, field in RecConfig.model_fields.items():
        if _is_section(field.annotation):
            model = field.annotation
            rows = list(model.model_fields.items())
            out += _table(f"`{name}`: {field.description}", model, rows, getattr(defaults, name))
    return "\n".join(out)


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, _Config)


def _table(title: str, model: type[BaseModel], rows, values) -> list[str]:
    out = [f"## {title}", "", "| key | type | default | what |", "|---|---|---|---|"]
    for name, field in rows:
        default = getattr(values, name)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        elif isinstance(default, list) and default and isinstance(default[0], BaseModel):
            default = [d.model_dump(mode="json") for d in default]
        a = field.annotation
        kind = a.__name__ if isinstance(a, type) else str(a).replace("typing.", "")
        for prefix in ("rec.config.", "__main__.", "pathlib."):
            kind = kind.replace(prefix, "")
        kind = kind.replace("|", "\\|")
        shown = json.dumps(default, default=str).replace("|", "\\|")
        what = (field.description or "").replace("|", "\\|")
        out.append(f"| `{name}` | {kind} | `{shown}` | {what} |")
    return [*out, ""]


if __name__ == "__main__":
    print(reference_markdown())
