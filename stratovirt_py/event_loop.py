"""The control plane's event loop: file readiness, timers, callbacks from other threads,
signals, and coroutines for the few QMP commands that wait.

The monitor used asyncio for this, but importing asyncio costs every start of the monitor
about a fifth of its start-up time and ~6 MiB of resident memory (it loads ssl, and with it
libcrypto, and concurrent.futures), for a loop that needs none of that.  This loop is the
small part the monitor uses, on `selectors`, with asyncio's method names so that the
control plane reads the same: `add_reader`, `call_soon_threadsafe`, `call_later`,
`create_future`, `create_task`, `run_in_executor`, `add_signal_handler`,
`run_until_complete`.

Futures and tasks are deliberately simpler than asyncio's: cancelling a task interrupts the
await it is stopped at (CancelledError is raised there), and leaves the future it awaited
alone, so work handed to a thread always runs to its end (asyncio needs `shield` for that).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

MAX_WAIT = 3600.0  # seconds the loop sleeps at most in one go

T = TypeVar("T")


class CancelledError(Exception):
    """The future was cancelled, or the task awaiting it was."""


class InvalidStateError(Exception):
    """A future's result was set twice, or read before it was set."""


class Handle:
    """A scheduled callback; cancel() keeps it from running."""

    __slots__ = ("_args", "_callback", "cancelled")

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._callback = callback
        self._args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def run(self) -> None:
        if self.cancelled:
            return
        try:
            self._callback(*self._args)
        except Exception:
            # A failing callback is a bug to report, not a reason to stop the monitor.
            log.exception("event loop callback %r failed", self._callback)


class TimerHandle(Handle):
    __slots__ = ("when",)

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        super().__init__(callback, args)
        self.when = when


