#!/usr/bin/env python
"""Pictures of an OT-MEL model: token-to-patch correlation maps (the paper's Figure 4) and training curves.

    python visualize_otmel.py maps --model outputs/demo --side mention \\
        --mention "Obama" --sentence "Obama speaks in Chicago." --mention_image mention.jpg \\
        --entity_name "Barack Obama" --entity_attributes "Politician. Born in Honolulu." --entity_image entity.jpg \\
        [--token obama | --token 1] [--direction v2t] --out maps.png

    python visualize_otmel.py curves --run_dir outputs/demo --out curves.png

`maps` draws, for one side (mention or entity), the attention matrix and the OT plan of the same projections of the
multimodal-fusion layer (text tokens x visual tokens, both computed from the trained W_q, W_k), then the picture as the
model sees it and the two maps of one chosen token over the patch grid. Only the chosen side's inputs are needed.
`curves` plots every loss term logged in a run's `trainer_state.json` and the validation MRR / H@1.

Importable: `correlation_maps`, `plot_correlation_maps`, `load_log_history`, `plot_training_curves`.
"""

import argparse
import errno
import glob
import json
import math
import os
import re
import sys

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402


def loss_labels() -> dict:
    """Legend label of each logged loss: the total J and the terms of `modeling_otmel.LOSS_TERMS`."""
    from modeling_otmel import LOSS_TERMS

    return {"loss": "loss (total J)", **{key: f"{key} ({text.split(':')[0]})" for key, text in LOSS_TERMS.items()}}


_SPECIAL = {"<|startoftext|>": "<start>", "<|endoftext|>": "<end>"}


# ----------------------------------------------------------------------------------------------------------------
# Correlation maps
# ----------------------------------------------------------------------------------------------------------------


def _clean_token(token: str) -> str:
    token = _SPECIAL.get(token, token)
    for marker in ("</w>", "Ġ", "▁"):
        token = token.replace(marker, "")
    return token or "␣"


def _picture(pixel_values, image_processor) -> np.ndarray:
    """The model's input picture (after resize and crop) as an (H, W, 3) array in [0, 1]."""
    mean = np.asarray(getattr(image_processor, "image_mean", None) or [0.0, 0.0, 0.0], dtype=np.float32)
    std = np.asarray(getattr(image_processor, "image_std", None) or [1.0, 1.0, 1.0], dtype=np.float32)
    array = pixel_values.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(array * std + mean, 0.0, 1.0)


