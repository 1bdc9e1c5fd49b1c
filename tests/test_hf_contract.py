"""The contract a Trainer (and a Hub user) relies on, after transformers' own common model tests (`ModelTesterMixin`
in tests/test_modeling_common.py, as tests/models/clip/ runs them), for the points that apply to a model without a
head: save/load round trip, determinism, tuple outputs, main input name, initialisation of every new weight, a
gradient for every trainable parameter, activation (gradient) checkpointing, attention implementations, dtypes,
torch.compile, the Trainer's token and FLOP counts, and DDP with `find_unused_parameters=False` over two gloo
processes (what the Trainer chooses with activation checkpointing).

`OTMEL_SLOW_TESTS=1` adds torch.compile with the inductor backend (minutes on a CPU: the Sinkhorn loop's convergence
checks break the graph many times).
"""

import copy
import inspect
import math
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, Trainer, TrainingArguments

from configuration_otmel import PAPER_MODELS, OTMELConfig
from modeling_otmel import OTMELModel
from processing_otmel import OTMELProcessor


SLOW = os.environ.get("OTMEL_SLOW_TESTS") == "1"


@pytest.fixture(scope="module")
def processor(tiny_clip_dir):
    return OTMELProcessor(
        CLIPImageProcessorPil.from_pretrained(tiny_clip_dir), AutoTokenizer.from_pretrained(tiny_clip_dir)
    )


def picture(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))


def make_batch(processor, n=4, pictures="mixed", offset=0, padding="longest") -> dict:
    """`n` mentions with their gold entities, as `run_mel.MELCollator` gives them to the model. `pictures`: "all",
    "none" or "mixed" (every other item); `offset` shifts the texts, pictures and KB ids (another process's batch)."""
    has = {"all": [True] * n, "none": [False] * n, "mixed": [i % 2 == 0 for i in range(n)]}[pictures]
    ids = range(offset, offset + n)
    m = processor.process_mentions(
        [f"obama {i}" for i in ids],
        [f"obama spoke in paris about item {i}" + " again" * (i % 3) for i in ids],
        [picture(i) if h else None for i, h in zip(ids, has)],
        padding=padding,
    )
    e = processor.process_entities(
        [f"barack obama {i}" for i in ids],
        [f"president number {i} of the united states" for i in ids],
        [picture(1000 + i) if h else None for i, h in zip(ids, has)],
        padding=padding,
    )
    batch = {f"mention_{k}": v for k, v in m.items()}
    batch.update({f"entity_{k}": v for k, v in e.items()})
    batch["entity_ids"] = torch.tensor(list(ids))
    return batch


def build(tiny_clip_dir, mode="ot", **overrides) -> OTMELModel:
    torch.manual_seed(0)
    return OTMELModel.from_clip(tiny_clip_dir, hidden_size=16, **{**PAPER_MODELS[mode][0], **overrides})


@pytest.fixture(scope="module")
def saved(tiny_clip_dir, tmp_path_factory):
    """A tiny OT-MEL saved with save_pretrained (safetensors)."""
    path = str(tmp_path_factory.mktemp("otmel"))
    build(tiny_clip_dir).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Outputs, save / load, initialisation
# ---------------------------------------------------------------------------------------------------------------


def test_main_input_name_is_the_first_forward_argument():
    parameters = list(inspect.signature(OTMELModel.forward).parameters)
    assert OTMELModel.main_input_name == "mention_input_ids" == parameters[1]


def test_tuple_outputs_hold_the_values_of_the_output_object(saved, processor):
    model = OTMELModel.from_pretrained(saved).eval()
    batch = make_batch(processor)
    with torch.no_grad():
        out = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        model.config.return_dict = False
        from_config = model(**batch)
    expected = out.to_tuple()
    assert torch.equal(out[0], out.loss)  # the loss first, where the Trainer takes it from
    for got in (as_tuple, from_config):
        assert isinstance(got, tuple) and len(got) == len(expected)
        assert torch.equal(got[0], out.loss)
        for a, b in zip(got, expected):
            if isinstance(b, torch.Tensor):
                assert torch.equal(a, b)


def test_eval_forward_is_deterministic(saved, processor):
    model = OTMELModel.from_pretrained(saved).eval()
    batch = make_batch(processor)
    with torch.no_grad():
        first, second = model(**batch), model(**batch)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.loss, second.loss)


