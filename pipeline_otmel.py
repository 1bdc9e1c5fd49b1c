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

A call takes one mention dict (`mention`, optional `sentence`, optional `image`: PIL image, path or `file://` URL,
bytes or None; `id` and `answer`, the other columns of a `mentions` split, are allowed and unused; any other key is
refused) or a list of them or a `datasets` split, and returns what [`~linking_otmel.OTMELLinker.link`] returns: per
mention, the best entities `[{"qid", "name", "score"}, ...]`, starting with `{"qid": None, "name": None, "nil": True,
"score": ...}` when the best score is below the NIL threshold (the checkpoint's `nil_threshold`, or `nil_threshold=` of
the call; `None`: off). Call arguments: `top_k` (5), `nil_threshold`, `strategy` (`"two_stage"` or `"exhaustive"`),
`candidates` (50), `assignment` (`"ot"` or `"attention"`), and those of every transformers pipeline: `batch_size`
(mentions encoded together; the pipeline's, 64 by default) and `num_workers` (accepted, unused: pictures are decoded in
the calling process).

With a model and processor already loaded: `OTMELPipeline(model=model, processor=processor, index=kb)`.
`pipeline("multimodal-entity-linking", model=<model object>, ...)` works only in a process that imported this module
(importing it registers the task: `import pipeline_otmel` in a checkout), since transformers' `pipeline()` reads
`custom_pipelines` only from a folder or Hub id given as `model=`; for a model object it raises `KeyError: Unknown
task`. Without a checkout, pass the folder or Hub id, with `processor=` and `model_kwargs=` for your own settings:
`pipeline(model=FOLDER_OR_HUB_ID, trust_remote_code=True, index=kb)`; or take the class from it,
`OTMELPipeline = transformers.dynamic_module_utils.get_class_from_dynamic_module("pipeline_otmel.OTMELPipeline",
FOLDER_OR_HUB_ID)` (which also registers the task). `save_pretrained` writes a folder that loads back identically
(model, processor, this code; not the KB).
"""

import copy
import json
import numbers
import os
from collections.abc import Iterator, Mapping

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import PROCESSOR_NAME


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .data_otmel import MENTION_COLUMNS, load_kb
    from .index_otmel import INDEX_META, EntityIndex
    from .linking_otmel import OTMELLinker
    from .processing_otmel import name_hints
except ImportError:
    from data_otmel import MENTION_COLUMNS, load_kb
    from index_otmel import INDEX_META, EntityIndex
    from linking_otmel import OTMELLinker
    from processing_otmel import name_hints


PIPELINE_TASK = "multimodal-entity-linking"
_UNSET = object()


class OTMELPipeline(Pipeline):
    """Links mentions (text with an optional picture) to the entities of a KB with an OT-MEL model.

    Built by `pipeline("multimodal-entity-linking", model=FOLDER_OR_HUB_ID, trust_remote_code=True, index=...)`, or
    directly: `OTMELPipeline(model=model, processor=processor, index=kb)` (module docstring).

    Args:
        model ([`OTMELModel`]): the linker's model.
        processor ([`OTMELProcessor`]): its processor (loaded from the model's folder by `pipeline`).
        index (*optional*): the KB (module docstring); without one, call [`~OTMELPipeline.set_index`] before linking.
        index_dtype (`str`, *optional*, defaults to `"float32"`): storage of the encoded KB (`"float16"` halves it).
        batch_size (`int`, *optional*, defaults to 64): mentions (and KB rows) encoded together.
        top_k, nil_threshold, strategy, candidates, assignment: defaults of every call (module docstring).
    """

    # What `pipeline()` loads from the folder: the OT-MEL processor only (its tokenizer and image processor are inside
    # it). None ("optional") rather than True: a folder without `processor_config.json` then reaches `__init__`, which
    # says so, instead of failing in transformers' fallback with a missing `preprocessor_config.json`.
    _load_processor = None
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, model, *args, index=None, index_dtype: str = "float32", **kwargs):
        super().__init__(model, *args, **kwargs)
        if self.processor is None or not hasattr(self.processor, "process_mentions"):
            raise ValueError(_missing_processor(self.model, self.processor))
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
        if _is_dataset_dict(index):
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

    def __call__(self, inputs, *, batch_size=None, num_workers=None, **kwargs):
        """Links one mention dict (returns its list of answers) or a list of them (returns a list of lists), or a
        `datasets` split with `mention`, `sentence`, `image` columns. Keyword arguments: module docstring."""
        if _is_dataset_dict(inputs):
            raise TypeError(
                f"got a DatasetDict with the splits {', '.join(map(str, inputs.keys()))}: pass one split, "
                f"e.g. dataset[{next(iter(inputs.keys()), 'test')!r}]"
            )
        if isinstance(inputs, (str, bytes)):
            raise TypeError(
                "the pipeline links mention dicts: pass {'mention': ..., 'sentence': ..., 'image': ...} or a list of them"
            )
        if num_workers is not None and (
            isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0
        ):
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        _, forward, _ = self._sanitize_parameters(**kwargs)
        forward = {**self._forward_params, **forward}
        single = isinstance(inputs, Mapping)
        mentions = [inputs] if single else inputs
        if isinstance(mentions, Iterator):  # a generator: read once, here
            mentions = list(mentions)
        _check_mention_keys(mentions)
        linker = self.linker
        if batch_size is not None and batch_size != linker.batch_size:  # this call only (the linker checks the value)
            linker = copy.copy(linker)
            linker.batch_size = batch_size
        results = self._link(mentions, linker=linker, **forward)
        return results[0] if single else results

    def _link(self, mentions, linker=None, **params):
        linker = linker or self.linker
        if linker.index is None:
            raise RuntimeError("no KB: pass index=... to pipeline(...) or call set_index(...) first")
        return linker.link(mentions, **params)

    def preprocess(self, inputs):
        return {"mentions": [inputs]}

    def _forward(self, model_inputs, **params):
        return {"results": self._link(model_inputs["mentions"], **params)}

    def postprocess(self, model_outputs):
        return model_outputs["results"][0]

    def save_pretrained(self, save_directory, **kwargs):
        """Saves what `pipeline(model=save_directory, trust_remote_code=True, index=...)` loads back identically: the
        model, the OT-MEL processor (`processor_config.json`, with its `max_text_length` and `separator`; transformers'
        `Pipeline.save_pretrained` would save only its tokenizer and image processor) and this pipeline's code
        ([`save_pipeline_files`]). `kwargs` go to each `save_pretrained`. The KB is not saved: `self.linker.save_index`
        saves the encoded one."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"{save_directory} is a file: pass a folder")
        self.model.config.custom_pipelines = pipeline_config()  # so that the model's own save copies the pipeline
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)
        save_pipeline_files(save_directory, self.model.config)


