#!/usr/bin/env python
"""Train and evaluate OT-MEL on a multimodal entity linking dataset, ranking every mention against the whole KB.

    python run_mel.py --dataset_name DATA --output_dir OUT --do_train --do_eval --do_predict

DATA is a dataset on the Hub, a folder made by `datasets_scripts/convert_mimic.py`, or a raw folder in the MIMIC
layout (WikiMEL, RichpediaMEL, WikiDiverse, or `datasets_scripts/make_synthetic.py`), converted on the fly into a
cache keyed by the folder's content. With neither `--model_name_or_path` (an OT-MEL checkpoint) nor `--clip_model`
(any CLIP checkpoint, e.g. openai/clip-vit-base-patch32), a tiny CLIP is built offline, its tokenizer trained on the KB
and training text only; the default training arguments are the schedule of that tiny model (see README).
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

import datasets
import torch
import transformers
from datasets import Image as ImageFeature
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from augmentation_otmel import AUGMENT_CHOICES, augment_pictures, drop_words, pseudo_mention
from configuration_otmel import PAPER_MODELS, OTMELConfig
from index_otmel import encode_kb
from metrics_otmel import choose_nil_threshold, is_nil_answer, nil_metrics
from modeling_otmel import LOSS_TERMS, OTMELModel
from processing_otmel import OTMELProcessor
from ranking_otmel import STRATEGIES, RankOptions, evaluation_metrics, rank_mentions


logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """A problem with the command line or with the data it names. Run as a script, run_mel.py prints the message and
    exits with status 2, without a traceback."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "An OT-MEL checkpoint (local or Hub)."})
    clip_model: str | None = field(default=None, metadata={"help": "A CLIP checkpoint to start a new OT-MEL from."})
    mode: str = field(
        default="ot",
        metadata={
            "help": "The paper's model to train: " + " | ".join(PAPER_MODELS) + ".",
            "choices": list(PAPER_MODELS),
        },
    )
    fusion_assignment: str | None = field(default=None, metadata={"help": "ot | attention | off (ablations F1, F2)."})
    unimodal_assignment: str | None = field(default=None, metadata={"help": "ot | attention | off (M1, M2)."})
    pooling: str | None = field(default=None, metadata={"help": "softpool | mean | max (O1, O2)."})
    distillation: str | None = field(default=None, metadata={"help": "off | kl | mse | row_kl (K1, K2)."})
    inference_assignment: str | None = field(default=None, metadata={"help": "ot | attention."})
    hidden_size: int | None = field(default=None, metadata={"help": "Assignment space size (paper: 96)."})
    pairwise_negatives: int | None = field(
        default=15, metadata={"help": "Hard in-batch negatives scored pairwise (0: all, the paper)."}
    )
    ot_epsilon: float | None = None
    sinkhorn_iterations: int | None = None
    sinkhorn_tolerance: float | None = None
    logit_scale_init: float | None = None
    kd_weight: float | None = None
    retrieval_loss_weight: float | None = None
    tiny_hidden_size: int = field(default=64, metadata={"help": "Offline tiny CLIP: hidden size."})
    tiny_layers: int = field(default=2, metadata={"help": "Offline tiny CLIP: layers per tower."})
    tiny_image_size: int = field(default=64, metadata={"help": "Offline tiny CLIP: image size."})
    tiny_patch_size: int = field(default=16, metadata={"help": "Offline tiny CLIP: patch size."})
    tiny_vocab_size: int = field(default=4000, metadata={"help": "Offline tiny CLIP: tokenizer vocabulary."})
    allow_untrained: bool = field(
        default=False,
        metadata={
            "help": "Let --do_eval / --do_predict rank with a model that was never trained (neither "
            "--model_name_or_path nor --do_train): random OT-MEL weights, a baseline only."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, converted dataset folder, or raw MIMIC-layout folder (mentions and KB). "
            "Or give your own files: --train_file / --validation_file / --test_file and --kb."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training mentions: a CSV, TSV, JSONL, JSON or Parquet file with columns mention, sentence, "
            "image (path relative to the file), answer (gold qid), id (optional). See data_otmel.py."
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation mentions (as --train_file)."})
    test_file: str | None = field(default=None, metadata={"help": "Test mentions (as --train_file)."})
    kb: str | None = field(
        default=None,
        metadata={
            "help": "The KB: a CSV, TSV, JSONL, JSON or Parquet file (columns qid, name, attributes, image: "
            "paths relative to the file, several separated by ';'), a dataset folder or Hub id with a 'kb' "
            "config, or a raw MIMIC-layout folder. Default: the KB of --dataset_name."
        },
    )
    kb_columns: str | None = field(
        default=None,
        metadata={"help": "Map the KB's column names: qid=id,name=title,attributes=description,image=image_path."},
    )
    mention_columns: str | None = field(
        default=None,
        metadata={"help": "Map the mention files' column names: mention=text,sentence=context,answer=gold_id,..."},
    )
    max_text_length: int | None = field(default=None, metadata={"help": "Token budget per text (paper: 40)."})
    data_cache_dir: str | None = field(default=None, metadata={"help": "Where raw folders are converted to."})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_predict_samples: int | None = None
    strategy: str = field(
        default="two_stage",
        metadata={
            "help": "two_stage (rank all entities by S_R, re-rank the top candidates with S_O) or exhaustive "
            "(S_O for every mention-entity pair: the paper's protocol, slow on a large KB)."
        },
    )
    candidates: int = field(default=50, metadata={"help": "Two-stage: entities re-ranked with the full S_O."})
    predict_top_k: int = field(default=10, metadata={"help": "Entities written per mention by --do_predict."})
    kb_batch_size: int = field(default=256, metadata={"help": "Batch size for encoding the KB and mentions."})


@dataclass
class OTMELTrainingArguments(TrainingArguments):
    """TrainingArguments whose defaults are the schedule of the offline tiny model on a few thousand mentions."""

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints, metrics and the model go."})
    per_device_train_batch_size: int = 128
    per_device_eval_batch_size: int = 256
    # 3e-3: on the hard world (20 epochs, OT, mean of 3 seeds) test H@1 75.04 against 73.44 at 2e-3, same budget; the
    # 20-epoch schedule ended with validation still rising at 1e-3 and 2e-3 (docs/benchmarks.md, "Pictures / hard worlds").
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    # 20, not 30, since pseudo-mentions made each step about 3x dearer: on the hard world (4,200 training mentions) 20
    # epochs trained in 9.7 min alone on 2 cores (30 would take about 16, over the 15-minute budget) with validation
    # H@1 69.0 at the end (docs/benchmarks.md, "Pictures / hard worlds").
    num_train_epochs: float = 20.0
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 30
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    save_total_limit: int | None = 2
    load_best_model_at_end: bool = True
    metric_for_best_model: str | None = "mrr"
    greater_is_better: bool | None = True
    logging_steps: float = 10
    remove_unused_columns: bool = False
    dataloader_drop_last: bool = True
    eval_every_epochs: int = field(default=5, metadata={"help": "With eval_strategy=epoch: evaluate every N epochs."})
    kb_negatives: int = field(
        default=0,
        metadata={
            "help": "Per training mention, this many namesakes of its gold entity drawn from the KB join the batch "
            "as extra negatives (MELCollator), so that words alone cannot tell the batch's entities apart."
        },
    )
    pseudo_mentions: float = field(
        default=1.0,
        metadata={
            "help": "Per training mention, this many pseudo-mentions made from KB entities join each batch "
            "(MELCollator): an entity's full name or one word of it, some words of its description, its KB picture "
            "augmented; gold = that entity. Teaches the name part + attribute rule for every KB entity; 0 turns it "
            "off (each step then costs about half). Default 1: +7.9 H@1 on the hard synthetic world (docs/benchmarks.md)."
        },
    )
    augment_pictures: str = field(
        default="none",
        metadata={
            "help": "Identity-keeping augmentation of training pictures (scale, position, rotation, colour, hue, "
            "channel order, greyscale, blur, JPEG): none | mention (the mentions') | both (mentions' and entities'). "
            "Pseudo-mentions' pictures are always augmented."
        },
    )
    word_dropout: float = field(
        default=0.0,
        metadata={"help": "Each word of a training mention's sentence is dropped with this probability."},
    )
    # TrainingArguments 5.x has no overwrite_output_dir: without it, --do_train resumes a run found in --output_dir.
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start training afresh in an --output_dir that holds checkpoints of another run (they are "
            "deleted) instead of resuming (the default when the run's settings match) or refusing (otherwise)."
        },
    )


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def load_mel_dataset(
    name: str | None = None,
    cache_dir: str | None = None,
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    kb: str | None = None,
    kb_columns: str | None = None,
    mention_columns: str | None = None,
) -> tuple[datasets.DatasetDict, datasets.Dataset, str]:
    """Returns `(mention splits, KB, path)`.

    Mentions come from the files (`train_file`, `validation_file`, `test_file`: CSV, TSV, JSONL, JSON or Parquet, see
    `data_otmel`) when any is given, else from the `mentions` config of `name` (a Hub id, a converted dataset folder, or
    a raw MIMIC-layout folder, converted into `cache_dir`). The KB comes from `kb` (a table file, dataset folder, Hub id
    or MIMIC-layout folder) when given, else from `name`'s `kb` config; `kb_columns` / `mention_columns` map other
    column names. `path` is the dataset's folder or Hub id (the conversion's folder for a raw folder), or the first
    mention file. Raises `data_otmel.DataFormatError` (a `ValueError`) naming the argument, file and line of a problem.
    """
    from data_otmel import DataFormatError, kb_from_dataset, load_dataset_config, load_kb, load_mention_files

    files = {"train": train_file, "validation": validation_file, "test": test_file}
    if not name and not any(files.values()):
        raise DataFormatError(
            "no data: give --dataset_name, or --train_file / --validation_file / --test_file with --kb"
        )
    if any(files.values()) and not name and not kb:
        raise DataFormatError("--train_file / --validation_file / --test_file need --kb (or --dataset_name's KB)")
    path = name
    if name and os.path.isdir(name):
        from datasets_scripts.convert_mimic import cached_convert, is_mimic_layout

        if is_mimic_layout(name):
            cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "otmel", "converted")
            path, _ = cached_convert(name, cache_dir)
            logger.info("Raw MIMIC-layout folder %s is read from its conversion at %s", name, path)
            path = str(path)
    if any(files.values()):
        mentions = load_mention_files(files, columns=mention_columns)
        path = name and path or next(p for p in files.values() if p)
    else:
        mentions = load_dataset_config(path, "mentions")
        if mention_columns:
            raise DataFormatError("--mention_columns applies to --train_file / --validation_file / --test_file only")
    if kb:
        kb_dataset = load_kb(kb, columns=kb_columns, cache_dir=cache_dir)
    else:
        kb_dataset = load_dataset_config(path, "kb")["train"]
        if kb_columns:
            kb_dataset = kb_from_dataset(kb_dataset, kb_columns, where=f"--dataset_name {name}")
    return mentions, kb_dataset, path


