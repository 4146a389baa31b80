"""ImageFolder scans kept between CreateJobs, each one valid while the folders it read are unchanged.

Admission scans a job's dataset on every CreateJob: a header read of every image, most of that call's
CPU. The same folder submitted again (a sweep, a retry, a busy user) scans the same files, so the
result is kept, stamped with the inode, mtime and ctime of every folder the scan walked: the dataset
folder, its class folders and every folder under them. Adding, removing or renaming a file or a class
folder changes its folder's stamp, so the next CreateJob scans again and sees it.

What a folder's stamp cannot see: an image rewritten in place under the same name (its folder is not
touched). Its header size stays the cached one until the folder changes; the image itself is read at
load time, where an undecodable one is skipped and counted (service.training.loaders).

A stamp taken within RACY_S of a change could miss a second change in the same clock tick (the kernel
stamps folders with a coarse clock), so such a scan is not kept: the next CreateJob scans again.
Failed scans are never kept, so bad input gets its error from a fresh scan every time. Manifests
(multilabel) are not cached: their images may lie in any folder under the data root.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from service.one_at_a_time import OneAtATime
from service.spec import Task
from service.training.data_root import resolve_under_root
from service.training.scan import DatasetInfo, scan_dataset

MAX_ENTRIES = 16  # datasets kept; each holds one Sample per image
RACY_S = 2.0

_Key = tuple[str, str, str, int | None]
_Stamp = tuple[tuple[str, int, int, int], ...]


class ScanCache:
    """scan_dataset with its results kept (least recently used first out). Thread-safe."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._max = max_entries
        self._entries: OrderedDict[_Key, tuple[_Stamp, DatasetInfo]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._one_at_a_time = OneAtATime()

    def scan_dataset(
        self, path: Path, data_root: Path, *, task: Task = "multiclass", max_image_pixels: int | None = None
    ) -> DatasetInfo:
        """What service.training.scan.scan_dataset returns (and raises), from the cache while unchanged."""
        folder = resolve_under_root(path, data_root)  # every call: a symlink may have moved out of the root
        key = (str(folder), str(data_root.resolve()), task, max_image_pixels)
        # callers scanning one dataset at once: the first walks it, the others then find its stamp kept
        pixels = max_image_pixels
        return self._one_at_a_time.run(key, lambda: self._scan(path, data_root, folder, key, task, pixels))

    def _scan(
        self, path: Path, data_root: Path, folder: Path, key: _Key, task: Task, max_image_pixels: int | None
    ) -> DatasetInfo:
        taken_at = time.time_ns()
        stamp = _stamp(folder)  # before the scan: a change during the scan makes the next call scan again
        if stamp is not None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0] == stamp:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[1]
        info = scan_dataset(path, data_root, task=task, max_image_pixels=max_image_pixels)
        with self._lock:
            self.misses += 1
            if stamp is not None and not _racy(stamp, taken_at):
                self._entries[key] = (stamp, info)
                self._entries.move_to_end(key)
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)
            else:
                self._entries.pop(key, None)
        return info

    def clear(self) -> None:
        """Forget every scan and the counts (a test starts from an empty cache in a shared process)."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


def _stamp(folder: Path) -> _Stamp | None:
    """(path, inode, mtime, ctime) of `folder` and every folder a scan of it reads; None: not a folder."""
    try:
        stamps = [_folder_stamp(str(folder))]
        with os.scandir(folder) as entries:
            # the class folders, as scan_dataset picks them (a symlink to a folder counts, as there)
            classes = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
        for class_dir in classes:
            # every folder under a class folder, as rglob walks them (symlinked sub-folders not entered)
            for current, subdirs, _ in os.walk(class_dir):
                subdirs.sort()
                stamps.append(_folder_stamp(current))
    except OSError:
        return None  # gone or unreadable: scan_dataset says what is wrong
    return tuple(stamps)


def _folder_stamp(path: str) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (path, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _racy(stamp: _Stamp, taken_at_ns: int) -> bool:
    """A folder changed so shortly before the stamp that a change in the same tick would not show.
    (Any change of a folder's entries sets its mtime to now: an mtime older than RACY_S then differs.)"""
    newest = max(mtime for _, _, mtime, _ in stamp)
    return taken_at_ns - newest < RACY_S * 1e9


SCANS = ScanCache()  # the service's: one per process, like the model descriptions (layers.py)
