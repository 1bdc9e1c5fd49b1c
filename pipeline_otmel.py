"""A 🤗 Transformers `pipeline` for OT-MEL: multimodal entity linking against a KB in three lines.

```python
from transformers import pipeline

linker = pipeline("multimodal-entity-linking", model="outputs/demo", trust_remote_code=True, index="data/synth")
linker({"mention": "Ada", "sentence": "Ada wrote the first program.", "image": "photo.jpg"}, top_k=5)
# -> [{"qid": "Q7259", "name": "Ada Lovelace", "score": 0.71}, ...]
```

`model` is a folder or Hub repository written by `run_mel.py` (or any OT-MEL folder to which
[`save_pipeline_files`] was applied): its `config.json` names this pipeline under `custom_pipelines`, and the folder
holds this module and the modules it imports, so the pipeline loads as remote code (`trust_remote_code=True`) with no
checkout of this project. `index` is an entity index folder (`OTMELLinker.save_index`), a dataset folder or Hub dataset
with a `kb` config, a `datasets.Dataset` of KB rows or a list of KB dicts (`qid`, `name`, `attributes`, `image`); KB
rows are encoded once, when the pipeline is built (or later with [`OTMELPipeline.set_index`]).

A call takes one mention dict (`mention`, optional `sentence`, optional `image`: PIL image, path, bytes or None) or a
list of them, and returns what [`~linking_otmel.OTMELLinker.link`] returns: per mention, the best entities
`[{"qid", "name", "score"}, ...]`, starting with `{"qid": None, "name": None, "nil": True, "score": ...}` when the best
score is below the NIL threshold (the checkpoint's `nil_threshold`, or `nil_threshold=` of the call; `None`: off).
Call arguments: `top_k` (5), `nil_threshold`, `strategy` (`"two_stage"` or `"exhaustive"`), `candidates` (50),
`assignment` (`"ot"` or `"attention"`).
"""

import json
import os
from collections.abc import Mapping

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .data_otmel import load_kb
    from .index_otmel import INDEX_META, EntityIndex
    from .linking_otmel import OTMELLinker
except ImportError:
    from data_otmel import load_kb
    from index_otmel import INDEX_META, EntityIndex
    from linking_otmel import OTMELLinker


PIPELINE_TASK = "multimodal-entity-linking"
_UNSET = object()