def keep_linkable(
    split: datasets.Dataset, qid_to_index: dict, split_name: str, keep_nil: bool = False
) -> datasets.Dataset:
    """The mentions of `split` that can be scored: those whose answer is in the KB and, with `keep_nil` (validation
    and test), those whose answer is NIL (`"nil"` or empty: the entity is not in the KB; `metrics_otmel.is_nil_answer`),
    which NIL evaluation needs.

    Dropped mentions are counted in a warning, never dropped silently: NIL mentions without `keep_nil` (training: the
    in-batch objective needs a gold entity), and answers that are neither NIL nor a qid of the KB (an unknown qid).
    """
    answers = split["answer"]
    keep, nil, unknown = [], [], []
    for i, qid in enumerate(answers):
        if qid in qid_to_index:
            keep.append(i)
        elif is_nil_answer(qid):
            nil.append(i)
            if keep_nil:
                keep.append(i)
        else:
            unknown.append(i)
    if nil and keep_nil:
        logger.info(
            "%s: %d of %d mentions are NIL (entity not in the KB): kept for NIL evaluation",
            split_name,
            len(nil),
            len(answers),
        )
    elif nil:
        logger.warning(
            "%s: %d of %d mentions have a NIL answer (entity not in the KB) and are skipped: training needs a gold "
            "entity",
            split_name,
            len(nil),
            len(answers),
        )
    if unknown:
        logger.warning(
            "%s: %d of %d mentions have an answer absent from the KB (e.g. %r) and are skipped",
            split_name,
            len(unknown),
            len(answers),
            answers[unknown[0]],
        )
    if len(keep) < len(answers):
        split = split.select(keep)
    return split


class MELCollator:
    """Turns mention rows into a batch of mentions with their gold entities (in-batch negatives), plus negatives mined
    from the KB.

    Entity rows `0..B-1` are the gold entities of the B mentions; with `kb_negatives = n > 0`, `B * n` more rows follow:
    for each mention, n *namesakes* of its gold entity drawn at random from the KB (entities whose name holds every
    word of the mention's surface, e.g. everyone called "Maria" for the surface "Maria"; when there are fewer, entities
    whose name shares one of its words; then any entity), so a mention is not only told apart from random entities, whose
    names alone differ, but from the entities its words cannot separate, whose attributes and picture must. The loss
    takes every row as a column (`OTMELModel.forward` with B_e > B_m); `entity_ids` masks a column that holds a mention's
    own gold entity. The draw uses the batch's random source (`batch_generator`, below); the number of rows is fixed
    (`B * (1 + n)`), as gathering across processes needs.

    With `pseudo_mentions = r > 0`, `round(B * r)` *pseudo-mentions* follow the B real mentions: each is made from a KB
    entity drawn at random (any entity, named by a training mention or not) out of its own text
    (`augmentation_otmel.pseudo_mention`: its full name or one word of it, some of its description's words, set in
    words of a real mention of the batch, less that mention's name and the words of its gold entity's name and
    description that the drawn entity's text does not hold), with, as often as the batch's real mentions have one, its
    KB picture augmented (`augment_pictures`), and that entity as gold. `augment = "mention"` also augments the real
    mentions' pictures, `"both"` the entities' pictures too; `word_dropout = p` removes each word of a real mention's
    sentence with probability p. With a `seed` (run_mel passes the run's), every draw of a batch, namesakes included,
    comes from a generator seeded by it and the batch's mentions (`batch_generator`), so a resumed run sees the batches
    of the uninterrupted one; without, from the global torch random state.

    Images stay undecoded in the datasets (`decode=False`) and are decoded here, so a corrupt file becomes "no image".
    Preprocessed pictures are kept (float16) up to `image_cache_mb`: every epoch shows the same pictures again, and
    decoding plus resizing them cost about as much as a training step of the tiny model; augmentations act on the
    preprocessed tensors.
    """

    def __init__(
        self,
        processor,
        kb,
        qid_to_index: dict,
        pad_to_max: bool = False,
        image_cache_mb: int = 1024,
        kb_negatives: int = 0,
        pseudo_mentions: float = 0.0,
        augment: str = "none",
        word_dropout: float = 0.0,
        seed: int | None = None,
    ):
        if kb_negatives < 0:
            raise ValueError(f"--kb_negatives must be >= 0, got {kb_negatives}")
        if not pseudo_mentions >= 0:
            raise ValueError(f"--pseudo_mentions must be >= 0, got {pseudo_mentions}")
        if augment not in AUGMENT_CHOICES:
            raise ValueError(f"--augment_pictures must be one of {', '.join(AUGMENT_CHOICES)}, got {augment!r}")
        if not 0 <= word_dropout < 1:
            raise ValueError(f"--word_dropout must be in [0, 1), got {word_dropout}")
        if pseudo_mentions and len(kb) == 0:
            raise ValueError("--pseudo_mentions needs a KB with at least one entity")
        self.pseudo_mentions = pseudo_mentions
        self.augment = augment
        self.seed = seed
        self.word_dropout = word_dropout
        self.processor = processor
        self.kb = kb
        self.qid_to_index = qid_to_index
        self.padding = "max_length" if pad_to_max else "longest"  # equal shapes on every process, to gather them
        self.cache = {}
        self.cache_bytes_left = image_cache_mb * 2**20
        self.kb_negatives = kb_negatives
        self._by_word = None

    @staticmethod
    def _words(text: str) -> list[str]:
        return [w for w in re.split(r"\W+", text.casefold()) if w]

    def _namesake_index(self) -> dict:
        """`{word: tensor of KB rows whose name holds it}`, built on first use."""
        if self._by_word is None:
            by_word = {}
            for row, name in enumerate(self.kb["name"]):
                for word in set(self._words(name or "")):
                    by_word.setdefault(word, []).append(row)
            self._by_word = {w: torch.tensor(rows) for w, rows in by_word.items()}
        return self._by_word

    def mine_negatives(self, surfaces: list[str], gold: list[int], generator=None) -> list[int]:
        """`len(surfaces) * kb_negatives` KB rows: for each mention in turn, `kb_negatives` namesakes of its gold entity
        (see the class docstring), never the gold row itself (a KB may still hold a duplicate of it; the loss masks it
        by `entity_ids`)."""
        by_word, n, size = self._namesake_index(), self.kb_negatives, len(self.kb)
        empty = torch.empty(0, dtype=torch.long)
        out = []
        for surface, g in zip(surfaces, gold):
            pools = [by_word.get(w, empty) for w in dict.fromkeys(self._words(surface))]
            chosen = []
            if pools:
                every = pools[0]
                for pool in pools[1:]:
                    every = every[torch.isin(every, pool)]
                some = torch.unique(torch.cat(pools))
                for pool in (every, some[~torch.isin(some, every)]):
                    pool = pool[pool != g]
                    if len(chosen) < n and len(pool):
                        take = torch.randperm(len(pool), generator=generator)[: n - len(chosen)]
                        chosen += pool[take].tolist()
            while len(chosen) < n:
                row = int(torch.randint(size, (), generator=generator))
                if row != g or size == 1:
                    chosen.append(row)
            out += chosen
        return out

    def _pixels(self, images: list) -> dict:
        keys = [
            hashlib.blake2b(image["bytes"], digest_size=16).digest() if image and image.get("bytes") else None
            for image in images
        ]
        todo = [i for i, key in enumerate(keys) if key is None or key not in self.cache]
        rows = {}
        if todo:
            fresh = self.processor.process_images([images[i] for i in todo])
            for j, i in enumerate(todo):
                rows[i] = fresh["pixel_values"][j].half() if fresh["has_image"][j] else None
                size = rows[i].numel() * 2 if rows[i] is not None else 0
                if keys[i] is not None and size <= self.cache_bytes_left:
                    self.cache[keys[i]] = rows[i]
                    self.cache_bytes_left -= size
        rows = [rows[i] if i in rows else self.cache[key] for i, key in enumerate(keys)]
        pixel_values = self.processor.process_images([None] * len(images))["pixel_values"]
        for i, pixels in enumerate(rows):
            if pixels is not None:
                pixel_values[i] = pixels.float()
        return {"pixel_values": pixel_values, "has_image": torch.tensor([r is not None for r in rows])}

    def _augmented(self, pixels: dict, rows: torch.Tensor, generator) -> dict:
        rows = rows & pixels["has_image"]
        if bool(rows.any()):
            image_processor = self.processor.image_processor
            pixels["pixel_values"] = augment_pictures(
                pixels["pixel_values"], image_processor.image_mean, image_processor.image_std, generator, rows=rows
            )
        return pixels

    def batch_generator(self, rows: list[dict]) -> torch.Generator | None:
        """With a `seed`, the random source of one batch: seeded by the seed and the batch's mentions, so a resumed
        run draws what the uninterrupted one drew (the DataLoader collates a batch ahead of the checkpoint that the
        Trainer saves its random state with). Without one, None: the global torch random state."""
        if self.seed is None:
            return None
        digest = hashlib.blake2b(str(self.seed).encode(), digest_size=8)
        for r in rows:
            for key in ("id", "mention", "sentence", "answer"):
                digest.update(f"\x1f{r.get(key)}".encode())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))

    def __call__(self, rows: list[dict]) -> dict:
        g = self.batch_generator(rows)
        entity_index = [self.qid_to_index[row["answer"]] for row in rows]
        surfaces = [r["mention"] for r in rows]
        sentences = [r["sentence"] for r in rows]
        if self.word_dropout:
            sentences = [drop_words(s, self.word_dropout, g) for s in sentences]
        n_real, n_pseudo = len(rows), int(round(len(rows) * self.pseudo_mentions))
        if n_pseudo:
            picked = torch.randint(len(self.kb), (n_pseudo,), generator=g).tolist()
            sources = self.kb[picked]
            contexts = torch.randint(n_real, (n_pseudo,), generator=g).tolist()
            context_entities = self.kb[[entity_index[c] for c in contexts]]
            for name, description, c, c_name, c_description in zip(
                sources["name"],
                sources["attributes"],
                contexts,
                context_entities["name"],
                context_entities["attributes"],
            ):
                surface, sentence = pseudo_mention(
                    unquote(name or ""),
                    description,
                    rows[c]["sentence"],
                    surfaces[c],
                    generator=g,
                    context_entity=f"{unquote(c_name or '')} {c_description or ''}",
                )
                surfaces.append(surface)
                sentences.append(sentence)
            entity_index += picked
        if self.kb_negatives:
            entity_index += self.mine_negatives(surfaces, entity_index, generator=g)
        entities = self.kb[entity_index]
        proc = self.processor
        m = proc.process_mentions(surfaces, sentences, padding=self.padding)
        e = proc.process_entities(entities["name"], entities["attributes"], padding=self.padding)
        images = [r["image"] for r in rows]
        if n_pseudo:
            # As often as the real mentions of the batch show a picture, a pseudo-mention shows its entity's.
            share = sum(bool(i and (i.get("bytes") or i.get("path"))) for i in images) / n_real
            show = (torch.rand(n_pseudo, generator=g) < share).tolist()
            images += [image if s else None for image, s in zip(entities["image"][n_real : n_real + n_pseudo], show)]
        m.update(self._pixels(images))
        e.update(self._pixels(entities["image"]))
        if n_pseudo or self.augment != "none":
            mention_rows = torch.arange(n_real + n_pseudo) >= (0 if self.augment != "none" else n_real)
            m = self._augmented(m, mention_rows, g)
            if self.augment == "both":
                e = self._augmented(e, torch.ones(len(entity_index), dtype=torch.bool), g)
        batch = {f"mention_{k}": v for k, v in m.items()}
        batch.update({f"entity_{k}": v for k, v in e.items()})
        batch["entity_ids"] = torch.tensor(entity_index)
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------


