"""Incremental detokenization with stop strings: text deltas that never show half a character or any
part of a stop string.

Decoding the whole output each time keeps merged tokens and multi-byte characters right; a delta is
released only up to the point where no stop string could still begin.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:  # noqa: ANN001 - a transformers tokenizer
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=0)
        self.tokens: list[int] = []
        self.shown = 0  # characters released so far
        self.final_text: str | None = None

    def _decode(self) -> str:
        if self.tokenizer is None:  # a model without a tokenizer: token ids only
            return ""
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (new text to show, whether a stop string has now appeared)."""
        self.tokens.append(token)
        text = self._decode()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.final_text = text[:cut]
            return self._release(self.final_text, len(self.final_text)), True
        if text.endswith("\ufffd"):
            return "", False  # an incomplete UTF-8 sequence: wait for the next token
        return self._release(text, len(text) - self.holdback), False

    def finish(self) -> str:
        """The rest of the text once generation ended (what the stop-string hold-back kept)."""
        text = self.final_text if self.final_text is not None else self._decode()
        return self._release(text, len(text))

    @property
    def text(self) -> str:
        return self.final_text if self.final_text is not None else self._decode()

    def _release(self, text: str, end: int) -> str:
        if end <= self.shown:
            return ""
        delta = text[self.shown:end]
        self.shown = end
        return delta
