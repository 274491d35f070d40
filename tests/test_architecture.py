"""The layout's promises: imports flow one way, eval needs no torch, one owner per run-directory name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_eval_imports_no_torch():
    code = (
        "import sys; import recsys_codistill.eval.metrics, recsys_codistill.eval.churn, "
        "recsys_codistill.eval.evaluation, recsys_codistill.eval.predictions, "
        "recsys_codistill.eval.retrains, recsys_codistill.eval.calibration; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
        "sys.exit(f'eval imported {bad[:3]}' if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr or done.stdout


def test_imports_flow_one_way():
    # data_pipeline -> models -> recsys_codistill; data_pipeline never touches torch.distributed
    for path in (ROOT / "data_pipeline").glob("*.py"):
        mods = _imports(path)
        assert not any(m.startswith(("recsys_codistill", "models")) for m in mods), path
        assert not any(m.startswith("torch.distributed") for m in mods), path
    for path in (ROOT / "models").glob("*.py"):
        assert not any(m.startswith("recsys_codistill") for m in _imports(path)), path
    for path in (ROOT / "recsys_codistill" / "eval").glob("*.py"):
        mods = _imports(path)
        assert not any(m.startswith(("recsys_codistill.train", "recsys_codistill.study")) for m in mods), path


def test_run_directory_names_have_one_owner():
    names = {"config.toml", "metrics.jsonl", "result.json", "checkpoints", "vocab.parquet", "launcher.log"}
    for path in (ROOT / "recsys_codistill").rglob("*.py"):
        if path.name == "run_dir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                raise AssertionError(f"{path}:{node.lineno} spells {node.value!r}; ask RunDir")


def test_ruff_check_and_format_are_clean():
    # CI runs `make test` only: lint and the 110-column format are kept clean here.
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run([sys.executable, "-m", "ruff", *args], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, f"ruff {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
