"""The plan command's byte model: hand-checked formulas, and counted bytes on a live 2-rank gloo world."""

from __future__ import annotations

import pytest

from recsys_codistill.config import load_config
from recsys_codistill.train.comm_plan import measure, step_bytes

TINY = [
    "data.batch_size=256",
    "model.table_sizes=[1000]",
    "model.embedding_dim=8",
    "model.dense_arch=[16, 8]",
    "model.over_arch=[16, 1]",
]


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, TINY)


def test_the_byte_model_by_hand(cfg):
    rows, dim, tables = 1000, 8, 26
    one = step_bytes(cfg, 1, "table_wise")
    assert one.all_to_all == 0 and one.allreduce == 0  # one rank moves nothing
    dense = one.exchange_per_version // 4 - rows * dim * tables
    assert dense > 0
    for w in (2, 4):
        b = 256 // w
        tw = step_bytes(cfg, w, "table_wise")
        assert tw.input_dist == (w - 1) * b * tables * (4 + 8)  # int32 lengths + int64 ids, per table
        assert tw.pooled_forward == tw.pooled_backward == (w - 1) * b * tables * dim * 4
        assert tw.allreduce_dense == dense * 4 and tw.allreduce_tables == 0
        # every table lives once: the ranks' table state sums to all tables' (weights + row-wise adagrad)
        table_state = sum(tw.memory_per_rank) - w * 2 * dense * 4
        assert table_state == tables * (rows * dim + rows) * 4
        dp = step_bytes(cfg, w, "data_parallel")
        assert dp.all_to_all == 0 and dp.allreduce_tables == tables * rows * dim * 4
        assert len(set(dp.memory_per_rank)) == 1  # replicated
        assert dp.exchange_per_version == tw.exchange_per_version == one.exchange_per_version


def _wide():
    """dim 256: TorchRec's planner splits column_wise tables into several shards only from there."""
    return load_config(None, [*TINY[:2], "model.embedding_dim=256", "model.dense_arch=[16, 256]", TINY[4]])


def test_column_wise_shards_by_hand():
    w, b = 2, 128
    cw = step_bytes(_wide(), w, "column_wise")
    shards = [s for t in cw.tables for s in t["shards"]]
    assert len(shards) > 26  # some table really is split
    assert all(sum(s["cols"] for s in t["shards"]) == 256 for t in cw.tables)
    assert cw.input_dist == len(shards) * (w - 1) * b * 12  # every shard's rank gets the table's ids
    assert cw.pooled_forward == (w - 1) * b * 26 * 256 * 4  # the columns add up to the table's


# The counts: all-to-all carries a few bytes the model leaves out (TorchRec's per-step splits exchange,
# 24 bytes a rank), all-reduce is exact. The bound is 5%; this holds to 0.1%.
@pytest.mark.dist
@pytest.mark.parametrize(
    "sharding_type, wide",
    [("table_wise", False), ("column_wise", False), ("column_wise", True), ("data_parallel", False)],
)
def test_counted_bytes_on_two_gloo_ranks_match_the_model(cfg, sharding_type, wide):
    c = _wide() if wide else cfg
    model = step_bytes(c, 2, sharding_type)
    counted = measure(c, 2, sharding_type, steps=2)
    assert counted["all_to_all"] == pytest.approx(model.all_to_all, rel=1e-3)
    assert counted["allreduce"] == pytest.approx(model.allreduce, rel=1e-3)
    if sharding_type != "data_parallel":
        assert counted["all_to_all"] > 0


def test_the_plan_command_prints_the_table(capsys):
    from recsys_codistill.cli import main

    args = ["plan", "--ranks", "1,2", "--types", "table_wise,data_parallel"]
    assert main(args + [x for kv in TINY for x in ("--set", kv)]) == 0
    out = capsys.readouterr().out
    assert "| table_wise | 2 |" in out and "| data_parallel | 2 |" in out and "sharding plan:" in out
    with pytest.raises(SystemExit):  # argparse names the flag and the plan types it takes
        main(["plan", "--types", "row_wise"])
    assert "--types: unknown plan type(s) ['row_wise']" in capsys.readouterr().err
