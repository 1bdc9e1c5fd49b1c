#!/usr/bin/env python
"""Generate a synthetic multimodal entity-linking world in the MIMIC "cleaned" layout.

Usage::

    python datasets_scripts/make_synthetic.py OUT_DIR --entities 3000 --mentions 6000 --seed 0 \
        [--image-size 64] [--workers 2] [--preset {default,hard}] [--partial_name_fraction F] \
        [--partial_name_cues {rich,plain}] [--mention_image_fraction F] [--style_shift P] \
        [--style_shifts palette,invert,...] [--kb_images_per_entity N] [--nil_fraction F] \
        [--overwrite]

OUT_DIR must be new, empty or a world written by this script (recognised by its ``ceilings.json``);
``--overwrite`` writes into any other folder (its files of the same names are replaced).

The world
---------
Every entity is a person with

* a **name** ``First Last``.  Entities come in *name groups* of 2-5 members that share exactly the same
  full name (the last group may be smaller so that the KB has exactly N entities).  First and last
  names are drawn from syllable-built vocabularies whose size grows with N, so a first name alone
  (or a last name alone) is shared by tens to hundreds of entities.  A few names carry accents, so
  URL quoting and unicode are exercised.
* a **text identity**: an occupation, a city and an organisation (single whole words from fixed
  vocabularies), written into ``attr`` as three short sentences separated by periods.
* a **visual identity**: two big coloured shapes (shape x colour each) in a horizontal or vertical
  layout.  Inside a name group the first colours are all different and so are the second colours,
  so the picture always separates namesakes.  About 20% of entities have no KB picture
  (``image_list`` is empty); the others have 1-3 pictures of their identity (clean background,
  small jitter).

Every mention names its gold entity by full name (88%) or by first name or last name only (6% each,
much more ambiguous) and carries its cue in one of three modes:

* ``text``: the sentence states 1-3 of the entity's attributes; the mention has no image (half) or an
  *uninformative* image (background and a few small distractor shapes, no big shapes);
* ``image``: the sentence is generic, half the time with distractor attribute words that belong to
  other KB entities but to none of the namesakes (so a reader that knows the KB can ignore them, a
  model must learn to); the image shows the entity's visual identity with noise: shifted, scaled,
  another background, a few small distractor shapes, JPEG quality varied;
* ``both``: attribute words and the noisy identity picture.

Partial-name mentions always state 2-3 attributes (text or both mode), and entities without a KB
picture never get ``image`` mode (their mentions can still show a picture, which helps only by
ruling out namesakes whose picture differs).

Mentions are split about 70/15/15 into ``Synth_train.json``, ``Synth_dev.json``,
``Synth_test.json``.  ``imgPath`` is ``mention_image/<stem>.jpg`` or just ``<stem>.jpg`` (as in the
real releases, only the basename matters) or ``""`` for no image.

Hardness knobs
--------------
All default to the world described above; with every knob at its default the output is
byte-identical to generator version 1 (same json files, same pictures, same ``ceilings.json``).
``--preset hard`` sets several at once; explicit flags override the preset (the Python API:
``generate(..., preset="hard", style_shift=0.5)``).  The knobs that change only the pictures draw
from their own random streams, so they leave the text side of the world untouched.

* ``partial_name_fraction`` F (default 0.12): share of mentions that give only the first or only the
  last name (half each).
* ``partial_name_cues`` (default ``rich``): ``rich`` partial-name mentions state 2-3 attributes (text
  or both mode, as above); ``plain`` ones get their mode and cues like full-name mentions (``image``
  mode, a single attribute), as in real data, where a short name comes with no extra context.  More
  rich partial names make the text ceilings *higher*; plain ones make every ceiling lower.
* ``mention_image_fraction`` F (default: none, i.e. the rule above, about 83% of mentions carry a
  picture): target share of mentions with a picture, reached by choosing how often a ``text``-mode
  mention has no picture.  ``image`` and ``both`` mentions always have one, so F below the share of
  those modes is refused.
* ``style_shift`` P (default 0): probability that a mention picture is drawn in a *shifted style*:
  1 or 2 shifts (60/40) drawn per picture from the family ``style_shifts`` (default: all seven):

  - ``palette``: figure and distractor colours go through a fixed per-world derangement of the 8
    colours (``ceilings.json`` records it as ``palette_map``), and the ground gets diagonal stripes,
    the visible mark of the style (so "red" in the KB style is always the same other colour here);
  - ``invert``: the whole picture is a negative (dark ground, complementary colours); never combined
    with ``palette``;
  - ``outline``: shapes drawn as outlines instead of filled;
  - ``rotate``: the figure (layout and shapes) rotated by 8-20 degrees either way; small enough that a
    square never looks like a diamond and a layout keeps its orientation;
  - ``scale``: the figure shrunk to 45-70% and moved anywhere it fits;
  - ``clutter``: 5-9 more distractor shapes, larger ones (30-55% of an identity shape's radius), never
    touching the figure;
  - ``jpeg``: JPEG quality 8-25.

  Every shift keeps the identity readable by a reader that knows the style (the shapes, their
  colours up to the known mapping, and the layout are all still there), so the ceilings below hold
  for every setting: the perfect reader knows the style mapping.  Uninformative pictures are shifted
  too (by any shift but ``rotate``), so a style never tells whether an identity is shown.
* ``kb_images_per_entity`` N (default: none, i.e. 1-3 pictures in the clean KB style): every entity
  that has KB pictures gets exactly N; the first is in the clean KB style and each further one in a
  different single shift of ``style_shifts`` (in a per-entity random order; they repeat only when
  N - 1 exceeds the family).  The share of entities without a picture stays about 20%.
* ``nil_fraction`` F (default 0): whole entities, drawn at random among those with mentions, are
  withheld from the KB until about a share F of the mentions refer to them; those mentions keep their
  split and get the answer ``"nil"``.  ``kb_entity.json`` and ``qid2id.json`` list only the kept
  entities (``id`` renumbered 0..K-1 in order).

``--preset hard``: partial_name_fraction 0.5 with plain cues, mention_image_fraction 0.85, style_shift
0.75 over the whole family, kb_images_per_entity 2 (nil_fraction stays 0; add it explicitly).

Ceilings
--------
``ceilings.json`` gives, per split, what a *perfect reader* can reach, computed from the generator's
ground truth.  Every reader sees the mention surface and knows the whole KB; for each mention it
keeps the set of KB entities consistent with what it sees, then ranks that set first with random
tie-breaking: expected H@1 = 1/|set| and expected MRR = H_n/n (n = |set|, H_n the harmonic number).

* ``name_only``: entities whose full name (or first or last name, for a one-word surface) equals
  the surface;
* ``text_only``: + the sentence; an attribute word counts when at least one namesake has it (words
  no namesake has, e.g. distractors, carry no information), and the set keeps the namesakes that
  have every counted word;
* ``image_only``: + the mention picture; if it shows an identity, keep namesakes with that identity
  or with no KB picture (nothing rules those out); an absent or uninformative picture keeps all;
* ``both``: the intersection of the two.

With ``nil_fraction`` > 0, "KB" means the kept entities, the ceilings are over the in-KB mentions
only, and each split also reports ``n_nil`` (NIL mentions), ``n_in_kb`` and ``nil_detectable``: per
reader, the share of NIL mentions whose set is empty (the reader can tell that the entity is not in
the KB).  ``mentions`` stays the number of rows in the split.  These keys appear only when
nil_fraction > 0, and the ``options`` block under ``world`` (every knob's value, the kept and
withheld entity counts, ``palette_map``) only when some knob differs from its default.

``synth_truth.json`` records, per mention, its mode, name kind, cue words, image kind and the four
set sizes, for error analysis; with the knobs also ``style`` (the shifts of a shifted mention
picture) and, for a NIL mention, ``nil`` and ``withheld_qid``.

Determinism: the same arguments give byte-identical json files and images (each picture has its
own random stream derived from the seed and its index, so worker scheduling does not matter).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageOps


DATASET_NAME = "Synth"
GENERATOR_VERSION = 1
GENERATOR = "datasets_scripts/make_synthetic.py"  # ceilings.json's world.generator: how a world of ours is recognised

COLOURS = [
    (220, 30, 30),  # red
    (20, 150, 40),  # green
    (30, 70, 220),  # blue
    (240, 205, 0),  # yellow
    (200, 30, 190),  # magenta
    (0, 185, 200),  # cyan
    (250, 125, 0),  # orange
    (25, 25, 25),  # black
]
COLOUR_NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "black"]
SHAPES = ["circle", "square", "triangle", "diamond"]
LAYOUTS = ["horizontal", "vertical"]

# Style shifts of a picture (see the module docstring), in their canonical order.
STYLE_SHIFTS = ("palette", "invert", "outline", "rotate", "scale", "clutter", "jpeg")
COLOUR_SHIFTS = ("palette", "invert")  # at most one of these per picture

# Knob defaults: with these the generator writes exactly what version 1 wrote.
DEFAULT_OPTIONS = {
    "partial_name_fraction": 0.12,
    "partial_name_cues": "rich",
    "mention_image_fraction": None,
    "style_shift": 0.0,
    "style_shifts": STYLE_SHIFTS,
    "kb_images_per_entity": None,
    "nil_fraction": 0.0,
}
PRESETS = {
    "default": {},
    "hard": {
        "partial_name_fraction": 0.5,
        "partial_name_cues": "plain",
        "mention_image_fraction": 0.85,
        "style_shift": 0.75,
        "style_shifts": STYLE_SHIFTS,
        "kb_images_per_entity": 2,
    },
}

OCCUPATIONS = """painter surgeon architect chemist pilot sculptor novelist violinist engineer botanist
economist journalist lawyer pianist astronomer geologist biologist physicist dentist pharmacist
photographer translator librarian historian linguist mathematician philosopher poet drummer guitarist
singer dancer actor director producer chef baker farmer fisherman carpenter blacksmith tailor jeweller
potter weaver sailor diplomat senator mayor judge banker accountant nurse veterinarian zoologist
cartographer archaeologist sprinter swimmer cyclist wrestler goalkeeper boxer""".split()
CITIES = """Lisbon Oslo Vienna Prague Dublin Madrid Berlin Warsaw Athens Helsinki Stockholm Copenhagen
Brussels Amsterdam Zurich Geneva Milan Naples Turin Seville Porto Krakow Budapest Bucharest Sofia
Belgrade Zagreb Riga Tallinn Vilnius Kyiv Istanbul Cairo Nairobi Lagos Accra Dakar Tunis Casablanca
Johannesburg Mumbai Delhi Chennai Dhaka Karachi Bangkok Hanoi Manila Jakarta Seoul Tokyo Osaka Beijing
Shanghai Taipei Sydney Melbourne Auckland Toronto Montreal Vancouver Chicago Boston Denver Seattle
Houston Atlanta Miami Havana Bogota Quito Santiago Montevideo Caracas Reykjavik Edinburgh Glasgow
Cardiff Marseille Lyon""".split()
ORGANISATIONS = """Northwind Bluepeak Veltrix Orionis Stellaris Quantora Brightwell Ironvale Silverline
Redstone Greenhill Oakridge Starling Copperfield Highgate Westbrook Eastgate Sunforge Moonrise Tidewater
Cloudway Stonebridge Kestrel Falconer Harbourline Windmere Lakeshore Pinecrest Maplewood Cedarline
Rivergate Goldcrest Blackwood Whitecliff Greyhaven Amberly Crimsonfield Azurite Emberly Frostline
Thornbury Briarwood Foxglove Hawthorne Larkspur Marigold Nightingale Quillon Ravenholt Sablecrest
Tamarind Umberton Vireo Wrenfield Yarrow Zephyria Alderon Bramblecote Cobaltis Driftwood""".split()
ATTRIBUTE_KINDS = ("occupation", "city", "organisation")
VOCAB = {"occupation": OCCUPATIONS, "city": CITIES, "organisation": ORGANISATIONS}

EVENTS = [
    "gave a speech on Tuesday",
    "was photographed at the ceremony",
    "answered questions from reporters",
    "attended the opening night",
    "signed a new agreement",
    "arrived at the airport",
    "was interviewed last week",
    "spoke at the annual meeting",
    "received an award",
    "posed for photographers",
    "visited the exhibition",
    "returned home after the tour",
    "met supporters outside",
    "announced plans for next year",
    "appeared on television",
    "waved to the crowd",
    "celebrated a birthday",
    "launched a campaign",
    "left the building early",
    "joined the panel discussion",
]
# Words of the sentence and attribute templates: a perfect reader must never mistake them for cues.
TEMPLATE_WORDS = set(
    " ".join(EVENTS).lower().split()
    + "on monday the a an from based in at of working for with next to alongside people is lives works"
    " they who work live as person".split()
)

NAME_CONSONANTS = "bdfgklmnprstvz"
NAME_VOWELS = "aeiou"
ACCENTS = {"a": "á", "e": "é", "i": "í", "o": "ö", "u": "ü"}


def _check_vocabularies() -> None:
    words = [w.lower() for kind in ATTRIBUTE_KINDS for w in VOCAB[kind]]
    # A word in two vocabularies, or in a template, would make the text ceiling ambiguous by accident.
    assert len(words) == len(set(words)), "attribute vocabularies overlap"
    assert not set(words) & TEMPLATE_WORDS, set(words) & TEMPLATE_WORDS


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# Options


def resolve_options(preset: str | None = None, **explicit) -> dict:
    """The knob values: built-in defaults, then the preset, then every explicit value that is not None.

    ``style_shifts`` may be a comma-separated string or a sequence; it comes back as a tuple in the
    canonical order of ``STYLE_SHIFTS``.
    """
    unknown = set(explicit) - set(DEFAULT_OPTIONS)
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    opts = dict(DEFAULT_OPTIONS)
    opts.update(PRESETS[preset or "default"])
    opts.update({k: v for k, v in explicit.items() if v is not None})

    shifts = opts["style_shifts"]
    if isinstance(shifts, str):
        shifts = [s.strip() for s in shifts.split(",") if s.strip()]
    bad = [s for s in shifts if s not in STYLE_SHIFTS]
    if bad:
        raise ValueError(f"unknown style shifts {bad}; choose from {','.join(STYLE_SHIFTS)}")
    opts["style_shifts"] = tuple(s for s in STYLE_SHIFTS if s in set(shifts))
    for key in ("partial_name_fraction", "style_shift", "nil_fraction"):
        opts[key] = float(opts[key])
        if not 0.0 <= opts[key] <= 1.0:
            raise ValueError(f"{key} must lie in [0, 1], got {opts[key]}")
    if opts["partial_name_cues"] not in ("rich", "plain"):
        raise ValueError(f"partial_name_cues must be 'rich' or 'plain', got {opts['partial_name_cues']!r}")
    if opts["nil_fraction"] >= 1.0:
        raise ValueError("nil_fraction must be below 1")
    if opts["mention_image_fraction"] is not None:
        opts["mention_image_fraction"] = float(opts["mention_image_fraction"])
        if not 0.0 <= opts["mention_image_fraction"] <= 1.0:
            raise ValueError(f"mention_image_fraction must lie in [0, 1], got {opts['mention_image_fraction']}")
    n_kb = opts["kb_images_per_entity"]
    if n_kb is not None:
        if int(n_kb) != n_kb or n_kb < 0:
            raise ValueError(f"kb_images_per_entity must be a whole number >= 0, got {n_kb}")
        opts["kb_images_per_entity"] = int(n_kb)
    if not opts["style_shifts"] and (opts["style_shift"] > 0 or (n_kb or 0) > 1):
        raise ValueError("style_shifts is empty but style_shift > 0 or kb_images_per_entity > 1 needs styles")
    return opts


def _is_default(opts: dict) -> bool:
    return all(opts[k] == v for k, v in DEFAULT_OPTIONS.items())


def _palette_permutation(seed: int) -> list[int]:
    """The world's palette shift: colour i is drawn as colour perm[i]; no colour maps to itself."""
    rng = random.Random(f"otmel-synth-palette:{seed}")
    perm = list(range(len(COLOURS)))
    while any(i == p for i, p in enumerate(perm)):
        rng.shuffle(perm)
    return perm


