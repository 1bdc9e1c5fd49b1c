"""Model card (README.md) for a trained OT-MEL checkpoint, and the upload of its folder to the Hugging Face Hub.

`write_model_card(output_dir, config, dataset_name=..., metrics=..., training=..., base_model=...)` writes a Hub model
card with YAML metadata (library, tags, datasets, metrics, model-index, base model, license) and a body that states what
the model is, the settings that matter, the evaluation table, how it was trained, its limits and how to use it.

Publish the whole folder (weights, config, remote code, processor files, card) with `push_folder_to_hub`, or
`huggingface-cli upload REPO OUTPUT_DIR`. Do not use `model.push_to_hub`: it uploads a fresh `save_pretrained` of the
model only (no processor files) together with a generic card that replaces this one.
"""

import json
import math
import os
import re

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from configuration_otmel import paper_variant


PAPER_TITLE = "Optimal Transport Guided Correlation Assignment for Multimodal Entity Linking"
PAPER_URL = "https://arxiv.org/abs/2406.01934"
PAPER_CITATION = """@inproceedings{zhang2024otmel,
  title     = {Optimal Transport Guided Correlation Assignment for Multimodal Entity Linking},
  author    = {Zhang, Zefeng and Sheng, Jiawei and Zhang, Chuang and Liang, Yunzhi and Zhang, Wenyuan and Wang, Siqi
               and Liu, Tingwen},
  booktitle = {Findings of the Association for Computational Linguistics: ACL 2024},
  year      = {2024},
  url       = {https://arxiv.org/abs/2406.01934}
}"""

TAGS = ["entity-linking", "multimodal-entity-linking", "multimodal", "optimal-transport", "clip", "otmel"]
HITS_AT = (1, 3, 5, 10, 20)
_SPLITS = {"eval": "validation", "validation": "validation", "val": "validation", "dev": "validation", "test": "test"}

# Files of an output folder that a Hub user does not need: Trainer checkpoints and states, optimizer and RNG states,
# TensorBoard logs, Python caches. Everything else of the folder is uploaded.
HUB_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/*",
    "checkpoint-*/**",
    "runs/**",
    "**/__pycache__/**",
    "__pycache__/**",
    "*.pyc",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "scaler.pt",
    "events.out.tfevents.*",
]


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def _parse_metric(key: str):
    """`eval_hits@1` -> ("validation", "hits@1"); `test_mrr` -> ("test", "mrr"); anything else -> None."""
    match = re.fullmatch(r"(eval|validation|val|dev|test)[_/](.+)", key.strip().lower())
    if not match:
        return None
    split, name = _SPLITS[match.group(1)], match.group(2)
    hits = re.fullmatch(r"(?:hits?|h)(?:@|_at_|_|)(\d+)", name)
    if hits:
        return split, f"hits@{int(hits.group(1))}"
    if name == "mrr":
        return split, "mrr"
    return None


def collect_metrics(metrics: dict | None) -> dict:
    """{split: {"hits@k" | "mrr": float}} from Trainer-style keys (`eval_hits@1`, `test_mrr`, ...); others ignored."""
    table = {}
    for key, value in (metrics or {}).items():
        parsed = _parse_metric(str(key))
        if parsed is None or value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        split, name = parsed
        table.setdefault(split, {})[name] = value
    return table


def _as_percent(table: dict) -> bool:
    """Trainer metrics are fractions; show them as percentages (as the paper does) unless a finite value exceeds 1."""
    values = [v for split in table.values() for v in split.values() if math.isfinite(v)]
    return bool(values) and all(0.0 <= v <= 1.0 for v in values)


def _not_finite(table: dict) -> list[str]:
    """The metrics of `table` that are NaN or infinite, as "validation MRR", ... (left out of the model-index)."""
    return [
        f"{split} {_metric_label(name)}"
        for split in ("validation", "test")
        for name in _metric_columns({split: table.get(split, {})})
        if not math.isfinite(table[split][name])
    ]