def test_save_load_round_trip_in_safetensors(tiny_clip_dir, processor, tmp_path):
    model = build(tiny_clip_dir).eval()
    batch = make_batch(processor)
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()
    loaded = OTMELModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = loaded(**batch)
    assert (after.logits - before.logits).abs().max() <= 1e-5 and (after.loss - before.loss).abs() <= 1e-5
    state, reloaded = model.state_dict(), loaded.state_dict()
    assert set(state) == set(reloaded) and all(torch.equal(state[k], reloaded[k]) for k in state)
    # from_pretrained without a checkpoint, from a state dict (ModelTesterMixin.test_from_pretrained_no_checkpoint).
    again = OTMELModel.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_input_embeddings_resize_and_survive_a_round_trip(tiny_clip_dir, processor, tmp_path):
    # ModelTesterMixin.test_resize_tokens_embeddings / test_model_get_set_embeddings: the text tower's token embedding,
    # which mentions and entities share; the new size is what the saved config builds.
    model = build(tiny_clip_dir).eval()
    embedding = model.get_input_embeddings()
    assert embedding is model.clip.text_model.embeddings.token_embedding
    old = embedding.num_embeddings
    batch = make_batch(processor)
    with torch.no_grad():
        before = model(**batch).logits
    resized = model.resize_token_embeddings(old + 7, mean_resizing=False)
    assert resized.weight.shape[0] == old + 7 and model.get_input_embeddings() is resized
    assert torch.equal(resized.weight[:old], embedding.weight[:old])
    assert (
        model.config.clip_config.text_config.vocab_size == old + 7 and "vocab_size" not in model.config.to_diff_dict()
    )
    batch["mention_input_ids"][0, 1] = old + 6  # a new token id is embedded
    with torch.no_grad():
        after = model(**batch).logits
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])
    model.save_pretrained(tmp_path)
    loaded = OTMELModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.get_input_embeddings().weight, resized.weight)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, after)
    replacement = torch.nn.Embedding(old, resized.embedding_dim)
    loaded.set_input_embeddings(replacement)
    assert loaded.clip.text_model.embeddings.token_embedding is replacement


def test_loading_a_clip_checkpoint_initialises_every_new_weight(tiny_clip_dir):
    """transformers 5 leaves weights absent from a checkpoint as they come out of memory unless `_init_weights`
    covers them (values like 7e34): the OT-MEL heads are absent from a CLIP checkpoint."""
    config = OTMELConfig(clip_config=CLIPConfig.from_pretrained(tiny_clip_dir), hidden_size=16)
    model = OTMELModel.from_pretrained(tiny_clip_dir, config=config)
    clip = CLIPModel.from_pretrained(tiny_clip_dir).state_dict()
    for name, value in model.clip.state_dict().items():
        assert torch.equal(value, clip[name]), name
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all() and param.abs().max() < 10, name
    assert model.otmel_logit_scale.item() == pytest.approx(math.log(config.logit_scale_init))


@pytest.mark.parametrize(
    "mode, settings, frozen",
    [
        ("ot", {}, {"clip.logit_scale"}),
        ("clip", {}, {"clip.logit_scale", "null_visual_token"}),
        ("ot", {"learnable_logit_scale": False}, {"clip.logit_scale", "otmel_logit_scale"}),
    ],
)
def test_frozen_parameters_stay_frozen_after_loading(tiny_clip_dir, tmp_path, mode, settings, frozen):
    """transformers 5 re-creates every loaded parameter with requires_grad=True: a model fine-tuned from a saved
    OT-MEL (`run_mel.py --model_name_or_path`) would train CLIP's unused temperature, and break DDP."""
    from transformers import AutoModel

    model = build(tiny_clip_dir, mode, **settings)
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen
    model.save_pretrained(tmp_path)
    loaded = [
        OTMELModel.from_pretrained(tmp_path),
        OTMELModel.from_pretrained(tmp_path, output_loading_info=True)[0],
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True),
    ]
    for model in loaded:
        assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen


def test_can_be_built_on_the_meta_device(tiny_clip_dir):
    config = OTMELConfig(clip_config=CLIPConfig.from_pretrained(tiny_clip_dir), hidden_size=16)
    with torch.device("meta"):
        model = OTMELModel(config)
    assert {p.device.type for p in model.parameters()} == {"meta"}


