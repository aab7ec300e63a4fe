"""WarmPool: the scoring threads hand each job to the thread idle the shortest, and otherwise behave as an
executor: parallel under load, errors through the future, shutdown that ends every thread."""

import threading
import time

import pytest

from unirec.serve.pool import WarmPool


def test_a_lone_stream_of_jobs_stays_on_one_thread():
    pool = WarmPool(3, "t")
    barrier = threading.Barrier(3, timeout=5)
    try:
        # Every thread busy once first, as after a burst (ThreadPoolExecutor then rotates over all three).
        [f.result(timeout=10) for f in [pool.submit(barrier.wait) for _ in range(3)]]
        names = [pool.submit(lambda: threading.current_thread().name).result() for _ in range(20)]
    finally:
        pool.shutdown()
    assert len(set(names)) == 1, names


def test_jobs_that_overlap_run_in_parallel_on_every_thread():
    pool = WarmPool(3, "t")
    barrier = threading.Barrier(3, timeout=5)  # passes only when three jobs run at once

    def job():
        barrier.wait()
        return threading.current_thread().name

    try:
        names = [f.result(timeout=10) for f in [pool.submit(job) for _ in range(3)]]
    finally:
        pool.shutdown()
    assert sorted(names) == ["t_0", "t_1", "t_2"]


def test_queued_jobs_run_in_order_once_a_thread_frees_up():
    pool = WarmPool(1, "t")
    gate, done = threading.Event(), []
    try:
        first = pool.submit(gate.wait)
        rest = [pool.submit(done.append, k) for k in range(5)]
        assert not any(f.done() for f in rest)
        gate.set()
        for f in [first, *rest]:
            f.result(timeout=10)
    finally:
        pool.shutdown()
    assert done == [0, 1, 2, 3, 4]


def test_an_error_reaches_the_caller_and_the_thread_lives_on():
    pool = WarmPool(1, "t")
    try:
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result()
        assert pool.submit(lambda: 41 + 1).result() == 42
    finally:
        pool.shutdown()


def test_shutdown_cancels_queued_jobs_ends_the_threads_and_refuses_new_ones():
    pool = WarmPool(2, "t")
    gate = threading.Event()
    running = [pool.submit(gate.wait) for _ in range(2)]
    queued = pool.submit(time.sleep, 0)
    threads = list(pool._threads)
    gate.set()  # the running jobs end; whether the queued one ran first depends on the race, below
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.result() for f in running)
    assert queued.cancelled() or queued.done()
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(int)


def test_shutdown_with_cancel_cancels_what_never_started():
    pool = WarmPool(1, "t")
    gate = threading.Event()
    running = pool.submit(gate.wait, 10)
    queued = [pool.submit(int) for _ in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.set()
    assert running.result(timeout=10) is True
    pool._threads[0].join(timeout=10)
    assert not pool._threads[0].is_alive()


def test_at_least_one_thread():
    with pytest.raises(ValueError, match="at least one thread"):
        WarmPool(0)
