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
from transformers.utils import ModelOutput


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .configuration_otmel import OTMELConfig
except ImportError:
    from configuration_otmel import OTMELConfig


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn
# ----------------------------------------------------------------------------------------------------------------

# Above this ratio of cost range to epsilon, exp(-C / eps) can underflow in float32, so the solver works on log
# potentials; below it the kernel form is exact and far cheaper (matrix-vector products instead of logsumexp).
_KERNEL_DOMAIN_MAX_RATIO = 50.0


def _marginal_error(plan_rows: torch.Tensor, a: torch.Tensor) -> float:
    # L2 norm of the row-marginal violation of each problem, worst problem of the batch.
    return (plan_rows - a).norm(dim=-1).max().item()


def sinkhorn(
    cost: torch.Tensor,
    epsilon: float,
    max_iter: int,
    tol: float = 1e-6,
    row_mask: torch.Tensor | None = None,
    col_mask: torch.Tensor | None = None,
    check_every: int = 5,
) -> torch.Tensor:
    r"""Entropic optimal transport between uniform marginals, batched over any leading dimensions.

    Solves min_P <C, P> - epsilon * H(P) subject to P 1 = mu, P^T 1 = nu, with mu uniform over the unmasked rows and
    nu uniform over the unmasked columns (masked rows and columns receive exactly zero mass). Iterations are unrolled,
    so the plan is differentiable with respect to `cost`. The updates are those of the log-domain Sinkhorn (POT's
    `sinkhorn_log`); when `(max C - min C) / epsilon` is small enough for `exp(-C / epsilon)` to be safe in float32,
    the same updates run in the kernel form, which gives the same plan at a fraction of the cost. Half-precision
    inputs are solved in float32 and the plan is returned in the input dtype.

    Args:
        cost (`torch.Tensor` of shape `(..., n, m)`): transport costs.
        epsilon (`float`): entropic regularisation (> 0).
        max_iter (`int`): maximum number of iterations (each updates both potentials).
        tol (`float`): stop once the L2 norm of the row-marginal error is below `tol` for every problem; checked every
            `check_every` iterations. 0 runs exactly `max_iter` iterations.
        row_mask (`torch.Tensor` of shape `(..., n)`, *optional*): 1 for real rows, 0 for padding.
        col_mask (`torch.Tensor` of shape `(..., m)`, *optional*): 1 for real columns, 0 for padding.

    Returns:
        `torch.Tensor` of shape `(..., n, m)`: the transport plan; its entries sum to 1 over each problem.
    """
    out_dtype = cost.dtype
    work_dtype = cost.dtype if cost.dtype in (torch.float32, torch.float64) else torch.float32
    cost = cost.to(work_dtype)
    n, m = cost.shape[-2:]
    batch_shape = cost.shape[:-2]
    if row_mask is None:
        row_mask = cost.new_ones(*batch_shape, n)
    if col_mask is None:
        col_mask = cost.new_ones(*batch_shape, m)
    row_mask = row_mask.to(work_dtype).expand(*batch_shape, n)
    col_mask = col_mask.to(work_dtype).expand(*batch_shape, m)
    a = row_mask / row_mask.sum(-1, keepdim=True).clamp_min(1)
    b = col_mask / col_mask.sum(-1, keepdim=True).clamp_min(1)
    valid = (row_mask.unsqueeze(-1) * col_mask.unsqueeze(-2)) > 0

    with torch.no_grad():
        finite_cost = cost.masked_fill(~valid, 0.0)
        spread = (finite_cost.amax() - finite_cost.amin()).item() if cost.numel() else 0.0
    if spread / epsilon <= _KERNEL_DOMAIN_MAX_RATIO:
        plan = _sinkhorn_kernel(cost, epsilon, max_iter, tol, a, b, valid, check_every)
    else:
        plan = _sinkhorn_log(cost, epsilon, max_iter, tol, a, b, valid, check_every)
    return plan.to(out_dtype)


