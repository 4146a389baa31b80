"""Keep a long-lived process's imported modules out of the garbage collector's full collections.

torch, torchvision and timm leave ~500,000 container objects behind (module dicts, functions, types,
op schemas). They live as long as the process, yet each full (generation 2) collection walks every one
of them with the GIL held: measured in the service under a burst of CreateJobs, 160-390 ms per
collection, every few seconds, and every RPC in flight waited (bench/control_plane.py's p99). After
gc.freeze() a full collection walks only what was made since: the jobs, specs and messages in the
store's caches, 57-68 ms at worst on the same run.

A frozen object is still freed by its reference count; only a reference cycle among the objects alive
at the freeze is never collected, and those are imports' leftovers. In a process that forks (the
TorchServe zygote) it also keeps the children's collections from writing to every inherited object's
header, which would copy the parent's pages (Python's gc.freeze documentation).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_imports() -> int:
    """Freeze every object tracked now (call it once the process has imported what it runs with);
    returns how many objects are frozen in all. No pause: nothing frozen is scanned.

    Once per process: a second call (tests start many services in one process) would freeze whatever
    was made since, the earlier services' objects among them, and their cycles would never be freed.
    """
    if gc.get_freeze_count() == 0:
        gc.freeze()
        # A full collection runs once a quarter as many objects as the last one kept have survived
        # since. That count still says ~500,000, the objects now frozen, so the next full collection
        # would wait for ~125,000 survivors and hold their garbage meanwhile (+36.6 MiB in
        # tests/integration/test_load.py's big CI process). This collection walks only what is not
        # frozen, next to nothing, and sets the count from that.
        gc.collect()
    frozen = gc.get_freeze_count()
    log.debug("froze %d objects out of the garbage collector's reach", frozen)
    return frozen
