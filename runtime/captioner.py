"""The public API: load an exported model, then turn (image, prompt) into text."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from .batching import DEFAULT_MAX_BATCH, DecodeBatch
from .decoder import Decoder, KVCache, Logits, prefill_bias
from .errors import InputError, ModelError
from .image_io import load_image
from .manifest import Manifest, load_manifest
from .preprocess import ImageInputs, PreprocessConfig, preprocess, token_grid
from .prompt import encode, prompt_text
from .request import DEFAULT_MAX_NEW_TOKENS, Answer, Request
from .sessions import open_components
from .streaming import TextStream
from .vision import encode_image

ImageSource = str | os.PathLike | bytes | Image.Image


@dataclass
class EncodedImage:
    """An image after preprocessing and the vision encoder; see `Captioner.encode_image`."""

    inputs: ImageInputs
    embeddings: np.ndarray
    timings: dict[str, float]
    prefix_ids: np.ndarray | None = None
    prefix_cache: KVCache | None = None


@dataclass
class DecodeState:
    """A generation in progress (see `Captioner.prefill`): the KV cache and its row holding this sequence, the
    decoder's output for the next token (row `output_row` of `output`), the prompt's token ids and where the time
    to them went (`preprocess_s`, `vision_s`, `prefill_s`). `Captioner.step` feeds one more token, unless the
    sequence belongs to a `DecodeBatch` (`batch`), which then steps it with the others; once it has left the
    batch, its row belongs to others and `cache` is None."""

    cache: KVCache | None
    output: Logits
    prompt_ids: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    row: int = 0
    output_row: int = 0
    batch: DecodeBatch | None = None

    @property
    def logits(self) -> np.ndarray:
        """The next-token logits [vocab] (copied to host memory when the decoder runs on a GPU)."""
        return self.output.numpy()[self.output_row]

    @property
    def greedy_token(self) -> int:
        """The token greedy decoding picks next (the first highest logit)."""
        return self.output.token(self.output_row)

    @property
    def positions(self) -> int:
        """Positions in the cache: the prompt and every token fed since."""
        if self.cache is None:
            raise ValueError("this sequence has left its DecodeBatch; its positions are gone")
        return self.cache.lengths[self.row]


@dataclass
class Result:
    """Generated text with its token ids, the prompt length and where the time went (seconds)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class Generation:
    """One greedy answer in progress (see `Captioner.start`): picks each token from its state's logits, ends at a
    stop token or at its budget, streams the text and makes the `Result`.

    `Captioner.generate` steps one alone; a `DecodeBatch` drives several with one decoder run per token for all of
    them. `error` holds what `on_text` raised, if anything (the batch then drops the generation).
    """

    def __init__(self, captioner: Captioner, state: DecodeState, max_new_tokens: int,
                 on_text: Callable[[str], None] | None, timings: dict[str, float], started_at: float) -> None:
        self.state = state
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.finished = False
        self.error: Exception | None = None
        self._tokenizer, self._stop_ids = captioner.tokenizer, captioner.stop_ids
        self._on_text = on_text
        self._stream = TextStream(captioner.tokenizer)
        self._timings = timings
        self._started_at = started_at
        self._first_token_at: float | None = None
        self._finished_at = 0.0

    def next_token(self) -> int | None:
        """The token the logits choose, to be fed next; None once the answer is complete (a stop token, or the
        budget reached with this token)."""
        token = self.state.greedy_token
        if token in self._stop_ids:
            return self._finish()
        self._first_token_at = self._first_token_at or time.perf_counter()
        self.tokens.append(token)
        if self._on_text is not None and (piece := self._stream.push(token)):
            self._on_text(piece)
        return self._finish() if len(self.tokens) >= self.max_new_tokens else token

    def _finish(self) -> None:
        self.finished = True
        self._finished_at = time.perf_counter()

    def result(self) -> Result:
        """The answer, its last streamed piece sent; timings as in `Captioner.generate`."""
        text = self._tokenizer.decode(self.tokens)
        if self._on_text is not None and (rest := self._stream.finish(text)):
            self._on_text(rest)
        end = self._finished_at or time.perf_counter()
        decode_s = end - (self._first_token_at or end)
        count = len(self.tokens)
        self._timings.update({
            "ttft_s": (self._first_token_at or end) - self._started_at,
            "decode_tokens_per_s": (count - 1) / decode_s if count > 1 and decode_s > 0 else 0.0,
            "total_s": end - self._started_at,
        })
        return Result(text=text, token_ids=list(self.tokens), prompt_tokens=len(self.state.prompt_ids),
                      timings=self._timings)


