"""OTMELModel against a slow reference written from the equations, plus padding, KD, save/load and training checks."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil

from configuration_otmel import OTMELConfig
from modeling_otmel import CorrelationAssignment, OTMELModel, kd_divergence, sinkhorn
from processing_otmel import OTMELProcessor


# (surface or name, sentence or attributes, has image); lengths differ so that batches are padded.
MENTIONS = [
    ("obama", "obama spoke in paris about climate change on monday.", True),
    ("jaguar", "a jaguar was seen near the river.", False),
    ("apple", "the new apple phone was presented in california, said the company on its website.", True),
]
ENTITIES = [
    ("barack obama", "44th president of the united states. born in honolulu, hawaii.", True),
    ("jaguar cars", "british luxury vehicle company.", False),
    ("apple inc.", "american technology company headquartered in cupertino, california.", True),
    ("paris", "capital of france.", True),
]
SCORE_NAMES = ("overall", "fusion", "text", "visual", "retrieval")


def make_image(seed, size=(80, 72)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(tiny_clip_dir):
    return OTMELProcessor(
        CLIPImageProcessorPil.from_pretrained(tiny_clip_dir), AutoTokenizer.from_pretrained(tiny_clip_dir)
    )


def mention_inputs(processor, rows=MENTIONS, seed=100):
    images = [make_image(seed + i) if has else None for i, (_, _, has) in enumerate(rows)]
    return processor(mentions=[r[0] for r in rows], sentences=[r[1] for r in rows], images=images)


def entity_inputs(processor, rows=ENTITIES, seed=200):
    images = [make_image(seed + i) if has else None for i, (_, _, has) in enumerate(rows)]
    return processor(names=[r[0] for r in rows], attributes=[r[1] for r in rows], images=images)


@pytest.fixture(scope="module")
def batches(processor):
    return mention_inputs(processor), entity_inputs(processor)


def build(tiny_clip_dir, **overrides):
    settings = dict(hidden_size=16)
    settings.update(overrides)
    return OTMELModel.from_clip(tiny_clip_dir, **settings)


@torch.no_grad()
def model_scores(model, mentions, entities):
    m = model.encode_mentions(**mentions)
    e = model.encode_entities(**entities)
    return model.score(m, e)


# ----------------------------------------------------------------------------------------------------------------
# The slow reference: one item, one pair, one entry at a time, straight from method.md sections 1-5.
# ----------------------------------------------------------------------------------------------------------------


def ref_sinkhorn(cost, epsilon):
    """POT, uniform marginals, converged."""
    n, m = cost.shape
    plan = ot.sinkhorn(
        np.full(n, 1.0 / n),
        np.full(m, 1.0 / m),
        cost.numpy(),
        epsilon,
        method="sinkhorn_log",
        numItermax=100000,
        stopThr=1e-13,
    )
    return torch.from_numpy(plan)


def ref_cos(x, y):
    return float((x @ y) / (x.norm() * y.norm()))


def ref_assign(layer, own, other, mode, epsilon):
    """G = A H with Q = own W_q, K = other W_k, H = other W_h (Eq. 6-12); A = n Pi* for OT (barycentric)."""
    q = own @ layer.query.weight.T
    k = other @ layer.key.weight.T
    h = other @ layer.value.weight.T
    n, m = q.shape[0], k.shape[0]
    if mode == "attention":
        logits = torch.tensor([[float(q[i] @ k[j]) / math.sqrt(q.shape[1]) for j in range(m)] for i in range(n)])
        assignment = torch.softmax(logits.double(), dim=-1)
    else:
        cost = torch.tensor([[(1 - ref_cos(q[i], k[j])) / 2 for j in range(m)] for i in range(n)], dtype=torch.float64)
        assignment = n * ref_sinkhorn(cost, epsilon)
    return assignment @ h


def ref_pool(members, pooling):
    """Element-wise over the set (Eq. 14): softpool sum_i softmax_i(g_i) g_i, or mean, or max."""
    if pooling == "mean":
        return members.mean(0)
    if pooling == "max":
        return members.max(0).values
    out = torch.zeros(members.shape[1], dtype=members.dtype)
    for d in range(members.shape[1]):
        w = torch.exp(members[:, d] - members[:, d].max())
        out[d] = (w / w.sum() * members[:, d]).sum()
    return out


def ref_item(model, input_ids, attention_mask, pixel_values, has_image):
    """T, t, V, v of one item, unpadded; an item without image is the learned token and global feature alone."""
    ids = input_ids[attention_mask.bool()].unsqueeze(0)
    text = model.clip.text_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    item = {"T": text.last_hidden_state[0], "t": F.normalize(model.clip.text_projection(text.pooler_output)[0], dim=0)}
    if has_image:
        vision = model.clip.vision_model(pixel_values=pixel_values.unsqueeze(0).to(torch.float64))
        item["V"] = vision.last_hidden_state[0]
        item["v"] = F.normalize(model.clip.visual_projection(vision.pooler_output)[0], dim=0)
    else:
        item["V"] = model.null_visual_token.unsqueeze(0)
        item["v"] = F.normalize(model.null_visual_global, dim=0)
    return item


def ref_fused(model, item, mode, pooling, epsilon):
    """Eq. 13-18: g^t = pool({T, G^{v->t}}), g^v = pool({V, G^{t->v}}), normalised g^t (+) g^v."""
    g_v2t = ref_assign(model.text_from_visual, item["T"], item["V"], mode, epsilon)
    g_t2v = ref_assign(model.visual_from_text, item["V"], item["T"], mode, epsilon)
    g_t = ref_pool(torch.cat([item["T"] @ model.text_value.weight.T, g_v2t]), pooling)
    g_v = ref_pool(torch.cat([item["V"] @ model.visual_value.weight.T, g_t2v]), pooling)
    return F.normalize(torch.cat([g_t, g_v]), dim=0)


def ref_unimodal(layer, global_small, mention_tokens, entity_tokens, entity_global, mode, pooling, epsilon):
    """Eq. 19-24: entity tokens are assigned mention tokens; cos(pool(G), t_e brought to size D)."""
    g = ref_pool(ref_assign(layer, entity_tokens, mention_tokens, mode, epsilon), pooling)
    return ref_cos(g, global_small.weight @ entity_global)


@torch.no_grad()
def reference_scores(model, mentions, entities, fusion_mode, unimodal_mode):
    cfg = model.config
    pooling, epsilon = cfg.pooling, cfg.ot_epsilon

    def items(batch):
        return [
            ref_item(
                model,
                batch["input_ids"][i],
                batch["attention_mask"][i],
                batch["pixel_values"][i],
                bool(batch["has_image"][i]),
            )
            for i in range(batch["input_ids"].shape[0])
        ]

    ms, es = items(mentions), items(entities)
    if fusion_mode != "off":
        for item in ms + es:
            item["fused"] = ref_fused(model, item, fusion_mode, pooling, epsilon)
    out = {name: torch.zeros(len(ms), len(es), dtype=torch.float64) for name in SCORE_NAMES}
    for i, mi in enumerate(ms):
        for j, ej in enumerate(es):
            text_global, visual_global = ref_cos(mi["t"], ej["t"]), ref_cos(mi["v"], ej["v"])
            fusion = float(mi["fused"] @ ej["fused"]) if fusion_mode != "off" else None
            if unimodal_mode == "off":
                s_text, s_visual = text_global, visual_global
                retrieval_terms = [text_global, visual_global]
            else:
                s_t = ref_unimodal(
                    model.text_matching,
                    model.text_global_small,
                    mi["T"],
                    ej["T"],
                    ej["t"],
                    unimodal_mode,
                    pooling,
                    epsilon,
                )
                s_v = ref_unimodal(
                    model.visual_matching,
                    model.visual_global_small,
                    mi["V"],
                    ej["V"],
                    ej["v"],
                    unimodal_mode,
                    pooling,
                    epsilon,
                )
                s_text, s_visual = (s_t + text_global) / 2, (s_v + visual_global) / 2
                retrieval_terms = [text_global / 2, visual_global / 2]
            enabled = [s for s in (fusion, s_text, s_visual) if s is not None]
            out["overall"][i, j] = sum(enabled) / len(enabled)
            out["fusion"][i, j] = fusion if fusion is not None else float("nan")
            out["text"][i, j], out["visual"][i, j] = s_text, s_visual
            retrieval = [fusion] + retrieval_terms if fusion is not None else retrieval_terms
            out["retrieval"][i, j] = sum(retrieval) / len(retrieval)
    if fusion_mode == "off":
        out["fusion"] = None
    return out


def assert_scores_equal_reference(scores, reference, atol):
    for name in SCORE_NAMES:
        expected, actual = reference[name], getattr(scores, name)
        if expected is None:
            assert actual is None, f"S_{name} should be disabled"
            continue
        assert actual is not None, f"S_{name} is missing"
        torch.testing.assert_close(actual.double(), expected, rtol=0, atol=atol, msg=lambda m: f"S_{name}: {m}")


@pytest.mark.parametrize("pooling", ["softpool", "mean", "max"])
@pytest.mark.parametrize("unimodal", ["ot", "attention", "off"])
@pytest.mark.parametrize("fusion", ["ot", "attention", "off"])
def test_scores_match_reference(tiny_clip_dir, batches, fusion, unimodal, pooling):
    mentions, entities = batches
    assert not bool(mentions["has_image"].all()) and not bool(entities["has_image"].all())
    model = (
        build(
            tiny_clip_dir,
            fusion_assignment=fusion,
            unimodal_assignment=unimodal,
            pooling=pooling,
            sinkhorn_iterations=5000,
            sinkhorn_tolerance=1e-11,
        )
        .double()
        .eval()
    )
    scores = model_scores(model, mentions, entities)
    reference = reference_scores(model, mentions, entities, fusion, unimodal)
    assert_scores_equal_reference(scores, reference, atol=1e-7)


@pytest.mark.parametrize(
    "settings,modes",
    [
        # Small epsilon: the solver's log domain, in the model.
        (dict(ot_epsilon=0.01), ("ot", "ot")),
        # A distilled model infers with the attention softmax of the same projections in place of each OT assignment.
        (dict(distillation="kl", inference_assignment="attention"), ("attention", "attention")),
    ],
)
def test_scores_match_reference_other_settings(tiny_clip_dir, batches, settings, modes):
    mentions, entities = batches
    model = build(tiny_clip_dir, sinkhorn_iterations=20000, sinkhorn_tolerance=1e-11, **settings).double().eval()
    scores = model_scores(model, mentions, entities)
    assert_scores_equal_reference(scores, reference_scores(model, mentions, entities, *modes), atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# Padding and batch composition
# ----------------------------------------------------------------------------------------------------------------


def pad_more(batch, extra, pad_id):
    batch = dict(batch)
    n = batch["input_ids"].shape[0]
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((n, extra), pad_id)], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(n, extra, dtype=torch.long)], dim=1)
    return batch


@pytest.mark.parametrize(
    "fusion,unimodal,pooling,epsilon",
    [
        ("ot", "ot", "softpool", 0.1),
        ("ot", "ot", "max", 0.01),
        ("attention", "attention", "softpool", 0.1),
        ("ot", "attention", "mean", 0.1),
        ("attention", "ot", "max", 0.1),
    ],
)
def test_padding_and_batch_composition_change_no_score(
    tiny_clip_dir, processor, batches, fusion, unimodal, pooling, epsilon
):
    """Default solver settings (20 iterations, tolerance 1e-3, float32): padding tokens, and which other entities
    share the batch, change nothing."""
    mentions, entities = batches
    model = build(
        tiny_clip_dir, fusion_assignment=fusion, unimodal_assignment=unimodal, pooling=pooling, ot_epsilon=epsilon
    ).eval()
    pad_id = processor.tokenizer.pad_token_id
    base = model_scores(model, mentions, entities)
    padded = model_scores(model, pad_more(mentions, 9, pad_id), pad_more(entities, 5, pad_id))
    for name in SCORE_NAMES:
        torch.testing.assert_close(getattr(padded, name), getattr(base, name), rtol=0, atol=2e-6)
    # Entities scored in two chunks, as when ranking a KB, give the columns of the whole.
    halves = [{k: v[sl] for k, v in entities.items()} for sl in (slice(0, 2), slice(2, 4))]
    chunks = [model_scores(model, mentions, half) for half in halves]
    for name in SCORE_NAMES:
        joined = torch.cat([getattr(c, name) for c in chunks], dim=1)
        torch.testing.assert_close(joined, getattr(base, name), rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------------------------


def ref_kd(plan, logits, mask, mode):
    """Eq. 28-29 for one problem, row by row and column by column, over the valid entries."""
    terms = []
    for axis in (0, 1) if mode != "row_kl" else (0,):
        p, s, valid = (plan, logits, mask) if axis == 0 else (plan.T, logits.T, mask.T)
        total = 0.0
        for i in range(p.shape[0]):
            keep = valid[i]
            if not keep.any():
                continue
            target = p[i][keep] / p[i][keep].sum()
            pred = torch.softmax(s[i][keep], dim=0)
            if mode == "mse":
                total += float(((pred - target) ** 2).sum())
            else:
                total += float((target * (target.log() - pred.log())).sum())
        terms.append(total)
    return sum(terms) / len(terms)


def kd_problem(seed):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(3, 6, 8, generator=gen, dtype=torch.float64)
    row_mask = torch.ones(3, 6, dtype=torch.float64)
    col_mask = torch.ones(3, 8, dtype=torch.float64)
    row_mask[1, 4:], col_mask[2, 5:] = 0, 0
    mask = row_mask.bool().unsqueeze(-1) & col_mask.bool().unsqueeze(-2)
    plan = sinkhorn(cost, 0.1, 200, 1e-10, row_mask, col_mask)
    return plan, mask, gen


@pytest.mark.parametrize("mode", ["ot", "attention"])
def test_assignment_of_query_sets_matches_one_set_at_a_time(mode):
    """The batched form used by the pairwise matching (S query sets per key set, one product per key set) equals
    one call per set; padded query rows get zero rows, and a key set without any key gives zeros, not NaN."""
    torch.manual_seed(0)
    config = OTMELConfig(hidden_size=4, sinkhorn_iterations=500, sinkhorn_tolerance=0.0)
    layer = CorrelationAssignment(6, 5, config).double().eval()
    q = layer.query(torch.randn(1, 3, 4, 6, dtype=torch.float64)).expand(2, -1, -1, -1)  # (B_q, S, n, D)
    k = layer.key(torch.randn(2, 5, 5, dtype=torch.float64))
    q_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).expand(2, -1, -1)
    k_mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        sets, _, _ = layer.assign(q, k, q_mask, k_mask, mode)
        for s in range(3):
            one, _, _ = layer.assign(q[:, s], k, q_mask[:, s], k_mask, mode)
            torch.testing.assert_close(sets[:, s], one, rtol=1e-12, atol=1e-12)
    assert not sets.isnan().any()
    assert (sets[0][q_mask[0] == 0] == 0).all() and (sets[1] == 0).all()
    real = sets[0][q_mask[0] == 1]
    torch.testing.assert_close(real.sum(-1), torch.ones(len(real), dtype=torch.float64), rtol=0, atol=1e-6)
    assert (real[:, 3:] == 0).all()


@pytest.mark.parametrize("mode", ["kl", "row_kl", "mse"])
def test_kd_zero_at_the_teacher_and_positive_elsewhere(mode):
    plan, mask, gen = kd_problem(0)
    garbage = torch.randn(plan.shape, generator=gen, dtype=torch.float64) * 50
    # softmax(log P + c) along either axis is P normalised along that axis; masked logits must not matter.
    logits = torch.where(mask, plan.clamp_min(1e-300).log() + 3.0, garbage)
    kd = kd_divergence(plan, logits, mask, mode)
    assert kd.shape == (3,)
    torch.testing.assert_close(kd, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-10)
    # A per-row offset keeps every row softmax (row KL still 0) but changes the columns.
    shifted = logits + torch.randn(3, 6, 1, generator=gen, dtype=torch.float64)
    row_only = kd_divergence(plan, shifted, mask, mode)
    if mode == "row_kl":
        torch.testing.assert_close(row_only, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-10)
    else:
        assert (row_only > 1e-4).all()
    other = torch.randn(plan.shape, generator=gen, dtype=torch.float64)
    kd_other = kd_divergence(plan, other, mask, mode)
    assert (kd_other > 1e-4).all()
    for b in range(3):
        assert kd_other[b].item() == pytest.approx(ref_kd(plan[b], other[b], mask[b], mode), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mode", ["kl", "row_kl", "mse"])
def test_kd_sends_no_gradient_into_the_plan(mode):
    gen = torch.Generator().manual_seed(1)
    cost = torch.rand(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    plan = sinkhorn(cost, 0.1, 50, 0.0)
    plan.retain_grad()
    kd = kd_divergence(plan, logits, torch.ones(2, 5, 7, dtype=torch.bool), mode).sum()
    kd.backward()
    assert plan.grad is None and cost.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_kd_loss_of_the_model_reaches_the_attention_logits_only(tiny_clip_dir, batches):
    mentions, entities = batches
    model = build(tiny_clip_dir, distillation="kl").train()
    out = model(
        mention_input_ids=mentions["input_ids"],
        mention_attention_mask=mentions["attention_mask"],
        mention_pixel_values=mentions["pixel_values"],
        mention_has_image=mentions["has_image"],
        entity_input_ids=entities["input_ids"][:3],
        entity_attention_mask=entities["attention_mask"][:3],
        entity_pixel_values=entities["pixel_values"][:3],
        entity_has_image=entities["has_image"][:3],
        output_maps=True,
    )
    assert out.loss_kd is not None and out.loss_kd.item() > 0
    fusion_maps = [f.fusion_maps[d] for f in (out.mention_features, out.entity_features) for d in ("v2t", "t2v")]
    plans = [m["plan"] for m in fusion_maps] + [out.scores.unimodal_maps[k]["plan"] for k in ("text", "visual")]
    logits = [m["logits"] for m in fusion_maps]
    assert all(p is not None and p.requires_grad for p in plans)
    grads = torch.autograd.grad(out.loss_kd, plans + logits, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads[: len(plans)]), "L_KD must not reach the OT plans (the teacher)"
    assert all(g is not None and g.abs().sum() > 0 for g in grads[len(plans) :])
    # The rest of the loss does reach the plans.
    task = out.loss - model.config.kd_weight * out.loss_kd
    assert any(g is not None for g in torch.autograd.grad(task, plans, allow_unused=True))


# ----------------------------------------------------------------------------------------------------------------
# Save / load and configuration
# ----------------------------------------------------------------------------------------------------------------

REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    torch.set_num_threads(1)
    folder, data = sys.argv[1], json.load(open(sys.argv[2]))
    # A user without the checkout: drop an editable install of it (`make install` puts one in .venv).
    sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
    for module in ("modeling_otmel", "configuration_otmel", "processing_otmel"):
        assert importlib.util.find_spec(module) is None, f"the checkout's {module} is importable here"
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    images = lambda paths: [Image.open(p) if p else None for p in paths]
    m = processor(mentions=data["mentions"], sentences=data["sentences"], images=images(data["mention_images"]))
    e = processor(names=data["names"], attributes=data["attributes"], images=images(data["entity_images"]))
    with torch.no_grad():
        scores = model.score(model.encode_mentions(**m), model.encode_entities(**e))
    print(json.dumps({
        "classes": [type(model).__module__, type(model).__name__, type(processor).__name__],
        "scores": {k: getattr(scores, k).tolist() for k in ("overall", "fusion", "text", "visual", "retrieval")},
    }))
    """
)