def _is_dataset_dict(value) -> bool:
    """A `datasets.DatasetDict` / `IterableDatasetDict` (a dict of splits, so a `Mapping` like a mention dict)."""
    return isinstance(value, Mapping) and hasattr(value, "column_names") and hasattr(value, "num_columns")


def _check_mention_keys(mentions):
    """Refuses a mention dict with a key the linker would ignore (`"Sentence"`, `"picture"`): a `ValueError` naming
    it, its position and the accepted keys (`data_otmel.MENTION_COLUMNS`)."""
    if not isinstance(mentions, (list, tuple)):
        return  # a datasets split (extra columns are normal there) or something `link` refuses with its own message
    for i, mention in enumerate(mentions):
        if not isinstance(mention, Mapping):
            continue
        unknown = [key for key in mention if key not in MENTION_COLUMNS]
        if unknown:
            raise ValueError(
                f"mention {i} has unknown key(s) {name_hints(unknown, MENTION_COLUMNS)}: a mention dict takes "
                f"{', '.join(MENTION_COLUMNS)} ('mention' required; 'id' and 'answer' are not used for linking)"
            )


def _missing_processor(model, processor) -> str:
    """Why the pipeline has no usable OT-MEL processor, and how to give it one."""
    if processor is not None:
        return (
            f"the multimodal-entity-linking pipeline needs the OT-MEL processor, got {type(processor).__name__}: "
            "pass processor=AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True) of an OT-MEL folder"
        )
    folder = str(getattr(model, "name_or_path", "") or "")
    if folder and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, PROCESSOR_NAME)):
        return (
            f"the multimodal-entity-linking pipeline needs the OT-MEL processor, and {folder} has none (no "
            f"{PROCESSOR_NAME}; model.save_pretrained alone does not write it): save it there with "
            "processor.save_pretrained(FOLDER), or pass processor=... to pipeline(...)"
        )
    return (
        "the multimodal-entity-linking pipeline needs the OT-MEL processor and none was given or loaded: pass "
        "processor=AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True) (which also shows why a folder's "
        f"{PROCESSOR_NAME} does not load), or build the pipeline from the folder: pipeline(model=FOLDER, "
        "trust_remote_code=True, index=...)"
    )


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
    model=<OTMELModel>, processor=<OTMELProcessor>, index=...)` works with objects already loaded, in a process that
    imported this module (a checkout). Elsewhere (remote code only) transformers does not know the task for a model
    object, as it reads `custom_pipelines` only from a folder or Hub id: there, `pipeline(model=FOLDER_OR_HUB_ID,
    trust_remote_code=True, index=...)` (module docstring)."""
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
