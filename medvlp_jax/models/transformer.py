"""Transformer layers (pre-LN and post-LN, optional cross-attention) and the layer stack.

The stack supports rematerialisation and scan-over-layers (config options) and *prompt hooks*:
a `prompt_fn(layer_index, hidden, prev_prompt_out) -> LayerPrompts | None` called before every
layer, so prompt-learning methods (deep prompts, MCPL, PTUnifier pools) can add tokens or give
a layer a different value source without forking the encoders.

Prompt semantics (unrolled stacks only; `scan=True` with a `prompt_fn` is an error):

- Prompt rows are spliced into the sequence at `prompt_position` (default 1: right after the
  first token, i.e. [CLS] / class token / the causal tower's start-of-text token). They get no
  positional embedding. The key-padding mask is extended with `LayerPrompts.mask` (default all
  ones), so prompts with mask 0 are never attended.
- A returned `LayerPrompts` *replaces* the prompt rows of the previous layer (return the
  concatenation of `prev_prompt_out` and new rows to append instead); returning None keeps the
  previous layer's prompt outputs in the sequence as ordinary tokens; `tokens` with P = 0 drops
  them.
- 'qk_v' configuration: when `LayerPrompts.values` is given, the prompt rows are ordinary
  tokens for queries, keys and the residual stream (`tokens` plays the 'qk' role), but the
  value projection of those rows reads `values`:
  `Q = [W_q qk ; W_q x]`, `K = [W_k qk ; W_k x]`, `V = [W_v v ; W_v x]` (pre-LN layers apply
  the layer's input norm to qk, v and x alike). This is MCPL's "AP tokens in query and key,
  modality prompts in value"; the prompt rows' outputs are handed to the next layer's
  `prompt_fn` as `prev_prompt_out`.
- Causal stacks (CLIP text): the prompt rows sit after the start-of-text token, so they see
  the start token and earlier prompts and every later text token sees all prompts. The
  returned `tokens` exclude the prompt rows, so end-of-text pooling indices are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.attention import MultiHeadAttention, key_padding_mask
from medvlp_jax.models.layers import Dtype, activation, constrain, dense, layer_norm


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of a transformer stack (hashable: safe as a Linen attribute).

    activation: a Hugging Face `hidden_act` name ('gelu', 'quick_gelu', 'gelu_new', 'relu').
    norm_first: pre-LN (CLIP, ViT) if True, post-LN (BERT) if False.
    remat: rematerialise each layer in the backward pass (`nn.remat`).
    scan: run the layers with `nn.scan`; params are then stacked under `layers` with a leading
      [num_layers] axis (logical name 'layers') instead of `layer_0 .. layer_{L-1}`.
    fused_qkv: compute q, k, v with one matmul (params unchanged).
    dtype / param_dtype: compute and parameter dtypes (e.g. bfloat16 compute, float32 params).
    """

    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    norm_first: bool = True
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    qkv_bias: bool = True
    init_std: float = 0.02
    remat: bool = False
    scan: bool = False
    fused_qkv: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        activation(self.activation)  # fail early on an unknown name
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")


def post_ln_config(
    width: int,
    num_layers: int,
    num_heads: int,
    mlp_dim: int,
    *,
    dropout_rate: float = 0.1,
    attention_dropout_rate: float = 0.1,
    layer_norm_eps: float = 1e-12,
    dtype: Dtype = jnp.float32,
) -> TransformerConfig:
    """A BERT-style (post-LN, exact GELU) stack built from scratch: fusion layers, decoders."""
    return TransformerConfig(
        width=width,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        norm_first=False,
        activation="gelu",
        layer_norm_eps=layer_norm_eps,
        dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate,
        dtype=dtype,
    )


@dataclasses.dataclass(frozen=True)
class LayerPrompts:
    """Prompt rows for one layer (see the module docstring).

    tokens: [B, P, D] rows spliced into the sequence (the 'qk' rows when `values` is given).
    values: [B, P, D] optional value-projection source for the prompt rows.
    mask: [B, P] optional, 1 = attend (default all ones).
    """

    tokens: jax.Array
    values: jax.Array | None = None
    mask: jax.Array | None = None


PromptFn = Callable[[int, jax.Array, "jax.Array | None"], "LayerPrompts | None"]


class Mlp(nn.Module):
    """fc1 (D -> mlp_dim) -> activation -> fc2 (mlp_dim -> D)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        kw = dict(init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype)
        h = dense(c.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(x)
        h = activation(c.activation)(h)
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class TransformerLayer(nn.Module):
    """Self-attention (+ optional cross-attention) + MLP, pre-LN or post-LN.

    Pre-LN:  x += SA(LN(x)); [x += CA(LN(x), ctx)]; x += MLP(LN(x)).
    Post-LN: x = LN(x + SA(x)); [x = LN(x + CA(x, ctx))]; x = LN(x + MLP(x)).
    Params: attn, attn_norm, [cross_attn, cross_norm], mlp (fc1, fc2), mlp_norm.
    """

    cfg: TransformerConfig
    cross_attention: bool = False
    causal: bool = False

    def setup(self):
        c = self.cfg
        norm = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        attn = dict(
            num_heads=c.num_heads,
            use_bias=c.qkv_bias,
            dropout_rate=c.attention_dropout_rate,
            init_std=c.init_std,
            fused_qkv=c.fused_qkv,
            **norm,
        )
        self.attn = MultiHeadAttention(**attn)
        self.attn_norm = layer_norm(c.layer_norm_eps, **norm)
        if self.cross_attention:
            self.cross_attn = MultiHeadAttention(**attn)
            self.cross_norm = layer_norm(c.layer_norm_eps, **norm)
        self.mlp = Mlp(c)
        self.mlp_norm = layer_norm(c.layer_norm_eps, **norm)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        values: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """x [B, T, D] -> [B, T, D].

        mask: bool [B, 1, 1, T] key padding (True = attend) or None.
        values: [B, T, D] value source for self-attention (default x).
        context / context_mask: [B, S, E] / bool [B, 1, 1, S] for cross-attention.
        """
        if self.cross_attention and context is None:
            raise ValueError("this layer has cross-attention: pass context [B, S, E]")
        drop = lambda y: self.dropout(y, deterministic=deterministic)
        attn_kw = dict(causal=self.causal, deterministic=deterministic)
        if self.cfg.norm_first:
            v = None if values is None else self.attn_norm(values)
            x = x + drop(self.attn(self.attn_norm(x), values=v, mask=mask, **attn_kw))
            if self.cross_attention:
                h = self.cross_norm(x)
                x = x + drop(
                    self.cross_attn(h, context, mask=context_mask, deterministic=deterministic)
                )
            return x + drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + drop(self.attn(x, values=values, mask=mask, **attn_kw)))
        if self.cross_attention:
            y = self.cross_attn(x, context, mask=context_mask, deterministic=deterministic)
            x = self.cross_norm(x + drop(y))
        return self.mlp_norm(x + drop(self.mlp(x)))


class _ScannedLayer(TransformerLayer):
    """`TransformerLayer` in the (carry, xs) -> (carry, ys) form `nn.scan` needs."""

    deterministic: bool = True

    def __call__(self, x, mask, context, context_mask):  # type: ignore[override]
        y = super().__call__(x, mask, None, context, context_mask, self.deterministic)
        return constrain(y, "batch", "length", "embed"), None


def _splice(x: jax.Array, rows: jax.Array, position: int) -> jax.Array:
    """Inserts rows [B, P, ...] into x [B, N, ...] before index `position` -> [B, N + P, ...]."""
    return jnp.concatenate([x[:, :position], rows, x[:, position:]], axis=1)


def _remove(x: jax.Array, position: int, count: int) -> jax.Array:
    """Drops rows position .. position + count - 1 of x [B, N + P, ...] -> [B, N, ...]."""
    return jnp.concatenate([x[:, :position], x[:, position + count :]], axis=1)


class TransformerStack(nn.Module):
    """`cfg.num_layers` transformer layers with optional remat, scan and prompt hooks.

    Params: `layer_0 .. layer_{L-1}` (unrolled) or `layers` (scanned, stacked on axis 0).
    """

    cfg: TransformerConfig
    cross_attention: bool = False
    causal: bool = False
    prompt_position: int = 1

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        deterministic: bool = True,
        prompt_fn: PromptFn | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, N, D] -> (tokens [B, N, D], prompt outputs [B, P, D] of the last layer or None).

        mask: [B, N] key padding (1 = attend) or None. context / context_mask: [B, S, E] /
        [B, S] for cross-attention layers. prompt_fn: see the module docstring.
        """
        c = self.cfg
        x = constrain(x, "batch", "length", "embed")
        ctx_mask = key_padding_mask(context_mask)
        if c.scan:
            if prompt_fn is not None:
                raise ValueError("prompt_fn needs an unrolled stack: set scan=False")
            return self._scanned(x, key_padding_mask(mask), context, ctx_mask, deterministic), None

        layer_cls = nn.remat(TransformerLayer, static_argnums=(6,)) if c.remat else TransformerLayer
        pos = self.prompt_position
        seq, seq_mask, num_prompts = x, mask, 0
        for i in range(c.num_layers):
            values = None
            if prompt_fn is not None:
                main = _remove(seq, pos, num_prompts)
                prev = seq[:, pos : pos + num_prompts] if num_prompts else None
                prompts = prompt_fn(i, main, prev)
                if prompts is not None:
                    seq, seq_mask, values = self._with_prompts(main, mask, prompts)
                    num_prompts = prompts.tokens.shape[1]
            layer = layer_cls(c, self.cross_attention, self.causal, name=f"layer_{i}")
            seq = layer(seq, key_padding_mask(seq_mask), values, context, ctx_mask, deterministic)
            seq = constrain(seq, "batch", "length", "embed")
        if not num_prompts:
            return seq, None
        return _remove(seq, pos, num_prompts), seq[:, pos : pos + num_prompts]

    def _with_prompts(self, main: jax.Array, mask: jax.Array | None, prompts: LayerPrompts):
        """(sequence, key mask, value source) with `prompts` spliced into main [B, N, D]."""
        pos = self.prompt_position
        tokens = prompts.tokens.astype(main.dtype)
        seq = _splice(main, tokens, pos)
        seq_mask = None
        if mask is not None or prompts.mask is not None:
            b, n, p = main.shape[0], main.shape[1], tokens.shape[1]
            main_mask = jnp.ones((b, n), bool) if mask is None else mask.astype(bool)
            prompt_mask = jnp.ones((b, p), bool) if prompts.mask is None else prompts.mask
            seq_mask = _splice(main_mask, prompt_mask.astype(bool), pos)
        values = None
        if prompts.values is not None:
            if prompts.values.shape != prompts.tokens.shape:
                raise ValueError(
                    f"LayerPrompts.values {prompts.values.shape} must match tokens "
                    f"{prompts.tokens.shape}"
                )
            values = _splice(main, prompts.values.astype(main.dtype), pos)
        return seq, seq_mask, values

    def _scanned(self, x, mask, context, context_mask, deterministic) -> jax.Array:
        c = self.cfg
        body = nn.remat(_ScannedLayer) if c.remat else _ScannedLayer
        scanned = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(c, self.cross_attention, self.causal, deterministic, name="layers")(
            x, mask, context, context_mask
        )
        return x
