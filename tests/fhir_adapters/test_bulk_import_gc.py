"""Garbage collection during a bulk import (``collecting_rarely``): automatic collection off
while it runs, a full collection at every n-th group, everything as it was afterwards."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from fhir_adapters.store.bulk_import import collecting_rarely


class _Node:
    def __init__(self) -> None:
        self.me: Any = self  # a cycle: only the collector frees it


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if enabled:
        gc.enable()
    else:
        gc.disable()


def _garbage_cycle() -> weakref.ref[_Node]:
    return weakref.ref(_Node())


def test_a_cycle_is_freed_at_the_nth_call_and_not_before() -> None:
    gc.enable()
    with collecting_rarely(3) as settled:
        assert not gc.isenabled()
        gc.collect()
        cycle = _garbage_cycle()
        for _ in range(2):
            settled()
            assert cycle() is not None  # the automatic collector did not run either
        settled()  # the third
        assert cycle() is None
        assert gc.get_freeze_count() > 0  # what survived is left out of later collections
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_what_is_left_at_the_end_is_collected_and_the_collector_is_as_it_was() -> None:
    gc.enable()
    with collecting_rarely(100) as settled:
        settled()
        cycle = _garbage_cycle()
    assert cycle() is None
    assert gc.isenabled()

    gc.disable()
    with collecting_rarely(100):
        pass
    assert not gc.isenabled()


def test_the_collector_comes_back_when_the_import_fails() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), collecting_rarely(1) as settled:
        settled()
        raise RuntimeError("the import failed")
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
