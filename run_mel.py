#!/usr/bin/env python
"""Train and evaluate OT-MEL on a multimodal entity linking dataset, ranking every mention against the whole KB.

    python run_mel.py --dataset_name DATA --output_dir OUT --do_train --do_eval --do_predict

DATA is a dataset on the Hub, a folder made by `datasets_scripts/convert_mimic.py`, or a raw folder in the MIMIC
layout (WikiMEL, RichpediaMEL, WikiDiverse, or `datasets_scripts/make_synthetic.py`), converted on the fly into a
cache keyed by the folder's content. With neither `--model_name_or_path` (an OT-MEL checkpoint) nor `--clip_model`
(any CLIP checkpoint, e.g. openai/clip-vit-base-patch32), a tiny CLIP is built offline, its tokenizer trained on the KB
and training text only; the default training arguments are the schedule of that tiny model (see README).
"""

import hashlib
import json
import logging
import math
import os
import sys
import time
import dataclasses
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from datasets import Image as ImageFeature
from datasets import load_dataset
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from configuration_otmel import PAPER_MODELS, OTMELConfig
from index_otmel import encode_kb
from modeling_otmel import LOSS_TERMS, OTMELModel
from processing_otmel import OTMELProcessor
from ranking_otmel import STRATEGIES, RankOptions, evaluation_metrics, rank_mentions


logger = logging.getLogger(__name__)

@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "An OT-MEL checkpoint (local or Hub)."})
    clip_model: str | None = field(default=None, metadata={"help": "A CLIP checkpoint to start a new OT-MEL from."})
    mode: str = field(default="ot", metadata={"help": "The paper's model to train: " + " | ".join(PAPER_MODELS) + "."})
    fusion_assignment: str | None = field(default=None, metadata={"help": "ot | attention | off (ablations F1, F2)."})
    unimodal_assignment: str | None = field(default=None, metadata={"help": "ot | attention | off (M1, M2)."})
    pooling: str | None = field(default=None, metadata={"help": "softpool | mean | max (O1, O2)."})
    distillation: str | None = field(default=None, metadata={"help": "off | kl | mse | row_kl (K1, K2)."})
    inference_assignment: str | None = field(default=None, metadata={"help": "ot | attention."})
    hidden_size: int | None = field(default=None, metadata={"help": "Assignment space size (paper: 96)."})
    pairwise_negatives: int | None = field(default=15, metadata={"help": "Hard in-batch negatives scored pairwise (0: all, the paper)."})
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


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, converted dataset folder, or raw MIMIC-layout folder (mentions and KB). "
                  "Or give your own files: --train_file / --validation_file / --test_file and --kb."},
    )  # fmt: skip
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training mentions: a CSV, TSV, JSONL, JSON or Parquet file with columns mention, sentence, "
                  "image (path relative to the file), answer (gold qid), id (optional). See data_otmel.py."},
    )  # fmt: skip
    validation_file: str | None = field(default=None, metadata={"help": "Validation mentions (as --train_file)."})
    test_file: str | None = field(default=None, metadata={"help": "Test mentions (as --train_file)."})
    kb: str | None = field(
        default=None,
        metadata={"help": "The KB: a CSV, TSV, JSONL, JSON or Parquet file (columns qid, name, attributes, image: "
                  "paths relative to the file, several separated by ';'), a dataset folder or Hub id with a 'kb' "
                  "config, or a raw MIMIC-layout folder. Default: the KB of --dataset_name."},
    )  # fmt: skip
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
        metadata={"help": "two_stage (rank all entities by S_R, re-rank the top candidates with S_O) or exhaustive "
                  "(S_O for every mention-entity pair: the paper's protocol, slow on a large KB)."},
    )  # fmt: skip
    candidates: int = field(default=50, metadata={"help": "Two-stage: entities re-ranked with the full S_O."})
    predict_top_k: int = field(default=10, metadata={"help": "Entities written per mention by --do_predict."})
    kb_batch_size: int = field(default=256, metadata={"help": "Batch size for encoding the KB and mentions."})


@dataclass
class OTMELTrainingArguments(TrainingArguments):
    """TrainingArguments whose defaults are the schedule of the offline tiny model on a few thousand mentions."""

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints, metrics and the model go."})
    per_device_train_batch_size: int = 128
    per_device_eval_batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    num_train_epochs: float = 30.0
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
    from data_otmel import DataFormatError, kb_from_dataset, load_kb, load_mention_files

    files = {"train": train_file, "validation": validation_file, "test": test_file}
    if not name and not any(files.values()):
        raise DataFormatError("no data: give --dataset_name, or --train_file / --validation_file / --test_file with --kb")
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
        mentions = load_dataset(path, "mentions")
        if mention_columns:
            raise DataFormatError("--mention_columns applies to --train_file / --validation_file / --test_file only")
    if kb:
        kb_dataset = load_kb(kb, columns=kb_columns, cache_dir=cache_dir)
    else:
        kb_dataset = load_dataset(path, "kb")["train"]
        if kb_columns:
            kb_dataset = kb_from_dataset(kb_dataset, kb_columns, where=f"--dataset_name {name}")
    return mentions, kb_dataset, path


