"""Processor for OT-MEL: mention / entity texts plus images, for a CLIP backbone."""

import difflib
import inspect
import io
import logging
import os
import re
import threading
import warnings
from collections import Counter
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from transformers import AutoProcessor, BatchFeature
from transformers.processing_utils import ProcessorMixin


logger = logging.getLogger(__name__)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, LA, P, L, I;16, F, CMYK, ...) as RGB: the one decoding rule of the project (the processor and
    the dataset converter both use it).

    Transparency is composited on white (a plain convert would turn it black, a viewer shows white). 16-bit and float
    greyscale is scaled by 255 / its maximum when that exceeds 255 (PIL's convert would clip it to white) and clipped
    to [0, 255].
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        high = float(array.max()) if array.size else 0.0
        if high > 255:
            array = array * (255.0 / high)
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


_OPEN_LOCK = threading.Lock()
# One picture, as opposed to a list of them (`processor(..., images=...)` of a single mention or entity).
SINGLE_IMAGE_TYPES = (Image.Image, str, bytes, bytearray, os.PathLike, Mapping)


def exif_upright(image: Image.Image) -> Image.Image:
    """The picture as a viewer displays it: rotated / flipped by its EXIF `Orientation` tag (`PIL.ImageOps.
    exif_transpose`, as transformers' `load_image` and `datasets` do); unchanged without the tag or with an unreadable
    EXIF block."""
    try:
        if image.getexif().get(0x0112, 1) in (None, 1):  # 0x0112: the EXIF Orientation tag; 1: upright
            return image
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unreadable
        return image


def local_path(source: str) -> str | None:
    """The local path of a picture given as a path or a `file://` URL (URL-unquoted); None for other URLs."""
    if re.match(r"file://", source, re.IGNORECASE):
        parts = urlsplit(source)
        return url2pathname(parts.path) if parts.netloc in ("", "localhost") else None
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+://", source):
        return None
    return source


def read_image(source) -> tuple[Image.Image | None, str | None]:
    """Reads an image given as a PIL image, a path or `file://` URL, raw bytes, a datasets `{"bytes", "path"}` dict, or
    None.

    Returns `(RGB image, None)` or `(None, reason)`; a missing or unreadable picture is "no image", never an error and
    never a stand-in picture. The reason starts with its kind (`missing`, `unsupported`, `oversized`, `unreadable`,
    `empty`). Pictures are turned upright by their EXIF orientation ([`exif_upright`]). Truncated files are rejected
    rather than half-decoded. Files over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS` pixels, about 89M
    by default; PIL only warns up to twice that) are refused before decoding: raise that limit (or set it to None) to
    accept them.
    """
    if source is None or (isinstance(source, str) and not source.strip()):  # "" is the MIMIC layout's "no picture"
        return None, None
    if isinstance(source, dict):
        other = sorted(str(k) for k in set(source) - {"bytes", "path"})
        source = source.get("bytes") or source.get("path")
        if source is None:
            if other:
                return None, f"unsupported image dict with keys {', '.join(other)} (expected bytes / path)"
            return None, None
    if not isinstance(source, (Image.Image, bytes, bytearray, str, os.PathLike)):
        return None, f"unsupported image type {type(source).__name__} (expected a PIL image, path, bytes or None)"
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source) and isinstance(source, str):
            path = local_path(source)
            if path is None:
                return None, f"unsupported image URL {source} (only local files are read: download it first)"
            source = path
        if not os.path.exists(source):
            return None, f"missing file {os.fspath(source)}"
        if not os.path.isfile(source):
            return None, f"missing file: {os.fspath(source)} is not a file"
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            # PIL warns (over MAX_IMAGE_PIXELS) or raises (over twice that) when it reads the size: both refused. The
            # warnings filters are process-wide, hence the lock (only around the header read, not the decoding).
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
        if image.width < 1 or image.height < 1:
            return None, "empty image"
        return to_rgb(exif_upright(image)), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, f"oversized image ({err} Raise PIL.Image.MAX_IMAGE_PIXELS to accept it.)"
    except Exception as err:  # noqa: BLE001 - any decoder failure is "no image", reported with its cause
        text = str(err)
        if isinstance(source, (bytes, bytearray)):  # PIL names the in-memory file by its repr: say what it was
            text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", f"of {len(source):,} bytes", text)
        return None, f"unreadable image ({type(err).__name__}: {text})"


