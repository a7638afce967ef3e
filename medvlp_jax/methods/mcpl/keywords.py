"""MCPL's anatomy-pathology (AP) keywords: vocabularies, per-report extraction, token sequences.

For each report, the anatomy words it contains (word-level match: the report is lower-cased and
split into `[a-z0-9]+` runs), in vocabulary order and de-duplicated, joined by spaces and
tokenised, give the anatomy sequence `a`; the pathology words give `p`. The published lists
(75 anatomy + 44 pathology words) ship as `medvlp_jax/data/mcpl_ap_vocab.json`; three entries
can never match a word ('port-a-cath', 'heiaphragm', 'otracheal') and are kept for fidelity.

Sequences are built from a per-word token table (`ApTokenizer`): the tokenizer's start
specials, the selected words' tokens concatenated (truncated to fit), its end specials, then
padding. For WordPiece and CLIP BPE tokenizers (words are tokenised independently) this equals
tokenising the space-joined words (see the tests), and it lets the model build the very same
sequences inside `jit` from *predicted* multi-hot keywords when there is no report. (Byte-level
BPE tokenizers such as RoBERTa's mark word-initial spaces; there every word is tokenised as if
it began the text: not the joined string's tokens, but the same in the hook and in the model.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np

WORD = re.compile(r"[a-z0-9]+")
GROUPS = ("anatomy", "pathology")


@dataclasses.dataclass(frozen=True)
class ApVocab:
    """The two keyword lists, in their published order. `words` = anatomy + pathology."""

    anatomy: tuple[str, ...]
    pathology: tuple[str, ...]

    @property
    def words(self) -> tuple[str, ...]:
        return self.anatomy + self.pathology

    def __len__(self) -> int:
        return len(self.anatomy) + len(self.pathology)


def load_vocab(path: str = "") -> ApVocab:
    """Reads a vocabulary JSON (`{"anatomy": [...], "pathology": [...]}`); '' = the packaged
    published lists. Raises ValueError naming the file and field when the file is malformed."""
    if path:
        source, text = path, Path(path).read_text()
    else:
        source = "medvlp_jax/data/mcpl_ap_vocab.json"
        text = resources.files("medvlp_jax.data").joinpath("mcpl_ap_vocab.json").read_text()
    data = json.loads(text)
    lists = []
    for group in GROUPS:
        words = data.get(group) if isinstance(data, dict) else None
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError(
                f"model.ap_vocab={source}: '{group}' must be a non-empty list of words"
            )
        lists.append(tuple(w.strip().lower() for w in words))
    return ApVocab(*lists)


def extract_keywords(text: str, vocab: ApVocab) -> np.ndarray:
    """Multi-hot float32 `[len(vocab)]` (anatomy columns first) of the vocabulary words that
    occur as whole words in `text` (case-insensitive)."""
    present = set(WORD.findall(text.lower()))
    return np.array([w in present for w in vocab.words], np.float32)


@dataclasses.dataclass(frozen=True)
class ApTokenizer:
    """Per-word token ids of a vocabulary for one tokenizer (hashable: a Linen attribute).

    word_ids: tokens of each vocabulary word without specials, anatomy words first.
    num_anatomy: how many of `word_ids` are anatomy words.
    prefix / suffix: the tokenizer's start / end special tokens; pad_id: its padding id.
    length: L, the length of each sequence.
    """

    word_ids: tuple[tuple[int, ...], ...]
    num_anatomy: int
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad_id: int
    length: int

    @classmethod
    def create(cls, tokenizer, vocab: ApVocab, length: int) -> ApTokenizer:
        """Tokenises every vocabulary word once; finds the specials around a probe word."""
        word_ids = tuple(
            tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in vocab.words
        )
        probe = list(word_ids[0])
        full = list(tokenizer(vocab.words[0])["input_ids"])
        starts = [i for i in range(len(full)) if full[i : i + len(probe)] == probe]
        if not starts:
            raise ValueError(
                f"data.tokenizer: the tokens of {vocab.words[0]!r} change when special tokens "
                "are added; cannot build MCPL's keyword sequences with this tokenizer"
            )
        at = starts[0]
        prefix, suffix = tuple(full[:at]), tuple(full[at + len(probe) :])
        if length <= len(prefix) + len(suffix):
            raise ValueError(f"model.ap_max_len={length} leaves no room for keyword tokens")
        pad = tokenizer.pad_token_id
        return cls(word_ids, len(vocab.anatomy), prefix, suffix, 0 if pad is None else pad, length)

    def _group(self, g: int) -> range:
        return range(self.num_anatomy) if g == 0 else range(self.num_anatomy, len(self.word_ids))

    def sequences_np(self, hot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Multi-hot `[V]` -> (ids int32 `[2, L]`, mask int32 `[2, L]`): row 0 anatomy, row 1
        pathology. The host-side reference (used by the data hook)."""
        ids = np.full((2, self.length), self.pad_id, np.int32)
        mask = np.zeros((2, self.length), np.int32)
        room = self.length - len(self.prefix) - len(self.suffix)
        for g in range(2):
            body = [t for v in self._group(g) if hot[v] for t in self.word_ids[v]][:room]
            seq = [*self.prefix, *body, *self.suffix]
            ids[g, : len(seq)] = seq
            mask[g, : len(seq)] = 1
        return ids, mask

    def sequences(self, hot):
        """Multi-hot `[B, V]` (bool or 0/1) -> (ids int32 `[B, 2, L]`, mask int32 `[B, 2, L]`),
        equal to `sequences_np` per row; vectorised for `jit` (no loop over words or rows)."""
        import jax.numpy as jnp  # here, not at the top: the hook runs in light workers

        b, length = hot.shape[0], self.length
        n_pre, n_suf = len(self.prefix), len(self.suffix)
        all_ids, all_masks = [], []
        for g in range(2):
            group = self._group(g)
            words = [self.word_ids[v] for v in group]
            selected = hot[:, group.start : group.stop] > 0  # [B, V]
            k = max(len(w) for w in words)
            table = jnp.asarray([list(w) + [0] * (k - len(w)) for w in words], jnp.int32)
            lengths = jnp.asarray([len(w) for w in words], jnp.int32)  # [V]
            used = jnp.where(selected, lengths, 0)  # [B, V] tokens each word contributes
            start = n_pre + jnp.cumsum(used, axis=1) - used  # [B, V] its first position
            pos = start[..., None] + jnp.arange(k)  # [B, V, K]
            keep = selected[..., None] & (jnp.arange(k) < lengths[:, None]) & (pos < length - n_suf)
            rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], pos.shape)
            ids = jnp.full((b, length), self.pad_id, jnp.int32)
            ids = ids.at[:, :n_pre].set(jnp.asarray(self.prefix, jnp.int32))
            ids = ids.at[rows, jnp.where(keep, pos, length)].set(
                jnp.broadcast_to(table, pos.shape), mode="drop"
            )
            end = jnp.minimum(n_pre + used.sum(axis=1), length - n_suf)  # [B]
            suffix_pos = end[:, None] + jnp.arange(n_suf)
            ids = ids.at[jnp.arange(b)[:, None], suffix_pos].set(
                jnp.asarray(self.suffix, jnp.int32)
            )
            all_ids.append(ids)
            all_masks.append((jnp.arange(length) < (end + n_suf)[:, None]).astype(jnp.int32))
        return jnp.stack(all_ids, 1), jnp.stack(all_masks, 1)


@dataclasses.dataclass(frozen=True)
class KeywordHook:
    """Data hook (picklable): record -> {'ap_ids' int32 [2, L], 'ap_mask' int32 [2, L],
    'ap_labels' float32 [V]} from the record's report text."""

    vocab: ApVocab
    tokens: ApTokenizer

    def __call__(self, record) -> dict[str, np.ndarray]:
        hot = extract_keywords(record.text, self.vocab)
        ids, mask = self.tokens.sequences_np(hot)
        return {"ap_ids": ids, "ap_mask": mask, "ap_labels": hot}
