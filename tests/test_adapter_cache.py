"""lycoris_core.adapter.cache: one object per (path, size, mtime), LRU bounded by file bytes."""

from __future__ import annotations

import os
import threading

from lycoris_core.adapter.cache import AdapterCache, file_key
from lycoris_core.memory import budget_from_env
from lycoris_core.testing.demo import write_demo_files


def test_same_object_until_the_file_changes(tmp_path):
    lora, loha, _ = write_demo_files(tmp_path)
    cache = AdapterCache()
    first = cache.get(lora)
    assert cache.get(str(lora)) is first and cache.hits == 1 and cache.misses == 1
    assert cache.get(tmp_path / "." / lora.name) is first  # same real path
    os.utime(lora, ns=(os.stat(lora).st_atime_ns, os.stat(lora).st_mtime_ns + 10**9))
    second = cache.get(lora)
    assert second is not first and len(cache) == 1 and cache.used == os.path.getsize(lora)
    loha.replace(lora)  # another file under the same name
    assert cache.get(lora) is not second and len(cache) == 1


def test_lru_bounded_by_file_bytes(tmp_path):
    lora, loha, lokr = write_demo_files(tmp_path)
    sizes = {p: os.path.getsize(p) for p in (lora, loha, lokr)}
    cache = AdapterCache(budget_bytes=sizes[lora] + sizes[loha])
    a = cache.get(lora)
    cache.get(loha)
    assert cache.get(lora) is a  # lora is now the most recent
    cache.get(lokr)  # evicts loha, the least recently used
    assert lora in cache and lokr in cache and loha not in cache
    assert cache.used <= cache.budget


def test_oversized_file_is_returned_not_kept(tmp_path):
    lora, *_ = write_demo_files(tmp_path)
    cache = AdapterCache(budget_bytes=10)
    assert cache.get(lora).modules and len(cache) == 0 and cache.used == 0


def test_concurrent_gets_share_one_object(tmp_path):
    lora, *_ = write_demo_files(tmp_path)
    cache = AdapterCache()
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(lora))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(a) for a in got}) == 1 and len(cache) == 1


def test_budget_from_env(monkeypatch):
    monkeypatch.setenv("X_MB", "2.5")
    assert budget_from_env("X_MB", 7) == int(2.5 * (1 << 20))
    monkeypatch.setenv("X_MB", "lots")
    assert budget_from_env("X_MB", 7) == 7
    monkeypatch.delenv("X_MB")
    assert budget_from_env("X_MB", 7) == 7


def test_file_key(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"1234")
    assert file_key(p)[1] == 4 and file_key(p)[0] == os.path.realpath(p)
