"""The control plane's event loop (stratovirt_py/event_loop.py)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from stratovirt_py.event_loop import (
    CancelledError,
    EventLoop,
    current_task,
    running_loop,
    wait_for_all,
)


@pytest.fixture(name="loop")
def loop_fixture():
    loop = EventLoop()
    yield loop
    loop.close()


def test_callbacks_run_in_order_and_timers_by_deadline(loop):
    order: list[str] = []
    loop.call_later(0.05, order.append, "late")
    loop.call_later(0.01, order.append, "early")
    cancelled = loop.call_later(0.02, order.append, "cancelled")
    loop.call_soon(order.append, "soon-1")
    loop.call_soon(order.append, "soon-2")
    cancelled.cancel()
    assert loop.run_until(lambda: "late" in order, 5)
    assert order == ["soon-1", "soon-2", "early", "late"]


def test_run_until_gives_up_at_its_timeout(loop):
    started = time.monotonic()
    assert not loop.run_until(lambda: False, 0.05)
    assert 0.04 <= time.monotonic() - started < 2
    assert not loop.is_running()


def test_a_timer_beyond_what_epoll_can_wait_for(loop):
    # 2**31 ms is the most epoll_wait takes; the QMP fuzzer found a balloon polling interval
    # of ~25 days ending the monitor with OverflowError.
    far = loop.call_later(3e6, lambda: None)  # the only timer: the loop sleeps towards it
    threading.Timer(0.05, loop.call_soon_threadsafe, (loop.stop,)).start()
    loop.run_forever()
    assert not far.cancelled
    far.cancel()


def test_another_thread_wakes_a_sleeping_loop(loop):
    seen: list[str] = []
    # Without the wake-up the loop would sleep until its timeout.
    threading.Timer(0.05, lambda: loop.call_soon_threadsafe(seen.append, "woken")).start()
    started = time.monotonic()
    assert loop.run_until(lambda: bool(seen), 10)
    assert time.monotonic() - started < 5


def test_readers_writers_and_a_removal_within_the_same_round(loop):
    pipes = [os.pipe(), os.pipe()]
    try:
        calls: list[int] = []

        def on_readable(index: int) -> None:
            calls.append(index)
            # Both became ready in the same round: removed now, the other must not run.
            loop.remove_reader(pipes[1 - index][0])

        writable: list[bool] = []
        for index, (read_end, write_end) in enumerate(pipes):
            os.write(write_end, b"x")
            loop.add_reader(read_end, on_readable, index)
        loop.add_writer(pipes[0][1], writable.append, True)
        assert loop.run_until(lambda: bool(calls) and bool(writable), 5)
        assert loop.remove_writer(pipes[0][1])
        assert not loop.remove_writer(pipes[0][1])
        loop.run_until(lambda: False, 0.05)
        assert len(set(calls)) == 1  # only the first one's callback ever ran
    finally:
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)


def test_a_failing_callback_is_logged_and_the_loop_goes_on(loop, caplog):
    seen: list[int] = []

    def broken() -> None:
        raise ValueError("boom")
    loop.call_soon(broken)
    loop.call_soon(seen.append, 1)
    with caplog.at_level(logging.ERROR, logger="stratovirt_py.event_loop"):
        assert loop.run_until(lambda: bool(seen), 5)
    assert "boom" in caplog.text


def test_tasks_await_futures_and_threads(loop):
    future = loop.create_future()

    async def work() -> int:
        assert running_loop() is loop and current_task() is task
        value = await future
        doubled = await loop.run_in_executor(lambda x: x * 2, value)
        return doubled + 1

    task = loop.create_task(work())
    loop.call_later(0.01, future.set_result, 20)
    assert loop.run_until_complete(task) == 41
    assert current_task() is None


def test_failures_reach_the_awaiting_task(loop):
    def fails() -> None:
        raise OSError(5, "Input/output error")

    async def work() -> str:
        try:
            await loop.run_in_executor(fails)
        except OSError as exc:
            return exc.strerror
        return "no error"

    assert loop.run_until_complete(work()) == "Input/output error"


def test_cancel_interrupts_the_await_and_leaves_the_awaited_work_alone(loop):
    started, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def slow() -> str:
        started.set()
        release.wait(5)
        return "finished"

    work = loop.run_in_executor(slow)

    async def waiter() -> None:
        try:
            await work
        except CancelledError:
            seen.append("cancelled")
            raise

    task = loop.create_task(waiter())
    assert loop.run_until(started.is_set, 5)
    assert task.cancel() and task.cancelling() == 1
    assert loop.run_until(task.done, 5)
    assert task.cancelled() and seen == ["cancelled"]
    with pytest.raises(CancelledError):
        task.result()
    release.set()
    assert loop.run_until(work.done, 5) and work.result() == "finished"


def test_wait_for_all_runs_the_done_callbacks_of_what_it_waited_for(loop):
    futures = [loop.create_future() for _ in range(3)]
    finished: list[int] = []
    for index, future in enumerate(futures):
        future.add_done_callback(lambda _, i=index: finished.append(i))
        loop.call_later(0.01 * index, future.set_result, index)
    assert wait_for_all(loop, futures, 5)
    assert sorted(finished) == [0, 1, 2]
    assert not wait_for_all(loop, [loop.create_future()], 0.02)


def test_signals_become_callbacks_and_close_restores_them():
    loop = EventLoop()
    received: list[int] = []
    loop.add_signal_handler(signal.SIGUSR1, received.append, signal.SIGUSR1)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert loop.run_until(lambda: bool(received), 5)
        assert received == [signal.SIGUSR1]
    finally:
        loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.set_wakeup_fd(-1) == -1  # the loop's pipe is no longer the wake-up fd


def test_a_closed_loop_refuses_work_from_threads():
    loop = EventLoop()
    loop.close()
    loop.close()  # idempotent
    assert loop.is_closed()
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_soon_threadsafe(print)
    with pytest.raises(RuntimeError, match="closed"):
        loop.run_until(lambda: True)
    with pytest.raises(RuntimeError, match="no event loop"):
        running_loop()


def test_run_forever_until_stop(loop):
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert not loop.is_running()
