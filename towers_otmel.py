"""Faster CLIP towers at inference: int8 dynamic quantisation (CPU) or bfloat16 (GPU) of an OT-MEL's two CLIP towers.

```python
from towers_otmel import optimize_towers

model = optimize_towers(OTMELModel.from_pretrained("outputs/demo"), "int8")   # in place, inference only
```

What changes: only the text and vision towers of the CLIP encoder (`model.clip.text_model`, `model.clip.vision_model`,
i.e. their attention and MLP `nn.Linear` layers, where nearly all of the encoding time goes: docs/benchmarks.md,
"Full-size towers"). The CLIP projections and every OT-MEL head stay float32, so the scores are computed as before from
slightly perturbed token and global features.

- `"int8"`: `torch.ao.quantization.quantize_dynamic` of the towers' `nn.Linear` layers (int8 weights, per-tensor
  int8 activations whose scale is computed per call, fbgemm / oneDNN kernels). CPU only. An activation scale is
  computed over the whole batch, so a mention's features depend slightly on the other mentions of its batch (within
  the same tolerance as the change from float32: at most 0.004 in S_O measured; benchmarks/bench_towers.py).
- `"bfloat16"`: the towers' weights and activations in bfloat16, their outputs cast back to float32. Meant for GPUs;
  on a CPU without bfloat16 instructions (AVX2 only) it is much slower than float32.
- `"float32"`: unchanged.

The model keeps the fingerprint of its float32 weights ([`~index_otmel.model_fingerprint`]): an entity index built
with the float32 model loads and matches a model whose towers were optimised, and the reverse; the index records the
precision of the towers that encoded its entities (`meta["model"]["towers"]`).

Inference only: an optimised model refuses `train()` and `save_pretrained()` (reload the float32 model to train or
save). Training (`run_mel.py`) never calls this module.
"""

import logging
import warnings

import torch
from torch import nn


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .index_otmel import model_fingerprint
except ImportError:
    from index_otmel import model_fingerprint


logger = logging.getLogger(__name__)

TOWER_PRECISIONS = ("float32", "int8", "bfloat16")
# What `OTMELLinker.from_pretrained(quantize=...)` and `otmel-link --quantize` accept.
QUANTIZE_CHOICES = ("auto", "none", "int8", "bfloat16")
# The attribute of a model whose towers were optimised: {"precision": str, "weights": sha256 of the float32 weights},
# and "loaded_in" (the dtype) for a model loaded in bfloat16 / float16 ([`float32_heads`]): the weights are its own.
TOWERS_ATTRIBUTE = "otmel_towers"


def tower_modules(model) -> dict:
    """`{"text": model.clip.text_model, "vision": model.clip.vision_model}`: the CLIP towers of an OT-MEL."""
    clip = getattr(model, "clip", None)
    if clip is None or not hasattr(clip, "text_model") or not hasattr(clip, "vision_model"):
        raise TypeError(f"{type(model).__name__} has no CLIP towers (model.clip.text_model / vision_model)")
    return {"text": clip.text_model, "vision": clip.vision_model}


def towers_precision(model) -> str:
    """The precision the towers of `model` run in: `"float32"` unless [`optimize_towers`] changed it."""
    state = getattr(model, TOWERS_ATTRIBUTE, None)
    return state["precision"] if state else "float32"


def default_towers_precision(device=None) -> str:
    """What `quantize="auto"` chooses on `device` (default CPU): `"int8"` on CPU, `"float32"` elsewhere.

    Measured (docs/benchmarks.md, "Full-size towers"; ViT-B/32 size, 2-core AVX2 CPU): int8 towers encode mentions
    1.4-1.7x and entities 1.8-2.6x faster than float32 (by batch size), S_O within 0.006 of float32 (the stated
    tolerance is 0.01). On a GPU nothing was measured here, so the default stays float32 (`"bfloat16"` is the option
    to try there; on this CPU bfloat16 ran 6x slower than float32).
    """
    device = torch.device(device if device is not None else "cpu")
    return "int8" if device.type == "cpu" else "float32"


def resolve_quantize(quantize, device=None) -> str:
    """The tower precision for a `quantize` argument: `"auto"` -> [`default_towers_precision`], `None` / `"none"` ->
    `"float32"`, `"int8"` / `"bfloat16"` themselves; anything else raises `ValueError` naming the choices."""
    if quantize is None or quantize == "none":
        return "float32"
    if quantize == "auto":
        return default_towers_precision(device)
    if quantize in TOWER_PRECISIONS:
        return quantize
    raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} or None, got {quantize!r}")


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"this OT-MEL's CLIP towers were optimised for inference (towers_otmel.optimize_towers): it cannot {what}; "
            "reload the float32 model (OTMELModel.from_pretrained) to train or save it"
        )

    return refuse


def _guard(model):
    """`train(True)` and `save_pretrained` raise on an optimised model; `eval()` / `train(False)` work."""
    train = model.train

    def inference_only_train(mode: bool = True):
        if mode:
            _refuse("train")()
        return train(False)

    model.train = inference_only_train
    model.save_pretrained = _refuse("be saved")


