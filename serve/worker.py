"""One model, one worker thread: requests queue on it in arrival order, and streamed text crosses back to asyncio.

ONNX Runtime sessions already use every core they are given, so running two generations at once would only make
both slower; a single-thread executor serialises them and keeps the event loop free. The queue is bounded (past
`max_queue` waiting generations a request is refused at once with `QueueFull`), images are decoded on the model
thread just before their generation (so at most one decoded image is alive, however many requests wait), and every
generation can be cancelled: by its deadline, by its client leaving, or by a streaming client that stops reading.
The model thread checks the cancel flag at each piece of text; a queued generation whose request is gone never runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from PIL import Image

from molmocap.runtime import Captioner, InputError, Result
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


class ModelWorker:
    """Runs `captioner.generate` on a dedicated thread, one call at a time, at most `max_queue` waiting."""

    def __init__(self, captioner: Captioner, max_queue: int = DEFAULT_MAX_QUEUE,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
        self.captioner = captioner
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="molmocap-model")
        self._lock = threading.Lock()
        self._pending = 0
        self._running = 0
        self._outcomes: Counter[str] = Counter()
        self._last_run_s = 1.0

    @property
    def pending(self) -> int:
        """Generations running or waiting for the model."""
        return self._pending

    @property
    def waiting(self) -> int:
        """Generations waiting for the model (not counting the one running)."""
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

    def _submit(self, job: Callable[[], object]) -> concurrent.futures.Future:
        """Queue `job` on the model thread, or refuse it with `QueueFull`; pending drops when it finishes."""
        with self._lock:
            waiting = self._pending - self._running
            if waiting >= self.max_queue:
                self._outcomes["rejected"] += 1
                retry_after = math.ceil(min(60.0, max(1.0, self._last_run_s * (waiting + 1))))
                raise QueueFull(waiting, retry_after)
            self._pending += 1
        try:
            future = self._executor.submit(job)
        except RuntimeError:  # the executor is shut down
            self._done()
            raise ShuttingDown from None
        future.add_done_callback(lambda _: self._done())
        return future

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, job: _Job, image: Image.Image | ImageData, prompt: str | None, max_new_tokens: int,
             max_crops: int | None, on_text: Callable[[str], None] | None) -> Result:
        """On the model thread: skip a cancelled job, decode its image, generate, checking the flag at each piece."""
        with self._lock:
            self._running += 1
        try:
            if job.cancel.is_set():
                self._count(f"skipped_{job.reason}")
                raise _Cancelled
            try:
                picture = image if isinstance(image, Image.Image) else load_image(image.data)
            except InputError as exc:
                self._count("bad_image")
                raise ImageRejected(str(exc), image.param) from None

            def checked(piece: str) -> None:
                if job.cancel.is_set():
                    raise _Cancelled
                if on_text is not None:
                    on_text(piece)

            t0 = time.perf_counter()
            try:
                result = self.captioner.generate(picture, prompt, max_new_tokens, max_crops, on_text=checked)
            except _Cancelled:
                self._count(f"cancelled_{job.reason}")
                raise
            except Exception:
                self._count("failed")
                raise
            with self._lock:
                self._outcomes["completed"] += 1
                self._last_run_s = time.perf_counter() - t0
            return result
        finally:
            with self._lock:
                self._running -= 1

    def _abandon(self, job: _Job, future: concurrent.futures.Future, reason: str) -> None:
        """Give up on `job`: drop it from the queue if it has not started, else stop it at its next piece."""
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
        future = self._submit(partial(self._run, job, image, prompt, max_new_tokens, max_crops, None))
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

        def work() -> None:
            try:
                result = self._run(job, image, prompt, max_new_tokens, max_crops, on_text)
            except _Cancelled:
                put("error", job.error())
                return
            except Exception as exc:  # noqa: BLE001 - handed to the request, which renders it
                put("error", exc)
                return
            put("done", result)

        future = self._submit(work)
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
        self._executor.shutdown(wait=False)


def _retrieve(future: asyncio.Future) -> None:
    """Mark an abandoned generation's outcome as seen, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