def _draw_style(rng: random.Random, family: tuple[str, ...]) -> tuple[str, ...]:
    """1 or 2 shifts from the family (60/40), at most one colour shift, in canonical order."""
    k = 1 if len(family) == 1 else _weighted(rng, [1, 2], [0.6, 0.4])
    chosen: list[str] = []
    for s in rng.sample(family, len(family)):
        if len(chosen) == k:
            break
        if s in COLOUR_SHIFTS and any(c in COLOUR_SHIFTS for c in chosen):
            continue
        chosen.append(s)
    return tuple(s for s in STYLE_SHIFTS if s in chosen)


# ---------------------------------------------------------------------------------------------
# World construction (pure Python, single process, one random stream => deterministic)


def _name_pool(rng: random.Random, n: int, syllables: int, forbidden: set[str]) -> list[str]:
    # First names have 2 syllables (+ optional final consonant) and last names 3, so the two
    # vocabularies never share a word and a one-word surface is a first or a last name, not both.
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = "".join(rng.choice(NAME_CONSONANTS) + rng.choice(NAME_VOWELS) for _ in range(syllables))
        if syllables == 2 and rng.random() < 0.5:
            s += rng.choice("nrl")
        if rng.random() < 0.05:
            i = rng.choice([k for k, c in enumerate(s) if c in ACCENTS])
            s = s[:i] + ACCENTS[s[i]] + s[i + 1 :]
        s = s.capitalize()
        if s in seen or s.lower() in forbidden:
            continue
        seen.add(s)
        out.append(s)
    return out