class Captioner:
    """An exported Molmo2 model on ONNX Runtime: preprocessing, vision, prefill and greedy decoding."""

    def __init__(self, manifest: Manifest, threads: int | None = None, device: str = "cpu") -> None:
        self.manifest = manifest
        self.preprocess_config = PreprocessConfig.from_dict(manifest.preprocess)
        try:
            self.tokenizer = Tokenizer.from_file(str(manifest.root / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot read {manifest.root / 'tokenizer.json'}: {exc}") from None
        sessions = open_components(manifest, self.preprocess_config, threads, device)
        self.vision, self.adapter, self.embed_session = sessions["vision"], sessions["adapter"], sessions["embed"]
        self.decoder = Decoder(sessions["decoder"], manifest.geometry["text"], sessions.get("decoder_step"))
        self.batch_crops = self.decoder.device != "cpu"  # a GPU takes every crop in one run
        tokens = manifest.tokens
        self.image_patch_id = tokens["image_patch_id"]
        self.structure_ids = tokens["image_structure_ids"]
        self.reserved = [manifest.prompt["image_token"], *tokens["named"]]
        self.stop_ids = set(manifest.stop_token_ids)
        self.max_positions = manifest.geometry["text"]["max_position_embeddings"]

    @classmethod
    def load(cls, model_dir: str | os.PathLike, threads: int | None = None, device: str = "cpu") -> "Captioner":
        """Open an exported model directory (see `molmocap export`), once its files match the manifest's sha256s."""
        return cls(load_manifest(Path(model_dir)), threads=threads, device=device)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        (embeds,) = self.embed_session.run(None, {"input_ids": ids})
        return embeds

    def encode_image(self, image: ImageSource, max_crops: int | None = None) -> EncodedImage:
        """Preprocess and run the vision encoder once, for several questions about the same image.

        The first `generate` on the result also keeps the KV cache of the prompt up to the end of the image block,
        which does not depend on the question, so later questions only prefill their own tokens.
        """
        return self._encode(image, max_crops, "")[0]

    def _encode(self, image: ImageSource, max_crops: int | None, prompt: str) -> tuple[EncodedImage, np.ndarray]:
        """Load `image`, refuse `prompt` with it if too long for the model, then preprocess and run vision.

        The token grid, hence the prompt's length, follows from the image size and the tiling, so the check costs
        nothing and comes before the patches are cut and before the vision encoder, the expensive part.
        """
        t0 = time.perf_counter()
        picture = load_image(image)
        ids = self._prompt_ids(prompt, token_grid(picture.height, picture.width, self.preprocess_config, max_crops))
        inputs = preprocess(picture, self.preprocess_config, max_crops)
        t1 = time.perf_counter()
        embeddings = encode_image(self.vision, self.adapter, inputs, self.batch_crops)
        timings = {"preprocess_s": t1 - t0, "vision_s": time.perf_counter() - t1}
        return EncodedImage(inputs, embeddings, timings), ids

    def _prompt_ids(self, prompt: str, grid: tuple[int, int, int, int]) -> np.ndarray:
        """The prompt's token ids with an image of token grid `grid`; an `InputError` if they fill the positions."""
        text = prompt_text(prompt, grid, self.manifest.prompt, self.manifest.tokens["bos"], self.reserved)
        ids = encode(self.tokenizer, text)
        if len(ids) >= self.max_positions:
            raise InputError(f"the prompt with this image takes {len(ids)} tokens; this model has "
                             f"{self.max_positions} positions (use a smaller max_crops or a shorter prompt)")
        return ids

    def prefill(self, image: ImageSource | EncodedImage, prompt: str | None = None,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_crops: int | None = None,
                batch: DecodeBatch | None = None) -> DecodeState:
        """Run the prompt about `image` through the decoder, with a KV cache sized for `max_new_tokens` more tokens.

        The state holds the logits of the first answer token; `step` feeds each token chosen after it. An
        `EncodedImage` keeps (or reuses) the KV cache of its image block, as in `generate`. With `batch`, the
        prompt is prefilled straight into a free row of the batch's cache, ready to `DecodeBatch.join` without a
        copy.
        """
        encoded, timings, ids = self._prepare(image, prompt, max_crops)
        start = time.perf_counter()
        state = self._prefill_ids(encoded, ids, max_new_tokens, isinstance(image, EncodedImage), batch)
        state.timings = {**timings, "prefill_s": time.perf_counter() - start}
        return state

    def step(self, state: DecodeState, token: int) -> np.ndarray:
        """Feed `token` at the next position of `state`; returns the next logits [vocab] (`state.logits`)."""
        self._feed(state, token)
        return state.logits

    def start(self, image: ImageSource | EncodedImage, prompt: str | None = None,
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_crops: int | None = None,
              on_text: Callable[[str], None] | None = None, batch: DecodeBatch | None = None) -> Generation:
        """Encode `image` and prefill `prompt` (as `generate` does): a `Generation` ready for its first token, to be
        stepped alone, or, with `batch`, prefilled into a row of that `DecodeBatch` and joined to it. Errors of the
        input (an unreadable image, a prompt too long) are raised here, before any decoding."""
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        t0 = time.perf_counter()
        state = self.prefill(image, prompt, max_new_tokens, max_crops, batch)
        max_new_tokens = min(max_new_tokens, self.max_positions - len(state.prompt_ids))
        generation = Generation(self, state, max_new_tokens, on_text, state.timings, t0)
        if batch is not None:
            batch.join(generation)
        return generation

    def generate(self, image: ImageSource | EncodedImage, prompt: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_crops: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> Result:
        """Answer `prompt` (default: the model's caption prompt) about `image` by greedy decoding.

        `image` is a path, bytes, a PIL image or the result of `encode_image` (then `max_crops` was chosen there).
        `on_text` receives the text as it grows, piece by piece, for streaming.
        """
        generation = self.start(image, prompt, max_new_tokens, max_crops, on_text)
        while (token := generation.next_token()) is not None:
            self._feed(generation.state, token)
        return generation.result()

    def generate_batch(self, images: Sequence[ImageSource | EncodedImage], prompts: Sequence[str | None] | None = None,
                       max_new_tokens: int | Sequence[int] = DEFAULT_MAX_NEW_TOKENS, max_crops: int | None = None,
                       max_batch: int = DEFAULT_MAX_BATCH) -> list[Result]:
        """Answers for several (image, prompt) pairs, decoded together: the same greedy tokens as `generate` on each.

        Each pair is encoded and prefilled on its own (Molmo2's prefill attention depends on the prompt), then up to
        `max_batch` sequences take each decode step in one decoder run (a step reads all the weights once, whatever
        the batch), each ending at its own stop token or budget; a sequence that ends frees its row for the next
        pair. `prompts` defaults to the caption prompt for every image; `max_new_tokens` is one budget or one per
        pair. An input error of any pair is raised (use `start` and a `DecodeBatch` to keep the others).
        """
        count = len(images)
        prompts = [None] * count if prompts is None else list(prompts)
        budgets = [max_new_tokens] * count if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(prompts) != count or len(budgets) != count:
            raise InputError(f"{count} images need as many prompts and budgets ({len(prompts)}, {len(budgets)} given)")
        batch = DecodeBatch(self, max_batch)
        generations: dict[int, Generation] = {}
        waiting = iter(range(count))
        while True:
            while not batch.full and (index := next(waiting, None)) is not None:
                generations[index] = self.start(images[index], prompts[index], budgets[index], max_crops, batch=batch)
            if not batch:
                break
            batch.step()
        return [generations[index].result() for index in range(count)]

    def answer(self, image: ImageSource | EncodedImage, request: Request | None = None,
               on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer `request` (default: the model's caption) about `image`, in the request's shape: e.g.
        `captioner.answer("photo.jpg", Request(style="alt")).text`, or `.value` for the seo/tags styles' JSON."""
        request = request or Request()
        result = self.generate(image, request.prompt_for(self.manifest), request.max_new_tokens, request.max_crops,
                               on_text)
        return request.answer(result)

    def _prepare(self, image: ImageSource | EncodedImage, prompt: str | None,
                 max_crops: int | None) -> tuple[EncodedImage, dict[str, float], np.ndarray]:
        """The encoded image, the time its encoding took and the prompt's token ids (checked before vision runs)."""
        prompt = Request().prompt_for(self.manifest) if prompt is None else prompt
        if isinstance(image, EncodedImage):
            if max_crops is not None:
                raise InputError("max_crops is chosen when the image is encoded, not per question")
            return image, {"preprocess_s": 0.0, "vision_s": 0.0}, self._prompt_ids(prompt, image.inputs.grid)
        encoded, ids = self._encode(image, max_crops, prompt)
        return encoded, dict(encoded.timings), ids

    def _feed(self, state: DecodeState, token: int) -> None:
        """One decode step of a sequence decoded alone."""
        if state.batch is not None:
            raise ValueError("this sequence belongs to a DecodeBatch; step it there")
        if state.positions >= state.cache.capacity:
            raise InputError(f"the generation is full: its KV cache holds {state.cache.capacity} positions")
        state.output = self.decoder.step(self.embed(np.array([[token]], dtype=np.int64)), state.cache, state.row)
        state.output_row = 0

    def _prefill_ids(self, encoded: EncodedImage, ids: np.ndarray, max_new_tokens: int, reuse: bool,
                     batch: DecodeBatch | None) -> DecodeState:
        """Prefill `ids` into a cache row (of `batch`, or of a cache of its own) with room for `max_new_tokens` more
        (within the model's positions)."""
        capacity = min(len(ids) + max(max_new_tokens, 1), self.max_positions)
        cache, row = batch.reserve(capacity) if batch is not None else (self.decoder.new_cache(capacity), 0)
        try:
            start = self._reusable_prefix(encoded, ids, cache, row) if reuse else 0
            embeds = self.embed(ids[None, start:])
            if start == 0:
                self._add_image_embeddings(embeds, ids, encoded.embeddings)
            output = self.decoder.forward(embeds, prefill_bias(ids, self.structure_ids, start), cache, row)
        except BaseException:
            if batch is not None:
                batch.release(row)
            raise
        return DecodeState(cache, output, ids, row=row)

    def _add_image_embeddings(self, embeds: np.ndarray, ids: np.ndarray, image_embeddings: np.ndarray) -> None:
        """Molmo2 adds (not substitutes) each image embedding onto its `<im_patch>` token embedding."""
        rows = ids[: embeds.shape[1]] == self.image_patch_id
        if rows.sum() != len(image_embeddings):
            raise ModelError(f"{rows.sum()} image tokens but {len(image_embeddings)} image embeddings")
        embeds[0, rows] += image_embeddings

    def _reusable_prefix(self, encoded: EncodedImage, ids: np.ndarray, cache: KVCache, row: int) -> int:
        """Fill `row` of `cache` with the positions of the image block of `ids`; returns where the prefill goes on.

        The first question about an `EncodedImage` computes and keeps them; later ones copy them when their ids
        start with the same prefix.
        """
        if encoded.prefix_ids is not None and np.array_equal(ids[: len(encoded.prefix_ids)], encoded.prefix_ids):
            cache.copy_row(encoded.prefix_cache, 0, row)
            return len(encoded.prefix_ids)
        end = int(np.flatnonzero(np.isin(ids, self.structure_ids)).max()) + 1
        embeds = self.embed(ids[None, :end])
        self._add_image_embeddings(embeds, ids, encoded.embeddings)
        self.decoder.forward(embeds, prefill_bias(ids[:end], self.structure_ids), cache, row)
        encoded.prefix_ids, encoded.prefix_cache = ids[:end].copy(), cache.copy(row=row)
        return end
