"""Who may change what one TorchServe serves, and when: one change per model, a (re)start alone.

A change to a model (deploy its new version, move its default, unserve it, a sync that catches it up
with another replica) takes that model's lock: a deploy that waits seconds for its version's worker to
load holds up later changes to the same model only, never a rollback or an unserve of another one.
A start or a restart of TorchServe registers every version again, so it runs alone: it waits until
the changes under way have finished, and changes asked for meanwhile wait until it is done (a waiting
restart goes first, so a stream of changes cannot starve it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ServingLock:
    """Shared for changes to one model each (with that model's own lock), exclusive for a (re)start."""

    def __init__(self) -> None:
        self._state = threading.Condition()
        self._changes = 0  # changes under way (each holds its model's lock)
        self._alone: threading.Thread | None = None  # the thread that runs alone, if any
        self._alone_depth = 0  # start() runs restore() inside: the thread that runs alone may nest
        self._waiting_alone = 0
        self._models: dict[str, threading.Lock] = {}
        self._mine = threading.local()  # .model: the model this thread is changing, if any

    @contextmanager
    def model(self, name: str) -> Iterator[None]:
        """Change model `name`: alongside changes to other models, never during a (re)start. Inside
        another change it raises RuntimeError (a restart waiting between the two would wait forever)."""
        if self._alone is threading.current_thread():
            # inside a (re)start, which excludes every change; not even the model's lock, which a
            # change waiting for the restart to end may hold
            yield
            return
        changing = getattr(self._mine, "model", None)
        if changing is not None:  # it would wait for ever: say so instead
            raise RuntimeError(f"a change to model {name} inside the change to model {changing}")
        with self._model_lock(name):  # the model's lock first: waiting for it must not hold off a restart
            with self._state:
                self._state.wait_for(lambda: self._alone is None and self._waiting_alone == 0)
                self._changes += 1
            self._mine.model = name
            try:
                yield
            finally:
                self._mine.model = None
                with self._state:
                    self._changes -= 1
                    self._state.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        """A (re)start or a restore: once no change is under way, and none starts until it is done."""
        me = threading.current_thread()
        changing = getattr(self._mine, "model", None)
        if changing is not None:  # it would wait for this very change to end
            raise RuntimeError(f"a (re)start inside the change to model {changing}")
        with self._state:
            if self._alone is me:
                self._alone_depth += 1
            else:
                self._waiting_alone += 1
                try:
                    self._state.wait_for(lambda: self._alone is None and self._changes == 0)
                finally:
                    self._waiting_alone -= 1
                    self._state.notify_all()  # changes held back for this restart may go, if it gave up
                self._alone, self._alone_depth = me, 1
        try:
            yield
        finally:
            with self._state:
                self._alone_depth -= 1
                if self._alone_depth == 0:
                    self._alone = None
                    self._state.notify_all()

    def _model_lock(self, name: str) -> threading.Lock:
        with self._state:
            return self._models.setdefault(name, threading.Lock())