def _weighted(rng: random.Random, options: list, weights: list[float]):
    return rng.choices(options, weights=weights, k=1)[0]


def _name_lookups(entities: list[dict]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    by_full: dict[str, list[int]] = {}
    by_word: dict[str, list[int]] = {}
    for e in entities:
        by_full.setdefault(e["name"], []).append(e["id"])
        by_word.setdefault(e["first"], []).append(e["id"])
        by_word.setdefault(e["last"], []).append(e["id"])
    return by_full, by_word


def build_world(n_entities: int, n_mentions: int, seed: int, *, preset: str | None = None, **options) -> dict:
    """Return the ground truth: entities, mentions (with split) and the lookup tables.

    ``preset`` and ``options`` are the hardness knobs (see ``resolve_options``).
    """
    _check_vocabularies()
    opts = resolve_options(preset, **options)
    if n_entities < 2:
        raise ValueError("need at least 2 entities")
    rng = random.Random(f"otmel-synth-world:{seed}")

    sizes: list[int] = []
    while sum(sizes) < n_entities:
        sizes.append(rng.randint(2, 5))
    sizes[-1] -= sum(sizes) - n_entities
    if sizes[-1] == 0:
        sizes.pop()
    n_groups = len(sizes)

    forbidden = {w.lower() for kind in ATTRIBUTE_KINDS for w in VOCAB[kind]} | TEMPLATE_WORDS
    n_first = n_last = max(8, math.ceil(math.sqrt(3 * n_groups)))
    firsts = _name_pool(rng, n_first, 2, forbidden)
    lasts = _name_pool(rng, n_last, 3, forbidden)
    pairs = rng.sample(range(n_first * n_last), n_groups)

    entities: list[dict] = []
    for g, (size, pair) in enumerate(zip(sizes, pairs)):
        first, last = firsts[pair // n_last], lasts[pair % n_last]
        colours_a = rng.sample(range(len(COLOURS)), size)
        while True:
            colours_b = rng.sample(range(len(COLOURS)), size)
            if all(a != b for a, b in zip(colours_a, colours_b)):
                break
        for k in range(size):
            entities.append(
                {
                    "group": g,
                    "first": first,
                    "last": last,
                    "name": f"{first} {last}",
                    "occupation": rng.choice(OCCUPATIONS),
                    "city": rng.choice(CITIES),
                    "organisation": rng.choice(ORGANISATIONS),
                    "identity": (
                        rng.randrange(len(SHAPES)),
                        colours_a[k],
                        rng.randrange(len(SHAPES)),
                        colours_b[k],
                        rng.randrange(len(LAYOUTS)),
                    ),
                }
            )
    rng.shuffle(entities)  # so namesakes do not sit next to each other in kb_entity.json

    qids = rng.sample(range(100_000, 100_000 + 50 * n_entities), n_entities)
    kb_image_count = 0
    n_kb_fixed = opts["kb_images_per_entity"]
    for i, e in enumerate(entities):
        e["id"] = i
        e["qid"] = f"Q{qids[i]}"
        n_img = 0 if rng.random() < 0.2 else _weighted(rng, [1, 2, 3], [0.75, 0.2, 0.05])
        if n_kb_fixed is not None and n_img:
            n_img = n_kb_fixed
        e["image_list"] = [f"{e['qid']}_{j}.jpg" for j in range(n_img)]
        e["image_index"] = list(range(kb_image_count, kb_image_count + n_img))
        e["image_styles"] = [()] * n_img
        if n_kb_fixed is not None and n_img > 1:
            # The first picture in the clean KB style, each further one in another single shift.
            family = random.Random(f"otmel-synth-kb-style:{seed}:{i}").sample(
                opts["style_shifts"], len(opts["style_shifts"])
            )
            e["image_styles"] = [()] + [(family[(j - 1) % len(family)],) for j in range(1, n_img)]
        kb_image_count += n_img
        sentences = [
            f"They work as {_article(e['occupation'])} {e['occupation']}.",
            f"They live in {e['city']}.",
            f"They work at {e['organisation']}.",
        ]
        rng.shuffle(sentences)
        e["attr"] = f"{e['name']} is a person. " + " ".join(sentences)

    by_full, by_word = _name_lookups(entities)

    def candidates(surface: str) -> list[int]:
        return by_full.get(surface) or by_word.get(surface, [])

    pf = opts["partial_name_fraction"]
    rich_partial = opts["partial_name_cues"] == "rich"
    name_weights = [0.88, 0.06, 0.06] if pf == 0.12 else [1.0 - pf, pf / 2, pf / 2]
    no_image_weights = [0.5, 0.5]
    if opts["mention_image_fraction"] is not None:
        # Expected share of text-mode mentions (the mode weights below), then how often such a
        # mention must lack a picture for the target share of mentions with a picture.
        s = sum(1 for e in entities if e["image_list"]) / n_entities
        p_text_full = s * 0.30 + (1.0 - s) * 0.5
        p_text = (1.0 - pf) * p_text_full + pf * (0.4 if rich_partial else p_text_full)
        q = (1.0 - opts["mention_image_fraction"]) / p_text
        if q > 1.0 + 1e-9:
            raise ValueError(
                f"mention_image_fraction {opts['mention_image_fraction']} is out of reach: with these settings "
                f"at least {1.0 - p_text:.3f} of the mentions carry a picture"
            )
        q = min(q, 1.0)
        no_image_weights = [q, 1.0 - q]

    mentions: list[dict] = []
    stems: set[str] = set()
    for j in range(n_mentions):
        gold = entities[rng.randrange(n_entities)]
        name_kind = _weighted(rng, ["full", "first", "last"], name_weights)
        surface = gold["name"] if name_kind == "full" else gold[name_kind]
        has_kb_image = bool(gold["image_list"])
        if name_kind != "full" and rich_partial:
            mode = _weighted(rng, ["text", "both"], [0.4, 0.6])
            n_cues = rng.choice([2, 3])
        else:
            if has_kb_image:
                mode = _weighted(rng, ["text", "image", "both"], [0.30, 0.35, 0.35])
            else:
                mode = _weighted(rng, ["text", "both"], [0.5, 0.5])
            n_cues = _weighted(rng, [1, 2, 3], [0.5, 0.35, 0.15])

        cue_kinds: list[str] = []
        distractors: dict[str, str] = {}
        if mode in ("text", "both"):
            cue_kinds = rng.sample(ATTRIBUTE_KINDS, n_cues)
        elif rng.random() < 0.5:
            held = {e[k] for c in candidates(surface) for k in ATTRIBUTE_KINDS for e in [entities[c]]}
            for kind in rng.sample(ATTRIBUTE_KINDS, rng.choice([1, 2])):
                free = [w for w in VOCAB[kind] if w not in held]
                if free:
                    distractors[kind] = rng.choice(free)
        sentence = _sentence(rng, surface, {k: gold[k] for k in cue_kinds}, distractors)

        if mode == "text":
            image_kind = _weighted(rng, ["none", "uninformative"], no_image_weights)
        else:
            image_kind = "identity"
        img_path = ""
        if image_kind != "none":
            while True:
                stem = f"{rng.getrandbits(48):012x}"
                if stem not in stems:
                    stems.add(stem)
                    break
            img_path = f"mention_image/{stem}.jpg" if rng.random() < 0.7 else f"{stem}.jpg"
        mentions.append(
            {
                "index": j,
                "gold": gold["id"],
                "surface": surface,
                "name_kind": name_kind,
                "mode": mode,
                "sentence": sentence,
                "cue_words": [gold[k] for k in cue_kinds],
                "distractor_words": list(distractors.values()),
                "image_kind": image_kind,
                "imgPath": img_path,
                "style": (),
                "nil": False,
            }
        )

    order = list(range(n_mentions))
    rng.shuffle(order)
    n_train, n_dev = round(0.70 * n_mentions), round(0.15 * n_mentions)
    for rank, j in enumerate(order):
        mentions[j]["split"] = "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test"

    # The knobs below draw from their own streams: the world above does not depend on them.
    if opts["style_shift"] > 0:
        for m in mentions:
            if m["image_kind"] == "none":
                continue
            srng = random.Random(f"otmel-synth-style:{seed}:{m['index']}")
            # Without a figure there is nothing to rotate: such pictures draw from the other shifts.
            family = tuple(x for x in opts["style_shifts"] if m["image_kind"] == "identity" or x != "rotate")
            if srng.random() < opts["style_shift"] and family:
                m["style"] = _draw_style(srng, family)

    withheld: set[int] = set()
    if opts["nil_fraction"] > 0:
        counts: dict[int, int] = {}
        for m in mentions:
            counts[m["gold"]] = counts.get(m["gold"], 0) + 1
        drawn = sorted(counts)
        random.Random(f"otmel-synth-nil:{seed}").shuffle(drawn)
        target, n_nil = opts["nil_fraction"] * n_mentions, 0
        for eid in drawn:  # whole entities, each taken when it brings the NIL count closer to the target
            if abs(n_nil + counts[eid] - target) < abs(n_nil - target):
                withheld.add(eid)
                n_nil += counts[eid]
        for m in mentions:
            m["nil"] = m["gold"] in withheld
    kb_id = 0
    for e in entities:
        e["in_kb"] = e["id"] not in withheld
        if e["in_kb"]:
            e["kb_id"] = kb_id
            kb_id += 1
    if withheld:
        by_full, by_word = _name_lookups([e for e in entities if e["in_kb"]])

    return {
        "seed": seed,
        "entities": entities,
        "mentions": mentions,
        "by_full": by_full,
        "by_word": by_word,
        "kb_image_count": kb_image_count,
        "options": opts,
        "palette": _palette_permutation(seed),
    }


def _sentence(rng: random.Random, surface: str, cues: dict[str, str], distractors: dict[str, str]) -> str:
    event = rng.choice(EVENTS)
    if cues:
        parts = []
        if "occupation" in cues:
            w = cues["occupation"]
            parts.append(rng.choice([f"the {w}", f"{_article(w)} {w}"]))
        if "city" in cues:
            parts.append(rng.choice([f"from {cues['city']}", f"based in {cues['city']}"]))
        if "organisation" in cues:
            w = cues["organisation"]
            parts.append(rng.choice([f"at {w}", f"of {w}", f"working for {w}"]))
        clause = " ".join(parts)
        if rng.random() < 0.5:
            return f"{surface}, {clause}, {event}."
        return f"On Monday {surface}, {clause}, {event}."
    if not distractors:
        return f"{surface} {event}." if rng.random() < 0.5 else f"On Monday {surface} {event}."
    if "occupation" in distractors:
        w = distractors["occupation"]
        company = f"{_article(w)} {w}"
    else:
        company = "people"
    if "city" in distractors:
        company += f" from {distractors['city']}"
    if "organisation" in distractors:
        company += f" of {distractors['organisation']}"
    return f"{surface} {event} alongside {company}."


# ---------------------------------------------------------------------------------------------
# Ceilings


def _harmonic(n: int) -> float:
    return sum(1.0 / k for k in range(1, n + 1))


READERS = ("name_only", "text_only", "image_only", "both")


def reader_sets(world: dict, m: dict) -> dict[str, list[int]]:
    """The KB entities each perfect reader cannot tell apart from the gold one.

    For a NIL mention (gold withheld from the KB) the sets hold the KB entities the reader cannot
    rule out; an empty set means the reader can tell that the entity is not in the KB.
    """
    entities = world["entities"]
    names = world["by_full"].get(m["surface"]) or world["by_word"].get(m["surface"], [])
    # The text reader parses the sentence itself rather than trusting the generator's cue list,
    # so that accidental attribute words in templates would show up as lower ceilings, not be hidden.
    words = {w.strip(".,") for w in m["sentence"].split()}
    held = {e[k] for c in names for e in [entities[c]] for k in ATTRIBUTE_KINDS}
    informative = words & held
    text = [c for c in names if informative <= {entities[c][k] for k in ATTRIBUTE_KINDS}]
    if m["image_kind"] == "identity":
        # Every style shift keeps the identity readable (module docstring): the reader knows the styles.
        shown = entities[m["gold"]]["identity"]
        image = [c for c in names if not entities[c]["image_list"] or entities[c]["identity"] == shown]
    else:
        image = list(names)
    image_set = set(image)
    both = [c for c in text if c in image_set]
    sets = {"name_only": names, "text_only": text, "image_only": image, "both": both}
    if not m.get("nil"):
        for reader, s in sets.items():
            assert m["gold"] in s, (reader, m)
    return sets


def compute_ceilings(world: dict) -> dict:
    splits: dict[str, dict] = {}
    truth = []
    acc = {}
    entities = world["entities"]
    report_nil = world["options"]["nil_fraction"] > 0
    for m in world["mentions"]:
        sets = reader_sets(world, m)
        a = acc.setdefault(
            m["split"],
            {"n": 0, "n_nil": 0, "modes": {}, "name_kinds": {}, **{r: [0.0, 0.0, 0, 0] for r in READERS}},
        )
        a["n"] += 1
        a["modes"][m["mode"]] = a["modes"].get(m["mode"], 0) + 1
        a["name_kinds"][m["name_kind"]] = a["name_kinds"].get(m["name_kind"], 0) + 1
        if m["nil"]:
            a["n_nil"] += 1
            for r in READERS:
                a[r][3] += not sets[r]
        else:
            for r in READERS:
                n = len(sets[r])
                a[r][0] += 1.0 / n
                a[r][1] += _harmonic(n) / n
                a[r][2] += n == 1
        t = {
            "id": _mention_id(m),
            "split": m["split"],
            "mode": m["mode"],
            "name_kind": m["name_kind"],
            "cue_words": m["cue_words"],
            "distractor_words": m["distractor_words"],
            "image_kind": m["image_kind"],
            "set_sizes": {r: len(sets[r]) for r in READERS},
        }
        if m["style"]:
            t["style"] = list(m["style"])
        if m["nil"]:
            t["nil"] = True
            t["withheld_qid"] = entities[m["gold"]]["qid"]
        truth.append(t)
    for split in ("train", "dev", "test"):
        a = acc.get(split)
        if a is None:
            continue
        n_in_kb = a["n"] - a["n_nil"]
        s = splits[split] = {
            "mentions": a["n"],
            "modes": dict(sorted(a["modes"].items())),
            "name_kinds": dict(sorted(a["name_kinds"].items())),
        }
        if report_nil:
            s["n_in_kb"] = n_in_kb
            s["n_nil"] = a["n_nil"]
        d = max(n_in_kb, 1)
        for r in READERS:
            s[r] = {"h1": round(a[r][0] / d, 6), "mrr": round(a[r][1] / d, 6), "resolved_share": round(a[r][2] / d, 6)}
        if report_nil:
            s["nil_detectable"] = {r: round(a[r][3] / max(a["n_nil"], 1), 6) for r in READERS}
    return {"splits": splits, "truth": truth}


def _mention_id(m: dict) -> str:
    return f"synth-{m['index']:07d}"


# ---------------------------------------------------------------------------------------------
# Pictures (rendered in worker processes; each from its own seeded stream)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: int, cx: float, cy: float, r: float, fill) -> None:
    name = SHAPES[shape]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "square":
        h = r * 0.88
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def _draw_shape_styled(
    draw: ImageDraw.ImageDraw, shape: int, cx: float, cy: float, r: float, colour, angle: float, outline: bool
) -> None:
    """A shape rotated by ``angle`` degrees, filled or outlined (line width a fifth of the radius)."""
    if angle == 0 and not outline:
        _draw_shape(draw, shape, cx, cy, r, colour)
        return
    width = max(1, round(0.2 * r)) if outline else 0
    fill, outline = (None, colour) if outline else (colour, None)
    name = SHAPES[shape]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=max(width, 1))
        return
    if name == "square":
        h = r * 0.88
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif name == "triangle":
        pts = [(0, -r), (r, r * 0.8), (-r, r * 0.8)]
    else:
        pts = [(0, -r), (r, 0), (0, r), (-r, 0)]
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    xy = [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]
    draw.polygon(xy, fill=fill, outline=outline, width=max(width, 1))


def _render(kind: str, identity, seed_key: str, size: int, style: tuple = (), palette=None) -> bytes:
    rng = random.Random(seed_key)
    if kind == "kb":
        g = rng.randint(232, 250)
        bg = (g, g, rng.randint(232, 250))
        scale = rng.uniform(0.95, 1.05)
        jitter = 0.03 * size
        dx, dy = rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)
        quality = 92
    else:
        bg = tuple(rng.randint(150, 245) for _ in range(3))
        scale = rng.uniform(0.75, 1.15)
        shift = 0.1 * size
        dx, dy = rng.uniform(-shift, shift), rng.uniform(-shift, shift)
        quality = rng.randint(70, 92)
    # A shifted style draws its own parameters from a second stream, so the plain picture's draws
    # (and bytes) are those of the unshifted generator.
    srng = random.Random(f"{seed_key}:style") if style else None
    spread = 0.22 * size  # half the distance between the two shapes' centres
    distractor_scale = 1.0
    if "scale" in style:
        scale = srng.uniform(0.45, 0.7)
        spread = 0.25 * size * scale
        room = 0.5 * size - 0.45 * size * scale - 0.03 * size
        dx, dy = srng.uniform(-room, room), srng.uniform(-room, room)
        distractor_scale = scale / 0.75  # distractors stay smaller than the smallest identity shape
    angle = srng.uniform(8.0, 20.0) * srng.choice([-1, 1]) if "rotate" in style else 0.0
    outline = "outline" in style
    if "jpeg" in style:
        quality = srng.randint(8, 25)

    def colour(i: int):
        return COLOURS[palette[i]] if "palette" in style else COLOURS[i]

    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    if kind != "kb" and rng.random() < 0.5:
        # A second background band, so the background itself is no identity cue.
        band = tuple(rng.randint(150, 245) for _ in range(3))
        a = rng.uniform(0, size)
        if rng.random() < 0.5:
            draw.rectangle([0, a, size, a + size * 0.35], fill=band)
        else:
            draw.rectangle([a, 0, a + size * 0.35, size], fill=band)
    if "palette" in style:
        # The visible mark of the palette style: darker diagonal stripes over the whole ground.
        stripe = tuple(max(0, v - 45) for v in bg)
        step, w = max(4, size // 8), max(1, size // 20)
        for k in range(-size, 2 * size, step):
            draw.line([(k, 0), (k + size, size)], fill=stripe, width=w)
    r = 0.2 * size * scale
    shapes = []  # (shape, cx, cy, colour index) of the identity
    if identity is not None:
        sa, ca, sb, cb, layout = identity
        c = size / 2
        if LAYOUTS[layout] == "horizontal":
            va, vb = (-spread, 0.0), (spread, 0.0)
        else:
            va, vb = (0.0, -spread), (0.0, spread)
        if angle:
            cos_t, sin_t = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            va, vb = ((x * cos_t - y * sin_t, x * sin_t + y * cos_t) for x, y in (va, vb))
        shapes = [(sa, c + va[0] + dx, c + va[1] + dy, ca), (sb, c + vb[0] + dx, c + vb[1] + dy, cb)]
    if "clutter" in style:
        # More and larger distractors, never touching the identity shapes (whose corners reach 1.25 r).
        for _ in range(srng.randint(5, 9)):
            rr = srng.uniform(0.30, 0.55) * r
            shape, ci = srng.randrange(len(SHAPES)), srng.randrange(len(COLOURS))
            for _ in range(30):
                x, y = srng.uniform(rr, size - rr), srng.uniform(rr, size - rr)
                if all(math.hypot(x - sx, y - sy) > rr * 1.25 + r * 1.25 + 1 for _, sx, sy, _ in shapes):
                    _draw_shape_styled(draw, shape, x, y, rr, colour(ci), 0.0, outline)
                    break
    if identity is not None:
        if style:
            for shape, x, y, ci in shapes:
                _draw_shape_styled(draw, shape, x, y, r, colour(ci), angle, outline)
        else:
            for shape, x, y, ci in shapes:
                _draw_shape(draw, shape, x, y, r, COLOURS[ci])
    if kind != "kb":
        # Small distractors: a quarter of the identity size or less, so they cannot be mistaken
        # for an identity shape, but they use the same colours, so colour alone is not enough.
        n = rng.randint(2, 5) if identity is None else rng.randint(1, 3)
        for _ in range(n):
            rr = rng.uniform(0.04, 0.07) * size
            # (the draws in the order of version 1: shape, x, y, colour)
            shape, x, y = rng.randrange(len(SHAPES)), rng.uniform(0, size), rng.uniform(0, size)
            ci = rng.randrange(len(COLOURS))
            if style:
                _draw_shape_styled(draw, shape, x, y, rr * distractor_scale, colour(ci), 0.0, outline)
            else:
                _draw_shape(draw, shape, x, y, rr, COLOURS[ci])
    if "invert" in style:
        im = ImageOps.invert(im)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _render_chunk(args) -> int:
    out_dir, size, palette, tasks = args
    for rel, kind, identity, seed_key, style in tasks:
        data = _render(kind, identity, seed_key, size, style, palette)
        with open(os.path.join(out_dir, rel), "wb") as f:
            f.write(data)
    return len(tasks)


def image_tasks(world: dict) -> list[tuple]:
    """(path, kind, identity, seed key, style) of every picture of the written world."""
    seed = world["seed"]
    tasks = []
    for e in world["entities"]:
        if not e["in_kb"]:
            continue
        for name, idx, style in zip(e["image_list"], e["image_index"], e["image_styles"]):
            tasks.append((f"kb_image/{name}", "kb", e["identity"], f"{seed}:kb:{idx}", style))
    entities = world["entities"]
    for m in world["mentions"]:
        if m["image_kind"] == "none":
            continue
        stem = os.path.basename(m["imgPath"]).split(".", 1)[0]
        identity = entities[m["gold"]]["identity"] if m["image_kind"] == "identity" else None
        tasks.append((f"mention_image/{stem}.jpg", "mention", identity, f"{seed}:mention:{m['index']}", m["style"]))
    return tasks


def render_images(
    tasks: list[tuple], out_dir: Path, size: int, workers: int, progress: bool, palette: list[int] | None = None
) -> None:
    chunk = 500
    chunks = [(str(out_dir), size, palette, tasks[i : i + chunk]) for i in range(0, len(tasks), chunk)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="images", unit="img", file=sys.stderr)
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            n = _render_chunk(c)
            if bar:
                bar.update(n)
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(workers) as pool:
            for n in pool.imap_unordered(_render_chunk, chunks):
                if bar:
                    bar.update(n)
    if bar:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Files


def _dump(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")


def synthetic_world(folder) -> dict | None:
    """The ``world`` entry of ``folder/ceilings.json`` (generator, version, entities, mentions, seed, options, ...)
    when the folder holds a world written by this script, or the converted copy of one (``convert_mimic.py`` copies
    ``ceilings.json``); None otherwise (no such file, unreadable, or written by something else)."""
    try:
        with open(Path(folder) / "ceilings.json", encoding="utf-8") as f:
            ceilings = json.load(f)
    except (OSError, ValueError):
        return None
    world = ceilings.get("world") if isinstance(ceilings, dict) else None
    return world if isinstance(world, dict) and world.get("generator") == GENERATOR else None


def check_out_dir(out_dir, overwrite: bool = False) -> None:
    """Raises ``ValueError`` when ``out_dir`` may not receive a world: a file, or a non-empty folder that holds no
    world of this script (someone's own data, which a world's files would overwrite), unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: refusing to write a world there")
    if overwrite or not out.is_dir() or synthetic_world(out) is not None or not any(out.iterdir()):
        return
    raise ValueError(
        f"{out} is not empty and holds no world of make_synthetic.py (no ceilings.json of its own): refusing to write "
        "into it; choose a new or empty folder, or pass --overwrite (overwrite=True) to write its files there anyway"
    )


def generate(
    out_dir,
    entities: int,
    mentions: int,
    seed: int = 0,
    image_size: int = 64,
    workers: int | None = None,
    progress: bool = False,
    *,
    preset: str | None = None,
    partial_name_fraction: float | None = None,
    partial_name_cues: str | None = None,
    mention_image_fraction: float | None = None,
    style_shift: float | None = None,
    style_shifts=None,
    kb_images_per_entity: int | None = None,
    nil_fraction: float | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the world into ``out_dir``; return the ceilings dict (also written to ceilings.json).

    The keyword-only arguments are the hardness knobs of the module docstring; None means "the
    preset's value, else the default", so explicit values override the preset. ``out_dir`` must be
    new, empty or a world of this script (``check_out_dir``: ``ValueError`` otherwise) unless
    ``overwrite``.
    """
    check_out_dir(out_dir, overwrite)
    out = Path(out_dir)
    (out / "kb_image").mkdir(parents=True, exist_ok=True)
    (out / "mention_image").mkdir(parents=True, exist_ok=True)
    world = build_world(
        entities,
        mentions,
        seed,
        preset=preset,
        partial_name_fraction=partial_name_fraction,
        partial_name_cues=partial_name_cues,
        mention_image_fraction=mention_image_fraction,
        style_shift=style_shift,
        style_shifts=style_shifts,
        kb_images_per_entity=kb_images_per_entity,
        nil_fraction=nil_fraction,
    )
    opts = world["options"]

    kb_entities = [e for e in world["entities"] if e["in_kb"]]
    kb = [
        {
            "id": e["kb_id"],
            "qid": e["qid"],
            "type": "person",
            "entity_name": quote(e["name"]),
            "attr": e["attr"],
            "image_list": e["image_list"],
        }
        for e in kb_entities
    ]
    _dump(out / "kb_entity.json", kb)
    _dump(out / "qid2id.json", {e["qid"]: e["kb_id"] for e in kb_entities})
    entities_ = world["entities"]
    for split in ("train", "dev", "test"):
        rows = [
            {
                "id": _mention_id(m),
                "mentions": quote(m["surface"]),
                "sentence": m["sentence"],
                "imgPath": m["imgPath"],
                "answer": "nil" if m["nil"] else entities_[m["gold"]]["qid"],
            }
            for m in world["mentions"]
            if m["split"] == split
        ]
        _dump(out / f"{DATASET_NAME}_{split}.json", rows)

    ceil = compute_ceilings(world)
    world_info = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "entities": entities,
        "mentions": mentions,
        "seed": seed,
        "image_size": image_size,
        "kb_images": sum(len(e["image_list"]) for e in kb_entities),
        "entities_without_image": sum(1 for e in kb_entities if not e["image_list"]),
        "license": "cc0-1.0",
    }
    if not _is_default(opts):
        options = {"preset": preset or "default", **opts, "style_shifts": list(opts["style_shifts"])}
        options["kb_entities"] = len(kb_entities)
        options["withheld_entities"] = len(entities_) - len(kb_entities)
        if "palette" in opts["style_shifts"] and (opts["style_shift"] > 0 or (opts["kb_images_per_entity"] or 0) > 1):
            options["palette_map"] = {COLOUR_NAMES[i]: COLOUR_NAMES[p] for i, p in enumerate(world["palette"])}
        world_info["options"] = options
    ceilings = {
        "world": world_info,
        "definitions": {
            "h1": "expected H@1 of a perfect reader with random tie-breaking: mean of 1/|set|",
            "mrr": "expected MRR under random tie-breaking: mean of H_n/n, n=|set|",
            "resolved_share": "share of mentions whose set holds only the gold entity",
            "name_only": "surface only",
            "text_only": "surface + sentence",
            "image_only": "surface + mention image",
            "both": "surface + sentence + mention image",
        },
        "splits": ceil["splits"],
    }
    if opts["nil_fraction"] > 0:
        ceilings["definitions"].update(
            {
                "n_nil": "mentions whose entity is withheld from the KB (answer 'nil'); h1/mrr/resolved_share are "
                "over the n_in_kb other mentions",
                "nil_detectable": "share of NIL mentions whose set is empty: the reader can tell the entity is not "
                "in the KB",
            }
        )
    _dump(out / "ceilings.json", ceilings)
    _dump(out / "synth_truth.json", ceil["truth"])

    render_images(image_tasks(world), out, image_size, workers or os.cpu_count() or 1, progress, world["palette"])
    return ceilings


def _format_ceilings(ceilings: dict) -> str:
    lines = [f"{'split':6} {'n':>6}  " + "  ".join(f"{r:>19}" for r in READERS)]
    lines.append(f"{'':6} {'':>6}  " + "  ".join(f"{'H@1':>9} {'MRR':>9}" for _ in range(4)))
    for split, s in ceilings["splits"].items():
        lines.append(
            f"{split:6} {s['mentions']:>6}  " + "  ".join(f"{s[r]['h1']:>9.4f} {s[r]['mrr']:>9.4f}" for r in READERS)
        )
    if any("n_nil" in s for s in ceilings["splits"].values()):
        lines.append(
            "NIL mentions (answer 'nil', not in the ceilings above): "
            + ", ".join(f"{split} {s['n_nil']}" for split, s in ceilings["splits"].items())
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out_dir")
    p.add_argument("--entities", type=int, default=3000)
    p.add_argument("--mentions", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="processes drawing pictures (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into OUT_DIR even when it is a non-empty folder that holds no world of this script",
    )
    k = p.add_argument_group("hardness knobs (defaults: the version-1 world; explicit flags override --preset)")
    k.add_argument("--preset", choices=sorted(PRESETS), default=None)
    k.add_argument(
        "--partial_name_fraction",
        "--partial-name-fraction",
        type=float,
        default=None,
        help="share of mentions giving only the first or only the last name (default 0.12)",
    )
    k.add_argument(
        "--partial_name_cues",
        "--partial-name-cues",
        choices=("rich", "plain"),
        default=None,
        help="rich: partial-name mentions state 2-3 attributes (default); plain: cues as for full names",
    )
    k.add_argument(
        "--mention_image_fraction",
        "--mention-image-fraction",
        type=float,
        default=None,
        help="target share of mentions with a picture (default: text-mode mentions lack one half the time)",
    )
    k.add_argument(
        "--style_shift",
        "--style-shift",
        type=float,
        default=None,
        help="probability that a mention picture is drawn in a shifted style (default 0)",
    )
    k.add_argument(
        "--style_shifts",
        "--style-shifts",
        default=None,
        help=f"comma-separated family of shifts (default: {','.join(STYLE_SHIFTS)})",
    )
    k.add_argument(
        "--kb_images_per_entity",
        "--kb-images-per-entity",
        type=int,
        default=None,
        help="pictures of every entity that has some, each in a different style (default: 1-3, one style)",
    )
    k.add_argument(
        "--nil_fraction",
        "--nil-fraction",
        type=float,
        default=None,
        help="share of mentions whose entity is withheld from the KB (answer 'nil'; default 0)",
    )
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        ceilings = generate(
            a.out_dir,
            a.entities,
            a.mentions,
            a.seed,
            a.image_size,
            a.workers,
            progress=not a.no_progress,
            preset=a.preset,
            partial_name_fraction=a.partial_name_fraction,
            partial_name_cues=a.partial_name_cues,
            mention_image_fraction=a.mention_image_fraction,
            style_shift=a.style_shift,
            style_shifts=a.style_shifts,
            kb_images_per_entity=a.kb_images_per_entity,
            nil_fraction=a.nil_fraction,
            overwrite=a.overwrite,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_format_ceilings(ceilings))
    print(
        f"wrote {a.out_dir} ({a.entities} entities, {a.mentions} mentions, "
        f"{ceilings['world']['kb_images']} KB pictures) in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
