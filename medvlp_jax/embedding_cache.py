"""A frozen text tower's sentence embeddings, computed once per dataset and reused.

A frozen language model without dropout maps a report to the same embedding in every epoch
and every run, so a method can embed its training texts once (sharded over the mesh, batched)
and feed the stored vectors to its train step instead of running the tower each step.

Cache entries live in `<root>/text_emb-<key>/`:
  `embeddings.npy` float32 [N, D]: row i embeds the text whose digest is `digests[i]`;
  `digests.npy` `S32` [N]: sorted `text_digest` of the N unique texts;
  `meta.json`: what the key was made of (for people; the key is the folder name).
The key is a sha256 over the tower's config, its weights, the tokenizer, `max_len` and the
texts, so a change to any of them gives a new entry (the old one is left for other runs).
Entries are written to a temporary folder and renamed into place, so concurrent writers
(processes sharing a file system) never expose a half-written entry.

`TextEmbeddingLookup` is the data hook (picklable, memory-maps the entry lazily) that adds
the cached embedding of `record.text` to each example.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from medvlp_jax import console
from medvlp_jax.data.tokenize import tokenize
from medvlp_jax.parallel import mesh as mesh_lib

FORMAT_VERSION = 1
PREFIX = "text_emb-"


def text_digest(texts: Sequence[str]) -> np.ndarray:
    """`S32` [N]: the first 32 hex digits of each text's sha1 (the lookup key of a text)."""
    return np.array(
        [hashlib.sha1(t.encode()).hexdigest()[:32].encode() for t in texts], dtype="S32"
    )


def params_fingerprint(params) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (host copy), in path order."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        value = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides a tokenizer's output: its class, its full definition
    (vocabulary, normaliser, pre-tokeniser, post-processor, added tokens) and its padding and
    truncation sides."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Padding/truncation are per-call settings that tokenizing leaves behind (our calls
        # set them from max_len, which is keyed separately), not part of the tokenizer.
        spec.pop("padding", None)
        spec.pop("truncation", None)
        definition = json.dumps(spec, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
        definition += repr(sorted(tokenizer.special_tokens_map.items()))
    sides = f"{getattr(tokenizer, 'padding_side', '')}|{getattr(tokenizer, 'truncation_side', '')}"
    text = f"{type(tokenizer).__qualname__}|{sides}|{definition}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(
    *, tower_config: dict, params, tokenizer, max_len: int, texts: Sequence[str]
) -> tuple[str, dict]:
    """The entry key (sha256 hex) and the fingerprints it was made of.

    Args:
      tower_config: the tower's architecture fields (JSON-able; dtype included).
      params: the tower's parameters.
      tokenizer: the Hugging Face tokenizer the texts go through.
      max_len: T, the padded token length.
      texts: the texts to embed (order and repeats do not matter).
    """
    parts = {
        "format": FORMAT_VERSION,
        "tower": hashlib.sha256(json.dumps(tower_config, sort_keys=True).encode()).hexdigest(),
        "weights": params_fingerprint(params),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_len": int(max_len),
        "texts": hashlib.sha256(b"".join(np.unique(text_digest(texts)))).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return key, parts


def embed_texts_sharded(
    embed_fn: Callable,
    variables,
    tokenizer,
    texts: Sequence[str],
    *,
    max_len: int,
    mesh: jax.sharding.Mesh,
    batch_size: int,
) -> np.ndarray:
    """Embeds `texts` with `embed_fn`, the batch split over the mesh's batch axes.

    Args:
      embed_fn: jitted `(variables, input_ids [B, T], attention_mask [B, T]) -> [B, D]`.
      variables: its (sharded or host) variables.
      texts: N strings; every process passes the same list.
      batch_size: global batch per call (rounded up to a multiple of the batch shards); the
        last batch is padded by repeating a text.
    Returns:
      float32 [N, D] on every process, in `texts` order.
    """
    shards = mesh_lib.batch_shards(mesh)
    batch_size = -(-batch_size // shards) * shards
    sharding = mesh_lib.batch_sharding(mesh, 2)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        chunk += [chunk[-1]] * (batch_size - len(chunk))
        ids, mask = tokenize(tokenizer, chunk, max_len)
        # Each device takes its own rows of the host arrays (every process has them all).
        ids, mask = (
            jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
            for a in (ids, mask)
        )
        emb = embed_fn(variables, ids, mask)
        out.append(np.asarray(multihost_utils.process_allgather(emb, tiled=True), np.float32))
    return np.concatenate(out)[: len(texts)]


def _write_entry(folder: Path, embeddings: np.ndarray, digests: np.ndarray, meta: dict) -> None:
    """Writes an entry into a temporary sibling, then renames it to `folder` (atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        np.save(tmp / "embeddings.npy", embeddings)
        np.save(tmp / "digests.npy", digests)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
        # Another process put the same entry in place first; theirs is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_or_load(
    root: Path,
    key: str,
    texts: Sequence[str],
    compute: Callable[[list[str]], np.ndarray],
    meta: dict | None = None,
) -> tuple[Path, bool]:
    """The entry folder for `key` under `root`, computing it if missing.

    Args:
      compute: `unique_texts -> float32 [N, D]`, called only on a miss (on every process
        when any one of them misses).
      meta: extra JSON-able facts to store in `meta.json`.
    Returns:
      (folder, hit): hit is True when the entry already existed.
    """
    folder = Path(root) / f"{PREFIX}{key}"
    present = (folder / "meta.json").is_file()
    if jax.process_count() > 1:
        # Computing is collective: every process computes unless all of them hold the entry
        # (file systems need not be shared).
        present = bool(np.all(multihost_utils.process_allgather(np.array(present))))
    if present:
        console.say(f"text embedding cache hit: {folder}")
        return folder, True
    unique = sorted(set(texts))
    digests = text_digest(unique)
    order = np.argsort(digests, kind="stable")
    embeddings = np.asarray(compute(unique), np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(unique):
        raise ValueError(f"compute returned {embeddings.shape}, expected [{len(unique)}, D]")
    info = {**(meta or {}), "key": key, "num_texts": len(unique), "dim": embeddings.shape[1]}
    _write_entry(folder, embeddings[order], digests[order], info)
    console.say(f"text embedding cache miss: embedded {len(unique)} texts into {folder}")
    return folder, False


class TextEmbeddingLookup:
    """Data hook: `record -> {field: float32 [D]}`, the cached embedding of `record.text`.

    Texts outside the entry (evaluation reports, class prompts) get zeros: methods read the
    field only in the train step, whose texts are exactly the entry's. Picklable: workers
    receive the folder and memory-map the arrays on first use.
    """

    def __init__(self, folder: Path | str, field: str = "text_cls"):
        self.folder = str(folder)
        self.field = field
        meta = json.loads((Path(folder) / "meta.json").read_text())
        self.dim = int(meta["dim"])
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "field": self.field, "dim": self.dim, "_arrays": None}

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            folder = Path(self.folder)
            self._arrays = (
                np.load(folder / "digests.npy"),
                np.load(folder / "embeddings.npy", mmap_mode="r"),
            )
        return self._arrays

    def lookup(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings float32 [N, D] with zero rows where missing, found bool [N])."""
        digests, embeddings = self._load()
        wanted = text_digest(texts)
        rows = np.minimum(np.searchsorted(digests, wanted), len(digests) - 1)
        found = digests[rows] == wanted
        out = np.where(found[:, None], embeddings[rows], 0.0).astype(np.float32)
        return out, found

    def __call__(self, record) -> dict[str, np.ndarray]:
        return {self.field: self.lookup([record.text])[0][0]}
