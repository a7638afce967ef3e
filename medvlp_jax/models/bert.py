"""BERT and RoBERTa encoders in the Hugging Face layout (post-LN blocks).

RoBERTa differs only in its position ids (`position_style='roberta'`): positions start at
`pad_token_id + 1` and count only non-padding tokens, computed from `input_ids != pad_token_id`
exactly as HF's `create_position_ids_from_input_ids` (padding tokens get `pad_token_id`); with
`inputs_embeds` they are `pad_token_id + 1 .. pad_token_id + T`.

Outputs (dict): `tokens` [B, T, D] last hidden states, `pooled` [B, D] = the [CLS] (first)
token of `tokens`, `pooler_output` [B, D] = tanh(Linear(cls)) when the pooler exists, and
`prompt_tokens` [B, P, D] when a `prompt_fn` left prompt rows in the last layer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.layers import dense, embedding, layer_norm
from medvlp_jax.models.transformer import PromptFn, TransformerConfig, TransformerStack

POSITION_STYLES = ("absolute", "roberta")


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """HF RoBERTa positions [B, T]: pad + cumulative count of non-pad tokens (pad stays pad)."""
    keep = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(keep, axis=1) * keep + pad_token_id


class BertEncoder(nn.Module):
    """BERT / RoBERTa text encoder. Params: word_embeddings, position_embeddings,
    token_type_embeddings, embed_norm, encoder (TransformerStack, post-LN), [pooler].
    """

    transformer: TransformerConfig
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    position_style: str = "absolute"
    pooler: bool = True

    def setup(self):
        if self.position_style not in POSITION_STYLES:
            raise ValueError(
                f"position_style {self.position_style!r} is not one of {POSITION_STYLES}"
            )
        if self.transformer.norm_first:
            raise ValueError("BERT/RoBERTa blocks are post-LN: set norm_first=False")
        c = self.transformer
        kw = dict(init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype)
        self.word_embeddings = embedding(self.vocab_size, c.width, ("vocab", "embed"), **kw)
        self.position_embeddings = embedding(
            self.max_position_embeddings, c.width, ("position", "embed"), **kw
        )
        self.token_type_embeddings = embedding(self.type_vocab_size, c.width, (None, "embed"), **kw)
        self.embed_norm = layer_norm(c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        self.embed_dropout = nn.Dropout(c.dropout_rate)
        self.encoder = TransformerStack(c)
        if self.pooler:
            self.pooler_dense = dense(c.width, ("embed", "mlp"), **kw)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Word embeddings only: input_ids [B, T] -> [B, T, D]."""
        return self.word_embeddings(input_ids)

    def embed(
        self,
        input_ids: jax.Array | None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """The embedding layer: word (or `inputs_embeds` [B, T, D]) + position + token type,
        LayerNorm, dropout. input_ids [B, T] -> [B, T, D] (the encoder's input)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids [B, T] or inputs_embeds [B, T, D]")
            inputs_embeds = self.word_embeddings(input_ids)
        b, t = inputs_embeds.shape[:2]
        if t > self.max_position_embeddings - (
            self.pad_token_id + 1 if self.position_style == "roberta" else 0
        ):
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings "
                f"{self.max_position_embeddings} of this {self.position_style} encoder"
            )
        if position_ids is None:
            if self.position_style == "absolute":
                position_ids = jnp.arange(t)[None]
            elif input_ids is not None:
                position_ids = roberta_position_ids(input_ids, self.pad_token_id)
            else:
                position_ids = jnp.arange(t)[None] + self.pad_token_id + 1
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        x = (
            inputs_embeds
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.embed_dropout(self.embed_norm(x), deterministic=not train)

    def encode(
        self,
        x: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        train: bool = False,
        prompt_fn: PromptFn | None = None,
    ) -> dict[str, jax.Array]:
        """The encoder layers and pooler on embedded tokens x [B, T, D] -> outputs dict."""
        x, prompt_out = self.encoder(
            x, attention_mask, deterministic=not train, prompt_fn=prompt_fn
        )
        out = {"tokens": x, "pooled": x[:, 0]}
        if self.pooler:
            out["pooler_output"] = jnp.tanh(self.pooler_dense(x[:, 0]))
        if prompt_out is not None:
            out["prompt_tokens"] = prompt_out
        return out

    def __call__(
        self,
        input_ids: jax.Array | None,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        train: bool = False,
        prompt_fn: PromptFn | None = None,
    ) -> dict[str, jax.Array]:
        """input_ids [B, T] (or inputs_embeds [B, T, D] replacing the word embeddings),
        attention_mask [B, T] (1 = token; default all ones) -> outputs dict.
        """
        x = self.embed(
            input_ids, token_type_ids, position_ids, inputs_embeds=inputs_embeds, train=train
        )
        return self.encode(x, attention_mask, train=train, prompt_fn=prompt_fn)

    def example_inputs(self, batch: int = 1, length: int = 8) -> tuple[jax.Array, ...]:
        """Dummy positional inputs for `init`: (input_ids [batch, length], attention_mask)."""
        ids = jnp.full((batch, length), self.pad_token_id + 1, jnp.int32)
        return ids, jnp.ones((batch, length), jnp.int32)
