"""Tests for Criteo ingestion (data_pipeline.preprocess / data_pipeline.sources).

Every bad-input case has a small inline fixture written to tmp_path. The real-data tests use the shared
samples next to the repository and skip cleanly when they are absent (they are never copied in).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_pipeline.preprocess as preprocess
from data_pipeline.preprocess import IngestError, export_tsv, hash_split_is_valid, ingest
from data_pipeline.schema import DENSE_COLUMNS, SPARSE_COLUMNS, parquet_schema

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT.parent / "shared" / "data" / "criteo_samples"
TOY_TRAIN = SAMPLES / "w261_sp19_team13" / "toy_train.tsv.gz"
TOY_TEST = SAMPLES / "w261_sp19_team13" / "toy_test.tsv.gz"
KAGGLE_CSV = SAMPLES / "kaggle_2014_criteo" / "train.tiny.csv"

CSV_HEADER = "Id,Label," + ",".join((*DENSE_COLUMNS, *SPARSE_COLUMNS))


# ---------------------------------------------------------------------------------------------- helpers


def row(
    i: int = 0,
    label: str | None = None,
    dense: dict[int, str] | None = None,
    sparse: dict[int, str] | None = None,
    sep: str = "\t",
) -> str:
    """One well-formed labelled line (no newline) whose values vary with i; label (default i % 2),
    dense and sparse (1-based field index -> text) override fields. See unlabelled_row for 39 fields."""
    lab = str(i % 2) if label is None else label
    d = [str((i * 7 + k) % 50 - 1) for k in range(13)]
    s = [f"{(i * 2654435761 + k * 40503) & 0xFFFFFFFF:08x}" for k in range(26)]
    for k, v in (dense or {}).items():
        d[k - 1] = v
    for k, v in (sparse or {}).items():
        s[k - 1] = v
    return sep.join([lab, *d, *s])


def unlabelled_row(i: int = 0) -> str:
    return row(i).split("\t", 1)[1]


def write(path: Path, text: str | bytes, gz: bool = False) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def lines(n: int, start: int = 0) -> str:
    return "".join(row(i) + "\n" for i in range(start, start + n))


def run(inputs: list[Path], out: Path, **kw) -> dict:
    return ingest(inputs, out, progress=False, **kw)


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]


def read_table(directory: Path) -> pa.Table:
    files = sorted(directory.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else parquet_schema().empty_table()


def assert_conserved(m: dict) -> None:
    assert m["rows_in"] == m["rows_ok"] + m["rows_rejected"]
    for s in m["sources"]:
        assert s["rows_in"] == s["rows_ok"] + s["rows_rejected"]
    assert sum(f["rows"] for f in m["files"]) == m["rows_ok"] == m["rows"]


def single_reject(tmp_path: Path, bad_line: str, **kw) -> dict:
    """Ingest 2 good lines, the bad one (line 3), 1 good line; return the one reject record."""
    src = write(tmp_path / "in.tsv", lines(2) + bad_line + "\n" + lines(1, start=2))
    m = run([src], tmp_path / "out", **kw)
    assert_conserved(m)
    assert (m["rows_in"], m["rows_ok"], m["rows_rejected"]) == (4, 3, 1)
    (reject,) = read_rejects(tmp_path / "out")
    assert reject["line"] == 3 and reject["source"] == str(src)
    assert reject["raw"] == bad_line.rstrip("\r")[:500]
    # The rows around the reject keep consecutive row_ids.
    assert read_table(tmp_path / "out").column("row_id").to_pylist() == [0, 1, 2]
    return reject


# ------------------------------------------------------------------------------------------ happy path


def test_values_types_and_manifest(tmp_path: Path) -> None:
    text = (
        row(
            0,
            "1",
            dense={1: "-5", 2: "", 3: "2147483647", 4: "-2147483648", 5: "007"},
            sparse={1: "", 2: "ABCDEF01", 3: "1a", 4: "ffffffff", 5: "00000000"},
        )
        + "\n"
        + row(1, "0")
        + "\n"
    )
    src = write(tmp_path / "in.tsv", text)
    m = run([src], tmp_path / "out")
    t = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert t.schema.equals(parquet_schema(), check_metadata=False)
    r0 = t.slice(0, 1).to_pylist()[0]
    assert (r0["row_id"], r0["label"]) == (0, 1)
    assert (r0["I1"], r0["I2"], r0["I3"], r0["I4"], r0["I5"]) == (-5, None, 2**31 - 1, -(2**31), 7)
    assert (r0["C1"], r0["C2"], r0["C3"], r0["C4"], r0["C5"]) == (None, 0xABCDEF01, 0x1A, 2**32 - 1, 0)
    assert t.column("C6").to_pylist()[1] == int(row(1).split("\t")[19], 16)
    assert m["rows"] == 2 and m["positives"] == 1 and m["positive_rate"] == 0.5
    assert m["null_counts"]["I2"] == 1 and m["null_counts"]["C1"] == 1 and m["null_counts"]["label"] == 0
    assert m["split"] is None and m["labelled"] is True
    assert m["sources"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    part = (tmp_path / "out" / "part-00000.parquet").read_bytes()
    assert m["files"][0]["sha256"] == hashlib.sha256(part).hexdigest()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert (tmp_path / "out" / "rejects.jsonl").read_text() == ""


def test_file_and_row_group_layout(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(25))
    m = run([src], tmp_path / "out", rows_per_file=10, row_group_size=4)
    assert [f["rows"] for f in m["files"]] == [10, 10, 5]
    for f, groups in zip(m["files"], [[4, 4, 2], [4, 4, 2], [4, 1]], strict=True):
        meta = pq.ParquetFile(tmp_path / "out" / f["path"]).metadata
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == groups
    assert read_table(tmp_path / "out").column("row_id").to_pylist() == list(range(25))


def test_several_inputs_concatenate_in_order(tmp_path: Path) -> None:
    a = write(tmp_path / "a.tsv", lines(3))
    b = write(tmp_path / "b.tsv.gz", lines(4, start=3), gz=True)
    # A third file rather than `a` again: the same file twice is refused (tests/test_ingest_safety.py).
    c = write(tmp_path / "c.tsv", lines(3, start=7))
    m = run([a, b, c], tmp_path / "out")
    assert [s["first_row_id"] for s in m["sources"]] == [0, 3, 7]
    assert [s["rows_ok"] for s in m["sources"]] == [3, 4, 3]
    t = read_table(tmp_path / "out")
    assert t.column("row_id").to_pylist() == list(range(10))
    assert t.column("I1").to_pylist()[:7] == [int(row(i).split("\t")[1]) for i in range(7)]


def test_compression_detected_by_magic_bytes(tmp_path: Path) -> None:
    gz_named_plain = write(tmp_path / "x.tsv.gz", lines(2))
    plain_named_gz = write(tmp_path / "y.tsv", lines(2), gz=True)
    m = run([gz_named_plain, plain_named_gz], tmp_path / "out")
    assert [s["format"]["compression"] for s in m["sources"]] == [None, "gzip"]
    assert m["rows_ok"] == 4


def test_unlabelled_39_fields(tmp_path: Path) -> None:
    src = write(tmp_path / "test.tsv", "".join(unlabelled_row(i) + "\n" for i in range(3)))
    m = run([src], tmp_path / "out")
    t = read_table(tmp_path / "out")
    assert t.column("label").null_count == 3 and m["labelled"] is False
    assert m["positives"] is None and m["positive_rate"] is None
    assert t.column("I1").to_pylist() == [int(unlabelled_row(i).split("\t")[0]) for i in range(3)]
    # A 40-field line in an unlabelled file is a field-count reject.
    src2 = write(tmp_path / "test2.tsv", unlabelled_row(0) + "\n" + row(1) + "\n")
    m2 = run([src2], tmp_path / "out2")
    assert m2["rows_ok"] == 1 and read_rejects(tmp_path / "out2")[0]["reason"] == "40 fields, expected 39"


def test_mixing_labelled_and_unlabelled_is_an_error(tmp_path: Path) -> None:
    a = write(tmp_path / "train.tsv", lines(2))
    b = write(tmp_path / "test.tsv", unlabelled_row(0) + "\n")
    with pytest.raises(IngestError, match="mix labelled and unlabelled.*train.tsv.*test.tsv"):
        run([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kaggle_csv_variant_with_crlf(tmp_path: Path) -> None:
    body = [f"{10000000 + i},{row(i, sep=',')}" for i in range(3)]
    body.insert(1, "10000009," + row(9, label="7", sep=","))  # physical line 3 (the header is line 1)
    src = write(tmp_path / "train.csv", "\r\n".join([CSV_HEADER, *body]) + "\r\n")
    m = run([src], tmp_path / "out")
    assert m["sources"][0]["format"]["kind"] == "csv"
    assert (m["rows_in"], m["rows_ok"], m["rows_rejected"]) == (4, 3, 1)
    (reject,) = read_rejects(tmp_path / "out")
    assert reject["line"] == 3 and reject["kind"] == "label" and not reject["raw"].endswith("\r")
    t = read_table(tmp_path / "out")
    assert t.column_names == parquet_schema().names  # Id dropped
    assert t.column("C26").to_pylist() == [int(row(i).split("\t")[-1], 16) for i in range(3)]


def test_bad_csv_header(tmp_path: Path) -> None:
    src = write(tmp_path / "train.csv", "Id,Label,I1,I2\r\n1,0,1,2\r\n")
    with pytest.raises(IngestError, match="train.csv: line 1: CSV header"):
        run([src], tmp_path / "out")


def test_crlf_tsv(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(3).replace("\n", "\r\n"))
    m = run([src], tmp_path / "out")
    assert m["rows_ok"] == 3 and m["rows_rejected"] == 0
    assert read_table(tmp_path / "out").column("C26").to_pylist() == [int(row(i)[-8:], 16) for i in range(3)]


# ------------------------------------------------------------------------------------- bad lines


def test_wrong_field_count(tmp_path: Path) -> None:
    reject = single_reject(tmp_path, "\t".join(row(5).split("\t")[:30]))
    assert reject["reason"] == "30 fields, expected 40" and reject["kind"] == "field_count"


def test_trailing_tab_is_rejected(tmp_path: Path) -> None:
    reject = single_reject(tmp_path, row(5) + "\t")
    assert reject["reason"] == "41 fields, expected 40: trailing tab"


@pytest.mark.parametrize("value", ["1.5", "abc", "0x10", "+5", " 5", "5 ", "NA", "1e3", "--1", "-"])
def test_non_integer_dense(tmp_path: Path, value: str) -> None:
    reject = single_reject(tmp_path, row(5, dense={3: value}))
    assert reject["kind"] == "dense" and reject["reason"] == f"I3: not an integer: {value!r}"


@pytest.mark.parametrize("value", ["2147483648", "-2147483649", "99999999999999999999999"])
def test_dense_out_of_int32_range(tmp_path: Path, value: str) -> None:
    reject = single_reject(tmp_path, row(5, dense={13: value}))
    assert reject["reason"].startswith("I13: integer") and "outside the int32 range" in reject["reason"]


@pytest.mark.parametrize("value", ["zzzzzzzz", "12-45678", "0x1234", "ab cd", "NULL", "\0" * 8, "gggg"])
def test_bad_hex(tmp_path: Path, value: str) -> None:
    reject = single_reject(tmp_path, row(5, sparse={7: value}))
    assert reject["kind"] == "categorical"
    assert reject["reason"] == f"C7: not a hex string of 1-8 digits: {value!r}"


@pytest.mark.parametrize("value", ["123456789", "0000000001", "ffffffffffffffff"])
def test_overlong_categorical(tmp_path: Path, value: str) -> None:
    reject = single_reject(tmp_path, row(5, sparse={26: value}))
    assert reject["reason"] == f"C26: {len(value)} hex digits, at most 8 allowed: {value!r}"


@pytest.mark.parametrize("value", ["2", "-1", "01", "", "1.0", "yes"])
def test_label_not_binary(tmp_path: Path, value: str) -> None:
    reject = single_reject(tmp_path, row(5, label=value))
    assert reject["kind"] == "label"
    expected = "label is empty, expected 0 or 1" if value == "" else f"label must be 0 or 1, got {value!r}"
    assert reject["reason"] == expected


def test_blank_lines_are_rejects_and_keep_line_numbers(tmp_path: Path) -> None:
    text = lines(2) + "\n" + "\r\n" + row(2, label="9") + "\n" + lines(1, start=3) + "\n"
    src = write(tmp_path / "in.tsv", text)
    m = run([src], tmp_path / "out", max_reject_fraction=1.0)  # 4 of 7 lines rejected, on purpose
    assert_conserved(m)
    got = [(r["line"], r["kind"]) for r in read_rejects(tmp_path / "out")]
    assert got == [(3, "blank_line"), (4, "blank_line"), (5, "label"), (7, "blank_line")]
    assert m["sources"][0]["rejects_by_kind"] == {"blank_line": 3, "label": 1}
    assert (m["rows_in"], m["rows_ok"]) == (7, 3)


def test_stray_carriage_return(tmp_path: Path) -> None:
    reject = single_reject(tmp_path, row(5, dense={4: "1\r2"}))
    assert reject["kind"] == "stray_cr"


def test_non_utf8_bytes_are_a_row_reject(tmp_path: Path) -> None:
    bad = row(5, sparse={3: "ab"}).encode().replace(b"\tab\t", b"\t\xff\xfe\t")
    src = write(tmp_path / "in.tsv", lines(1).encode() + bad + b"\n")
    m = run([src], tmp_path / "out")
    assert m["rows_ok"] == 1
    (reject,) = read_rejects(tmp_path / "out")
    assert reject["line"] == 2 and reject["reason"].startswith("C3: not a hex string")


def test_long_raw_line_is_truncated(tmp_path: Path) -> None:
    reject = single_reject(tmp_path, row(5) + "\t" + "x" * 5000)
    assert len(reject["raw"]) == 500 and reject["kind"] == "field_count"


def test_line_numbers_across_many_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks: rejects land in different chunks, one line is longer than a chunk."""
    monkeypatch.setattr(preprocess, "DEFAULT_CHUNK_BYTES", 700)
    out_lines = []
    expected_rejects = {}
    for i in range(60):
        if i % 13 == 5:
            out_lines.append(row(i, dense={2: "x"}))
            expected_rejects[i + 1] = "dense"
        elif i % 17 == 8:
            out_lines.append("")
            expected_rejects[i + 1] = "blank_line"
        elif i == 30:
            out_lines.append(row(i) + "\t" + "9" * 2000)
            expected_rejects[i + 1] = "field_count"
        else:
            out_lines.append(row(i))
    src = write(tmp_path / "in.tsv.gz", "\n".join(out_lines) + "\n", gz=True)
    m = run([src], tmp_path / "out", rows_per_file=7, row_group_size=3)
    assert_conserved(m)
    assert {r["line"]: r["kind"] for r in read_rejects(tmp_path / "out")} == expected_rejects
    t = read_table(tmp_path / "out")
    kept = [i for i in range(60) if i + 1 not in expected_rejects]
    assert t.column("row_id").to_pylist() == list(range(len(kept)))
    assert t.column("C1").to_pylist() == [int(row(i).split("\t")[14], 16) for i in kept]


