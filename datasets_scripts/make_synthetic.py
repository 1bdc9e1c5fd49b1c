#!/usr/bin/env python
"""Generate a synthetic multimodal entity-linking world in the MIMIC "cleaned" layout.

Usage::

    python datasets_scripts/make_synthetic.py OUT_DIR --entities 3000 --mentions 6000 --seed 0 \
        [--image-size 64] [--workers 2]

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

``synth_truth.json`` records, per mention, its mode, name kind, cue words, image kind and the four
set sizes, for error analysis.

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

from PIL import Image, ImageDraw

DATASET_NAME = "Synth"
GENERATOR_VERSION = 1

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
    "gave a speech on Tuesday", "was photographed at the ceremony", "answered questions from reporters",
    "attended the opening night", "signed a new agreement", "arrived at the airport",
    "was interviewed last week", "spoke at the annual meeting", "received an award",
    "posed for photographers", "visited the exhibition", "returned home after the tour",
    "met supporters outside", "announced plans for next year", "appeared on television",
    "waved to the crowd", "celebrated a birthday", "launched a campaign", "left the building early",
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
            s = s[:i] + ACCENTS[s[i]] + s[i + 1:]
        s = s.capitalize()
        if s in seen or s.lower() in forbidden:
            continue
        seen.add(s)
        out.append(s)
    return out


def _weighted(rng: random.Random, options: list, weights: list[float]):
    return rng.choices(options, weights=weights, k=1)[0]


def build_world(n_entities: int, n_mentions: int, seed: int) -> dict:
    """Return the ground truth: entities, mentions (with split) and the lookup tables."""
    _check_vocabularies()
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
            entities.append({
                "group": g,
                "first": first,
                "last": last,
                "name": f"{first} {last}",
                "occupation": rng.choice(OCCUPATIONS),
                "city": rng.choice(CITIES),
                "organisation": rng.choice(ORGANISATIONS),
                "identity": (rng.randrange(len(SHAPES)), colours_a[k], rng.randrange(len(SHAPES)),
                             colours_b[k], rng.randrange(len(LAYOUTS))),
            })
    rng.shuffle(entities)  # so namesakes do not sit next to each other in kb_entity.json

    qids = rng.sample(range(100_000, 100_000 + 50 * n_entities), n_entities)
    kb_image_count = 0
    for i, e in enumerate(entities):
        e["id"] = i
        e["qid"] = f"Q{qids[i]}"
        n_img = 0 if rng.random() < 0.2 else _weighted(rng, [1, 2, 3], [0.75, 0.2, 0.05])
        e["image_list"] = [f"{e['qid']}_{j}.jpg" for j in range(n_img)]
        e["image_index"] = list(range(kb_image_count, kb_image_count + n_img))
        kb_image_count += n_img
        sentences = [f"They work as {_article(e['occupation'])} {e['occupation']}.",
                     f"They live in {e['city']}.", f"They work at {e['organisation']}."]
        rng.shuffle(sentences)
        e["attr"] = f"{e['name']} is a person. " + " ".join(sentences)

    by_full: dict[str, list[int]] = {}
    by_word: dict[str, list[int]] = {}
    for e in entities:
        by_full.setdefault(e["name"], []).append(e["id"])
        by_word.setdefault(e["first"], []).append(e["id"])
        by_word.setdefault(e["last"], []).append(e["id"])

    def candidates(surface: str) -> list[int]:
        return by_full.get(surface) or by_word.get(surface, [])

    mentions: list[dict] = []
    stems: set[str] = set()
    for j in range(n_mentions):
        gold = entities[rng.randrange(n_entities)]
        name_kind = _weighted(rng, ["full", "first", "last"], [0.88, 0.06, 0.06])
        surface = gold["name"] if name_kind == "full" else gold[name_kind]
        has_kb_image = bool(gold["image_list"])
        if name_kind != "full":
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
            image_kind = _weighted(rng, ["none", "uninformative"], [0.5, 0.5])
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
        mentions.append({
            "index": j, "gold": gold["id"], "surface": surface, "name_kind": name_kind, "mode": mode,
            "sentence": sentence, "cue_words": [gold[k] for k in cue_kinds],
            "distractor_words": list(distractors.values()), "image_kind": image_kind, "imgPath": img_path,
        })

    order = list(range(n_mentions))
    rng.shuffle(order)
    n_train, n_dev = round(0.70 * n_mentions), round(0.15 * n_mentions)
    for rank, j in enumerate(order):
        mentions[j]["split"] = "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test"

    return {"seed": seed, "entities": entities, "mentions": mentions, "by_full": by_full,
            "by_word": by_word, "kb_image_count": kb_image_count}


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


def reader_sets(world: dict, m: dict) -> dict[str, list[int]]:
    """The KB entities each perfect reader cannot tell apart from the gold one."""
    entities = world["entities"]
    names = world["by_full"].get(m["surface"]) or world["by_word"].get(m["surface"], [])
    # The text reader parses the sentence itself rather than trusting the generator's cue list,
    # so that accidental attribute words in templates would show up as lower ceilings, not be hidden.
    words = {w.strip(".,") for w in m["sentence"].split()}
    held = {e[k] for c in names for e in [entities[c]] for k in ATTRIBUTE_KINDS}
    informative = words & held
    text = [c for c in names if informative <= {entities[c][k] for k in ATTRIBUTE_KINDS}]
    if m["image_kind"] == "identity":
        shown = entities[m["gold"]]["identity"]
        image = [c for c in names if not entities[c]["image_list"] or entities[c]["identity"] == shown]
    else:
        image = list(names)
    image_set = set(image)
    both = [c for c in text if c in image_set]
    sets = {"name_only": names, "text_only": text, "image_only": image, "both": both}
    for reader, s in sets.items():
        assert m["gold"] in s, (reader, m)
    return sets


def compute_ceilings(world: dict) -> dict:
    splits: dict[str, dict] = {}
    truth = []
    readers = ("name_only", "text_only", "image_only", "both")
    acc = {}
    for m in world["mentions"]:
        sets = reader_sets(world, m)
        a = acc.setdefault(m["split"], {"n": 0, "modes": {}, "name_kinds": {},
                                        **{r: [0.0, 0.0, 0] for r in readers}})
        a["n"] += 1
        a["modes"][m["mode"]] = a["modes"].get(m["mode"], 0) + 1
        a["name_kinds"][m["name_kind"]] = a["name_kinds"].get(m["name_kind"], 0) + 1
        for r in readers:
            n = len(sets[r])
            a[r][0] += 1.0 / n
            a[r][1] += _harmonic(n) / n
            a[r][2] += n == 1
        truth.append({"id": _mention_id(m), "split": m["split"], "mode": m["mode"],
                      "name_kind": m["name_kind"], "cue_words": m["cue_words"],
                      "distractor_words": m["distractor_words"], "image_kind": m["image_kind"],
                      "set_sizes": {r: len(sets[r]) for r in readers}})
    for split in ("train", "dev", "test"):
        a = acc.get(split)
        if a is None:
            continue
        n = a["n"]
        splits[split] = {"mentions": n, "modes": dict(sorted(a["modes"].items())),
                         "name_kinds": dict(sorted(a["name_kinds"].items()))}
        for r in readers:
            splits[split][r] = {"h1": round(a[r][0] / n, 6), "mrr": round(a[r][1] / n, 6),
                                "resolved_share": round(a[r][2] / n, 6)}
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


def _render(kind: str, identity, seed_key: str, size: int) -> bytes:
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
    if identity is not None:
        sa, ca, sb, cb, layout = identity
        r = 0.2 * size * scale
        off = 0.22 * size
        c = size / 2
        if LAYOUTS[layout] == "horizontal":
            pa, pb = (c - off, c), (c + off, c)
        else:
            pa, pb = (c, c - off), (c, c + off)
        _draw_shape(draw, sa, pa[0] + dx, pa[1] + dy, r, COLOURS[ca])
        _draw_shape(draw, sb, pb[0] + dx, pb[1] + dy, r, COLOURS[cb])
    if kind != "kb":
        # Small distractors: a quarter of the identity size or less, so they cannot be mistaken
        # for an identity shape, but they use the same colours, so colour alone is not enough.
        n = rng.randint(2, 5) if identity is None else rng.randint(1, 3)
        for _ in range(n):
            rr = rng.uniform(0.04, 0.07) * size
            _draw_shape(draw, rng.randrange(len(SHAPES)), rng.uniform(0, size), rng.uniform(0, size), rr,
                        COLOURS[rng.randrange(len(COLOURS))])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _render_chunk(args) -> int:
    out_dir, size, tasks = args
    for rel, kind, identity, seed_key in tasks:
        data = _render(kind, identity, seed_key, size)
        with open(os.path.join(out_dir, rel), "wb") as f:
            f.write(data)
    return len(tasks)


def image_tasks(world: dict) -> list[tuple]:
    seed = world["seed"]
    tasks = []
    for e in world["entities"]:
        for name, idx in zip(e["image_list"], e["image_index"]):
            tasks.append((f"kb_image/{name}", "kb", e["identity"], f"{seed}:kb:{idx}"))
    entities = world["entities"]
    for m in world["mentions"]:
        if m["image_kind"] == "none":
            continue
        stem = os.path.basename(m["imgPath"]).split(".", 1)[0]
        identity = entities[m["gold"]]["identity"] if m["image_kind"] == "identity" else None
        tasks.append((f"mention_image/{stem}.jpg", "mention", identity, f"{seed}:mention:{m['index']}"))
    return tasks


def render_images(tasks: list[tuple], out_dir: Path, size: int, workers: int, progress: bool) -> None:
    chunk = 500
    chunks = [(str(out_dir), size, tasks[i:i + chunk]) for i in range(0, len(tasks), chunk)]
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


def generate(out_dir, entities: int, mentions: int, seed: int = 0, image_size: int = 64,
             workers: int | None = None, progress: bool = False) -> dict:
    """Write the world into ``out_dir``; return the ceilings dict (also written to ceilings.json)."""
    out = Path(out_dir)
    (out / "kb_image").mkdir(parents=True, exist_ok=True)
    (out / "mention_image").mkdir(parents=True, exist_ok=True)
    world = build_world(entities, mentions, seed)

    kb = [{"id": e["id"], "qid": e["qid"], "type": "person", "entity_name": quote(e["name"]),
           "attr": e["attr"], "image_list": e["image_list"]} for e in world["entities"]]
    _dump(out / "kb_entity.json", kb)
    _dump(out / "qid2id.json", {e["qid"]: e["id"] for e in world["entities"]})
    entities_ = world["entities"]
    for split in ("train", "dev", "test"):
        rows = [{"id": _mention_id(m), "mentions": quote(m["surface"]), "sentence": m["sentence"],
                 "imgPath": m["imgPath"], "answer": entities_[m["gold"]]["qid"]}
                for m in world["mentions"] if m["split"] == split]
        _dump(out / f"{DATASET_NAME}_{split}.json", rows)

    ceil = compute_ceilings(world)
    ceilings = {
        "world": {"generator": "datasets_scripts/make_synthetic.py", "generator_version": GENERATOR_VERSION,
                  "entities": entities, "mentions": mentions, "seed": seed, "image_size": image_size,
                  "kb_images": world["kb_image_count"],
                  "entities_without_image": sum(1 for e in entities_ if not e["image_list"]),
                  "license": "cc0-1.0"},
        "definitions": {
            "h1": "expected H@1 of a perfect reader with random tie-breaking: mean of 1/|set|",
            "mrr": "expected MRR under random tie-breaking: mean of H_n/n, n=|set|",
            "resolved_share": "share of mentions whose set holds only the gold entity",
            "name_only": "surface only", "text_only": "surface + sentence",
            "image_only": "surface + mention image", "both": "surface + sentence + mention image",
        },
        "splits": ceil["splits"],
    }
    _dump(out / "ceilings.json", ceilings)
    _dump(out / "synth_truth.json", ceil["truth"])

    render_images(image_tasks(world), out, image_size, workers or os.cpu_count() or 1, progress)
    return ceilings


def _format_ceilings(ceilings: dict) -> str:
    lines = [f"{'split':6} {'n':>6}  " + "  ".join(f"{r:>19}" for r in ("name_only", "text_only",
                                                                          "image_only", "both"))]
    lines.append(f"{'':6} {'':>6}  " + "  ".join(f"{'H@1':>9} {'MRR':>9}" for _ in range(4)))
    for split, s in ceilings["splits"].items():
        lines.append(f"{split:6} {s['mentions']:>6}  " + "  ".join(
            f"{s[r]['h1']:>9.4f} {s[r]['mrr']:>9.4f}" for r in ("name_only", "text_only", "image_only", "both")))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--entities", type=int, default=3000)
    p.add_argument("--mentions", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="processes drawing pictures (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    ceilings = generate(a.out_dir, a.entities, a.mentions, a.seed, a.image_size, a.workers,
                        progress=not a.no_progress)
    print(_format_ceilings(ceilings))
    print(f"wrote {a.out_dir} ({a.entities} entities, {a.mentions} mentions, "
          f"{ceilings['world']['kb_images']} KB pictures) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
