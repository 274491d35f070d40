"""Typed run configuration: one frozen dataclass per concern, nested in :class:`RunConfig`.

Loaded from TOML (``[data]``, ``[model]``, ... sections) plus ``--set section.key=value`` overrides.
Unknown keys and wrong types are errors naming the key, the source (file or ``--set``) and the accepted
keys, so a typo never silently falls back to a default.

Every numeric key declares its accepted values next to its default (``ranged(default, ge=..., ...)``, a
:class:`Range` in the field's metadata): that declaration is the one source :func:`check_ranges` checks,
before any process starts. Every float must also be finite (TOML accepts ``nan`` and ``inf``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomllib

from data_pipeline.schema import NUM_SPARSE


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says where and what was expected."""


# ---------------------------------------------------------------------------------------------------
# Accepted ranges of numeric keys

#: Key of a field's :class:`Range` in its dataclass metadata.
RANGE = "range"
# Seeds feed numpy's SeedSequence (non-negative only) and torch.manual_seed after being combined with a
# group or epoch number; 32 bits keep every derived seed inside both generators' ranges.
MAX_SEED = 2**32 - 1


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Range:
    """The accepted values of a numeric key (of each element, for a list key). Floats must be finite.

    ``ge``/``gt`` and ``le``/``lt`` are closed/open bounds; ``zero``, when set, says what 0 means for a key
    that also accepts 0 as a sentinel outside its bounds ("off", "no cap"); ``why`` explains a bound in
    the error message.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    zero: str = ""
    why: str = ""

    def accepts(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.zero and v == 0:
            return True
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        hi = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if lo and hi:
            text = f"{kind} in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        elif lo:
            text = f"{kind} {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        elif hi:
            text = f"{kind} {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
        else:
            text = kind
        if self.zero:
            text = f"0 ({self.zero}) or {text}"
        if self.why:
            text += f" ({self.why})"
        return text


def ranged(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    zero: str = "",
    why: str = "",
) -> Any:
    """A dataclass field with ``default`` whose accepted values are declared here (see :class:`Range`)."""
    return field(default=default, metadata={RANGE: Range(ge=ge, gt=gt, le=le, lt=lt, zero=zero, why=why)})


@dataclass(frozen=True)
class DataConfig:
    """Where the ingested Parquet lives and how batches are drawn from it."""

    # One ingested directory, or several read in order as one data set (a window of days: the vocabulary,
    # the row groups and the shuffling span all of them).
    train_dir: str | tuple[str, ...] = ""
    valid_dir: str = ""
    # Global batch of one group; each of its `nproc` ranks gets batch_size / nproc rows per step.
    batch_size: int = ranged(2048, ge=1)
    epochs: int = ranged(1, ge=1)
    shuffle: bool = True
    # Row groups read and shuffled together (a bigger window mixes time better, costs memory).
    shuffle_window: int = ranged(4, ge=1)
    # How a raw 32-bit categorical id becomes a row of its table: "mod" (id % size) or a seeded "hash".
    id_mapping: Literal["mod", "hash"] = "mod"
    # Frequency threshold: ids seen fewer times than this in train_dir share one "rare" row of their table
    # (row 1; row 0 is "missing"). 0 = off. The kept ids are counted when a run starts and saved with it.
    min_id_count: int = ranged(0, ge=1, zero="off")
    # Cap on validation rows used for in-training evaluation (0 = all).
    valid_max_rows: int = ranged(0, ge=1, zero="all rows")

    @property
    def train_dirs(self) -> tuple[str, ...]:
        """``train_dir`` as a tuple of directories (empty when unset)."""
        dirs = (self.train_dir,) if isinstance(self.train_dir, str) else self.train_dir
        return tuple(d for d in dirs if d)


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["dlrm", "dcn", "mlp"] = "dlrm"
    embedding_dim: int = ranged(16, ge=1)
    # One size per categorical feature C1..C26, or a single size used for all.
    table_sizes: tuple[int, ...] = ranged(
        (100_000,), ge=2, why="each table needs at least 2 rows: row 0 is reserved for missing values"
    )
    # Per-table cap: keeps memory bounded when table_sizes come from the full data's cardinalities.
    max_table_size: int = ranged(1_000_000, ge=2, why="row 0 of every table is reserved for missing values")
    # Layer widths; DLRM and DCN need dense_arch to end in embedding_dim and over_arch in 1 (the logit).
    dense_arch: tuple[int, ...] = ranged((512, 256, 16), ge=1)
    over_arch: tuple[int, ...] = ranged((512, 512, 256, 1), ge=1)
    # DCN-v2: number of low-rank cross layers and their rank.
    dcn_num_layers: int = ranged(3, ge=1)
    dcn_low_rank: int = ranged(64, ge=1)
    # The paper's MLP (Anil et al. 2018).
    mlp_layers: tuple[int, ...] = ranged((2560, 1024, 256), ge=1)
    # 0 = off; N >= 3 = also bin each dense feature I1..I13 into an N-row embedding table (missing, negative,
    # 0, 1, 2, then squared-log bins; 466 rows bin every int32 apart). Feeds missingness and fine bins
    # that log1p through the dense MLP loses; on the real Criteo sample it is worth ~0.0015 log loss.
    dense_buckets: int = ranged(
        0,
        ge=3,
        le=2**31 - 1,
        zero="off",
        why="rows for missing, negative and at least one bin of values >= 0",
    )

    # Hidden-layer activation of every MLP: "smelu" is the smooth ReLU (Shamir et al. 2020), quadratic on
    # [-smelu_beta, smelu_beta]; Shamir et al. report retrains with it disagree less (and it needs no second model).
    activation: Literal["relu", "smelu"] = "relu"
    smelu_beta: float = ranged(1.0, gt=0)

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`models.build_model` (models stay free of our config types)."""
        return {
            "arch": self.arch,
            "table_sizes": self.resolved_table_sizes(),
            "embedding_dim": self.embedding_dim,
            "dense_arch": self.dense_arch,
            "over_arch": self.over_arch,
            "dcn_num_layers": self.dcn_num_layers,
            "dcn_low_rank": self.dcn_low_rank,
            "mlp_layers": self.mlp_layers,
            "dense_buckets": self.dense_buckets,
            "activation": self.activation,
            "smelu_beta": self.smelu_beta,
        }

    def resolved_table_sizes(self) -> tuple[int, ...]:
        sizes = self.table_sizes * NUM_SPARSE if len(self.table_sizes) == 1 else self.table_sizes
        return tuple(min(s, self.max_table_size) for s in sizes)


