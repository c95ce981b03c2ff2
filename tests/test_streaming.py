"""The incremental detokenizer: streamed pieces join to the plain decode, multi-byte characters included."""

from __future__ import annotations

import pytest

from molmocap.runtime import Captioner
from molmocap.runtime.streaming import TextStream


@pytest.mark.parametrize("text", ["A red circle, café crème and naïve 日本語 😀 text.", "😀😀 ü"])
def test_pieces_join_to_the_decoded_text(text, exported):
    tokenizer = Captioner.load(exported["qwen3_gqa"], threads=1).tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)  # some character spans several tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert sum(bool(piece) for piece in pieces) > 1
    assert "".join(pieces) + stream.finish(tokenizer.decode(ids)) == text
