"""OT-MEL configuration."""

import math

from transformers import CLIPConfig, PreTrainedConfig


_CHOICES = {
    "fusion_assignment": ("ot", "attention", "off"),
    "unimodal_assignment": ("ot", "attention", "off"),
    "pooling": ("softpool", "mean", "max"),
    "distillation": ("off", "kl", "mse", "row_kl"),
    "inference_assignment": ("ot", "attention"),
}


# The paper's variants, each a set of config settings: the models of Table 1 (what `run_mel.py --mode` trains) and the
# ablations of Table 2 (applied on top of OT-MEL). Name -> (settings, the paper's label).
PAPER_MODELS = {
    "ot": ({}, "OT-MEL (OT)"),
    "att": (
        {"fusion_assignment": "attention", "unimodal_assignment": "attention"},
        "ATT (attention everywhere, no OT)",
    ),
    "kd": ({"distillation": "kl", "inference_assignment": "attention"}, "OT-MEL (KD): OT distilled into attention"),
    "clip": ({"fusion_assignment": "off", "unimodal_assignment": "off"}, "CLIP baseline (global features only)"),
}
PAPER_ABLATIONS = {
    "F1": ({"fusion_assignment": "attention"}, "F1: attention in fusion"),
    "F2": ({"fusion_assignment": "off"}, "F2: without fusion"),
    "M1": ({"unimodal_assignment": "attention"}, "M1: attention in unimodal matching"),
    "M2": ({"unimodal_assignment": "off"}, "M2: without unimodal matching"),
    "O1": ({"pooling": "mean"}, "O1: mean pooling"),
    "O2": ({"pooling": "max"}, "O2: max pooling"),
    "K1": ({"distillation": "mse"}, "K1: MSE distillation"),
    "K2": ({"distillation": "row_kl"}, "K2: row-KL distillation"),
}


def paper_variant(config) -> str:
    """The paper's name for a config (an [`OTMELConfig`] or its dict): its Table 1 model, with the Table 2 ablations it
    applies, e.g. `"OT-MEL (OT) [F1: attention in fusion]"`."""

    def get(name):
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        return getattr(OTMELConfig, name) if value is None else value

    def applies(settings):
        return all(get(key) == value for key, value in settings.items())

    if applies(PAPER_MODELS["clip"][0]):
        return PAPER_MODELS["clip"][1]
    model = "att" if applies(PAPER_MODELS["att"][0]) else "kd" if get("distillation") != "off" else "ot"
    label = PAPER_MODELS[model][1]
    if model == "kd":
        label += ", attention at inference" if get("inference_assignment") == "attention" else ", OT at inference"
    # An ablation shows where it departs from the model's own settings (KD's own distillation is KL).
    own = {**PAPER_MODELS[model][0], "distillation": "kl" if model == "kd" else "off"}
    notes = [
        text
        for settings, text in PAPER_ABLATIONS.values()
        if applies(settings)
        and any(own.get(key, getattr(OTMELConfig, key)) != value for key, value in settings.items())
    ]
    return label + (f" [{'; '.join(notes)}]" if notes else "")