@dataclass(frozen=True)
class ShardingConfig:
    """One co-distilling group's torch.distributed world."""

    nproc: int = ranged(1, ge=1)
    sharding_type: Literal["table_wise", "column_wise", "data_parallel", "row_wise"] = "table_wise"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Rendezvous host; port 0 picks a free port (single node). Set both for multi-node.
    rdzv_host: str = "127.0.0.1"
    rdzv_port: int = ranged(0, ge=0, le=65535, why="0 picks a free port")
    nnodes: int = ranged(1, ge=1)
    # This machine's index among the nnodes (checked < nnodes).
    node_rank: int = ranged(0, ge=0)
    max_restarts: int = ranged(0, ge=0)
    # Intra-op threads per rank (0 = torch default).
    threads: int = ranged(0, ge=1, zero="torch default")


@dataclass(frozen=True)
class OptimConfig:
    # Embedding tables: fused into the backward pass by fbgemm (TorchRec's fused optimizer).
    sparse_optimizer: Literal["rowwise_adagrad", "adam"] = "rowwise_adagrad"
    # Learning rates may be 0: that freezes those parameters at their init (tests compare layouts that way).
    sparse_lr: float = ranged(0.02, ge=0)
    # Dense (MLP) parameters.
    dense_optimizer: Literal["adagrad", "adam"] = "adagrad"
    dense_lr: float = ranged(0.01, ge=0)
    # Adagrad/Adam's denominator term: only keeps the update finite, so it is small and positive.
    eps: float = ranged(1e-8, gt=0, le=1)
    weight_decay: float = ranged(0.0, ge=0)
    warmup_steps: int = ranged(0, ge=0)
    decay: Literal["none", "linear", "cosine"] = "none"
    # Where a decay ends, as a fraction of the initial rates (0 = decay to zero).
    lr_floor: float = ranged(0.0, ge=0, le=1)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    # Stop after this many steps (0 = run the configured epochs to the end).
    max_steps: int = ranged(0, ge=1, zero="run the configured epochs to the end")
    log_every: int = ranged(50, ge=1)
    # Evaluate on valid_dir every this many steps (0 = only at the end).
    eval_every: int = ranged(0, ge=1, zero="only at the end")
    progress: bool = True
    # "sparse_dist": TorchRec's TrainPipelineSparseDist (overlaps the next batch's copy and input
    # all-to-all with this step; the GPU default). "plain": a simple loop. "auto": sparse_dist on GPU for
    # one group, plain otherwise (codistillation needs the batch for the teacher outside the pipeline).
    pipeline: Literal["auto", "plain", "sparse_dist"] = "auto"
    # Multi-epoch training without the one-epoch overfit of CTR models: at the start of every epoch after
    # the first, re-initialise the embedding tables (and their optimizer state) while the dense layers
    # keep training (Fan et al. 2023, "Multi-epoch learning with data augmentation for deep CTR models").
    reinit_embeddings_each_epoch: bool = False
    # Weight averaging of the final model (train/averaging.py): "ema" or "swa" (uniform mean) of the weights
    # over the last average_fraction of the steps, sampled every average_every steps; the final checkpoint,
    # validation and predictions then use the averaged weights.
    # Warm start: a fresh run begins from a trained run's latest checkpoint of group init_group (its model
    # weights; with init_optimizer, the optimizer state too). The input mapping must match (checked, named).
    init_from: str = ""
    init_group: int = ranged(0, ge=0)
    init_optimizer: bool = False
    average: Literal["none", "ema", "swa"] = "none"
    average_fraction: float = ranged(0.25, gt=0, le=1)
    average_every: int = ranged(10, ge=1)
    ema_decay: float = ranged(0.9, gt=0, lt=1)