class OTMELProcessor(ProcessorMixin):
    r"""Builds OT-MEL inputs: a CLIP image processor plus a tokenizer.

    Mentions become `surface [SEP] sentence`, entities `name [SEP] attributes` (names and surfaces are URL-unquoted, as
    in the MIMIC data), truncated to `max_text_length` tokens. Images may be PIL images (any mode), file paths or
    `file://` URLs, bytes, `datasets` image dicts, or None, and are seen upright (EXIF orientation, [`read_image`]);
    unreadable ones count as "no image" (`has_image` False) with a counted warning. Calls take lists, or one mention /
    entity as a string with one picture; an unknown keyword argument raises a `TypeError` naming it.

    Args:
        image_processor ([`CLIPImageProcessorPil`] or any CLIP image processor).
        tokenizer ([`PreTrainedTokenizerBase`]): a CLIP tokenizer or the offline tiny one.
        max_text_length (`int`, *optional*, defaults to 40): token budget of each text.
        separator (`str`, *optional*): text between the two fields; defaults to the tokenizer's `sep_token` when it has
            one distinct from its end token, else `" : "` (CLIP pools at the first end token, so it cannot be used).
    """

    def __init__(
        self, image_processor=None, tokenizer=None, max_text_length: int = 40, separator: str | None = None, **kwargs
    ):
        self.max_text_length = max_text_length
        self.separator = separator
        super().__init__(image_processor, tokenizer, **kwargs)

    def text_separator(self) -> str:
        """The text between the two fields of a mention or entity text (`separator`, or the tokenizer's default)."""
        if self.separator is not None:
            return self.separator
        sep = getattr(self.tokenizer, "sep_token", None)
        if sep and sep != getattr(self.tokenizer, "eos_token", None):
            return f" {sep} "
        return " : "

    def _tokenize(self, texts: list[str], padding="longest") -> dict:
        if not texts:  # an empty batch: empty tensors (the tokenizer cannot pad nothing)
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        return self.tokenizer(
            texts, padding=padding, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )

    def process_images(self, images: list) -> dict:
        """`pixel_values` `(B, 3, H, W)` (zeros where there is no image) and `has_image` `(B,)` for a list of images
        (PIL, path, bytes, datasets dict or None; one of them alone is a batch of one)."""
        if isinstance(images, SINGLE_IMAGE_TYPES):
            images = [images]
        return self._images(images, len(images))

    def _images(self, images, n: int) -> dict:
        if images is None:
            images = [None] * n
        elif isinstance(images, SINGLE_IMAGE_TYPES):  # one picture (a path, not its characters)
            images = [images]
        if len(images) != n:
            raise ValueError(f"got {len(images)} images for {n} texts; pass None for an item without image")
        decoded, problems = [], Counter()
        first = {}
        for source in images:
            image, reason = read_image(source)
            decoded.append(image)
            if reason is not None:
                key = reason.split(" ")[0]
                problems[key] += 1
                first.setdefault(key, reason)
        if problems:
            logger.warning(
                "%d of %d images treated as 'no image': %s",
                sum(problems.values()),
                n,
                "; ".join(f"{count} {key} (e.g. {first[key]})" for key, count in problems.items()),
            )
        has_image = torch.tensor([image is not None for image in decoded], dtype=torch.bool)
        size = self.image_processor.crop_size or self.image_processor.size
        height, width = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
        pixel_values = torch.zeros(n, 3, height, width)
        present = [image for image in decoded if image is not None]
        if present:
            processed = self.image_processor(images=present, return_tensors="pt")["pixel_values"]
            pixel_values[has_image] = processed.to(pixel_values.dtype)
        return {"pixel_values": pixel_values, "has_image": has_image}

    def mention_texts(self, mentions: list[str], sentences: list[str]) -> list[str]:
        sep = self.text_separator()
        return [f"{unquote(m or '')}{sep}{s or ''}" for m, s in zip(mentions, sentences)]

    def entity_texts(self, names: list[str], attributes: list[str]) -> list[str]:
        sep = self.text_separator()
        return [f"{unquote(n or '')}{sep}{a or ''}" for n, a in zip(names, attributes)]

    def process_mentions(
        self, mentions: list[str], sentences: list[str], images=None, padding="longest", return_tensors="pt"
    ) -> BatchFeature:
        """Returns `input_ids`, `attention_mask` `(B, L)`, `pixel_values` `(B, 3, H, W)`, `has_image` `(B,)`.

        A string (and one picture) is a batch of one. `padding="max_length"` pads every batch to `max_text_length`
        (equal shapes across processes). `return_tensors`: `"pt"` (default, or None) or `"np"`."""
        mentions, sentences = _as_batch(mentions), _as_batch(sentences)
        _check_return_tensors(return_tensors)
        if len(mentions) != len(sentences):
            raise ValueError(f"got {len(mentions)} mentions and {len(sentences)} sentences")
        data = dict(self._tokenize(self.mention_texts(mentions, sentences), padding))
        data.update(self._images(images, len(mentions)))
        return _batch_feature(data, return_tensors)

    def process_entities(
        self, names: list[str], attributes: list[str], images=None, padding="longest", return_tensors="pt"
    ) -> BatchFeature:
        """Returns `input_ids`, `attention_mask` `(B, L)`, `pixel_values` `(B, 3, H, W)`, `has_image` `(B,)`; inputs
        and `return_tensors` as in [`~OTMELProcessor.process_mentions`]."""
        names, attributes = _as_batch(names), _as_batch(attributes)
        _check_return_tensors(return_tensors)
        if len(names) != len(attributes):
            raise ValueError(f"got {len(names)} names and {len(attributes)} attribute texts")
        data = dict(self._tokenize(self.entity_texts(names, attributes), padding))
        data.update(self._images(images, len(names)))
        return _batch_feature(data, return_tensors)

    def __call__(
        self,
        mentions=None,
        sentences=None,
        images=None,
        names=None,
        attributes=None,
        padding="longest",
        return_tensors="pt",
        **kwargs,
    ):
        """`processor(mentions=..., sentences=..., images=...)` for mentions ([`~OTMELProcessor.process_mentions`]),
        `processor(names=..., attributes=..., images=...)` for entities ([`~OTMELProcessor.process_entities`]).

        A single string (with a single sentence or attribute text and one picture) is a batch of one. Any other keyword
        argument raises a `TypeError` naming it (a misspelt one would otherwise drop its data silently)."""
        if kwargs:
            raise TypeError(_unknown_arguments(type(self).__call__, kwargs))
        if (mentions is None) == (names is None):
            raise ValueError(
                "pass mentions= (with sentences=) or names= (with attributes=)"
                + ("" if mentions is None else ", not both")
            )
        if mentions is not None:
            if attributes is not None:
                raise ValueError("attributes= goes with names= (entities); the context of a mention is sentences=")
            mentions = _as_batch(mentions)
            sentences = sentences if sentences is not None else [""] * len(mentions)
            return self.process_mentions(mentions, sentences, images, padding, return_tensors)
        if sentences is not None:
            raise ValueError("sentences= goes with mentions=; the text of an entity besides its name is attributes=")
        names = _as_batch(names)
        attributes = attributes if attributes is not None else [""] * len(names)
        return self.process_entities(names, attributes, images, padding, return_tensors)