def test_save_load_round_trip_and_remote_code(tiny_clip_dir, processor, tmp_path):
    model = build(tiny_clip_dir, pooling="max", ot_epsilon=0.07, sinkhorn_iterations=30).eval()
    with torch.no_grad():  # non-default head values, so that a head left at its initial value would show
        model.null_visual_global.add_(0.5)
        model.logit_scale.fill_(2.5)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    # Pictures as files, so that the fresh process reads the very same bytes.
    def save_images(prefix, rows, seed):
        paths = []
        for i, (_, _, has) in enumerate(rows):
            if has:
                path = tmp_path / f"{prefix}{i}.png"
                make_image(seed + i).save(path)
                paths.append(str(path))
            else:
                paths.append(None)
        return paths

    data = {
        "mentions": [r[0] for r in MENTIONS],
        "sentences": [r[1] for r in MENTIONS],
        "names": [r[0] for r in ENTITIES],
        "attributes": [r[1] for r in ENTITIES],
        "mention_images": save_images("m", MENTIONS, 100),
        "entity_images": save_images("e", ENTITIES, 200),
    }
    mentions, entities = mention_inputs(processor), entity_inputs(processor)
    expected = model_scores(model, mentions, entities)

    reloaded = OTMELModel.from_pretrained(folder).eval()
    settings = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in reloaded.config.to_dict().items() if k != "_name_or_path"} == settings
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    again = model_scores(reloaded, mentions, entities)
    for name in SCORE_NAMES:
        assert torch.equal(getattr(again, name), getattr(expected, name)), name

    # A copy of the folder, loaded through the Auto classes in a process that cannot see this checkout.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for module in ("configuration_otmel.py", "modeling_otmel.py", "processing_otmel.py"):
        assert (copy / module).is_file(), f"{module} was not saved next to the weights"
    (tmp_path / "data.json").write_text(json.dumps(data))
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(copy), str(tmp_path / "data.json")],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["classes"][1:] == ["OTMELModel", "OTMELProcessor"]
    assert remote["classes"][0] != "modeling_otmel", "the checkout's module was imported, not the saved one"
    for name in SCORE_NAMES:
        torch.testing.assert_close(
            torch.tensor(remote["scores"][name]), getattr(expected, name), rtol=0, atol=1e-6, msg=name
        )


