"""Calls from any thread: the same bits, BLAS held and restored, no oversubscription,
and an interrupt that stops the workers.

The blocked CPU path runs worker threads with the BLAS library's own pool held at one
thread (docs/performance.rst). These tests call it from the main thread, from other
threads and from many threads at once, and look at what the BLAS library is told
(threadpoolctl's view of it, read from inside the computation through a score_mod, which
the blocked path calls on its worker threads).
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import refattn
from refattn import _threads

threadpoolctl = pytest.importorskip("threadpoolctl")

# Large enough for several blocks per call, small enough to take milliseconds.
SHAPE = (1, 2, 300, 16)


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(SHAPE) for _ in range(3))
    return q, k, v


def _blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpoolctl.threadpool_info()
            if info["user_api"] == "blas"]


def _blocked(q, k, v, **kw):
    return refattn.attention(q, k, v, implementation="blocked", **kw)


def _in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _recording_score_mod(seen: list[list[int]]):
    # Identity on the scores; records the BLAS pool size the worker computing it sees.
    def score_mod(score, b, h, q_idx, kv_idx):
        seen.append(_blas_threads())
        return score
    return score_mod


@pytest.fixture
def two_blas_threads():
    # A BLAS pool of two threads at least, so that "held at one" is visible; restored.
    if not _blas_threads():
        pytest.skip("no BLAS library that threadpoolctl controls")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        pass
    before = _blas_threads()
    yield before
    assert _blas_threads() == before


def test_blas_is_held_at_one_thread_in_a_call_from_any_thread(two_blas_threads):
    # The first call from the main thread used to make it threadpoolctl's controlling
    # thread for good, and a later call's limit from another thread was ignored.
    q, k, v = _inputs()
    seen_main: list[list[int]] = []
    _blocked(q, k, v, score_mod=_recording_score_mod(seen_main))
    seen_other: list[list[int]] = []
    _in_thread(lambda: _blocked(q, k, v, score_mod=_recording_score_mod(seen_other)))
    assert seen_main and seen_other
    assert all(all(n == 1 for n in s) for s in seen_main + seen_other), (seen_main,
                                                                         seen_other)
    assert _blas_threads() == two_blas_threads


def test_blas_settings_are_restored_after_concurrent_calls_that_return_or_raise(
        two_blas_threads):
    q, k, v = _inputs()

    def call(i: int):
        if i % 3 == 2:
            # Raises inside the blocked computation, on a worker thread.
            def bad_mod(score, b, h, q_idx, kv_idx):
                raise RuntimeError("a failing score_mod")
            with pytest.raises(RuntimeError, match="a failing score_mod"):
                _blocked(q, k, v, score_mod=bad_mod)
            return None
        return _blocked(q, k, v)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(16)))
    assert _blas_threads() == two_blas_threads
    # And a later call from the main thread still holds BLAS at one thread.
    seen: list[list[int]] = []
    _blocked(q, k, v, score_mod=_recording_score_mod(seen))
    assert seen and all(all(n == 1 for n in s) for s in seen)


def test_the_same_bits_from_any_thread_and_any_concurrency():
    q, k, v = _inputs(1)
    expected = _blocked(q, k, v)
    assert np.array_equal(_in_thread(lambda: _blocked(q, k, v)), expected)
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: _blocked(q, k, v), range(12)))
    assert all(np.array_equal(o, expected) for o in outs)
    with refattn.set_num_threads(1):
        assert np.array_equal(_blocked(q, k, v), expected)
    with refattn.set_num_threads(3):
        assert np.array_equal(_in_thread(lambda: _blocked(q, k, v)), expected)


def test_concurrent_calls_do_not_run_more_threads_than_cores():
    # Eight callers, each allowed every core: the computing threads (workers, or the
    # caller itself when it has one worker) must never outnumber the slots.
    q, k, v = _inputs(2)
    capacity = max(_threads.available_cores(), refattn.get_num_threads())
    peak = {"workers": 0, "slots": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            workers = sum(t.name.startswith("refattn-worker") for t in threading.enumerate())
            peak["workers"] = max(peak["workers"], workers)
            peak["slots"] = max(peak["slots"], _threads._slots_used)
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: _blocked(q, k, v), range(24)))
    finally:
        stop.set()
        watcher.join()
    assert peak["slots"] <= capacity
    assert peak["workers"] <= capacity, peak
    assert _threads._slots_used == 0


def test_a_nested_call_from_a_score_mod_does_not_wait_for_a_slot():
    # A score_mod may itself call refattn (on a worker thread, or on the caller): it
    # holds a slot already and must not wait for one while every slot is held.
    q, k, v = _inputs(3)
    small = [x[..., :4, :] for x in (q, k, v)]

    def nested(score, b, h, q_idx, kv_idx):
        _blocked(*small)
        return score

    with refattn.set_num_threads(_threads.available_cores()):
        out = _blocked(q, k, v, score_mod=nested)
    assert np.array_equal(out, _blocked(q, k, v, score_mod=lambda s, b, h, i, j: s))


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
def test_ctrl_c_stops_the_workers():
    # Ctrl-C while the caller waits for its workers: KeyboardInterrupt reaches it, and
    # no worker goes on computing (they finish the block in hand and take no other).
    q, k, v = (np.random.default_rng(4).standard_normal((1, 4, 2048, 8)) for _ in range(3))
    blocks = {"n": 0}

    def count(score, b, h, q_idx, kv_idx):
        blocks["n"] += 1
        return score

    with refattn.set_num_threads(1):
        refattn.attention(q, k, v, implementation="blocked", score_mod=count)
    assert blocks["n"] >= 16, "too few blocks for the interrupt to come early"
    started = threading.Event()
    calls = {"n": 0}
    lock = threading.Lock()

    def slow_mod(score, b, h, q_idx, kv_idx):
        with lock:
            calls["n"] += 1
        if threading.current_thread() is not threading.main_thread():
            started.set()  # a worker is computing: the interrupt comes now
        time.sleep(0.02)
        return score

    def interrupt():
        started.wait(10)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # Python's own handler, whatever the parent process set (a shell's background job
    # starts with SIGINT ignored).
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    threads_before = set(threading.enumerate())
    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    try:
        with refattn.set_num_threads(2), pytest.raises(KeyboardInterrupt):
            refattn.attention(q, k, v, implementation="blocked", score_mod=slow_mod)
    finally:
        interrupter.join()
        signal.signal(signal.SIGINT, previous_handler)
    assert started.is_set()
    at_raise = calls["n"]
    # Threads other tests left behind may end meanwhile; none of this call's may be alive.
    started_by_the_call = [t.name for t in threading.enumerate() if t not in threads_before]
    assert started_by_the_call == []
    time.sleep(0.05)
    assert calls["n"] == at_raise
    # The interrupt came after the first block: the rest were never started.
    assert at_raise < blocks["n"] // 2
    assert _threads._slots_used == 0


class _PerThreadBlas:
    """A stand-in for threadpoolctl over a BLAS built on OpenMP, whose limit belongs to
    each thread: records which thread entered and left a limit."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def limit(self, *, limits, user_api):
        assert (limits, user_api) == (1, "blas")
        record = self._record

        class Limit:
            def __enter__(self):
                record("enter")
                return self

            def __exit__(self, *exc):
                record("exit")

        return Limit()

    def _record(self, what: str) -> None:
        with self.lock:
            self.events.append((threading.current_thread().name, what))


def test_on_a_per_thread_blas_every_computing_thread_holds_its_own_limit(monkeypatch):
    fake = _PerThreadBlas()
    monkeypatch.setattr(_threads, "_controller", fake)
    monkeypatch.setattr(_threads, "_blas_per_thread", True)
    computing: set[str] = set()

    def score_mod(score, b, h, q_idx, kv_idx):
        computing.add(threading.current_thread().name)
        return score

    q, k, v = _inputs(5)
    with refattn.set_num_threads(2):
        _in_thread(lambda: _blocked(q, k, v, score_mod=score_mod))
    entered = {name for name, what in fake.events if what == "enter"}
    assert computing and computing <= entered
    for name in entered:
        mine = [what for n, what in fake.events if n == name]
        assert mine == ["enter", "exit"], (name, mine)