def _sinkhorn_kernel(cost, epsilon, max_iter, tol, a, b, valid, check_every):
    # Subtracting the smallest valid cost of each problem changes no plan but keeps the kernel's largest entry at 1.
    shift = cost.masked_fill(~valid, float("inf")).amin(dim=(-2, -1), keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    kernel = torch.exp(-(cost - shift.detach()) / epsilon) * valid
    tiny = torch.finfo(cost.dtype).tiny
    v = b
    for it in range(max_iter):
        u = a / (kernel @ v.unsqueeze(-1)).squeeze(-1).clamp_min(tiny)
        v = b / (u.unsqueeze(-2) @ kernel).squeeze(-2).clamp_min(tiny)
        if tol > 0 and (it + 1) % check_every == 0 and it + 1 < max_iter:
            with torch.no_grad():
                rows = u * (kernel @ v.unsqueeze(-1)).squeeze(-1)
                if _marginal_error(rows, a) < tol:
                    break
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)


def _sinkhorn_log(cost, epsilon, max_iter, tol, a, b, valid, check_every):
    # A finite stand-in for -inf: exp() still gives exactly 0, and logsumexp of a fully masked row keeps a finite
    # gradient (an all -inf slice back-propagates NaN).
    log_kernel = (-cost / epsilon).masked_fill(~valid, torch.finfo(cost.dtype).min / 4)
    # log(0) for padding gives -inf potentials; they are replaced by 0 so that no NaN reaches the gradient.
    log_a = torch.where(a > 0, a.clamp_min(1e-38).log(), torch.zeros_like(a))
    log_b = torch.where(b > 0, b.clamp_min(1e-38).log(), torch.zeros_like(b))
    row_has = valid.any(-1)
    col_has = valid.any(-2)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)

    def lse(x, dim, has):
        out = torch.logsumexp(x, dim=dim)
        return torch.where(has, out, torch.zeros_like(out))

    for it in range(max_iter):
        f = torch.where(row_has, log_a - lse(log_kernel + g.unsqueeze(-2), -1, row_has), f)
        g = torch.where(col_has, log_b - lse(log_kernel + f.unsqueeze(-1), -2, col_has), g)
        if tol > 0 and (it + 1) % check_every == 0 and it + 1 < max_iter:
            with torch.no_grad():
                rows = torch.exp(lse(log_kernel + g.unsqueeze(-2), -1, row_has) + f) * row_has
                if _marginal_error(rows, a) < tol:
                    break
    return torch.exp(log_kernel + f.unsqueeze(-1) + g.unsqueeze(-2))


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def pool_set(members: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pools a set of vectors element-wise (Eq. 13-14).

    Args:
        members (`torch.Tensor` of shape `(..., N, D)`): the set.
        mask (`torch.Tensor` of shape `(..., N)`): 1 for members, 0 for padding (padding takes no part).
        pooling (`str`): `"softpool"` (sum_i w_i * g_i with w = softmax over the set, per dimension), `"mean"` or
            `"max"`.

    Returns:
        `torch.Tensor` of shape `(..., D)`.
    """
    keep = mask.unsqueeze(-1).bool()
    if pooling == "mean":
        m = keep.to(members.dtype)
        return (members * m).sum(-2) / m.sum(-2).clamp_min(1)
    filled = members.masked_fill(~keep, float("-inf"))
    if pooling == "max":
        return filled.amax(-2)
    weights = torch.softmax(filled, dim=-2)
    return (weights * members.masked_fill(~keep, 0.0)).sum(-2)


def cosine_cost(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """C_ij = (1 - cos(q_i, k_j)) / 2, in [0, 1] (Eq. 9). Shapes `(..., n, D)`, `(..., m, D)` -> `(..., n, m)`."""
    return (1 - F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(-1, -2)) / 2


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
    for dim in ((-1, -2) if mode != "row_kl" else (-1,)):
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

    def assign(self, q, k, q_mask, k_mask, mode):
        """Assignment between projected queries `(..., n, D)` and keys `(..., m, D)`.

        Returns `(assignment, plan, logits)`, each `(..., n, m)`: the row-stochastic map used for G, the OT plan (or
        None for attention), and the attention logits (or None when not needed for OT without distillation).
        """
        pair_mask = q_mask.unsqueeze(-1).bool() & k_mask.unsqueeze(-2).bool()
        need_logits = mode == "attention" or (self.training and self.config.distillation != "off")
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) if need_logits else None
        if mode == "attention":
            return masked_softmax(logits, pair_mask, -1), None, logits
        plan = sinkhorn(
            cosine_cost(q, k),
            self.config.ot_epsilon,
            self.config.sinkhorn_iterations,
            self.config.sinkhorn_tolerance,
            row_mask=q_mask,
            col_mask=k_mask,
        )
        n_rows = q_mask.to(plan.dtype).sum(-1).clamp_min(1)
        return plan * n_rows[..., None, None], plan, logits


@dataclass
class OTMELFeatures(ModelOutput):
    """Side features of mentions or entities: everything a score needs that depends on one side only.

    Args:
        text_tokens (`torch.FloatTensor` of shape `(B, L_t, d_t)`): CLIP text last hidden state (T).
        text_mask (`torch.LongTensor` of shape `(B, L_t)`): 1 for real tokens.
        visual_tokens (`torch.FloatTensor` of shape `(B, L_v, d_v)`): CLIP vision last hidden state (V), or the learned
            "no image" token in position 0 when the item has no image.
        visual_mask (`torch.LongTensor` of shape `(B, L_v)`): 1 for real patches (only position 0 without image).
        text_global (`torch.FloatTensor` of shape `(B, P)`): normalised CLIP text feature t.
        visual_global (`torch.FloatTensor` of shape `(B, P)`): normalised CLIP image feature v (or the learned one).
        fused (`torch.FloatTensor` of shape `(B, 2D)`): normalised g^t (+) g^v of Eq. 13-18 (None if fusion is off).
        text_queries / visual_queries (`(B, L, D)`): entity side of the unimodal matching (W'_q projections).
        text_keys / text_values / visual_keys / visual_values (`(B, L, D)`): mention side of the unimodal matching.
        text_global_small / visual_global_small (`(B, D)`): normalised t and v brought to size D (entity side).
        has_image (`torch.BoolTensor` of shape `(B,)`).
    """

    text_tokens: torch.FloatTensor | None = None
    text_mask: torch.LongTensor | None = None
    visual_tokens: torch.FloatTensor | None = None
    visual_mask: torch.LongTensor | None = None
    text_global: torch.FloatTensor | None = None
    visual_global: torch.FloatTensor | None = None
    fused: torch.FloatTensor | None = None
    text_queries: torch.FloatTensor | None = None
    visual_queries: torch.FloatTensor | None = None
    text_keys: torch.FloatTensor | None = None
    text_values: torch.FloatTensor | None = None
    visual_keys: torch.FloatTensor | None = None
    visual_values: torch.FloatTensor | None = None
    text_global_small: torch.FloatTensor | None = None
    visual_global_small: torch.FloatTensor | None = None
    has_image: torch.BoolTensor | None = None
    fusion_maps: dict | None = None


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


@dataclass
class OTMELOutput(ModelOutput):
    """Output of [`OTMELModel.forward`] on a batch of mentions with their gold entities.

    Args:
        loss (`torch.FloatTensor` of shape `()`): J = L_O + L_F + L_T + L_V (+ w_R L_R) (+ w_KD L_KD).
        loss_o, loss_f, loss_t, loss_v, loss_r, loss_kd: each component (None when disabled).
        logits (`torch.FloatTensor` of shape `(B, B)`): logit_scale * S_O; row i is mention i against every gold
            entity of the batch (the diagonal holds the positives).
        scores ([`OTMELScores`]): the raw score matrices.
        mention_features, entity_features ([`OTMELFeatures`]): when `output_features=True`.
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
    mention_features: OTMELFeatures | None = None
    entity_features: OTMELFeatures | None = None


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class OTMELPreTrainedModel(PreTrainedModel):
    config: OTMELConfig
    config_class = OTMELConfig
    base_model_prefix = "clip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OTMELModel):
            init.normal_(module.null_visual_token, std=0.02)
            init.normal_(module.null_visual_global, std=0.02)
            init.constant_(module.logit_scale, math.log(self.config.logit_scale_init))


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
        self.logit_scale = nn.Parameter(torch.empty(()), requires_grad=config.learnable_logit_scale)
        self.post_init()

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
            raise ValueError(f"CLIP checkpoint {name_or_path} does not match: missing {missing}, unexpected {unexpected}")
        return model

    # ---- encoders -------------------------------------------------------------------------------------------

    def _assignment_mode(self, configured: str) -> str:
        if configured == "ot" and not self.training and self.config.inference_assignment == "attention":
            return "attention"
        return configured

    def encode(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        has_image: torch.BoolTensor | None = None,
        side: str = "entity",
        output_maps: bool = False,
    ) -> OTMELFeatures:
        """Encodes mentions (`side="mention"`) or entities (`side="entity"`).

        Args:
            input_ids (`(B, L_t)`), attention_mask (`(B, L_t)`): tokenised `surface [SEP] sentence` or
                `name [SEP] attributes`.
            pixel_values (`(B, 3, H, W)`, *optional*): images (rows without image are ignored).
            has_image (`(B,)`, *optional*): which rows have an image (default: all when `pixel_values` is given).
            output_maps: also return the fusion assignment maps (for pictures and tests).
        """
        if side not in ("mention", "entity"):
            raise ValueError(f"side must be 'mention' or 'entity', got {side!r}")
        clip = self.clip
        batch = input_ids.shape[0]
        text = clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        text_tokens = text.last_hidden_state
        text_global = F.normalize(clip.text_projection(text.pooler_output), dim=-1)
        text_mask = attention_mask

        if has_image is None:
            has_image = torch.full((batch,), pixel_values is not None, dtype=torch.bool, device=input_ids.device)
        has_image = has_image.bool()
        d_v = self.null_visual_token.shape[0]
        n_patches = (clip.config.vision_config.image_size // clip.config.vision_config.patch_size) ** 2 + 1
        visual_tokens = self.null_visual_token.to(text_tokens.dtype).expand(batch, n_patches, d_v).clone()
        visual_mask = torch.zeros(batch, n_patches, dtype=text_mask.dtype, device=text_mask.device)
        visual_mask[:, 0] = 1
        visual_global = self.null_visual_global.to(text_tokens.dtype).expand(batch, -1).clone()
        if pixel_values is not None and bool(has_image.any()):
            # Only real pictures go through the vision tower.
            idx = has_image.nonzero(as_tuple=True)[0]
            vision = clip.vision_model(pixel_values=pixel_values[idx].to(text_tokens.dtype))
            visual_tokens = visual_tokens.index_copy(0, idx, vision.last_hidden_state)
            visual_mask = visual_mask.index_fill(0, idx, 1)
            visual_global = visual_global.index_copy(0, idx, clip.visual_projection(vision.pooler_output))
        visual_global = F.normalize(visual_global, dim=-1)

        feats = OTMELFeatures(
            text_tokens=text_tokens,
            text_mask=text_mask,
            visual_tokens=visual_tokens,
            visual_mask=visual_mask,
            text_global=text_global,
            visual_global=visual_global,
            has_image=has_image,
        )
        if self.config.fusion_assignment != "off":
            feats.fused, maps = self._fuse(text_tokens, text_mask, visual_tokens, visual_mask)
            if output_maps:
                feats.fusion_maps = maps
        if self.config.unimodal_assignment != "off":
            if side == "entity":
                feats.text_queries = self.text_matching.query(text_tokens)
                feats.visual_queries = self.visual_matching.query(visual_tokens)
                feats.text_global_small = F.normalize(self.text_global_small(text_global), dim=-1)
                feats.visual_global_small = F.normalize(self.visual_global_small(visual_global), dim=-1)
            else:
                feats.text_keys = self.text_matching.key(text_tokens)
                feats.text_values = self.text_matching.value(text_tokens)
                feats.visual_keys = self.visual_matching.key(visual_tokens)
                feats.visual_values = self.visual_matching.value(visual_tokens)
        return feats

    def encode_entities(self, input_ids, attention_mask, pixel_values=None, has_image=None, output_maps=False):
        """Entity-side features (cacheable for a whole KB). See [`~OTMELModel.encode`]."""
        return self.encode(input_ids, attention_mask, pixel_values, has_image, side="entity", output_maps=output_maps)

    def encode_mentions(self, input_ids, attention_mask, pixel_values=None, has_image=None, output_maps=False):
        """Mention-side features. See [`~OTMELModel.encode`]."""
        return self.encode(input_ids, attention_mask, pixel_values, has_image, side="mention", output_maps=output_maps)

    def _fuse(self, text_tokens, text_mask, visual_tokens, visual_mask):
        """Multimodal fusion (Eq. 6-18) of one side: returns normalised g^t (+) g^v `(B, 2D)`, the maps, and KD."""
        mode = self._assignment_mode(self.config.fusion_assignment)
        pooling = self.config.pooling
        maps = {}
        kd = []
        for name, layer, own, own_mask, other, other_mask, own_value in (
            ("v2t", self.text_from_visual, text_tokens, text_mask, visual_tokens, visual_mask, self.text_value),
            ("t2v", self.visual_from_text, visual_tokens, visual_mask, text_tokens, text_mask, self.visual_value),
        ):
            q, k = layer.query(own), layer.key(other)
            assignment, plan, logits = layer.assign(q, k, own_mask, other_mask, mode)
            g = assignment @ layer.value(other)  # (B, L_own, D)
            members = torch.cat([own_value(own), g], dim=1)
            members_mask = torch.cat([own_mask, own_mask], dim=1)
            maps[name] = {"assignment": assignment, "plan": plan, "logits": logits}
            if plan is not None and logits is not None:
                pair_mask = own_mask.unsqueeze(-1).bool() & other_mask.unsqueeze(-2).bool()
                kd.append(kd_divergence(plan, logits, pair_mask, self.config.distillation).mean())
            maps[name]["pooled"] = pool_set(members, members_mask, pooling)
        fused = F.normalize(torch.cat([maps["v2t"]["pooled"], maps["t2v"]["pooled"]], dim=-1), dim=-1)
        maps["kd"] = torch.stack(kd).sum() if kd else None
        return fused, maps

    # ---- scoring --------------------------------------------------------------------------------------------

    def _unimodal(self, layer, queries, q_mask, keys, values, k_mask, global_small, mode, want_kd, want_maps):
        """Pairwise unimodal matching (Eq. 19-24) of every mention with every entity.

        queries `(B_e, L_e, D)` (entity), keys / values `(B_m, L_m, D)` (mention) -> scores `(B_m, B_e)`.
        """
        q = queries.unsqueeze(0)  # (1, B_e, L_e, D)
        k = keys.unsqueeze(1)  # (B_m, 1, L_m, D)
        q_mask_pairs = q_mask.unsqueeze(0).expand(keys.shape[0], -1, -1)
        k_mask_pairs = k_mask.unsqueeze(1).expand(-1, queries.shape[0], -1)
        assignment, plan, logits = layer.assign(q, k, q_mask_pairs, k_mask_pairs, mode)
        g = assignment @ values.unsqueeze(1)  # (B_m, B_e, L_e, D)
        pooled = F.normalize(pool_set(g, q_mask_pairs, self.config.pooling), dim=-1)
        score = (pooled * global_small.unsqueeze(0)).sum(-1)
        kd = None
        if want_kd and plan is not None and logits is not None:
            pair_mask = q_mask_pairs.unsqueeze(-1).bool() & k_mask_pairs.unsqueeze(-2).bool()
            kd = kd_divergence(plan, logits, pair_mask, self.config.distillation).mean()
        maps = {"assignment": assignment, "plan": plan} if want_maps else None
        return score, kd, maps

    def score(
        self,
        mentions: OTMELFeatures,
        entities: OTMELFeatures,
        pairwise: bool = True,
        assignment: str | None = None,
        output_maps: bool = False,
    ) -> OTMELScores:
        """Scores every mention against every entity.

        Args:
            mentions ([`OTMELFeatures`]): from [`~OTMELModel.encode_mentions`], B_m rows.
            entities ([`OTMELFeatures`]): from [`~OTMELModel.encode_entities`] (possibly cached), B_e rows.
            pairwise (`bool`): compute the pairwise unimodal matching; False gives only S_R (stage-1 retrieval).
            assignment (`str`, *optional*): `"ot"` or `"attention"` for this call's unimodal OT assignment
                (default: the config's, i.e. `inference_assignment` in eval mode).
            output_maps (`bool`): return the unimodal assignment maps.

        Returns:
            [`OTMELScores`] with `(B_m, B_e)` matrices.
        """
        cfg = self.config
        out = OTMELScores()
        text_global = mentions.text_global @ entities.text_global.T
        visual_global = mentions.visual_global @ entities.visual_global.T
        if cfg.fusion_assignment != "off":
            out.fusion = mentions.fused @ entities.fused.T
        if cfg.unimodal_assignment == "off":
            out.text, out.visual = text_global, visual_global
            out.retrieval = self._combine(out.fusion, text_global, visual_global)
            out.overall = out.retrieval
            return out
        out.retrieval = self._combine(out.fusion, text_global / 2, visual_global / 2)
        if not pairwise:
            return out
        mode = cfg.unimodal_assignment
        if mode == "ot":
            mode = assignment or self._assignment_mode(mode)
        want_kd = self.training and cfg.distillation != "off"
        s_t, kd_t, maps_t = self._unimodal(
            self.text_matching, entities.text_queries, entities.text_mask, mentions.text_keys, mentions.text_values,
            mentions.text_mask, entities.text_global_small, mode, want_kd, output_maps,
        )  # fmt: skip
        s_v, kd_v, maps_v = self._unimodal(
            self.visual_matching, entities.visual_queries, entities.visual_mask, mentions.visual_keys,
            mentions.visual_values, mentions.visual_mask, entities.visual_global_small, mode, want_kd, output_maps,
        )  # fmt: skip
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

    def contrastive_loss(self, scores: torch.Tensor, entity_ids: torch.LongTensor | None = None) -> torch.Tensor:
        """InfoNCE of mentions against the batch's gold entities (Eq. 26); row i's positive is column i.

        Columns holding the same gold entity as row i (duplicates in the batch) are masked out of its negatives.
        """
        logits = self.logit_scale.exp().clamp(max=100) * scores
        if entity_ids is not None:
            same = entity_ids.unsqueeze(1) == entity_ids.unsqueeze(0)
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
        target = torch.arange(scores.shape[0], device=scores.device)
        return F.cross_entropy(logits, target)

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
    ) -> OTMELOutput:
        r"""Scores a batch of B mentions against their B gold entities (in-batch negatives) and computes the loss.

        Args:
            mention_input_ids, mention_attention_mask (`(B, L_m)`): tokenised mentions.
            entity_input_ids, entity_attention_mask (`(B, L_e)`): tokenised gold entities (row i is mention i's).
            mention_pixel_values / entity_pixel_values (`(B, 3, H, W)`, *optional*) with `*_has_image` (`(B,)`).
            entity_ids (`(B,)`, *optional*): KB index of each gold entity, to mask duplicates from the negatives.
            return_loss (`bool`): compute the loss.
            output_features, output_maps: return the side features / assignment maps.
        """
        cfg = self.config
        m = self.encode_mentions(
            mention_input_ids, mention_attention_mask, mention_pixel_values, mention_has_image, output_maps=True
        )
        e = self.encode_entities(
            entity_input_ids, entity_attention_mask, entity_pixel_values, entity_has_image, output_maps=True
        )
        scores = self.score(m, e, output_maps=output_maps)
        out = OTMELOutput(logits=self.logit_scale.exp().clamp(max=100) * scores.overall, scores=scores)
        if return_loss:
            out.loss_o = self.contrastive_loss(scores.overall, entity_ids)
            total = out.loss_o
            if scores.fusion is not None:
                out.loss_f = self.contrastive_loss(scores.fusion, entity_ids)
                total = total + out.loss_f
            out.loss_t = self.contrastive_loss(scores.text, entity_ids)
            out.loss_v = self.contrastive_loss(scores.visual, entity_ids)
            total = total + out.loss_t + out.loss_v
            if cfg.retrieval_loss_weight > 0 and cfg.unimodal_assignment != "off":
                out.loss_r = self.contrastive_loss(scores.retrieval, entity_ids)
                total = total + cfg.retrieval_loss_weight * out.loss_r
            if self.training and cfg.distillation != "off":
                kd_terms = [x for x in (scores.kd_loss, (m.fusion_maps or {}).get("kd"), (e.fusion_maps or {}).get("kd"))]
                kd_terms = [x for x in kd_terms if x is not None]
                if kd_terms:
                    out.loss_kd = sum(kd_terms)
                    total = total + cfg.kd_weight * out.loss_kd
            out.loss = total
        if not output_maps:
            m.fusion_maps = e.fusion_maps = None
        if output_features or output_maps:
            out.mention_features, out.entity_features = m, e
        return out


OTMELModel.register_for_auto_class("AutoModel")


def _register_in_library():
    from transformers import AutoConfig, AutoModel

    AutoConfig.register("otmel", OTMELConfig, exist_ok=True)
    AutoModel.register(OTMELConfig, OTMELModel, exist_ok=True)


_register_in_library()

__all__ = ["OTMELModel", "OTMELPreTrainedModel", "OTMELOutput", "OTMELScores", "OTMELFeatures", "sinkhorn"]