class OTMELPipeline(Pipeline):
    """Links mentions (text with an optional picture) to the entities of a KB with an OT-MEL model.

    Built by `pipeline("multimodal-entity-linking", model=..., trust_remote_code=True, index=...)` (module docstring),
    or directly: `OTMELPipeline(model=model, processor=processor, index=kb)`.

    Args:
        model ([`OTMELModel`]): the linker's model.
        processor ([`OTMELProcessor`]): its processor (loaded from the model's folder by `pipeline`).
        index (*optional*): the KB (module docstring); without one, call [`~OTMELPipeline.set_index`] before linking.
        index_dtype (`str`, *optional*, defaults to `"float32"`): storage of the encoded KB (`"float16"` halves it).
        batch_size (`int`, *optional*, defaults to 64): mentions (and KB rows) encoded together.
        top_k, nil_threshold, strategy, candidates, assignment: defaults of every call (module docstring).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, model, *args, index=None, index_dtype: str = "float32", **kwargs):
        super().__init__(model, *args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "the multimodal-entity-linking pipeline needs the OT-MEL processor: load it from the model's folder "
                "(pipeline(..., model=FOLDER_OR_HUB_ID)) or pass processor=OTMELProcessor(...)"
            )
        self.index_dtype = index_dtype
        self.linker = OTMELLinker(self.model, self.processor, batch_size=self._batch_size or 64)
        if index is not None:
            self.set_index(index)

    # ---- the KB ---------------------------------------------------------------------------------------------------

    def set_index(self, index, progress: bool = True) -> EntityIndex:
        """Sets the KB the pipeline links against and returns its [`EntityIndex`].

        `index`: an [`EntityIndex`]; a folder written by `OTMELLinker.save_index` (refused when it was built with
        another model or processor); a dataset folder or Hub dataset id with a `kb` config; a `datasets.Dataset` of KB
        rows; or a list of KB dicts (`qid`, `name`, `attributes`, `image`). KB rows are encoded here.
        """
        if isinstance(index, EntityIndex) or type(index).__name__ == "EntityIndex":
            index.check(model=self.model, processor=self.processor)
            self.linker.index = index
            return index
        if isinstance(index, (str, os.PathLike)):
            path = os.fspath(index)
            if os.path.isfile(os.path.join(path, INDEX_META)):
                return self.linker.load_index(path)
            index = load_kb(path, where="index")
        if hasattr(index, "keys") and hasattr(index, "values") and not isinstance(index, Mapping):  # a DatasetDict
            splits = list(index.values())
            if len(splits) != 1:
                raise ValueError(f"index: a DatasetDict must hold one KB split, found {list(index.keys())}")
            index = splits[0]
        if isinstance(index, (str, bytes, Mapping)) or not hasattr(index, "__len__"):
            raise TypeError(
                f"index must be an EntityIndex, an index or dataset folder, a Hub dataset id, a datasets.Dataset or a "
                f"list of KB dicts (qid, name, attributes, image), got {type(index).__name__}"
            )
        return self.linker.build_index(index, dtype=self.index_dtype, progress=progress)

    @property
    def index(self) -> EntityIndex | None:
        return self.linker.index

    # ---- Pipeline API ---------------------------------------------------------------------------------------------

    def _sanitize_parameters(
        self, top_k=None, nil_threshold=_UNSET, strategy=None, candidates=None, assignment=None, chunk_size=None
    ):
        forward = {
            name: value
            for name, value in (
                ("top_k", top_k),
                ("strategy", strategy),
                ("candidates", candidates),
                ("assignment", assignment),
                ("chunk_size", chunk_size),
            )
            if value is not None
        }
        if nil_threshold is not _UNSET:
            forward["nil_threshold"] = nil_threshold
        return {}, forward, {}

    def __call__(self, inputs, **kwargs):
        """Links one mention dict (returns its list of answers) or a list of them (returns a list of lists), or a
        `datasets` split with `mention`, `sentence`, `image` columns. Keyword arguments: module docstring."""
        _, forward, _ = self._sanitize_parameters(**kwargs)
        forward = {**self._forward_params, **forward}
        single = isinstance(inputs, Mapping)
        if isinstance(inputs, (str, bytes)):
            raise TypeError(
                "the pipeline links mention dicts: pass {'mention': ..., 'sentence': ..., 'image': ...} or a list of them"
            )
        results = self._link([inputs] if single else inputs, **forward)
        return results[0] if single else results

    def _link(self, mentions, **params):
        if self.linker.index is None:
            raise RuntimeError("no KB: pass index=... to pipeline(...) or call set_index(...) first")
        return self.linker.link(mentions, **params)

    def preprocess(self, inputs):
        return {"mentions": [inputs]}

    def _forward(self, model_inputs, **params):
        return {"results": self._link(model_inputs["mentions"], **params)}

    def postprocess(self, model_outputs):
        return model_outputs["results"][0]


# ----------------------------------------------------------------------------------------------------------------
# Registration and saving
# ----------------------------------------------------------------------------------------------------------------


def pipeline_config() -> dict:
    """The `custom_pipelines` entry of a saved folder's `config.json` (what `Pipeline.save_pretrained` writes for a
    registered pipeline): the task, its class in this module, the model class that loads the checkpoint."""
    return {
        PIPELINE_TASK: {
            "impl": f"{OTMELPipeline.__module__.split('.')[-1]}.{OTMELPipeline.__name__}",
            "pt": ["AutoModel"],
            "type": "multimodal",
        }
    }


def register_pipeline():
    """Registers the task in this process (done on import), so that `pipeline("multimodal-entity-linking",
    model=<OTMELModel>, processor=<OTMELProcessor>, index=...)` works with objects already loaded."""
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=OTMELPipeline, pt_model=AutoModel, type="multimodal"
    )


def save_pipeline_files(save_directory, config=None) -> list[str]:
    """Makes a saved OT-MEL folder (model and processor already saved there) loadable with
    `pipeline("multimodal-entity-linking", model=FOLDER, trust_remote_code=True)`, locally and from the Hub.

    Copies this module and every module it imports relatively (the linker, the index, ranking and metrics modules;
    `save_pretrained` of the model copies only the modelling ones) into the folder, and records the pipeline under
    `custom_pipelines` in its `config.json` (and on `config`, when given, so that a later `save_pretrained` keeps it).

    Returns:
        The paths of the copied files.
    """
    from transformers.dynamic_module_utils import custom_object_save

    save_directory = os.fspath(save_directory)
    config_file = os.path.join(save_directory, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file}: save the model there first (model.save_pretrained)")
    copied = list(dict.fromkeys(str(p) for p in custom_object_save(OTMELPipeline, save_directory)))
    with open(config_file, encoding="utf-8") as f:
        saved = json.load(f)
    saved["custom_pipelines"] = pipeline_config()
    with open(config_file, "w", encoding="utf-8") as f:
        f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    if config is not None:
        config.custom_pipelines = pipeline_config()
    return copied


register_pipeline()


__all__ = [
    "PIPELINE_TASK",
    "OTMELPipeline",
    "pipeline_config",
    "register_pipeline",
    "save_pipeline_files",
]
