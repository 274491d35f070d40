"""Entry point of one rank, started by torchrun (``python -m torch.distributed.run ... -m recsys_codistill.worker``).

Each co-distilling group runs its own torchrun, so ``RANK``/``WORLD_SIZE`` here are the group's own world.
"""

from __future__ import annotations

import argparse
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from recsys_codistill.config import load_config
from recsys_codistill.sharding import quiet_library_logs, resolve_backend, resolve_device
from recsys_codistill.trainer import DistContext, train


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="resolved config.toml written by the launcher")
    p.add_argument("--group", type=int, default=0)
    args = p.parse_args(argv)
    cfg = load_config(args.config)

    # TorchRec and torch emit many one-off warnings per rank (planner estimates, fx tracing): keep the
    # console readable; errors still propagate.
    warnings.filterwarnings("ignore")
    quiet_library_logs()
    if cfg.sharding.threads:
        torch.set_num_threads(cfg.sharding.threads)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.sharding, local_rank)
    dist.init_process_group(backend=resolve_backend(cfg.sharding, device), timeout=timedelta(minutes=30))
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)
    try:
        train(cfg, args.group, ctx)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