# ---------------------------------------------------------------------------------------------------------------
# Training: gradients, activation checkpointing, Trainer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pictures", ["mixed", "all", "none"])
@pytest.mark.parametrize("mode", list(PAPER_MODELS))
def test_every_trainable_parameter_gets_a_gradient(tiny_clip_dir, processor, mode, pictures):
    """DDP with find_unused_parameters=False (the Trainer's choice with activation checkpointing) fails on the next
    step when a trainable parameter took no part in the loss: a batch without pictures, the CLIP baseline's unused
    visual token and CLIP's own temperature must not leave one out."""
    model = build(tiny_clip_dir, mode).train()
    model(**make_batch(processor, pictures=pictures)).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"clip.logit_scale"} | ({"null_visual_token"} if mode == "clip" else set())


def test_a_batch_without_pictures_scores_as_in_eval(tiny_clip_dir, processor):
    """The blank picture that keeps the vision tower in the training graph changes no score."""
    model = build(tiny_clip_dir)
    batch = make_batch(processor, pictures="none")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).scores.overall
    model.train()
    assert torch.allclose(model(**batch).scores.overall, expected, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_clip_dir, processor, use_reentrant):
    plain = build(tiny_clip_dir).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    assert checkpointed.clip.text_model.encoder.gradient_checkpointing
    assert checkpointed.clip.vision_model.encoder.gradient_checkpointing
    batch = make_batch(processor)
    losses = []
    for model in (plain, checkpointed):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name
    checkpointed.activation_checkpointing_disable()
    assert (
        not checkpointed.is_activation_checkpointing
        and not checkpointed.clip.text_model.encoder.gradient_checkpointing
    )


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch, self.n = batch, batch["mention_input_ids"].shape[0]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def _stack(rows):
    return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


def test_trainer_counts_input_tokens_and_flops_from_the_main_input(tiny_clip_dir, processor, tmp_path):
    """The Trainer counts tokens and FLOPs on `inputs[model.main_input_name]`: both are nonzero and exact."""
    model = build(tiny_clip_dir)
    batch = make_batch(processor, n=8, padding="max_length")
    length = batch["mention_input_ids"].shape[1]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        include_num_input_tokens_seen="all",
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(batch), data_collator=_stack)
    result = trainer.train()
    assert trainer.state.num_input_tokens_seen == 2 * 4 * length
    assert trainer.state.total_flos == 2 * 6 * 4 * length * model.num_parameters(exclude_embeddings=True) > 0
    assert math.isfinite(result.training_loss) and result.training_loss > 0


# ---------------------------------------------------------------------------------------------------------------
# Attention implementations, dtypes, torch.compile
# ---------------------------------------------------------------------------------------------------------------


def _implementations(model) -> set:
    return {
        model.config._attn_implementation,
        model.clip.config._attn_implementation,
        model.clip.text_model.config._attn_implementation,
        model.clip.vision_model.config._attn_implementation,
    }


