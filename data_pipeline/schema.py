"""The Criteo row format and the Parquet schema every other module agrees on.

Raw rows (Criteo Display Advertising Challenge): ``label \\t I1..I13 \\t C1..C26``; an empty field is a
missing value. ``I*`` are integers (may be negative), ``C*`` are 32-bit hashes written as 8 hex digits.
Unlabelled (test) files have the same 39 fields without the label.

Ingested Parquet keeps every value losslessly (the DLRM transforms are applied at load time, so table sizes
and dense transforms stay model choices):

- ``row_id``  int64, not null: 0-based index of the row among the accepted rows of one ingest, in input
  order (input files in the order given, lines in file order). It is the join key for predictions/churn and
  the basis of hash hold-outs.
- ``label``   int8, nullable (null only for unlabelled inputs).
- ``I1..I13`` int32, nullable.
- ``C1..C26`` uint32, nullable (hex decoded).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_COLUMNS: tuple[str, ...] = tuple(f"I{i}" for i in range(1, NUM_DENSE + 1))
SPARSE_COLUMNS: tuple[str, ...] = tuple(f"C{i}" for i in range(1, NUM_SPARSE + 1))
LABEL_COLUMN = "label"
ROW_ID_COLUMN = "row_id"
RAW_COLUMNS: tuple[str, ...] = (LABEL_COLUMN, *DENSE_COLUMNS, *SPARSE_COLUMNS)

# Criteo's hashes are 32-bit: 8 hex digits at most.
MAX_HEX_DIGITS = 8


def parquet_schema() -> pa.Schema:
    """Explicit Arrow schema of ingested shards (never inferred, so every shard is identical)."""
    fields = [
        pa.field(ROW_ID_COLUMN, pa.int64(), nullable=False),
        pa.field(LABEL_COLUMN, pa.int8(), nullable=True),
    ]
    fields += [pa.field(c, pa.int32(), nullable=True) for c in DENSE_COLUMNS]
    fields += [pa.field(c, pa.uint32(), nullable=True) for c in SPARSE_COLUMNS]
    return pa.schema(fields, metadata={b"recsys_codistill.schema_version": str(SCHEMA_VERSION).encode()})
