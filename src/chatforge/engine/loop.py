"""The engine's scheduler in a background thread, shared by many callers (the server): requests
are submitted from any thread, and each request's events come back through its own queue, which
a thread or an asyncio coroutine consumes, or through a callback."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Iterator, Sequence

from .engine import Engine, Event
from .sampling import SamplingParams


class _EventQueue:
    """The events of one request: put by the engine thread, taken by one consumer, which may be a
    thread (`get`) or a coroutine on an asyncio loop (`aget`; no thread is tied up waiting)."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def put(self, item: Event | BaseException) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()
            waker = self._waker
        if waker is not None:
            try:
                waker[0].call_soon_threadsafe(waker[1].set)
            except RuntimeError:  # that event loop has closed
                pass

    def get(self) -> Event | BaseException:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    async def aget(self) -> Event | BaseException:
        if self._waker is None:
            self._waker = (asyncio.get_running_loop(), asyncio.Event())
        flag = self._waker[1]
        while True:
            flag.clear()  # cleared before looking, so a put after the look always wakes us
            with self._cond:
                if self._items:
                    return self._items.popleft()
            await flag.wait()


class _Sink:
    def __init__(self, fn: Callable[[Event | BaseException], None]):
        self.put = fn


class RequestHandle:
    """Events of one request submitted to an EngineLoop: `for ev in handle` in a thread, or
    `async for ev in handle` on an event loop. The last event has a finish_reason; a failure of
    the engine is raised from the iteration."""

    def __init__(self, loop: EngineLoop, rid: int, sink: Callable[[Event | BaseException], None] | None = None):
        self.loop, self.rid = loop, rid
        self.events: _EventQueue | _Sink = _EventQueue() if sink is None else _Sink(sink)
        self.done = False

    def _check(self, ev: Event | BaseException) -> Event:
        if isinstance(ev, BaseException):
            self.done = True
            raise ev
        if ev.finish_reason:
            self.done = True
        return ev

    def __iter__(self) -> Iterator[Event]:
        if not isinstance(self.events, _EventQueue):
            raise TypeError("this request delivers its events to a sink; it cannot be iterated")
        while not self.done:
            yield self._check(self.events.get())

    async def __aiter__(self):
        if not isinstance(self.events, _EventQueue):
            raise TypeError("this request delivers its events to a sink; it cannot be iterated")
        while not self.done:
            yield self._check(await self.events.aget())

    def cancel(self) -> None:
        self.loop.cancel(self)


class EngineLoop:
    """The engine's scheduler in a background thread, shared by many callers (the server).

    `submit` refuses new work with QueueFull when `max_waiting` requests are already queued, so
    callers can answer 503/429 instead of growing a queue without bound. `queue_depth` and
    `active_slots` are for metrics."""

    def __init__(self, engine: Engine | Callable[[], Engine], max_waiting: int = 64):
        """`engine`, or a function that makes one: then it runs on the loop's own thread (loading
        weights, making copies, compiling), which returns once it has, raising what it raised. With
        torch's OpenMP (libgomp), once two threads of a process have run parallel ops, every
        parallel op runs at about one thread's speed (`python benchmarks/engine_thread.py`: 21.7
        vs 35.2 ms per token), so a server makes its engine here and its other threads run none."""
        if max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting} must be >= 0")
        self.max_waiting = max_waiting
        self.engine: Engine = engine if isinstance(engine, Engine) else None  # type: ignore[assignment]
        self.handles: dict[int, RequestHandle] = {}
        self._wake = threading.Event()
        self._stop = False
        self._submit_lock = threading.Lock()
        self._start_error: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine, ready), name="chatforge-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if self._start_error is not None:
            raise self._start_error

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting)

    @property
    def active_slots(self) -> int:
        return self.engine.slots_in_use

    def submit(
        self, prompt: Sequence[int], sampling: SamplingParams | None = None, sink: Callable[[Event | BaseException], None] | None = None
    ) -> RequestHandle:
        """Queue a request. Its events go to the returned handle, or to `sink(event)` (called on
        the engine thread; it must not block) when one is given."""
        if self._stop:
            raise RuntimeError("the engine loop is closed")
        with self._submit_lock:  # the bound holds exactly under concurrent submitters
            if self.queue_depth >= self.max_waiting:
                raise QueueFull(f"{self.queue_depth} requests are already waiting")
            rid = self.engine.new_request_id()
            h = RequestHandle(self, rid, sink)
            self.handles[rid] = h
            try:
                self.engine.add(prompt, sampling, request_id=rid)
            except ValueError:
                del self.handles[rid]
                raise
        self._wake.set()
        return h

    def cancel(self, h: RequestHandle) -> None:
        self.engine.cancel(h.rid)
        self._wake.set()

    def _fail_all(self, e: BaseException) -> None:
        self.engine.abort_all()
        handles = list(self.handles.values())
        self.handles.clear()
        for h in handles:
            h.events.put(e)

    def _run(self, engine: Engine | Callable[[], Engine], ready: threading.Event) -> None:
        try:
            if self.engine is None:
                self.engine = engine()
        except BaseException as e:  # noqa: BLE001 (raised again by __init__ on the caller's thread)
            self._start_error = e
            return
        finally:
            ready.set()
        while not self._stop:
            if not self.engine.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 (any failure goes to every waiting caller; the loop keeps serving)
                self._fail_all(e)
                continue
            for ev in events:
                h = self.handles.get(ev.request_id)
                if h is not None:
                    if ev.finish_reason:
                        del self.handles[ev.request_id]
                    h.events.put(ev)

    def close(self) -> None:
        """Stop the thread; requests still running or waiting end with a RuntimeError."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._fail_all(RuntimeError("the engine loop was closed"))


class QueueFull(Exception):
    """The engine's waiting queue is at its bound."""