def _quantize_int8(towers: dict):
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as err:  # deprecated in favour of torchao; still in torch 2.13
        raise ImportError(
            f"int8 towers need torch.ao.quantization.quantize_dynamic, absent from torch {torch.__version__}: "
            "use quantize=None"
        ) from err
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in engines), None)
    if engine is None:
        raise RuntimeError(f"int8 towers: torch {torch.__version__} has no quantized CPU engine (found {engines})")
    if torch.backends.quantized.engine in ("none", None):
        torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # the deprecation notices of torch.ao.quantization, once at load time
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        for tower in towers.values():
            quantize_dynamic(tower, {nn.Linear}, dtype=torch.qint8, inplace=True)


def _floats_to(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):  # ModelOutput is a dict: its fields, in place
        for key in list(value.keys()):
            value[key] = _floats_to(value[key], dtype)
        return value
    if isinstance(value, tuple):
        return type(value)(_floats_to(v, dtype) for v in value)
    return value


def _reduced(towers: dict, dtype: torch.dtype = torch.bfloat16):
    """Towers in `dtype` (bfloat16 or float16): floating inputs cast to it on the way in, outputs back to float32 on
    the way out (the projections and the OT-MEL heads read float32)."""

    def cast_in(module, args, kwargs):
        return _floats_to(args, dtype), {k: _floats_to(v, dtype) for k, v in kwargs.items()}

    def cast_out(module, args, kwargs, output):
        return _floats_to(output, torch.float32)

    for tower in towers.values():
        tower.to(dtype)
        tower.register_forward_pre_hook(cast_in, with_kwargs=True)
        tower.register_forward_hook(cast_out, with_kwargs=True)


def float32_heads(model):
    """A model loaded in bfloat16 or float16 (`from_pretrained(..., dtype=torch.bfloat16)`, `pipeline(...,
    dtype=...)`), made ready to link, in place: its projections and OT-MEL heads back in float32 (an entity index holds
    float32 features), its CLIP towers kept in the loaded dtype with float32 outputs, as [`optimize_towers`] does for
    `"bfloat16"`; inference only. A float32 model, or one whose towers were optimised, is returned unchanged.

    Its weights were rounded when it was loaded: its fingerprint is that of the rounded weights, so an index built
    with the float32 model does not match it (load that model in float32 with `quantize="bfloat16"` to use such an
    index; [`~index_otmel.EntityIndex.check`] says so)."""
    dtype = model.dtype
    if dtype == torch.float32 or getattr(model, TOWERS_ATTRIBUTE, None):
        return model
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"an OT-MEL links in float32, bfloat16 or float16, the model is in {dtype}")
    model.float().eval()
    precision = str(dtype).removeprefix("torch.")
    state = {"precision": precision, "weights": model_fingerprint(model)["weights"], "loaded_in": precision}
    _reduced(tower_modules(model), dtype)
    setattr(model, TOWERS_ATTRIBUTE, state)
    _guard(model)
    logger.info("model loaded in %s: heads in float32, CLIP towers in %s (inference only)", precision, precision)
    return model


def optimize_towers(model, precision: str = "int8"):
    """Makes the CLIP towers of an OT-MEL faster for inference, in place; returns the model (in eval mode).

    Args:
        model ([`~modeling_otmel.OTMELModel`]): a float32 model (the heads must be float32); on the CPU for `"int8"`.
        precision (`str`): `"int8"` (dynamic quantisation of the towers' `nn.Linear` layers, CPU), `"bfloat16"`
            (GPU) or `"float32"` (nothing changes). A model already optimised is refused (reload it).

    The model keeps the fingerprint of its float32 weights and records the precision ([`towers_precision`]); it
    refuses `train()` and `save_pretrained()` afterwards.
    """
    if precision not in TOWER_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(TOWER_PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return model.eval()
    if getattr(model, TOWERS_ATTRIBUTE, None):
        raise ValueError(
            f"the towers are already optimised ({towers_precision(model)}): reload the float32 model to change them"
        )
    towers = tower_modules(model)
    float_weights = [p for t in towers.values() for p in t.parameters() if p.is_floating_point()]
    if any(p.dtype != torch.float32 for p in float_weights):
        raise ValueError("optimize_towers takes a float32 model")
    device = next(iter(float_weights)).device
    if precision == "int8" and device.type != "cpu":
        raise ValueError(
            f"int8 towers (dynamic quantisation) run on the CPU only, the model is on {device}: use 'bfloat16' there"
        )
    weights = model_fingerprint(model)["weights"]  # of the float32 weights, before any change
    model.eval()
    if precision == "int8":
        _quantize_int8(towers)
    else:
        _reduced(towers, torch.bfloat16)
    setattr(model, TOWERS_ATTRIBUTE, {"precision": precision, "weights": weights})
    _guard(model)
    logger.info("CLIP towers now run in %s (inference only)", precision)
    return model


__all__ = [
    "QUANTIZE_CHOICES",
    "TOWER_PRECISIONS",
    "default_towers_precision",
    "float32_heads",
    "optimize_towers",
    "resolve_quantize",
    "tower_modules",
    "towers_precision",
]
