"""Pseudo-mentions made from the KB, identity-keeping picture augmentation and word dropout (augmentation_otmel, and
their wiring in run_mel.MELCollator / the run_mel arguments)."""

import io

import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from augmentation_otmel import augment_pictures, drop_words, pseudo_mention
from modeling_otmel import OTMELModel
from processing_otmel import OTMELProcessor
from run_mel import MELCollator, UsageError, check_arguments, parse_arguments


MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
NAMES = ["Ana Lopez", "Bo Kim", "Cy Dunn", "Ed Fox", "Flo", "Gus Hale"]


def _png(colour, size=8):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def test_pseudo_mention_is_made_of_the_entity_text():
    name, description = "Ana Maria Lopez", "Ana Maria Lopez is a pilot. She lives in Quito."
    surfaces = set()
    for seed in range(60):
        surface, sentence = pseudo_mention(name, description, "Bo Kim spoke on Monday.", "Bo Kim", _generator(seed))
        surfaces.add(surface)
        words = sentence.split()
        assert surface in sentence
        assert "Bo" not in words and "Kim" not in words  # the context mention's own name never leaks in
        hidden = set(name.split()) - set(surface.split())
        assert not hidden & {w.strip(".") for w in words}  # name words the surface leaves out are not given
        assert set(words) <= set(f"{surface} {description} spoke on Monday.".split())
    assert surfaces == {"Ana Maria Lopez", "Ana", "Maria", "Lopez"}
    # Seeded: the same draw twice; a one-word name is always the surface.
    assert pseudo_mention(name, description, "x y z", None, _generator(3)) == pseudo_mention(
        name, description, "x y z", None, _generator(3)
    )
    assert all(pseudo_mention("Flo", "Flo sings.", None, None, _generator(s))[0] == "Flo" for s in range(10))
    assert pseudo_mention(None, None, None, None, _generator(0)) == ("", "")


def test_pseudo_mention_leaves_out_what_the_context_says_of_its_own_entity():
    name, description = "Ana Lopez", "Ana Lopez is a pilot. She lives in Quito."
    context = "On Monday Bo, a pilot working for Acme in Lima, spoke."
    seen = set()
    for seed in range(60):
        _, sentence = pseudo_mention(
            name, description, context, "Bo", _generator(seed), context_entity="Bo Kim is a pilot at Acme in Lima."
        )
        words = {w.strip(".,") for w in sentence.split()}
        assert not words & {"Bo", "Kim", "Acme", "Lima"}  # the context entity's own cues never leak in
        seen |= words
    assert {"On", "Monday", "spoke"} <= seen  # the rest of the context is still used
    assert "pilot" in seen  # a word both entities' descriptions hold may stay


def test_drop_words():
    sentence = "one two three four five six seven eight"
    assert drop_words(sentence, 0.0) == sentence
    kept = [drop_words(sentence, 0.5, _generator(s)).split() for s in range(50)]
    assert all(1 <= len(k) < 8 or k == sentence.split() for k in kept)
    assert all(k == [w for w in sentence.split() if w in k] for k in kept)  # order kept
    assert 2 < sum(len(k) for k in kept) / 50 < 6
    assert len(drop_words("alone", 0.99, _generator(0)).split()) == 1
    assert drop_words(None, 0.5) == ""


def test_augment_pictures_keeps_shape_and_is_seeded():
    pictures = torch.randn(6, 3, 16, 16)
    before = pictures.clone()
    a = augment_pictures(pictures, MEAN, STD, _generator(1))
    assert a.shape == pictures.shape and a.dtype == pictures.dtype
    assert torch.equal(pictures, before)  # the input is not changed
    assert torch.equal(a, augment_pictures(pictures, MEAN, STD, _generator(1)))
    assert not torch.equal(a, augment_pictures(pictures, MEAN, STD, _generator(2)))
    assert all(not torch.allclose(a[i], pictures[i]) for i in range(6))
    # Values stay those of a picture: in [0, 1] once the normalisation is undone.
    raw = a * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # Only the rows asked for change.
    rows = torch.tensor([True, False, True, False, False, True])
    b = augment_pictures(pictures, MEAN, STD, _generator(1), rows=rows)
    assert torch.equal(b[~rows], pictures[~rows]) and not torch.allclose(b[rows], pictures[rows])
    assert torch.equal(augment_pictures(pictures, MEAN, STD, rows=torch.zeros(6, dtype=torch.bool)), pictures)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        augment_pictures(torch.zeros(3, 16, 16), MEAN, STD)


