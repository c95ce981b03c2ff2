"""Incremental detokenization for streaming answers: each new token's text without re-decoding the whole answer."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextStream:
    """The text each new token adds, as tokenizers' `DecodeStream` finds it (constant work per token), holding back
    a token that ends inside a multi-byte character until the character is complete."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.shown = ""
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        """The new text after `token` ("" while a character is incomplete)."""
        piece = self._stream.step(self.tokenizer, token) or ""
        self.shown += piece
        return piece

    def finish(self, text: str) -> str:
        """What `text`, the plain decode of every token pushed, has beyond the pieces already returned."""
        rest = text[len(self.shown):]
        self.shown = text
        return rest
