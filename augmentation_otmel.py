"""Training-time variety for OT-MEL (used by `run_mel.MELCollator`): identity-keeping picture augmentations, and
pseudo-mentions made from the KB itself.

- `augment_pictures` changes preprocessed pictures `(B, 3, H, W)` (normalised as the CLIP image processor leaves them)
  in ways that keep what they show: scale, position, rotation, brightness / contrast / saturation / hue, a
  permutation of the colour channels, greyscale, blur, JPEG re-compression. It works on the tensors the collator
  caches, so pictures are decoded once however many epochs see them.
- `pseudo_mention` turns a KB entity into a training mention whose gold is that entity (inverse-cloze style
  self-supervision): the surface is its full name or one word of it, the sentence a random subset of the words of its
  description (without the name words the surface leaves out) set in words taken from a real mention's sentence (less
  what that sentence says of its own entity). The model sees, for every entity of the KB and not only those the
  training mentions name, that a part of the name plus a few attribute words points to the entity.
- `drop_words` removes words of a sentence at random (word dropout).

Every function draws from `generator` (a `torch.Generator`) when one is given, else from the global torch random
state (which the Trainer seeds and restores on resume).
"""

import io
import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


AUGMENT_CHOICES = ("none", "mention", "both")
_PUNCTUATION = re.compile(r"^\W+|\W+$")


