"""Pieces of the small random worlds several test modules build: seeded noise pictures and a tiny offline OT-MEL
saved as a folder. Random weights: the tests that use them check consistency, not quality."""

import io
import os

import torch
from PIL import Image as PILImage
from transformers import AutoImageProcessor, AutoTokenizer

from modeling_otmel import OTMELModel
from processing_otmel import OTMELProcessor
from tiny_clip import build_tiny_clip


def noise_png(seed: int, size=(52, 40)) -> bytes:
    """PNG bytes of a `size` (width, height) RGB picture of seeded uniform noise."""
    g = torch.Generator().manual_seed(seed)
    array = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_model_folder(root, texts: list, hidden_size: int = 32):
    """A tiny CLIP whose tokenizer is trained on `texts`, an untrained OT-MEL on it (eval mode) and its processor,
    saved together in `root/model`: `(model, processor, model_dir)`."""
    clip_dir = build_tiny_clip(os.path.join(root, "clip"), texts * 3, vocab_size=300)
    processor = OTMELProcessor(AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir))
    model = OTMELModel.from_clip(clip_dir, hidden_size=hidden_size).eval()
    model_dir = os.path.join(root, "model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model, processor, model_dir