@pytest.mark.parametrize(
    "settings,named",
    [
        (dict(fusion_assignment="sinkhorn"), ["fusion_assignment", "'sinkhorn'", "ot, attention, off"]),
        (dict(unimodal_assignment="OT"), ["unimodal_assignment", "ot, attention, off"]),
        (dict(pooling="median"), ["pooling", "softpool, mean, max"]),
        (dict(distillation="kld"), ["distillation", "off, kl, mse, row_kl"]),
        (dict(inference_assignment="off"), ["inference_assignment", "ot, attention"]),
        (dict(distillation="kl", fusion_assignment="off", unimodal_assignment="attention"), ["distillation"]),
        (dict(inference_assignment="attention"), ["inference_assignment", "distillation"]),
        (dict(ot_epsilon=0.0), ["ot_epsilon"]),
        (dict(sinkhorn_iterations=0), ["sinkhorn_iterations"]),
        (dict(hidden_size=0), ["hidden_size"]),
        (dict(logit_scale_init=-1.0), ["logit_scale_init"]),
        (dict(sinkhorn_tolerance=-1.0), ["sinkhorn_tolerance"]),
    ],
)
def test_config_errors_name_the_setting_and_allowed_values(settings, named, tmp_path):
    with pytest.raises(ValueError) as info:
        OTMELConfig(**settings)
    for text in named:
        assert text in str(info.value), f"{text!r} not in {info.value}"
    # The same settings given as keyword arguments at load time (as AutoModel.from_pretrained passes them on).
    OTMELConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError) as info:
        OTMELConfig.from_pretrained(tmp_path, **settings)
    for text in named:
        assert text in str(info.value), f"{text!r} not in {info.value}"
    loaded, unused = OTMELConfig.from_pretrained(tmp_path, return_unused_kwargs=True, ot_epsilon=0.2, other=1)
    assert loaded.ot_epsilon == 0.2 and unused == {"other": 1}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