def test_attention_implementations_give_the_same_scores(saved, processor):
    batch = make_batch(processor)
    reference = OTMELModel.from_pretrained(saved, attn_implementation="eager").eval()
    assert _implementations(reference) == {"eager"}
    with torch.no_grad():
        expected = reference(**batch)
    model = OTMELModel.from_pretrained(saved, attn_implementation="sdpa").eval()
    assert _implementations(model) == {"sdpa"}
    for implementation in ("sdpa", "eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert _implementations(model) == {implementation}
        with torch.no_grad():
            out = model(**batch)
        assert torch.allclose(out.logits, expected.logits, atol=1e-4)
        assert torch.allclose(out.scores.overall, expected.scores.overall, atol=1e-5)


def test_bfloat16_forward_is_close_to_float32(saved, processor):
    batch = make_batch(processor)
    model = OTMELModel.from_pretrained(saved).eval()
    with torch.no_grad():
        expected = model(**batch)
        out = model.to(torch.bfloat16)(**batch)
    assert out.logits.dtype == torch.bfloat16
    assert (out.scores.overall.float() - expected.scores.overall).abs().max() < 0.05
    assert out.loss.float().item() == pytest.approx(expected.loss.item(), rel=0.05)


def test_from_pretrained_in_float16(saved, processor):
    model = OTMELModel.from_pretrained(saved, dtype=torch.float16).eval()
    assert model.dtype == torch.float16
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    with torch.no_grad():
        out = model(**make_batch(processor))
        expected = OTMELModel.from_pretrained(saved).eval()(**make_batch(processor))
    assert (out.scores.overall.float() - expected.scores.overall).abs().max() < 0.01


def _compiled_matches_eager(tiny_clip_dir, processor, backend):
    torch._dynamo.reset()
    model = build(tiny_clip_dir).eval()
    batch = make_batch(processor, padding="max_length")  # one text length for both sides: one trace of the towers
    with torch.no_grad():
        expected = model(**batch)
        out = torch.compile(model, backend=backend)(**batch)
    assert torch.allclose(out.logits, expected.logits, atol=1e-4)
    assert torch.allclose(out.loss, expected.loss, atol=1e-5)


def test_torch_compile_matches_eager(tiny_clip_dir, processor):
    """Dynamo traces the whole forward (the eager backend: no C++ compile; 20-40 s here, most of it tracing around
    the graph breaks: about 60, at the Sinkhorn convergence checks and the data-dependent branches)."""
    _compiled_matches_eager(tiny_clip_dir, processor, "eager")


@pytest.mark.skipif(not SLOW, reason="minutes on a CPU; OTMEL_SLOW_TESTS=1 runs it")
def test_torch_compile_inductor_matches_eager(tiny_clip_dir, processor):
    _compiled_matches_eager(tiny_clip_dir, processor, "inductor")


# ---------------------------------------------------------------------------------------------------------------
# DDP over two gloo processes, with activation checkpointing and find_unused_parameters=False
# ---------------------------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, scenarios, queue):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for name, path, batches, trainable_clip_temperature in scenarios:
            torch.manual_seed(0)
            model = OTMELModel.from_pretrained(path)
            if trainable_clip_temperature:
                model.clip.logit_scale.requires_grad_(True)
            model.activation_checkpointing_enable()
            model.train()
            ddp = DistributedDataParallel(model, find_unused_parameters=False)
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            try:
                for _ in range(3):
                    loss = ddp(**batches[rank], gather_across_processes=True).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                checksum = sum(p.detach().double().sum().item() for p in model.parameters())
                queue.put((name, rank, "ok", checksum))
            except RuntimeError as error:
                queue.put((name, rank, "error", str(error)[:300]))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_with_activation_checkpointing_and_no_unused_parameter_search(tiny_clip_dir, processor, tmp_path):
    """Three steps of DDP (2 gloo processes, in-batch negatives gathered across them) run, and keep both replicas
    equal: for OT-MEL, for a process whose batch has no picture, and for the CLIP baseline. Unfreezing CLIP's own
    temperature (unused by every OT-MEL score) makes DDP fail: the check is sensitive to an unused parameter."""
    paths = {}
    for mode in ("ot", "clip"):
        paths[mode] = str(tmp_path / mode)
        build(tiny_clip_dir, mode).save_pretrained(paths[mode])
    pad = "max_length"  # gathered texts must have one length on every process
    mixed = [make_batch(processor, pictures="mixed", padding=pad), make_batch(processor, 4, "all", 4, padding=pad)]
    blank = [make_batch(processor, pictures="mixed", padding=pad), make_batch(processor, 4, "none", 4, padding=pad)]
    scenarios = [
        ("ot", paths["ot"], mixed, False),
        ("no picture on one process", paths["ot"], blank, False),
        ("clip baseline", paths["clip"], mixed, False),
        ("trainable CLIP temperature", paths["ot"], mixed, True),  # last: DDP is left mid-reduction
    ]
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, _free_port(), scenarios, queue), nprocs=2, start_method="spawn"
    )
    results = {}
    for _ in range(2 * len(scenarios)):
        name, rank, status, detail = queue.get()
        results.setdefault(name, {})[rank] = (status, detail)
    for name, _, _, trainable in scenarios:
        (status0, detail0), (status1, detail1) = results[name][0], results[name][1]
        if trainable:
            assert status0 == status1 == "error" and "Expected to have finished reduction" in detail0, detail0
        else:
            assert status0 == status1 == "ok", (name, detail0, detail1)
            assert detail0 == pytest.approx(detail1, abs=1e-9), name  # the replicas stayed equal
