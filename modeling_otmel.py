"""PyTorch OT-MEL: multimodal entity linking with optimal-transport correlation assignment.

Zhang et al., "Optimal Transport Guided Correlation Assignment for Multimodal Entity Linking", Findings of ACL 2024.
Equation numbers refer to the paper; `docs/method.md` of the project states each decision taken where it is ambiguous.

Shapes: B_m mentions, B_e entities, L_t text tokens, L_v visual tokens (patches plus class token), d_t / d_v CLIP
hidden sizes, P the CLIP projection size, D = `config.hidden_size` (the assignment space).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .configuration_otmel import OTMELConfig
    from .sinkhorn_otmel import sinkhorn
except ImportError:
    from configuration_otmel import OTMELConfig
    from sinkhorn_otmel import sinkhorn

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


# Softpool bias of padding. Finite, so that 0 times it stays 0 (not NaN, as with -inf), and finite in float16 too (the
# bias may be cast to it under autocast); far below any member (G and token states stay within a few hundred), so
# exp() gives padding a weight of exactly 0.
_SOFTPOOL_PADDING = -3e4


def pool_set(members: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pools a set of vectors element-wise (Eq. 13-14).

    Args:
        members (`torch.Tensor` of shape `(..., N, D)`): the set.
        mask (`torch.Tensor` of shape `(..., N)`): 1 for members, 0 for padding (padding takes no part; a set without
            members pools to garbage).
        pooling (`str`): `"softpool"` (sum_i w_i * g_i with w = softmax over the set, per dimension), `"mean"` or
            `"max"`.

    Returns:
        `torch.Tensor` of shape `(..., D)`.
    """
    keep = mask.unsqueeze(-1).bool()
    if pooling == "mean":
        m = keep.to(members.dtype)
        return (members * m).sum(-2) / m.sum(-2).clamp_min(1)
    if pooling == "max":
        return members.masked_fill(~keep, float("-inf")).amax(-2)
    return softpool_biased(members + _softpool_bias(keep, members.dtype))


def _softpool_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, _SOFTPOOL_PADDING)


def softpool_biased(members: torch.Tensor) -> torch.Tensor:
    """Softpool `(..., N, D) -> (..., D)` of members whose padding already holds a large negative bias: the pairwise
    matching adds it inside the product that makes the members, which saves a full-size masking pass."""
    weights = torch.softmax(members, dim=-2)
    return (weights.mul_(members) if not torch.is_grad_enabled() else weights * members).sum(-2)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over `dim` with masked entries at zero probability (all-masked slices give zeros, not NaN)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=dim)
    return torch.nan_to_num(out, nan=0.0)


