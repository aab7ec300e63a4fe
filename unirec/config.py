"""Typed schemas of every config group.

Defaults and field documentation live here only; YAML under ``conf/`` overrides them. Registering the
schemas with Hydra's ConfigStore makes a misspelt key or a wrong type fail at compose time, naming the key.
"""

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from unirec.data.movielens import MovieLensConfig
from unirec.data.synthetic_config import SyntheticConfig


class LabelSource(str, Enum):
    """Where a task's negatives come from."""

    impressions = "impressions"
    """Logged impressions: unclicked rows of a logged slate are the negatives."""
    positives = "positives"
    """Only engagements are logged: negatives are sampled from the candidate catalogue."""


class MixStrategy(str, Enum):
    """How the loader mixes tasks within a batch."""

    natural = "natural"
    uniform = "uniform"
    temperature = "temperature"
    weights = "weights"


class Objective(str, Enum):
    """A task's training loss (unirec/losses.py)."""

    bce = "bce"
    """Pointwise binary cross-entropy on every logged row: for tasks with logged impressions."""
    softmax = "softmax"
    """Sampled softmax of each positive against in-batch candidates, log-Q corrected."""
    bpr = "bpr"
    """Bayesian personalised ranking: each positive above each in-batch candidate (pairwise)."""


@dataclass
class FieldConfig:
    """One feature field: its kind and how its vocabulary is built."""

    kind: str = "categorical"
    """A kind of unirec/kinds.py (KINDS): categorical (one id), tokens (text split into a bag of tokens),
    dense (a float) or sequence (an ordered list of ids), or one registered with unirec.kinds.register."""
    column: Optional[str] = None
    """Source column in a candidate table (candidate fields only; context fields come from adapters)."""
    min_count: int = 1
    """Values seen fewer times than this in train map to the out-of-vocabulary index."""
    hash_buckets: int = 0
    """If > 0, skip the vocabulary and hash values into this many buckets (for huge fields)."""
    max_len: int = 8
    """Tokens kept per bag (token fields), most recent ids kept (sequence fields)."""
    table: Optional[str] = None
    """Embedding table (and vocabulary) the field reads; null: its own. Fields naming one table share it,
    e.g. ``source_item: {kind: categorical, table: item}`` reads the candidate item id's table."""

    def __post_init__(self) -> None:
        from unirec.kinds import kind_of

        kind_of(self.kind)  # an unknown kind fails at compose time, listing the known ones


@dataclass
class AdapterConfig:
    """How one canvas's raw log maps to the unified schema, and how it is cleaned."""

    source: str = "???"
    """Raw dataset: a directory name under the data set's raw directory, or an absolute path."""
    request: str = "???"
    """Raw column identifying one request (one slate)."""
    candidate: str = "???"
    """Raw column holding the candidate id."""
    label: Optional[str] = None
    """Raw column holding the 0/1 engagement; null for positives-only logs."""
    timestamp: str = "???"
    """Raw column holding the request time."""
    timestamp_unit: str = "s"
    """Unit of the timestamp column: s, ms, or iso (ISO-8601 text)."""
    context: Dict[str, str] = field(default_factory=dict)
    """Unified context field -> raw column."""
    drop_duplicates: bool = True
    """Reject exact duplicate rows of the same request and candidate (reason: duplicate)."""
    order: Optional[str] = None
    """Raw column ordering events within one second (int), carried as ``event_order``: the history join's
    tie-break (data.history.order names the same order in the engagements source)."""


@dataclass
class LabelConfig:
    """How a task's examples are labelled."""

    source: LabelSource = LabelSource.impressions
    """impressions (logged slates) or positives (negatives sampled)."""
    negatives: int = 4
    """Sampled negatives per positive (positives-only tasks)."""