class EvaluateEveryEpochs(TrainerCallback):
    """With `eval_strategy="epoch"`, evaluates (and saves) every `every` epochs and at the last one: whole-KB
    evaluation costs seconds, more than an epoch of a small run."""

    def __init__(self, every: int):
        self.every = every

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.every > 1 and control.should_evaluate and args.eval_strategy == "epoch":
            current = round(state.epoch or 0)
            last = current >= math.ceil(args.num_train_epochs) or state.global_step >= state.max_steps
            if current % self.every and not last:
                control.should_evaluate = False
                control.should_save = False
        return control


class OTMELTrainer(Trainer):
    """Trainer with the OT-MEL objective, per-term logging, and whole-KB ranking as evaluation.

    Args (besides the Trainer's):
        kb (`datasets.Dataset`): the KB every evaluation ranks against.
        rank_options ([`RankOptions`]): how evaluation ranks.
        kb_batch_size (`int`): batch size for encoding the KB and the mentions.
    """

    def __init__(self, *args, kb=None, rank_options: RankOptions | None = None, kb_batch_size: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.kb = kb
        self.rank_options = rank_options or RankOptions()
        self.kb_batch_size = kb_batch_size
        self._loss_sums = {}
        self._loss_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, gather_across_processes=self.args.world_size > 1)
        if model.training:
            for key in LOSS_TERMS:
                value = getattr(outputs, key)
                if value is not None:
                    self._loss_sums[key] = self._loss_sums.get(key, 0.0) + value.detach().float().item()
            self._loss_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._loss_count:
            for key, total in self._loss_sums.items():
                logs[key] = round(total / self._loss_count, 4)
            self._loss_sums, self._loss_count = {}, 0
        super().log(logs, start_time)

    def rank_split(self, split: datasets.Dataset, top_k: int | None = None):
        """Ranks every mention of `split` against the whole KB (the paper's protocol), sharded across processes:
        a [`~ranking_otmel.RankResult`] equal to one process's."""
        model = self.accelerator.unwrap_model(self.model)
        processor = self.processing_class
        main = self.is_world_process_zero()
        # Each process encodes its share of the KB once; the shares are gathered on every process.
        index = encode_kb(model, processor, self.kb, batch_size=self.kb_batch_size, progress=main, distributed=True)
        options = RankOptions(**{**self.rank_options.__dict__, "top_k": top_k})
        return rank_mentions(
            model,
            processor,
            index,
            split,
            options,
            gold_qids=list(split["answer"]),
            batch_size=self.kb_batch_size,
            progress=main,
            distributed=True,
        )

    def ranking_metrics(self, result, prefix: str, answers: list | None = None) -> dict:
        """`{prefix}_hits@k`, `_mrr`, `_stage1_recall@k` of `result`. With `answers` (the gold qids), NIL mentions
        (`metrics_otmel.is_nil_answer`) are left out of these, and when there are any or the model has a
        `nil_threshold`, NIL prediction at that threshold is measured (`metrics_otmel.nil_metrics`: `_nil_precision`,
        `_nil_recall`, `_nil_f1`, `_nil_accuracy`, `_inkb_hits@1`, counts, and `_nil_threshold` when set)."""
        is_nil = torch.tensor([is_nil_answer(a) for a in answers], dtype=torch.bool) if answers is not None else None
        threshold = getattr(self.accelerator.unwrap_model(self.model).config, "nil_threshold", None)
        if is_nil is not None and bool(is_nil.any()):
            in_kb = (~is_nil).nonzero().flatten()
            metrics = evaluation_metrics(type(result)(*(f[in_kb] if f is not None else None for f in result)))
        else:
            metrics = evaluation_metrics(result)
        if is_nil is not None and (bool(is_nil.any()) or threshold is not None):
            metrics.update(nil_metrics(result.scores[:, 0], is_nil, result.gold_ranks == 1, threshold))
            if threshold is not None:
                metrics["nil_threshold"] = threshold
        if self.rank_options.strategy != "two_stage":  # stage 1 is not part of exhaustive ranking
            metrics = {k: v for k, v in metrics.items() if not k.startswith("stage1_")}
        return {f"{prefix}_{k}": v for k, v in metrics.items()}

    def choose_nil_threshold(self, split: datasets.Dataset | None):
        """Sets the model's `config.nil_threshold` from `split` (the validation mentions): the threshold on the best
        S_O that maximises NIL-aware accuracy (`metrics_otmel.choose_nil_threshold`); None (NIL prediction off) when
        there is no split, the split has no NIL mention or no threshold helps. Logs the choice; the split's ranking is
        kept for the next [`~OTMELTrainer.evaluate`] of the same split. Returns the threshold."""
        config = self.accelerator.unwrap_model(self.model).config
        is_nil = [is_nil_answer(a) for a in split["answer"]] if split is not None else []
        if not any(is_nil):
            config.nil_threshold = None
            why = "has no NIL mention" if split is not None else "is not used in this run"
            logger.info(
                "The validation split %s: no NIL threshold is chosen (nil_threshold=None: the model always "
                "answers its best entity)",
                why,
            )
            return None
        result = self.rank_split(split)
        top, correct = result.scores[:, 0], result.gold_ranks == 1
        config.nil_threshold = choose_nil_threshold(top, is_nil, correct)
        chosen = nil_metrics(top, is_nil, correct, config.nil_threshold)
        off = nil_metrics(top, is_nil, correct, None)
        logger.info(
            "NIL threshold on the best S_O, chosen on the validation split (%d NIL of %d mentions): %s; NIL-aware "
            "accuracy %.4f (%.4f without NIL answers), NIL precision %.4f, recall %.4f",
            sum(is_nil),
            len(is_nil),
            config.nil_threshold,
            chosen["nil_accuracy"],
            off["nil_accuracy"],
            chosen["nil_precision"],
            chosen["nil_recall"],
        )
        self._kept_ranking = (split._fingerprint, result)
        return config.nil_threshold

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        start = time.time()
        kept, self._kept_ranking = getattr(self, "_kept_ranking", None), None
        reuse = kept is not None and kept[0] == eval_dataset._fingerprint and not self.model.training
        result = kept[1] if reuse else self.rank_split(eval_dataset)
        metrics = self.ranking_metrics(result, metric_key_prefix, answers=list(eval_dataset["answer"]))
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 2)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def create_model_card(self, **kwargs):
        """The card is written by `main` from the run's facts (`model_card.write_model_card`), not the Trainer's."""


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def build_config_overrides(model_args: ModelArguments, data_args: DataArguments) -> dict:
    """The config settings of `--mode` (the paper's model) with every config setting given on the command line."""
    if model_args.mode not in PAPER_MODELS:
        raise ValueError(f"--mode {model_args.mode!r} is invalid; allowed: {', '.join(PAPER_MODELS)}")
    overrides = dict(PAPER_MODELS[model_args.mode][0])
    for args in (model_args, data_args):
        for f in dataclasses.fields(args):
            value = getattr(args, f.name)
            if value is not None and f.name in OTMELConfig.__dataclass_fields__:
                overrides[f.name] = value
    return overrides