class Future(Generic[T]):
    """A result that arrives later, on the loop's thread; awaitable from a task."""

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._done = False
        self._cancelled = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], None]] = []

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self._cancelled

    def result(self) -> T:
        if self._cancelled:
            raise CancelledError()
        if not self._done:
            raise InvalidStateError("the result is not set yet")
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self) -> BaseException | None:
        if self._cancelled:
            raise CancelledError()
        return self._exception

    def set_result(self, result: T) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException) -> None:
        self._finish(None, exception)

    def cancel(self) -> bool:
        if self._done:
            return False
        self._cancelled = True
        self._finish(None, None)
        return True

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        if self._done:
            raise InvalidStateError("the future is already done")
        self._done = True
        self._result = result
        self._exception = exception
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._loop.call_soon(callback, self)

    def add_done_callback(self, callback: Callable[[Future[T]], None]) -> None:
        """Runs `callback(future)` on the loop once done (soon, if it already is)."""
        if self._done:
            self._loop.call_soon(callback, self)
        else:
            self._callbacks.append(callback)

    def remove_done_callback(self, callback: Callable[[Future[T]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def __await__(self) -> Generator[Future[T], None, T]:
        if not self._done:
            yield self  # the task resumes us once we are done
        return self.result()


class Task(Future[T]):
    """Runs a coroutine on the loop; the coroutine awaits only this module's futures."""

    def __init__(self, loop: EventLoop, coroutine: Coroutine[Any, Any, T]) -> None:
        super().__init__(loop)
        self._coroutine = coroutine
        self._awaiting: Future[Any] | None = None
        self._cancel_requests = 0
        loop.call_soon(self._step, None)

    def cancelling(self) -> int:
        """How many times cancel() was called while the task ran."""
        return self._cancel_requests

    def cancel(self) -> bool:
        if self._done:
            return False
        self._cancel_requests += 1
        awaiting, self._awaiting = self._awaiting, None
        if awaiting is not None:
            awaiting.remove_done_callback(self._wake)
            self._loop.call_soon(self._step, CancelledError())
        return True

    def _wake(self, _: Future[Any]) -> None:
        self._awaiting = None
        self._step(None)

    def _step(self, error: BaseException | None) -> None:
        if self._done:
            return
        previous = _current.task
        _current.task = self
        try:
            coroutine = self._coroutine
            awaited = coroutine.send(None) if error is None else coroutine.throw(error)
        except StopIteration as stop:
            self.set_result(stop.value)
        except CancelledError:
            super().cancel()
        except Exception as exc:
            self.set_exception(exc)
        else:
            if isinstance(awaited, Future):
                self._awaiting = awaited
                awaited.add_done_callback(self._wake)
            else:
                self._loop.call_soon(self._step, RuntimeError(
                    f"a task of this loop cannot await {awaited!r}"))
        finally:
            _current.task = previous


class _Current(threading.local):
    task: Task[Any] | None = None
    loop: EventLoop | None = None


_current = _Current()


def current_task() -> Task[Any] | None:
    """The task whose coroutine is running on this thread now, if any."""
    return _current.task


def running_loop() -> EventLoop:
    """The loop running on this thread; RuntimeError outside one (as asyncio's)."""
    if _current.loop is None:
        raise RuntimeError("no event loop is running on this thread")
    return _current.loop


class EventLoop:
    """Runs callbacks on the thread that calls run_until_complete()."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._ready: deque[Handle] = deque()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._timer_order = itertools.count()
        self._from_threads: deque[Handle] = deque()
        self._lock = threading.Lock()
        self._running = False
        self._stop_requested = False
        self._closed = False
        # Other threads wake the loop through this pipe; signals through their own, which
        # Python's C-level handler writes the signal number to (signal.set_wakeup_fd).
        self._wake_read, self._wake_write = _nonblocking_pipe()
        self._signal_read, self._signal_write = _nonblocking_pipe()
        self._selector.register(self._wake_read, selectors.EVENT_READ, self._drain_wakeups)
        self._selector.register(self._signal_read, selectors.EVENT_READ, self._dispatch_signals)
        self._signal_handlers: dict[int, Handle] = {}
        self._previous_wakeup_fd: int | None = None

    # Scheduling.

    def time(self) -> float:
        return time.monotonic()

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Handle:
        handle = Handle(callback, args)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> Handle:
        """call_soon from any thread; RuntimeError once the loop is closed."""
        handle = Handle(callback, args)
        with self._lock:  # close() closes the pipe under it: never a write to a reused fd
            if self._closed:
                raise RuntimeError("the event loop is closed")
            self._from_threads.append(handle)
            with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
                os.write(self._wake_write, b"\0")
        return handle

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        timer = TimerHandle(self.time() + max(delay, 0.0), callback, args)
        heapq.heappush(self._timers, (timer.when, next(self._timer_order), timer))
        return timer

    def create_future(self) -> Future[Any]:
        return Future(self)

    def create_task(self, coroutine: Coroutine[Any, Any, T]) -> Task[T]:
        return Task(self, coroutine)

    def run_in_executor(self, function: Callable[..., T], *args: Any) -> Future[T]:
        """Runs `function(*args)` on a thread of its own; its result comes back as a future."""
        future: Future[T] = self.create_future()

        def work() -> None:
            try:
                result = function(*args)
            except Exception as exc:
                outcome: tuple[Callable[..., Any], Any] = (future.set_exception, exc)
            else:
                outcome = (future.set_result, result)
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                self.call_soon_threadsafe(*outcome)

        threading.Thread(target=work, name=getattr(function, "__name__", "worker"),
                         daemon=True).start()
        return future

    # File descriptors: the selector's data for each is its (reader, writer) handles.

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self._watch(fd, 0, Handle(callback, args))

    def add_writer(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self._watch(fd, 1, Handle(callback, args))

    def remove_reader(self, fd: int) -> bool:
        return self._unwatch(fd, 0)

    def remove_writer(self, fd: int) -> bool:
        return self._unwatch(fd, 1)

    def _watch(self, fd: int, which: int, handle: Handle) -> None:
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            handles: list[Handle | None] = [None, None]
            handles[which] = handle
            self._selector.register(fd, _EVENTS[which], handles)
            return
        handles = key.data
        if handles[which] is not None:
            handles[which].cancel()
        handles[which] = handle
        self._selector.modify(fd, key.events | _EVENTS[which], handles)

    def _unwatch(self, fd: int, which: int) -> bool:
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            return False
        handles = key.data
        handle = handles[which]
        if handle is None:
            return False
        # A readiness already seen in this round must not call it any more.
        handle.cancel()
        handles[which] = None
        events = key.events & ~_EVENTS[which]
        if events:
            self._selector.modify(fd, events, handles)
        else:
            self._selector.unregister(fd)
        return True

    # Signals.

    def add_signal_handler(self, signo: int, callback: Callable[..., Any], *args: Any) -> None:
        """Runs `callback(*args)` on the loop when `signo` arrives (main thread only)."""
        if self._previous_wakeup_fd is None:
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._signal_write,
                                                            warn_on_full_buffer=False)
        self._signal_handlers[signo] = Handle(callback, args)
        # The Python-level handler does nothing: the C handler has written the wake-up byte.
        signal.signal(signo, _ignore_signal)

    def _dispatch_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for signo in os.read(self._signal_read, 256):
                handler = self._signal_handlers.get(signo)
                if handler is not None:
                    self._ready.append(handler)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass

    # Running.

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def run_until_complete(self, awaitable: Future[T] | Coroutine[Any, Any, T]) -> T:
        future = awaitable if isinstance(awaitable, Future) else self.create_task(awaitable)
        self.run_until(future.done)
        return future.result()

    def run_forever(self) -> None:
        """Runs the loop until stop() is called (from a callback on it)."""
        self._stop_requested = False
        self.run_until(lambda: self._stop_requested)

    def stop(self) -> None:
        self._stop_requested = True

    def run_until(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        """Runs the loop until `condition()` holds or `timeout` seconds pass; returns it."""
        if self._closed:
            raise RuntimeError("the event loop is closed")
        if self._running:
            raise RuntimeError("the event loop is already running")
        deadline = None if timeout is None else self.time() + timeout
        self._running = True
        outer, _current.loop = _current.loop, self
        try:
            while not condition():
                if deadline is not None and self.time() >= deadline:
                    return False
                self._run_once(deadline)
            # What the last round made ready (done callbacks of the futures awaited, say)
            # still runs, as it would have had the loop gone on.
            self._run_ready()
            return True
        finally:
            self._running = False
            _current.loop = outer

    def _run_once(self, deadline: float | None) -> None:
        with self._lock:
            self._ready.extend(self._from_threads)
            self._from_threads.clear()
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._ready:
            wait: float | None = 0.0
        else:
            wake_at = self._timers[0][0] if self._timers else None
            if deadline is not None:
                wake_at = deadline if wake_at is None else min(wake_at, deadline)
            # epoll takes at most 2**31-1 ms: a timer further away (a balloon polling
            # interval of weeks) is waited for an hour at a time.
            wait = None if wake_at is None else min(max(wake_at - self.time(), 0.0), MAX_WAIT)
        for key, events in self._selector.select(wait):
            if callable(key.data):  # the loop's own wake-up pipes
                key.data()
                continue
            reader, writer = key.data
            if events & selectors.EVENT_READ and reader is not None:
                self._ready.append(reader)
            if events & selectors.EVENT_WRITE and writer is not None:
                self._ready.append(writer)
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            self._ready.append(heapq.heappop(self._timers)[2])
        self._run_ready()

    def _run_ready(self) -> None:
        """Runs what is ready now; callbacks these schedule run in the next round."""
        with self._lock:
            self._ready.extend(self._from_threads)
            self._from_threads.clear()
        for _ in range(len(self._ready)):
            self._ready.popleft().run()

    def close(self) -> None:
        """Releases the loop's descriptors and signal handlers; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._wake_write)
        if self._previous_wakeup_fd is not None:
            with contextlib.suppress(ValueError):  # not on the main thread
                signal.set_wakeup_fd(self._previous_wakeup_fd)
            for signo in self._signal_handlers:
                signal.signal(signo, signal.SIG_DFL)
        self._selector.close()
        for fd in (self._wake_read, self._signal_read, self._signal_write):
            os.close(fd)
        self._ready.clear()
        self._timers.clear()


_EVENTS = (selectors.EVENT_READ, selectors.EVENT_WRITE)


def wait_for_all(loop: EventLoop, futures: Iterable[Future[Any]], timeout: float) -> bool:
    """Runs `loop` until every future is done or `timeout` passes; True if all are done."""
    pending = list(futures)
    return loop.run_until(lambda: all(future.done() for future in pending), timeout)


def _ignore_signal(signo: int, frame: Any) -> None:
    pass


def _nonblocking_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return read_end, write_end
