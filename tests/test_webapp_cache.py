"""The web app's per-session inversion cache: bounds, recency, isolation between sessions, keys."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch

from npinv.cache import InversionCache, tensor_bytes
from npinv.service import InversionKey


def key(n: int = 0, **changes) -> InversionKey:
    base = InversionKey(model="m", image=f"img{n}", prompt="a red circle", steps=10, offset=None, resize="crop")
    return dataclasses.replace(base, **changes)


def test_bounded_by_entries_least_recently_used_first_out():
    cache = InversionCache(max_entries=2, max_bytes=10**6)
    cache.put(key(1), "one", 1)
    cache.put(key(2), "two", 1)
    assert cache.get(key(1)) == "one"  # key 1 is now the most recently used
    cache.put(key(3), "three", 1)
    assert cache.keys() == [key(1), key(3)]
    assert cache.get(key(2)) is None
    assert cache.stats().evictions == 1 and len(cache) == 2


def test_bounded_by_bytes():
    cache = InversionCache(max_entries=10, max_bytes=100)
    cache.put(key(1), "a", 60)
    cache.put(key(2), "b", 30)
    assert cache.nbytes == 90
    cache.put(key(3), "c", 50)  # 140 > 100: the oldest goes
    assert cache.keys() == [key(2), key(3)] and cache.nbytes == 80
    assert not cache.put(key(4), "huge", 101)  # larger than the whole budget: not kept, nothing evicted
    assert cache.keys() == [key(2), key(3)]
    assert cache.put(key(2), "b2", 70)  # replacing a key counts its new size once
    assert cache.keys() == [key(2)] and cache.nbytes == 70 and cache.get(key(2)) == "b2"


def test_bytes_are_measured_from_the_tensors():
    shared = torch.zeros(10, dtype=torch.float32)

    @dataclasses.dataclass
    class Value:
        a: torch.Tensor
        b: list
        c: dict

    value = Value(torch.zeros(4, 8), [shared, shared, shared], {"x": torch.zeros(2, dtype=torch.float64), "n": 3})
    assert tensor_bytes(value) == 4 * 8 * 4 + 10 * 4 + 2 * 8  # the shared tensor counts once
    cache = InversionCache(max_entries=4, max_bytes=200)
    cache.put(key(1), value)
    assert cache.nbytes == 184
    cache.put(key(2), value)
    assert len(cache) == 1  # 2 x 184 > 200


def test_every_field_of_the_key_matters():
    cache = InversionCache(max_entries=10, max_bytes=10**6)
    cache.put(key(), "v", 1)
    assert cache.get(key()) == "v"
    for change in ({"model": "other"}, {"image": "other"}, {"prompt": "a red square"}, {"steps": 20},
                   {"offset": 0}, {"offset": 1}, {"resize": "fit"}):
        assert cache.get(key(**change)) is None, change
    assert (cache.stats().hits, cache.stats().misses) == (1, 7)


def test_sessions_are_isolated():
    """Gradio gives each session a deep copy of the template cache: no copy sees another's entries."""
    template = InversionCache(max_entries=3, max_bytes=10**6)
    alice, bob = copy.deepcopy(template), copy.deepcopy(template)
    alice.put(key(1), torch.ones(3), 12)
    assert key(1) in alice and key(1) not in bob and len(template) == 0
    carol = copy.deepcopy(alice)  # a copy of a filled cache owns copies of its values
    carol.get(key(1)).zero_()
    assert alice.get(key(1)).sum() == 3
    assert (alice.max_entries, alice.max_bytes) == (3, 10**6)


def test_asdict_works_for_gradio_config():
    # Gradio calls dataclasses.asdict on state values when it builds the page config.
    assert dataclasses.asdict(InversionCache(max_entries=2, max_bytes=5))["max_entries"] == 2


def test_bounds_hold_under_concurrent_use():
    cache = InversionCache(max_entries=5, max_bytes=50)
    errors = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                cache.put(key(t * 1000 + i % 13), i, 7)
                cache.get(key(t * 1000 + (i * 7) % 13))
                assert len(cache) <= 5 and cache.nbytes <= 50
        except Exception as exc:  # reported below: a thread's exception would vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) <= 5 and cache.nbytes <= 50


@pytest.mark.parametrize("entries,nbytes", [(0, 10), (1, 0)])
def test_bounds_must_be_positive(entries, nbytes):
    with pytest.raises(ValueError):
        InversionCache(max_entries=entries, max_bytes=nbytes)