def correlation_maps(
    model, processor, first: str, second: str, image, *, side: str = "mention", direction: str = "v2t"
) -> dict:
    """Attention and OT maps between the text tokens and visual tokens of one mention or entity.

    Both maps come from the same projections of the model's multimodal-fusion layer (`text_from_visual` for
    `direction="v2t"`, rows are text tokens; `visual_from_text` for `"t2v"`, rows are visual tokens), through
    [`~OTMELModel.fusion_maps`] with `mode="attention"` and `mode="ot"`.

    Args:
        model ([`OTMELModel`]): with `fusion_assignment` "ot" or "attention" (not "off").
        processor ([`OTMELProcessor`]).
        first, second (`str`): mention surface and sentence (`side="mention"`) or entity name and attributes.
        image: a path, PIL image, bytes or `datasets` image dict (required: the maps are between text and image).
        side (`str`): "mention" or "entity".
        direction (`str`): "v2t" (G^{v->t}, paper Figure 4) or "t2v".

    Returns:
        `dict` with `tokens` (list of L_t strings), `attention`, `ot` (both `(L_t, L_v)` numpy arrays, normalised along
        the assignment axis: rows for "v2t", columns for "t2v"), `plan` (the raw OT plan, total mass 1, `(L_t, L_v)`),
        `picture` (`(H, W, 3)` in [0, 1]), `grid` (patches per side), and `side`, `direction`, `text`, `model_mode`
        (what the model itself uses in this layer at inference), `epsilon`, `iterations`.
    """
    import torch

    config = model.config
    if config.fusion_assignment == "off":
        raise ValueError(
            "this model has fusion_assignment='off': it has no token-to-patch correlation layer, so there are no "
            "correlation maps to draw (only models with fusion_assignment 'ot' or 'attention' have them)"
        )
    if side not in ("mention", "entity"):
        raise ValueError(f"side must be 'mention' or 'entity', got {side!r}")
    if direction not in ("v2t", "t2v"):
        raise ValueError(f"direction must be 'v2t' or 't2v', got {direction!r}")
    if side == "mention":
        batch = processor.process_mentions([first], [second], [image])
    else:
        batch = processor.process_entities([first], [second], [image])
    if not bool(batch["has_image"][0]):
        raise ValueError(f"the {side} image could not be read ({image!r}): the maps need a picture")

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens = model.encode_tokens(
                batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["has_image"]
            )
            maps = {mode: model.fusion_maps(tokens, mode)[direction] for mode in ("attention", "ot")}
            attention, ot, plan = maps["attention"]["assignment"], maps["ot"]["assignment"], maps["ot"]["plan"]
            text_mask, visual_mask = tokens.text_mask, tokens.visual_mask
            model_mode = model.assignment_mode(config.fusion_assignment)
    finally:
        model.train(was_training)

    n_text = int(text_mask[0].sum())
    n_visual = int(visual_mask[0].sum())

    def crop(x):  # (1, n_q, n_k) -> (L_t, L_v) without padding
        x = x[0].float().cpu().numpy()
        x = x[:n_text, :n_visual] if direction == "v2t" else x[:n_visual, :n_text].T
        return x

    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    tokens = [_clean_token(t) for t in processor.tokenizer.convert_ids_to_tokens(ids)]
    vision = config.clip_config.vision_config
    return {
        "tokens": tokens,
        "attention": crop(attention),
        "ot": crop(ot),
        "plan": crop(plan),
        "picture": _picture(batch["pixel_values"][0], processor.image_processor),
        "grid": vision.image_size // vision.patch_size,
        "side": side,
        "direction": direction,
        "text": f"{first} | {second}",
        "model_mode": model_mode,
        "epsilon": config.ot_epsilon,
        "iterations": config.sinkhorn_iterations,
    }


def _choose_token(tokens: list[str], token) -> int:
    """Index of the token to show on the image: an int / digit string, else the first (then partial) text match."""
    if token is None:
        for i, t in enumerate(tokens):
            if t not in ("<start>", "<end>", "[SEP]", "<pad>") and re.search(r"\w", t):
                return i
        return 0
    if isinstance(token, int) or (isinstance(token, str) and re.fullmatch(r"-?\d+", token.strip())):
        index = int(token)
        if not -len(tokens) <= index < len(tokens):
            raise ValueError(f"token index {index} is out of range: the text has {len(tokens)} tokens: {tokens}")
        return index % len(tokens)
    wanted = str(token).strip().lower()
    tests = (
        lambda t: t.lower() == wanted,
        lambda t: wanted in t.lower(),
        lambda t: t.lower() in wanted and len(t) > 1,
    )
    for test in tests:
        for i, t in enumerate(tokens):
            if test(t):
                return i
    raise ValueError(f"token {token!r} is not in the text; its tokens are: {tokens}")


def _tick_step(n: int, most: int = 25) -> int:
    return max(1, math.ceil(n / most))


def _mark_uniform(bar, uniform):
    """A line on a colour bar at the value of a uniform assignment, when it lies in the bar's range."""
    low, high = bar.mappable.get_clim()
    if uniform is not None and low <= uniform <= high:
        bar.ax.axhline(uniform, color="red", linewidth=1.2)
        bar.ax.text(
            -0.3,
            uniform,
            "uniform",
            color="red",
            fontsize=7,
            rotation=90,
            ha="right",
            va="center",
            transform=bar.ax.get_yaxis_transform(),
        )


