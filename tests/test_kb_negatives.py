"""Negatives mined from the KB (run_mel.MELCollator kb_negatives): which entities join the batch, and how the loss
treats a mined column that holds a mention's own gold entity."""

import io

import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from modeling_otmel import OTMELModel
from processing_otmel import OTMELProcessor
from run_mel import MELCollator


NAMES = ["Ana Lopez", "Ana Lopez", "Ana Kim", "Bo Lopez", "Cy Dunn", "Cy Dunn", "Ed Fox", "Ana Dunn"]


def _png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.fixture
def kb():
    rows = {
        "qid": [f"Q{i}" for i in range(len(NAMES))],
        "name": NAMES,
        "attributes": [f"attribute {i}" for i in range(len(NAMES))],
        "image": [_png((30 * i, 0, 0)) if i % 3 else None for i in range(len(NAMES))],
    }
    return Dataset.from_dict(rows).cast_column("image", ImageFeature(decode=False))


@pytest.fixture
def collator(tiny_clip_dir, kb):
    image_processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    processor = OTMELProcessor(image_processor, AutoTokenizer.from_pretrained(tiny_clip_dir), max_text_length=16)
    return lambda n: MELCollator(processor, kb, {q: i for i, q in enumerate(kb["qid"])}, kb_negatives=n)


def _mention(surface, answer):
    return {"mention": surface, "sentence": f"{surface} was there.", "image": None, "answer": answer}


def test_mined_negatives_are_namesakes_then_partial_then_any(collator):
    c = collator(2)
    for _ in range(20):
        # Full name "Ana Lopez": the only other entity with both words is row 1, then one sharing a word.
        rows = c.mine_negatives(["Ana Lopez"], [0])
        assert rows[0] == 1 and rows[1] in (2, 3, 7)
        # One word: two of the three other "Ana"s, never the gold row.
        rows = c.mine_negatives(["ana"], [2])
        assert len(set(rows)) == 2 and set(rows) <= {0, 1, 7}
        # A surface no name holds: any other entity.
        rows = c.mine_negatives(["Zed"], [6])
        assert len(rows) == 2 and 6 not in rows and all(0 <= r < len(NAMES) for r in rows)


def test_batch_holds_mined_columns_with_their_ids(collator, kb):
    c = collator(2)
    batch = c([_mention("Cy Dunn", "Q4"), _mention("Ed", "Q6"), _mention("Ana", "Q0")])
    ids = batch["entity_ids"].tolist()
    assert len(ids) == 3 * 3 and ids[:3] == [4, 6, 0]  # gold rows first, then 2 mined per mention in order
    assert ids[3] == 5 and ids[4] in (0, 7)  # "Cy Dunn": its namesake, then one sharing "Dunn"
    assert 6 not in ids[5:7]  # "Ed" has no namesake: any other entity
    assert set(ids[7:9]) <= {1, 2, 7}
    for key in ("input_ids", "attention_mask", "pixel_values", "has_image"):
        assert batch[f"entity_{key}"].shape[0] == 9
    assert batch["entity_has_image"].tolist() == [bool(kb[i]["image"]) for i in ids]
    assert collator(0)([_mention("Ed", "Q6")])["entity_ids"].tolist() == [6]
    with pytest.raises(ValueError, match="kb_negatives"):
        collator(-1)


def test_mined_column_holding_the_gold_entity_is_masked(tiny_clip_dir, collator):
    """A mined column can hold another copy of a mention's gold entity (a KB with duplicate rows, or another mention's
    gold): the loss masks a column by `entity_ids`, so the gold entity is never its own negative."""
    model = OTMELModel.from_clip(tiny_clip_dir, hidden_size=16, pairwise_negatives=2)
    model.train()
    batch = collator(1)([_mention("Cy Dunn", "Q4"), _mention("Ana Lopez", "Q0"), _mention("Bo", "Q3")])
    ids = batch["entity_ids"].clone()
    # Make mention 0's mined column a copy of its gold entity: same KB id, and the same inputs.
    for key in ("input_ids", "attention_mask", "pixel_values", "has_image"):
        batch[f"entity_{key}"][3] = batch[f"entity_{key}"][0]
    batch["entity_ids"] = ids.clone()
    batch["entity_ids"][3] = ids[0]
    out = model(**batch, output_features=True)
    assert torch.isfinite(out.loss)
    assert 3 not in out.candidate_indices[0, 1:].tolist()  # never a hard negative of its own mention
    # Mention 0's InfoNCE term ignores the masked column: the same with the column dropped...
    fusion = out.mention_features.fused @ out.entity_features.fused.T  # (3, 6)
    masked = model.contrastive_loss(fusion[:1], batch["entity_ids"])
    keep = [0, 1, 2, 4, 5]
    assert torch.allclose(masked, model.contrastive_loss(fusion[:1, keep], batch["entity_ids"][keep]), atol=1e-6)
    # ...whereas the same column under another id is a (very hard) negative, and raises it.
    other = batch["entity_ids"].clone()
    other[3] = 99
    plain = torch.nn.functional.cross_entropy(model.logit_scale.exp() * fusion[:1], torch.tensor([0]))
    assert torch.allclose(model.contrastive_loss(fusion[:1], other), plain) and plain > masked + 1e-3
    # Mentions 1 and 2 keep it as a negative.
    assert torch.allclose(
        model.contrastive_loss(fusion[1:], batch["entity_ids"], offset=1),
        model.contrastive_loss(fusion[1:], other, offset=1),
    )