def test_nothing_valid_is_an_error(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", row(0, label="x") + "\n" + row(1, label="y") + "\n")
    with pytest.raises(IngestError, match="no valid rows"):
        run([src], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- bad files


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="nope.tsv: no such file"):
        run([tmp_path / "nope.tsv"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_directory_as_input(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="is a directory"):
        run([tmp_path], tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(1))
    src.chmod(0)
    with pytest.raises(IngestError, match="in.tsv: cannot read"):
        run([src], tmp_path / "out")


@pytest.mark.parametrize(
    "name, data",
    [
        ("empty.tsv", b""),
        ("empty.tsv.gz", gzip.compress(b"", mtime=0)),
        ("blank.tsv", b"\n\n"),
        ("header_only.csv", (CSV_HEADER + "\r\n").encode()),
    ],
)
def test_empty_input_is_an_error(tmp_path: Path, name: str, data: bytes) -> None:
    src = write(tmp_path / name, data)
    with pytest.raises(IngestError, match=f"{name}: .*(empty|no rows)"):
        run([src], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_criteo_is_an_error(tmp_path: Path) -> None:
    src = write(tmp_path / "x.tsv", "a\tb\tc\n1\t2\t3\n")
    with pytest.raises(IngestError, match="x.tsv: no line with 40 .* or 39"):
        run([src], tmp_path / "out")


def test_other_compression_is_refused(tmp_path: Path) -> None:
    src = write(tmp_path / "x.tsv.bz2", b"BZh91AY&SY" + b"\0" * 20)
    with pytest.raises(IngestError, match="bzip2"):
        run([src], tmp_path / "out")


def test_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(lines(300).encode(), mtime=0)
    src = write(tmp_path / "cut.tsv.gz", data[: len(data) * 2 // 3])
    with pytest.raises(IngestError, match="cut.tsv.gz: truncated gzip"):
        run([src], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first input is fine and already partly written when the second turns out truncated."""
    monkeypatch.setattr(preprocess, "DEFAULT_CHUNK_BYTES", 64 << 10)
    closed: list[str] = []
    close_file = preprocess._ShardWriter._close_file

    def spy(self: preprocess._ShardWriter) -> None:
        if self._current is not None:
            closed.append(self._current.path.name)
        close_file(self)

    monkeypatch.setattr(preprocess._ShardWriter, "_close_file", spy)
    good = write(tmp_path / "good.tsv", lines(200))
    # Long enough that format detection (first 1 MiB) passes and the damage is met mid-stream.
    data = gzip.compress(lines(6000).encode(), mtime=0)
    cut = write(tmp_path / "cut.tsv.gz", data[: len(data) * 9 // 10])
    out = tmp_path / "data" / "out"
    with pytest.raises(IngestError, match="cut.tsv.gz: truncated gzip"):
        run([good, cut], out, rows_per_file=1000, row_group_size=100)
    assert len(closed) >= 2  # part files had been written when it failed
    assert not out.exists()
    assert list((tmp_path / "data").iterdir()) == []  # no temp dir left behind either


def test_existing_out_dir(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(3))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(IngestError, match="already exists"):
        run([src], out)
    assert (out / "old.txt").exists()
    # overwrite replaces only a directory ingest made (more cases in tests/test_ingest_safety.py): this
    # one is the user's, so it is refused and kept.
    with pytest.raises(IngestError, match="not a data set this project made"):
        run([src], out, overwrite=True)
    assert (out / "old.txt").read_text() == "old"
    ours = tmp_path / "ours"
    run([write(tmp_path / "in2.tsv", lines(2))], ours)
    m = run([src], ours, overwrite=True)
    assert m["rows_ok"] == 3 and json.loads((ours / "manifest.json").read_text())["rows_ok"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tsv", "in2.tsv", "ours", "out"]


def test_bad_arguments(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(3))
    with pytest.raises(ValueError):
        run([src], tmp_path / "out", valid_fraction=1.0)
    with pytest.raises(ValueError):
        run([src], tmp_path / "out", split="random")  # type: ignore[arg-type]
    with pytest.raises(IngestError, match="no input"):
        run([], tmp_path / "out")


# ------------------------------------------------------------------------------ determinism, splits


def test_rerun_is_byte_identical(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(40) + "bad line\n" + lines(10, start=40))
    for out in ("a", "b"):
        run(
            [src],
            tmp_path / out,
            rows_per_file=16,
            row_group_size=5,
            valid_fraction=0.3,
            split="hash",
            seed=3,
        )
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 8
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


@pytest.mark.parametrize("split", ["time", "hash"])
def test_split_is_disjoint_and_complete(tmp_path: Path, split: str) -> None:
    src = write(tmp_path / "in.tsv", lines(103))
    out = tmp_path / "out"
    m = run([src], out, valid_fraction=0.25, split=split, seed=7, rows_per_file=20, row_group_size=6)
    assert_conserved(m)
    train = read_table(out / "train").column("row_id").to_numpy()
    valid = read_table(out / "valid").column("row_id").to_numpy()
    assert len(np.intersect1d(train, valid)) == 0
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(103))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(valid) > 0)
    if split == "time":
        assert train.tolist() == list(range(77)) and valid.tolist() == list(range(77, 103))
    else:
        assert np.array_equal(hash_split_is_valid(np.arange(103), 0.25, 7).nonzero()[0], valid)
        assert 10 < len(valid) < 45
    # Rows keep their values, not just their ids.
    full = {
        r["row_id"]: r for r in read_table(out / "train").to_pylist() + read_table(out / "valid").to_pylist()
    }
    assert [full[i]["C2"] for i in range(103)] == [int(row(i).split("\t")[15], 16) for i in range(103)]
    assert not (out / "part-00000.parquet").exists() and not (out / "_resplit").exists()
    for name, ids in (("train", train), ("valid", valid)):
        sub = json.loads((out / name / "manifest.json").read_text())
        assert sub["rows"] == len(ids) == m["split"][name]["rows"]
        assert [f["rows"] for f in sub["files"]][:-1] == [20] * (len(sub["files"]) - 1)
        for f in sub["files"]:
            meta = pq.ParquetFile(out / name / f["path"]).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            assert all(s == 6 for s in sizes[:-1]) and f["rows"] == sum(sizes)
    assert sorted(f["path"].split("/")[0] for f in m["files"]) == ["train"] * len(
        list((out / "train").glob("*.parquet"))
    ) + ["valid"] * len(list((out / "valid").glob("*.parquet")))


def test_time_split_on_a_file_boundary(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(100))
    m = run([src], tmp_path / "out", valid_fraction=0.2, rows_per_file=20, row_group_size=8)
    assert [f["path"] for f in m["files"]] == [f"train/part-0000{i}.parquet" for i in range(4)] + [
        "valid/part-00000.parquet"
    ]
    assert read_table(tmp_path / "out" / "valid").column("row_id").to_pylist() == list(range(80, 100))


def test_empty_split_warns(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(2))
    with pytest.warns(UserWarning, match="valid split is empty"):
        m = run([src], tmp_path / "out", valid_fraction=0.2)
    assert m["split"]["valid"]["rows"] == 0 and m["split"]["train"]["rows"] == 2


@pytest.mark.parametrize("days, rows_per_file", [(7, 20), (3, 1000), (2, 7)])
def test_day_split_partitions_the_rows_in_time_order(tmp_path: Path, days: int, rows_per_file: int) -> None:
    from data_pipeline.manifest import data_files
    from data_pipeline.preprocess import day_cuts

    src = write(tmp_path / "in.tsv", lines(103))
    out = tmp_path / "out"
    m = run([src], out, days=days, rows_per_file=rows_per_file, row_group_size=6)
    assert m["split"]["method"] == "days" and m["split"]["dirs"] == [f"day{d:02d}" for d in range(days)]
    ids = [read_table(out / f"day{d:02d}").column("row_id").to_pylist() for d in range(days)]
    # contiguous, in order, covering every row once, of equal sizes (± 1)
    assert sum(ids, []) == list(range(103))
    assert max(map(len, ids)) - min(map(len, ids)) <= 1
    assert [x[0] for x in ids[1:]] == day_cuts(103, days)
    for d in range(days):
        sub = json.loads((out / f"day{d:02d}" / "manifest.json").read_text())
        assert (
            sub["rows"] == len(ids[d]) == m["split"][f"day{d:02d}"]["rows"] and sub["split"] == f"day{d:02d}"
        )
        assert [p.name for p in data_files(out / f"day{d:02d}")] == sorted(
            p.name for p in (out / f"day{d:02d}").glob("*.parquet")
        )
    assert not (out / "_resplit").exists() and not list(out.glob("*.parquet"))
    # rows keep their values; a re-run is byte-identical; overwrite replaces a day-split data set
    full = {r["row_id"]: r for d in range(days) for r in read_table(out / f"day{d:02d}").to_pylist()}
    assert [full[i]["C2"] for i in range(103)] == [int(row(i).split("\t")[15], 16) for i in range(103)]
    again = run([src], tmp_path / "again", days=days, rows_per_file=rows_per_file, row_group_size=6)
    assert again == m
    run([src], out, days=days, rows_per_file=rows_per_file, row_group_size=6, overwrite=True)


def test_day_split_options_are_checked(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(10))
    with pytest.raises(ValueError, match="each day is the next one's hold-out"):
        run([src], tmp_path / "a", days=3, valid_fraction=0.2)
    with pytest.raises(ValueError, match=r"days must be 0 \(no day split\) or in \[2, 100\], got 1"):
        run([src], tmp_path / "b", days=1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_hash_split_depends_on_seed() -> None:
    ids = np.arange(10_000)
    a, b = hash_split_is_valid(ids, 0.2, 0), hash_split_is_valid(ids, 0.2, 1)
    assert abs(a.mean() - 0.2) < 0.02 and not np.array_equal(a, b)
    assert np.array_equal(a, hash_split_is_valid(ids, 0.2, 0))


# ----------------------------------------------------------------------------------------- export


def test_export_roundtrip_inline(tmp_path: Path) -> None:
    text = lines(5) + row(5, dense={1: "", 2: "-3"}, sparse={1: "", 26: ""}) + "\n"
    src = write(tmp_path / "in.tsv", text)
    run([src], tmp_path / "out")
    assert export_tsv(tmp_path / "out", tmp_path / "back.tsv") == 6
    assert (tmp_path / "back.tsv").read_text() == text
    assert export_tsv(tmp_path / "out", tmp_path / "back.tsv.gz") == 6
    assert gzip.decompress((tmp_path / "back.tsv.gz").read_bytes()).decode() == text


def test_export_unlabelled_and_normalised_hex(tmp_path: Path) -> None:
    text = unlabelled_row(0) + "\n"
    src = write(tmp_path / "in.tsv", text.replace(text.split("\t")[13], "ABC"))
    run([src], tmp_path / "out")
    export_tsv(tmp_path / "out", tmp_path / "back.tsv")
    back = (tmp_path / "back.tsv").read_text().rstrip("\n").split("\t")
    assert len(back) == 39 and back[13] == "00000abc"


# -------------------------------------------------------------------------------------- real data


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared Criteo sample not present: {path}")


def test_real_toy_train_counts_and_roundtrip(tmp_path: Path) -> None:
    _need(TOY_TRAIN)
    m = ingest([TOY_TRAIN], tmp_path / "out", progress=False, rows_per_file=100_000)
    assert (m["rows_ok"], m["positives"], m["rows_rejected"]) == (137_139, 35_213, 0)
    assert m["sources"][0]["sha256"] == "fb555ab8696ee290f3b8cf629a13018bac7ae330b7b9d67c41ee348dd6e006d7"
    assert export_tsv(tmp_path / "out", tmp_path / "back.tsv") == 137_139
    original = gzip.decompress(TOY_TRAIN.read_bytes())
    assert (tmp_path / "back.tsv").read_bytes() == original


def test_real_toy_test_unlabelled(tmp_path: Path) -> None:
    _need(TOY_TEST)
    m = ingest([TOY_TEST], tmp_path / "out", progress=False)
    assert (m["rows_ok"], m["rows_rejected"], m["labelled"]) == (18_181, 0, False)


def test_real_kaggle_csv(tmp_path: Path) -> None:
    _need(KAGGLE_CSV)
    m = ingest([KAGGLE_CSV], tmp_path / "out", progress=False)
    assert (m["rows_ok"], m["rows_rejected"], m["positives"]) == (1_999, 0, 418)
    assert m["sources"][0]["format"]["kind"] == "csv"
    t = read_table(tmp_path / "out")
    first = KAGGLE_CSV.read_text().splitlines()[1].split(",")  # Id,Label,I1..
    assert t.slice(0, 1).to_pylist()[0]["I5"] == int(first[6])
    assert t.slice(0, 1).to_pylist()[0]["C1"] == int(first[15], 16)


def test_export_needs_part_files(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(10))
    run([src], tmp_path / "out", valid_fraction=0.2)
    with pytest.raises(IngestError, match="export train/ and valid/ separately"):
        export_tsv(tmp_path / "out", tmp_path / "x.tsv")
    assert export_tsv(tmp_path / "out" / "valid", tmp_path / "v.tsv") == 2
    assert (tmp_path / "v.tsv").read_text() == lines(2, start=8)


def test_progress_and_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "in.tsv", lines(3) + "\n")
    m = ingest([src], tmp_path / "out", progress=True)  # stderr is no terminal here: the bar stays quiet
    assert m["rows_ok"] == 3
    from recsys_codistill.cli import main as cli_main

    assert cli_main(["ingest", str(src), "--out", str(tmp_path / "cli"), "--valid-fraction", "0.34"]) == 0
    out = capsys.readouterr().out
    assert '"rows_ok": 3' in out and '"rows_rejected": 1' in out
    assert json.loads((tmp_path / "cli" / "valid" / "manifest.json").read_text())["rows"] == 1
    assert cli_main(["ingest", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "cli2")]) == 2
    assert "missing.tsv: no such file" in capsys.readouterr().err
