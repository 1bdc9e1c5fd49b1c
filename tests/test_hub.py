"""The folder a Hub user downloads: model card, config with auto_map, weights, remote code, processor files; it loads in
a fresh process with AutoModel / AutoProcessor (trust_remote_code) and scores as the original model does. Also the
pictures of visualize_otmel.py. Offline: nothing here reaches the network (push_to_hub is never called)."""

import json
import os
import re
import subprocess
import sys

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from huggingface_hub import ModelCard  # noqa: E402
from transformers import AutoImageProcessor, AutoTokenizer  # noqa: E402

import visualize_otmel  # noqa: E402
from datasets_scripts.make_synthetic import generate  # noqa: E402
from model_card import build_model_card, collect_metrics, hub_files, metrics_markdown, write_model_card  # noqa: E402
from modeling_otmel import OTMELModel  # noqa: E402
from pipeline_otmel import save_pipeline_files  # noqa: E402
from processing_otmel import OTMELProcessor  # noqa: E402
from tiny_clip import build_tiny_clip  # noqa: E402


TEXTS = [
    "barack obama [SEP] occupation politician. born in honolulu. member of the senate.",
    "obama speaks to the press in chicago about the election",
    "michelle obama [SEP] occupation lawyer. born in chicago.",
    "ada lovelace [SEP] occupation mathematician. born in london.",
] * 5
METRICS = {
    **{f"eval_hits@{k}": 0.40 + 0.05 * i for i, k in enumerate((1, 3, 5, 10, 20))},
    **{f"test_hits@{k}": 0.38 + 0.05 * i for i, k in enumerate((1, 3, 5, 10, 20))},
    "eval_mrr": 0.5123,
    "test_mrr": 0.4987,
    "eval_loss": 3.2,  # not a ranking metric: ignored by the card
    "eval_runtime": 12.5,
}
TRAINING = {
    "learning_rate": 2e-4,
    "batch_size": 32,
    "epochs": 3,
    "steps": 120,
    "seed": 0,
    "base_model": "tiny offline CLIP (tiny_clip.py)",
    "hardware": "CPU, 2 cores",
    "train_runtime": 95.0,
}
KB = [
    ("Barack Obama", "Occupation: politician. Born in Honolulu.", "red"),
    ("Michelle Obama", "Occupation: lawyer. Born in Chicago.", None),
    ("Ada Lovelace", "Occupation: mathematician. Born in London.", "blue"),
]
MENTIONS = [
    ("Obama", "Obama speaks to the press in Chicago about the election", "red"),
    ("Ada", "Ada wrote the first program", None),
]


def _picture(path, colour):
    image = Image.new("RGB", (96, 80), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 50, 50), fill=colour)
    draw.rectangle((55, 40, 90, 75), fill=(30, 160, 60))
    image.save(path)
    return str(path)


def _scores(model, processor, kb_images, mention_images):
    with torch.no_grad():
        entities = model.encode_entities(
            **processor.process_entities([n for n, _, _ in KB], [a for _, a, _ in KB], kb_images)
        )
        mentions = model.encode_mentions(
            **processor.process_mentions([m for m, _, _ in MENTIONS], [s for _, s, _ in MENTIONS], mention_images)
        )
        return model.score(mentions, entities).overall