OVERFIT_PAIRS = [
    ("obama", "obama spoke in paris.", "barack obama", "44th president of the united states."),
    ("michelle", "michelle obama wrote a book.", "michelle obama", "american attorney and author."),
    ("paris", "the summit took place in paris.", "paris", "capital of france, on the seine."),
    ("hilton", "hilton opened a new hotel.", "paris hilton", "american media personality."),
    ("jaguar", "a jaguar was seen near the river.", "jaguar", "large cat species of the americas."),
    ("jaguar", "jaguar presented a new car.", "jaguar cars", "british luxury vehicle company."),
    ("apple", "the new apple phone was presented.", "apple inc.", "american technology company."),
    ("apple", "an apple a day keeps the doctor away.", "apple", "edible fruit of the apple tree."),
]


@pytest.mark.parametrize("mode", ["ot", "attention", "kd"])
def test_each_mode_overfits_eight_examples(tiny_clip_dir, processor, mode):
    settings = {
        "ot": {},
        "attention": dict(fusion_assignment="attention", unimodal_assignment="attention"),
        "kd": dict(distillation="kl"),
    }[mode]
    model = build(tiny_clip_dir, hidden_size=32, **settings).train()
    has = [i % 3 != 2 for i in range(8)]  # a third of the items without image
    m = processor(
        mentions=[p[0] for p in OVERFIT_PAIRS],
        sentences=[p[1] for p in OVERFIT_PAIRS],
        images=[make_image(300 + i) if h else None for i, h in enumerate(has)],
    )
    e = processor(
        names=[p[2] for p in OVERFIT_PAIRS],
        attributes=[p[3] for p in OVERFIT_PAIRS],
        images=[make_image(400 + i) if h else None for i, h in enumerate(has[::-1])],
    )
    inputs = dict(
        mention_input_ids=m["input_ids"],
        mention_attention_mask=m["attention_mask"],
        mention_pixel_values=m["pixel_values"],
        mention_has_image=m["has_image"],
        entity_input_ids=e["input_ids"],
        entity_attention_mask=e["attention_mask"],
        entity_pixel_values=e["pixel_values"],
        entity_has_image=e["has_image"],
        entity_ids=torch.arange(8),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        assert math.isfinite(losses[-1])
    if mode == "kd":
        assert out.loss_kd is not None
    assert losses[-1] < 0.3 * losses[0], f"{mode}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits.argmax(-1) == torch.arange(8)).all(), "every training mention should rank its entity first"


# ---- the processor's call: nothing dropped silently --------------------------------------------------------------


def test_processor_refuses_unknown_keyword_arguments(processor):
    """A misspelt keyword (`sentence=`, `image=`) used to vanish into **kwargs, linking without the sentence and the
    picture: now a TypeError naming each one, with the name it resembles."""
    with pytest.raises(TypeError) as err:
        processor(mentions=["obama"], sentence=["obama spoke in paris."], image=[make_image(0)])
    assert "'sentence' (did you mean 'sentences'?)" in str(err.value)
    assert "'image' (did you mean 'images'?)" in str(err.value)
    with pytest.raises(TypeError, match="'text'"):
        processor(text=["obama"], mentions=["obama"])
    with pytest.raises(TypeError, match="'attribute' \\(did you mean 'attributes'\\?\\)"):
        processor(names=["paris"], attribute=["capital of france."])
    # Arguments of the wrong kind are refused, not dropped.
    with pytest.raises(ValueError, match="not both"):
        processor(mentions=["obama"], names=["barack obama"])
    with pytest.raises(ValueError, match="attributes= goes with names="):
        processor(mentions=["obama"], attributes=["44th president."])
    with pytest.raises(ValueError, match="sentences= goes with mentions="):
        processor(names=["barack obama"], sentences=["obama spoke."])


def test_processor_return_tensors(processor):
    pt = processor(mentions=["obama"], sentences=["obama spoke in paris."], images=[make_image(0)])
    np_out = processor(
        mentions=["obama"], sentences=["obama spoke in paris."], images=[make_image(0)], return_tensors="np"
    )
    assert set(np_out) == set(pt)
    for key, value in np_out.items():
        assert isinstance(value, np.ndarray), key
        np.testing.assert_array_equal(value, pt[key].numpy())
    assert np_out["has_image"].dtype == np.bool_
    assert isinstance(processor(names=["paris"], return_tensors=None)["input_ids"], torch.Tensor)
    for bad in ("tf", "jax", "list"):
        with pytest.raises(ValueError, match=f"return_tensors must be 'pt'.*got '{bad}'"):
            processor(names=["paris"], return_tensors=bad)


def test_processor_takes_a_single_mention_as_a_batch_of_one(processor, tmp_path):
    """A string is one mention (not one per character), and one picture (PIL image, path, bytes, datasets dict) is
    the picture of that mention, as in transformers' processors."""
    path = tmp_path / "one.png"
    make_image(0).save(path)
    listed = processor(mentions=["obama"], sentences=["obama spoke in paris."], images=[str(path)])
    for image in (make_image(0), str(path), path, path.read_bytes(), {"bytes": path.read_bytes(), "path": None}):
        single = processor(mentions="obama", sentences="obama spoke in paris.", images=image)
        assert single["input_ids"].shape[0] == 1 and single["has_image"].tolist() == [True]
        for key in listed:
            torch.testing.assert_close(single[key], listed[key])
    entity = processor(names="paris", attributes="capital of france.")
    torch.testing.assert_close(
        entity["input_ids"], processor(names=["paris"], attributes=["capital of france."])["input_ids"]
    )
    assert processor(mentions="obama")["input_ids"].shape[0] == 1
    assert processor.process_images(str(path))["has_image"].tolist() == [True]
    # Lengths that do not match are refused, naming both.
    with pytest.raises(ValueError, match="got 2 mentions and 1 sentences"):
        processor(mentions=["obama", "jaguar"], sentences="obama spoke.")
    with pytest.raises(ValueError, match="got 1 images for 2 texts"):
        processor(mentions=["obama", "jaguar"], images=str(path))
    with pytest.raises(ValueError, match="got 1 names and 2 attribute texts"):
        processor(names="paris", attributes=["a", "b"])