def kd_divergence(plan: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Distillation from an OT plan to attention logits of the same projections (Eq. 28-29).

    The plan is a teacher: it is detached here. Targets are the plan normalised along each axis (see method.md).

    Args:
        plan (`torch.Tensor` of shape `(..., n, m)`): OT plan.
        logits (`torch.Tensor` of shape `(..., n, m)`): attention logits Q K^T / sqrt(D).
        mask (`torch.Tensor` of shape `(..., n, m)`, bool): valid entries.
        mode (`str`): `"kl"` (1/2 of row KL plus column KL), `"row_kl"` or `"mse"`.

    Returns:
        `torch.Tensor` of shape `(...)`: the divergence of each problem, summed over its rows (and columns).
    """
    plan = plan.detach()
    terms = []
    for dim in (-1, -2) if mode != "row_kl" else (-1,):
        target = plan / plan.sum(dim, keepdim=True).clamp_min(1e-30)
        has = mask.any(dim, keepdim=True)
        if mode == "mse":
            pred = masked_softmax(logits, mask, dim)
            terms.append(((pred - target) ** 2 * mask).sum((-2, -1)))
            continue
        log_pred = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)
        log_pred = torch.where(mask & has, log_pred, torch.zeros_like(log_pred))
        log_target = torch.where(target > 0, target.clamp_min(1e-30).log(), torch.zeros_like(target))
        terms.append((target * (log_target - log_pred) * mask).sum((-2, -1)))
    return sum(terms) / (2 if len(terms) == 2 else 1)


class CorrelationAssignment(nn.Module):
    """Assigns values to queries by OT (Eq. 9-12) or attention (Eq. 6-8) over shared projections.

    Q = X W_q, K = Y W_k, H = Y W_h; attention: A = softmax(Q K^T / sqrt(D)); OT: A = n * Sinkhorn((1 - cos(Q, K)) / 2)
    (the barycentric projection, rows sum to 1). Returns G = A H.
    """

    def __init__(self, query_dim: int, key_dim: int, config: OTMELConfig):
        super().__init__()
        self.config = config
        self.query = nn.Linear(query_dim, config.hidden_size, bias=False)
        self.key = nn.Linear(key_dim, config.hidden_size, bias=False)
        self.value = nn.Linear(key_dim, config.hidden_size, bias=False)

    def assign(self, q, k, q_mask, k_mask, mode, zero_padding=True):
        """Assignment between projected queries and keys: `n` query rows (in `S` sets) per key set.

        Every query set of a batch row is matched with that row's keys by one batched matrix product over the
        flattened sets (`S * n` rows), so scoring `S` candidates costs one product per mention, not `S` small ones.

        Args:
            q (`torch.Tensor` of shape `(B_q, n, D)` or `(B_q, S, n, D)`): projected queries, `B_q` 1 (shared by
                every batch row) or B.
            k (`torch.Tensor` of shape `(B, m, D)`): projected keys.
            q_mask (`(B_q, n)` or `(B_q, S, n)`), k_mask (`(B, m)`): 1 for real rows and columns.
            mode (`str`): `"ot"` or `"attention"`.
            zero_padding (`bool`): give padded query rows an all-zero attention row (as OT gives them). Without it,
                they hold a softmax over the keys that nothing downstream reads (pooling masks them), one full-size
                pass fewer.

        Returns:
            `(assignment, plan, logits)`, each `(B, n, m)` or `(B, S, n, m)`: the row-stochastic map used for G, the
            OT plan (None for attention), and the attention logits Q K^T / sqrt(D) (None for OT unless distillation
            needs them in training; in attention mode, -inf at padded keys).
        """
        sets = q.dim() == 4
        if not sets:
            q, q_mask = q.unsqueeze(1), q_mask.unsqueeze(1)
        (b, m, d), (b_q, s, n) = k.shape, q.shape[:3]
        flat = q.reshape(b_q, s * n, d)  # with B_q = 1, expanded to B only after any per-row work
        k_t = k.transpose(1, 2)
        k_keep = k_mask.bool()
        plan = logits = None
        if mode == "attention":
            # -inf on padded keys gives them exactly zero weight without a full-size mask.
            bias = torch.zeros(b, 1, m, dtype=k.dtype, device=k.device)
            bias = bias.masked_fill_(~k_keep.unsqueeze(1), float("-inf"))
            logits = torch.baddbmm(bias, flat.expand(b, -1, -1), k_t, alpha=1 / math.sqrt(d))
            assignment = torch.softmax(logits, dim=-1)
            if not bool(k_keep.any(-1).all()):
                assignment = torch.nan_to_num(assignment, nan=0.0)  # a key set without keys attends to nothing
            assignment = assignment.view(b, s, n, m)
            logits = logits.view(b, s, n, m)
            if zero_padding:
                assignment = assignment * q_mask.unsqueeze(-1).to(assignment.dtype)
        else:
            if self.training and self.config.distillation != "off":
                logits = torch.bmm(flat.expand(b, -1, -1), k_t).div_(math.sqrt(d)).view(b, s, n, m)
            # (1 - cos) / 2 as one product
            cost = torch.baddbmm(
                k.new_tensor(0.5),
                F.normalize(flat, dim=-1).expand(b, -1, -1),
                F.normalize(k, dim=-1).transpose(1, 2),
                alpha=-0.5,
            ).view(b, s, n, m)
            plan = sinkhorn(
                cost,
                self.config.ot_epsilon,
                self.config.sinkhorn_iterations,
                self.config.sinkhorn_tolerance,
                row_mask=q_mask.expand(b, s, n),
                col_mask=k_mask.unsqueeze(1).expand(b, s, m),
            )
            n_rows = q_mask.to(plan.dtype).sum(-1).clamp_min(1)
            assignment = plan * n_rows[..., None, None]
        if not sets:
            assignment, plan, logits = (x.squeeze(1) if x is not None else None for x in (assignment, plan, logits))
        return assignment, plan, logits


@dataclass
class OTMELTokens(ModelOutput):
    """CLIP outputs of a batch of texts with (optional) pictures, shared by mentions and entities.

    Args:
        text_tokens (`torch.FloatTensor` of shape `(B, L_t, d_t)`): CLIP text last hidden state (T).
        text_mask (`torch.LongTensor` of shape `(B, L_t)`): 1 for real tokens.
        visual_tokens (`torch.FloatTensor` of shape `(B, L_v, d_v)`): CLIP vision last hidden state (V), or the learned
            "no image" token in position 0 when the item has no image.
        visual_mask (`torch.LongTensor` of shape `(B, L_v)`): 1 for real patches (only position 0 without image).
        text_global (`torch.FloatTensor` of shape `(B, P)`): normalised CLIP text feature t.
        visual_global (`torch.FloatTensor` of shape `(B, P)`): normalised CLIP image feature v (or the learned one).
        has_image (`torch.BoolTensor` of shape `(B,)`).
    """

    text_tokens: torch.FloatTensor | None = None
    text_mask: torch.LongTensor | None = None
    visual_tokens: torch.FloatTensor | None = None
    visual_mask: torch.LongTensor | None = None
    text_global: torch.FloatTensor | None = None
    visual_global: torch.FloatTensor | None = None
    has_image: torch.BoolTensor | None = None


def real_text_length(text_mask: torch.Tensor) -> int:
    """Length of the longest real text in a `(..., L_t)` mask: the tokens past it are padding in every row (at least
    1)."""
    real = text_mask.bool().reshape(-1, text_mask.shape[-1]).any(0)
    return int(real.nonzero().max()) + 1 if bool(real.any()) else 1


@dataclass
class OTMELSideFeatures(ModelOutput):
    """What a score needs from one side (mentions or entities), with the row operations a KB index uses.

    Leading shape: `(B,)`, or `(B, k)` for candidates gathered per mention. Subclasses add their side's fields and
    name, in `TEXT_TOKEN_FIELDS`, those with a text-token axis (right after the leading axes).

    Args:
        text_global, visual_global (`(B, P)`): normalised CLIP text and image features t and v.
        fused (`(B, 2D)`): normalised g^t (+) g^v of Eq. 13-18 (None if fusion is off).
        text_mask (`(B, L_t)`), visual_mask (`(B, L_v)`): 1 for real tokens / patches.
        has_image (`torch.BoolTensor` of shape `(B,)`).
        fusion_kd_loss (`torch.FloatTensor` of shape `()`): training with distillation only: L_KD of this side's
            fusion assignments (Eq. 28-29).
        fusion_maps (`dict`): with `output_maps=True`: `{"v2t", "t2v"}` maps of [`~OTMELModel.fusion_maps`].
    """

    text_global: torch.FloatTensor | None = None
    visual_global: torch.FloatTensor | None = None
    fused: torch.FloatTensor | None = None
    text_mask: torch.LongTensor | None = None
    visual_mask: torch.LongTensor | None = None
    has_image: torch.BoolTensor | None = None
    fusion_kd_loss: torch.FloatTensor | None = None
    fusion_maps: dict | None = None

    TEXT_TOKEN_FIELDS = ("text_mask",)
    # Not per-row features: a scalar loss and visualisation maps.
    _NOT_ROWS = ("fusion_kd_loss", "fusion_maps")

    def row_fields(self) -> dict:
        """`{name: tensor}` of the per-row features present (what an index caches and ranking reads)."""
        return {k: v for k, v in self.items() if k not in self._NOT_ROWS and isinstance(v, torch.Tensor)}

    def map_rows(self, fn) -> "OTMELSideFeatures":
        """The same class with `fn(name, tensor)` applied to every per-row feature (losses and maps dropped)."""
        return type(self)(**{k: fn(k, v) for k, v in self.row_fields().items()})

    def rows(self, index) -> "OTMELSideFeatures":
        """Rows `index` (a slice, or a LongTensor of any shape S: features get leading shape S)."""
        return self.map_rows(lambda _, v: v[index])

    def to(self, device) -> "OTMELSideFeatures":
        return self.map_rows(lambda _, v: v.to(device))

    def text_length(self) -> int:
        """Length of the longest real text among the rows (at least 1)."""
        return real_text_length(self.text_mask)

    def with_text_length(self, length: int) -> "OTMELSideFeatures":
        """Text-token fields cut or zero-padded to `length` tokens (padding takes part in no score)."""
        axis = self.text_mask.dim() - 1

        def fit(name, value):
            if name not in self.TEXT_TOKEN_FIELDS:
                return value
            current = value.shape[axis]
            if current >= length:
                return value.narrow(axis, 0, length)
            pad = [0, 0] * (value.dim() - axis - 1) + [0, length - current]
            return F.pad(value, pad)

        return self.map_rows(fit)

    def trimmed(self) -> "OTMELSideFeatures":
        """Text-token fields cut to the longest real text (changes no score, saves work)."""
        return self.with_text_length(self.text_length())

    @classmethod
    def concatenate(cls, parts: list) -> "OTMELSideFeatures":
        """Rows of several feature batches (texts padded to the longest)."""
        if len(parts) == 1:
            return parts[0].map_rows(lambda _, v: v)
        length = max(p.text_mask.shape[-1] for p in parts)
        parts = [p.with_text_length(length).row_fields() for p in parts]
        return cls(**{k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]})


@dataclass
class OTMELMentionFeatures(OTMELSideFeatures):
    """Mention side ([`~OTMELModel.encode_mentions`]): the common fields plus the keys and values that entity tokens
    are assigned in the unimodal matching (Eq. 19-24).

    Args:
        text_keys, text_values (`(B, L_t, D)`), visual_keys, visual_values (`(B, L_v, D)`): W'_k and W'_h projections
            of the mention's tokens (None when unimodal matching is off).
    """

    text_keys: torch.FloatTensor | None = None
    text_values: torch.FloatTensor | None = None
    visual_keys: torch.FloatTensor | None = None
    visual_values: torch.FloatTensor | None = None

    TEXT_TOKEN_FIELDS = ("text_mask", "text_keys", "text_values")


@dataclass
class OTMELEntityFeatures(OTMELSideFeatures):
    """Entity side ([`~OTMELModel.encode_entities`]), independent of any mention, so cacheable for a whole KB.

    Args:
        text_queries (`(B, L_t, D)`), visual_queries (`(B, L_v, D)`): W'_q projections of the entity's tokens.
        text_global_small, visual_global_small (`(B, D)`): normalised t and v brought to size D.
    """

    text_queries: torch.FloatTensor | None = None
    visual_queries: torch.FloatTensor | None = None
    text_global_small: torch.FloatTensor | None = None
    visual_global_small: torch.FloatTensor | None = None

    TEXT_TOKEN_FIELDS = ("text_mask", "text_queries")
    # What the pairwise unimodal matching reads from an entity.
    PAIRWISE_FIELDS = (
        "text_queries",
        "text_mask",
        "visual_queries",
        "visual_mask",
        "text_global_small",
        "visual_global_small",
    )


@dataclass
class OTMELScores(ModelOutput):
    """Scores of every (mention, entity) pair, each `(B_m, B_e)` (cosine scale, before the logit scale).

    Args:
        overall (S_O, Eq. 25): mean of the enabled S_F, S_T, S_V.
        fusion (S_F, Eq. 18), text (S_T, Eq. 24), visual (S_V): None when the term is disabled.
        retrieval (S_R): the mention-independent part (S_F and the global terms of S_T, S_V).
        kd_loss: distillation loss of the unimodal assignments of the pairs (scalar), when computed.
        unimodal_maps: assignment maps when requested (`text`, `visual`: `(B_m, B_e, L_e, L_m)`).
    """

    overall: torch.FloatTensor | None = None
    fusion: torch.FloatTensor | None = None
    text: torch.FloatTensor | None = None
    visual: torch.FloatTensor | None = None
    retrieval: torch.FloatTensor | None = None
    kd_loss: torch.FloatTensor | None = None
    unimodal_maps: dict | None = None


# The loss terms of [`OTMELOutput`], in the order J adds them: what the Trainer logs and the model card names.
LOSS_TERMS = {
    "loss_o": "L_O: InfoNCE on the overall score S_O (Eq. 26)",
    "loss_f": "L_F: InfoNCE on the fusion score S_F",
    "loss_t": "L_T: InfoNCE on the text score S_T",
    "loss_v": "L_V: InfoNCE on the visual score S_V",
    "loss_r": "L_R: InfoNCE on the stage-1 score S_R (not in the paper; weight retrieval_loss_weight)",
    "loss_kd": "L_KD: OT-to-attention distillation (Eq. 28-29; weight kd_weight)",
}


@dataclass
class OTMELOutput(ModelOutput):
    """Output of [`OTMELModel.forward`] on a batch of mentions with their gold entities.

    Args:
        loss (`torch.FloatTensor` of shape `()`): J = L_O + L_F + L_T + L_V (+ w_R L_R) (+ w_KD L_KD). L_F and L_R use
            every in-batch entity; L_O, L_T, L_V every in-batch entity or the hard candidates (`pairwise_negatives`).
        loss_o, loss_f, loss_t, loss_v, loss_r, loss_kd: each component (None when disabled).
        logits (`torch.FloatTensor` of shape `(B, B)` or `(B, 1 + k)`): logit_scale * S_O of each mention against every
            gold entity of the batch (the diagonal holds the positives) or, with `config.pairwise_negatives = k`,
            against its `candidate_indices` (column 0 the positive).
        scores ([`OTMELScores`]): the raw score matrices used for L_O, L_T, L_V (same shape as `logits`).
        candidate_indices (`torch.LongTensor` of shape `(B, 1 + k)`): with `pairwise_negatives`, the batch columns
            scored pairwise for each mention.
        mention_features ([`OTMELMentionFeatures`]), entity_features ([`OTMELEntityFeatures`]): when
            `output_features=True` or `output_maps=True`.
    """

    loss: torch.FloatTensor | None = None
    loss_o: torch.FloatTensor | None = None
    loss_f: torch.FloatTensor | None = None
    loss_t: torch.FloatTensor | None = None
    loss_v: torch.FloatTensor | None = None
    loss_r: torch.FloatTensor | None = None
    loss_kd: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    scores: OTMELScores | None = None
    candidate_indices: torch.LongTensor | None = None
    mention_features: OTMELMentionFeatures | None = None
    entity_features: OTMELEntityFeatures | None = None


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class OTMELPreTrainedModel(PreTrainedModel):
    config: OTMELConfig
    config_class = OTMELConfig
    base_model_prefix = "clip"
    input_modalities = ("image", "text")
    main_input_name = "mention_input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    # Attention runs only inside the CLIP towers, which support every implementation.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OTMELModel):
            init.normal_(module.null_visual_token, std=0.02)
            init.normal_(module.null_visual_global, std=0.02)
            init.constant_(module.logit_scale, math.log(self.config.logit_scale_init))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; a model whose config names the OT-MEL pipeline (`custom_pipelines`, kept
        from the folder it was loaded from) also gets the pipeline's modules beside it, so that the saved folder loads
        with `pipeline(..., trust_remote_code=True)` as the original did: from the pipeline module when it can be
        imported (a checkout, or remote code that loaded it), else copied from the local folder the model was loaded
        from. Where neither has them, the saved config drops the entry (with a warning) instead of naming files the
        folder lacks."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not getattr(self.config, "custom_pipelines", None) or not kwargs.get("is_main_process", True):
            return
        import importlib
        import json
        import os
        import shutil

        try:  # not a static relative import: the model's remote code must not need the pipeline's modules
            module = importlib.import_module(f"{__package__}.pipeline_otmel" if __package__ else "pipeline_otmel")
            module.save_pipeline_files(save_directory)
            return
        except ImportError:
            pass
        source = os.path.join(str(self.name_or_path), "pipeline_otmel.py")
        if os.path.isfile(source):
            from transformers.dynamic_module_utils import get_relative_import_files

            for path in [source, *get_relative_import_files(source)]:
                if not os.path.isfile(os.path.join(save_directory, os.path.basename(path))):
                    shutil.copy(path, save_directory)
            return
        logger.warning(
            "%s: the config names the OT-MEL pipeline, whose modules are not available here (loaded from %s): saved "
            "without it; pipeline_otmel.save_pipeline_files(folder) adds it from an otmel checkout",
            save_directory,
            self.name_or_path,
        )
        config_file = os.path.join(save_directory, "config.json")
        with open(config_file, encoding="utf-8") as f:
            saved = json.load(f)
        saved.pop("custom_pipelines", None)
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")


class OTMELModel(OTMELPreTrainedModel):
    r"""OT-MEL: a CLIP encoder shared by mentions and entities, with OT (or attention) correlation assignment for
    multimodal fusion (S_F) and unimodal matching (S_T, S_V), trained contrastively with in-batch negatives and,
    optionally, OT-to-attention distillation.

    Entity features do not depend on the mention: [`~OTMELModel.encode_entities`] computes them once for a whole KB,
    and [`~OTMELModel.score`] scores a batch of mentions against a batch of cached entities.
    """

    # forward has no **kwargs: the Trainer must not treat the loss as already scaled for accumulation.
    accepts_loss_kwargs = False

    def __init__(self, config: OTMELConfig):
        super().__init__(config)
        self.clip = CLIPModel._from_config(config.clip_config)
        d_t = config.clip_config.text_config.hidden_size
        d_v = config.clip_config.vision_config.hidden_size
        p = config.clip_config.projection_dim
        d = config.hidden_size
        if config.fusion_assignment != "off":
            self.text_from_visual = CorrelationAssignment(d_t, d_v, config)  # G^{v->t}
            self.visual_from_text = CorrelationAssignment(d_v, d_t, config)  # G^{t->v}
            self.text_value = nn.Linear(d_t, d, bias=False)  # T in the set {T, G^{v->t}} at size D
            self.visual_value = nn.Linear(d_v, d, bias=False)
        if config.unimodal_assignment != "off":
            self.text_matching = CorrelationAssignment(d_t, d_t, config)  # queries: entity tokens
            self.visual_matching = CorrelationAssignment(d_v, d_v, config)
            self.text_global_small = nn.Linear(p, d, bias=False)
            self.visual_global_small = nn.Linear(p, d, bias=False)
        # An item without image is represented by one learned visual token and global feature, never by a fake picture.
        self.null_visual_token = nn.Parameter(torch.empty(d_v))
        self.null_visual_global = nn.Parameter(torch.empty(p))
        # Not named `logit_scale`: CLIP has a parameter of that name, and transformers' loader maps checkpoint keys
        # between `clip.<name>` and `<name>` when the model has both, which swapped the two on every reload.
        self.otmel_logit_scale = nn.Parameter(torch.empty(()), requires_grad=config.learnable_logit_scale)
        self.apply_frozen_parameters()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding of CLIP's text tower (mentions and entities share it), `(vocab_size, D_t)`."""
        return self.clip.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.clip.text_model.embeddings.token_embedding = value

    def apply_frozen_parameters(self) -> None:
        """Sets `requires_grad` of the parameters the config keeps fixed: CLIP's own temperature, which takes part in
        no OT-MEL score; the null visual token of a model without token-level matching (the CLIP baseline: only fusion
        and unimodal matching read visual tokens); `otmel_logit_scale` unless `config.learnable_logit_scale`. A
        trainable parameter that misses its gradient makes DDP with find_unused_parameters=False fail.

        Called by `__init__` and again by [`~OTMELModel.from_pretrained`]: transformers 5 re-creates every loaded
        parameter with `requires_grad=True`."""
        token_level = self.config.fusion_assignment != "off" or self.config.unimodal_assignment != "off"
        self.clip.logit_scale.requires_grad_(False)
        self.null_visual_token.requires_grad_(token_level)
        self.otmel_logit_scale.requires_grad_(bool(self.config.learnable_logit_scale))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """[`~transformers.PreTrainedModel.from_pretrained`], with the frozen parameters frozen again
        ([`~OTMELModel.apply_frozen_parameters`])."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).apply_frozen_parameters()
        return loaded

    @property
    def logit_scale(self) -> nn.Parameter:
        """Log of the inverse temperature of the InfoNCE losses (OT-MEL's own, not CLIP's `clip.logit_scale`)."""
        return self.otmel_logit_scale

    @classmethod
    def from_clip(cls, name_or_path: str, **overrides) -> "OTMELModel":
        """A new OT-MEL initialised from any CLIP checkpoint (e.g. `openai/clip-vit-base-patch32` or a local folder).

        `overrides` are OTMELConfig settings (`hidden_size=96`, `distillation="kl"`, ...). The OT-MEL heads are new.
        """
        from transformers import CLIPConfig

        clip_config = CLIPConfig.from_pretrained(name_or_path)
        config = OTMELConfig(clip_config=clip_config, **overrides)
        clip = CLIPModel.from_pretrained(name_or_path)
        model = cls(config)
        missing, unexpected = model.clip.load_state_dict(clip.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"CLIP checkpoint {name_or_path} does not match: missing {missing}, unexpected {unexpected}"
            )
        return model

    # ---- encoders -------------------------------------------------------------------------------------------

    def assignment_mode(self, configured: str) -> str:
        """The assignment a layer configured with `configured` runs now: `"ot"` becomes `"attention"` in eval mode
        when `config.inference_assignment="attention"` (the fast path of a distilled model)."""
        if configured == "ot" and not self.training and self.config.inference_assignment == "attention":
            return "attention"
        return configured

    def encode_tokens(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        has_image: torch.BoolTensor | None = None,
    ) -> OTMELTokens:
        """Runs the CLIP towers on texts and (optional) pictures: the input of both sides' features.

        Args:
            input_ids (`(B, L_t)`), attention_mask (`(B, L_t)`): tokenised `surface [SEP] sentence` or
                `name [SEP] attributes`.
            pixel_values (`(B, 3, H, W)`, *optional*): images (rows without image are ignored).
            has_image (`(B,)`, *optional*): which rows have an image (default: all when `pixel_values` is given).
        """
        clip = self.clip
        batch = input_ids.shape[0]
        text = clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        text_tokens = text.last_hidden_state
        text_global = F.normalize(clip.text_projection(text.pooler_output), dim=-1)

        if has_image is None:
            has_image = torch.full((batch,), pixel_values is not None, dtype=torch.bool, device=input_ids.device)
        # Without pixels no row has an image, whatever the flags say.
        has_image = has_image.bool() & (pixel_values is not None)
        d_v = self.null_visual_token.shape[0]
        n_patches = (clip.config.vision_config.image_size // clip.config.vision_config.patch_size) ** 2 + 1
        visual_tokens = self.null_visual_token.to(text_tokens.dtype).expand(batch, n_patches, d_v).clone()
        visual_mask = torch.zeros(batch, n_patches, dtype=attention_mask.dtype, device=attention_mask.device)
        visual_mask[:, 0] = 1
        visual_global = self.null_visual_global.to(text_tokens.dtype).expand(batch, -1).clone()
        if pixel_values is not None and bool(has_image.any()):
            # Only real pictures go through the vision tower.
            idx = has_image.nonzero(as_tuple=True)[0]
            vision = clip.vision_model(pixel_values=pixel_values[idx].to(text_tokens.dtype))
            visual_tokens = visual_tokens.index_copy(0, idx, vision.last_hidden_state)
            visual_mask = visual_mask.index_fill(0, idx, 1)
            visual_global = visual_global.index_copy(0, idx, clip.visual_projection(vision.pooler_output))
        elif self.training and torch.is_grad_enabled():
            # A training batch without any picture: one blank picture through the vision tower, weighted 0, so that its
            # parameters get (zero) gradients, as DDP with find_unused_parameters=False requires of every parameter.
            size = clip.config.vision_config.image_size
            vision = clip.vision_model(pixel_values=text_tokens.new_zeros(1, 3, size, size))
            visual_global = visual_global + 0.0 * clip.visual_projection(vision.pooler_output).sum()
        return OTMELTokens(
            text_tokens=text_tokens,
            text_mask=attention_mask,
            visual_tokens=visual_tokens,
            visual_mask=visual_mask,
            text_global=text_global,
            visual_global=F.normalize(visual_global, dim=-1),
            has_image=has_image,
        )

    def _side_common(self, tokens: OTMELTokens, output_maps: bool) -> dict:
        """The fields both sides share: global features, masks, and the fusion vector with its KD loss / maps."""
        common = {
            "text_global": tokens.text_global,
            "visual_global": tokens.visual_global,
            "text_mask": tokens.text_mask,
            "visual_mask": tokens.visual_mask,
            "has_image": tokens.has_image,
        }
        if self.config.fusion_assignment != "off":
            maps = self.fusion_maps(tokens)
            common["fused"] = F.normalize(torch.cat([maps["v2t"]["pooled"], maps["t2v"]["pooled"]], dim=-1), dim=-1)
            if self.training and self.config.distillation != "off":
                kd = [self._fusion_kd(maps[name], tokens, name) for name in ("v2t", "t2v")]
                kd = [x for x in kd if x is not None]
                common["fusion_kd_loss"] = torch.stack(kd).sum() if kd else None
            if output_maps:
                common["fusion_maps"] = maps
        return common

    def encode_entities(
        self, input_ids, attention_mask, pixel_values=None, has_image=None, output_maps: bool = False
    ) -> OTMELEntityFeatures:
        """Entity-side features, independent of any mention (cacheable for a whole KB).

        Args: as [`~OTMELModel.encode_tokens`] (`name [SEP] attributes` texts); `output_maps`: keep the fusion maps.
        """
        tokens = self.encode_tokens(input_ids, attention_mask, pixel_values, has_image)
        feats = OTMELEntityFeatures(**self._side_common(tokens, output_maps))
        if self.config.unimodal_assignment != "off":
            feats.text_queries = self.text_matching.query(tokens.text_tokens)
            feats.visual_queries = self.visual_matching.query(tokens.visual_tokens)
            feats.text_global_small = F.normalize(self.text_global_small(tokens.text_global), dim=-1)
            feats.visual_global_small = F.normalize(self.visual_global_small(tokens.visual_global), dim=-1)
        return feats

    def encode_mentions(
        self, input_ids, attention_mask, pixel_values=None, has_image=None, output_maps: bool = False
    ) -> OTMELMentionFeatures:
        """Mention-side features.

        Args: as [`~OTMELModel.encode_tokens`] (`surface [SEP] sentence` texts); `output_maps`: keep the fusion maps.
        """
        tokens = self.encode_tokens(input_ids, attention_mask, pixel_values, has_image)
        feats = OTMELMentionFeatures(**self._side_common(tokens, output_maps))
        if self.config.unimodal_assignment != "off":
            feats.text_keys = self.text_matching.key(tokens.text_tokens)
            feats.text_values = self.text_matching.value(tokens.text_tokens)
            feats.visual_keys = self.visual_matching.key(tokens.visual_tokens)
            feats.visual_values = self.visual_matching.value(tokens.visual_tokens)
        return feats

    def fusion_maps(self, tokens: OTMELTokens, mode: str | None = None) -> dict:
        """Multimodal fusion (Eq. 6-18) of one side, direction by direction.

        Args:
            tokens ([`OTMELTokens`]): from [`~OTMELModel.encode_tokens`].
            mode (`str`, *optional*): `"ot"` or `"attention"`; default: the configured fusion assignment as it runs now
                ([`~OTMELModel.assignment_mode`]).

        Returns:
            `{"v2t": maps, "t2v": maps}`; v2t assigns visual tokens to text tokens (rows: text tokens), t2v the reverse.
            Each holds `assignment` (`(B, L_own, L_other)`, rows sum to 1 on real rows), `plan` (the OT plan, None for
            attention), `logits` (attention logits; for OT only when distillation needs them) and `pooled` (`(B, D)`:
            g^t for v2t, g^v for t2v, before normalisation).
        """
        mode = mode or self.assignment_mode(self.config.fusion_assignment)
        maps = {}
        for name, layer, own, own_mask, other, other_mask, own_value in (
            (
                "v2t",
                self.text_from_visual,
                tokens.text_tokens,
                tokens.text_mask,
                tokens.visual_tokens,
                tokens.visual_mask,
                self.text_value,
            ),
            (
                "t2v",
                self.visual_from_text,
                tokens.visual_tokens,
                tokens.visual_mask,
                tokens.text_tokens,
                tokens.text_mask,
                self.visual_value,
            ),
        ):
            q, k = layer.query(own), layer.key(other)
            assignment, plan, logits = layer.assign(q, k, own_mask, other_mask, mode)
            g = assignment @ layer.value(other)  # (B, L_own, D)
            members = torch.cat([own_value(own), g], dim=1)
            members_mask = torch.cat([own_mask, own_mask], dim=1)
            pooled = pool_set(members, members_mask, self.config.pooling)
            maps[name] = {"assignment": assignment, "plan": plan, "logits": logits, "pooled": pooled}
        return maps

    def _fusion_kd(self, maps: dict, tokens: OTMELTokens, direction: str):
        """L_KD of one fusion direction (mean over the batch), or None when it ran no OT."""
        if maps["plan"] is None or maps["logits"] is None:
            return None
        own, other = (
            (tokens.text_mask, tokens.visual_mask) if direction == "v2t" else (tokens.visual_mask, tokens.text_mask)
        )
        pair_mask = own.unsqueeze(-1).bool() & other.unsqueeze(-2).bool()
        return kd_divergence(maps["plan"], maps["logits"], pair_mask, self.config.distillation).mean()

    # ---- scoring --------------------------------------------------------------------------------------------

    def _unimodal(self, layer, queries, q_mask, keys, values, k_mask, global_small, mode, want_kd, want_maps):
        """Pairwise unimodal matching (Eq. 19-24): entity tokens are assigned mention tokens, pair by pair.

        Args:
            queries (`(1 or B_m, n, L_e, D)`), q_mask (`(1 or B_m, n, L_e)`), global_small (`(1 or B_m, n, D)`): the n
                entities scored against every mention (leading 1), or each mention's own n candidates (leading B_m).
            keys, values (`(B_m, L_m, D)`), k_mask (`(B_m, L_m)`): the mentions.

        Returns:
            scores `(B_m, n)` (cosine of the pooled assignment with the entity's global feature), KD loss or None, maps.
        """
        b_m, n, l_e = keys.shape[0], queries.shape[1], queries.shape[2]
        q_mask_pairs = q_mask.expand(b_m, n, -1)
        assignment, plan, logits = layer.assign(queries, keys, q_mask, k_mask, mode, zero_padding=want_maps)
        # One (n L_e x L_m) @ (L_m x D) product per mention rather than n small ones.
        flat = assignment.reshape(b_m, n * l_e, -1)
        if self.config.pooling == "softpool":
            bias = _softpool_bias(q_mask.bool(), flat.dtype).reshape(-1, n * l_e, 1)
            g = torch.baddbmm(bias, flat, values).view(b_m, n, l_e, -1)  # (B_m, n, L_e, D)
            pooled = softpool_biased(g)
        else:
            g = (flat @ values).view(b_m, n, l_e, -1)
            pooled = pool_set(g, q_mask_pairs, self.config.pooling)
        pooled = F.normalize(pooled, dim=-1)
        score = (pooled * global_small).sum(-1)
        kd = None
        if want_kd and plan is not None and logits is not None:
            pair_mask = q_mask_pairs.unsqueeze(-1).bool() & k_mask[:, None, None, :].bool()
            kd = kd_divergence(plan, logits, pair_mask, self.config.distillation).mean()
        maps = {"assignment": assignment, "plan": plan} if want_maps else None
        return score, kd, maps

    def stage1_weights(self) -> dict:
        """`{field: weight}` such that S_R(m, e) = sum_f weight_f <m.f, e.f>, over the fields each side's stage-1 vector
        concatenates, in that order ([`~OTMELModel.mention_stage1`], [`~OTMELModel.entity_stage1`]).

        S_R is the mean of S_F (when fusion is on) and the global terms of S_T and S_V (Eq. 24: halved when S_T and
        S_V also have their pairwise term): the part of S_O that needs no pairwise matching.
        """
        cfg = self.config
        n_terms = 3 if cfg.fusion_assignment != "off" else 2
        global_weight = (0.5 if cfg.unimodal_assignment != "off" else 1.0) / n_terms
        weights = {"fused": 1.0 / n_terms} if cfg.fusion_assignment != "off" else {}
        weights.update(text_global=global_weight, visual_global=global_weight)
        return weights

    def entity_index_fields(self) -> tuple:
        """Entity fields that a KB index stores besides the stage-1 ones: what stage 2 reads (the pairwise matching's
        inputs, when unimodal matching is on) and `has_image`."""
        pairwise = OTMELEntityFeatures.PAIRWISE_FIELDS if self.config.unimodal_assignment != "off" else ()
        return (*pairwise, "has_image")

    def mention_stage1(self, mentions: OTMELSideFeatures) -> torch.Tensor:
        """`(..., R)` stage-1 mention vectors: S_R = mention_stage1(m) @ entity_stage1(e).T (one matrix product for a
        whole KB)."""
        return torch.cat([getattr(mentions, f) * w for f, w in self.stage1_weights().items()], dim=-1)

    def entity_stage1(self, entities: OTMELSideFeatures) -> torch.Tensor:
        """`(..., R)` stage-1 entity vectors (the unit-norm fields of `stage1_weights`, concatenated)."""
        return torch.cat([getattr(entities, f) for f in self.stage1_weights()], dim=-1)

    def score(
        self,
        mentions: OTMELMentionFeatures,
        entities: OTMELEntityFeatures,
        pairwise: bool = True,
        assignment: str | None = None,
        output_maps: bool = False,
        candidate_rows: torch.LongTensor | None = None,
    ) -> OTMELScores:
        """Scores every mention against every entity, or against its own candidate entities.

        Args:
            mentions ([`OTMELMentionFeatures`]): from [`~OTMELModel.encode_mentions`], B_m rows.
            entities ([`OTMELEntityFeatures`]): from [`~OTMELModel.encode_entities`] (possibly cached), B_e rows.
            pairwise (`bool`): compute the pairwise unimodal matching; False gives only S_F and S_R (stage-1 retrieval).
            assignment (`str`, *optional*): `"ot"` or `"attention"` for this call's unimodal OT assignment
                (default: the config's, i.e. `inference_assignment` in eval mode).
            output_maps (`bool`): return the unimodal assignment maps.
            candidate_rows (`torch.LongTensor` of shape `(B_m, k)`, *optional*): rows of `entities` to score for each
                mention; the pairwise matching then runs for these B_m * k pairs only.

        Returns:
            [`OTMELScores`] with `(B_m, B_e)` matrices, or `(B_m, k)` with `candidate_rows`.
        """
        if candidate_rows is not None:
            return self.score_candidates(mentions, entities.rows(candidate_rows), pairwise, assignment, output_maps)
        return self._score(mentions, entities, False, pairwise, assignment, output_maps)

    def score_candidates(
        self,
        mentions: OTMELMentionFeatures,
        entities: OTMELEntityFeatures,
        pairwise: bool = True,
        assignment: str | None = None,
        output_maps: bool = False,
    ) -> OTMELScores:
        """Scores each mention against its own k candidate entities, whose features have leading shape `(B_m, k)` (e.g.
        gathered from a KB index): the same values as [`~OTMELModel.score`] for those pairs, `(B_m, k)` matrices."""
        return self._score(mentions, entities, True, pairwise, assignment, output_maps)

    def _score(self, mentions, entities, aligned, pairwise, assignment, output_maps) -> OTMELScores:
        cfg = self.config
        if assignment not in (None, "ot", "attention"):
            raise ValueError(f"assignment must be 'ot', 'attention' or None, got {assignment!r}")
        out = OTMELScores()

        def similarity(a, b):
            return (a.unsqueeze(1) * b).sum(-1) if aligned else a @ b.T

        def entity_side(tensor):
            return tensor if aligned else tensor.unsqueeze(0)

        out.retrieval = similarity(self.mention_stage1(mentions), self.entity_stage1(entities))
        text_global = similarity(mentions.text_global, entities.text_global)
        visual_global = similarity(mentions.visual_global, entities.visual_global)
        if cfg.fusion_assignment != "off":
            out.fusion = similarity(mentions.fused, entities.fused)
        if cfg.unimodal_assignment == "off":
            out.text, out.visual = text_global, visual_global
            out.overall = out.retrieval
            return out
        if not pairwise:
            return out
        mode = cfg.unimodal_assignment
        if mode == "ot":
            mode = assignment or self.assignment_mode(mode)
        want_kd = self.training and cfg.distillation != "off"
        s_t, kd_t, maps_t = self._unimodal(
            self.text_matching,
            entity_side(entities.text_queries),
            entity_side(entities.text_mask),
            mentions.text_keys,
            mentions.text_values,
            mentions.text_mask,
            entity_side(entities.text_global_small),
            mode,
            want_kd,
            output_maps,
        )
        s_v, kd_v, maps_v = self._unimodal(
            self.visual_matching,
            entity_side(entities.visual_queries),
            entity_side(entities.visual_mask),
            mentions.visual_keys,
            mentions.visual_values,
            mentions.visual_mask,
            entity_side(entities.visual_global_small),
            mode,
            want_kd,
            output_maps,
        )
        out.text = (s_t + text_global) / 2
        out.visual = (s_v + visual_global) / 2
        out.overall = self._combine(out.fusion, out.text, out.visual)
        if want_kd and kd_t is not None:
            out.kd_loss = kd_t + kd_v
        if output_maps:
            out.unimodal_maps = {"text": maps_t, "visual": maps_v}
        return out

    @staticmethod
    def _combine(*terms):
        terms = [t for t in terms if t is not None]
        return sum(terms) / len(terms)

    # ---- training -------------------------------------------------------------------------------------------

    def contrastive_loss(
        self, scores: torch.Tensor, entity_ids: torch.LongTensor | None = None, offset: int = 0
    ) -> torch.Tensor:
        """InfoNCE of mentions against the batch's gold entities (Eq. 26).

        Args:
            scores (`(B_m, B_e)`): row i's positive is column `offset + i` (B_e > B_m when entities were gathered
                from other processes).
            entity_ids (`(B_e,)`, *optional*): KB index of each column's entity; columns holding row i's gold entity
                elsewhere in the batch (duplicates) are masked out of its negatives.
        """
        logits = self.logit_scale.exp().clamp(max=100) * scores
        target = torch.arange(scores.shape[0], device=scores.device) + offset
        if entity_ids is not None:
            same = entity_ids[target].unsqueeze(1) == entity_ids.unsqueeze(0)
            same[torch.arange(scores.shape[0], device=scores.device), target] = False
            logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, target)

    @staticmethod
    @torch.no_grad()
    def _hard_candidates(retrieval, entity_ids, offset, k):
        """`(B_m, 1 + k)`: each mention's positive column, then the k other in-batch entities with the highest S_R
        (duplicates of the gold entity excluded)."""
        positive = torch.arange(retrieval.shape[0], device=retrieval.device) + offset
        blocked = torch.zeros_like(retrieval, dtype=torch.bool)
        if entity_ids is not None:
            blocked = entity_ids[positive].unsqueeze(1) == entity_ids.unsqueeze(0)
        blocked[torch.arange(retrieval.shape[0], device=retrieval.device), positive] = True
        hard = retrieval.masked_fill(blocked, float("-inf")).topk(k, dim=1).indices
        return torch.cat([positive.unsqueeze(1), hard], dim=1)

    @staticmethod
    def _gather(features: OTMELEntityFeatures, entity_ids: torch.LongTensor | None):
        """All-gathers entity features across processes, keeping gradients (in-batch negatives from every process).

        Returns the gathered features and ids, and the offset of this process's entities among them.
        """
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_gather

        gathered = features.map_rows(lambda _, value: torch.cat(all_gather(value), dim=0))
        if entity_ids is not None:
            entity_ids = torch.cat(all_gather(entity_ids), dim=0)
        return gathered, entity_ids, dist.get_rank() * features.text_mask.shape[0]

    def forward(
        self,
        mention_input_ids: torch.LongTensor,
        mention_attention_mask: torch.LongTensor,
        entity_input_ids: torch.LongTensor,
        entity_attention_mask: torch.LongTensor,
        mention_pixel_values: torch.FloatTensor | None = None,
        mention_has_image: torch.BoolTensor | None = None,
        entity_pixel_values: torch.FloatTensor | None = None,
        entity_has_image: torch.BoolTensor | None = None,
        entity_ids: torch.LongTensor | None = None,
        return_loss: bool = True,
        output_features: bool = False,
        output_maps: bool = False,
        gather_across_processes: bool = False,
        return_dict: bool | None = None,
    ) -> OTMELOutput | tuple:
        r"""Scores a batch of B mentions against their B gold entities (in-batch negatives) and computes the loss.

        Args:
            mention_input_ids, mention_attention_mask (`(B, L_m)`): tokenised mentions.
            entity_input_ids, entity_attention_mask (`(B, L_e)`): tokenised gold entities (row i is mention i's).
            mention_pixel_values / entity_pixel_values (`(B, 3, H, W)`, *optional*) with `*_has_image` (`(B,)`).
            entity_ids (`(B,)`, *optional*): KB index of each gold entity, to mask duplicates from the negatives.
            return_loss (`bool`): compute the loss.
            output_features, output_maps: return the side features / assignment maps.
            gather_across_processes (`bool`): under torch.distributed, score each mention against the gold entities of
                every process (texts must be padded to the same length on every process).
            return_dict (`bool`, *optional*): return an [`OTMELOutput`] (default: `config.return_dict`) or a tuple
                of its non-None fields.
        """
        cfg = self.config
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        m = self.encode_mentions(
            mention_input_ids, mention_attention_mask, mention_pixel_values, mention_has_image, output_maps=output_maps
        )
        e = self.encode_entities(
            entity_input_ids, entity_attention_mask, entity_pixel_values, entity_has_image, output_maps=output_maps
        )
        e_all, ids_all, offset = e, entity_ids, 0
        if gather_across_processes and torch.distributed.is_available() and torch.distributed.is_initialized():
            e_all, ids_all, offset = self._gather(e, entity_ids)
        n_entities = e_all.text_mask.shape[0]
        k = cfg.pairwise_negatives
        subset = cfg.unimodal_assignment != "off" and 0 < k < n_entities - 1
        full = self.score(m, e_all, pairwise=not subset, output_maps=output_maps)
        scores, candidate_rows = full, None
        if subset:
            candidate_rows = self._hard_candidates(full.retrieval, ids_all, offset, k)
            scores = self.score(m, e_all, candidate_rows=candidate_rows, output_maps=output_maps)
        scale = self.logit_scale.exp().clamp(max=100)
        out = OTMELOutput(logits=scale * scores.overall, scores=scores, candidate_indices=candidate_rows)
        if return_loss:

            def pairwise_loss(matrix):
                if subset:  # column 0 is the positive; duplicates of it were never candidates
                    return F.cross_entropy(scale * matrix, torch.zeros_like(candidate_rows[:, 0]))
                return self.contrastive_loss(matrix, ids_all, offset)

            out.loss_o = pairwise_loss(scores.overall)
            total = out.loss_o
            if full.fusion is not None:
                out.loss_f = self.contrastive_loss(full.fusion, ids_all, offset)
                total = total + out.loss_f
            out.loss_t = pairwise_loss(scores.text)
            out.loss_v = pairwise_loss(scores.visual)
            total = total + out.loss_t + out.loss_v
            if cfg.retrieval_loss_weight > 0 and cfg.unimodal_assignment != "off":
                out.loss_r = self.contrastive_loss(full.retrieval, ids_all, offset)
                total = total + cfg.retrieval_loss_weight * out.loss_r
            if self.training and cfg.distillation != "off":
                kd_terms = [x for x in (scores.kd_loss, m.fusion_kd_loss, e.fusion_kd_loss) if x is not None]
                if kd_terms:
                    out.loss_kd = sum(kd_terms)
                    total = total + cfg.kd_weight * out.loss_kd
            out.loss = total
        if output_features or output_maps:
            out.mention_features, out.entity_features = m, e
        # The fields in their declared order, whatever order they were filled in: the loss first, where transformers'
        # outputs have it (`outputs[0]`, the tuple of `return_dict=False`, which the Trainer takes the loss from).
        out = OTMELOutput(**{name: getattr(out, name) for name in OTMELOutput.__dataclass_fields__})
        return out if return_dict else out.to_tuple()


OTMELModel.register_for_auto_class("AutoModel")


def _register_in_library():
    from transformers import AutoConfig, AutoModel

    AutoConfig.register("otmel", OTMELConfig, exist_ok=True)
    AutoModel.register(OTMELConfig, OTMELModel, exist_ok=True)


_register_in_library()

__all__ = [
    "LOSS_TERMS",
    "CorrelationAssignment",
    "OTMELEntityFeatures",
    "OTMELMentionFeatures",
    "OTMELModel",
    "OTMELOutput",
    "OTMELPreTrainedModel",
    "OTMELScores",
    "OTMELSideFeatures",
    "OTMELTokens",
    "kd_divergence",
    "pool_set",
    "real_text_length",
]
