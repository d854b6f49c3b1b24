"""Vision Transformer weights from torchvision and timm, and their published files.

torchvision and timm build the same network under different names; each
source has one table below from its tensor names to our module paths
(`tlflax/models/vit.py` lists ours). Both take any of our ViTs: the
torchvision names (`vit_b_16`) and the timm names (`vit_base_patch16_224`)
are the same architectures, named as each library names them.

What each kind of tensor becomes:

* CONV: `weight` (out, in, h, w) -> `kernel` (h, w, in, out); `bias` stays;
* DENSE: `weight` (out, in) -> `kernel` (in, out). torchvision's
  `in_proj_weight` and timm's `qkv.weight` both stack q, k, v along `out`,
  which is our fused `attention/qkv`;
* NORM: LayerNorm `weight` -> `scale`, `bias` stays;
* TENSOR: a bare parameter (class token, position embeddings), copied.

Position embeddings are stored for one image size. `fit_weights`, which
`tlflax.weights.load` calls after converting, reads the size the file was
trained at from them, or resamples them to the `image_size` the caller asks
for (bicubic, the class token's embedding kept; see
`tlflax.models.vit.resample_position_embedding`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from tlflax.data.images import Preprocessing
from tlflax.models import get_model
from tlflax.models.vit import resample_position_embedding
from tlflax.weights.entry import FileHash, PretrainedWeights
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import read_torch_file

CONV, DENSE, NORM, TENSOR = "conv", "dense", "norm", "tensor"

# `{block}` is filled with our `stageI/blockJ` for the encoder block the
# source numbers `block` (from 0 across the whole encoder); `{last}` is the
# last stage, which holds the final LayerNorm.
_TV_LAYER = r"encoder\.layers\.encoder_layer_(?P<block>\d+)\."
TORCHVISION_NAMES = (
    (r"conv_proj", "stem/patch_embed", CONV),
    (r"class_token", "stem/class_token", TENSOR),
    (r"encoder\.pos_embedding", "stem/position_embedding", TENSOR),
    (_TV_LAYER + r"ln_1", "{block}/norm1", NORM),
    (_TV_LAYER + r"self_attention\.in_proj", "{block}/attention/qkv", DENSE),
    (_TV_LAYER + r"self_attention\.out_proj", "{block}/attention/out", DENSE),
    (_TV_LAYER + r"ln_2", "{block}/norm2", NORM),
    # torchvision's MLPBlock is a Sequential (Linear, GELU, Dropout, Linear,
    # Dropout); files saved before torchvision 0.13 call its layers linear_1/2.
    (_TV_LAYER + r"mlp\.(0|linear_1)", "{block}/mlp/fc1", DENSE),
    (_TV_LAYER + r"mlp\.(3|linear_2)", "{block}/mlp/fc2", DENSE),
    (r"encoder\.ln", "{last}/norm", NORM),
    (r"heads\.head", "head", DENSE),
)

_TIMM_BLOCK = r"blocks\.(?P<block>\d+)\."
TIMM_NAMES = (
    (r"patch_embed\.proj", "stem/patch_embed", CONV),
    (r"cls_token", "stem/class_token", TENSOR),
    (r"pos_embed", "stem/position_embedding", TENSOR),
    (_TIMM_BLOCK + r"norm1", "{block}/norm1", NORM),
    (_TIMM_BLOCK + r"attn\.qkv", "{block}/attention/qkv", DENSE),
    (_TIMM_BLOCK + r"attn\.proj", "{block}/attention/out", DENSE),
    (_TIMM_BLOCK + r"norm2", "{block}/norm2", NORM),
    (_TIMM_BLOCK + r"mlp\.fc1", "{block}/mlp/fc1", DENSE),
    (_TIMM_BLOCK + r"mlp\.fc2", "{block}/mlp/fc2", DENSE),
    (r"norm", "{last}/norm", NORM),
    (r"head", "head", DENSE),
)

NAMES = {"torchvision": TORCHVISION_NAMES, "timm": TIMM_NAMES}

# The leaf after the module name: torchvision's attention keeps its fused
# projection as `in_proj_weight` / `in_proj_bias` (joined by "_", not ".").
_LEAF = re.compile(r"(?P<module>.*?)(?:\.|_)(?P<leaf>weight|bias)")


def convert(model_name: str, path: str, source: str) -> dict[str, np.ndarray]:
  """Reads a torchvision or timm ViT file into flat tlflax variables.

  Args:
    model_name: any ViT of `tlflax.models.vit.MODELS`.
    path: a `.pth` or `.safetensors` state dict.
    source: "torchvision" or "timm".

  Returns:
    `{"params/stem/patch_embed/kernel": array, ...}`; the position
    embeddings keep the file's grid (`fit_weights` resamples them).

  Raises:
    WeightsError: another source, or tensors with no place in this model.
  """
  if source not in NAMES:
    raise WeightsError(f"{model_name!r} takes weights from {' or '.join(NAMES)}, not "
                       f"{source!r}; pass source='torchvision' or source='timm'.")
  model = get_model(model_name)
  blocks = model.stage_names.blocks
  last = model.stage_names[-1]
  table = [(re.compile(pattern), template, kind) for pattern, template, kind in NAMES[source]]
  flat, unknown = {}, []
  for key, value in read_torch_file(path).items():
    found = _place(key, table, blocks, last)
    if found is None:
      unknown.append(key)
      continue
    path_in_model, kind, leaf = found
    value = np.asarray(value, np.float32)
    if kind == TENSOR:
      flat[f"params/{path_in_model}"] = value
    elif leaf == "bias":
      flat[f"params/{path_in_model}/bias"] = value
    elif kind == CONV:
      flat[f"params/{path_in_model}/kernel"] = value.transpose(2, 3, 1, 0)
    elif kind == DENSE:
      flat[f"params/{path_in_model}/kernel"] = value.T
    else:
      flat[f"params/{path_in_model}/scale"] = value
  if unknown:
    raise WeightsError(
        f"{len(unknown)} tensors have no place in {model_name!r} ({len(blocks)} blocks): "
        + ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        + f". Is the file for another ViT size, or not from {source}?")
  return flat


def _place(key: str, table, blocks, last):
  """(our path, kind, leaf) for a source tensor name, or None when it has no place."""
  for pattern, template, kind in table:
    if kind == TENSOR:
      match, leaf = pattern.fullmatch(key), None
    else:
      split = _LEAF.fullmatch(key)
      match = split and pattern.fullmatch(split.group("module"))
      leaf = split and split.group("leaf")
    if not match:
      continue
    if "{block}" in template:
      index = int(match.group("block"))
      if index >= len(blocks):
        return None
      template = template.replace("{block}", blocks[index])
    return template.replace("{last}", last), kind, leaf
  return None


def fit_weights(model_name: str, flat: dict[str, np.ndarray],
                model_options: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Fits converted ViT weights to the image size the model is built for.

  Args:
    model_name: the ViT the weights are for.
    flat: converted variables (`convert`, or a tlflax checkpoint's).
    model_options: the caller's model options. Without `image_size`, the
      model is built for the size the file was trained at (the side of its
      position-embedding grid times the patch size: 384 for SWAG's
      end-to-end ViT-B/16); with it, the embeddings are resampled to that
      size's grid.

  Returns:
    `(flat, model_options)` with the embeddings and `image_size` agreeing.

  Raises:
    WeightsError: an image size that is no multiple of the patch size, or
      embeddings of no square grid.

  Examples:
    >>> flat, options = fit_weights("vit_b_16", flat, {"image_size": 384})
    >>> flat["params/stem/position_embedding"].shape
    (1, 577, 768)
  """
  key = "params/stem/position_embedding"
  if key not in flat:
    return flat, model_options
  embedding = flat[key]
  patch = get_model(model_name).patch_size
  side = math.isqrt(embedding.shape[1] - 1)
  if side * side != embedding.shape[1] - 1:
    raise WeightsError(f"The file's {embedding.shape[1] - 1} patch position embeddings form "
                       "no square grid; tlflax builds ViTs for square images.")
  options = dict(model_options)
  size = options.setdefault("image_size", side * patch)
  if size % patch:
    raise WeightsError(f"image_size={size} is no multiple of {model_name!r}'s patch size "
                       f"{patch}; use e.g. {max(patch, size // patch * patch)}.")
  if size // patch != side:
    interpolation = options.get("interpolation", "bicubic")
    flat = dict(flat)
    flat[key] = np.asarray(resample_position_embedding(
        embedding, (size // patch, size // patch), interpolation), np.float32)
  return flat, options


# ----------------------------------------------------------------------------
# Published weights
# ----------------------------------------------------------------------------

_TORCHVISION_URL = "https://download.pytorch.org/models/"
_TORCHVISION_HASH_ORIGIN = ("the sha256 prefix in torchvision's file name "
                            "(what torch.hub checks)")
_TIMM_NO_HASH = ("timm publishes no hash for its Hugging Face safetensors files; "
                 "only a complete download is kept, and its sha256 is logged")

# (model, tag, file, crop size, resize size, interpolation, reported top-1),
# from the installed torchvision's ViT_*_Weights enums. IMAGENET1K_V1 is
# evaluated bilinear at 256 -> 224 (ViT-L/16: 242 -> 224); SWAG resizes
# bicubic straight to the crop size: 384 / 512 px end to end (E2E), 224 for
# the linear classifier on the frozen SWAG trunk (LINEAR). All use the
# ImageNet mean and std.
_TORCHVISION = (
    ("vit_b_16", "tv_in1k", "vit_b_16-c867db91.pth", 224, 256, "bilinear", 81.072),
    ("vit_b_16", "swag_e2e_in1k", "vit_b_16_swag-9ac1b537.pth", 384, 384, "bicubic", 85.304),
    ("vit_b_16", "swag_lc_in1k", "vit_b_16_lc_swag-4e70ced5.pth", 224, 224, "bicubic", 81.886),
    ("vit_b_32", "tv_in1k", "vit_b_32-d86f8d99.pth", 224, 256, "bilinear", 75.912),
    ("vit_l_16", "tv_in1k", "vit_l_16-852ce7e3.pth", 224, 242, "bilinear", 79.662),
    ("vit_l_16", "swag_e2e_in1k", "vit_l_16_swag-4f3808c9.pth", 512, 512, "bicubic", 88.064),
    ("vit_l_16", "swag_lc_in1k", "vit_l_16_lc_swag-4d563306.pth", 224, 224, "bicubic", 85.146),
)

# timm's default_cfgs for these tags: 224 px at crop_pct 0.9 (resize to
# floor(224 / 0.9) = 248), bicubic, mean = std = 0.5 (its
# IMAGENET_INCEPTION_MEAN/STD). timm's source reports no accuracy.
_TIMM_IDS = ("vit_tiny_patch16_224.augreg_in21k_ft_in1k",
             "vit_small_patch16_224.augreg_in21k_ft_in1k",
             "vit_base_patch16_224.augreg_in21k_ft_in1k",
             "vit_base_patch16_224.augreg2_in21k_ft_in1k",
             "vit_large_patch16_224.augreg_in21k_ft_in1k")
_TIMM_PREPROCESSING = Preprocessing(crop_size=224, resize_size=248, interpolation="bicubic",
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _entries():
  for model_name, tag, file_name, crop, resize, interpolation, top1 in _TORCHVISION:
    yield PretrainedWeights(
        id=f"{model_name}.{tag}", model_name=model_name, source="torchvision",
        url=_TORCHVISION_URL + file_name, file_name=file_name,
        hash=FileHash("sha256", file_name.rsplit("-", 1)[1].split(".")[0],
                      _TORCHVISION_HASH_ORIGIN),
        preprocessing=Preprocessing(crop_size=crop, resize_size=resize,
                                    interpolation=interpolation),
        reported_top1=top1)
  for timm_id in _TIMM_IDS:
    yield PretrainedWeights(
        id=timm_id, model_name=timm_id.split(".")[0], source="timm",
        url=f"https://huggingface.co/timm/{timm_id}/resolve/main/model.safetensors",
        file_name=f"{timm_id}.safetensors", hash=None, hash_note=_TIMM_NO_HASH,
        preprocessing=_TIMM_PREPROCESSING)


PRETRAINED = tuple(_entries())