def _as_batch(texts):
    """A single string as a batch of one (a string is not split into its characters)."""
    return [texts] if isinstance(texts, str) else texts


RETURN_TENSORS = ("pt", "np")


def _check_return_tensors(return_tensors):
    if return_tensors is not None and return_tensors not in RETURN_TENSORS:
        raise ValueError(
            f"return_tensors must be 'pt' (PyTorch tensors, the default; also None) or 'np' (NumPy arrays), "
            f"got {return_tensors!r}"
        )


def _batch_feature(data: dict, return_tensors) -> BatchFeature:
    """`data` (PyTorch tensors) as a `BatchFeature` of the requested kind."""
    if return_tensors == "np":
        return BatchFeature({key: value.numpy() for key, value in data.items()})
    return BatchFeature(data)


def name_hints(names, known) -> str:
    """`names` quoted and joined, each with the closest of `known` when one is close: `'sentence' (did you mean
    'sentences'?), 'picture'`. For the messages that refuse unknown argument or key names."""
    hints = []
    for name in names:
        close = difflib.get_close_matches(str(name).lower(), list(known), n=1, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints)


def _unknown_arguments(function, kwargs: dict) -> str:
    """The message for keyword arguments that `function` does not take."""
    known = [n for n, p in inspect.signature(function).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    known = [n for n in known if n != "self"]
    return (
        f"OTMELProcessor got unexpected keyword argument(s) {name_hints(kwargs, known)}; it takes "
        f"{', '.join(n + '=' for n in known)}"
    )


OTMELProcessor.register_for_auto_class()

try:  # in-library registration, so AutoProcessor does not fall back to a bare tokenizer
    from .configuration_otmel import OTMELConfig
except ImportError:
    from configuration_otmel import OTMELConfig

AutoProcessor.register(OTMELConfig, OTMELProcessor, exist_ok=True)

__all__ = ["OTMELProcessor", "exif_upright", "local_path", "name_hints", "read_image", "to_rgb"]