def keep_linkable(split: datasets.Dataset, qid_to_index: dict, split_name: str) -> datasets.Dataset:
    """Drops mentions whose answer is not in the KB, with a counted warning (never silently)."""
    answers = split["answer"]
    keep = [i for i, qid in enumerate(answers) if qid in qid_to_index]
    if len(keep) < len(answers):
        logger.warning(
            "%s: %d of %d mentions have an answer absent from the KB (e.g. %r) and are skipped",
            split_name, len(answers) - len(keep), len(answers), next(q for q in answers if q not in qid_to_index),
        )  # fmt: skip
        split = split.select(keep)
    return split


class MELCollator:
    """Turns mention rows into a batch of mentions with their gold entities (in-batch negatives).

    Images stay undecoded in the datasets (`decode=False`) and are decoded here, so a corrupt file becomes "no image".
    Preprocessed pictures are kept (float16) up to `image_cache_mb`: every epoch shows the same pictures again, and
    decoding plus resizing them cost about as much as a training step of the tiny model.
    """

    def __init__(self, processor, kb, qid_to_index: dict, pad_to_max: bool = False, image_cache_mb: int = 1024):
        self.processor = processor
        self.kb = kb
        self.qid_to_index = qid_to_index
        self.padding = "max_length" if pad_to_max else "longest"  # equal shapes on every process, to gather them
        self.cache = {}
        self.cache_bytes_left = image_cache_mb * 2**20

    def _pixels(self, images: list) -> dict:
        keys = [hashlib.blake2b(image["bytes"], digest_size=16).digest() if image and image.get("bytes") else None
                for image in images]  # fmt: skip
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

    def __call__(self, rows: list[dict]) -> dict:
        entity_index = [self.qid_to_index[row["answer"]] for row in rows]
        entities = self.kb[entity_index]
        proc = self.processor
        m = proc.process_mentions([r["mention"] for r in rows], [r["sentence"] for r in rows], padding=self.padding)
        e = proc.process_entities(entities["name"], entities["attributes"], padding=self.padding)
        m.update(self._pixels([r["image"] for r in rows]))
        e.update(self._pixels(entities["image"]))
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
        index = encode_kb(model, processor, self.kb, batch_size=self.kb_batch_size, progress=main)
        options = RankOptions(**{**self.rank_options.__dict__, "top_k": top_k})
        return rank_mentions(
            model, processor, index, split, options, gold_qids=list(split["answer"]), batch_size=self.kb_batch_size,
            progress=main, distributed=True,
        )  # fmt: skip

    def ranking_metrics(self, result, prefix: str) -> dict:
        metrics = evaluation_metrics(result)
        if self.rank_options.strategy != "two_stage":  # stage 1 is not part of exhaustive ranking
            metrics = {k: v for k, v in metrics.items() if not k.startswith("stage1_")}
        return {f"{prefix}_{k}": v for k, v in metrics.items()}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        start = time.time()
        metrics = self.ranking_metrics(self.rank_split(eval_dataset), metric_key_prefix)
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
        str(x) for x in (kb._fingerprint, mentions["train"]._fingerprint, model_args.tiny_hidden_size,
                         model_args.tiny_layers, model_args.tiny_image_size, model_args.tiny_patch_size,
                         model_args.tiny_vocab_size, seed)
    )  # fmt: skip
    path = os.path.join(cache_dir, "tiny_clip", _stable_hash(key))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    texts = [f"{n} {a}" for n, a in zip(kb["name"], kb["attributes"])]
    texts += [f"{m} {s}" for m, s in zip(mentions["train"]["mention"], mentions["train"]["sentence"])]
    tmp = f"{path}.tmp{os.getpid()}"
    build_tiny_clip(
        tmp, texts, vocab_size=model_args.tiny_vocab_size, hidden_size=model_args.tiny_hidden_size,
        num_layers=model_args.tiny_layers, image_size=model_args.tiny_image_size,
        patch_size=model_args.tiny_patch_size, projection_dim=model_args.tiny_hidden_size, seed=seed,
    )  # fmt: skip
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
        # The paper's D = 96 is sized for ViT-B/32; the tiny model's assignment space is half its width.
        overrides.setdefault("hidden_size", model_args.tiny_hidden_size // 2)
    # Seeded here, not only at start-up: building the tiny CLIP on a first run draws random numbers a cached run does not.
    set_seed(training_args.seed)
    model = OTMELModel.from_clip(base, **overrides)
    processor = OTMELProcessor(
        AutoImageProcessor.from_pretrained(base), AutoTokenizer.from_pretrained(base),
        max_text_length=model.config.max_text_length,
    )
    return model, processor, model_args.clip_model or "offline tiny CLIP (tiny_clip.py)"


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Without this, transformers leaves CPU processes launched by torchrun undistributed (each thinks it is alone).
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    parser = HfArgumentParser((ModelArguments, DataArguments, OTMELTrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.output_dir is None:
        parser.error("--output_dir is required")

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
    logger.info("Training/evaluation parameters %s", training_args)

    last_checkpoint = None
    if training_args.do_train and os.path.isdir(training_args.output_dir) and not training_args.resume_from_checkpoint:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None:
            logger.info("Checkpoint found at %s: resuming. Use another --output_dir to start afresh.", last_checkpoint)
    set_seed(training_args.seed)

    mentions, kb, _ = load_mel_dataset(
        data_args.dataset_name, data_args.data_cache_dir, train_file=data_args.train_file,
        validation_file=data_args.validation_file, test_file=data_args.test_file, kb=data_args.kb,
        kb_columns=data_args.kb_columns, mention_columns=data_args.mention_columns,
    )  # fmt: skip
    # What the data is called in messages and the model card: the dataset, or the first mention file.
    dataset_label = data_args.dataset_name or next(
        f for f in (data_args.train_file, data_args.validation_file, data_args.test_file) if f
    )
    qid_to_index = {}
    for i, qid in enumerate(kb["qid"]):
        qid_to_index.setdefault(qid, i)
    for split in list(mentions):
        mentions[split] = keep_linkable(mentions[split], qid_to_index, split)
    mentions = mentions.cast_column("image", ImageFeature(decode=False))
    kb = kb.cast_column("image", ImageFeature(decode=False))

    model, processor, base_model = load_model_and_processor(model_args, data_args, training_args, mentions, kb)
    logger.info("Model config: %s", model.config.to_diff_dict())

    def take(split, limit):
        if split not in mentions:
            given = "" if data_args.dataset_name else f" (give --{split}_file)"
            raise ValueError(f"{dataset_label} has no '{split}' split{given} (has: {', '.join(mentions)})")
        data = mentions[split]
        return data.select(range(min(limit, len(data)))) if limit is not None else data

    train_dataset = take("train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = take("validation", data_args.max_eval_samples) if (training_args.do_eval or training_args.do_train) else None
    if training_args.eval_strategy != "no" and eval_dataset is None:
        raise ValueError("evaluation during training needs a validation split")

    trainer = OTMELTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MELCollator(processor, kb, qid_to_index, pad_to_max=training_args.world_size > 1),
        processing_class=processor,
        callbacks=[EvaluateEveryEpochs(training_args.eval_every_epochs)],
        kb=kb,
        rank_options=RankOptions(strategy=data_args.strategy, candidates=data_args.candidates),
        kb_batch_size=data_args.kb_batch_size,
    )

    all_metrics, training = {}, None
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
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
        metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        all_metrics.update(metrics)

    if training_args.do_predict:
        test = take("test", data_args.max_predict_samples)
        start = time.time()
        result = trainer.rank_split(test, top_k=data_args.predict_top_k)
        metrics = trainer.ranking_metrics(result, "test")
        metrics["test_runtime"] = round(time.time() - start, 2)
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        all_metrics.update(metrics)
        if trainer.is_world_process_zero():
            write_predictions(os.path.join(training_args.output_dir, "predictions_test.jsonl"), test, kb, result)

    if trainer.is_world_process_zero() and (training_args.do_train or training_args.do_eval or training_args.do_predict):
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

        push_folder_to_hub(training_args.output_dir, training_args.hub_model_id or os.path.basename(training_args.output_dir))
    return all_metrics


def write_predictions(path: str, split: datasets.Dataset, kb: datasets.Dataset, result) -> None:
    """One JSON line per mention: id, gold qid, rank of the gold entity, and the top predictions with their scores."""
    qids = kb["qid"]
    with open(path, "w", encoding="utf-8") as f:
        for row_id, gold, rank, top, scores in zip(
            split["id"], split["answer"], result.gold_ranks.tolist(), result.indices.tolist(), result.scores.tolist()
        ):
            predictions = [{"qid": qids[i], "score": round(float(s), 5)} for i, s in zip(top, scores)]
            row = {"id": row_id, "gold": gold, "rank": rank, "predictions": predictions}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.info("Wrote %s", path)


def console_main(argv=None) -> int:
    """The `otmel-train` command: runs [`main`] (which returns the metrics) and gives the exit status, 2 with the
    message for a data problem (`data_otmel.DataFormatError`: bad file, missing column, missing argument)."""
    from data_otmel import DataFormatError

    try:
        main(argv)
    except DataFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
