"""Ingest and export must never destroy what the project did not create, and must turn every bad line and
every OS failure into a clear error or a reject (README, "Trust model").

Each test names the defect it pins down; the user's files are checked to survive every refusal.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import data_pipeline.preprocess as preprocess
import data_pipeline.sources as sources
from data_pipeline.loader import CriteoStream
from data_pipeline.preprocess import MARKER_NAME, IngestError, export_tsv, ingest
from data_pipeline.schema import DENSE_COLUMNS, SPARSE_COLUMNS
from recsys_codistill.cli import main as cli_main

REPO_ROOT = Path(__file__).resolve().parents[1]
CSV_HEADER = "Id,Label," + ",".join((*DENSE_COLUMNS, *SPARSE_COLUMNS))


def row(i: int = 0, label: str | None = None, sparse: dict[int, str] | None = None, sep: str = "\t") -> str:
    """One well-formed labelled line (no newline) whose values vary with i."""
    lab = str(i % 2) if label is None else label
    d = [str((i * 7 + k) % 50 - 1) for k in range(13)]
    s = [f"{(i * 2654435761 + k * 40503) & 0xFFFFFFFF:08x}" for k in range(26)]
    for k, v in (sparse or {}).items():
        s[k - 1] = v
    return sep.join([lab, *d, *s])


def lines(n: int, start: int = 0) -> str:
    return "".join(row(i) + "\n" for i in range(start, start + n))


def write(path: Path, data: str | bytes, gz: bool = False) -> Path:
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def run(inputs: list[Path] | list[str], out: Path | str, **kw) -> dict:
    return ingest(inputs, out, progress=False, **kw)


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under directory (relative path -> bytes): to prove a refusal changed nothing."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------- 1. overwrite deletes only ours


def test_overwrite_refuses_the_directory_holding_its_inputs(tmp_path: Path) -> None:
    """The reported case: `ingest D/in.tsv.gz --out D --overwrite` deleted D with the input in it."""
    d = tmp_path / "d"
    src = write(d / "in.tsv.gz", lines(5), gz=True)
    (d / "notes.txt").write_text("mine")
    before = snapshot(d)
    with pytest.raises(IngestError, match=rf"{d}: refusing .*contains the input file {src}"):
        run([src], d, overwrite=True)
    assert snapshot(d) == before
    # Deeper inside, and through '..' or a symlink to D: the same.
    deep = write(d / "a" / "b" / "in.tsv", lines(5))
    with pytest.raises(IngestError, match="contains the input file"):
        run([deep], d, overwrite=True)
    with pytest.raises(IngestError, match="contains the input file"):
        run([deep], d / "a" / "..", overwrite=True)
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(IngestError, match="contains the input file"):
        run([tmp_path / "link" / "in.tsv.gz"], d, overwrite=True)
    assert (d / "in.tsv.gz").exists() and (d / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_data_set_that_holds_an_input(tmp_path: Path) -> None:
    """Even a directory ingest made is not replaced while an input lives in it."""
    out = tmp_path / "out"
    run([write(tmp_path / "a.tsv", lines(4))], out)
    inside = write(out / "extra.tsv", lines(3))
    with pytest.raises(IngestError, match="contains the input file"):
        run([inside], out, overwrite=True)
    assert inside.exists() and (out / "manifest.json").exists()


def test_overwrite_refuses_the_working_directory_and_what_contains_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write(tmp_path / "in.tsv", lines(4))
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work / "sub")
    for out in (work / "sub", work, Path("."), Path(".."), Path("../sub/..")):
        for overwrite in (False, True):
            with pytest.raises(IngestError, match="current working directory"):
                run([src], out, overwrite=overwrite)
    assert (work / "keep.txt").read_text() == "mine" and (work / "sub").is_dir()


def test_cli_out_dot_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    src = write(tmp_path / "in.tsv", lines(4))
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert cli_main(["ingest", str(src), "--out", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "error: .: refusing to write the data set there: it is (or contains) the current working" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]


def test_overwrite_refuses_root_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write(tmp_path / "in.tsv", lines(4))
    with pytest.raises(IngestError, match="filesystem root"):
        run([src], "/", overwrite=True)
    home = tmp_path / "people" / "me"
    home.mkdir(parents=True)
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    for out in (home, home.parent):
        with pytest.raises(IngestError, match="home directory"):
            run([src], out, overwrite=True)
    assert (home / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_directory_ingest_did_not_make(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(4))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "photo.jpg").write_bytes(b"\xff\xd8")
    # A manifest.json of someone else (here: the shape synthetic.py and the test fixtures write).
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"files": [{"path": "part-00000.parquet", "rows": 1}]}))
    (other / "part-00000.parquet").write_bytes(b"PAR1")
    # Another part of the project (a checkpoint, say) with a manifest of its own: not ingest's.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text(
        json.dumps(
            {
                "created_by": "recsys-codistill 0.1 recsys_codistill.train.checkpoint",
                "files": [{"path": "w.pt"}],
            }
        )
    )
    (ckpt / "w.pt").write_bytes(b"weights")
    # A marker that someone else wrote.
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / MARKER_NAME).write_text(json.dumps({"created_by": "not us"}))
    (forged / "data.csv").write_text("x")
    for d in (plain, other, ckpt, forged):
        before = snapshot(d)
        with pytest.raises(IngestError, match=rf"{d}: refusing to replace it with overwrite=True: "):
            run([src], d, overwrite=True)
        assert snapshot(d) == before, d
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt", "forged", "in.tsv", "other", "plain"]  # and no temp dir left


def test_overwrite_refuses_a_data_set_with_foreign_files(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(4))
    out = tmp_path / "out"
    run([src], out, valid_fraction=0.25)
    (out / "my_notes.txt").write_text("mine")
    (out / "train" / "extra.parquet").write_bytes(b"mine too")
    before = snapshot(out)
    with pytest.raises(
        IngestError, match="holds files ingest did not write: my_notes.txt, train/extra.parquet"
    ):
        run([src], out, overwrite=True)
    assert snapshot(out) == before


def test_overwrite_replaces_a_data_set_ingest_made(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run([write(tmp_path / "a.tsv", lines(4))], out, valid_fraction=0.25)
    assert json.loads((out / MARKER_NAME).read_text())["created_by"].startswith("recsys-codistill ")
    m = run([write(tmp_path / "b.tsv", lines(6))], out, overwrite=True)
    assert m["rows_ok"] == 6 and m["marker"] == MARKER_NAME and not (out / "train").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "b.tsv", "out"]


def test_overwrite_replaces_a_data_set_from_before_the_marker(tmp_path: Path) -> None:
    """Earlier versions wrote no marker: their manifest's created_by, and nothing but the files it lists
    (plus rejects.jsonl), prove the directory is ours."""
    out = tmp_path / "out"
    src = write(tmp_path / "a.tsv", lines(4))
    run([src], out, valid_fraction=0.25, split="hash")
    (out / MARKER_NAME).unlink()
    assert run([src], out, overwrite=True)["rows_ok"] == 4
    (out / MARKER_NAME).unlink()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(IngestError, match="holds files ingest did not write: mine.txt"):
        run([src], out, overwrite=True)
    assert (out / "mine.txt").exists()


def test_overwrite_refuses_a_symlink(tmp_path: Path) -> None:
    out = tmp_path / "out"
    src = write(tmp_path / "a.tsv", lines(4))
    run([src], out)
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(IngestError, match="symbolic link"):
        run([src], tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and (out / "manifest.json").exists()


def test_cli_names_the_flag_not_the_keyword(tmp_path: Path, capsys) -> None:
    src = write(tmp_path / "in.tsv", lines(4))
    (tmp_path / "out").mkdir()
    assert cli_main(["ingest", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert cli_main(["ingest", str(src), "--out", str(tmp_path / "out"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace it with --overwrite" in err and "overwrite=True" not in err


def test_marker_does_not_disturb_readers(tmp_path: Path) -> None:
    """Readers list files from manifest.json; the marker is named there and is no part file."""
    out = tmp_path / "out"
    m = run([write(tmp_path / "a.tsv", lines(20))], out)
    assert (out / MARKER_NAME).is_file() and m["marker"] == MARKER_NAME
    assert MARKER_NAME not in [f["path"] for f in m["files"]]
    stream = CriteoStream(out, batch_size=4, table_sizes=[10] * 26, shuffle=False)
    assert stream.total_rows == 20
    assert export_tsv(out, tmp_path / "back.tsv") == 20


# --------------------------------------------------- 2. format from a sample; fail on an extreme reject rate


def test_labelled_file_whose_first_line_has_39_fields(tmp_path: Path) -> None:
    """The reported case: ingested as unlabelled, 10,000 good rows rejected, exit 0."""
    first = row(0).split("\t", 1)[1]  # 39 fields
    src = write(tmp_path / "in.tsv", first + "\n" + lines(10_000, start=1))
    m = run([src], tmp_path / "out")
    assert m["labelled"] is True and (m["rows_ok"], m["rows_rejected"]) == (10_000, 1)
    (reject,) = read_rejects(tmp_path / "out")
    assert reject["line"] == 1 and reject["reason"] == "39 fields, expected 40"


def test_too_many_rejects_fail_and_publish_nothing(tmp_path: Path) -> None:
    """Most lines bad: an error naming the file and why, and an existing out dir stays as it was."""
    out = tmp_path / "out"
    run([write(tmp_path / "good.tsv", lines(5))], out)
    before = snapshot(out)
    text = "".join(row(i, label="7") + "\n" if i % 5 else row(i) + "\n" for i in range(100))  # 80% bad
    src = write(tmp_path / "bad.tsv", text)
    with pytest.raises(
        IngestError,
        match=r"bad.tsv: 80 of 100 lines rejected \(80.0%\), more than "
        r"max_reject_fraction=0.5 allows; nothing was written. Rejected: label x80, e.g. line 2",
    ):
        run([src], out, overwrite=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "good.tsv", "out"]
    m = run([src], tmp_path / "out2", max_reject_fraction=0.8)  # 0.8 is not more than 0.8
    assert (m["rows_ok"], m["rows_rejected"]) == (20, 80)
    with pytest.raises(ValueError, match="max_reject_fraction"):
        run([src], tmp_path / "out3", max_reject_fraction=float("nan"))


def test_cli_reject_fraction_flag_and_summary(tmp_path: Path, capsys) -> None:
    text = lines(3) + row(3, label="x") + "\n"
    src = write(tmp_path / "in.tsv", text)
    assert cli_main(["ingest", str(src), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert f"ingest: 4 rows in, 3 ok, 1 rejected (rejects: {tmp_path / 'a' / 'rejects.jsonl'})" in err
    assert cli_main(["ingest", str(src), "--out", str(tmp_path / "b"), "--max-reject-fraction", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "more than --max-reject-fraction 0.1 allows" in err and not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        cli_main(["ingest", str(src), "--out", str(tmp_path / "c"), "--max-reject-fraction", "1.5"])
    assert "--max-reject-fraction: must be a number in [0, 1]" in capsys.readouterr().err


# ------------------------------------------------------------------- 3. no line aborts the whole file


def test_a_3mb_line_is_a_reject_with_its_line_number(tmp_path: Path) -> None:
    """Arrow's 1 MiB block made a line over ~2 MB abort the file."""
    long_value = row(5, sparse={3: "a" * 3_000_000})  # 40 fields, one huge id
    long_shape = "1\t" + "9" * 3_000_000  # 2 fields, huge
    text = lines(5) + long_value + "\n" + lines(5, start=6) + long_shape + "\n" + lines(5, start=11)
    for gz in (False, True):
        out = tmp_path / f"out{gz}"
        m = run([write(tmp_path / f"in{gz}.tsv", text, gz=gz)], out)
        assert (m["rows_in"], m["rows_ok"], m["rows_rejected"]) == (17, 15, 2)
        got = [(r["line"], r["kind"]) for r in read_rejects(out)]
        assert got == [(6, "categorical"), (12, "field_count")]
    # As the very first line too: format detection samples past it.
    m = run([write(tmp_path / "first.tsv", long_value + "\n" + lines(5))], tmp_path / "first")
    assert (m["labelled"], m["rows_ok"], read_rejects(tmp_path / "first")[0]["line"]) == (True, 5, 1)


