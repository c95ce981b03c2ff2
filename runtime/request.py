"""One request, resolved in one place: what the model is asked, with which options, under which cache key, and the
shape of the answer.

The CLI (caption, ask, point), batch runs, the Python API (`Captioner.answer`) and every server route (/v1/caption,
/v1/ask, OpenAI's chat completions, Ollama's generate and chat) build a `Request` and go through it: the default
answer length, "a language without a style means a short caption", a caption style's instruction (with the model's
own phrasing), a JSON `format`'s instruction, the result-cache key and the cleaned answer are decided here only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .cache import result_key
from .errors import InputError
from .manifest import Manifest
from .preprocess import MAX_CROPS, PreprocessConfig
from .styles import STYLES, finish, json_answer, json_format_prompt, style_prompt

if TYPE_CHECKING:
    from .captioner import Result

# Answer length when none is asked for: the Python API, the CLI, batch and every server route use this one value.
DEFAULT_MAX_NEW_TOKENS = 128

# Styles whose answer is rewritten after generation (bounded, or JSON): their text cannot be streamed as it comes.
RESHAPED_STYLES = frozenset({"alt", "seo", "tags"})


def rounded_timings(timings: dict) -> dict:
    """Timings as every output shows them (CLI JSON, batch rows, the server): seconds and rates to 4 decimals,
    flags (`cached`) as they are."""
    return {k: v if isinstance(v, bool) else round(v, 4) for k, v in timings.items()}


class RequestError(InputError):
    """A request that cannot be answered as asked; `param` names the field at fault (for API error bodies)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Request:
    """What to ask about an image: a `prompt` (None: the model's caption prompt), or a caption `style` in a `lang`
    (a language alone asks for a short caption); `json_format` holds the answer to JSON, of `schema`'s shape when
    given (Ollama's `format`); `max_new_tokens` (None: the default) and `max_crops` (None: the model's) bound the work.
    """

    prompt: str | None = None
    style: str | None = None
    lang: str | None = None
    max_new_tokens: int | None = None
    max_crops: int | None = None
    json_format: bool = False
    schema: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.prompt is not None and not self.prompt.strip():
            raise RequestError("the prompt is empty", "prompt")
        if self.lang is not None and not self.lang.strip():
            raise RequestError("the language is empty", "lang")
        if self.style is not None and self.style not in STYLES:
            raise RequestError(f"unknown style {self.style!r}; choose one of {', '.join(STYLES)}", "style")
        if self.prompt is not None and (self.style or self.lang):
            raise RequestError("give either a prompt or a style/language, not both", "prompt")
        if self.json_format and (self.style or self.lang):
            raise RequestError("a JSON format and a caption style cannot be combined", "format")
        if self.schema is not None and not self.json_format:
            raise RequestError("a schema needs json_format", "format")
        if self.lang and not self.style:
            object.__setattr__(self, "style", "short")
        if self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError("max_new_tokens must be an integer of at least 1", "max_new_tokens")
        if self.max_crops is not None and (isinstance(self.max_crops, bool) or not isinstance(self.max_crops, int)
                                           or not 1 <= self.max_crops <= MAX_CROPS):
            raise RequestError(f"max_crops must be an integer from 1 to {MAX_CROPS}", "max_crops")

    @property
    def reshaped(self) -> bool:
        """Whether the answer is rewritten after generation (alt/seo/tags, a JSON format): no raw text streaming."""
        return self.json_format or self.style in RESHAPED_STYLES

    def prompt_for(self, manifest: Manifest) -> str:
        """The instruction actually sent to `manifest`'s model."""
        if self.prompt is not None:
            text = self.prompt
        elif self.style is not None:
            text = style_prompt(self.style, self.lang, manifest.prompt.get("styles"))
        else:
            text = manifest.prompt["default_caption_prompt"]
        return json_format_prompt(text, self.schema) if self.json_format else text

    def options_for(self, manifest: Manifest) -> dict:
        """The generation options as results rows and cache keys record them (max_crops resolved to the model's)."""
        crops = self.max_crops or PreprocessConfig.from_dict(manifest.preprocess).max_crops
        return {"max_new_tokens": self.max_new_tokens, "max_crops": crops, "style": self.style}

    def key(self, image_sha256: str, manifest: Manifest) -> str:
        """The result-cache key of this request about the image whose bytes hash to `image_sha256`."""
        return result_key(image_sha256, manifest.model_id, self.prompt_for(manifest), self.options_for(manifest))

    def answer(self, result: Result) -> Answer:
        """The answer in its promised shape; a `StyleOutputError` when a JSON style or format cannot be repaired."""
        if self.json_format:
            return Answer(self, result, json_answer(result.text, self.schema))
        if self.style is not None:
            return Answer(self, result, finish(self.style, result.text))
        return Answer(self, result, result.text)


@dataclass(frozen=True)
class Answer:
    """A generation's result with its cleaned `value`: text, or a dict/list for seo, tags and JSON formats."""

    request: Request
    result: Result
    value: str | dict | list

    @property
    def text(self) -> str:
        """The answer as text: JSON text for a structured value."""
        return self.value if isinstance(self.value, str) else json.dumps(self.value, ensure_ascii=False)

    def fields(self) -> dict:
        """The answer's part of every output row and response body: `text`, and for a style also `style`,
        `raw_text` (what the model said) and `data` (the structured value)."""
        fields: dict = {"text": self.text}
        if self.request.style is not None:
            fields.update(style=self.request.style, raw_text=self.result.text)
            if not isinstance(self.value, str):
                fields["data"] = self.value
        return fields