@dataclass(frozen=True)
class CodistillConfig:
    """Online codistillation (Anil et al. 2018, Algorithm 1). num_groups = 1 is the plain baseline."""

    num_groups: int = ranged(1, ge=1)
    burn_in_steps: int = ranged(100, ge=0)
    exchange_every: int = ranged(50, ge=1)
    # Weight of the distillation term in the loss; 0 trains the groups independently.
    distill_weight: float = ranged(1.0, ge=0)
    loss: Literal["ce", "kl", "mse_logits"] = "ce"
    exchange_mode: Literal["lockstep", "async"] = "lockstep"
    max_staleness_steps: int = ranged(200, ge=0)
    data: Literal["disjoint", "shared"] = "disjoint"
    # Exchange directory; empty = <run_dir>/exchange. Groups on several machines need a filesystem they all
    # mount (NFS, a cluster FS): versions are published with an atomic rename.
    exchange_dir: str = ""
    # Versions each group keeps (besides those a peer may replay from its last checkpoint); >= 2, so a
    # version is never deleted while a peer loads it.
    keep_versions: int = ranged(3, ge=2, why="a peer may be loading the previous version")
    # Give up (with an error naming the peer) after waiting this long for a teacher version.
    wait_timeout_s: float = ranged(3600.0, gt=0)
    # Keep every exchanged version (no garbage collection during the run, none removed after it); they
    # only serve training and each is a full model, so this costs keep_versions-independent disk.
    keep_exchange: bool = False


@dataclass(frozen=True)
class AnchorConfig:
    """A fixed teacher: a trained run's latest checkpoint (codistill/fixed.py). Distilling toward yesterday's
    model is anchor distillation (Jiang et al., ICLR 2022, "Churn reduction via distillation": equivalent to
    an explicit churn constraint, weight λ); toward any other trained run, offline distillation. Combines with
    codistillation's peers: loss = BCE + w·ψ(peers) + λ·ψ(anchor)."""

    # The teacher's run directory (empty = no anchor) and which of its groups.
    run: str = ""
    group: int = ranged(0, ge=0)
    # λ; 0 trains exactly the model without an anchor (no teacher forward at all).
    weight: float = ranged(0.0, ge=0)
    loss: Literal["ce", "kl", "mse_logits"] = "ce"


@dataclass(frozen=True)
class TeacherConfig:
    """How every teacher of the run (codistillation's peers, the anchor) is run: the cost side of
    distillation (codistill/sampling.py)."""

    # Fraction q of each batch's rows the teachers run on, drawn by `sampling` and importance-weighted so
    # the distillation term stays unbiased; 1 = every row (the exact term, no draw).
    fraction: float = ranged(1.0, gt=0, le=1)
    # uniform, or by the student's uncertainty p(1-p) on the row (mixed with uniform to bound the weights)
    sampling: Literal["uniform", "uncertainty"] = "uncertainty"
    # Precision of the frozen teacher copies' embedding tables: fp32 (a copy with the student's sharding
    # plan), or fp16 / int8 (row-wise): a local copy on every rank with TorchRec's quantized tables
    # (torchrec.quant, fbgemm IntNBit kernels), dense layers fp32. With fp16 / int8 the groups also publish
    # their tables in fp16 (half the exchange bytes); an anchor's checkpoint is read as it is.
    precision: Literal["fp32", "fp16", "int8"] = "fp32"


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = ranged(0, ge=1, zero="only at the end")
    keep_last: int = ranged(2, ge=1)
    resume: bool = True


@dataclass(frozen=True)
class EvalConfig:
    # Decision threshold for flip rates; 0 = the hold-out's base rate.
    threshold: float = ranged(0.0, gt=0, lt=1, zero="the hold-out's base rate")
    # Bootstrap replicates of the churn intervals (0 = no intervals).
    bootstrap: int = ranged(1000, ge=0)
    seed: int = ranged(0, ge=0, le=MAX_SEED)


@dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------
# Loading and validation


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (TOML types), converting lists to tuples."""
    origin = get_origin(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}' = {value!r}: expected {expected}")

    if origin is Literal:
        if value not in get_args(tp):
            raise bad("one of " + ", ".join(repr(a) for a in get_args(tp)))
        return value
    if origin is tuple:
        (elem, *_rest) = get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {getattr(elem, '__name__', elem)}")
        return tuple(_coerce(v, elem, key, source) for v in value)
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise bad(str(tp))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise bad(str(tp))  # pragma: no cover - only reached by a new, unsupported annotation


def build_section(cls: type, data: Mapping[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key '{full}'; accepted keys{' in [' + prefix[:-1] + ']' if prefix else ''}: "
                + ", ".join(names)
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{full}' must be a table/section, got {value!r}")
            kwargs[key] = build_section(tp, value, source, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full, source)
    return cls(**kwargs)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.dense_lr=0.1"`` -> (["optim", "dense_lr"], 0.1). Values are TOML; bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as column_wise
    return path, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` (a config as nested dicts) with every ``section.key=value`` applied in order."""
    out = dict(data)
    for item in overrides:
        keys, value = parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        out = _merge(out, nested)
    return out