def _uniform(n: int, low: float, high: float, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _chance(n: int, p: float, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _hue_rotation(angles: torch.Tensor) -> torch.Tensor:
    """`(B, 3, 3)` matrices rotating RGB colours about the grey axis by `angles` (radians): a hue shift that keeps
    brightness and saturation."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    third, root = 1.0 / 3.0, math.sqrt(1.0 / 3.0)
    a = cos + (1 - cos) * third
    b = third * (1 - cos) - root * sin
    c = third * (1 - cos) + root * sin
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([c, a, b], -1), torch.stack([b, c, a], -1)], dim=1)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(decoded).permute(2, 0, 1).to(image.dtype)


def augment_pictures(
    pixel_values: torch.Tensor,
    image_mean,
    image_std,
    generator: torch.Generator | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Identity-keeping augmentation of preprocessed pictures.

    Each picture gets its own draw: a zoom of 0.7-1.3x, a shift of up to 15% of its side, with probability 0.5 a
    rotation of up to 30 degrees (edges repeated where the picture moves in); brightness and contrast 0.7-1.3x,
    saturation 0.5-1.5x; with probability 0.3 a hue rotation of up to 180 degrees, 0.2 a permutation of the colour
    channels, 0.1 greyscale, 0.2 a Gaussian blur, 0.2 a JPEG re-compression at quality 20-60. No flip (it can change
    what a picture shows, e.g. text).

    Args:
        pixel_values (`(B, 3, H, W)`): normalised pictures (`(x / 255 - image_mean) / image_std`).
        image_mean, image_std (3 floats each): the image processor's normalisation.
        generator (`torch.Generator`, *optional*): the random source (default: the global torch state).
        rows (`(B,)` bool, *optional*): only these pictures change (default: all); the others are returned as given.

    Returns:
        `(B, 3, H, W)`, same dtype: the augmented pictures, normalised as given. The input is not modified.
    """
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"augment_pictures expects (B, 3, H, W) pictures, got shape {tuple(pixel_values.shape)}")
    out = pixel_values.clone()
    index = torch.arange(len(out)) if rows is None else rows.nonzero().flatten()
    n = len(index)
    if n == 0:
        return out
    dtype = pixel_values.dtype
    mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
    x = pixel_values[index].float() * std + mean  # [0, 1]
    g = generator

    # Geometry: the output pixel at p shows the input at A p + t (A = rotation / zoom).
    zoom = torch.exp(_uniform(n, math.log(0.7), math.log(1.3), g))
    angle = torch.where(_chance(n, 0.5, g), _uniform(n, -math.pi / 6, math.pi / 6, g), torch.zeros(n))
    shift = _uniform(2 * n, -0.3, 0.3, g).view(n, 2)  # in [-1, 1] grid units: 15% of the side
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Colour.
    grey_weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x = x * _uniform(n, 0.7, 1.3, g).view(n, 1, 1, 1)
    level = (x * grey_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = level + (x - level) * _uniform(n, 0.7, 1.3, g).view(n, 1, 1, 1)
    grey = (x * grey_weights).sum(1, keepdim=True)
    x = grey + (x - grey) * _uniform(n, 0.5, 1.5, g).view(n, 1, 1, 1)
    hue = torch.where(_chance(n, 0.3, g), _uniform(n, -math.pi, math.pi, g), torch.zeros(n))
    x = torch.einsum("bij,bjhw->bihw", _hue_rotation(hue), x)
    permute = _chance(n, 0.2, g)
    orders = torch.stack([torch.randperm(3, generator=g) for _ in range(n)])
    x = torch.where(permute.view(n, 1, 1, 1), x[torch.arange(n).view(n, 1), orders], x)
    to_grey = _chance(n, 0.1, g).view(n, 1, 1, 1)
    x = torch.where(to_grey, (x * grey_weights).sum(1, keepdim=True).expand_as(x), x)
    x = x.clamp(0, 1)

    # Blur and compression.
    blur = _chance(n, 0.2, g)
    sigmas = _uniform(n, 0.5, 1.2, g)
    jpeg = _chance(n, 0.2, g)
    qualities = torch.randint(20, 61, (n,), generator=g)
    for i in blur.nonzero().flatten().tolist():
        x[i] = _blur(x[i : i + 1], float(sigmas[i]))[0]
    for i in jpeg.nonzero().flatten().tolist():
        x[i] = _jpeg(x[i], int(qualities[i]))
    out[index] = ((x.clamp(0, 1) - mean) / std).to(dtype)
    return out


def _bare(word: str) -> str:
    return _PUNCTUATION.sub("", word).casefold()


def drop_words(sentence: str | None, p: float, generator: torch.Generator | None = None) -> str:
    """`sentence` with each word removed with probability `p` (at least one word is kept when it has any)."""
    words = (sentence or "").split()
    if not words or p <= 0:
        return sentence or ""
    keep = ~_chance(len(words), p, generator)
    if not bool(keep.any()):
        keep[int(torch.randint(len(words), (1,), generator=generator))] = True
    return " ".join(w for w, k in zip(words, keep.tolist()) if k)


def pseudo_mention(
    name: str | None,
    description: str | None,
    context: str | None = None,
    context_surface: str | None = None,
    generator: torch.Generator | None = None,
    full_name_p: float = 0.5,
    context_entity: str | None = None,
) -> tuple[str, str]:
    """A mention of the KB entity called `name` and described by `description`, made from the entity's own text.

    - surface: the full name (probability `full_name_p`, and always for a one-word name), else one of its words;
    - sentence: the surface, then a random share (10-60%, drawn per mention) of the description's words in their
      order, leaving out the name words the surface does not give; around them, a random half of the words of
      `context` (a real mention's sentence, split at a random point), leaving out the words of `context_surface` (that
      mention's own name, which belongs to another entity) and the words of `context_entity` (that entity's name and
      description) that neither this entity's name nor its description holds: what the context says of its own entity
      (a place, an employer) would otherwise be a cue pointing away from the gold entity.

    Returns `(surface, sentence)`.
    """
    name_words = (name or "").split()
    if not name_words:
        surface = ""
    elif len(name_words) == 1 or bool(_chance(1, full_name_p, generator)):
        surface = " ".join(name_words)
    else:
        surface = name_words[int(torch.randint(len(name_words), (1,), generator=generator))]
    hidden = {_bare(w) for w in name_words} - {_bare(w) for w in surface.split()}
    described = [w for w in (description or "").split() if _bare(w) not in hidden]
    share = float(_uniform(1, 0.1, 0.6, generator))
    kept = [w for w, k in zip(described, _chance(len(described), share, generator).tolist()) if k]
    own = {_bare(w) for w in name_words + (description or "").split()}
    foreign = {_bare(w) for w in (context_surface or "").split()}
    foreign |= {_bare(w) for w in (context_entity or "").split()} - own
    around = [w for w in (context or "").split() if _bare(w) not in foreign]
    around = [w for w, k in zip(around, _chance(len(around), 0.5, generator).tolist()) if k]
    cut = int(torch.randint(len(around) + 1, (1,), generator=generator))
    sentence = " ".join(around[:cut] + ([surface] if surface else []) + kept + around[cut:])
    return surface, sentence


__all__ = ["AUGMENT_CHOICES", "augment_pictures", "drop_words", "pseudo_mention"]