@pytest.fixture(scope="module")
def hub_setup(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    clip_dir = build_tiny_clip(str(root / "clip"), TEXTS, vocab_size=300)
    model = OTMELModel.from_clip(clip_dir, hidden_size=32).eval()
    processor = OTMELProcessor(AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir))
    images = root / "images"
    images.mkdir()
    kb_images = [_picture(images / f"entity_{i}.png", c) if c else None for i, (_, _, c) in enumerate(KB)]
    mention_images = [_picture(images / f"mention_{i}.png", c) if c else None for i, (_, _, c) in enumerate(MENTIONS)]
    reference = _scores(model, processor, kb_images, mention_images)

    folder = root / "otmel-synthetic-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipeline_files(folder, model.config)  # what run_mel.py does: the card's snippet uses the pipeline
    # A world of make_synthetic.py whose name does not say so: the card knows it from its content.
    world = root / "world"
    generate(world, entities=12, mentions=20, seed=1, image_size=16, workers=1)
    write_model_card(
        folder, model.config, dataset_name=str(world), metrics=METRICS, training=TRAINING, base_model=clip_dir
    )
    return {
        "root": root,
        "clip_dir": clip_dir,
        "model": model,
        "processor": processor,
        "folder": folder,
        "kb_images": kb_images,
        "mention_images": mention_images,
        "reference": reference,
    }


# ---- the model card ------------------------------------------------------------------------------------------


