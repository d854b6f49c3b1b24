"""Vision Transformers (Dosovitskiy et al. 2021) as torchvision and timm build them.

Both libraries build the same network: a patch-embedding convolution, a
class token, learned position embeddings (the class token has one too),
pre-norm encoder blocks (LayerNorm -> multi-head self-attention -> residual,
LayerNorm -> MLP with exact GELU -> residual), a final LayerNorm and a
linear head on the class token. Both use LayerNorm epsilon 1e-6.

Parameter paths (what freezing rules and weight converters refer to):

    stem/patch_embed, stem/class_token, stem/position_embedding
    stage{i}/block{j}/norm1, stage{i}/block{j}/attention/qkv,
    stage{i}/block{j}/attention/out, stage{i}/block{j}/norm2,
    stage{i}/block{j}/mlp/fc1, stage{i}/block{j}/mlp/fc2
    stage{last}/norm        the final LayerNorm, after the last block
    head

The encoder's `depth` blocks are grouped into `num_stages` stages of
`depth / num_stages` consecutive blocks (4 stages of 3 blocks for ViT-B, of 6
for ViT-L), so `depth:K`, `surgical:stage2` and the prefix cache work as on a
ResNet; each block is addressable on its own (`surgical:stage2/block1`) and
`lld:` decays the rate per block (see `stage_names.blocks`). The final
LayerNorm sits inside the last stage: a model truncated earlier
(`last_stage="stage2"`) pools un-normalised tokens, and `depth:<num_stages>`
freezes it with everything else but the head.

A stage's output (its sown feature, the prefix cache's content) is the token
sequence `(batch, 1 + patches, hidden)` with the class token first. The head
sees the class token (`pooling="token"`, what both libraries train) or the
mean of the patch tokens (`pooling="mean"`, the class token left out).

Position embeddings are stored for an `image_size` input. Weights trained at
another size are resampled when they are loaded
(`tlflax.weights.load(..., image_size=384)`); an input of yet another size is
resampled on the fly (`resample_position_embedding`), as timm's
`dynamic_img_size` does.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.base import check_stages, classifier_head, runs_stage

POOLINGS = ("token", "mean")
INTERPOLATIONS = {"bicubic": "cubic", "bilinear": "linear"}


class StageNames(tuple):
  """A ViT's stage names, carrying its blocks (`stageI/blockJ`) input side first.

  A plain tuple to everything that reads stage names; `tlflax.freeze` reads
  `blocks` to decay learning rates per block (`lld:`) and to train one block
  (`surgical:stage2/block1`).
  """
  blocks: tuple[str, ...]

  def __new__(cls, names, blocks):
    self = super().__new__(cls, names)
    self.blocks = tuple(blocks)
    return self


def resample_position_embedding(embedding, grid: tuple[int, int],
                                interpolation: str = "bicubic", prefix_tokens: int = 1):
  """Position embeddings of a square patch grid resized to another grid.

  The class token's embedding is kept as it is; the patch embeddings are
  resized as an image with antialiasing, as timm's `resample_abs_pos_embed`
  does by default (bicubic; big_vision resizes bilinearly).

  Args:
    embedding: (1, prefix_tokens + old_h * old_w, hidden), old grid square.
    grid: the new (height, width) in patches.
    interpolation: "bicubic" or "bilinear".
    prefix_tokens: embeddings at the front that are no grid cell (the class token).

  Returns:
    (1, prefix_tokens + height * width, hidden), in the input's dtype.

  Raises:
    ValueError: an unknown interpolation, or embeddings of no square grid.

  Examples:
    >>> resample_position_embedding(np.zeros((1, 197, 768)), (24, 24)).shape
    (1, 577, 768)
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"Unknown interpolation {interpolation!r}; use one of "
                     f"{sorted(INTERPOLATIONS)}.")
  count, hidden = embedding.shape[1] - prefix_tokens, embedding.shape[2]
  side = int(round(count ** 0.5))
  if side * side != count:
    raise ValueError(f"{count} position embeddings after the class token form no square "
                     "grid; pass embeddings of a square image.")
  if (side, side) == tuple(grid):
    return embedding
  prefix, cells = embedding[:, :prefix_tokens], embedding[:, prefix_tokens:]
  cells = jnp.reshape(cells, (1, side, side, hidden))
  cells = jax.image.resize(cells, (1, grid[0], grid[1], hidden),
                           method=INTERPOLATIONS[interpolation], antialias=True)
  cells = jnp.reshape(cells, (1, grid[0] * grid[1], hidden)).astype(embedding.dtype)
  return jnp.concatenate([jnp.asarray(prefix, cells.dtype), cells], axis=1)


