"""Training: launch (one world per group), worker, Trainer, sharding, checkpoints, input mapping, predict."""
