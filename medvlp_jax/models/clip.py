"""A CLIP-style two-tower model: a CLIP-layout ViT, a causal text tower and a logit scale."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.clip_text import CLIPTextEncoder
from medvlp_jax.models.layers import partitioned
from medvlp_jax.models.vit import VisionTransformer


class CLIPModel(nn.Module):
    """Params: vision (VisionTransformer), text (CLIPTextEncoder), logit_scale [] (log space).

    Each tower is also usable alone: `model.vision.apply({'params': params['vision']}, ...)`.
    """

    vision: VisionTransformer
    text: CLIPTextEncoder
    logit_scale_init: float = math.log(1 / 0.07)

    def setup(self):
        self.logit_scale = self.param(
            "logit_scale",
            partitioned(nn.initializers.constant(self.logit_scale_init)),
            (),
            jnp.float32,
        )

    def encode_image(self, images: jax.Array, *, train: bool = False, **kw) -> dict:
        """images [B, H, W, C] -> the vision tower's outputs."""
        return self.vision(images, train=train, **kw)

    def encode_text(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, train=False, **kw
    ) -> dict:
        """input_ids / attention_mask [B, T] -> the text tower's outputs."""
        return self.text(input_ids, attention_mask, train=train, **kw)

    def __call__(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> dict:
        """-> {'image': vision outputs, 'text': text outputs, 'logit_scale': exp(scale)}."""
        return {
            "image": self.encode_image(images, train=train),
            "text": self.encode_text(input_ids, attention_mask, train=train),
            "logit_scale": jnp.exp(self.logit_scale),
        }

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, ...]:
        """Dummy positional inputs for `init`: (images, input_ids, attention_mask)."""
        return self.vision.example_inputs(batch) + self.text.example_inputs(batch)