@dataclass
class TaskConfig:
    """One use case (canvas): its context, labels, weights and metrics."""

    id: int = "???"  # type: ignore[assignment]
    """Stable integer task_type id; never reuse one for a different task."""
    candidate: str = "item"
    """Candidate entity type this task ranks (a key of data.candidates)."""
    context: Dict[str, FieldConfig] = field(default_factory=dict)
    """Context fields this task knows at request time."""
    labels: LabelConfig = field(default_factory=LabelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    sampling_weight: float = 1.0
    """Share of batches for loader.mix=weights."""
    loss_weight: float = 1.0
    """Multiplier of this task's loss in the total."""
    loss: Objective = Objective.bce
    """bce (pointwise, every logged row), softmax (each positive against ``loss.negatives`` candidates of
    the task's other rows in the batch, log-Q corrected for how often each candidate is drawn) or bpr
    (pairwise, against the same candidates). softmax and bpr need no logged negatives, but use them as
    in-batch candidates when the log has them."""
    borrow: List[str] = field(default_factory=list)
    """Other tasks whose train rows also train this task's head, each posed as a request of this task: the
    fields this task's context has keep their values, the rest take their sentinels (unirec/data/borrowing.py).
    They must rank the same candidate type and share a context field with it. Training only: this task's
    validation, evaluation and serving are unchanged. A lender the run does not train is skipped, logged."""
    train_rate: float = 1.0
    """Fraction of this task's train requests kept (stratified down-sampling)."""
    max_train_requests: Optional[int] = None
    """Cap on this task's train requests after train_rate; null keeps all."""
    metrics: List[str] = field(default_factory=lambda: ["auc", "ndcg@10", "recall@10", "mrr"])
    """Valid metrics: auc, ndcg@K, recall@K, mrr."""
    impute: Dict[str, str] = field(default_factory=dict)
    """Context-aware imputation: a unified context field this task lacks -> where its value comes from,
    either another of the task's context fields (``query: genre``) or a candidate feature of the id held
    in one (``query: source_item.item_title``: the title of the source item). Applied alike in training,
    evaluation and serving while data.impute is true; a field with no rule keeps its sentinel."""


@dataclass
class CandidateConfig:
    """A candidate entity type and the table its features come from."""

    table: str = "???"
    """Parquet file under the raw directory (or absolute path) with one row per candidate."""
    key: str = "???"
    """Id column of the table."""
    fields: Dict[str, FieldConfig] = field(default_factory=dict)
    """Candidate feature fields; the one whose column is the key is the candidate id field."""


@dataclass
class SplitConfig:
    """Time-based split fractions, by request time within each task."""

    valid: float = 0.1
    test: float = 0.1


@dataclass
class HistoryConfig:
    """The user's history: a ``sequence`` context field joined point-in-time in preparation.

    Every task whose context has ``key`` gets the field; the others get its sentinel. A row's history is
    the key's engagements that precede the row: strictly earlier in time, or at the same second and earlier
    in ``order`` where both sides have one (unirec/data/history.py)."""

    enabled: bool = False
    field: str = "history"
    """Name of the context field."""
    key: str = "user"
    """Context field whose value identifies whose history it is."""
    max_len: int = 50
    """Most recent engagements kept."""
    table: str = "item"
    """Table of the engaged ids: the candidate id field whose ids the history holds (it shares its table)."""
    source: Optional[str] = None
    """Raw file of engagements (under the raw directory, or absolute) with columns ``user``, ``item``,
    ``timestamp`` and optionally ``order`` below; null: the positives of every task whose context has
    ``key`` and whose candidates carry ``table``'s ids."""
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    order: Optional[str] = None
    """Tie-break column within one second (present in the source and in the tasks' logs, e.g. event_order)."""


class ValidProtocol(str, Enum):
    """How training validates (unirec/validation.py)."""

    sampled = "sampled"
    """Each valid request's logged candidates (MovieLens: the positive and 100 never-seen items)."""
    full = "full"
    """Each valid request's positive against its whole catalogue, minus the user's train items."""


class Engine(str, Enum):
    """What runs preparation (unirec/data/prepare.py)."""

    local = "local"
    """One process, pyarrow only, bounded memory (hash-partitioned spill to parquet)."""
    spark = "spark"
    """Apache Spark (the ``spark`` extra and Java): the same Arrow steps through mapInArrow."""


@dataclass
class SparkConfig:
    """The Spark session of ``data.engine=spark`` (unirec/data/engine_spark.py). Where and how preparation
    runs, never what it prepares: not part of the prepared data's key."""

    master: Optional[str] = "local[*]"
    """``spark.master``: local[N] on one machine; null under ``spark-submit``, whose ``--master`` then holds
    (a master set here would override it)."""
    shuffle_partitions: int = 16
    """``spark.sql.shuffle.partitions``: partitions of every shuffle (dedupe, split, history, counts)."""
    driver_memory: str = "2g"
    """``spark.driver.memory`` (with master local[N] the executors live in the driver's JVM)."""
    conf: Dict[str, str] = field(default_factory=dict)
    """Any other Spark settings, e.g. ``{spark.hadoop.fs.s3a.endpoint: ...}``."""


@dataclass
class DataConfig:
    """Which data set, where it is cached, and how it is split."""

    name: str = "synthetic"
    """Data set: synthetic (generated) or raw (logs already on disk under raw_dir)."""
    cache_dir: Optional[str] = None
    """Where prepared data sets are kept; null uses $UNIREC_CACHE or ~/.cache/unirec."""
    raw_dir: Optional[str] = None
    """Raw logs for name=raw; ignored for synthetic (generated into the cache)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    movielens: MovieLensConfig = field(default_factory=MovieLensConfig)
    """How the MovieLens-100K canvases are derived (data=movielens)."""
    split: SplitConfig = field(default_factory=SplitConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    candidates: Dict[str, CandidateConfig] = field(default_factory=dict)
    rows_per_file: int = 262_144
    """Rows per feature shard file (the local engine's; Spark writes a file per batch of its partitions)."""
    engine: Engine = Engine.local
    """What runs preparation: local (pyarrow, bounded memory) or spark. Both prepare the same rows, so the
    engine is not part of the prepared data's key (tests/integration/test_spark_engine.py checks it)."""
    partition_rows: int = 500_000
    """Rows per hash partition of the local engine's out-of-core steps: its memory is a few partitions."""
    spark: SparkConfig = field(default_factory=SparkConfig)
    max_future_s: Optional[int] = 86_400
    """Horizon of plausible event times: a row dated later than the preparation's start plus this many
    seconds is rejected as ``bad_timestamp`` (a clock or unit error, not a future event). The start is read
    once per preparation, so one preparation applies one bound; the key of the prepared data holds this
    rule, not the time, so the cache is reused across runs. null: no upper bound."""
    impute: bool = False
    """Apply the tasks' imputation rules (task.<name>.impute); false leaves every missing field missing.
    The synthetic data set turns it on (conf/data/synthetic.yaml); MovieLens leaves it off: the ablation
    reports (reports/*/ablations.md) show it helping every synthetic task and hurting three MovieLens ones."""


@dataclass
class ModelConfig:
    """Shape of the multi-task ranker; input sizes come from feature_spec.json, never from here."""

    embedding_dim: int = 16
    """Width D of every field embedding."""
    hidden_dim: int = 64
    """Width H of the context and candidate encoders and of the shared tower."""
    tower: str = "cross"
    """Tower between interaction and heads: cross, mlp, dcn_v2, mmoe, ple or task_conditioned
    (unirec/model/towers.py)."""
    tower_layers: int = 2
    """Blocks of cross and task_conditioned, layers of mlp, cross and deep layers of dcn_v2; CGC levels of ple."""
    experts: int = 4
    """Experts of mmoe; ple uses experts // 4 per task and experts // 2 shared per level."""
    expert_dims: List[int] = field(default_factory=list)
    """Layer widths of each mmoe expert (e.g. [256, 128]; the heads then read the last one); empty: two
    layers of the tower's input width 3H, the only shape ple takes."""
    head_hidden: int = 32
    """Hidden width of each per-task head."""
    dropout: float = 0.0
    sequence_pooling: str = "attention"
    """Pooling of sequence fields (the history): mean, attention (target-aware, DIN-style, every position's
    recency in its key and value; the context slot pooled by one learned query) or transformer (causal
    self-attention, SASRec-style; the last position is the user's state). unirec/model/pooling.py.
    attention is the default: the best or tied on most tasks of both data sets (reports/ml100k/history.md,
    BENCHMARKS.md); transformer was slower and weaker in a first MovieLens probe."""
    sequence_layers: int = 1
    """Blocks of the transformer pooling."""
    sequence_heads: int = 2
    """Attention heads of the transformer pooling (must divide embedding_dim)."""
    dot_product: bool = False
    """Add ``<c, v> / sqrt(H)`` of the context and candidate vectors to every head's logit: the term a
    full-catalogue softmax trains cheaply (``loss.catalogue``)."""
    transitions: bool = False
    """Add the item-transition prior ``w_k * log(1 + s)`` to the logit of every task whose context has a
    history over its candidates' id table: s is what followed the request's recent items in the train
    engagements, counted once before training and kept in the weights; w_k is one weight per task
    (``transitions_fit``; unirec/model/transitions.py)."""
    transitions_fit: str = "valid"
    """How the per-task weights w_k are fitted: valid (the network trains without the prior; at every
    validation each w_k is set to the value of a small grid that ranks the valid split best, in full
    ranking, and kept in that checkpoint) or learned (w_k trained by gradient with the network, from 1;
    a training row's own transition left out of its counts)."""
    transitions_window: int = 10
    """K: a later item counts as following when it came at most K events after (weight 1/distance)."""
    transitions_recent: int = 10
    """m: the request's latest history items that vote (weight 1/j for the j-th latest)."""
    transitions_max_rows: int = 20_000
    """Largest id table the prior builds its dense [rows, rows] counts for (4 bytes a cell)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 1e-2
    weight_decay: float = 1e-5
    """AdamW decoupled weight decay (dense parameters)."""
    sparse_embeddings: bool = False
    """Sparse gradients for embedding tables, stepped by SparseAdam (cheap for huge vocabularies)."""
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""


@dataclass
class LossConfig:
    """How the per-task losses combine into the one loss the model trains on (unirec/balancing.py)."""

    balancing: str = "static"
    """static: sum_k loss_weight_k * L_k. uncertainty (Kendall et al. 2018): learned log-variances s_k,
    sum_k loss_weight_k * (exp(-s_k) * L_k + s_k) over the tasks present in the batch. gradnorm (Chen et
    al. 2018): learned weights w_k (sum K), sum_k w_k * L_k, w moved to equalise the tasks' gradient norms
    at the last layer of the shared context encoder (K extra partial backward passes a step)."""
    uncertainty_lr: float = 1e-2
    """Adam learning rate of the log-variances s_k (balancing=uncertainty; constant, no warm-up)."""
    gradnorm_lr: float = 0.025
    """Adam learning rate of the GradNorm weights w_k (balancing=gradnorm)."""
    gradnorm_alpha: float = 1.5
    """GradNorm asymmetry: how strongly a task that trains slower than the others is pulled up (0: equal norms)."""
    negatives: int = 128
    """In-batch candidates per softmax/bpr task and step: rows of the task drawn from the batch (all when
    the batch has fewer), shared by the task's positives. Cost: positives x negatives pair scores."""
    catalogue: float = 0.0
    """Weight of a full-catalogue softmax for softmax tasks: each positive against every candidate of its
    type, scored by the context-candidate dot product (before target-aware attention; ``model.dot_product``
    puts the same term in the logit). Costs one encoding of the catalogue and a [P, H] x [H, C] product a
    step; 0 turns it off. On MovieLens-100K (seed 0, with ``model.dot_product``, weight 1) it lowered test
    home ndcg@10 from 0.091 to 0.081: off by default."""
    logq: bool = True
    """Subtract log q(candidate), the candidate's share of the task's train rows, from softmax logits (the
    sampling-bias correction of Yi et al., 2019), so popular items are not over-penalised as negatives."""


@dataclass
class LoaderConfig:
    """Training batches: size, shuffle and task mixing."""

    batch_size: int = 4096
    mix: MixStrategy = MixStrategy.natural
    """natural (by row count), uniform, temperature (count ** alpha) or weights (task sampling_weight)."""
    alpha: float = 0.5
    """Exponent for mix=temperature: 1 is natural, 0 is uniform."""
    shuffle_buffer: int = 65_536
    """Rows held per task for the bounded shuffle."""
    prefetch: int = 4
    """Batches prepared ahead in a background thread (0: none)."""
    resident: bool = False
    """Hold each task's train rows as tensors on the training device (data that fits on the card)."""


@dataclass
class TrainerConfig:
    """The step loop: length, evaluation, logging, checkpoints and device."""

    max_steps: int = 600
    """Length of the run in optimizer steps (unless ``epochs`` is set)."""
    epochs: Optional[int] = None
    """Length in epochs instead (an epoch: every task's train rows once, ceil(rows / global batch) steps);
    validation and checkpoints then run every ``eval_every_epochs`` epochs, and eval_every and
    checkpoint_every are ignored."""
    eval_every_epochs: int = 1
    """With ``epochs``: validate (and checkpoint) every this many epochs."""
    patience: Optional[int] = None
    """Stop after this many validations in a row without a new best ``best_metric``; null: never stop early."""
    eval_every: int = 200
    log_every: int = 20
    eval_batch_size: int = 16_384
    valid_protocol: ValidProtocol = ValidProtocol.sampled
    """What validation (so the best checkpoint, each task's best step and early stopping) scores: sampled,
    the split's logged candidates, or full, full ranking over each catalogue as ``python -m unirec.evaluate
    --protocol full`` (one score matrix of valid requests x catalogue per task: cheap for catalogues of
    thousands, as MovieLens', costly for millions). Sampled metrics can order checkpoints otherwise than
    full ranking does (Krichene and Rendle, 2020), so pick full when full ranking is what is judged."""
    checkpoint_every: int = 200
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32."""
    progress: bool = True
    """Show progress: a live bar on a terminal, else a plain line every ``progress_every_s`` seconds."""
    progress_every_s: float = 30.0
    """Seconds between plain progress lines when stderr is not a terminal (a captured log)."""
    resume: str = "auto"
    """auto: continue from the run directory's newest complete checkpoint if there is one (set a fixed
    hydra.run.dir for restartable jobs); never: start fresh; or the path of a checkpoint directory."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept (the best one is kept as well)."""
    best_metric: str = "mean/auc"
    """Validation metric that picks the best checkpoint, higher is better: <task or mean>/<metric>. Each
    task's own best step by the same metric is tracked as well (``metrics.json``, the ``best-<task>``
    checkpoint pointer, ``python -m unirec.export RUN --checkpoint best:<task>``)."""
    max_nonfinite: int = 5
    """Consecutive steps with a NaN/Inf loss or gradient (each skipped) after which the run stops."""
    compile: bool = False
    """torch.compile the model (worth it on GPUs for long runs)."""
    keep_freed_memory: bool = True
    """Raise glibc's mmap and trim thresholds (:mod:`unirec.memory`), so a step's large activations reuse
    freed heap blocks instead of page-faulting fresh ones in: on the MovieLens recipe on CPU, minor faults
    per step fell from 5,000-9,000 to about 200-300 (CPU time per step 0-17% lower in three comparisons on
    a busy machine; BENCHMARKS.md). The process keeps its peak working set."""


@dataclass
class AdviseConfig:
    """The consolidation advisor (``python -m unirec.advise``, unirec/advise.py): one short joint run that
    measures how the tasks help or hurt each other, before any unified or bespoke model is trained."""

    fraction: float = 0.1
    """Share of trainer.max_steps (the full run's length) that the advisor trains, with the full run's
    schedule: the first ``ceil(fraction * max_steps)`` steps of that run."""
    skip_steps: Optional[int] = None
    """Steps trained before the first measurement; null: optim.warmup_steps, at most half of the advisor's
    steps. During the warm-up the model
    is near its initialisation and its raw affinities are about ten times those of later steps, with the
    opposite sign for some tasks (a first probe at relatedness 0.0), so they would outweigh the rest."""
    measure_every: int = 1
    """Steps between affinity measurements after skip_steps; each costs K gradients and K lookahead
    forwards (K tasks), about 2K training steps' worth of work."""
    lookahead: str = "sgd"
    """The lookahead step on task i's loss at the shared parameters: ``sgd``, the plain gradient step
    ``theta - lr * grad L_i`` of the TAG paper, or ``adam``, the direction the run's Adam would take
    (``g / (sqrt(v_hat) + eps)`` from its second moments, unirec.advise.adam_direction). An Adam step moves
    every coordinate by about lr: at optim.lr it overshoots (on debug=toy every task's own step raised its
    own loss by 16-43% at lr 0.01), so give it a smaller advise.lookahead_lr (1e-4 there)."""
    lookahead_lr: Optional[float] = None
    """Step size of the lookahead at the shared parameters; null: optim.lr."""
    probe_rows: int = 0
    """0: each lookahead's losses, before and after the step, are those of the batch the step is taken on
    (TAG). N >= 2: they are those of a fixed probe of validation rows, N per task (a softmax or BPR task's:
    up to N/2 positives, the rest other rows for their negatives), drawn once with the run's seed, so the
    affinity reads how a step on one task moves another's held-out loss: the transfer a unified model's test
    figures show, not its fit to the batch. Costs one more forward of the probe per measurement."""
    min_alignment: Optional[float] = None
    """The alignment rule, off by default (null) because it failed its held-out validation. Set, a task
    whose gradients at the embedding table of its candidates are this little aligned with the other tasks'
    (mean linear CKA of the gradients summed over the measured steps, unirec.affinity.alignment) is
    predicted to lose from consolidation and kept bespoke (the grouping is searched over the others), and
    every other task, one without a measured alignment included, to gain unless its verdict is ``loses``.
    0.025 was chosen on the 36 synthetic points of reports/advisor/validation.md (the two losing tasks at
    0.019 and 0.015, every gaining one at 0.031 or more) and then tested on five relatedness values it had
    not seen (reports/advisor/alignment/validation.md): there the alignment of one task moved between runs
    by more than the margin, so it mis-signed a losing task and a gaining one. Keeps two K x rows x dim
    float64 tensors per shared candidate table in host memory (one step's gradients and their sum)."""
    max_group_tasks: int = 6
    """Most tasks the exhaustive grouping search takes (203 groupings at 6, 4,140 at 8)."""
    out_dir: Optional[str] = None
    """Where advice.json, advice.md and advice.png go; null: the Hydra run directory."""

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"advise.fraction must be in (0, 1], got {self.fraction}")
        if self.probe_rows < 0 or self.probe_rows == 1:
            raise ValueError(
                f"advise.probe_rows must be 0 (off) or >= 2 (a sampled task needs a positive and a negative), "
                f"got {self.probe_rows}"
            )
        for key in ("measure_every", "max_group_tasks"):
            if getattr(self, key) < 1:
                raise ValueError(f"advise.{key} must be >= 1, got {getattr(self, key)}")
        if self.skip_steps is not None and self.skip_steps < 0:
            raise ValueError(f"advise.skip_steps must be >= 0 or null, got {self.skip_steps}")
        if self.lookahead not in ("adam", "sgd"):
            raise ValueError(f"advise.lookahead must be adam or sgd, got {self.lookahead!r}")
        if self.lookahead_lr is not None and not self.lookahead_lr > 0:
            raise ValueError(f"advise.lookahead_lr must be > 0 or null, got {self.lookahead_lr}")
        if self.min_alignment is not None and not 0 <= self.min_alignment <= 1:
            raise ValueError(f"advise.min_alignment must be in [0, 1] or null, got {self.min_alignment}")


@dataclass
class Config:
    """Root of the composed configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    task: Dict[str, TaskConfig] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    """Multi-task loss balancing."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    advise: AdviseConfig = field(default_factory=AdviseConfig)
    """The consolidation advisor (read only by ``python -m unirec.advise``)."""
    seed: int = 0
    """Seed for data sampling, initialisation and batching."""


def register_configs() -> None:
    """Register the schemas so YAML files that name them (``defaults: [_self_, ...]``) are validated."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


def conf_dir() -> str:
    """conf/ ships inside the wheel as unirec/conf; in a source checkout it sits beside the package."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return str(installed if installed.is_dir() else here.parent / "conf")


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> Config:
    """The typed config exactly as ``python -m unirec.train <overrides>`` builds it (for scripts and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return to_object(hydra_compose(config_name, overrides=list(overrides)))


def to_object(cfg: Any) -> Config:
    """Turn a composed DictConfig into typed dataclasses (read-only from here on)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj
