"""A synthetic Criteo-format click log with a known true click probability per row.

Why: the real Criteo sample is small, so the study needs millions of rows whose statistics resemble
Criteo's (heavy-tailed categorical ids, many missing values, count-like dense features, a ~25% base rate)
and whose Bayes-optimal predictor is known, so model quality and churn can be judged against the truth.
The parameters approximate the public Kaggle data; nothing here is tuned to favour any training method.

Generative model (one "world" per ``world_seed``; rows are i.i.d. given the world):

- Categorical ``C_f``: a Zipf rank ``r ~ p(r) ∝ (r+1)^-s_f`` over ``cardinalities[f]`` values, written as
  a random-looking 32-bit id (a seeded bijection of the rank, so ids look like Criteo's hashes). Each rank
  has its own effect ``N(0, id_effect_std[f]^2)`` on the logit; a missing value has an effect too.
- Dense ``I_j``: counts ``floor(exp(mu_j + sd_j * z_j)) + offset_j`` with ``z_j`` correlated through one
  shared latent "activity" factor per row (Criteo's I2 has negative values: ``offset = -1``). Effects act
  through ``log1p(max(x, 0))`` (the DLRM transform); missing values have their own effect.
- Interactions: for each configured pair of categorical features, a hashed cross of the two ranks has its
  own effect ``N(0, interaction_effect_std^2)`` (present only when both values are).
- Missingness: per-column null rates close to Kaggle's; columns listed together in ``null_groups`` share
  one uniform draw per row, so they go missing together as they do in Criteo.
- Label ``~ Bernoulli(sigmoid(intercept + sum of effects))``; the intercept is calibrated once per world on
  a fixed pilot sample so the base rate is ``base_rate``.

Per-id and per-cross effects are computed from a 64-bit hash of (world salt, feature, rank) rather than
stored, so memory stays small even for million-value features. Rows are generated in fixed chunks, each from
its own seeded RNG, so ``generate(rows=n)`` is an exact prefix of ``generate(rows=m > n)`` for the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data_pipeline.schema import (
    DENSE_COLUMNS,
    LABEL_COLUMN,
    NUM_DENSE,
    NUM_SPARSE,
    ROW_ID_COLUMN,
    SCHEMA_VERSION,
    SPARSE_COLUMNS,
    parquet_schema,
)

# Kaggle Display Advertising Challenge cardinalities of C1..C26 (the list DLRM's scripts use).
KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip


def _scaled_cardinality(c: int, knee: int = 100_000) -> int:
    """Keep small vocabularies as they are; shrink huge ones by a square root above ``knee``.

    Keeps Kaggle's spread (3 .. ~10^6) while the largest tables stay around a million rows.
    """
    return c if c <= knee else round(knee * math.sqrt(c / knee))


DEFAULT_CARDINALITIES: tuple[int, ...] = tuple(_scaled_cardinality(c) for c in KAGGLE_CARDINALITIES)

# Approximate per-column missing rates of the Kaggle train file (dense mean ~21%, categorical ~10.5%).
KAGGLE_DENSE_NULL_RATES: tuple[float, ...] = (
    0.454, 0.0, 0.215, 0.217, 0.026, 0.224, 0.043, 0.0005, 0.043, 0.454, 0.043, 0.765, 0.217,
)  # fmt: skip
KAGGLE_CAT_NULL_RATES: tuple[float, ...] = (
    0.0, 0.0, 0.034, 0.034, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.034, 0.0,
    0.0, 0.0, 0.034, 0.0, 0.0, 0.44, 0.44, 0.034, 0.76, 0.0, 0.034, 0.44, 0.44,
)  # fmt: skip
# Columns that go missing together in Criteo (equal rates + a shared draw = the same rows are missing).
DEFAULT_NULL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("I1", "I10"),
    ("I3", "I4", "I13"),
    ("I7", "I9", "I11"),
    ("C3", "C4", "C12", "C16", "C21", "C24"),
    ("C19", "C20", "C25", "C26"),
)

# Dense counts: floor(exp(mu + sd*z)) + offset; mu = log(median + 0.5) for Kaggle-like medians
# (I1 1, I2 3, I3 7, I4 4, I5 ~2800, I6 30, I7 3, I8 8, I9 40, I10 0-1, I11 1, I12 0, I13 4).
_DENSE_MEDIANS = (1, 3, 7, 4, 2800, 30, 3, 8, 40, 0.5, 1, 0, 4)
DEFAULT_DENSE_LOG_MEAN: tuple[float, ...] = tuple(round(math.log(m + 0.5), 4) for m in _DENSE_MEDIANS)
DEFAULT_DENSE_LOG_STD: tuple[float, ...] = (1.3, 1.8, 1.4, 1.0, 1.8, 1.6, 1.4, 1.0, 1.3, 0.7, 1.1, 1.5, 1.0)
DEFAULT_DENSE_OFFSET: tuple[int, ...] = (0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
# Effect per unit of log1p(count). Click-history-like counts (I1, I7, I10, I11) push up, volume-like down.
DEFAULT_DENSE_EFFECT: tuple[float, ...] = (
    0.15, -0.05, -0.08, -0.05, -0.08, -0.06, 0.15, 0.03, -0.05, 0.25, 0.15, 0.08, -0.06,
)  # fmt: skip
# Per-id effect std by feature: a spread from nearly useless to strongly informative. The overall scale is
# set so the Bayes-optimal AUC is ~0.82 (log loss ~0.43), a little above the best published Kaggle models
# (AUC ~0.80-0.81, log loss ~0.44): real models cannot reach the Bayes rate, so this keeps the task about
# as hard as Criteo's. It is not tuned for any training method.
DEFAULT_ID_EFFECT_STD: tuple[float, ...] = (
    0.36, 0.42, 0.30, 0.30, 0.24, 0.36, 0.36, 0.24, 0.12, 0.24, 0.36, 0.30, 0.24,
    0.36, 0.24, 0.30, 0.36, 0.30, 0.18, 0.24, 0.30, 0.24, 0.24, 0.30, 0.36, 0.18,
)  # fmt: skip

# Rows per generation chunk. Part of the data definition (each chunk has its own RNG), so not a parameter.
_CHUNK_ROWS = 100_000
# Rows of the fixed pilot sample used to calibrate the intercept (from the world seed, not the data seed).
_PILOT_ROWS = 200_000
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_M32 = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class SyntheticParams:
    """All knobs of the generative model (see the module docstring). Defaults approximate Kaggle Criteo."""

    cardinalities: tuple[int, ...] = DEFAULT_CARDINALITIES
    # One exponent for all features or one per feature.
    zipf_exponent: float | tuple[float, ...] = 1.05
    dense_null_rate: tuple[float, ...] = KAGGLE_DENSE_NULL_RATES
    cat_null_rate: tuple[float, ...] = KAGGLE_CAT_NULL_RATES
    null_groups: tuple[tuple[str, ...], ...] = DEFAULT_NULL_GROUPS
    dense_log_mean: tuple[float, ...] = DEFAULT_DENSE_LOG_MEAN
    dense_log_std: tuple[float, ...] = DEFAULT_DENSE_LOG_STD
    dense_offset: tuple[int, ...] = DEFAULT_DENSE_OFFSET
    # Correlation of every dense column's log-count with one shared latent factor per row.
    dense_latent_corr: float = 0.4
    dense_effect: tuple[float, ...] = DEFAULT_DENSE_EFFECT
    dense_missing_effect_std: float = 0.2
    id_effect_std: tuple[float, ...] = DEFAULT_ID_EFFECT_STD
    interactions: tuple[tuple[str, str], ...] = (("C2", "C6"), ("C5", "C14"))
    interaction_effect_std: float = 0.36
    base_rate: float = 0.25
    # Seed of the world (ids, effects, intercept). None: the data seed passed to generate().
    world_seed: int | None = None
    # Time structure (daily retrains): rows are split into `days` equal days in row order (the cut of
    # ingest --days). From one day to the next every id's (and cross's) effect takes a random-walk step of
    # sd drift * its feature's effect sd, and the popularity ranking slides by id_turnover * cardinality
    # ids: new ids become the popular ones while old ones fade (an id keeps its effect as it fades).
    # days = 1 (or drift = turnover = 0) is the stationary world, row for row.
    days: int = 1
    drift: float = 0.0
    id_turnover: float = 0.0

    def __post_init__(self) -> None:
        def need(name: str, n: int) -> None:
            v = getattr(self, name)
            if len(v) != n:
                raise ValueError(f"SyntheticParams.{name} has {len(v)} entries; expected {n}")

        for name in ("cardinalities", "cat_null_rate", "id_effect_std"):
            need(name, NUM_SPARSE)
        for name in ("dense_null_rate", "dense_log_mean", "dense_log_std", "dense_offset", "dense_effect"):
            need(name, NUM_DENSE)
        if not isinstance(self.zipf_exponent, (int, float)):
            need("zipf_exponent", NUM_SPARSE)
        if any(c < 1 for c in self.cardinalities):
            raise ValueError("SyntheticParams.cardinalities must all be >= 1")
        if any(not 0.0 <= r <= 1.0 for r in (*self.dense_null_rate, *self.cat_null_rate)):
            raise ValueError("SyntheticParams null rates must lie in [0, 1]")
        if not 0.0 < self.base_rate < 1.0:
            raise ValueError("SyntheticParams.base_rate must lie in (0, 1)")
        if not 0.0 <= self.dense_latent_corr < 1.0:
            raise ValueError("SyntheticParams.dense_latent_corr must lie in [0, 1)")
        names = set(DENSE_COLUMNS) | set(SPARSE_COLUMNS)
        seen: set[str] = set()
        for grp in self.null_groups:
            for c in grp:
                if c not in names or c in seen:
                    raise ValueError(f"SyntheticParams.null_groups: unknown or repeated column {c!r}")
                seen.add(c)
        for a, b in self.interactions:
            if a not in SPARSE_COLUMNS or b not in SPARSE_COLUMNS or a == b:
                raise ValueError(f"SyntheticParams.interactions: bad pair ({a!r}, {b!r})")
        if not 1 <= self.days <= 100:
            raise ValueError(f"SyntheticParams.days must lie in [1, 100], got {self.days}")
        if not (0.0 <= self.drift <= 10.0 and 0.0 <= self.id_turnover <= 1.0):
            raise ValueError("SyntheticParams.drift must lie in [0, 10] and id_turnover in [0, 1]")

    def zipf_exponents(self) -> tuple[float, ...]:
        z = self.zipf_exponent
        return (float(z),) * NUM_SPARSE if isinstance(z, (int, float)) else tuple(float(x) for x in z)


# ---------------------------------------------------------------------------------------------------
# Hashing helpers (vectorised, wrap-around uint64 arithmetic)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of a uint64 array: a fast, well-mixed bijection on 64-bit integers."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_gauss(keys: np.ndarray) -> np.ndarray:
    """A standard normal deviate per uint64 key (Box-Muller on the two halves of its hash)."""
    h = mix64(keys)
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
    u2 = ((h & _M32).astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _rank_to_id(ranks: np.ndarray, mult: int, salt: int) -> np.ndarray:
    """A seeded bijection of 32-bit ranks onto random-looking 32-bit ids (murmur3 fmix32)."""
    with np.errstate(over="ignore"):
        x = (ranks.astype(np.uint64) * np.uint64(mult) + np.uint64(salt)) & _M32
        x ^= x >> np.uint64(16)
        x = (x * np.uint64(0x85EBCA6B)) & _M32
        x ^= x >> np.uint64(13)
        x = (x * np.uint64(0xC2B2AE35)) & _M32
        x ^= x >> np.uint64(16)
    return x.astype(np.uint32)


# Byte -> two lowercase hex characters, as one little-endian uint16 (so a view gives the right order).
_HEX = b"0123456789abcdef"
_HEX_PAIRS = np.array([_HEX[b >> 4] | (_HEX[b & 15] << 8) for b in range(256)], dtype="<u2")


def hex8(ids: np.ndarray) -> np.ndarray:
    """uint32 ids -> flat uint8 buffer of 8 lowercase hex digits each (Criteo's spelling)."""
    be = np.ascontiguousarray(ids, dtype=">u4").view(np.uint8).reshape(-1, 4)
    return _HEX_PAIRS[be].view(np.uint8).ravel()


# ---------------------------------------------------------------------------------------------------
# The world and its chunks


@dataclass
class _Chunk:
    dense: np.ndarray  # int32 [13, n]
    dense_valid: np.ndarray  # bool [13, n]
    ids: np.ndarray  # uint32 [26, n]
    cat_valid: np.ndarray  # bool [26, n]
    logit: np.ndarray  # float64 [n]
    probability: np.ndarray  # float64 [n]
    label: np.ndarray  # int8 [n]

    def __len__(self) -> int:
        return len(self.label)

    def slice(self, a: int, b: int) -> _Chunk:
        return _Chunk(
            self.dense[:, a:b], self.dense_valid[:, a:b], self.ids[:, a:b], self.cat_valid[:, a:b],
            self.logit[a:b], self.probability[a:b], self.label[a:b],
        )  # fmt: skip


class _World:
    """Everything fixed by (params, world seed): id bijections, effect salts, Zipf tables, intercept."""

    def __init__(self, params: SyntheticParams, world_seed: int) -> None:
        self.p = params
        self.world_seed = world_seed
        rng = np.random.default_rng([world_seed, 0x5EED_0001])
        self.id_mult = [int(m) | 1 for m in rng.integers(1, 2**32, NUM_SPARSE, dtype=np.uint64)]
        self.id_salt = [int(s) for s in rng.integers(0, 2**32, NUM_SPARSE, dtype=np.uint64)]
        self.effect_salt = rng.integers(0, 2**63, NUM_SPARSE + len(params.interactions), dtype=np.uint64)
        # Draw the dense missing-value effects and each categorical's missing effect from the world too.
        self.dense_missing_effect = rng.normal(0.0, params.dense_missing_effect_std, NUM_DENSE)
        self.cat_missing_effect = np.array(
            [
                params.id_effect_std[f] * _hash_gauss(np.array([self.effect_salt[f] ^ np.uint64(2**62)]))[0]
                for f in range(NUM_SPARSE)
            ]
        )
        self.cdfs = []
        for n, s in zip(params.cardinalities, params.zipf_exponents(), strict=True):
            w = np.arange(1, n + 1, dtype=np.float64) ** -s
            cdf = np.cumsum(w)
            cdf /= cdf[-1]
            self.cdfs.append(cdf)
        col_index = {c: i for i, c in enumerate((*DENSE_COLUMNS, *SPARSE_COLUMNS))}
        grouped = {c for g in params.null_groups for c in g}
        # Each "null draw" is one uniform per row; a column uses the draw of its group or its own.
        self.null_draw_of: dict[int, int] = {}
        k = 0
        for g in params.null_groups:
            for c in g:
                self.null_draw_of[col_index[c]] = k
            k += 1
        for c, i in col_index.items():
            if c not in grouped:
                self.null_draw_of[i] = k
                k += 1
        self.num_null_draws = k
        self.pairs = [(SPARSE_COLUMNS.index(a), SPARSE_COLUMNS.index(b)) for a, b in params.interactions]
        self.intercept = 0.0
        pilot = self.chunk(np.random.default_rng([world_seed, 0x5EED_0002]), _PILOT_ROWS, with_labels=False)
        self.intercept = _calibrate_intercept(pilot.logit, params.base_rate)

    def _drift(self, keys: np.ndarray, day: np.ndarray | None, salt: int) -> np.ndarray:
        """The random-walk part of an effect on each row's day: the sum of ``day`` unit steps, each a
        hashed Gaussian of (key, step); 0 on day 0 or without drift."""
        out = np.zeros(keys.shape, dtype=np.float64)
        if day is None or self.p.drift == 0.0:
            return out
        for k in range(1, int(day.max(initial=0)) + 1):
            with np.errstate(over="ignore"):
                step = _hash_gauss(mix64(keys ^ np.uint64((salt * 1_000_003 + k) % 2**63)))
            out += np.where(day >= k, step, 0.0)
        return self.p.drift * out

    def chunk(
        self, rng: np.random.Generator, n: int, with_labels: bool = True, day: np.ndarray | None = None
    ) -> _Chunk:
        """Draw ``n`` rows (of days ``day``, an int array; None: day 0). The order of RNG draws below is
        part of the data definition."""
        p = self.p
        latent = rng.standard_normal(n)
        rho = p.dense_latent_corr
        z = rho * latent + math.sqrt(1.0 - rho * rho) * rng.standard_normal((NUM_DENSE, n))
        nulls = rng.random((self.num_null_draws, n))
        cat_u = rng.random((NUM_SPARSE, n))
        label_u = rng.random(n) if with_labels else None

        mu = np.asarray(p.dense_log_mean)[:, None]
        sd = np.asarray(p.dense_log_std)[:, None]
        counts = np.floor(np.exp(np.minimum(mu + sd * z, 21.0)))  # exp(21) < 2^31: stays in int32
        dense = (counts + np.asarray(p.dense_offset, dtype=np.float64)[:, None]).astype(np.int32)
        dense_valid = np.empty((NUM_DENSE, n), dtype=bool)
        for j in range(NUM_DENSE):
            dense_valid[j] = nulls[self.null_draw_of[j]] >= p.dense_null_rate[j]
        logit = np.full(n, self.intercept)
        eff = np.log1p(np.maximum(dense, 0).astype(np.float64)) * np.asarray(p.dense_effect)[:, None]
        logit += np.where(dense_valid, eff, self.dense_missing_effect[:, None]).sum(axis=0)

        ranks = np.empty((NUM_SPARSE, n), dtype=np.int64)
        cat_valid = np.empty((NUM_SPARSE, n), dtype=bool)
        ids = np.empty((NUM_SPARSE, n), dtype=np.uint32)
        for f in range(NUM_SPARSE):
            if p.cardinalities[f] > 65536:
                # Sorted needles make the binary search cache-friendly on big tables (~2x faster).
                order = np.argsort(cat_u[f])
                ranks[f, order] = np.searchsorted(self.cdfs[f], cat_u[f, order], side="right")
            else:
                ranks[f] = np.searchsorted(self.cdfs[f], cat_u[f], side="right")
            np.minimum(ranks[f], p.cardinalities[f] - 1, out=ranks[f])  # guards u == cdf[-1] rounding
            if day is not None and p.id_turnover > 0:
                # the popularity ranking slides over the id space: rank r on day d is id index r + d * shift
                ranks[f] += day * round(p.id_turnover * p.cardinalities[f])
            cat_valid[f] = nulls[self.null_draw_of[NUM_DENSE + f]] >= p.cat_null_rate[f]
            ids[f] = _rank_to_id(ranks[f], self.id_mult[f], self.id_salt[f])
            with np.errstate(over="ignore"):
                keys = self.effect_salt[f] + ranks[f].astype(np.uint64)
            e = p.id_effect_std[f] * (_hash_gauss(keys) + self._drift(keys, day, f))
            logit += np.where(cat_valid[f], e, self.cat_missing_effect[f])
        for k, (a, b) in enumerate(self.pairs):
            with np.errstate(over="ignore"):
                cross = ranks[a].astype(np.uint64) * np.uint64(p.cardinalities[b]) + ranks[b].astype(
                    np.uint64
                )
                keys = mix64(cross ^ self.effect_salt[NUM_SPARSE + k])
            e = p.interaction_effect_std * (_hash_gauss(keys) + self._drift(keys, day, NUM_SPARSE + k))
            logit += np.where(cat_valid[a] & cat_valid[b], e, 0.0)

        prob = 1.0 / (1.0 + np.exp(-logit))
        label = (label_u < prob).astype(np.int8) if label_u is not None else np.zeros(n, dtype=np.int8)
        return _Chunk(dense, dense_valid, ids, cat_valid, logit, prob, label)


def _calibrate_intercept(logit_wo: np.ndarray, base_rate: float) -> float:
    """Solve mean(sigmoid(b + logit)) = base_rate for b by bisection (monotone in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(mid + logit_wo)))) < base_rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def day_of_rows(first: int, n: int, rows: int, days: int) -> np.ndarray:
    """Day of rows [first, first + n) of ``rows``: the cut of ``ingest --days`` (equal days, row order)."""
    if days <= 1:
        return np.zeros(n, dtype=np.int64)
    cuts = np.array([(2 * d * rows + days) // (2 * days) for d in range(1, days)], dtype=np.int64)
    return np.searchsorted(cuts, np.arange(first, first + n, dtype=np.int64), side="right")


def _chunks(world: _World, seed: int, rows: int):
    """Yield (first_row, chunk) covering rows [0, rows); the last full chunk is sliced (prefix property,
    for a stationary world: with days > 1 a row's day depends on ``rows``)."""
    days = world.p.days
    for k in range(0, (rows + _CHUNK_ROWS - 1) // _CHUNK_ROWS):
        start = k * _CHUNK_ROWS
        day = day_of_rows(start, _CHUNK_ROWS, rows, days) if days > 1 else None
        c = world.chunk(np.random.default_rng([seed, 0xDA7A, k]), _CHUNK_ROWS, day=day)
        yield start, c.slice(0, min(_CHUNK_ROWS, rows - start))


# ---------------------------------------------------------------------------------------------------
# Metrics of the true probabilities


def bayes_metrics(probability: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Log loss (natural log) and exact ROC AUC (ties count 1/2) of ``probability`` against ``labels``."""
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-15, 1 - 1e-15)
    y = np.asarray(labels).astype(bool)
    log_loss = float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    auc = float("nan")
    if n_pos and n_neg:
        # Mann-Whitney U with mid-ranks for ties.
        order = np.argsort(p, kind="mergesort")
        ps = p[order]
        _, first, counts = np.unique(ps, return_index=True, return_counts=True)
        mid = first + (counts + 1) / 2.0  # 1-based mid-rank of each tie group
        ranks = np.repeat(mid, counts)
        rank_pos = ranks[y[order]].sum()
        auc = float((rank_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
    return {"log_loss": log_loss, "auc": auc}


def _entropy(rate: float) -> float:
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return float(-(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)))


# ---------------------------------------------------------------------------------------------------
# Writers


def _chunk_table(c: _Chunk, first_row: int, for_tsv: bool) -> pa.Table:
    """Arrow table of a chunk: TSV layout (hex strings) or the ingested Parquet schema (uint32 ids)."""
    n = len(c)
    cols: dict[str, pa.Array] = {}
    if not for_tsv:
        cols[ROW_ID_COLUMN] = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    cols[LABEL_COLUMN] = pa.array(c.label)
    for j, name in enumerate(DENSE_COLUMNS):
        cols[name] = pa.array(c.dense[j], mask=~c.dense_valid[j])
    offsets = pa.py_buffer(np.arange(0, 8 * n + 1, 8, dtype=np.int32)) if for_tsv else None
    for f, name in enumerate(SPARSE_COLUMNS):
        if for_tsv:
            # Build the string column straight from buffers: fixed 8-byte values plus a validity bitmap.
            bitmap = pa.py_buffer(np.packbits(c.cat_valid[f], bitorder="little"))
            cols[name] = pa.StringArray.from_buffers(n, offsets, pa.py_buffer(hex8(c.ids[f])), bitmap)
        else:
            cols[name] = pa.array(c.ids[f], mask=~c.cat_valid[f])
    if for_tsv:
        return pa.table(cols)
    return pa.table(cols).cast(parquet_schema())


_TSV_OPTIONS = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")


def _tsv_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pacsv.write_csv(table, buf, _TSV_OPTIONS)
    return buf.getvalue().to_pybytes()


class _Accumulator:
    """Collects the truth of all rows for the summary (9 bytes per row) and writes truth.parquet."""

    def __init__(self, path: Path) -> None:
        schema = pa.schema(
            [
                pa.field(ROW_ID_COLUMN, pa.int64(), nullable=False),
                pa.field("probability", pa.float64(), nullable=False),
                pa.field("logit", pa.float64(), nullable=False),
            ]
        )
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.schema = schema
        self.probs: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, first_row: int, c: _Chunk) -> None:
        n = len(c)
        ids = np.arange(first_row, first_row + n, dtype=np.int64)
        self.writer.write_table(pa.table([ids, c.probability, c.logit], schema=self.schema))
        self.probs.append(c.probability)
        self.labels.append(c.label)

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        self.writer.close()
        if not self.probs:
            return np.zeros(0), np.zeros(0, dtype=np.int8)
        return np.concatenate(self.probs), np.concatenate(self.labels)


def _summary(
    params: SyntheticParams, world: _World, seed: int, rows: int, probs: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    base = float(labels.mean()) if rows else float("nan")
    m = bayes_metrics(probs, labels) if rows else {"log_loss": float("nan"), "auc": float("nan")}
    return {
        "generator": "data_pipeline.synthetic",
        "version": 1,
        "seed": seed,
        "world_seed": world.world_seed,
        "rows": rows,
        "params": dataclasses.asdict(params),
        "intercept": world.intercept,
        "base_rate": base,
        "mean_probability": float(probs.mean()) if rows else float("nan"),
        "base_rate_log_loss": _entropy(base) if rows else float("nan"),
        "bayes_log_loss": m["log_loss"],
        "bayes_auc": m["auc"],
    }


def _file_bounds(rows: int, num_files: int) -> list[tuple[int, int]]:
    return [(i * rows // num_files, (i + 1) * rows // num_files) for i in range(num_files)]


def generate(
    out_dir: str | Path,
    rows: int,
    seed: int = 0,
    *,
    num_files: int = 1,
    params: SyntheticParams | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``rows`` synthetic Criteo rows as gzip TSV files plus the truth and a summary.

    Files: ``synthetic-00000.tsv.gz`` .. (rows split evenly, in order), ``truth.parquet`` (row_id =
    0-based line index across the files in order, probability, logit) and ``synthetic.json`` (params, seed,
    rows, base rate, Bayes-optimal log loss and AUC over all rows). Byte-identical for the same arguments
    (gzip header with mtime 0 and no file name). Memory: one 100k-row chunk plus 9 bytes per row kept for
    the exact Bayes AUC. Returns the summary dict (also with ``files``).
    """
    if rows < 0 or num_files < 1:
        raise ValueError("rows must be >= 0 and num_files >= 1")
    params = params or SyntheticParams()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = _World(params, seed if params.world_seed is None else params.world_seed)
    bounds = _file_bounds(rows, num_files)
    paths = [out / f"synthetic-{i:05d}.tsv.gz" for i in range(num_files)]
    acc = _Accumulator(out / "truth.parquet")
    fi = 0
    fh = open(paths[0], "wb")  # noqa: SIM115 - handed from file to file below
    z = zlib.compressobj(1, zlib.DEFLATED, 31)  # level 1: hex ids barely compress; speed matters more
    try:
        for first, c in _chunks(world, seed, rows):
            acc.add(first, c)
            pos = 0
            while pos < len(c):
                row = first + pos
                while row >= bounds[fi][1]:  # close finished files (empty ones included)
                    fh.write(z.flush())
                    fh.close()
                    fi += 1
                    fh = open(paths[fi], "wb")  # noqa: SIM115
                    z = zlib.compressobj(1, zlib.DEFLATED, 31)
                take = min(len(c) - pos, bounds[fi][1] - row)
                fh.write(z.compress(_tsv_bytes(_chunk_table(c.slice(pos, pos + take), row, True))))
                pos += take
            if progress:
                done = first + len(c)
                print(f"synthetic: {done}/{rows} rows ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        fh.write(z.flush())
        fh.close()
        for i in range(fi + 1, num_files):  # trailing empty files still exist as valid gzip
            with open(paths[i], "wb") as f:
                zz = zlib.compressobj(1, zlib.DEFLATED, 31)
                f.write(zz.compress(b"") + zz.flush())
    finally:
        if not fh.closed:
            fh.close()
        probs, labels = acc.close()
    summary = _summary(params, world, seed, rows, probs, labels)
    summary["num_files"] = num_files
    summary["files"] = [{"path": p.name, "rows": b - a} for p, (a, b) in zip(paths, bounds, strict=True)]
    (out / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["seconds"] = time.perf_counter() - t0
    return summary


def generate_parquet(
    out_dir: str | Path,
    rows: int,
    seed: int = 0,
    *,
    rows_per_file: int = 1_000_000,
    row_group_size: int = 131_072,
    params: SyntheticParams | None = None,
    compression: str = "snappy",
) -> dict[str, Any]:
    """Write the same rows as :func:`generate` straight into the ingested Parquet layout.

    A shortcut for benchmarks and tests that skips TSV + ingestion: ``part-00000.parquet`` .. in
    :func:`data_pipeline.schema.parquet_schema`, a minimal ``manifest.json`` (``schema_version``,
    ``files`` [{path, rows}], ``rows``), ``truth.parquet`` and ``synthetic.json``. Row ``i`` here equals
    line ``i`` of :func:`generate` with the same seed and params.
    """
    if rows < 0 or rows_per_file < 1 or row_group_size < 1:
        raise ValueError("rows must be >= 0; rows_per_file and row_group_size >= 1")
    params = params or SyntheticParams()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = _World(params, seed if params.world_seed is None else params.world_seed)
    acc = _Accumulator(out / "truth.parquet")
    files: list[dict[str, Any]] = []
    writer: pq.ParquetWriter | None = None
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush(final: bool) -> None:
        # Buffer so row groups have exactly row_group_size rows (chunk and group sizes differ).
        nonlocal pending, pending_rows
        if not pending:
            return
        t = pa.concat_tables(pending)
        cut = len(t) if final else (len(t) // row_group_size) * row_group_size
        if cut:
            assert writer is not None
            writer.write_table(t.slice(0, cut), row_group_size=row_group_size)
        pending = [t.slice(cut)] if cut < len(t) else []
        pending_rows = len(t) - cut

    try:
        for first, c in _chunks(world, seed, rows):
            acc.add(first, c)
            pos = 0
            while pos < len(c):
                row = first + pos
                if row % rows_per_file == 0:
                    flush(final=True)
                    if writer is not None:
                        writer.close()
                    files.append({"path": f"part-{len(files):05d}.parquet", "rows": 0})
                    writer = pq.ParquetWriter(
                        out / files[-1]["path"], parquet_schema(), compression=compression
                    )
                take = min(len(c) - pos, rows_per_file - row % rows_per_file)
                pending.append(_chunk_table(c.slice(pos, pos + take), row, False))
                pending_rows += take
                files[-1]["rows"] += take
                pos += take
                if pending_rows >= row_group_size:
                    flush(final=False)
        flush(final=True)
    finally:
        if writer is not None:
            writer.close()
        probs, labels = acc.close()
    manifest = {"schema_version": SCHEMA_VERSION, "files": files, "rows": rows, "source": "synthetic"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    summary = _summary(params, world, seed, rows, probs, labels)
    summary["files"] = files
    (out / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