def test_non_utf8_line_with_the_wrong_field_count(tmp_path: Path) -> None:
    bad = b"\t".join([b"\xff\xfe"] * 20)
    src = write(tmp_path / "in.tsv", lines(3).encode() + bad + b"\n" + lines(3, start=4).encode())
    m = run([src], tmp_path / "out")
    assert (m["rows_ok"], m["rows_rejected"]) == (6, 1)
    (reject,) = read_rejects(tmp_path / "out")
    assert (reject["line"], reject["kind"], reject["reason"]) == (4, "field_count", "20 fields, expected 40")


def test_a_line_over_the_limit_is_dropped_as_a_reject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines longer than the 64 MiB limit (scaled down here) no longer abort: they are rejects too."""
    monkeypatch.setattr(sources, "_MAX_LINE_BYTES", 5000)
    monkeypatch.setattr(preprocess, "DEFAULT_CHUNK_BYTES", 1024)
    huge = row(20, sparse={1: "b" * 20_000})
    text = lines(20) + huge + "\n" + lines(20, start=21)
    for tail in ("", "c" * 20_000):  # also as the last line, without a newline
        out = tmp_path / f"out{len(tail)}"
        m = run([write(tmp_path / f"in{len(tail)}.tsv", text + tail)], out)
        assert m["rows_ok"] == 40
        rejects = read_rejects(out)
        assert [(r["line"], r["kind"]) for r in rejects] == [(21, "line_length")] + (
            [(42, "line_length")] * bool(tail)
        )
        assert (
            rejects[0]["reason"]
            == f"line of {len(huge)} bytes, longer than the limit of 5000 bytes: not Criteo data"
        )
        assert rejects[0]["raw"] == huge[:500]


# ----------------------------------------------------------------------------- 4. duplicated inputs


def test_the_same_input_twice_is_refused(tmp_path: Path) -> None:
    a = write(tmp_path / "a.tsv", lines(4))
    b = write(tmp_path / "b.tsv", lines(4, start=4))
    (tmp_path / "link.tsv").symlink_to(a)
    os.link(a, tmp_path / "hard.tsv")
    write(tmp_path / "copy.tsv", a.read_bytes())
    cases = [
        ([a, b, a], rf"input {a} is given twice"),
        ([a, b, tmp_path / "x" / ".." / "a.tsv"], "is given twice"),
        ([a, tmp_path / "link.tsv"], rf"inputs {a} and {tmp_path / 'link.tsv'} are the same file"),
        ([a, tmp_path / "hard.tsv"], "are the same file"),
        ([a, b, tmp_path / "copy.tsv"], rf"inputs {a} and {tmp_path / 'copy.tsv'} have the same content"),
    ]
    (tmp_path / "x").mkdir()
    for inputs, message in cases:
        with pytest.raises(IngestError, match=message):
            run(inputs, tmp_path / "out")
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- 5. BOM


def test_kaggle_csv_with_a_utf8_bom(tmp_path: Path) -> None:
    body = "".join(f"{i},{row(i, sep=',')}\r\n" for i in range(3))
    src = write(tmp_path / "train.csv", ("\ufeff" + CSV_HEADER + "\r\n" + body).encode())
    m = run([src], tmp_path / "out")
    assert (m["rows_ok"], m["rows_rejected"]) == (3, 0) and m["sources"][0]["format"]["bom"] is True
    # A TSV with one too: the BOM is no part of the first label.
    tsv = write(tmp_path / "in.tsv", b"\xef\xbb\xbf" + lines(3).encode(), gz=True)
    m = run([tsv], tmp_path / "out2")
    assert (m["rows_ok"], m["rows_rejected"]) == (3, 0)
    assert export_tsv(tmp_path / "out2", tmp_path / "back.tsv") == 3
    assert (tmp_path / "back.tsv").read_text() == lines(3)


# ------------------------------------------------------------------------ 6. OS errors are IngestErrors


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(4))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(
            IngestError, match=rf"{ro / 'out'}: cannot create the output directory .*Permission"
        ):
            run([src], ro / "out")
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_disk_full_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated (works as root too): ENOSPC from the Parquet writer."""

    def full(self: preprocess._ShardWriter, group: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory / "part-00000.parquet"))

    monkeypatch.setattr(preprocess._ShardWriter, "_write_group", full)
    src = write(tmp_path / "in.tsv", lines(4))
    out = tmp_path / "data" / "out"
    with pytest.raises(
        IngestError, match=rf"{out}: cannot write the dataset \(.*part-00000.parquet: No space left"
    ):
        run([src], out)
    assert list((tmp_path / "data").iterdir()) == []  # no out, no temp dir


