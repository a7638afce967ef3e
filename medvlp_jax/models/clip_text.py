"""CLIP's causal text transformer with end-of-text pooling (Hugging Face CLIPTextModel).

End-of-text position, as HF's CLIPTextModel: with `eos_token_id == 2` (configs written before
transformers PR #24773) the argmax of the token ids (the EOT token has the largest id in
CLIP's vocabulary); otherwise the first position whose id equals `eos_token_id`.

Outputs (dict): `tokens` [B, T, D] = ln_final(last hidden states) (HF's last_hidden_state),
`pooler_output` [B, D] = tokens at the EOT position, `pooled` [B, E] = pooler_output @ proj
(or pooler_output without a projection), `prompt_tokens` [B, P, D] when a `prompt_fn` left
prompt rows in the last layer (they sit after the start-of-text token and are excluded from
`tokens`, so the EOT index does not shift; see `transformer.py`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.layers import dense, embedding, layer_norm, partitioned
from medvlp_jax.models.transformer import PromptFn, TransformerConfig, TransformerStack

LEGACY_EOS_TOKEN_ID = 2


def eot_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B, T] token ids -> [B] end-of-text positions, as HF's CLIPTextModel picks them."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextEncoder(nn.Module):
    """Params: token_embedding, posemb [max_len, D], encoder (causal pre-LN stack),
    final_norm, [proj [D, E]].
    """

    transformer: TransformerConfig
    vocab_size: int = 49408
    max_len: int = 77
    proj_dim: int | None = 512
    eos_token_id: int = 49407
    pad_token_id: int = 1
    bos_token_id: int = 49406

    def setup(self):
        c = self.transformer
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.token_embedding = embedding(
            self.vocab_size, c.width, ("vocab", "embed"), init_std=c.init_std, **kw
        )
        self.posemb = self.param(
            "posemb",
            partitioned(nn.initializers.normal(0.01), "position", "embed"),
            (self.max_len, c.width),
            c.param_dtype,
        )
        self.encoder = TransformerStack(c, causal=True)
        self.final_norm = layer_norm(c.layer_norm_eps, **kw)
        if self.proj_dim:
            self.proj = dense(
                self.proj_dim, ("embed", "proj"), use_bias=False, init_std=c.width**-0.5, **kw
            )

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings only: input_ids [B, T] -> [B, T, D]."""
        return self.token_embedding(input_ids)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        train: bool = False,
        prompt_fn: PromptFn | None = None,
    ) -> dict[str, jax.Array]:
        """input_ids [B, T] (used for EOT pooling even when inputs_embeds [B, T, D] replaces
        the token embeddings), attention_mask [B, T] (1 = token) -> outputs dict.
        """
        t = input_ids.shape[1]
        if t > self.max_len:
            raise ValueError(
                f"sequence length {t} exceeds this CLIP text tower's max_len {self.max_len}"
            )
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        posemb = self.posemb[:t] if position_ids is None else self.posemb[position_ids]
        x = inputs_embeds + posemb.astype(inputs_embeds.dtype)
        x, prompt_out = self.encoder(
            x, attention_mask, deterministic=not train, prompt_fn=prompt_fn
        )
        x = self.final_norm(x)
        eot = x[jnp.arange(x.shape[0]), eot_positions(input_ids, self.eos_token_id)]
        out = {
            "tokens": x,
            "pooler_output": eot,
            "pooled": self.proj(eot) if self.proj_dim else eot,
        }
        if prompt_out is not None:
            out["prompt_tokens"] = prompt_out
        return out

    def example_inputs(self, batch: int = 1, length: int | None = None) -> tuple[jax.Array, ...]:
        """Dummy positional inputs for `init`: (input_ids [batch, length], attention_mask)."""
        length = length or self.max_len
        return jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32)