def _matrix_panel(fig, ax, matrix, tokens, title, colour_label, chosen, uniform=None, cmap="viridis"):
    # Colours span the map's own range (a near-uniform map would look flat from 0); the bar gives the values.
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, interpolation="nearest")
    n_text, n_visual = matrix.shape
    ax.set_yticks(range(n_text))
    ax.set_yticklabels([f"{t}  {i}" for i, t in enumerate(tokens)], fontsize=8 if n_text <= 30 else 6)
    step = _tick_step(n_visual)
    xticks = list(range(0, n_visual, step))
    ax.set_xticks(xticks)
    ax.set_xticklabels(["CLS" if x == 0 else str(x) for x in xticks], fontsize=8, rotation=90 if n_visual > 40 else 0)
    ax.set_xlabel("visual token (CLS = class token, 1.. = patches, row-major)")
    ax.set_ylabel("text token")
    ax.set_title(title, fontsize=10)
    ax.add_patch(Rectangle((-0.5, chosen - 0.5), n_visual, 1, fill=False, edgecolor="red", linewidth=1.5))
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(colour_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    _mark_uniform(bar, uniform)


def _overlay_panel(fig, ax, picture, values, grid, title, uniform=None, cmap="inferno"):
    height, width = picture.shape[:2]
    ax.imshow(picture, extent=(0, width, height, 0), interpolation="bilinear")
    heat = values.reshape(grid, grid)
    image = ax.imshow(heat, extent=(0, width, height, 0), cmap=cmap, alpha=0.55, interpolation="nearest")
    for i in range(1, grid):
        ax.axhline(i * height / grid, color="white", linewidth=0.5, alpha=0.7)
        ax.axvline(i * width / grid, color="white", linewidth=0.5, alpha=0.7)
    if grid <= 6:
        spread = float(heat.max() - heat.min()) * 100
        decimals = min(3, max(1, 1 - math.floor(math.log10(spread)))) if spread > 0 else 1
        for r in range(grid):
            for c in range(grid):
                value = heat[r, c]
                ax.text(
                    (c + 0.5) * width / grid,
                    (r + 0.5) * height / grid,
                    f"{100 * value:.{decimals}f}%",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white",
                    path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")],
                )
    ticks = [(i + 0.5) * width / grid for i in range(grid)]
    step = _tick_step(grid, 8)
    ax.set_xticks(ticks[::step])
    ax.set_xticklabels([str(i) for i in range(grid)][::step], fontsize=7)
    ax.set_yticks(ticks[::step])
    ax.set_yticklabels([str(i) for i in range(grid)][::step], fontsize=7)
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the mass", fontsize=8)
    bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    bar.ax.tick_params(labelsize=7)
    _mark_uniform(bar, uniform)


def plot_correlation_maps(
    model=None,
    processor=None,
    first: str | None = None,
    second: str | None = None,
    image=None,
    *,
    side: str = "mention",
    direction: str = "v2t",
    token=None,
    out: str | None = None,
    maps: dict | None = None,
):
    """Draws the token-to-patch correlation maps of one mention or entity (paper Figure 4); returns the figure.

    Top: the attention matrix and the OT plan of the same fusion projections (text tokens x visual tokens, both
    normalised along the assignment axis, so a row of the v2t maps is where one token's mass goes). Bottom: the picture
    as the model sees it, and the OT and attention maps of one token over the patch grid.

    Give `model, processor, first, second, image` (see [`correlation_maps`]) or a precomputed `maps` dict. `token` is a
    token index or a word of the text (default: the first word token). `out`: a PNG path to save to.
    """
    if maps is None:
        if model is None or processor is None:
            raise ValueError("plot_correlation_maps needs model and processor (with first, second, image), or maps=")
        maps = correlation_maps(model, processor, first, second, image, side=side, direction=direction)
    tokens, grid = maps["tokens"], maps["grid"]
    chosen = _choose_token(tokens, token)
    attention, ot = maps["attention"], maps["ot"]
    n_text, n_visual = attention.shape
    v2t = maps["direction"] == "v2t"
    axis = "row (token)" if v2t else "column (visual token)"
    uniform = 1.0 / n_visual if v2t else 1.0 / n_text

    matrix_height = max(3.5, 0.2 * n_text + 1.6)
    fig = plt.figure(figsize=(15, matrix_height + 4.6), layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[matrix_height, 4.2])
    top = outer[0].subgridspec(1, 2)
    bottom = outer[1].subgridspec(1, 3)

    _matrix_panel(
        fig,
        fig.add_subplot(top[0]),
        attention,
        tokens,
        "Attention: softmax(Q K^T / sqrt(D))",
        f"attention weight (each {axis} sums to 1)",
        chosen,
        uniform,
    )
    _matrix_panel(
        fig,
        fig.add_subplot(top[1]),
        ot,
        tokens,
        f"OT plan (Sinkhorn, eps={maps['epsilon']:g}, at most {maps['iterations']} iterations)",
        f"OT plan x {'L_t' if v2t else 'L_v'} (each {axis} sums to 1)",
        chosen,
        uniform,
    )

    ax = fig.add_subplot(bottom[0])
    ax.imshow(maps["picture"], interpolation="bilinear")
    size = maps["picture"].shape
    ax.set_title(
        f"{maps['side']} image as the model sees it\n({size[1]}x{size[0]} px, {grid}x{grid} patches)", fontsize=10
    )
    ax.set_xticks([])
    ax.set_yticks([])
    word = tokens[chosen]
    for position, (name, matrix) in enumerate((("OT plan", ot), ("attention", attention)), start=1):
        row = matrix[chosen]
        patches = row[1 : 1 + grid * grid]
        if patches.size != grid * grid:
            raise ValueError(f"expected {grid * grid} patches plus the class token, got {row.size} visual tokens")
        if v2t:
            title = f'{name}: token {chosen} "{word}" over the patches\n({row[0]:.1%} of its mass on CLS, not drawn)'
        else:
            title = (
                f'{name}: share of each patch given to token {chosen} "{word}"\n(CLS gives {row[0]:.1%}, not drawn)'
            )
        _overlay_panel(fig, fig.add_subplot(bottom[position]), maps["picture"], patches, grid, title, uniform)

    text = maps["text"] if len(maps["text"]) <= 90 else maps["text"][:87] + "..."
    fig.suptitle(
        f'OT-MEL token-to-patch correlation ({maps["direction"]}, fusion layer) for the {maps["side"]}: "{text}"\n'
        f"both maps from the same projections W_q, W_k; at inference this model uses "
        f"{'OT' if maps['model_mode'] == 'ot' else 'attention'} in this layer; "
        "red line on a colour bar: uniform assignment",
        fontsize=11,
    )
    if out:
        save_figure(fig, out)
    return fig


def figure_path(out: str) -> str:
    """The file that `savefig(out)` writes: `out`, or `out` + ".png" (matplotlib's `savefig.format`) when it has no
    extension."""
    out = os.fspath(out)
    return out if os.path.splitext(out)[1] else f"{out}.{matplotlib.rcParams['savefig.format']}"


def save_figure(fig, out: str) -> str:
    """Saves `fig` to [`figure_path`]`(out)` (its folder created if needed) and returns that path."""
    path = figure_path(out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_step(path: str) -> int:
    match = re.search(r"checkpoint-(\d+)$", os.path.normpath(path))
    return int(match.group(1)) if match else -1


def find_trainer_state(run_dir: str) -> str:
    """The `trainer_state.json` of a run: the run folder's or its latest checkpoint's, whichever logged further."""
    if os.path.isfile(run_dir):
        return run_dir
    candidates = []
    own = os.path.join(run_dir, "trainer_state.json")
    if os.path.isfile(own):
        candidates.append(own)
    checkpoints = [d for d in glob.glob(os.path.join(run_dir, "checkpoint-*")) if os.path.isdir(d)]
    if checkpoints:
        latest = max(checkpoints, key=_checkpoint_step)
        path = os.path.join(latest, "trainer_state.json")
        if os.path.isfile(path):
            candidates.append(path)
    if not candidates:
        raise FileNotFoundError(f"no trainer_state.json in {run_dir} nor in its latest checkpoint-*/ folder")

    def reach(path):
        steps = [e.get("step", 0) for e in _read_log_history(path) if isinstance(e, dict)]
        return (max(steps) if steps else -1, len(steps), path == own)

    return max(candidates, key=reach)


def _read_log_history(path: str) -> list:
    """The `log_history` of the trainer state saved in `path`; `ValueError` naming the file when it is not one."""
    with open(path, encoding="utf-8") as f:
        try:
            state = json.load(f)
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{path}: not a trainer state (a JSON object whose log_history is a list)")
    return history


def load_log_history(source) -> list[dict]:
    """`log_history` from a run folder, a `trainer_state.json` path, a trainer-state dict or a log list."""
    if isinstance(source, list):
        return source
    if isinstance(source, dict):
        return source.get("log_history", [])
    return _read_log_history(find_trainer_state(os.fspath(source)))


def _series(history: list[dict], key: str):
    points = [(e["step"], e[key]) for e in history if key in e and "step" in e and isinstance(e[key], (int, float))]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def plot_training_curves(source, out: str | None = None, title: str | None = None):
    """Plots the loss terms (`loss`, `loss_o`, `loss_f`, `loss_t`, `loss_v`, `loss_r`, `loss_kd`: those logged) and the
    validation MRR / H@1 against the step, from a run folder, a `trainer_state.json`, a state dict or a log list.

    Returns the figure; `out` is a PNG path to save to.
    """
    history = load_log_history(source)
    if title is None:
        title = "OT-MEL training"
        if isinstance(source, (str, os.PathLike)):
            title += f": {os.path.basename(os.path.normpath(os.fspath(source)))}"
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")

    plotted = 0
    labels = loss_labels()
    for key in labels:
        steps, values = _series(history, key)
        if steps:
            style = dict(linewidth=2.2, color="black") if key == "loss" else dict(linewidth=1.3)
            ax_loss.plot(steps, values, label=labels[key], **style)
            plotted += 1
    steps, values = _series(history, "eval_loss")
    if steps:
        ax_loss.plot(steps, values, "o--", color="grey", label="eval_loss (validation)", markersize=4)
        plotted += 1
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("loss (InfoNCE, nats)")
    values = [v for line in ax_loss.get_lines() for v in line.get_ydata()]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        # The total J and a small distillation term differ by orders of magnitude: a log axis keeps all readable.
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("loss (InfoNCE, nats; log scale)")
    ax_loss.set_title("training losses")
    ax_loss.grid(alpha=0.3)
    if plotted:
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax_loss.transAxes, color="grey")

    shown = 0
    for key, label, marker in (("eval_mrr", "validation MRR", "o-"), ("eval_hits@1", "validation H@1", "s-")):
        steps, values = _series(history, key)
        if not steps:
            continue
        line = ax_eval.plot(steps, values, marker, label=label, markersize=4)[0]
        shown += 1
        if key == "eval_mrr":
            best = int(np.argmax(values))
            ax_eval.annotate(
                f"best {values[best]:.4g}\n(step {steps[best]})",
                (steps[best], values[best]),
                textcoords="offset points",
                xytext=(0, -28),
                ha="center",
                fontsize=8,
                color=line.get_color(),
                arrowprops=dict(arrowstyle="->", color=line.get_color()),
            )
    ax_eval.set_xlabel("training step")
    ax_eval.set_ylabel("score")
    ax_eval.set_title("validation ranking (whole KB)")
    ax_eval.grid(alpha=0.3)
    if shown:
        ax_eval.legend(fontsize=8)
        low, high = ax_eval.get_ylim()
        ax_eval.set_ylim(low - 0.1 * (high - low), high)  # room for the annotation below the best point
    else:
        ax_eval.text(
            0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax_eval.transAxes, color="grey"
        )
    # Keep the two panels on the same step range.
    all_steps = [e["step"] for e in history if "step" in e]
    if all_steps:
        for ax in (ax_loss, ax_eval):
            ax.set_xlim(min(all_steps) - 0.02 * max(all_steps), max(all_steps) * 1.02 + 1)
    fig.suptitle(title, fontsize=12)
    if out:
        save_figure(fig, out)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def load_model_and_processor(model_dir: str, processor_dir: str | None = None):
    """An OT-MEL model and its processor from a saved folder (the processor's files may be in another folder)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from modeling_otmel import OTMELModel
    from processing_otmel import OTMELProcessor

    model = OTMELModel.from_pretrained(model_dir).eval()
    processor = OTMELProcessor.from_pretrained(processor_dir or model_dir)
    return model, processor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    maps = sub.add_parser("maps", help="token-to-patch correlation maps: attention vs OT (paper Figure 4)")
    maps.add_argument("--model", required=True, help="folder of a saved OT-MEL model (with its processor files)")
    maps.add_argument("--processor", default=None, help="folder of the processor, if not the model's")
    maps.add_argument("--side", choices=("mention", "entity"), default="mention")
    maps.add_argument("--mention", help="mention surface form (side mention)")
    maps.add_argument("--sentence", default="", help="the mention's sentence (side mention)")
    maps.add_argument("--mention_image", help="the mention's picture (side mention)")
    maps.add_argument("--entity_name", help="entity name (side entity)")
    maps.add_argument("--entity_attributes", default="", help="entity attribute sentences (side entity)")
    maps.add_argument("--entity_image", help="the entity's picture (side entity)")
    maps.add_argument(
        "--token", default=None, help="token to show on the picture: index or word (default: first word)"
    )
    maps.add_argument("--direction", choices=("v2t", "t2v"), default="v2t", help="v2t: G^{v->t} (tokens assign mass)")
    maps.add_argument("--out", required=True, help="PNG file to write")

    curves = sub.add_parser("curves", help="training curves from a run's trainer_state.json")
    curves.add_argument("--run_dir", required=True, help="run folder (or a trainer_state.json)")
    curves.add_argument("--title", default=None)
    curves.add_argument("--out", required=True, help="PNG file to write")

    args = parser.parse_args(argv)

    def write(draw):
        """Runs `draw(out)`, which saves the picture; a file that cannot be written ends with its OS error."""
        path = figure_path(args.out)
        try:
            draw(path)
        except OSError as err:
            reason = err.strerror or str(err)
            folder = os.path.dirname(os.path.abspath(path))
            if err.filename not in (None, path):  # its folder could not be made
                reason += f": {err.filename}"
            elif err.errno == errno.ENOENT and os.path.isdir(folder):  # e.g. in /proc: the folder is there
                reason += f" (the folder {folder} exists but does not let this file be created)"
            parser.error(f"--out {args.out}: could not write {path}: {reason}")
        print(path)
        return 0

    if args.command == "curves":
        try:
            history = load_log_history(args.run_dir)
        except (OSError, ValueError) as err:  # no trainer state, unreadable, or not one
            parser.error(str(err))
        title = args.title or f"OT-MEL training: {os.path.basename(os.path.normpath(args.run_dir))}"
        return write(lambda path: plot_training_curves(history, out=path, title=title))

    if args.side == "mention":
        first, second, image = args.mention, args.sentence, args.mention_image
        needed = {"--mention": first, "--mention_image": image}
    else:
        first, second, image = args.entity_name, args.entity_attributes, args.entity_image
        needed = {"--entity_name": first, "--entity_image": image}
    missing = [flag for flag, value in needed.items() if not value]
    if missing:
        parser.error(f"--side {args.side} needs {' and '.join(missing)}")
    if not os.path.isfile(image):
        parser.error(f"image not found: {image}")
    try:
        model, processor = load_model_and_processor(args.model, args.processor)
    except (OSError, ValueError) as err:  # not a folder nor a Hub id, not a model folder, offline
        folders = [f for f in (args.model, args.processor) if f]
        where = "" if all(os.path.isdir(f) for f in folders) else "no such local folder, and as a Hub id: "
        reason = " ".join(str(err).split())  # one line
        parser.error(
            f"--model {' / --processor '.join(folders)}: could not load an OT-MEL model and processor ({where}"
            f"{type(err).__name__}: {reason})"
        )

    def draw(path):
        try:
            plot_correlation_maps(
                model,
                processor,
                first,
                second,
                image,
                side=args.side,
                direction=args.direction,
                token=args.token,
                out=path,
            )
        except ValueError as err:
            parser.error(str(err))

    return write(draw)


if __name__ == "__main__":
    sys.exit(main())