class Attention(nn.Module):
  """Multi-head self-attention with one fused q/k/v projection (`qkv`) and `out`."""
  num_heads: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool = False):
    batch, tokens, hidden = x.shape
    head_dim = hidden // self.num_heads
    qkv = nn.Dense(3 * hidden, dtype=self.dtype, name="qkv")(x)
    # (batch, tokens, 3, heads, head_dim): q, k, v in that order, heads in
    # order, as torchvision's in_proj and timm's qkv lay them out.
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(
        jnp.asarray(head_dim, self.dtype))
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
                             axis=-1).astype(self.dtype)
    if self.dropout_rate:
      weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, tokens, hidden)
    return nn.Dense(hidden, dtype=self.dtype, name="out")(y)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attention(norm1(x)), then x + mlp(norm2(x))."""
  num_heads: int
  mlp_dim: int
  epsilon: float
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.LayerNorm, epsilon=self.epsilon, dtype=self.dtype)
    dropout = functools.partial(nn.Dropout, self.dropout_rate, deterministic=not train)
    y = norm(name="norm1")(x)
    y = Attention(self.num_heads, self.attention_dropout_rate, self.dtype,
                  name="attention")(y, train)
    x = x + (dropout()(y) if self.dropout_rate else y)
    y = norm(name="norm2")(x)
    y = MLP(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(y, train)
    return x + (dropout()(y) if self.dropout_rate else y)


class MLP(nn.Module):
  """fc1 -> exact GELU -> [dropout] -> fc2."""
  mlp_dim: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = x.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x), approximate=False)
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(hidden, dtype=self.dtype, name="fc2")(x)


class PatchEmbedding(nn.Module):
  """A p x p convolution with stride p, computed as one matmul over the patches.

  The parameters are a convolution's (`kernel` (p, p, in, out), `bias`); the
  patches do not overlap, so cutting them out and multiplying is the same
  sum, without XLA's convolution (whose CPU path for the few output pixels of
  a small image is slow) or an im2col of p * p shifted copies.
  """
  features: int
  patch_size: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    batch, height, width, channels = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    patches = x.reshape(batch, height // p, p, width // p, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(
        batch, height // p, width // p, p * p * channels)
    y = jnp.dot(patches, kernel.astype(self.dtype).reshape(p * p * channels, self.features))
    return y + bias.astype(self.dtype)


class Stem(nn.Module):
  """Patches -> tokens: patch convolution, class token in front, position embeddings."""
  patch_size: int
  hidden_size: int
  image_size: int
  interpolation: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"Image of {x.shape[1]}x{x.shape[2]} px is no whole number of "
                       f"{p}x{p} patches; resize it to a multiple of {p}.")
    x = PatchEmbedding(self.hidden_size, p, self.dtype, name="patch_embed")(x)
    batch, grid_h, grid_w, hidden = x.shape
    x = x.reshape(batch, grid_h * grid_w, hidden)
    class_token = self.param("class_token", nn.initializers.zeros, (1, 1, hidden))
    side = self.image_size // p
    shape = (1, 1 + side * side, hidden)
    if self.has_variable("params", "position_embedding"):
      # Given embeddings keep their own grid (e.g. a checkpoint trained at
      # another size than this module's `image_size`): they are resampled below.
      shape = self.get_variable("params", "position_embedding").shape
    embedding = self.param("position_embedding", nn.initializers.normal(stddev=0.02), shape)
    # An input of another size than `image_size` gets resampled embeddings
    # (timm's dynamic_img_size); the stored ones keep their grid.
    embedding = resample_position_embedding(embedding, (grid_h, grid_w), self.interpolation)
    class_token = jnp.broadcast_to(class_token.astype(self.dtype), (batch, 1, hidden))
    return jnp.concatenate([class_token, x], axis=1) + embedding.astype(self.dtype)


class VisionTransformer(nn.Module):
  """ViT backbone with named stages (a `base.Backbone`).

  Attributes:
    patch_size: side of a square patch in pixels.
    hidden_size: token width.
    depth: number of encoder blocks.
    num_heads: attention heads (hidden_size must divide by it).
    mlp_dim: hidden width of each block's MLP.
    image_size: the input side the position embeddings are stored for
      (224, or 384 / 512 for SWAG's end-to-end weights); another input size
      is resampled on the fly (see the module docstring).
    num_stages: how many stages the blocks are grouped into (depth must
      divide by it).
    pooling: "token" (the class token, as trained) or "mean" (mean of the
      patch tokens) feeds the head and `pre_logits`.
    num_classes: size of the `head` layer; `None` builds no head.
    last_stage, input_stage: truncation and prefix input (see `base.Backbone`);
      `input_stage` inputs are token sequences (batch, 1 + patches, hidden).
    dtype: computation dtype (parameters stay float32).
    frozen_batchnorm: part of the contract; a ViT has no BatchNorm, so it
      changes nothing (LayerNorm keeps no running statistics).
    head_init: "lecun" or "zeros" for a new head.
    layer_norm_epsilon: 1e-6 in torchvision and timm.
    dropout_rate, attention_dropout_rate: dropout in training (0 for every
      published model here; set for fine-tuning with dropout).
    interpolation: how position embeddings are resampled for other input
      sizes: "bicubic" (timm's default) or "bilinear" (big_vision's).

  Examples:
    >>> model = vit_b_16(num_classes=10, image_size=32)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  """
  patch_size: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_dim: int
  image_size: int = 224
  num_stages: int = 4
  pooling: str = "token"
  num_classes: Optional[int] = 1000
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  dtype: Any = jnp.float32
  frozen_batchnorm: tuple[str, ...] = ()
  head_init: str = "lecun"
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  interpolation: str = "bicubic"

  @property
  def blocks_per_stage(self) -> int:
    if self.num_stages < 1 or self.depth % self.num_stages:
      raise ValueError(f"num_stages={self.num_stages} does not divide the {self.depth} "
                       f"blocks; use a divisor of {self.depth}.")
    return self.depth // self.num_stages

  @property
  def stage_names(self) -> StageNames:
    """("stem", "stage1", ..., "stage<num_stages>"), with `.blocks` listing every block."""
    stages = tuple(f"stage{i + 1}" for i in range(self.num_stages))
    blocks = [f"{stage}/block{j + 1}" for stage in stages
              for j in range(self.blocks_per_stage)]
    return StageNames(("stem",) + stages, blocks)

  def _check_fields(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r}: use one of {', '.join(POOLINGS)}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} does not divide into "
                       f"{self.num_heads} heads.")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is no multiple of the patch size "
                       f"{self.patch_size}.")

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_stages(self)
    self._check_fields()
    x = x.astype(self.dtype)
    if runs_stage(self, "stem"):
      x = Stem(self.patch_size, self.hidden_size, self.image_size, self.interpolation,
               self.dtype, name="stem")(x)
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      layers.sow_feature(self, "stem", x)
    elif x.ndim != 3:
      raise ValueError(f"With input_stage={self.input_stage!r} the input is a token "
                       f"sequence (batch, tokens, {self.hidden_size}), not shape {x.shape}.")
    if self.last_stage != "stem":
      for i in range(self.num_stages):
        name = f"stage{i + 1}"
        if not runs_stage(self, name):
          continue
        x = EncoderStage(
            num_blocks=self.blocks_per_stage, final_norm=i == self.num_stages - 1,
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, epsilon=self.layer_norm_epsilon,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
            name=name)(x, train)
        layers.sow_feature(self, name, x)
        if name == self.last_stage:
          break
    pooled = x[:, 0] if self.pooling == "token" else jnp.mean(x[:, 1:], axis=1)
    return classifier_head(self, pooled)


class EncoderStage(nn.Module):
  """`num_blocks` encoder blocks (block1...), and the final LayerNorm in the last stage."""
  num_blocks: int
  final_norm: bool
  num_heads: int
  mlp_dim: int
  epsilon: float
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool = False):
    for j in range(self.num_blocks):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.epsilon, self.dropout_rate,
                       self.attention_dropout_rate, self.dtype, name=f"block{j + 1}")(x, train)
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, name="norm")(x)
    return x


_BASE = dict(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072)
_LARGE = dict(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096)

# torchvision
vit_b_16 = functools.partial(VisionTransformer, patch_size=16, **_BASE)
vit_b_32 = functools.partial(VisionTransformer, patch_size=32, **_BASE)
vit_l_16 = functools.partial(VisionTransformer, patch_size=16, **_LARGE)
# timm (the same architecture; the names say which library's weights fit)
vit_tiny_patch16_224 = functools.partial(VisionTransformer, patch_size=16, hidden_size=192,
                                         depth=12, num_heads=3, mlp_dim=768)
vit_small_patch16_224 = functools.partial(VisionTransformer, patch_size=16, hidden_size=384,
                                          depth=12, num_heads=6, mlp_dim=1536)
vit_base_patch16_224 = functools.partial(VisionTransformer, patch_size=16, **_BASE)
vit_large_patch16_224 = functools.partial(VisionTransformer, patch_size=16, **_LARGE)

MODELS = {
    "vit_b_16": vit_b_16,
    "vit_b_32": vit_b_32,
    "vit_l_16": vit_l_16,
    "vit_tiny_patch16_224": vit_tiny_patch16_224,
    "vit_small_patch16_224": vit_small_patch16_224,
    "vit_base_patch16_224": vit_base_patch16_224,
    "vit_large_patch16_224": vit_large_patch16_224,
}