def test_model_card_metadata_and_body(hub_setup):
    card = ModelCard.load(hub_setup["folder"] / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag is None  # no Hub task fits; the checkpoint's own pipeline is in the tags and the text
    assert data.license
    for tag in ("entity-linking", "multimodal-entity-linking", "multimodal", "optimal-transport", "clip"):
        assert tag in data.tags
    # A local dataset folder or CLIP folder is no Hub repository: it is named (by its base name) in the text, and the
    # metadata publishes no local path.
    assert data.datasets is None
    assert data.base_model is None
    assert str(hub_setup["root"]) not in data.to_yaml()
    assert {r.dataset_name for r in data.eval_results} == {r.dataset_type for r in data.eval_results} == {"world"}
    # The world was generated by make_synthetic.py (its ceilings.json says so), though its name does not say "synth".
    assert "synthetic-data" in data.tags
    assert "must not be used to link real text" in card.text
    assert "- **Dataset:** the local dataset `world`" in card.text
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert len(results) == 12
    assert results[("validation", "hits@1")] == pytest.approx(0.40)
    assert results[("test", "mrr")] == pytest.approx(0.4987)

    text = card.text
    assert "https://arxiv.org/abs/2406.01934" in text
    assert "| split | H@1 (%) | H@3 (%) | H@5 (%) | H@10 (%) | H@20 (%) | MRR (%) |" in text
    assert "| validation | 40.00 | 45.00 | 50.00 | 55.00 | 60.00 | 51.23 |" in text
    assert "| test | 38.00 | 43.00 | 48.00 | 53.00 | 58.00 | 49.87 |" in text
    for setting in ("fusion assignment", "unimodal assignment", "set pooling", "distillation", "inference assignment"):
        assert setting in text
    assert "| Sinkhorn epsilon (`ot_epsilon`) | 0.1 |" in text
    assert "| assignment space size D (`hidden_size`) | 32 |" in text
    assert "| learning rate | 0.0002 |" in text
    assert "trained on synthetic data" in text
    assert 'pipeline("multimodal-entity-linking", model=repo, trust_remote_code=True, index=kb)' in text
    assert "AutoModel.from_pretrained(repo, trust_remote_code=True)" in text
    assert "AutoProcessor.from_pretrained(repo, trust_remote_code=True)" in text
    assert "OTMELLinker.from_pretrained(" in text and ".link(" in text


def test_model_card_variants_and_missing_metrics(tmp_path):
    from configuration_otmel import OTMELConfig

    kd = OTMELConfig(distillation="kl", inference_assignment="attention")
    path = write_model_card(
        tmp_path, kd, dataset_name="WikiMEL", metrics={}, training=None, base_model="openai/clip-vit-base-patch32"
    )
    card = ModelCard.load(path)
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert card.data.eval_results is None
    assert "OT-MEL (KD)" in card.text and "attention only (no Sinkhorn)" in card.text
    assert "No evaluation metrics were recorded" in card.text
    assert "trained on synthetic data" not in card.text
    # Metrics already in percent stay as they are; aliases of the split and metric names are understood.
    assert collect_metrics({"validation_h@1": 81.0, "dev_mrr": 86.9, "test_hits_at_5": 90.0, "epoch": 3}) == {
        "validation": {"hits@1": 81.0, "mrr": 86.9},
        "test": {"hits@5": 90.0},
    }
    table = metrics_markdown({"eval_hits@1": 81.0, "eval_mrr": 86.9, "test_hits@5": 90.0})
    assert "| validation | 81 | - | 86.9 |" in table


def test_model_card_dataset_names(tmp_path):
    from configuration_otmel import OTMELConfig

    config = OTMELConfig()
    metrics = {"eval_hits@1": 0.5}
    # A Hub dataset id goes into the metadata whole.
    card = build_model_card(config, dataset_name="org/wikimel", metrics=metrics)
    assert card.data.datasets == ["org/wikimel"] and card.data.model_name == "otmel-wikimel"
    assert {r.dataset_type for r in card.data.eval_results} == {"org/wikimel"}
    # No dataset named: no datasets metadata, no model-index (it needs a dataset), no "otmel-" name.
    card = build_model_card(config, dataset_name="", metrics=metrics)
    assert card.data.datasets is None and card.data.eval_results is None and card.data.model_name == "otmel"
    assert "- **Dataset:** not recorded" in card.text and "| validation | 50.00 |" in card.text
    # A local folder that is no synthetic world (whatever its name): named by its base name in the text only.
    folder = tmp_path / "synth_like_but_real"
    folder.mkdir()
    (folder / "kb_entity.json").write_text("[]")
    card = build_model_card(config, dataset_name=str(folder) + os.sep, metrics=metrics)
    assert card.data.datasets is None and str(tmp_path) not in str(card)
    assert card.data.model_name == "otmel-synth_like_but_real" and "synthetic-data" not in card.data.tags
    assert "trained and evaluated on the local dataset `synth_like_but_real`" in card.text


def test_model_card_leaves_non_finite_metrics_out_of_the_model_index():
    from configuration_otmel import OTMELConfig

    metrics = {"eval_hits@1": 0.5, "eval_mrr": float("nan"), "test_hits@1": 0.75, "test_mrr": float("inf")}
    card = build_model_card(OTMELConfig(), dataset_name="org/wikimel", metrics=metrics)
    assert {(r.dataset_split, r.metric_type) for r in card.data.eval_results} == {
        ("validation", "hits@1"),
        ("test", "hits@1"),
    }
    assert "nan" not in card.data.to_yaml().lower() and "inf" not in card.data.to_yaml().lower()
    # The table still shows them (the finite ones as percentages) and says what the metadata leaves out.
    assert "| validation | 50.00 | nan |" in card.text and "| test | 75.00 | inf |" in card.text
    assert "left out of the model-index metadata: validation MRR, test MRR" in card.text


def test_model_card_reports_the_length_trained(tmp_path):
    """With --max_steps 3 a run configured for 20 epochs trains 0.2 epoch: the card says so (from trainer_state.json),
    not the configured 20."""
    from configuration_otmel import OTMELConfig

    state = {"epoch": 0.2, "global_step": 3, "max_steps": 3, "num_train_epochs": 1, "log_history": []}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    training = {"epochs": 20.0, "steps": 3, "learning_rate": 3e-3}
    text = ModelCard.load(write_model_card(tmp_path, OTMELConfig(), dataset_name="x/y", training=training)).text
    assert "| epochs trained | 0.2 |" in text and "| 20 |" not in text
    assert re.search(r"^\| `max_steps` .* \| 3 \|$", text, re.M), text
    # Trained for the configured epochs (5 steps an epoch): no max_steps row.
    state = {"epoch": 20.0, "global_step": 100, "max_steps": 100}
    text = build_model_card(OTMELConfig(), dataset_name="x/y", training=training, trainer_state=state).text
    assert "| epochs trained | 20 |" in text and "| optimisation steps | 100 |" in text and "max_steps" not in text
    # 2.5 epochs of 3 steps: the Trainer rounds up to 8 steps (2.67 epochs), still no max_steps.
    state = {"epoch": 8 / 3, "global_step": 8, "max_steps": 8}
    text = build_model_card(OTMELConfig(), dataset_name="x/y", training={"epochs": 2.5}, trainer_state=state).text
    assert "| epochs trained | 2.6667 |" in text and "max_steps" not in text


# ---- the folder a Hub user gets ------------------------------------------------------------------------------


def test_folder_holds_what_a_hub_user_needs(hub_setup):
    folder = hub_setup["folder"]
    # Leftovers of a training run must not be uploaded.
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"x")
    (folder / "training_args.bin").write_bytes(b"x")
    try:
        files = set(hub_files(folder))
    finally:
        (folder / "checkpoint-5" / "model.safetensors").unlink()
        (folder / "checkpoint-5").rmdir()
        (folder / "training_args.bin").unlink()
    needed = {
        "README.md",
        "config.json",
        "model.safetensors",
        "configuration_otmel.py",
        "modeling_otmel.py",
        "processing_otmel.py",
        "pipeline_otmel.py",
        "linking_otmel.py",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert needed <= files, needed - files
    assert not any(f.startswith("checkpoint-") or f == "training_args.bin" or "__pycache__" in f for f in files)

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "otmel"
    assert config["custom_pipelines"]["multimodal-entity-linking"]["impl"] == "pipeline_otmel.OTMELPipeline"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_otmel.OTMELConfig",
        "AutoModel": "modeling_otmel.OTMELModel",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_otmel.OTMELProcessor"
    assert "image_processor" in processor_config or (folder / "preprocessor_config.json").exists()
    # The remote code is the checkout's code.
    for name in ("configuration_otmel.py", "modeling_otmel.py", "processing_otmel.py"):
        assert (folder / name).read_text() == open(os.path.join(REPO, name)).read()


FRESH_PROCESS = r"""
import importlib.util, json, os, re, sys
# A user without the checkout: drop an editable install of it (a finder on sys.meta_path) and its folder on sys.path.
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(sys.argv[2])]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("modeling_otmel") is None, "the checkout leaked into the fresh process"
import torch
from transformers import AutoModel, AutoProcessor

folder, kb, kb_images, mentions, mention_images = json.load(open(sys.argv[1]))
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__name__ == "OTMELModel" and type(processor).__name__ == "OTMELProcessor", (model, processor)
assert "transformers_modules" in type(model).__module__, type(model).__module__
with torch.no_grad():
    entities = model.encode_entities(**processor.process_entities([k[0] for k in kb], [k[1] for k in kb], kb_images))
    queries = model.encode_mentions(
        **processor.process_mentions([m[0] for m in mentions], [m[1] for m in mentions], mention_images)
    )
    scores = model.score(queries, entities).overall
print("SCORES " + json.dumps(scores.tolist()))

# The model card's snippets (the pipeline, the model alone, the linker), run in turn as a user would (their repository
# id replaced by the folder): the linker's uses the first one's kb and mentions.
card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
namespace = {}
for i, snippet in enumerate(re.findall(r"```python\n(.*?)```", card, re.S)):
    snippet = re.sub(r'^repo = "[^"]*"', "repo = " + json.dumps(folder), snippet, count=1, flags=re.M)
    exec(compile(snippet, f"model_card_snippet_{i}", "exec"), namespace)
    print(f"SNIPPET {i} OK")
"""


def test_loads_in_a_fresh_process_and_scores_the_same(hub_setup, tmp_path):
    folder = str(hub_setup["folder"])
    args = tmp_path / "args.json"
    json.dump([folder, KB, hub_setup["kb_images"], MENTIONS, hub_setup["mention_images"]], args.open("w"))
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    # The snippet's pictures: one present, one missing (counts as "no image").
    _picture(workdir / "entity_0.jpg", "red")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONNOUSERSITE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(args), REPO],  # -I: neither the environment nor the cwd on sys.path
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("SCORES "))
    scores = torch.tensor(json.loads(line[len("SCORES ") :]))
    torch.testing.assert_close(scores, hub_setup["reference"], rtol=1e-5, atol=1e-5)
    # The snippets printed their ranking of the KB for the mention; the linker's (from the checkpoint's own
    # linking_otmel.py: there is no checkout) too.
    assert re.search(r"^Obama \[\('(Barack|Michelle) Obama'", result.stdout, re.M), result.stdout
    assert [line for line in result.stdout.splitlines() if line.startswith("SNIPPET")] == [
        f"SNIPPET {i} OK" for i in range(3)
    ]
    assert re.search(r"^\[\[\{'qid': 'Q(76|13133)'", result.stdout, re.M), result.stdout