def tiny_clip_for(mentions, kb, model_args, seed: int, cache_dir: str) -> str:
    """Builds (once per dataset and settings) the offline tiny CLIP, its tokenizer trained on KB + training text only."""
    from tiny_clip import build_tiny_clip

    key = "-".join(
        str(x)
        for x in (
            training_data_key(mentions, kb),  # a folder rewritten in place gets a tokenizer of its new text
            model_args.tiny_hidden_size,
            model_args.tiny_layers,
            model_args.tiny_image_size,
            model_args.tiny_patch_size,
            model_args.tiny_vocab_size,
            seed,
        )
    )
    path = os.path.join(cache_dir, "tiny_clip", _stable_hash(key))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    texts = [f"{n} {a}" for n, a in zip(kb["name"], kb["attributes"])]
    texts += [f"{m} {s}" for m, s in zip(mentions["train"]["mention"], mentions["train"]["sentence"])]
    tmp = f"{path}.tmp{os.getpid()}"
    build_tiny_clip(
        tmp,
        texts,
        vocab_size=model_args.tiny_vocab_size,
        hidden_size=model_args.tiny_hidden_size,
        num_layers=model_args.tiny_layers,
        image_size=model_args.tiny_image_size,
        patch_size=model_args.tiny_patch_size,
        projection_dim=model_args.tiny_hidden_size,
        seed=seed,
    )
    os.replace(tmp, path)
    return path


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_model_and_processor(model_args, data_args, training_args, mentions, kb):
    overrides = build_config_overrides(model_args, data_args)
    if model_args.model_name_or_path:
        from transformers import AutoConfig, AutoModel, AutoProcessor

        config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
        for key, value in overrides.items():
            setattr(config, key, value)
        config.check_settings()
        model = AutoModel.from_pretrained(model_args.model_name_or_path, config=config, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
        processor.max_text_length = config.max_text_length
        return model, processor, model_args.model_name_or_path
    base = model_args.clip_model
    if base is None:
        cache = data_args.data_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "otmel")
        base = tiny_clip_for(mentions, kb, model_args, training_args.seed, cache)
        logger.info("Using the offline tiny CLIP at %s", base)
        overrides.setdefault("hidden_size", tiny_assignment_size(model_args.tiny_hidden_size))
    # Seeded here, not only at start-up: building the tiny CLIP on a first run draws random numbers a cached run does not.
    set_seed(training_args.seed)
    model = OTMELModel.from_clip(base, **overrides)
    processor = OTMELProcessor(
        AutoImageProcessor.from_pretrained(base),
        AutoTokenizer.from_pretrained(base),
        max_text_length=model.config.max_text_length,
    )
    return model, processor, model_args.clip_model or "offline tiny CLIP (tiny_clip.py)"


# ---------------------------------------------------------------------------------------------------------------
# Arguments and start-up checks
# ---------------------------------------------------------------------------------------------------------------

# Training arguments that change what a run learns: a run found in --output_dir is resumed only if they match.
TRAINING_SETTINGS = (
    "learning_rate",
    "weight_decay",
    "num_train_epochs",
    "max_steps",
    "seed",
    "data_seed",
    "lr_scheduler_type",
    "warmup_steps",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
)
RUN_SETTINGS_NAME = "run_settings.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def _given_arguments(parser: HfArgumentParser, args: list[str] | None) -> dict:
    """The arguments written on the command line, with their parsed values (defaults left out)."""
    defaults = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(args)
    finally:
        for action, default in defaults:
            action.default = default
    return vars(namespace)


def _defaults_following(value, given: dict) -> tuple[dict, list[tuple[int, str]]]:
    """Defaults changed so that none contradicts a setting the user gave: `(new defaults, (log level, note) pairs)`.

    - Without `--do_train`, no evaluation or saving *during training* (the default `eval_strategy="epoch"` would turn
      `--do_eval` on: TrainingArguments does so for any strategy but "no").
    - `--eval_strategy` alone sets `--save_strategy` (and `--eval_steps` `--save_steps`), and the other way round:
      `--load_best_model_at_end` (on by default) needs a checkpoint at every evaluation.
    - `--load_best_model_at_end` (if not given) is turned off where it cannot work: no evaluation, no checkpoint, or
      evaluations and checkpoints the user set apart.
    - `--bf16` without a bf16 GPU runs on the CPU (`--use_cpu true`), which TrainingArguments otherwise refuses.
    - Without a GPU, no pinned memory (`--dataloader_pin_memory false`).
    """
    adjusted, notes = {}, []
    if not value("do_train"):
        for name, off in (("eval_strategy", "no"), ("save_strategy", "no"), ("load_best_model_at_end", False)):
            if name not in given:
                adjusted[name] = off
    else:
        eval_s, save_s = str(value("eval_strategy")), str(value("save_strategy"))
        if "eval_strategy" in given and "save_strategy" not in given and eval_s in ("steps", "epoch"):
            save_s = adjusted["save_strategy"] = eval_s
            notes.append(
                (
                    logging.INFO,
                    f"--save_strategy {save_s}: follows --eval_strategy (a checkpoint at each "
                    "evaluation, which --load_best_model_at_end needs)",
                )
            )
        elif "save_strategy" in given and "eval_strategy" not in given and save_s in ("steps", "epoch"):
            eval_s = adjusted["eval_strategy"] = save_s
            notes.append(
                (
                    logging.INFO,
                    f"--eval_strategy {eval_s}: follows --save_strategy (an evaluation at each "
                    "checkpoint, which --load_best_model_at_end needs)",
                )
            )
        eval_steps, save_steps = value("eval_steps") or value("logging_steps"), value("save_steps")
        if eval_s == save_s == "steps":
            if "save_steps" not in given:
                save_steps = adjusted["save_steps"] = eval_steps
            elif "eval_steps" not in given:
                eval_steps = adjusted["eval_steps"] = save_steps
        if value("load_best_model_at_end") and "load_best_model_at_end" not in given:
            reason, level = None, logging.WARNING
            if eval_s == "no":
                reason, level = "no evaluation during training (--eval_strategy no)", logging.INFO
            elif save_s == "no":
                reason, level = "no checkpoint is saved (--save_strategy no)", logging.INFO
            elif save_s != "best" and eval_s != save_s:
                reason = f"evaluations (--eval_strategy {eval_s}) and checkpoints (--save_strategy {save_s}) differ"
            elif (
                eval_s == "steps"
                and save_s == "steps"
                and min(eval_steps, save_steps) >= 1
                and save_steps % eval_steps
            ):
                reason = f"--save_steps {save_steps} is not a multiple of --eval_steps {eval_steps}"
            if reason:
                adjusted["load_best_model_at_end"] = False
                notes.append((level, f"--load_best_model_at_end false: {reason}; the model kept is the last one"))
    if (value("bf16") or value("bf16_full_eval")) and not value("use_cpu") and "use_cpu" not in given:
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

        if not is_torch_bf16_gpu_available() and not is_torch_xla_available():
            adjusted["use_cpu"] = True
            notes.append((logging.INFO, "--bf16 without a bf16 GPU: running in bfloat16 on the CPU (--use_cpu true)"))
    if "dataloader_pin_memory" not in given and not torch.cuda.is_available():
        adjusted["dataloader_pin_memory"] = False  # nothing to pin for; torch warns at every DataLoader otherwise
    return adjusted, notes


def parse_arguments(argv: list[str] | None = None):
    """Parses the command line (or a single JSON file of settings) into
    `(model_args, data_args, training_args, given, notes)`.

    `given` maps each setting the user wrote (a flag or a JSON key) to its value; the script's defaults follow those
    where they would contradict one (`_defaults_following`). `notes` are `(log level, message)` pairs for `main` to log
    once logging is set up. Errors (a missing `--output_dir`, an unknown flag, TrainingArguments' own checks) raise
    [`UsageError`] or exit through argparse, with status 2.
    """
    parser = HfArgumentParser((ModelArguments, DataArguments, OTMELTrainingArguments))
    args = sys.argv[1:] if argv is None else list(argv)
    json_file = os.path.abspath(args[0]) if len(args) == 1 and args[0].endswith(".json") else None
    if json_file:
        with open(json_file, encoding="utf-8") as f:
            given = json.load(f)
    else:
        given = _given_arguments(parser, args)

    def value(name):
        return given[name] if name in given else parser.get_default(name)

    # TrainingArguments 5.x fills in "trainer_output" for a missing output_dir: the run's outputs would land there.
    if not value("output_dir"):
        parser.error("--output_dir is required: the folder for the checkpoints, metrics, predictions and model")
    adjusted, notes = _defaults_following(value, given)
    try:
        if json_file:
            model_args, data_args, training_args = parser.parse_dict({**adjusted, **given})
        else:
            parser.set_defaults(**adjusted)
            model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=args)
    except ValueError as error:  # an unknown flag or JSON key, or TrainingArguments' own checks
        raise UsageError(str(error)) from None
    return model_args, data_args, training_args, given, notes


