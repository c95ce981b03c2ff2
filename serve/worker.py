"""One model, one model thread: requests queue on it in arrival order and decode together; streamed text crosses back
to asyncio.

ONNX Runtime sessions already use every core they are given, so running two generations on two threads would only
make both slower. Instead the model thread decodes up to `max_batch` generations in one `DecodeBatch` (a decode
step reads the weights once for all of them): a request that arrives while others decode is prefilled between two
steps and joins the batch (continuous batching), and each leaves it at its own end. The queue is bounded (past
`max_queue` waiting generations a request is refused at once with `QueueFull`), images are decoded on the model
thread just before their prefill (so at most one decoded image is alive, however many requests wait), and every
generation can be cancelled: by its deadline, by its client leaving, or by a streaming client that stops reading.
The model thread checks the cancel flags between steps and at each piece of text; a queued generation whose
request is gone never runs. With `max_batch` 1 each generation runs alone to its end (`Captioner.generate`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from PIL import Image

from molmocap.runtime import Captioner, InputError, Result
from molmocap.runtime.batching import DEFAULT_MAX_BATCH, DecodeBatch
from molmocap.runtime.captioner import Generation
from molmocap.runtime.image_io import load_image

DEFAULT_MAX_QUEUE = 16
DEFAULT_REQUEST_TIMEOUT_S = 300.0
STREAM_BACKLOG = 256  # text pieces a streaming client may fall behind before it counts as not reading
POLL_S = 0.25  # how often a waiting request checks whether its client is still there

Gone = Callable[[], Awaitable[bool]]


def finish_reason(result: Result, max_new_tokens: int, max_positions: int) -> str:
    """Why generation ended: "length" at the token limit (or the end of the model's positions), else "stop"."""
    budget = min(max_new_tokens, max_positions - result.prompt_tokens)
    return "length" if len(result.token_ids) >= budget else "stop"


class ShuttingDown(Exception):
    """The server is stopping and takes no new generations."""


class QueueFull(Exception):
    """`max_queue` generations are already waiting; `retry_after_s` estimates when one slot frees up."""

    def __init__(self, waiting: int, retry_after_s: int) -> None:
        super().__init__(f"{waiting} generations are already waiting for the model")
        self.waiting = waiting
        self.retry_after_s = retry_after_s


class TimedOut(Exception):
    """The request's deadline passed before its generation finished; the generation was cancelled."""


class ClientGone(Exception):
    """The client closed its connection; its generation was cancelled (or never started)."""


class Stalled(Exception):
    """A streaming client fell `STREAM_BACKLOG` pieces behind: it stopped reading, so its generation was cancelled."""


@dataclass(frozen=True)
class ImageData:
    """A request's image bytes, decoded on the model thread; `param` names the field they came in."""

    data: bytes
    param: str


class ImageRejected(Exception):
    """The request's image could not be decoded: the runtime's one-line `InputError`, and the field it came in."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class _Cancelled(Exception):
    """Raised on the model thread (from `on_text`) to stop a generation whose request has given up on it."""


_REASONS = {"timeout": TimedOut, "client_gone": ClientGone, "stalled": Stalled}


class _Job:
    """One generation's cancel flag and the first reason given for it, shared by the request and the model thread."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.reason = "client_gone"

    def stop(self, reason: str) -> None:
        if not self.cancel.is_set():
            self.reason = reason
            self.cancel.set()

    def error(self) -> Exception:
        return _REASONS[self.reason]()


@dataclass
class _Request:
    """A generation asked for: what to generate, its cancel flag, where its text goes and its future."""

    job: _Job
    image: Image.Image | ImageData
    prompt: str | None
    max_new_tokens: int
    max_crops: int | None
    on_text: Callable[[str], None] | None
    future: concurrent.futures.Future
    started_at: float = 0.0

    def checked(self, piece: str) -> None:
        """`on_text` for the runtime: stops the generation (raises `_Cancelled`) once its request has given up."""
        if self.job.cancel.is_set():
            raise _Cancelled
        if self.on_text is not None:
            self.on_text(piece)


class ModelWorker:
    """Runs generations on a dedicated model thread, up to `max_batch` decoding together, at most `max_queue`
    waiting."""

    def __init__(self, captioner: Captioner, max_queue: int = DEFAULT_MAX_QUEUE,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.captioner = captioner
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Request] = deque()
        self._closed = False
        self._pending = 0
        self._running = 0
        self._outcomes: Counter[str] = Counter()
        self._last_run_s = 1.0
        self._thread = threading.Thread(target=self._serve, name="molmocap-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Generations running or waiting for the model."""
        return self._pending

    @property
    def waiting(self) -> int:
        """Generations waiting for the model (not counting those running)."""
        with self._lock:
            return max(0, self._pending - self._running)

    def outcomes(self) -> dict[str, int]:
        """Generations by outcome: completed, failed, bad_image, rejected (queue full), cancelled_<reason> and
        skipped_<reason> (reason: client_gone, timeout, stalled)."""
        with self._lock:
            return dict(sorted(self._outcomes.items()))

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._outcomes[outcome] += 1

    def _submit(self, job: _Job, image: Image.Image | ImageData, prompt: str | None, max_new_tokens: int,
                max_crops: int | None, on_text: Callable[[str], None] | None) -> concurrent.futures.Future:
        """Queue a generation for the model thread, or refuse it with `QueueFull`; pending drops when it ends."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise ShuttingDown
            waiting = self._pending - self._running
            if waiting >= self.max_queue:
                self._outcomes["rejected"] += 1
                rounds = math.ceil((waiting + 1) / self.max_batch)
                retry_after = math.ceil(min(60.0, max(1.0, self._last_run_s * rounds)))
                raise QueueFull(waiting, retry_after)
            self._pending += 1
            self._queue.append(_Request(job, image, prompt, max_new_tokens, max_crops, on_text, future))
            self._wake.notify()
        future.add_done_callback(lambda _: self._done())
        return future

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def _serve(self) -> None:
        """The model thread: admit queued requests while the batch has room, then one decode step for the batch."""
        batch: DecodeBatch | None = None
        members: dict[int, _Request] = {}  # id(generation) -> its request
        while True:
            with self._wake:
                while not self._queue and not members:
                    if self._closed:
                        return
                    self._wake.wait()
                room = self.max_batch - len(members)
                admitted = [self._queue.popleft() for _ in range(min(len(self._queue), room))]
            for request in admitted:
                # set_running_or_notify_cancel is False for a request dropped while it waited
                if not request.future.set_running_or_notify_cancel():
                    continue
                if self.max_batch > 1:
                    batch = batch or DecodeBatch(self.captioner, self.max_batch)  # an empty one is dropped too
                if generation := self._start(request, batch):
                    members[id(generation)] = request
            for generation in list(batch.members if members else ()):
                if members[id(generation)].job.cancel.is_set():
                    batch.leave(generation)
                    generation.error = _Cancelled()
                    self._finish(members.pop(id(generation)), generation)
            if not members:
                batch = None  # the next batch allocates its own KV rows; this one's memory goes
                continue
            try:
                left = batch.step()
            except Exception as exc:  # noqa: BLE001 - the runtime failed: every member's request gets the error
                for generation in batch.members:
                    generation.error = exc
                    self._finish(members.pop(id(generation)), generation)
                batch = None
                continue
            for generation in left:
                self._finish(members.pop(id(generation)), generation)

    def _start(self, request: _Request, batch: DecodeBatch | None) -> Generation | None:
        """Decode the request's image and prefill its prompt into a row of `batch`, which it joins; None when the
        request is settled already (cancelled, a bad image, a refused input, or run to its end alone when
        `max_batch` is 1)."""
        job = request.job
        with self._lock:
            self._running += 1
        request.started_at = time.perf_counter()
        try:
            if job.cancel.is_set():
                self._count(f"skipped_{job.reason}")
                raise _Cancelled
            try:
                image = request.image
                picture = image if isinstance(image, Image.Image) else load_image(image.data)
            except InputError as exc:
                self._count("bad_image")
                raise ImageRejected(str(exc), image.param) from None
            if self.max_batch == 1:
                result = self._counted(job, lambda: self.captioner.generate(
                    picture, request.prompt, request.max_new_tokens, request.max_crops, on_text=request.checked))
                self._settle(request, result=result)
                return None
            return self._counted(job, lambda: self.captioner.start(
                picture, request.prompt, request.max_new_tokens, request.max_crops, on_text=request.checked,
                batch=batch))
        except Exception as exc:  # noqa: BLE001 - handed to the request, which renders it
            self._settle(request, error=exc)
            return None

    def _counted(self, job: _Job, call: Callable[[], object]):
        """`call()`, counting a cancellation or a failure before it propagates."""
        try:
            return call()
        except _Cancelled:
            self._count(f"cancelled_{job.reason}")
            raise
        except Exception:
            self._count("failed")
            raise

    def _finish(self, request: _Request, generation: Generation) -> None:
        """Settle the request of a generation that left the batch: its result, or why it stopped."""
        try:
            if generation.error is not None:
                raise generation.error
            result = self._counted(request.job, generation.result)  # sends the last streamed piece
        except Exception as exc:  # noqa: BLE001 - handed to the request
            if generation.error is not None:
                self._count(f"cancelled_{request.job.reason}" if isinstance(exc, _Cancelled) else "failed")
            self._settle(request, error=exc)
            return
        self._settle(request, result=result)

    def _settle(self, request: _Request, result: Result | None = None, error: Exception | None = None) -> None:
        with self._lock:
            self._running -= 1
            if error is None:
                self._outcomes["completed"] += 1
                self._last_run_s = time.perf_counter() - request.started_at
        if error is None:
            request.future.set_result(result)
        else:
            request.future.set_exception(error)

    def _abandon(self, job: _Job, future: concurrent.futures.Future, reason: str) -> None:
        """Give up on `job`: drop it from the queue if it has not started, else stop it at its next step."""
        if future.done():
            return
        job.stop(reason)
        if future.cancel():
            self._count(f"skipped_{reason}")

    async def generate(self, image: Image.Image | ImageData, prompt: str | None, max_new_tokens: int,
                       max_crops: int | None, gone: Gone | None = None) -> Result:
        """The whole result, once the model is free and has finished.

        Raises `QueueFull` at once when the queue is full, `TimedOut` past the request timeout and `ClientGone`
        when `gone()` (polled every `POLL_S` while waiting) says the client left; each cancels the generation.
        """
        loop = asyncio.get_running_loop()
        job = _Job()
        future = self._submit(job, image, prompt, max_new_tokens, max_crops, None)
        waiter = asyncio.wrap_future(future)
        waiter.add_done_callback(_retrieve)
        deadline = loop.time() + self.request_timeout_s
        reason = "client_gone"
        try:
            while not waiter.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    reason = "timeout"
                    raise TimedOut
                await asyncio.wait({waiter}, timeout=min(POLL_S, remaining))
                if not waiter.done() and gone is not None and await gone():
                    raise ClientGone
            try:
                return waiter.result()
            except _Cancelled:
                raise job.error() from None
        finally:
            self._abandon(job, future, reason)

    async def stream(self, image: Image.Image | ImageData, prompt: str | None, max_new_tokens: int,
                     max_crops: int | None, gone: Gone | None = None) -> AsyncIterator[str | Result]:
        """Text pieces as they are generated, then the `Result`; errors are raised from the iteration.

        The runtime calls `on_text` on the worker thread; each piece is handed to this loop's queue with
        `call_soon_threadsafe`. Closing the iterator early (a client disconnect) stops the generation at its
        next piece; so does a reader more than `STREAM_BACKLOG` pieces behind, and the request timeout. Until
        the first piece, `gone()` is polled as in `generate` (afterwards the streaming response watches for a
        disconnect itself).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        room = threading.Semaphore(STREAM_BACKLOG)
        job = _Job()

        def put(kind: str, item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                job.stop("client_gone")

        def on_text(piece: str) -> None:
            if not room.acquire(blocking=False):
                job.stop("stalled")
                raise _Cancelled
            put("text", piece)

        def settled(future: concurrent.futures.Future) -> None:
            if future.cancelled():  # dropped from the queue: the request has stopped listening
                return
            error = future.exception()
            if error is None:
                put("done", future.result())
            else:
                put("error", job.error() if isinstance(error, _Cancelled) else error)

        future = self._submit(job, image, prompt, max_new_tokens, max_crops, on_text)
        future.add_done_callback(settled)
        deadline = loop.time() + self.request_timeout_s
        reason = "client_gone"
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    reason = "timeout"
                    raise TimedOut
                try:
                    kind, item = await asyncio.wait_for(queue.get(), min(POLL_S, remaining))
                except TimeoutError:
                    if gone is not None and await gone():
                        raise ClientGone from None
                    continue
                if kind == "error":
                    raise item  # type: ignore[misc]
                if kind == "text":
                    room.release()
                gone = None
                yield item  # type: ignore[misc]
                if kind == "done":
                    return
        finally:
            self._abandon(job, future, reason)

    def close(self) -> None:
        """Take no new work; what is already queued still runs (uvicorn has answered its requests by then)."""
        with self._wake:
            self._closed = True
            self._wake.notify()


def _retrieve(future: asyncio.Future) -> None:
    """Mark an abandoned generation's outcome as seen, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
