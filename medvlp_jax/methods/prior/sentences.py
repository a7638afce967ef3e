"""PRIOR's sentence structure of a report: per-token sentence indices (the sentences are
`data.reports.split_sentences`').

`SentenceHook` is a data hook (`Method.data_hooks`): for each record it tokenises the text as
the pipeline does (same truncation and padding, so the indices line up with `input_ids`) and
adds `sentence_ids` int32 `[T]`: the sentence each token belongs to (0, 1, ...), -1 for special
and padding tokens and for tokens of sentences past `max_sentences`. A text without any word
token (an empty report) gets its special tokens ([CLS], [SEP]) as its one sentence, so that
every report has an embedding.
"""

from __future__ import annotations

import bisect

import numpy as np

from medvlp_jax.data.reports import sentence_starts

FIELD = "sentence_ids"


class SentenceHook:
    """record -> `{'sentence_ids': int32 [max_len]}` (see the module docstring).

    Needs a fast (Rust-backed) tokenizer: token offsets map tokens to sentences.
    """

    def __init__(self, tokenizer, max_len: int, max_sentences: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "PRIOR's sentence indices need a fast tokenizer (token offsets); "
                f"data.tokenizer gives {type(tokenizer).__name__}"
            )
        if max_sentences < 1:
            raise ValueError(f"config.model.max_sentences={max_sentences}; expected >= 1")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.max_sentences = max_sentences

    def __repr__(self) -> str:
        return f"SentenceHook(max_len={self.max_len}, max_sentences={self.max_sentences})"

    def sentence_ids(self, text: str) -> np.ndarray:
        """`[max_len]` int32 sentence index of each token of `text` (-1: none)."""
        enc = self.tokenizer(
            text,
            max_length=self.max_len,
            truncation=True,
            padding="max_length",
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        starts = sentence_starts(text)
        out = np.full(self.max_len, -1, np.int32)
        for t, ((begin, end), special) in enumerate(
            zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
        ):
            if special or end <= begin:
                continue
            index = bisect.bisect_right(starts, begin) - 1
            if 0 <= index < self.max_sentences:
                out[t] = index
        if not (out >= 0).any():
            out[np.asarray(enc["attention_mask"], bool)] = 0
        return out

    def __call__(self, record) -> dict[str, np.ndarray]:
        return {FIELD: self.sentence_ids(record.text)}