# ---- pictures ------------------------------------------------------------------------------------------------


def _png_ok(path, min_bytes=20_000):
    assert os.path.getsize(path) > min_bytes
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 400


def test_correlation_maps_function(hub_setup, tmp_path):
    import matplotlib.pyplot as plt

    model, processor = hub_setup["model"], hub_setup["processor"]
    mention, sentence, _ = MENTIONS[0]
    maps = visualize_otmel.correlation_maps(model, processor, mention, sentence, hub_setup["mention_images"][0])
    n_tokens = len(maps["tokens"])
    assert maps["attention"].shape == maps["ot"].shape == (n_tokens, 17)
    assert maps["tokens"][0] == "<start>" and maps["tokens"][-1] == "<end>"
    # v2t: every text token distributes one unit of mass over the visual tokens, in both maps.
    torch.testing.assert_close(torch.tensor(maps["attention"].sum(1)), torch.ones(n_tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(maps["ot"].sum(1)), torch.ones(n_tokens), atol=2e-2, rtol=0)
    assert abs(maps["plan"].sum() - 1) < 1e-4
    # The model's own fusion map (OT at inference) is the OT map computed here.
    batch = processor.process_mentions([mention], [sentence], [hub_setup["mention_images"][0]])
    with torch.no_grad():
        own = model.encode_mentions(**batch, output_maps=True).fusion_maps["v2t"]["assignment"][0]
    torch.testing.assert_close(torch.tensor(maps["ot"]), own, atol=1e-5, rtol=0)

    out = tmp_path / "maps.png"
    fig = visualize_otmel.plot_correlation_maps(maps=maps, token="chicago", out=str(out))
    plt.close(fig)
    _png_ok(out)
    out = tmp_path / "maps_t2v.png"
    fig = visualize_otmel.plot_correlation_maps(
        model,
        processor,
        KB[0][0],
        KB[0][1],
        hub_setup["kb_images"][0],
        side="entity",
        direction="t2v",
        token=1,
        out=str(out),
    )
    plt.close(fig)
    _png_ok(out)
    with pytest.raises(ValueError, match="not in the text"):
        visualize_otmel.plot_correlation_maps(maps=maps, token="zebra")
    with pytest.raises(ValueError, match="could not be read"):
        visualize_otmel.correlation_maps(model, processor, mention, sentence, None)
    plt.close("all")


def test_maps_cli(hub_setup, tmp_path):
    out = tmp_path / "cli_maps.png"
    name, attributes, _ = KB[2]
    code = visualize_otmel.main(
        [
            "maps",
            "--model",
            str(hub_setup["folder"]),
            "--side",
            "entity",
            "--entity_name",
            name,
            "--entity_attributes",
            attributes,
            "--entity_image",
            hub_setup["kb_images"][2],
            "--token",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    _png_ok(out)
    with pytest.raises(SystemExit):  # the chosen side's picture is required
        visualize_otmel.main(["maps", "--model", str(hub_setup["folder"]), "--mention", "Obama", "--out", str(out)])


def test_maps_refuse_a_model_without_fusion(hub_setup, tmp_path):
    model = OTMELModel.from_clip(hub_setup["clip_dir"], hidden_size=16, fusion_assignment="off").eval()
    with pytest.raises(ValueError, match="fusion_assignment='off'"):
        visualize_otmel.correlation_maps(model, hub_setup["processor"], "Obama", "x", hub_setup["mention_images"][0])
    folder = tmp_path / "no_fusion"
    model.save_pretrained(folder)
    hub_setup["processor"].save_pretrained(folder)
    with pytest.raises(SystemExit) as exit_info:
        visualize_otmel.main(
            [
                "maps",
                "--model",
                str(folder),
                "--mention",
                "Obama",
                "--mention_image",
                hub_setup["mention_images"][0],
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
    assert exit_info.value.code == 2
    assert not (tmp_path / "x.png").exists()


def _log_history(with_eval: bool):
    history = []
    for step in range(5, 105, 5):
        history.append(
            {
                "step": step,
                "epoch": step / 50,
                "loss": 8 - step / 20,
                "loss_o": 2 - step / 80,
                "loss_t": 2.5 - step / 70,
                "loss_v": 3 - step / 60,
                "loss_kd": 0.2,
                "learning_rate": 1e-4,
            }
        )
        if with_eval and step % 25 == 0:
            history.append(
                {"step": step, "epoch": step / 50, "eval_mrr": 0.3 + step / 500, "eval_hits@1": 0.2 + step / 600}
            )
    history.append({"step": 100, "epoch": 2.0, "train_runtime": 10.0, "train_loss": 5.0})
    return history


def test_training_curves(tmp_path):
    import matplotlib.pyplot as plt

    run = tmp_path / "run"
    (run / "checkpoint-50").mkdir(parents=True)
    (run / "checkpoint-100").mkdir()
    full = _log_history(with_eval=True)
    early = {"log_history": [e for e in full if e["step"] <= 50]}
    json.dump(early, (run / "checkpoint-50" / "trainer_state.json").open("w"))
    json.dump({"log_history": full}, (run / "checkpoint-100" / "trainer_state.json").open("w"))
    # The latest checkpoint is found (numerically: checkpoint-100 after checkpoint-50).
    assert visualize_otmel.find_trainer_state(str(run)).endswith(os.path.join("checkpoint-100", "trainer_state.json"))

    fig = visualize_otmel.plot_training_curves(str(run), out=str(tmp_path / "curves.png"))
    loss_ax, eval_ax = fig.axes[:2]
    assert {line.get_label() for line in loss_ax.get_lines()} == {
        visualize_otmel.loss_labels()[k] for k in ("loss", "loss_o", "loss_t", "loss_v", "loss_kd")
    }
    assert {line.get_label() for line in eval_ax.get_lines()} == {"validation MRR", "validation H@1"}
    assert loss_ax.get_xlabel() and loss_ax.get_ylabel() and eval_ax.get_xlabel()
    plt.close(fig)
    _png_ok(tmp_path / "curves.png")

    # Without evaluation entries (and from a state dict): the loss panel only, the other one says so.
    no_eval = {"log_history": _log_history(with_eval=False)}
    fig = visualize_otmel.plot_training_curves(no_eval, out=str(tmp_path / "c2.png"))
    assert fig.axes[1].get_lines() == [] and "no evaluation logged" in [t.get_text() for t in fig.axes[1].texts]
    plt.close(fig)
    _png_ok(tmp_path / "c2.png")

    # The CLI, on a run folder with its own trainer_state.json.
    (run / "trainer_state.json").write_text(json.dumps({"log_history": full}))
    assert visualize_otmel.main(["curves", "--run_dir", str(run), "--out", str(tmp_path / "c3.png")]) == 0
    _png_ok(tmp_path / "c3.png")
    with pytest.raises(SystemExit):
        visualize_otmel.main(["curves", "--run_dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "c4.png")])


def test_visualize_cli_errors_are_one_line(hub_setup, tmp_path, capsys):
    """Bad input ends with one "error: " line naming what is wrong and status 2, never a traceback; the path printed
    is the file written."""

    def error_of(argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            visualize_otmel.main(argv)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("usage: ") and " error: " in lines[1], lines
        return lines[-1]

    picture = hub_setup["mention_images"][0]
    missing = tmp_path / "nope"
    line = error_of(["maps", "--model", str(missing), "--mention", "Obama", "--mention_image", picture, "--out", "x"])
    assert f"--model {missing}: could not load an OT-MEL model and processor (no such local folder" in line

    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text("garbage")
    line = error_of(["curves", "--run_dir", str(run / "trainer_state.json"), "--out", str(tmp_path / "c.png")])
    assert f"{run / 'trainer_state.json'}: not valid JSON" in line
    assert f"{run / 'trainer_state.json'}: not valid JSON" in error_of(
        ["curves", "--run_dir", str(run), "--out", str(tmp_path / "c.png")]
    )
    (run / "trainer_state.json").write_text("[1, 2]")
    assert "not a trainer state" in error_of(["curves", "--run_dir", str(run), "--out", str(tmp_path / "c.png")])

    # --out without an extension: matplotlib writes a PNG with one, and that is the path printed.
    (run / "trainer_state.json").write_text(json.dumps({"log_history": _log_history(with_eval=False)}))
    capsys.readouterr()
    assert visualize_otmel.main(["curves", "--run_dir", str(run), "--out", str(tmp_path / "curves16")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves16.png")
    _png_ok(tmp_path / "curves16.png")
    assert not (tmp_path / "curves16").exists()

    # A file that cannot be written: the OS's own reason, naming the path.
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "c.png"
    line = error_of(["curves", "--run_dir", str(run), "--out", str(out)])
    assert f"--out {out}: could not write {out}: " in line and str(tmp_path / "a_file") in line
    if os.path.isdir("/proc"):
        try:
            open("/proc/otmel_forbidden.png", "wb").close()
        except OSError as err:
            line = error_of(["curves", "--run_dir", str(run), "--out", "/proc/otmel_forbidden.png"])
            assert f"could not write /proc/otmel_forbidden.png: {err.strerror}" in line


def test_a_resaved_model_keeps_its_pipeline(hub_setup, tmp_path, monkeypatch, caplog):
    """`save_pretrained` of a model whose config names the pipeline writes the pipeline's modules too: from the
    importable module, else from the folder it was loaded from; with neither, the config stops naming it."""
    import importlib

    model = OTMELModel.from_pretrained(hub_setup["folder"])
    assert model.config.custom_pipelines
    needed = {"pipeline_otmel.py", "linking_otmel.py", "index_otmel.py", "ranking_otmel.py", "metrics_otmel.py"}

    def saved(name):
        folder = tmp_path / name
        model.save_pretrained(folder)
        with open(folder / "config.json", encoding="utf-8") as f:
            return set(os.listdir(folder)), json.load(f).get("custom_pipelines")

    files, entry = saved("importable")
    assert needed <= files and entry == model.config.custom_pipelines
    real = importlib.import_module

    def no_pipeline(name, *args):
        if name.endswith("pipeline_otmel"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_pipeline)
    files, entry = saved("from-source")  # name_or_path: the hub folder, which holds the modules
    assert needed <= files and entry == model.config.custom_pipelines
    model.name_or_path = str(tmp_path / "nowhere")
    with caplog.at_level("WARNING"):
        files, entry = saved("without")
    assert "pipeline_otmel.py" not in files and entry is None and "saved without it" in caplog.text
