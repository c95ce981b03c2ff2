"""The public API: load an exported model, then turn (image, prompt) into text."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from .decoder import Decoder, KVCache, prefill_bias
from .errors import InputError, ModelError
from .image_io import load_image
from .manifest import Manifest, load_manifest
from .preprocess import ImageInputs, PreprocessConfig, preprocess, token_grid
from .prompt import encode, prompt_text
from .sessions import open_components
from .streaming import TextStream
from .styles import style_prompt
from .vision import encode_image

ImageSource = str | os.PathLike | bytes | Image.Image

# Answer length when none is asked for: the Python API, the CLI, batch and every server route use this one value.
DEFAULT_MAX_NEW_TOKENS = 128


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
    """A generation in progress (see `Captioner.prefill`): the KV cache, the logits for the next token, the
    prompt's token ids and where the time to them went (`preprocess_s`, `vision_s`, `prefill_s`).
    `Captioner.step` feeds one more token."""

    cache: KVCache
    logits: np.ndarray
    prompt_ids: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        """Positions in the cache: the prompt and every token fed since."""
        return self.cache.length


@dataclass
class Result:
    """Generated text with its token ids, the prompt length and where the time went (seconds)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


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

    def style_prompt(self, style: str, lang: str | None = None) -> str:
        """The instruction for a caption style, with this model's own phrasing where its manifest has one."""
        return style_prompt(style, lang, self.manifest.prompt.get("styles"))

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
        embeddings = encode_image(self.vision, self.adapter, inputs)
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
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_crops: int | None = None) -> DecodeState:
        """Run the prompt about `image` through the decoder, with a KV cache sized for `max_new_tokens` more tokens.

        The state holds the logits of the first answer token; `step` feeds each token chosen after it. An
        `EncodedImage` keeps (or reuses) the KV cache of its image block, as in `generate`.
        """
        encoded, timings, ids = self._prepare(image, prompt, max_crops)
        start = time.perf_counter()
        state = self._prefill_ids(encoded, ids, max_new_tokens, isinstance(image, EncodedImage))
        state.timings = {**timings, "prefill_s": time.perf_counter() - start}
        return state

    def step(self, state: DecodeState, token: int) -> np.ndarray:
        """Feed `token` at the next position of `state`; returns (and keeps in `state`) the next logits [vocab]."""
        if state.cache.length >= state.cache.capacity:
            raise InputError(f"the generation is full: its KV cache holds {state.cache.capacity} positions")
        state.logits = self.decoder.step(self.embed(np.array([[token]], dtype=np.int64)), state.cache)
        return state.logits

    def generate(self, image: ImageSource | EncodedImage, prompt: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_crops: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> Result:
        """Answer `prompt` (default: the model's caption prompt) about `image` by greedy decoding.

        `image` is a path, bytes, a PIL image or the result of `encode_image` (then `max_crops` was chosen there).
        `on_text` receives the text as it grows, piece by piece, for streaming.
        """
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        t0 = time.perf_counter()
        encoded, timings, ids = self._prepare(image, prompt, max_crops)
        max_new_tokens = min(max_new_tokens, self.max_positions - len(ids))

        t_prefill = time.perf_counter()
        state = self._prefill_ids(encoded, ids, max_new_tokens, isinstance(image, EncodedImage))
        t3 = time.perf_counter()

        tokens: list[int] = []
        stream = TextStream(self.tokenizer)
        first_token_at = None
        while len(tokens) < max_new_tokens:
            token = int(np.argmax(state.logits))
            if token in self.stop_ids:
                break
            first_token_at = first_token_at or time.perf_counter()
            tokens.append(token)
            if on_text is not None and (piece := stream.push(token)):
                on_text(piece)
            if len(tokens) < max_new_tokens:
                self.step(state, token)
        t4 = time.perf_counter()
        text_out = self.tokenizer.decode(tokens)
        if on_text is not None and (rest := stream.finish(text_out)):
            on_text(rest)
        decode_s = t4 - (first_token_at or t4)
        timings.update({
            "prefill_s": t3 - t_prefill,
            "ttft_s": (first_token_at or t3) - t0,
            "decode_tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
            "total_s": t4 - t0,
        })
        return Result(text=text_out, token_ids=tokens, prompt_tokens=len(ids), timings=timings)

    def _prepare(self, image: ImageSource | EncodedImage, prompt: str | None,
                 max_crops: int | None) -> tuple[EncodedImage, dict[str, float], np.ndarray]:
        """The encoded image, the time its encoding took and the prompt's token ids (checked before vision runs)."""
        prompt = self.manifest.prompt["default_caption_prompt"] if prompt is None else prompt
        if isinstance(image, EncodedImage):
            if max_crops is not None:
                raise InputError("max_crops is chosen when the image is encoded, not per question")
            return image, {"preprocess_s": 0.0, "vision_s": 0.0}, self._prompt_ids(prompt, image.inputs.grid)
        encoded, ids = self._encode(image, max_crops, prompt)
        return encoded, dict(encoded.timings), ids

    def _prefill_ids(self, encoded: EncodedImage, ids: np.ndarray, max_new_tokens: int, reuse: bool) -> DecodeState:
        """Prefill `ids` into a cache with room for `max_new_tokens` more (within the model's positions)."""
        capacity = min(len(ids) + max(max_new_tokens, 1), self.max_positions)
        cache, start = self._reusable_prefix(encoded, ids, capacity) if reuse else (self.decoder.new_cache(capacity), 0)
        embeds = self.embed(ids[None, start:])
        if start == 0:
            self._add_image_embeddings(embeds, ids, encoded.embeddings)
        logits = self.decoder.forward(embeds, prefill_bias(ids, self.structure_ids, start), cache)
        return DecodeState(cache, logits, ids)

    def _add_image_embeddings(self, embeds: np.ndarray, ids: np.ndarray, image_embeddings: np.ndarray) -> None:
        """Molmo2 adds (not substitutes) each image embedding onto its `<im_patch>` token embedding."""
        rows = ids[: embeds.shape[1]] == self.image_patch_id
        if rows.sum() != len(image_embeddings):
            raise ModelError(f"{rows.sum()} image tokens but {len(image_embeddings)} image embeddings")
        embeds[0, rows] += image_embeddings

    def _reusable_prefix(self, encoded: EncodedImage, ids: np.ndarray, capacity: int) -> tuple[KVCache, int]:
        """A KV cache of `capacity` positions covering the image block of `ids`, and where the prefill must start.

        The first question about an `EncodedImage` computes and keeps it; later ones reuse a copy when their ids
        start with the same prefix.
        """
        if encoded.prefix_ids is not None and np.array_equal(ids[: len(encoded.prefix_ids)], encoded.prefix_ids):
            return encoded.prefix_cache.copy(capacity), len(encoded.prefix_ids)
        cache = self.decoder.new_cache(capacity)
        end = int(np.flatnonzero(np.isin(ids, self.structure_ids)).max()) + 1
        embeds = self.embed(ids[None, :end])
        self._add_image_embeddings(embeds, ids, encoded.embeddings)
        self.decoder.forward(embeds, prefill_bias(ids[:end], self.structure_ids), cache)
        encoded.prefix_ids, encoded.prefix_cache = ids[:end].copy(), cache.copy()
        return cache, end
