"""Entry point of one rank, started by the launcher (single node) or by torchrun (multi-node).

Each co-distilling group is its own world, so ``RANK``/``WORLD_SIZE`` here are the group's own. A rank the
launcher started meets its group through the ``FileStore`` named by ``RECSYS_CODISTILL_STORE`` (nothing
listens on the network); under torchrun, through torchrun's store (``env://``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from recsys_codistill.atomic import DamagedDirectory
from recsys_codistill.config import load_config
from recsys_codistill.dcp_io import UnsafeCheckpointError
from recsys_codistill.dist import FatalError
from recsys_codistill.train.launch import EXIT_NO_RESTART, STORE_ENV, die_with_parent
from recsys_codistill.train.sharding import quiet_library_logs, resolve_backend, resolve_device
from recsys_codistill.train.trainer import DistContext, train


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="resolved config.toml written by the launcher")
    p.add_argument("--group", type=int, default=0)
    args = p.parse_args(argv)
    # Under torchrun our parent is its agent: die with it too (the launcher's own children have this set
    # before exec, checked against the launcher's pid; no pid check here: in a container the launcher may
    # itself be pid 1).
    die_with_parent()
    cfg = load_config(args.config)

    # TorchRec and torch emit many one-off warnings per rank (planner estimates, fx tracing): keep the
    # console readable; errors still propagate.
    warnings.filterwarnings("ignore")
    quiet_library_logs()
    if cfg.sharding.threads:
        torch.set_num_threads(cfg.sharding.threads)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.sharding, local_rank)
    backend, timeout = resolve_backend(cfg.sharding, device), timedelta(minutes=30)
    store_path = os.environ.get(STORE_ENV)
    if store_path:
        world_size = int(os.environ["WORLD_SIZE"])
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size, timeout=timeout
        )
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    ctx = DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device
    )
    try:
        train(cfg, args.group, ctx)
        # Every rank is past its last collective before any rank leaves.
        dist.barrier()
    except (FatalError, UnsafeCheckpointError, DamagedDirectory) as e:
        # A restart would fail the same way (replay into the same NaN, meet the same damaged or refused
        # state, wait for the same absent peer): the launcher does not restart this exit code.
        print(f"recsys-codistill: {e}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        raise SystemExit(EXIT_NO_RESTART) from None
    except BaseException:
        dist.destroy_process_group()
        raise
    # Success: leave at once, without the process-group teardown and the C++ destructors at interpreter
    # exit. There, now and then, a rank aborted ("terminate called without an active exception": a native
    # thread object destroyed unjoined), failing a run whose results were all written, even after the
    # barrier. Everything this process wrote is closed or flushed by now (checkpoints fsynced,
    # result.json closed, metrics.jsonl flushed after every line); the launcher removes the store file.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