class OTMELConfig(PreTrainedConfig):
    r"""
    Configuration of an [`OTMELModel`]: a CLIP backbone (`clip_config`) plus the OT-MEL heads of
    Zhang et al., "Optimal Transport Guided Correlation Assignment for Multimodal Entity Linking" (2024).

    Every design choice that the paper ablates (Table 2) is a value here, so each variant is a config, not a code
    edit: `PAPER_MODELS` (Table 1) and `PAPER_ABLATIONS` (Table 2) of this module list the settings of each, and
    [`paper_variant`] names the variant of a config.

    Args:
        clip_config (`dict` or [`CLIPConfig`], *optional*):
            The CLIP backbone shared by mentions and entities.
        hidden_size (`int`, *optional*, defaults to 96):
            Size of the correlation-assignment space (W_q, W_k, W_h of Eq. 6-12 and 19-24).
        ot_epsilon (`float`, *optional*, defaults to 0.1):
            Entropic regularisation of Sinkhorn. Costs lie in [0, 1]; 0.6 (paper text) gives a nearly uniform plan.
        sinkhorn_iterations (`int`, *optional*, defaults to 20):
            Maximum number of Sinkhorn iterations (one iteration updates both potentials).
        sinkhorn_tolerance (`float`, *optional*, defaults to 1e-3):
            Early stop once the L2 norm of the row-marginal violation (each plan normalised to total mass 1) is below
            this for every problem of the batch. 0 disables early stopping.
        logit_scale_init (`float`, *optional*, defaults to 20.0):
            Initial inverse temperature of the InfoNCE losses (cosine scores are multiplied by it).
        learnable_logit_scale (`bool`, *optional*, defaults to `True`):
            Whether the inverse temperature is trained (clamped to at most 100, as in CLIP).
        max_text_length (`int`, *optional*, defaults to 40):
            Token budget of mention (`surface [SEP] sentence`) and entity (`name [SEP] attributes`) texts.
        fusion_assignment (`str`, *optional*, defaults to `"ot"`):
            Cross-modal assignment inside the multimodal fusion (S_F): `"ot"`, `"attention"` or `"off"` (no S_F).
        unimodal_assignment (`str`, *optional*, defaults to `"ot"`):
            Token-to-token and patch-to-patch assignment of S_T / S_V: `"ot"`, `"attention"` or `"off"` (S_T and S_V
            keep only their global-feature term).
        pooling (`str`, *optional*, defaults to `"softpool"`):
            Set pooling (Eq. 13-14): `"softpool"`, `"mean"` or `"max"`.
        distillation (`str`, *optional*, defaults to `"off"`):
            OT-to-attention distillation (Eq. 28-29): `"off"`, `"kl"` (row and column KL), `"mse"`, `"row_kl"`.
        kd_weight (`float`, *optional*, defaults to 0.01):
            Weight of L_KD in J = L + kd_weight * L_KD. The paper writes J = L + L_KD (weight 1); L_KD sums the
            divergence over the rows of each plan (tens of tokens), and a large weight pulls the shared projections
            away from the task: the KD model loses H@1 whether it then ranks with attention or with OT. Measured with
            the tiny model (docs/benchmarks.md): weight 1 lost 10 points on the default synthetic world, 0.1 lost 7
            on a hard one, 0.01 lost 1.4 there (one seed).
        inference_assignment (`str`, *optional*, defaults to `"ot"`):
            What replaces each `"ot"` assignment when the model is not training: `"ot"` or `"attention"` (the attention
            softmax of the same projections, the fast path of a distilled model).
        retrieval_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of an extra InfoNCE term on the mention-independent score S_R (S_F and the global terms), which
            ranks a whole KB by one matrix product before re-ranking. Not in the paper; 0 gives the paper's objective.
        pairwise_negatives (`int`, *optional*, defaults to 0):
            Training only. 0: the pairwise terms (S_T, S_V and so S_O) score every mention against every in-batch
            entity, B^2 unimodal assignments (the paper). k > 0: against its gold entity and the k other in-batch
            entities with the highest S_R, B(k+1) assignments: the hard negatives that two-stage ranking re-ranks.
            S_F and S_R always use every in-batch entity.
        nil_threshold (`float`, *optional*, defaults to `None`):
            NIL prediction: a mention whose best S_O is below this value is answered "not in the KB" (NIL) by
            [`~linking_otmel.OTMELLinker.link`] and the `multimodal-entity-linking` pipeline. `None` turns NIL
            prediction off (the best entity is always answered). `run_mel.py` chooses it on the validation split when
            that split has NIL mentions (`metrics_otmel.choose_nil_threshold`); without NIL training data, set it from
            a few labelled examples with the same function.
    """

    model_type = "otmel"
    sub_configs_defaults = {"clip_config": CLIPConfig}

    clip_config: dict | CLIPConfig | None = None
    hidden_size: int = 96
    ot_epsilon: float = 0.1
    sinkhorn_iterations: int = 20
    sinkhorn_tolerance: float = 1e-3
    logit_scale_init: float = 20.0
    learnable_logit_scale: bool = True
    max_text_length: int = 40
    fusion_assignment: str = "ot"
    unimodal_assignment: str = "ot"
    pooling: str = "softpool"
    distillation: str = "off"
    kd_weight: float = 0.01
    inference_assignment: str = "ot"
    retrieval_loss_weight: float = 1.0
    pairwise_negatives: int = 0
    nil_threshold: float | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_settings()

    def check_settings(self):
        """Raises `ValueError` naming the setting and its allowed values for any invalid value or combination."""
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"OTMELConfig.{name}={value!r} is invalid; allowed values: {', '.join(allowed)}.")
        uses_ot = "ot" in (self.fusion_assignment, self.unimodal_assignment)
        if self.distillation != "off" and not uses_ot:
            raise ValueError(
                f"OTMELConfig.distillation={self.distillation!r} needs an OT teacher: set fusion_assignment or "
                f"unimodal_assignment to 'ot' (now {self.fusion_assignment!r} / {self.unimodal_assignment!r}), "
                "or distillation='off'."
            )
        if self.inference_assignment == "attention" and uses_ot and self.distillation == "off":
            raise ValueError(
                "OTMELConfig.inference_assignment='attention' replaces OT by attention at inference, which is only "
                "meaningful after distillation: set distillation to one of 'kl', 'mse', 'row_kl', or "
                "inference_assignment='ot'."
            )
        for name in ("hidden_size", "sinkhorn_iterations", "max_text_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"OTMELConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not self.ot_epsilon > 0:
            raise ValueError(f"OTMELConfig.ot_epsilon must be > 0, got {self.ot_epsilon!r}.")
        if self.pairwise_negatives < 0:
            raise ValueError(
                f"OTMELConfig.pairwise_negatives must be >= 0 (0: all in-batch entities), got {self.pairwise_negatives!r}."
            )
        if self.sinkhorn_tolerance < 0 or self.kd_weight < 0 or self.retrieval_loss_weight < 0:
            raise ValueError("OTMELConfig.sinkhorn_tolerance, kd_weight and retrieval_loss_weight must be >= 0.")
        if self.nil_threshold is not None and (
            isinstance(self.nil_threshold, bool)
            or not isinstance(self.nil_threshold, (int, float))
            or not math.isfinite(self.nil_threshold)
        ):
            raise ValueError(
                f"OTMELConfig.nil_threshold must be a finite number (a score) or None (no NIL prediction), got "
                f"{self.nil_threshold!r}."
            )
        if not self.logit_scale_init > 0:
            raise ValueError(f"OTMELConfig.logit_scale_init must be > 0, got {self.logit_scale_init!r}.")

    def validate_architecture(self):
        super().validate_architecture()
        self.check_settings()

    def get_text_config(self, decoder=None, encoder=None):
        """The text tower's config (`clip_config.text_config`): what `resize_token_embeddings` updates."""
        return self.clip_config.get_text_config(decoder=decoder, encoder=encoder)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # `from_pretrained(..., ot_epsilon=0.0)` (also through `AutoModel.from_pretrained`) sets its keyword arguments
        # after `__post_init__` has checked the saved ones: checked again here.
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).check_settings()
        return loaded


__all__ = ["PAPER_ABLATIONS", "PAPER_MODELS", "OTMELConfig", "paper_variant"]

OTMELConfig.register_for_auto_class()
