"""Shared test set-up: the checkout on sys.path, one CPU thread, fixed seeds, one tiny offline CLIP per session."""

import os
import random
import sys

import numpy as np
import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Stable timings and bit-for-bit repeatable reductions.
torch.set_num_threads(1)

# Text the tiny CLIP's tokenizer is trained on (fixed, so the vocabulary is the same on every run).
TINY_CLIP_TEXTS = [
    "barack obama : 44th president of the united states. born in honolulu, hawaii.",
    "michelle obama : american attorney and author. first lady from 2009 to 2017.",
    "paris : capital and most populous city of france, on the river seine.",
    "paris hilton : american media personality and businesswoman.",
    "jaguar : large cat species native to the americas.",
    "jaguar cars : british luxury vehicle company founded in 1922.",
    "apple inc. : american technology company headquartered in cupertino, california.",
    "apple : edible fruit produced by an apple tree.",
    "obama spoke in paris about climate change on monday.",
    "a jaguar was seen near the river in the rainforest.",
    "the new apple phone was presented in california.",
    "hilton opened a hotel in paris last year.",
]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised tiny CLIP checkpoint (hidden 64, 2 layers, 64-px images, 16-px patches), built once."""
    from tiny_clip import build_tiny_clip

    return build_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")), TINY_CLIP_TEXTS, seed=0)


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