def check_arguments(model_args, data_args, training_args, given: dict) -> None:
    """Refuses ([`UsageError`], naming the flags) a command line that would run without doing what it says: nothing to
    do, a value out of range, an invalid model setting, or an evaluation of a model that was never trained. Cheap: runs
    before any data or model is loaded."""
    do_train, do_eval, do_predict = training_args.do_train, training_args.do_eval, training_args.do_predict
    if not (do_train or do_eval or do_predict):
        raise UsageError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    if model_args.mode not in PAPER_MODELS:
        raise UsageError(f"--mode {model_args.mode!r} is invalid; allowed: {', '.join(PAPER_MODELS)}")
    if data_args.strategy not in STRATEGIES:
        raise UsageError(f"--strategy {data_args.strategy!r} is invalid; allowed: {', '.join(STRATEGIES)}")
    at_least_one = {
        "candidates": data_args.candidates,
        "predict_top_k": data_args.predict_top_k,
        "kb_batch_size": data_args.kb_batch_size,
        "per_device_eval_batch_size": training_args.per_device_eval_batch_size,
        "eval_every_epochs": training_args.eval_every_epochs,
        "max_text_length": data_args.max_text_length,
        "max_train_samples": data_args.max_train_samples,
        "max_eval_samples": data_args.max_eval_samples,
        "max_predict_samples": data_args.max_predict_samples,
    }
    if do_train:
        at_least_one["per_device_train_batch_size"] = training_args.per_device_train_batch_size
    for name, number in at_least_one.items():
        if number is not None and number < 1:
            raise UsageError(f"--{name} {number}: must be a positive integer")
    if do_train:
        if training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
            raise UsageError(
                f"--num_train_epochs {training_args.num_train_epochs:g} trains nothing: give a positive "
                "--num_train_epochs or --max_steps"
            )
        if not training_args.learning_rate > 0:
            raise UsageError(f"--learning_rate {training_args.learning_rate}: must be > 0")
        world = max(1, training_args.world_size)
        if training_args.per_device_train_batch_size * world < 2:
            raise UsageError(
                f"--per_device_train_batch_size {training_args.per_device_train_batch_size} on {world} process(es): "
                "training contrasts each mention with the other gold entities of its batch, so a batch needs at "
                "least 2 mentions"
            )
        if training_args.kb_negatives < 0:
            raise UsageError(f"--kb_negatives {training_args.kb_negatives}: must be >= 0")
        if not training_args.pseudo_mentions >= 0:
            raise UsageError(f"--pseudo_mentions {training_args.pseudo_mentions}: must be >= 0")
        if training_args.augment_pictures not in AUGMENT_CHOICES:
            raise UsageError(
                f"--augment_pictures {training_args.augment_pictures!r} is invalid; allowed: {', '.join(AUGMENT_CHOICES)}"
            )
        if not 0 <= training_args.word_dropout < 1:
            raise UsageError(f"--word_dropout {training_args.word_dropout}: must be in [0, 1)")
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint and not os.path.isdir(checkpoint):
            raise UsageError(f"--resume_from_checkpoint {checkpoint}: no such folder")
        problem = _checkpoint_problem(checkpoint) if checkpoint else None
        if problem:
            raise UsageError(f"--resume_from_checkpoint {checkpoint}: not a checkpoint to resume from ({problem})")
    if "eval_every_epochs" in given and training_args.eval_strategy != "epoch":
        logger.warning(
            "--eval_every_epochs %d is ignored: it applies to --eval_strategy epoch, not %s",
            training_args.eval_every_epochs,
            training_args.eval_strategy.value,
        )
    if "candidates" in given and data_args.strategy != "two_stage":
        logger.warning(
            "--candidates %d is ignored: --strategy %s scores every entity", data_args.candidates, data_args.strategy
        )
    if model_args.model_name_or_path and model_args.clip_model:
        raise UsageError(
            "--model_name_or_path (a trained OT-MEL checkpoint) and --clip_model (a CLIP checkpoint to start a new "
            "OT-MEL from) exclude each other: give one"
        )
    ignored = sorted(f"--{name}" for name in given if name.startswith("tiny_"))
    if ignored and (model_args.model_name_or_path or model_args.clip_model):
        logger.warning(
            "%s only shape the offline tiny CLIP: ignored with --model_name_or_path / --clip_model", ", ".join(ignored)
        )

    if model_args.clip_model:
        from transformers import PretrainedConfig

        name = model_args.clip_model
        try:
            clip_config, _ = PretrainedConfig.get_config_dict(name)
        except (OSError, ValueError) as error:  # not found locally nor on the Hub, offline, not a model folder
            raise UsageError(
                f"--clip_model {name}: no CLIP checkpoint there ({type(error).__name__}: {error})"
            ) from None
        if clip_config.get("model_type") != "clip":
            otmel = clip_config.get("model_type") == OTMELConfig.model_type
            raise UsageError(
                f"--clip_model {name} is a {clip_config.get('model_type')!r} checkpoint, not a CLIP one"
                + ("; to start from a trained OT-MEL checkpoint, use --model_name_or_path" if otmel else "")
            )

    overrides = build_config_overrides(model_args, data_args)
    config = None
    if model_args.model_name_or_path:
        from transformers import AutoConfig

        name = model_args.model_name_or_path
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=True)
        except (OSError, ValueError) as error:  # not found locally nor on the Hub, offline, not a model folder
            raise UsageError(
                f"--model_name_or_path {name}: no OT-MEL checkpoint there ({type(error).__name__}: {error})"
            ) from None
        if getattr(config, "model_type", None) != OTMELConfig.model_type:
            raise UsageError(
                f"--model_name_or_path {name} is a {config.model_type!r} checkpoint, not an OT-MEL one; to "
                "start a new OT-MEL from a CLIP checkpoint, use --clip_model"
            )
    try:
        if config is not None:
            changed = {
                key: (getattr(config, key, None), setting)
                for key, setting in overrides.items()
                if getattr(config, key, None) != setting
            }
            if changed:
                logger.warning(
                    "--model_name_or_path %s: these settings of its config are replaced (--mode %s and the "
                    "command line): %s",
                    model_args.model_name_or_path,
                    model_args.mode,
                    "; ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in changed.items()),
                )
            for key, setting in overrides.items():
                setattr(config, key, setting)
            config.check_settings()
        else:
            OTMELConfig(**overrides)  # validates its settings
    except ValueError as error:
        raise UsageError(f"invalid model settings: {error}") from None

    if (do_eval or do_predict) and not do_train and not model_args.model_name_or_path:
        flags = " and ".join(flag for flag, on in (("--do_eval", do_eval), ("--do_predict", do_predict)) if on)
        if model_args.clip_model and model_args.mode == "clip":
            logger.warning(
                "Zero-shot evaluation: %s ranks with the pretrained CLIP %s as it is (--mode clip: global features "
                "only), without any OT-MEL training",
                flags,
                model_args.clip_model,
            )
        elif model_args.allow_untrained:
            logger.warning("%s ranks with an untrained model (--allow_untrained): random OT-MEL weights", flags)
        else:
            base = f"the CLIP {model_args.clip_model}" if model_args.clip_model else "the offline tiny CLIP"
            raise UsageError(
                f"{flags} without --do_train or --model_name_or_path would rank with an untrained model (random "
                f"OT-MEL weights on {base}). Pass --model_name_or_path with a trained OT-MEL checkpoint, or add "
                "--do_train; for the zero-shot CLIP baseline pass --clip_model <a CLIP checkpoint> --mode clip; "
                "--allow_untrained ranks with the untrained model anyway"
            )


def _model_setting_names() -> list[str]:
    """The model config settings the command line can give (fields of both ModelArguments / DataArguments and
    OTMELConfig)."""
    return [
        f.name
        for args in (ModelArguments, DataArguments)
        for f in dataclasses.fields(args)
        if f.name in OTMELConfig.__dataclass_fields__
    ]


def _model_defaults(model_name_or_path: str | None, clip_model: str | None, tiny_hidden_size: int) -> dict:
    """The value each model setting of [`_model_setting_names`] takes when neither the command line nor `--mode` gives
    it: the checkpoint's config with `--model_name_or_path`, else OTMELConfig's default (with the offline tiny CLIP,
    `hidden_size` is [`tiny_assignment_size`]). Raises `OSError` / `ValueError` when the checkpoint's config cannot be
    read."""
    names = _model_setting_names()
    if model_name_or_path:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True)
        return {name: getattr(config, name, getattr(OTMELConfig, name)) for name in names}
    defaults = {name: getattr(OTMELConfig, name) for name in names}
    if not clip_model:
        defaults["hidden_size"] = tiny_assignment_size(tiny_hidden_size)
    return defaults


def tiny_assignment_size(tiny_hidden_size: int) -> int:
    """The assignment space (`hidden_size`) of an OT-MEL on the offline tiny CLIP when none is given: half the tiny
    CLIP's width (the paper's D = 96 is sized for ViT-B/32)."""
    return tiny_hidden_size // 2


# The content of the data a run trained on: one hash of the Arrow data of the training split and the KB as loaded
# (`training_data_key`). A run_settings.json written before run_mel.py recorded it has none: its data is not compared;
# nor is the key an earlier run_mel.py recorded from the files' names and times (`_OLD_DATA_FINGERPRINT`).
DATA_FINGERPRINT = "data_content"
_OLD_DATA_FINGERPRINT = "data_fingerprint"
_DATA_KEYS: dict[str, str] = {}  # training_data_key's result by the datasets' fingerprints and cache files


def _arrow_tables(data):
    """The pyarrow tables behind a `datasets.Dataset`: its data, then its indices mapping (select / shuffle) if any."""
    for table in (data.data, data._indices):
        if table is not None:
            yield getattr(table, "table", table)