def _metric_columns(table: dict) -> list[str]:
    names = {name for split in table.values() for name in split}
    ordered = [f"hits@{k}" for k in HITS_AT if f"hits@{k}" in names]
    extra = sorted((n for n in names if n.startswith("hits@") and n not in ordered), key=lambda n: int(n[5:]))
    return ordered + extra + (["mrr"] if "mrr" in names else [])


def _metric_label(name: str) -> str:
    return "MRR" if name == "mrr" else f"H@{name[5:]}"


def metrics_markdown(metrics: dict | None) -> str:
    """The evaluation table (rows: validation, test; columns: H@1/3/5/10/20, MRR), or a line saying there is none.
    A NaN or infinite value is shown as it is and named below the table: the model-index metadata leaves it out."""
    table = collect_metrics(metrics)
    if not table:
        return "_No evaluation metrics were recorded for this checkpoint._"
    percent = _as_percent(table)
    columns = _metric_columns(table)
    unit = " (%)" if percent else ""
    lines = [
        "| split | " + " | ".join(_metric_label(c) + unit for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for split in ("validation", "test"):
        if split not in table:
            continue
        cells = []
        for column in columns:
            value = table[split].get(column)
            if value is None:
                cells.append("-")
            elif not math.isfinite(value):
                cells.append(str(value))
            else:
                cells.append(f"{100 * value:.2f}" if percent else f"{value:.4g}")
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    bad = _not_finite(table)
    if bad:
        lines.append(f"\n_Not finite, so left out of the model-index metadata: {', '.join(bad)}._")
    return "\n".join(lines)


def _eval_results(table: dict, dataset: str) -> list[EvalResult]:
    """The model-index entries of the finite metrics of `table`, on `dataset` (a Hub id or a short name)."""
    results = []
    for split in ("validation", "test"):
        for name in _metric_columns({split: table.get(split, {})}):
            if not math.isfinite(table[split][name]):
                continue
            results.append(
                EvalResult(
                    task_type="entity-linking",
                    task_name="Multimodal Entity Linking",
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_split=split,
                    metric_type=name,
                    metric_name=f"{_metric_label(name)} ({split})",
                    metric_value=round(table[split][name], 6),
                )
            )
    return results


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def _get(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _clip_get(config, *path, default=None):
    node = _get(config, "clip_config")
    for key in path:
        if node is None:
            return default
        node = _get(node, key)
    return default if node is None else node


def config_markdown(config) -> str:
    describe = {
        "ot": "optimal transport (Sinkhorn)",
        "attention": "attention softmax",
        "off": "off",
    }

    def mode(name):
        value = _get(config, name)
        return describe.get(value, value)

    kd = _get(config, "distillation", "off")
    iterations = f"{_get(config, 'sinkhorn_iterations')} / {_get(config, 'sinkhorn_tolerance')}"
    distillation = kd if kd == "off" else f"{kd}, weight {_get(config, 'kd_weight')}"
    learned = "learned" if _get(config, "learnable_logit_scale", True) else "fixed"
    rows = [
        ("variant", paper_variant(config)),
        ("fusion assignment (S_F, Eq. 6-18)", mode("fusion_assignment")),
        ("unimodal assignment (S_T, S_V, Eq. 19-24)", mode("unimodal_assignment")),
        ("inference assignment (replaces OT when not training)", mode("inference_assignment")),
        ("set pooling (Eq. 14)", _get(config, "pooling")),
        ("OT-to-attention distillation (Eq. 28-29)", distillation),
        ("assignment space size D (`hidden_size`)", _get(config, "hidden_size")),
        ("Sinkhorn epsilon (`ot_epsilon`)", _get(config, "ot_epsilon")),
        ("Sinkhorn iterations (max) / tolerance", iterations),
        ("initial logit scale (1 / temperature)", f"{_get(config, 'logit_scale_init')} ({learned})"),
        ("retrieval loss weight (S_R, not in the paper)", _get(config, "retrieval_loss_weight")),
        ("max text length (tokens)", _get(config, "max_text_length")),
    ]
    image_size = _clip_get(config, "vision_config", "image_size")
    patch = _clip_get(config, "vision_config", "patch_size")
    if image_size and patch:
        rows.append(
            (
                "CLIP vision: image size / patch / visual tokens",
                f"{image_size} px / {patch} px / {(image_size // patch) ** 2 + 1} (patches + class token)",
            )
        )
    for side in ("text", "vision"):
        hidden = _clip_get(config, f"{side}_config", "hidden_size")
        layers = _clip_get(config, f"{side}_config", "num_hidden_layers")
        if hidden and layers:
            rows.append((f"CLIP {side}: hidden size / layers", f"{hidden} / {layers}"))
    projection = _clip_get(config, "projection_dim")
    if projection:
        rows.append(("CLIP projection size", projection))
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value is not None]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

# The training facts a card's table shows, in this order: key -> label. `run_mel.py` records these keys but
# `max_steps`; `epochs` (trained), `steps` and `max_steps` come from the run's `trainer_state.json` when there is one
# ([`trained_length`]).
TRAINING_FIELDS = {
    "base_model": "base model",
    "mode": "variant trained (`run_mel.py --mode`)",
    "learning_rate": "learning rate",
    "batch_size": "batch size (all processes)",
    "epochs": "epochs trained",
    "steps": "optimisation steps",
    "max_steps": "`max_steps` (set the length of training instead of `num_train_epochs`)",
    "seed": "seed",
    "train_runtime": "training time",
    "hardware": "hardware",
}
# Keys of `training` that set card metadata rather than table rows.
CARD_OPTIONS = ("synthetic", "license", "model_name", "repo_id")


def _format_value(key: str, value) -> str:
    key = str(key).replace(" ", "_")
    if key == "train_runtime" and isinstance(value, (int, float)):
        seconds = float(value)
        hours, rest = divmod(seconds, 3600)
        minutes, secs = divmod(rest, 60)
        if hours:
            text = f"{int(hours)} h {int(minutes)} min"
        else:
            text = f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"
        return f"{text} ({seconds:.0f} s)"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def trained_length(trainer_state: dict, configured_epochs=None) -> dict:
    """The length of training as the `Trainer` recorded it in `trainer_state` (a `trainer_state.json`): `epochs` (the
    epochs trained, fractional when training stopped inside an epoch) and `steps` and, when `max_steps` rather than the
    `configured_epochs` (`num_train_epochs`) set that length, `max_steps`. Facts the state lacks are left out."""
    facts = {}
    epoch, steps, max_steps = (trainer_state.get(k) for k in ("epoch", "global_step", "max_steps"))
    if isinstance(epoch, (int, float)) and math.isfinite(epoch):
        facts["epochs"] = round(float(epoch), 4)
    if isinstance(steps, int):
        facts["steps"] = steps
    if isinstance(configured_epochs, (int, float)) and isinstance(max_steps, int) and steps and epoch:
        # Trained for the configured epochs, the Trainer's max_steps is ceil(epochs * steps per epoch): any other value
        # was given as max_steps.
        overshoot = max_steps - configured_epochs * steps / epoch
        if not -1e-6 <= overshoot < 1 - 1e-6:
            facts["max_steps"] = max_steps
    return facts


def training_markdown(training: dict | None) -> str:
    """The training table: the `TRAINING_FIELDS` present in `training`, in that order. Raises `ValueError` naming any
    other key (a typo would otherwise vanish from the card)."""
    if not training:
        return "_No training details were recorded._"
    unknown = [key for key in training if key not in TRAINING_FIELDS and key not in CARD_OPTIONS]
    if unknown:
        raise ValueError(f"unknown training fact(s) {unknown}; a model card shows {', '.join(TRAINING_FIELDS)}")
    lines = ["| setting | value |", "|---|---|"]
    for key, label in TRAINING_FIELDS.items():
        if training.get(key) is not None:
            lines.append(f"| {label} | {_format_value(key, training[key])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Card
# ----------------------------------------------------------------------------------------------------------------


def usage_snippet(repo_id: str) -> str:
    """Python code that links a mention against a small KB with the checkpoint's `multimodal-entity-linking` pipeline
    (`pipeline_otmel.py`, shipped with the checkpoint), from the Hub or a folder."""
    return f'''```python
from transformers import pipeline

repo = "{repo_id}"  # a Hub repository id or a local folder
# The KB: a list of dicts as here, a datasets.Dataset, a dataset folder or Hub dataset with a "kb" config, or an entity
# index saved by OTMELLinker.save_index. Images: file paths, PIL images, bytes or None (missing or unreadable: no image).
kb = [
    {{"qid": "Q76", "name": "Barack Obama", "attributes": "Occupation: politician. Born in Honolulu.",
     "image": "entity_0.jpg"}},
    {{"qid": "Q13133", "name": "Michelle Obama", "attributes": "Occupation: lawyer. Born in Chicago.", "image": None}},
]
linker = pipeline("multimodal-entity-linking", model=repo, trust_remote_code=True, index=kb)  # encodes the KB once

mentions = [{{"mention": "Obama", "sentence": "Obama speaks to the press in Chicago.", "image": "mention_0.jpg"}}]
for mention, answers in zip(mentions, linker(mentions, top_k=5)):
    # Best first: {{"qid", "name", "score"}}; {{"qid": None, "name": None, "nil": True, "score"}} comes first when the
    # best score is below the checkpoint's NIL threshold (`nil_threshold=None` in the call turns NIL answers off).
    print(mention["mention"], [(a["name"], round(a["score"], 4)) for a in answers])
```'''


def model_snippet(repo_id: str) -> str:
    """Python code that scores mentions against entities with the model and processor alone (no index, no pipeline)."""
    return f'''```python
import torch
from transformers import AutoModel, AutoProcessor

repo = "{repo_id}"  # a Hub repository id or a local folder
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

# Images may be file paths, PIL images, bytes or None (an unreadable or missing picture counts as "no image").
kb = [
    {{"qid": "Q76", "name": "Barack Obama", "attributes": "Occupation: politician. Born in Honolulu.",
     "image": "entity_0.jpg"}},
    {{"qid": "Q13133", "name": "Michelle Obama", "attributes": "Occupation: lawyer. Born in Chicago.", "image": None}},
]
mentions = [{{"mention": "Obama", "sentence": "Obama speaks to the press in Chicago.", "image": "mention_0.jpg"}}]

with torch.no_grad():
    # Entity features do not depend on the mention: encode the KB once (in batches) and keep them.
    entities = model.encode_entities(**processor.process_entities(
        [e["name"] for e in kb], [e["attributes"] for e in kb], [e["image"] for e in kb]))
    queries = model.encode_mentions(**processor.process_mentions(
        [m["mention"] for m in mentions], [m["sentence"] for m in mentions], [m["image"] for m in mentions]))
    scores = model.score(queries, entities).overall  # (mentions, entities): S_O of the paper

top = scores.topk(min(5, len(kb)), dim=-1)
for i, m in enumerate(mentions):
    print(m["mention"], [(kb[j]["name"], round(s, 4)) for s, j in zip(top.values[i].tolist(), top.indices[i].tolist())])
```'''


def _dataset_id(dataset_name: str) -> str:
    name = os.path.basename(os.path.normpath(dataset_name)) if os.sep in dataset_name else dataset_name
    return name or dataset_name


def _looks_like_hub_id(name: str, bare_name: bool = False) -> bool:
    """Whether `name` reads as a Hub repository id and is no local path: `owner/name` (or, with `bare_name`, a name
    without owner, as Hub datasets like `squad` have)."""
    pattern = r"([\w.-]+/)?[\w.-]+" if bare_name else r"[\w.-]+/[\w.-]+"
    return not os.path.exists(name) and re.fullmatch(pattern, name) is not None and ".." not in name


def _hub_dataset_id(dataset_name: str) -> str | None:
    """`dataset_name` when it names a Hub dataset (`owner/name`, or a bare name that is no local path), else None."""
    return dataset_name if _looks_like_hub_id(dataset_name, bare_name=True) else None


def _is_synthetic(dataset_name: str, training: dict | None) -> bool:
    """`training["synthetic"]` when given; else, for local data, whether its folder (or a mention file's folder) holds
    a world written by `datasets_scripts/make_synthetic.py` or converted from one (its `ceilings.json`); else, for a
    Hub dataset, whether its name says "synth"."""
    if training and training.get("synthetic") is not None:
        return bool(training["synthetic"])
    if os.path.exists(dataset_name):
        from datasets_scripts.make_synthetic import synthetic_world

        folder = dataset_name if os.path.isdir(dataset_name) else os.path.dirname(os.path.abspath(dataset_name))
        return synthetic_world(folder) is not None
    return "synth" in dataset_name.lower()


def nil_markdown(config, metrics: dict | None) -> str:
    """What the checkpoint answers for a mention whose entity is not in the KB, with the NIL metrics of the run."""
    threshold = _get(config, "nil_threshold")
    if threshold is None:
        text = (
            "- **NIL (entity not in the KB):** this checkpoint has no NIL threshold (`nil_threshold` is None), so it "
            "always answers the best entities of the KB, even for a mention whose entity the KB lacks. To answer NIL, "
            "link a few labelled mentions (some whose entity is not in your KB) with `nil_threshold=None`, give their "
            "best scores and NIL flags to `choose_nil_threshold(scores, is_nil)` (`metrics_otmel.py`, shipped with the "
            "checkpoint), and pass the result as `nil_threshold=` (or set `config.nil_threshold`). Without any "
            "labelled example a threshold is a guess: look at the best scores of your own mentions and check a sample "
            "of those below it by hand."
        )
    else:
        text = (
            f"- **NIL (entity not in the KB):** a mention whose best score S_O is below {threshold:.4f} (chosen on the "
            'validation split to maximise NIL-aware accuracy) is answered NIL: `{"qid": null, "nil": true}` first '
            "in its list. The threshold belongs to this checkpoint and its validation data; re-choose it for another "
            "KB or domain (`choose_nil_threshold` in `metrics_otmel.py`), or pass `nil_threshold=None` to turn it off."
        )
    return text


def nil_metrics_markdown(metrics: dict | None) -> str:
    """The table of NIL prediction metrics (`eval_nil_precision`, ..., `test_nil_accuracy`), or "" when none."""
    rows = []
    for split_key, split in (("eval", "validation"), ("test", "test")):
        m = metrics or {}
        if f"{split_key}_nil_f1" in m:
            cells = [
                m.get(f"{split_key}_{k}")
                for k in ("nil_precision", "nil_recall", "nil_f1", "inkb_hits@1", "nil_accuracy")
            ]
            counts = f"{m.get(f'{split_key}_n_nil', '-')} / {m.get(f'{split_key}_n_inkb', '-')}"
            rows.append(
                f"| {split} | {counts} | " + " | ".join("-" if c is None else f"{100 * c:.2f}" for c in cells) + " |"
            )
    if not rows:
        return ""
    return (
        "NIL prediction (mentions whose entity is not in the KB; H@k and MRR above are over the in-KB mentions). "
        "In-KB H@1: in-KB mentions linked to their entity and not answered NIL; NIL-aware accuracy: over all "
        "mentions, a NIL mention answered NIL or an in-KB mention linked to its entity.\n\n"
        "| split | NIL / in-KB mentions | NIL precision (%) | NIL recall (%) | NIL F1 (%) | in-KB H@1 (%) | "
        "NIL-aware accuracy (%) |\n|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )


def build_model_card(
    config,
    *,
    dataset_name: str,
    metrics: dict | None = None,
    training: dict | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    trainer_state: dict | None = None,
) -> ModelCard:
    """The model card of [`write_model_card`], as a `huggingface_hub.ModelCard` (nothing is written or downloaded).

    `trainer_state` (the run's `trainer_state.json`, as a dict) gives the length of training ([`trained_length`]):
    `training["epochs"]` is then read as the configured `num_train_epochs`.
    """
    training = dict(training or {})
    if trainer_state:
        training.update(trained_length(trainer_state, training.get("epochs")))
    dataset_name = os.fspath(dataset_name or "")
    # The metadata names a Hub dataset only; local data (a path) is named by its folder's (or file's) base name in the
    # text and in the model-index, and the card publishes no local path.
    hub_dataset = _hub_dataset_id(dataset_name)
    dataset_id = hub_dataset or _dataset_id(os.path.abspath(dataset_name) if dataset_name else "")
    dataset_text = f"`{dataset_id}`" if hub_dataset else (f"the local dataset `{dataset_id}`" if dataset_id else "")
    if repo_id and not _looks_like_hub_id(str(repo_id)):  # a local folder (run_mel's --output_dir) names no repository
        training.setdefault("model_name", _dataset_id(os.path.abspath(str(repo_id))))
        repo_id = None
    short_name = _dataset_id(dataset_id)
    model_name = training.get("model_name") or repo_id or (f"otmel-{short_name}" if short_name else "otmel").lower()
    repo_id = repo_id or training.get("repo_id") or "your-username/" + model_name.split("/")[-1]
    license = training.get("license", license)
    table = collect_metrics(metrics)
    synthetic = _is_synthetic(dataset_name, training)
    # The `base_model` metadata must name a Hub repository; a local folder (the offline tiny CLIP) is only described.
    hub_base = bool(base_model) and _looks_like_hub_id(str(base_model))

    data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        # No Hub task fits (the Hub has no entity-linking task, and "feature-extraction" would promise a pipeline that
        # does not work); the checkpoint's own pipeline is named in the tags and the text.
        pipeline_tag=None,
        license=license,
        tags=list(TAGS) + (["synthetic-data"] if synthetic else []),
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=(["hits@k", "mrr"] if table else None),
        base_model=base_model if hub_base else None,
        # A model-index entry names its dataset: without one, the metrics are in the text only.
        eval_results=(_eval_results(table, dataset_id) if dataset_id else None) or None,
    )

    if hub_base:
        base_line = f"initialised from [`{base_model}`](https://huggingface.co/{base_model})"
    elif base_model:
        base_line = f"initialised from the CLIP checkpoint `{_dataset_id(str(base_model))}` (a local folder)"
    else:
        base_line = "with a CLIP backbone"
    data_note = (
        f"**This checkpoint was trained on synthetic data** ({dataset_text or 'a generated world'}: generated people "
        "with names, attribute sentences and pictures made of coloured shapes). It demonstrates and tests the method "
        "and the code; it knows nothing about real entities and must not be used to link real text or photos."
        if synthetic
        else f"It was trained and evaluated on {dataset_text or 'a dataset the card does not name'}; it links "
        "mentions against that dataset's KB and transfers to another KB or domain only as far as its CLIP backbone "
        "and training data allow."
    )
    variant = paper_variant(config)
    fusion, unimodal = _get(config, "fusion_assignment"), _get(config, "unimodal_assignment")
    inference = _get(config, "inference_assignment")
    if "ot" in (fusion, unimodal) and inference == "ot":
        inference_line = "At inference this checkpoint runs Sinkhorn for every OT assignment."
    else:
        inference_line = "At inference this checkpoint uses attention only (no Sinkhorn)."
    extra_losses = ""
    if (_get(config, "retrieval_loss_weight", 0) or 0) > 0 and unimodal != "off":
        extra_losses += " + w_R L_R (InfoNCE of the mention-independent score S_R)"
    if _get(config, "distillation", "off") != "off":
        extra_losses += " + w_KD L_KD (OT-to-attention distillation)"

    body = f"""
# {model_name}

An **OT-MEL** multimodal entity linker: given a mention (its surface form, the sentence around it and an optional
image) it ranks every entity of a knowledge base (name, attribute sentences, optional image). It implements Zhang et
al., ["{PAPER_TITLE}"]({PAPER_URL}) (Findings of ACL 2024) natively in 🤗 Transformers, {base_line}.

A CLIP encoder shared by mentions and entities gives text token features T and visual patch features V. Within each
side, a *correlation assignment* matches text tokens with image patches (by entropic optimal transport, solved with
Sinkhorn, or by attention), and the matched features are pooled into one multimodal vector (S_F). Between mention
and entity, tokens are matched with tokens and patches with patches (S_T, S_V). The score is
S_O = (S_F + S_T + S_V) / 3, trained with InfoNCE over in-batch negatives; optionally the OT plans are distilled into
attention so that inference can skip Sinkhorn.

- **Variant:** {variant}
- **Dataset:** {dataset_text or "not recorded"}
- **Paper:** {PAPER_URL}

## Configuration

{config_markdown(config)}

{inference_line}
Entity features do not depend on the mention and can be computed once for a whole KB; the unimodal scores S_T, S_V
are pairwise (every mention with every candidate), so large KBs are best ranked in two stages: the
mention-independent score S_R (`model.score(..., pairwise=False).retrieval`) for a shortlist, then S_O to re-rank it.

## Evaluation

The gold entity of each mention is ranked against the whole KB: rank = 1 + the number of entities scored higher + the
number of other entities tied with it (a tie never counts in its favour). H@k: share of mentions whose gold entity
ranks in the top k. MRR: mean reciprocal rank. With two-stage ranking (a shortlist by the mention-independent
score S_R, re-ranked by S_O), a gold entity missing from the shortlist ranks after it.

{metrics_markdown(metrics)}

{nil_metrics_markdown(metrics)}

For reference, the paper reports (H@1 / MRR, %) 83.30 / 88.27 on RichpediaMEL, 88.97 / 92.59 on WikiMEL and
66.07 / 75.43 on WikiDiverse for OT-MEL (OT) with CLIP ViT-B/32; numbers on other data are not comparable with these.

## Training

{training_markdown(training)}

Loss: J = L_O + L_F + L_T + L_V (InfoNCE of S_O, S_F, S_T, S_V over in-batch negatives, duplicate gold entities
masked){extra_losses}.

## Intended use and limitations

Intended for research on multimodal entity linking: ranking the entities of a KB for mentions in text with images, in
the setting of WikiMEL / RichpediaMEL / WikiDiverse (MIMIC "cleaned" format).

{data_note}

{nil_markdown(config, metrics)}
- Inputs are truncated to {_get(config, "max_text_length")} tokens; long attribute texts lose their end.
- Pictures are resized and centre-cropped to the CLIP input size; a missing or unreadable picture is handled as "no
  image" (a learned embedding), never as a blank picture.
- It inherits the biases and the domain of its CLIP backbone and of its training data.
- Exhaustive pairwise scoring costs one unimodal matching per (mention, entity) pair; use a shortlist for large KBs.

## How to use

The code ships with the checkpoint (`trust_remote_code=True`; it needs `torch`, `transformers`, `datasets` and
`Pillow`). The `multimodal-entity-linking` pipeline encodes the KB once and links mentions against it (two-stage
ranking: a shortlist by S_R, re-ranked by S_O):

{usage_snippet(repo_id)}

The model and processor alone score mentions against entities:

{model_snippet(repo_id)}

The pipeline wraps the linker of `linking_otmel.py` (also shipped with the checkpoint), which can save and reload the
encoded KB:

{linker_snippet(repo_id)}

## Citation

```bibtex
{PAPER_CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def linker_snippet(repo_id: str) -> str:
    """Python code that links with `OTMELLinker`, imported from the checkpoint's own `linking_otmel.py` as
    `trust_remote_code=True` does (no checkout needed), after the snippets of [`usage_snippet`] (`kb`, `mentions`)."""
    return f'''```python
from transformers.dynamic_module_utils import get_class_from_dynamic_module

repo = "{repo_id}"  # a Hub repository id or a local folder
# linking_otmel.py ships with the checkpoint: this imports it from there (a checkout of otmel's code is not needed).
OTMELLinker = get_class_from_dynamic_module("linking_otmel.OTMELLinker", repo)
linker = OTMELLinker.from_pretrained(repo)
linker.build_index(kb)  # a list of dicts as above, or a `datasets.Dataset` with columns qid, name, attributes, image
print(linker.link(mentions, top_k=5))  # per mention: [{{"qid", "name", "score"}}, ...], best first
```'''


def write_model_card(output_dir, config, **card_args) -> str:
    """Writes `output_dir/README.md` (created if needed), the card of [`build_model_card`]; returns its path.

    `card_args` are those of [`build_model_card`]: `dataset_name` (a Hub dataset id, or a local folder or file, of
    which only the base name is shown; a world of `make_synthetic.py`, a Hub name containing "synth", or
    `training["synthetic"]` marks the card as trained on synthetic data), `metrics` (Trainer-style `eval_hits@1`, ...,
    `eval_mrr`, `test_...`; fractions are shown as percentages), `training` (facts shown as a table), `trainer_state`
    (default: the `trainer_state.json` of `output_dir`, when there is one), `base_model`, `repo_id` (what the
    snippets load) and `license`.
    """
    state_path = os.path.join(os.fspath(output_dir), "trainer_state.json")
    if card_args.get("trainer_state") is None and os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            card_args["trainer_state"] = json.load(f)
    card = build_model_card(config, **card_args)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(os.fspath(output_dir), "README.md")
    card.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------------


def hub_files(output_dir) -> list[str]:
    """The files of `output_dir` that [`push_folder_to_hub`] uploads (relative POSIX paths, sorted)."""
    from huggingface_hub.utils import filter_repo_objects

    try:  # what upload_folder always adds (.git/, .cache/huggingface/, ...)
        from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS as HUB_DEFAULT_IGNORE
    except ImportError:  # pragma: no cover - depends on the huggingface_hub version
        HUB_DEFAULT_IGNORE = [".git", ".git/*", "*/.git", "**/.git/**", ".cache/huggingface", ".cache/huggingface/*"]

    root = os.fspath(output_dir)
    paths = []
    for folder, _, files in os.walk(root):
        for name in files:
            paths.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(filter_repo_objects(paths, ignore_patterns=HUB_IGNORE_PATTERNS + list(HUB_DEFAULT_IGNORE)))


def push_folder_to_hub(
    output_dir, repo_id: str, *, private: bool | None = None, token=None, commit_message: str | None = None
):
    """Uploads the checkpoint folder (weights, config, remote code, processor files, README.md) to `repo_id`.

    Trainer checkpoints, optimizer / RNG states and logs are left out (`HUB_IGNORE_PATTERNS`). Needs the network and a
    token with write access.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(output_dir),
        ignore_patterns=list(HUB_IGNORE_PATTERNS),
        commit_message=commit_message or "Upload OT-MEL checkpoint",
    )


__all__ = [
    "write_model_card",
    "build_model_card",
    "metrics_markdown",
    "collect_metrics",
    "paper_variant",
    "usage_snippet",
    "model_snippet",
    "linker_snippet",
    "trained_length",
    "nil_markdown",
    "nil_metrics_markdown",
    "hub_files",
    "push_folder_to_hub",
    "HUB_IGNORE_PATTERNS",
]
