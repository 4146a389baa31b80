"""Jobs: the validated spec, the durable store, the scheduler and the worker process."""