def training_data_key(mentions, kb) -> str:
    """A hash of the content of the training split of `mentions` and of `kb` as loaded: their schemas and every Arrow
    buffer of their columns (and indices mappings). Data rewritten or copied unchanged (new file names or times,
    hence new datasets fingerprints and cache files) gives the same key; any changed value, row or column another.
    Reads the memory-mapped tables once per process (about a second per GB)."""
    parts = (mentions["train"], kb)
    known = json.dumps([(data._fingerprint, sorted(f["filename"] for f in data.cache_files)) for data in parts])
    if known not in _DATA_KEYS:
        digest = hashlib.sha256()
        for data in parts:
            for table in _arrow_tables(data):
                digest.update(f"{table.schema}|{table.num_rows}|".encode())
                for column in table.columns:
                    for chunk in column.chunks:
                        for buffer in chunk.buffers():
                            digest.update(b"-" if buffer is None else memoryview(buffer))
        _DATA_KEYS[known] = digest.hexdigest()[:16]
    return _DATA_KEYS[known]


def run_settings(model_args, data_args, training_args, mentions=None, kb=None) -> dict:
    """What decides the result of a training run (data, starting model, model config, optimisation), as stored in
    `run_settings.json` of the output folder and compared before resuming a run found there.

    Values are the effective ones (defaults filled in), so a setting given at its default compares equal to one left
    out. With the loaded `mentions` (their `train` split) and `kb`, a fingerprint of their content is recorded too
    (`DATA_FINGERPRINT`): a run is not resumed on data changed since it stopped."""

    def where(path):
        return os.path.abspath(path) if path and os.path.exists(path) else path

    settings = {
        "dataset_name": where(data_args.dataset_name),
        "max_train_samples": data_args.max_train_samples,
        "model_name_or_path": model_args.model_name_or_path,
        "clip_model": model_args.clip_model,
        "mode": model_args.mode,
    }
    # Own data files (data_otmel): recorded only when given, so settings stored before they existed still compare.
    for name in ("train_file", "validation_file", "kb", "kb_columns", "mention_columns"):
        value = getattr(data_args, name, None)
        if value is not None:
            settings[name] = where(value) if name in ("train_file", "validation_file", "kb") else value
    if not (model_args.model_name_or_path or model_args.clip_model):
        settings.update(
            {f.name: getattr(model_args, f.name) for f in dataclasses.fields(model_args) if f.name.startswith("tiny_")}
        )
    settings.update(_model_defaults(model_args.model_name_or_path, model_args.clip_model, model_args.tiny_hidden_size))
    settings.update(build_config_overrides(model_args, data_args))
    settings.update({name: getattr(training_args, name) for name in TRAINING_SETTINGS})
    if mentions is not None and "train" in mentions and kb is not None:
        settings[DATA_FINGERPRINT] = training_data_key(mentions, kb)
    # What the collator adds to the batches: recorded only when on, so settings stored before they existed still compare.
    for name, off in (("kb_negatives", 0), ("pseudo_mentions", 0), ("augment_pictures", "none"), ("word_dropout", 0)):
        if getattr(training_args, name, off) != off:
            settings[name] = getattr(training_args, name)
    settings["total_train_batch_size"] = (
        training_args.per_device_train_batch_size
        * max(1, training_args.world_size)
        * training_args.gradient_accumulation_steps
    )
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _read_run_settings(folder: str) -> dict | None:
    """The [`run_settings`] stored in `folder`, or None. A model setting missing there (a file written when only the
    settings given were recorded) had its default: it is filled in, so that it compares with this run's value."""
    path = os.path.join(folder, RUN_SETTINGS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
        if not isinstance(settings, dict):
            raise ValueError(f"a JSON {type(settings).__name__}, not an object")
    except ValueError as err:  # JSONDecodeError is one
        raise UsageError(
            f"{path}: unreadable ({err}); the run that wrote it cannot be compared with this one: delete the file to "
            "resume its checkpoints as this run's, or pass --overwrite_output_dir to train afresh"
        ) from None
    missing = [name for name in _model_setting_names() if name not in settings]
    if missing:
        try:
            defaults = _model_defaults(
                settings.get("model_name_or_path"),
                settings.get("clip_model"),
                settings.get("tiny_hidden_size", ModelArguments.tiny_hidden_size),
            )
        except (OSError, ValueError):  # that run's checkpoint is gone: its defaults are unknown, the settings "unset"
            defaults = {}
        defaults = json.loads(json.dumps(defaults, default=str))
        settings.update({name: defaults[name] for name in missing if name in defaults})
    return settings


def _settings_differences(before: dict, now: dict) -> str:
    """The settings that differ, as `name: value there, value now; ...` (empty when they match). The data's content
    (`DATA_FINGERPRINT`) is compared only where `before` recorded it."""

    def show(settings, key):
        return repr(settings[key]) if key in settings else "unset"

    keys = sorted(
        k
        for k in set(before) | set(now)
        if before.get(k, "<unset>") != now.get(k, "<unset>")
        and (k in before or k != DATA_FINGERPRINT)
        and k != _OLD_DATA_FINGERPRINT
    )
    return "; ".join(f"{key}: {show(before, key)} there, {show(now, key)} now" for key in keys)


def _checkpoints(folder: str) -> list[str]:
    return sorted(
        (
            os.path.join(folder, name)
            for name in os.listdir(folder)
            if _CHECKPOINT_DIR.match(name) and os.path.isdir(os.path.join(folder, name))
        ),
        key=lambda path: int(_CHECKPOINT_DIR.match(os.path.basename(path)).group(1)),
    )


def _checkpoint_progress(checkpoint: str) -> str:
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        step, total = state["global_step"], state["max_steps"]
        return f"step {step} of {total}" + (
            "; that run is complete, so no step is left to train" if step >= total else ""
        )
    except (OSError, ValueError, KeyError):
        return "step unknown: no readable trainer_state.json"


def _checkpoint_problem(checkpoint: str) -> str | None:
    """Why Trainer could not resume from the folder `checkpoint`, or None when it looks whole. Cheap: parses
    trainer_state.json (which Trainer writes last: a run stopped while saving leaves none) and reads the headers of the
    safetensors weights and the ends of the torch files (optimizer, scheduler, random state), not their data."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            int(json.load(f)["global_step"])
    except FileNotFoundError:
        return "no trainer_state.json, which Trainer writes last: the run may have stopped while saving"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"trainer_state.json is unreadable ({type(error).__name__}: {error})"
    single, index = (
        os.path.join(checkpoint, "model.safetensors"),
        os.path.join(checkpoint, "model.safetensors.index.json"),
    )
    if os.path.isfile(single):
        weights = [single]
    elif os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weights = [os.path.join(checkpoint, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"model.safetensors.index.json is unreadable ({type(error).__name__}: {error})"
    elif os.path.isfile(os.path.join(checkpoint, "pytorch_model.bin")):
        weights = []  # a torch file: checked below
    else:
        return "no model weights (model.safetensors)"
    for path in weights:
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except (OSError, SafetensorError) as error:
            return f"{os.path.basename(path)} is unreadable ({type(error).__name__}: {error})"
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if name.endswith((".pt", ".pth", ".bin")) and os.path.isfile(path) and not zipfile.is_zipfile(path):
            return f"{name} is not a whole torch file (truncated?)"
    return None


def _resumable(checkpoints: list[str]) -> str | None:
    """The newest of `checkpoints` (oldest first) Trainer can resume from, with a warning naming each newer one
    skipped and why ([`_checkpoint_problem`]); None when there is none."""
    for checkpoint in reversed(checkpoints):
        problem = _checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning(
            "Skipping %s: it cannot be resumed from (%s). It is moved aside to %s when training starts",
            checkpoint,
            problem,
            DAMAGED_PREFIX + os.path.basename(checkpoint),
        )
    return None


DAMAGED_PREFIX = "damaged-"  # a checkpoint resuming skipped, kept for inspection under this name (not checkpoint-*)


def _move_aside_damaged(out: str, resumed: str | None) -> None:
    """Renames the checkpoints of `out` newer than `resumed` (all when None) that cannot be resumed from to
    ``damaged-checkpoint-N``: out of Trainer's checkpoint rotation (`--save_total_limit`), of the next resume's search
    and of the way of the step-N save to come, and still there to look at."""
    after = int(_CHECKPOINT_DIR.match(os.path.basename(resumed)).group(1)) if resumed else -1
    for checkpoint in _checkpoints(out):
        step = int(_CHECKPOINT_DIR.match(os.path.basename(checkpoint)).group(1))
        if step <= after or _checkpoint_problem(checkpoint) is None:
            continue
        target, n = os.path.join(out, DAMAGED_PREFIX + os.path.basename(checkpoint)), 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(out, f"{DAMAGED_PREFIX}{os.path.basename(checkpoint)}.{n}")
        os.rename(checkpoint, target)
        logger.warning("Moved %s aside to %s", checkpoint, target)


def resume_point(training_args, settings: dict) -> str | None:
    """The checkpoint `--do_train` resumes from, or None to train afresh; says so at the default log level (WARNING).

    The last checkpoint in `--output_dir` is resumed when the run that wrote it had the same [`run_settings`]. A run
    with other settings is refused ([`UsageError`] naming the folder, the settings that differ and the flags), unless
    `--overwrite_output_dir` (its checkpoints are deleted by [`start_run`]) or `--resume_from_checkpoint` (resumed as
    asked, the differences logged). A checkpoint that cannot be resumed from (damaged, or half-written when the run
    stopped: [`_checkpoint_problem`]) is skipped with a warning for the newest one that can; with none, training
    starts afresh, as in a folder without checkpoints.
    """
    out = training_args.output_dir
    if training_args.resume_from_checkpoint:
        checkpoint = training_args.resume_from_checkpoint
        before = _read_run_settings(os.path.dirname(os.path.abspath(checkpoint)))
        differences = _settings_differences(before, settings) if before is not None else ""
        logger.warning(
            "Resuming from %s (%s), as --resume_from_checkpoint asks%s",
            checkpoint,
            _checkpoint_progress(checkpoint),
            f", with other settings: {differences}" if differences else "",
        )
        return checkpoint
    if not os.path.isdir(out):
        return None
    checkpoints = _checkpoints(out)
    if training_args.overwrite_output_dir:
        if checkpoints:
            logger.warning(
                "--overwrite_output_dir: training afresh in %s; its %d checkpoint(s) are deleted when training starts",
                out,
                len(checkpoints),
            )
        return None
    before = _read_run_settings(out)
    differences = _settings_differences(before, settings) if before is not None else ""
    checkpoint = _resumable(checkpoints)
    if checkpoint is None:
        if checkpoints:
            logger.warning(
                "None of the %d checkpoint(s) in %s can be resumed from: training afresh", len(checkpoints), out
            )
        if differences:
            logger.warning(
                "%s holds the outputs of a run with other settings (%s): this run replaces them", out, differences
            )
        return None
    if before is None:
        logger.warning(
            "Resuming the run in %s from %s (%s). Its settings cannot be compared with this run's (no %s: an older "
            "run_mel.py wrote it); pass --overwrite_output_dir to train afresh",
            out,
            checkpoint,
            _checkpoint_progress(checkpoint),
            RUN_SETTINGS_NAME,
        )
        return checkpoint
    if differences:
        changed = DATA_FINGERPRINT in before and before[DATA_FINGERPRINT] != settings.get(DATA_FINGERPRINT)
        tiny = not (settings.get("model_name_or_path") or settings.get("clip_model"))
        raise UsageError(
            f"--output_dir {out} holds checkpoints of a run with other settings ({differences})"
            + (": its training mentions or KB have changed since" if changed else "")
            + f". Resuming it would continue that run ({_checkpoint_progress(checkpoint)}) and keep its weights, not "
            "train with these settings. Pass --overwrite_output_dir to delete its checkpoints and train afresh, choose "
            f"another --output_dir, or pass --resume_from_checkpoint {checkpoint} to continue it anyway"
            + (
                " (only if the data's text is unchanged: the offline tiny CLIP's tokenizer is built from it)"
                if changed and tiny
                else ""
            )
        )
    logger.warning(
        "Resuming the run in %s from %s (%s): its settings match this run's. Pass --overwrite_output_dir to "
        "train afresh",
        out,
        checkpoint,
        _checkpoint_progress(checkpoint),
    )
    return checkpoint


def start_run(training_args, settings: dict, resumed: str | None = None) -> None:
    """Right before training, on the main process: deletes the checkpoints `--overwrite_output_dir` discards, moves
    aside those newer than `resumed` (the [`resume_point`] found in `--output_dir`) that cannot be resumed from, and
    writes the run's settings to `--output_dir/run_settings.json` (what a later run compares before resuming)."""
    if training_args.process_index != 0:
        return
    out = training_args.output_dir
    os.makedirs(out, exist_ok=True)
    if training_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
        for checkpoint in _checkpoints(out):
            shutil.rmtree(checkpoint)
    elif not training_args.resume_from_checkpoint:
        _move_aside_damaged(out, resumed)
    tmp = os.path.join(out, f".{RUN_SETTINGS_NAME}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(out, RUN_SETTINGS_NAME))


def reuse_finished_run(trainer, checkpoint: str | None, settings: dict):
    """When `checkpoint` (the resume point found in `--output_dir`, not one given by `--resume_from_checkpoint`) is the
    last one of a complete run with these `settings`, and `--output_dir` holds that run's final model and results:
    loads them into `trainer` and returns a `TrainOutput` like `trainer.train`'s, without training. Otherwise None
    (train, resuming from `checkpoint`).

    A complete run has no step left, yet transformers 5.23 trains one more when it resumes a run that stopped at
    `max_steps` within an epoch: a step past the end of the schedule, which would change the finished model."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    out = trainer.args.output_dir
    before = _read_run_settings(out)
    if (
        checkpoint is None
        or trainer.args.resume_from_checkpoint
        or before is None
        or _settings_differences(before, settings)
        or os.path.dirname(os.path.abspath(checkpoint)) != os.path.abspath(out)
    ):
        return None
    try:
        last = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        final = TrainerState.load_from_json(os.path.join(out, "trainer_state.json"))
        with open(os.path.join(out, "train_results.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError, TypeError):
        return None
    if not last.max_steps or last.global_step < last.max_steps:
        return None
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        from safetensors.torch import load_model

        load_model(trainer.model, os.path.join(out, "model.safetensors"))
    elif os.path.isfile(os.path.join(out, "model.safetensors.index.json")):
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(trainer.model, out)
    else:
        return None
    trainer.state = final
    metrics.pop("train_samples", None)
    logger.warning(
        "The run in %s is complete (step %d of %d): no step is trained; its final model is used",
        out,
        last.global_step,
        last.max_steps,
    )
    return TrainOutput(final.global_step, metrics.get("train_loss", float("nan")), metrics)


def fit_batch_to_data(training_args, n_train: int) -> None:
    """Shrinks `per_device_train_batch_size` (with a warning) when the training split holds less than one batch: with
    `dataloader_drop_last` the incomplete batch is dropped and no step would run. Refuses fewer than 2 mentions."""
    world = max(1, training_args.world_size)
    batch = training_args.per_device_train_batch_size
    if not training_args.dataloader_drop_last or n_train >= batch * world:
        return
    fitted = n_train // world
    if fitted * world < 2:
        raise UsageError(
            f"{n_train} training mention(s) on {world} process(es): in-batch contrastive training needs batches of "
            "at least 2 mentions (and at least 1 per process)"
        )
    logger.warning(
        "Only %d training mentions, fewer than one batch of %d (--per_device_train_batch_size %d x %d process(es)): "
        "the incomplete last batch is dropped (dataloader_drop_last), so no step would run. Training with batches of "
        "%d per process",
        n_train,
        batch * world,
        batch,
        world,
        fitted,
    )
    training_args.per_device_train_batch_size = fitted


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_DATASET_EXPECTED = (
    "Expected a dataset id on the Hub, a folder made by datasets_scripts/convert_mimic.py (a README.md whose configs "
    "include 'mentions' and 'kb'), or a raw folder in the MIMIC layout (kb_entity.json and *_train.json)"
)


def check_dataset_source(data_args) -> None:
    """Raises [`UsageError`] naming the path and what was expected when `--dataset_name` is not something
    `load_mel_dataset` reads: a local path that does not exist (never looked up on the Hub: a path with `./`, `../`,
    `/`, `~`, more than one `/`, or whose first folder exists here), a file, a folder that is neither a converted dataset
    nor a MIMIC-layout folder, or a name the Hub (or its offline cache) does not know. Only the configs that are used
    are tried: `mentions` unless mention files are given, `kb` unless `--kb` is."""
    name = data_args.dataset_name
    if not name:
        return
    files = [getattr(data_args, f"{split}_file", None) for split in ("train", "validation", "test")]
    configs = [
        config for config, used in (("mentions", not any(files)), ("kb", not getattr(data_args, "kb", None))) if used
    ]
    if not configs:
        return
    where = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(name):
        from datasets_scripts.convert_mimic import is_mimic_layout

        if is_mimic_layout(name):
            return
        problem = f"the folder {where} is not a dataset this script reads"
    elif os.path.exists(name):
        raise UsageError(
            f"--dataset_name {name}: {where} is a file, not a dataset (for mention and KB table files use "
            f"--train_file / --validation_file / --test_file and --kb). {_DATASET_EXPECTED}"
        )
    else:
        first = name.split("/")[0]
        if not _HUB_ID.fullmatch(name) or (first != name and os.path.isdir(first)):
            raise UsageError(f"--dataset_name {name}: no such folder ({where}). {_DATASET_EXPECTED}")
        problem = f"no folder {where}, and the Hub has no such dataset (or cannot be reached)"
    for config in configs:
        try:
            datasets.load_dataset_builder(name, config)
        except (OSError, ValueError) as error:  # not found, offline, or no such config
            raise UsageError(
                f"--dataset_name {name}: {problem} ({type(error).__name__}: {error}). {_DATASET_EXPECTED}"
            ) from None


def _without_picture(data: datasets.Dataset) -> int | None:
    """Rows of an `image` column with neither bytes nor path (None if it cannot be counted without reading pictures)."""
    if data._indices is not None or not isinstance(data.features.get("image"), ImageFeature):
        return None
    import pyarrow.compute as pc

    count = 0
    for chunk in data.data.column("image").chunks:
        empty = pc.and_(pc.is_null(chunk.field("bytes")), pc.is_null(chunk.field("path")))
        count += pc.sum(pc.or_(chunk.is_null(), empty)).as_py() or 0
    return count


def complete_columns(mentions: datasets.DatasetDict, kb: datasets.Dataset, label: str):
    """Checks the columns run_mel reads in the KB and in every mention split, and returns `(mentions, kb)` completed.

    A missing required column (KB: qid, name; mentions: mention, answer) is a [`UsageError`] listing the columns found.
    Optional ones are added, with a counted warning: `image` (no picture), `attributes` / `sentence` (empty text), `id`
    (the row number). Pictures missing in part are counted at INFO level; KB rows repeating a qid, with a warning.
    """

    def complete(data, what, items, required, optional):
        missing = [column for column in required if column not in data.column_names]
        if missing:
            raise UsageError(
                f"{label}: the {what} lack(s) the column(s) {', '.join(missing)}; columns found: "
                f"{', '.join(data.column_names) or 'none'}"
            )
        n = len(data)
        for column, fill, meaning in optional:
            if column not in data.column_names:
                logger.warning("%s has no %s column: all %d %s %s", what, column, n, items, meaning)
                data = data.add_column(column, [fill(i) for i in range(n)])
        if "image" not in data.column_names:
            logger.warning("%s has no image column: all %d %s without picture", what, n, items)
            data = data.add_column("image", [None] * n, feature=ImageFeature(decode=False))
        else:
            absent = _without_picture(data)
            if absent and absent == n:
                logger.warning("%s: all %d %s without picture (the image column is empty)", what, n, items)
            elif absent:
                logger.info("%s: %d of %d %s without picture", what, absent, n, items)
        return data

    kb = complete(kb, "KB", "entities", ("qid", "name"), [("attributes", lambda i: "", "with empty attributes")])
    seen, duplicates = set(), []
    for qid in kb["qid"]:
        if qid in seen:
            duplicates.append(qid)
        seen.add(qid)
    if duplicates:
        logger.warning(
            "KB: %d row(s) repeat the qid of an earlier row (e.g. %r): the first row of each qid is the gold entity of "
            "its mentions; the repeats stay in the KB and are ranked too",
            len(duplicates),
            duplicates[0],
        )
    for split in list(mentions):
        mentions[split] = complete(
            mentions[split],
            f"'{split}' mentions",
            "mentions",
            ("mention", "answer"),
            [("sentence", lambda i: "", "with an empty sentence"), ("id", str, "numbered by row")],
        )
    return mentions, kb


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Without this, transformers leaves CPU processes launched by torchrun undistributed (each thinks it is alone).
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    model_args, data_args, training_args, given, notes = parse_arguments(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    for name in ("processing_otmel", "index_otmel", "ranking_otmel", "data_otmel", "datasets_scripts.convert_mimic"):
        logging.getLogger(name).setLevel(logging.INFO if log_level <= logging.INFO else log_level)
    for level, note in notes:
        logger.log(level, note)
    logger.info("Training/evaluation parameters %s", training_args)

    # Refuse what cannot do what it says before loading anything.
    check_arguments(model_args, data_args, training_args, given)
    set_seed(training_args.seed)
    check_dataset_source(data_args)

    mentions, kb, _ = load_mel_dataset(
        data_args.dataset_name,
        data_args.data_cache_dir,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        test_file=data_args.test_file,
        kb=data_args.kb,
        kb_columns=data_args.kb_columns,
        mention_columns=data_args.mention_columns,
    )
    # The run's settings include the content of the data as loaded, before the splits are checked and trimmed.
    settings = run_settings(model_args, data_args, training_args, mentions, kb) if training_args.do_train else None
    # What the data is called in messages and the model card: the dataset, or the first mention file.
    dataset_label = data_args.dataset_name or next(
        f for f in (data_args.train_file, data_args.validation_file, data_args.test_file) if f
    )
    mentions, kb = complete_columns(mentions, kb, dataset_label)
    qid_to_index = {}
    for i, qid in enumerate(kb["qid"]):
        qid_to_index.setdefault(qid, i)
    for split in list(mentions):
        mentions[split] = keep_linkable(mentions[split], qid_to_index, split, keep_nil=split != "train")
    mentions = mentions.cast_column("image", ImageFeature(decode=False))
    kb = kb.cast_column("image", ImageFeature(decode=False))

    def take(split, limit):
        hint = ""
        if split == "validation" and given.get("do_eval"):
            hint = "; --do_eval needs it: drop --do_eval" + (
                " and pass --eval_strategy no to train without evaluation"
                if training_args.do_train and training_args.eval_strategy != "no"
                else ""
            )
            hint += ", or add the split"
        elif split == "validation" and training_args.do_train:
            # Evaluation during training (any --eval_strategy but "no") turns do_eval on: it needs the validation split.
            hint = "; pass --eval_strategy no to train without evaluation"
        if split not in mentions:
            files = "" if data_args.dataset_name else f" (give --{split}_file)"
            raise UsageError(f"{dataset_label} has no '{split}' split{files} (has: {', '.join(mentions)}){hint}")
        data = mentions[split]
        data = data.select(range(min(limit, len(data)))) if limit is not None else data
        if len(data) == 0:
            raise UsageError(f"{dataset_label}: the '{split}' split has no mention left to use{hint}")
        return data

    train_dataset = take("train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = take("validation", data_args.max_eval_samples) if training_args.do_eval else None
    if training_args.do_predict:
        take("test", data_args.max_predict_samples)  # checked now, not after training
    # Find the run to resume (or refuse a different one), before the batch is fitted to the data (a setting compared).
    last_checkpoint = resume_point(training_args, settings) if training_args.do_train else None
    if train_dataset is not None:
        fit_batch_to_data(training_args, len(train_dataset))

    model, processor, base_model = load_model_and_processor(model_args, data_args, training_args, mentions, kb)
    logger.info("Model config: %s", model.config.to_diff_dict())

    trainer = OTMELTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MELCollator(
            processor,
            kb,
            qid_to_index,
            pad_to_max=training_args.world_size > 1,
            kb_negatives=training_args.kb_negatives,
            pseudo_mentions=training_args.pseudo_mentions,
            augment=training_args.augment_pictures,
            word_dropout=training_args.word_dropout,
            seed=training_args.seed,
        ),
        processing_class=processor,
        callbacks=[EvaluateEveryEpochs(training_args.eval_every_epochs)],
        kb=kb,
        rank_options=RankOptions(strategy=data_args.strategy, candidates=data_args.candidates),
        kb_batch_size=data_args.kb_batch_size,
    )

    all_metrics, training = {}, None
    if training_args.do_train:
        train_result = reuse_finished_run(trainer, last_checkpoint, settings)
        start_run(training_args, settings, last_checkpoint)
        train_result = train_result or trainer.train(resume_from_checkpoint=last_checkpoint)
        # The NIL threshold of the trained model, chosen on validation and saved with it (config.nil_threshold).
        nil_split = eval_dataset
        if nil_split is None and len(mentions.get("validation", [])):
            nil_split = take("validation", data_args.max_eval_samples)
        trainer.choose_nil_threshold(nil_split)
        trainer.save_model()
        if trainer.is_world_process_zero():
            from pipeline_otmel import save_pipeline_files

            save_pipeline_files(training_args.output_dir, model.config)  # pipeline("multimodal-entity-linking")
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        all_metrics.update(metrics)
        training = {
            "base_model": base_model,
            "mode": model_args.mode,
            "learning_rate": training_args.learning_rate,
            "batch_size": training_args.per_device_train_batch_size * training_args.world_size,
            "epochs": training_args.num_train_epochs,
            "steps": trainer.state.global_step,
            "seed": training_args.seed,
            "train_runtime": metrics.get("train_runtime"),
            "hardware": f"{'GPU' if torch.cuda.is_available() else 'CPU'}, {training_args.world_size} process(es)",
        }

    if training_args.do_eval:
        if not training_args.do_train:
            trainer.choose_nil_threshold(eval_dataset)
        metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        all_metrics.update(metrics)

    if training_args.do_predict:
        test = take("test", data_args.max_predict_samples)
        start = time.time()
        result = trainer.rank_split(test, top_k=data_args.predict_top_k)
        metrics = trainer.ranking_metrics(result, "test", answers=list(test["answer"]))
        metrics["test_runtime"] = round(time.time() - start, 2)
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        all_metrics.update(metrics)
        if trainer.is_world_process_zero():
            write_predictions(
                os.path.join(training_args.output_dir, "predictions_test.jsonl"),
                test,
                kb,
                result,
                nil_threshold=model.config.nil_threshold,
            )

    if trainer.is_world_process_zero() and (
        training_args.do_train or training_args.do_eval or training_args.do_predict
    ):
        os.makedirs(training_args.output_dir, exist_ok=True)
        processor.save_pretrained(training_args.output_dir)
        if training_args.do_train:
            from model_card import write_model_card

            write_model_card(
                training_args.output_dir,
                model.config,
                dataset_name=dataset_label,
                metrics={k: v for k, v in all_metrics.items() if k.startswith(("eval_", "test_"))},
                training=training,
                base_model=model_args.model_name_or_path or model_args.clip_model,
                repo_id=training_args.hub_model_id or training_args.output_dir,
            )
    if training_args.push_to_hub and trainer.is_world_process_zero():
        from model_card import push_folder_to_hub

        push_folder_to_hub(
            training_args.output_dir, training_args.hub_model_id or os.path.basename(training_args.output_dir)
        )
    return all_metrics


def write_predictions(path: str, split: datasets.Dataset, kb: datasets.Dataset, result, nil_threshold=None) -> None:
    """One JSON line per mention: id, gold qid, rank of the gold entity (-1 for a NIL gold), the top predictions with
    their scores and, with a `nil_threshold`, `"nil"`: whether the mention is answered NIL (best score below it)."""
    qids = kb["qid"]
    with open(path, "w", encoding="utf-8") as f:
        for row_id, gold, rank, top, scores in zip(
            split["id"], split["answer"], result.gold_ranks.tolist(), result.indices.tolist(), result.scores.tolist()
        ):
            predictions = [{"qid": qids[i], "score": round(float(s), 5)} for i, s in zip(top, scores)]
            row = {"id": row_id, "gold": gold, "rank": rank, "predictions": predictions}
            if nil_threshold is not None:
                row["nil"] = bool(scores) and scores[0] < nil_threshold
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.info("Wrote %s", path)


def console_main(argv=None) -> int:
    """The `otmel-train` command: runs [`main`] (which returns the metrics) and gives the exit status, 2 with the
    message for a data problem (`data_otmel.DataFormatError`: bad file, missing column, missing argument) or a usage
    problem ([`UsageError`]: arguments that contradict each other or would not do what they say)."""
    from data_otmel import DataFormatError

    try:
        main(argv)
    except (DataFormatError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