def test_augment_pictures_keeps_what_a_flat_picture_shows():
    """A flat picture stays flat (geometry, blur and compression move nothing), and its grey level stays one grey
    level whatever the colour changes do."""
    grey = torch.full((40, 3, 8, 8), 0.5)
    flat = (grey - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = augment_pictures(flat, MEAN, STD, _generator(0))
    raw = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    spread = raw.flatten(2).amax(2) - raw.flatten(2).amin(2)
    assert spread.max() < 0.03  # JPEG may move a flat picture by a level or two
    channels = raw.mean((2, 3))
    assert (channels.amax(1) - channels.amin(1)).max() < 0.03  # grey stays grey (hue and channel order move nothing)


@pytest.fixture
def kb():
    rows = {
        "qid": [f"Q{i}" for i in range(len(NAMES))],
        "name": NAMES,
        "attributes": [
            f"{n} works as a {job}." for n, job in zip(NAMES, ["pilot", "cook", "judge", "poet", "dj", "vet"])
        ],
        "image": [_png((40 * i, 100, 200 - 30 * i)) if i % 2 == 0 else None for i in range(len(NAMES))],
    }
    return Dataset.from_dict(rows).cast_column("image", ImageFeature(decode=False))


@pytest.fixture
def make_collator(tiny_clip_dir, kb):
    image_processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    processor = OTMELProcessor(image_processor, AutoTokenizer.from_pretrained(tiny_clip_dir), max_text_length=24)
    qids = {q: i for i, q in enumerate(kb["qid"])}
    return lambda **kw: MELCollator(processor, kb, qids, **kw)


def _mentions():
    return [
        {"mention": "Ana", "sentence": "Ana flew to Lima.", "image": _png((0, 100, 200)), "answer": "Q0"},
        {"mention": "Bo Kim", "sentence": "Bo Kim cooked dinner.", "image": None, "answer": "Q1"},
        {"mention": "Cy", "sentence": "Cy ruled on Monday.", "image": _png((80, 100, 140)), "answer": "Q2"},
        {"mention": "Ed Fox", "sentence": "Ed Fox read a poem.", "image": _png((120, 100, 110)), "answer": "Q3"},
    ]


def test_collator_adds_pseudo_mentions_with_their_entity_as_gold(make_collator, kb):
    plain = make_collator()(_mentions())
    torch.manual_seed(0)
    batch = make_collator(pseudo_mentions=0.5)(_mentions())
    ids = batch["entity_ids"].tolist()
    assert len(ids) == 6 and ids[:4] == [0, 1, 2, 3]
    for key in ("input_ids", "attention_mask", "pixel_values", "has_image"):
        assert batch[f"mention_{key}"].shape[0] == 6 and batch[f"entity_{key}"].shape[0] == 6
    # The real rows are untouched (same text and pictures as without pseudo-mentions).
    width = plain["mention_input_ids"].shape[1]
    assert torch.equal(batch["mention_input_ids"][:4, :width], plain["mention_input_ids"])
    assert torch.equal(batch["mention_pixel_values"][:4], plain["mention_pixel_values"])
    # A pseudo-mention's entity column is that KB entity; its text holds words of the entity's name.
    tokenizer = make_collator().processor.tokenizer
    for row in (4, 5):
        entity = ids[row]
        text = tokenizer.decode(batch["mention_input_ids"][row], skip_special_tokens=True).lower().replace(" ", "")
        assert any(w.lower() in text for w in NAMES[entity].split())
        # A picture only where the entity has one, and then not the KB picture itself (augmented).
        if batch["mention_has_image"][row]:
            assert kb[entity]["image"] is not None
            assert not torch.allclose(batch["mention_pixel_values"][row], batch["entity_pixel_values"][row])
    # Seeded by the global torch state: the same batch twice.
    torch.manual_seed(0)
    again = make_collator(pseudo_mentions=0.5)(_mentions())
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    # 3 of 4 real mentions show a picture: about 3/4 of the pseudo-mentions of entities with one do too.
    torch.manual_seed(1)
    many = make_collator(pseudo_mentions=25)(_mentions())
    with_picture = torch.tensor([kb[i]["image"] is not None for i in many["entity_ids"][4:].tolist()])
    share = many["mention_has_image"][4:][with_picture].float().mean()
    assert 0.6 < share < 0.9
    assert not many["mention_has_image"][4:][~with_picture].any()
    with pytest.raises(ValueError, match="pseudo_mentions"):
        make_collator(pseudo_mentions=-1)


def test_collator_augments_and_drops_words_only_when_asked(make_collator):
    plain = make_collator()(_mentions())
    torch.manual_seed(0)
    mentions_only = make_collator(augment="mention")(_mentions())
    has = plain["mention_has_image"]
    assert torch.equal(mentions_only["mention_has_image"], has)
    assert not torch.allclose(mentions_only["mention_pixel_values"][has], plain["mention_pixel_values"][has])
    assert torch.equal(mentions_only["mention_pixel_values"][~has], plain["mention_pixel_values"][~has])
    assert torch.equal(mentions_only["entity_pixel_values"], plain["entity_pixel_values"])
    both = make_collator(augment="both")(_mentions())
    e_has = plain["entity_has_image"]
    assert not torch.allclose(both["entity_pixel_values"][e_has], plain["entity_pixel_values"][e_has])
    dropped = make_collator(word_dropout=0.6)(_mentions())
    assert dropped["mention_attention_mask"].sum() < plain["mention_attention_mask"].sum()
    assert torch.equal(dropped["entity_input_ids"], plain["entity_input_ids"])
    with pytest.raises(ValueError, match="augment_pictures"):
        make_collator(augment="rotate")
    with pytest.raises(ValueError, match="word_dropout"):
        make_collator(word_dropout=1.0)


def test_model_trains_on_a_batch_with_pseudo_mentions(tiny_clip_dir, make_collator):
    model = OTMELModel.from_clip(tiny_clip_dir, hidden_size=16, pairwise_negatives=2)
    model.train()
    batch = make_collator(pseudo_mentions=1.0, augment="mention", word_dropout=0.1)(_mentions())
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--pseudo_mentions", "-0.5", "pseudo_mentions"),
        ("--augment_pictures", "rotate", "augment_pictures"),
        ("--word_dropout", "1", "word_dropout"),
        ("--kb_negatives", "-1", "kb_negatives"),
    ],
)
def test_run_mel_refuses_bad_values(tmp_path, flag, value, message):
    model_args, data_args, args, given, _ = parse_arguments(
        ["--dataset_name", "x", "--output_dir", str(tmp_path), "--do_train", flag, value]
    )
    with pytest.raises(UsageError, match=message):
        check_arguments(model_args, data_args, args, given)


def test_seeded_collator_draws_from_the_batch_not_the_global_state(make_collator):
    """With a seed (run_mel passes the run's), a batch's pseudo-mentions, augmentations and dropped words depend on the
    seed and the batch's mentions only, not on what the global random state went through (a resumed run collates a
    batch from another global state than the uninterrupted one)."""
    make = lambda seed: make_collator(pseudo_mentions=1.0, augment="both", word_dropout=0.3, seed=seed)  # noqa: E731
    torch.manual_seed(0)
    a = make(7)(_mentions())
    torch.manual_seed(123)
    b = make(7)(_mentions())
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = make(8)(_mentions())
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].shape == c[k].shape)
    d = make(7)(_mentions()[::-1])  # other mentions (here, order): other draws
    assert not torch.equal(a["entity_ids"][4:], d["entity_ids"][4:])
