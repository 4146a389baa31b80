"""The fine-tuning engine a job's worker runs: model builder, freezing, data, loop, checkpoints, loggers."""