def test_unwritable_output_path_via_cli(tmp_path: Path, capsys) -> None:
    """A real OS error (the parent is a file), through the CLI: a one-line error, no traceback."""
    src = write(tmp_path / "in.tsv", lines(4))
    (tmp_path / "afile").write_text("x")
    assert cli_main(["ingest", str(src), "--out", str(tmp_path / "afile" / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'afile' / 'out'}: cannot create the output directory" in err and "Traceback" not in err
    )
    assert (tmp_path / "afile").read_text() == "x"


def test_export_disk_full_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run([write(tmp_path / "in.tsv", lines(4))], tmp_path / "out")
    (tmp_path / "back.tsv").write_text("old")

    def full(column: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(preprocess, "_hex8", full)
    with pytest.raises(
        IngestError, match=rf"{tmp_path / 'back.tsv'}: cannot write the export: No space left"
    ):
        export_tsv(tmp_path / "out", tmp_path / "back.tsv", overwrite=True)
    assert (tmp_path / "back.tsv").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.tsv", "in.tsv", "out"]
    with pytest.raises(IngestError, match="no such directory"):
        export_tsv(tmp_path / "out", tmp_path / "missing" / "x.tsv")


# ------------------------------------------------------------------ 7. a killed ingest's temp directory


def test_killed_ingest_temp_dir_is_removed_by_the_next_ingest(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(4))
    out = tmp_path / "out"
    # A real kill -9 in the middle of an ingest (after its temp dir and marker exist).
    code = (
        "import os, signal, sys\n"
        "import data_pipeline.preprocess as p\n"
        "p._ingest_into = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"p.ingest([{str(src)!r}], {str(out)!r}, progress=False)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=False)
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert json.loads((left / MARKER_NAME).read_text())["pid"] == int(left.name.split("-")[1])
    run([src], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tsv", "out"]


def test_stale_temp_clean_up_touches_nothing_else(tmp_path: Path) -> None:
    src = write(tmp_path / "in.tsv", lines(4))
    host = socket.gethostname()
    created_by = preprocess._created_by()
    gone = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:

        def fake(name: str, marker: dict | None) -> Path:
            d = tmp_path / name
            d.mkdir()
            (d / "data.bin").write_bytes(b"precious")
            if marker is not None:
                (d / MARKER_NAME).write_text(json.dumps(marker))
            return d

        stale = fake(f".out.tmp-{gone}-0123abcd", {"created_by": created_by, "pid": gone, "host": host})
        stale_old = fake(f".out.old-{gone}-0123abce", {"created_by": created_by, "pid": gone, "host": host})
        kept = [
            fake(f".out.tmp-{gone}-0123abcf", None),  # no marker
            fake(f".out.tmp-{gone}-0123abd0", {"created_by": "someone else", "pid": gone, "host": host}),
            fake(f".out.tmp-{gone}-0123abd1", {"created_by": created_by, "pid": gone + 1, "host": host}),
            fake(f".out.tmp-{gone}-0123abd2", {"created_by": created_by, "pid": gone, "host": "elsewhere"}),
            fake(
                f".out.tmp-{alive.pid}-0123abd3", {"created_by": created_by, "pid": alive.pid, "host": host}
            ),
            fake(f".out.tmp-{gone}-0123abd4x", {"created_by": created_by, "pid": gone, "host": host}),  # name
            fake(f".other.tmp-{gone}-0123abd5", {"created_by": created_by, "pid": gone, "host": host}),
            fake(f"out.tmp-{gone}-0123abd6", {"created_by": created_by, "pid": gone, "host": host}),
        ]
        target = fake("target", None)
        (tmp_path / f".out.tmp-{gone}-0123abd7").symlink_to(target)  # a link: never followed
        (target / MARKER_NAME).write_text(json.dumps({"created_by": created_by, "pid": gone, "host": host}))
        run([src], tmp_path / "out")
        assert not stale.exists() and not stale_old.exists()
        for d in [*kept, target]:
            assert (d / "data.bin").read_bytes() == b"precious", d
        assert (tmp_path / f".out.tmp-{gone}-0123abd7").is_symlink()
    finally:
        alive.kill()
        alive.wait()


# -------------------------------------------------------------------------- 8. export: atomic, no clobber


def test_export_refuses_an_existing_file_unless_overwrite(tmp_path: Path, capsys) -> None:
    run([write(tmp_path / "in.tsv", lines(4))], tmp_path / "out")
    target = tmp_path / "back.tsv"
    target.write_text("mine")
    with pytest.raises(IngestError, match=rf"{target}: already exists \(pass overwrite=True"):
        export_tsv(tmp_path / "out", target)
    assert target.read_text() == "mine"
    assert cli_main(["export", str(tmp_path / "out"), str(target)]) == 2
    assert "already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert target.read_text() == "mine"
    assert cli_main(["export", str(tmp_path / "out"), str(target), "--overwrite"]) == 0
    assert target.read_text() == lines(4)
    assert export_tsv(tmp_path / "out", tmp_path / "back.tsv.gz") == 4
    assert gzip.decompress((tmp_path / "back.tsv.gz").read_bytes()).decode() == lines(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.tsv", "back.tsv.gz", "in.tsv", "out"]


def test_export_refuses_a_directory_or_a_file_inside_the_data_set(tmp_path: Path) -> None:
    run([write(tmp_path / "in.tsv", lines(4))], tmp_path / "out")
    (tmp_path / "dir").mkdir()
    with pytest.raises(IngestError, match="is a directory"):
        export_tsv(tmp_path / "out", tmp_path / "dir", overwrite=True)
    part = tmp_path / "out" / "part-00000.parquet"
    before = part.read_bytes()
    with pytest.raises(IngestError, match="inside the data set"):
        export_tsv(tmp_path / "out", part, overwrite=True)
    assert part.read_bytes() == before


def test_out_through_a_symlink_and_dotdot_never_deletes_a_directory_it_did_not_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `link/../mydata` is ./mydata to os.path.abspath but <link target>/../mydata to the kernel: the checks
    # and the rename must see the same directory.
    src = write(tmp_path / "in.tsv", lines(4))
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "thesis.tex").write_text("years of work")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    monkeypatch.chdir(tmp_path)
    ingest([src], "link/../mydata", progress=False)
    assert (tmp_path / "mydata" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "real" / "mydata" / "manifest.json").is_file()  # where the kernel put it
    ingest([src], "link/../mydata", overwrite=True, progress=False)  # replaces only its own data set
    assert (tmp_path / "mydata" / "thesis.tex").read_text() == "years of work"