def config_dict_from_sources(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
    return apply_overrides(data, overrides)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a :class:`RunConfig` from TOML plus ``--set`` overrides, then validate it."""
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " + --set " + " ".join(overrides)
    cfg = build_section(RunConfig, config_dict_from_sources(path, overrides), source)
    validate(cfg, source)
    return cfg


def from_dict(data: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    cfg = build_section(RunConfig, data, source)
    validate(cfg, source)
    return cfg


def replace(cfg: RunConfig, **sections: Any) -> RunConfig:
    """``replace(cfg, train={"seed": 3})``: a copy with some keys of some sections changed, re-validated."""
    data = _merge(to_dict(cfg), sections)
    return from_dict(data, "<replace>")


def _numeric_kind(tp: Any) -> tuple[type | None, bool]:
    """(int or float or None, whether the key is a list) of a field annotation."""
    if get_origin(tp) is tuple:
        elem = get_args(tp)[0]
        return (elem if elem in (int, float) else None), True
    return (tp if tp in (int, float) else None), False


def field_range(cls: type, name: str) -> Range | None:
    """The :class:`Range` declared for field ``name`` of config dataclass ``cls`` (None if it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get(RANGE)
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def check_ranges(obj: Any, source: str, prefix: str = "") -> None:
    """Every numeric key of the config dataclass ``obj`` (and of its nested sections) against its declared
    :class:`Range`; a float without one must still be finite. The error names the key, ``source``, the
    value and what is accepted. Usable for any frozen config dataclass (e.g. a study's ``[study]`` table)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = prefix + f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, source, f"{key}.")
            continue
        kind, is_list = _numeric_kind(hints[f.name])
        if kind is None:
            continue
        rng = f.metadata.get(RANGE, Range())
        for i, v in enumerate(value) if is_list else [(None, value)]:
            if not rng.accepts(v):
                where = key if i is None else f"{key}[{i}]"
                raise ConfigError(
                    f"{source}: {where} = {v!r} is out of range; expected {rng.describe(kind is int)}"
                )


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Range checks of every numeric key, then cross-field checks: all must fail before any process starts."""
    check_ranges(cfg, source)
    m, s, d, c = cfg.model, cfg.sharding, cfg.data, cfg.codistill
    sizes = m.table_sizes
    if len(sizes) not in (1, NUM_SPARSE):
        raise ConfigError(f"{source}: model.table_sizes has {len(sizes)} entries; expected 1 or {NUM_SPARSE}")
    if d.min_id_count and min(m.resolved_table_sizes()) < 3:
        raise ConfigError(
            f"{source}: data.min_id_count needs tables of >= 3 rows (row 0 = missing, row 1 = rare ids); "
            f"model.table_sizes resolves to a smallest table of {min(m.resolved_table_sizes())}"
        )
    if m.arch in ("dlrm", "dcn"):
        # TorchRec's DLRM/DCN refuse these only when the model is built, inside every rank.
        if not m.dense_arch or m.dense_arch[-1] != m.embedding_dim:
            raise ConfigError(
                f"{source}: model.dense_arch must end in embedding_dim ({m.embedding_dim}) for {m.arch}'s "
                f"interaction of dense and embedded features, got {list(m.dense_arch)}"
            )
        if len(m.over_arch) < 2 or m.over_arch[-1] != 1:
            raise ConfigError(
                f"{source}: model.over_arch must have at least 2 layers and end in 1 (the logit) for "
                f"{m.arch}, got {list(m.over_arch)}"
            )
    if s.node_rank >= s.nnodes:
        raise ConfigError(
            f"{source}: sharding.node_rank = {s.node_rank}; expected an integer in [0, {s.nnodes - 1}] "
            f"(below sharding.nnodes = {s.nnodes})"
        )
    world = s.nproc * s.nnodes
    if d.batch_size % world:
        raise ConfigError(
            f"{source}: data.batch_size = {d.batch_size} is not divisible by the group's world size "
            f"{world} (sharding.nproc x sharding.nnodes)"
        )
    if s.sharding_type == "column_wise" and m.embedding_dim % 4:
        raise ConfigError(f"{source}: column_wise sharding needs model.embedding_dim divisible by 4")
    if cfg.train.pipeline == "sparse_dist" and c.num_groups > 1:
        raise ConfigError(
            f"{source}: train.pipeline = 'sparse_dist' works for one group only; codistillation runs the "
            "teacher on each batch outside the pipeline (use 'plain' or 'auto')"
        )
    if s.nnodes > 1 and s.rdzv_port == 0:
        raise ConfigError(f"{source}: sharding.nnodes > 1 needs an explicit sharding.rdzv_host and rdzv_port")
    if s.rdzv_port and s.rdzv_port + c.num_groups - 1 > 65535:
        # Group g rendezvouses on rdzv_port + g, so the last group's port must exist too.
        raise ConfigError(
            f"{source}: sharding.rdzv_port = {s.rdzv_port} with codistill.num_groups = {c.num_groups} puts the "
            f"last group on port {s.rdzv_port + c.num_groups - 1}; expected rdzv_port <= {65536 - c.num_groups}"
        )
    # Empty strings: run_dir "" would be the working directory itself; an empty host cannot be reached.
    for key, value in (("run_dir", cfg.run_dir), ("sharding.rdzv_host", s.rdzv_host)):
        if not value.strip():
            raise ConfigError(f"{source}: {key} = {value!r}; expected a non-empty string")
    if c.exchange_mode == "async" and c.max_staleness_steps < c.exchange_every:
        raise ConfigError(
            f"{source}: codistill.max_staleness_steps ({c.max_staleness_steps}) must be >= exchange_every "
            f"({c.exchange_every}): versions only appear every exchange_every steps"
        )
    if cfg.train.reinit_embeddings_each_epoch and cfg.optim.sparse_optimizer != "rowwise_adagrad":
        raise ConfigError(
            f"{source}: train.reinit_embeddings_each_epoch needs optim.sparse_optimizer = 'rowwise_adagrad' "
            "(fbgemm's Adam keeps a bias-correction step counter outside its state that a reset cannot reach)"
        )
    if cfg.train.reinit_embeddings_each_epoch and c.num_groups > 1:
        raise ConfigError(
            f"{source}: train.reinit_embeddings_each_epoch is not supported with codistillation (num_groups > 1): "
            "right after a re-initialisation the peer's teacher still carries the previous epoch's memorised tables"
        )
    if s.max_restarts > 0 and cfg.checkpoint.every_steps == 0:
        raise ConfigError(
            f"{source}: sharding.max_restarts > 0 restarts a failed group from its latest checkpoint; set "
            "checkpoint.every_steps > 0 (otherwise it would replay from step 0)"
        )


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)

    def lists(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: lists(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return [lists(v) for v in x]
        return x

    return lists(out)


def to_toml(cfg: RunConfig) -> str:
    """Serialise the resolved config as TOML (loadable again with :func:`load_config`)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(type(v))

    d = to_dict(cfg)
    lines = [f"{k} = {fmt(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {fmt(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def save_resolved(cfg: RunConfig, run_dir: str | Path) -> Path:
    from recsys_codistill.run_dir import RunDir

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    out = RunDir(run_dir).config
    out.write_text(to_toml(cfg))
    return out
