"""Incremental detokenization with stop strings: text deltas that never show half a character or any
part of a stop string.

Decoding the whole output each time keeps merged tokens and multi-byte characters right; a delta is
released only up to the point where no stop string could still begin.
"""

from __future__ import annotations

from collections.abc import Sequence

# Tokens decoded again before the new ones: enough context for merges and leading-space rules.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Each token costs a decode of a short window, not of the whole output: the text of
    ``tokens[prefix:]`` minus the text of ``tokens[prefix:read]`` is what the new tokens add."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:  # noqa: ANN001 - a transformers tokenizer
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=0)
        self.tokens: list[int] = []
        self.prefix = 0  # window start: tokens before it are settled text
        self.read = 0  # tokens whose text is in self.decoded
        self.decoded = ""  # the text of tokens[:read]
        self.shown = 0  # characters released so far
        self.final_text: str | None = None

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # a model without a tokenizer: token ids only
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (new text to show, whether a stop string has now appeared)."""
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix:self.read])
        after = self._decode(self.tokens[self.prefix:])
        if after.endswith("\ufffd") or not after.startswith(before):
            return "", False  # an incomplete UTF-8 sequence (or a merge still open): wait for more tokens
        searched_from = max(0, len(self.decoded) - self.holdback)
        self.decoded += after[len(before):]
        self.prefix, self.read = max(0, len(self.tokens) - CONTEXT_TOKENS), len(self.tokens)
        cut = min((i for i in (self.decoded.find(s, searched_from) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.final_text = self.decoded[:cut]
            return self._release(self.final_text, len(self.final_text)), True
        return self._release(self.decoded, len(self.decoded) - self.holdback), False

    def finish(self) -> str:
        """The rest of the text once generation ended (what the stop-string hold-back kept)."""
        return self._release(self.text, len(self.text))

    @property
    def text(self) -> str:
        if self.final_text is not None:
            return self.final_text
        if self.read < len(self.tokens):  # tokens still waiting for their character to complete
            return self.decoded + self._decode(self.tokens[self.prefix:])[len(self._decode(
                self.tokens[self.prefix:self.read])):]
        return self.decoded

    def _release(self, text: str, end: int) -> str:
        if end <= self.shown:
            return ""
        delta = text[self.shown:end]
        self.shown = end
        return delta
