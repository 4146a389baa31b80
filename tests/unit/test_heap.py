"""service.heap: what a long-lived process imported is kept out of full garbage collections, in the
service (after the admission's preload) and in a training worker (after its preload). Each runs in a
fresh interpreter: a freeze in the test process would stay for every later test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHECK = """
import gc, json, sys, weakref
{setup}
frozen = gc.get_freeze_count()
left = len(gc.get_objects())

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after the freeze: the collector must still free it
gone = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps({{"frozen": frozen, "left": left, "cycle_freed": gone() is None,
                   "torch": "torch" in sys.modules}}))
"""

SETUPS = {
    "the service's admission preload": "from service.app import _preload_admission; _preload_admission()",
    "a training worker's preload": "from service.worker_app import preload; preload()",
}


def _run(setup: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(setup=setup)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    seen: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return seen


@pytest.mark.parametrize("where", sorted(SETUPS))
def test_a_preload_freezes_what_it_imported_and_the_collector_still_frees_new_cycles(where: str) -> None:
    seen = _run(SETUPS[where])
    assert seen["torch"] is True
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 100_000  # torch's modules, out of reach
    # what a full collection still walks is what was made after the freeze, a small fraction
    assert isinstance(seen["left"], int) and seen["left"] < seen["frozen"] // 10
    assert seen["cycle_freed"] is True


def test_without_a_freeze_a_full_collection_walks_the_imports() -> None:
    """The baseline the other tests are read against: the same imports, no freeze."""
    seen = _run("import torchvision.models")
    assert seen["frozen"] == 0
    assert isinstance(seen["left"], int) and seen["left"] > 100_000


PACING = """
import collections, gc, json
big = [[] for _ in range(2_000_000)]  # a big process: what a test run, or a long-lived service, keeps
gc.collect()  # the last full collection kept ~2,000,000 objects: the collector paces the next by that
from service.heap import freeze_imports
freeze_imports()

class Node:
    pass

def pairs(n=500):
    out = []
    for _ in range(n):
        a, b = Node(), Node()
        a.other, b.other = b, a
        out.append(a)
    return out

start = gc.get_stats()[2]["collections"]
in_flight = collections.deque(maxlen=20)  # like calls in flight: they outlive young collections, then die
for batch in range(2000):  # in cycles, so only a full collection frees them
    in_flight.append(pairs())
    if gc.get_stats()[2]["collections"] > start:
        break
print(json.dumps({"first_full_collection_after_batches": batch}))
"""


def test_after_the_freeze_full_collections_come_as_often_as_the_unfrozen_heap_needs() -> None:
    """Without resetting the collector's pacing, the first full collection after the freeze waited for a
    quarter of everything frozen to be matched by survivors: ~850 batches of garbage here (851,028 objects
    held), +36.6 MiB in test_load's CI process. With it: ~93 batches, the young generations' own rhythm."""
    done = subprocess.run([sys.executable, "-c", PACING], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["first_full_collection_after_batches"] < 200
