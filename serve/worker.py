"""One model, one worker thread: requests queue on it in arrival order, and streamed text crosses back to asyncio.

ONNX Runtime sessions already use every core they are given, so running two generations at once would only make
both slower; a single-thread executor serialises them without dropping any, and keeps the event loop free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial

from PIL import Image

from molmocap.runtime import Captioner, Result


def finish_reason(result: Result, max_new_tokens: int, max_positions: int) -> str:
    """Why generation ended: "length" at the token limit (or the end of the model's positions), else "stop"."""
    budget = min(max_new_tokens, max_positions - result.prompt_tokens)
    return "length" if len(result.token_ids) >= budget else "stop"


class ShuttingDown(Exception):
    """The server is stopping and takes no new generations."""


class _Abandoned(Exception):
    """Raised inside `on_text` to stop a generation whose client has gone away."""


class ModelWorker:
    """Runs `captioner.generate` on a dedicated thread, one call at a time."""

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="molmocap-model")
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Generations running or waiting for the model."""
        return self._pending

    def _submit(self, job: Callable[[], object]) -> concurrent.futures.Future:
        """Queue `job` on the model thread; the pending count drops when it finishes (or is cancelled unstarted)."""
        with self._lock:
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

    async def generate(self, image: Image.Image, prompt: str | None, max_new_tokens: int,
                       max_crops: int | None) -> Result:
        """The whole result, once the model is free and has finished."""
        job = partial(self.captioner.generate, image, prompt, max_new_tokens, max_crops)
        return await asyncio.wrap_future(self._submit(job))

    async def stream(self, image: Image.Image, prompt: str | None, max_new_tokens: int,
                     max_crops: int | None) -> AsyncIterator[str | Result]:
        """Text pieces as they are generated, then the `Result`; errors are raised from the iteration.

        The runtime calls `on_text` on the worker thread; each piece is handed to this loop's queue with
        `call_soon_threadsafe`. Closing the iterator early (a client disconnect) stops the generation at its
        next piece, so an abandoned stream frees the model for the requests queued behind it.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        abandoned = threading.Event()

        def put(kind: str, item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                abandoned.set()

        def on_text(piece: str) -> None:
            if abandoned.is_set():
                raise _Abandoned
            put("text", piece)

        def job() -> None:
            if abandoned.is_set():
                return
            try:
                result = self.captioner.generate(image, prompt, max_new_tokens, max_crops, on_text=on_text)
            except _Abandoned:
                return
            except Exception as exc:  # noqa: BLE001 - handed to the request, which renders it
                put("error", exc)
                return
            put("done", result)

        self._submit(job)
        try:
            while True:
                kind, item = await queue.get()
                if kind == "error":
                    raise item
                yield item
                if kind == "done":
                    return
        finally:
            abandoned.set()

    def close(self) -> None:
        """Take no new work; what is already queued still runs (uvicorn has answered its requests by then)."""
        self._executor.shutdown(wait=False)
