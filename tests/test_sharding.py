"""sharding.reinit_embeddings on a real 1-rank DMP (in a child process: it needs its own gloo world)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, socket, torch, torch.distributed as dist
    from recsys_codistill.config import load_config
    from recsys_codistill.train.trainer import DistContext, build_sharded
    from recsys_codistill.train.sharding import reinit_embeddings, quiet_library_logs
    from data_pipeline.synthetic import generate_parquet
    from data_pipeline.loader import CriteoStream

    quiet_library_logs()
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    data = os.environ["DATA"]
    generate_parquet(data, 2048, seed=0, row_group_size=512)
    cfg = load_config(None, ["data.batch_size=128", "model.table_sizes=[50]", "model.embedding_dim=4",
                             "model.dense_arch=[8, 4]", "model.over_arch=[8, 1]", "optim.sparse_lr=0.1",
                             "sharding.sharding_type=" + os.environ["SHARDING"]])
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    batches = list(CriteoStream(data, batch_size=128, table_sizes=cfg.model.resolved_table_sizes(), shuffle=False))

    def local(v):
        return v.local_shards()[0].tensor if hasattr(v, "local_shards") else v

    def tables(sm):
        return {k: local(v).clone() for k, v in sm.model.state_dict().items() if ".embedding_bags." in k}

    def step(sm, b):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(sm.model(b.dense_features, b.sparse_features), b.labels)
        sm.optimizer.zero_grad(); loss.backward(); sm.optimizer.step()

    trained = build_sharded(cfg, ctx, seed=1)
    for b in batches[:5]:
        step(trained, b)
    fresh = build_sharded(cfg, ctx, seed=2)          # what a brand-new model with seed 2 looks like
    before = tables(trained)
    reinit_embeddings(trained.model, trained.optimizer, seed=2)
    after, want = tables(trained), tables(fresh)
    assert all(torch.equal(after[k], want[k]) for k in want), "tables not re-initialised with the seed"
    assert not all(torch.equal(after[k], before[k]) for k in want)
    # The fused optimizer state is reset too: with the same dense weights, the next table update equals a
    # fresh model's first update (with a stale Adagrad accumulator it would be much smaller).
    with torch.no_grad():
        for (n, p), (m, q) in zip(trained.model.named_parameters(), fresh.model.named_parameters()):
            assert n == m
            if ".embedding_bags." not in n:
                q.copy_(p)
    step(trained, batches[5]); step(fresh, batches[5])
    a, f = tables(trained), tables(fresh)
    assert all(torch.allclose(a[k], f[k], atol=1e-6) for k in f), "optimizer state of the tables not reset"
    print("OK")
    """
)


@pytest.mark.parametrize("sharding_type", ["table_wise", "column_wise", "data_parallel"])
def test_reinit_embeddings_resets_tables_and_their_optimizer_state(tmp_path, sharding_type):
    # data_parallel tables live in the dense optimizer, sharded ones in the fused one: both are reset.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env={
            "DATA": str(tmp_path / "data"),
            "SHARDING": sharding_type,
            "PATH": "/usr/bin:/bin",
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
