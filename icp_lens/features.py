"""Features: the units of a transformer that icp_lens scores, intervenes on and prunes.

A *feature* is one unit at one TransformerLens hook point:

==========  ================================  =======================  ====================
kind        hook point                        activation shape         the feature is
==========  ================================  =======================  ====================
``neuron``  ``blocks.L.mlp.hook_post``        ``[batch, pos, d_mlp]``  one neuron (scalar)
``head``    ``blocks.L.attn.hook_z``          ``[batch, pos, h, d]``   one head's output z
``resid``   ``blocks.L.hook_resid_pre``       ``[batch, pos, d_model]``one residual dim
``value``   ``blocks.L.attn.hook_v``          ``[batch, pos, h_kv, d]``one head's value v
``query``   ``blocks.L.attn.hook_q``          ``[batch, pos, h, d]``   one head's query q
``key``     ``blocks.L.attn.hook_k``          ``[batch, pos, h_kv, d]``one head's key k
==========  ================================  =======================  ====================

Two more unit kinds exist for vision-language models (image probes): ``vision_neuron``, a
neuron of the vision tower's MLP at ``vision_encoder.encoder_layers.L.mlp.hook_post`` of a
LLaVA-style ``TransformerBridge`` (``[batch, patches, d_mlp]``), and ``vision_head``, one
head's output at ``vision_encoder.encoder_layers.L.attn.hook_z`` (``[batch, patches, h,
d]``), scored by :mod:`icp_lens.scoring.image_scores` and pruned by
:mod:`icp_lens.pruning.multimodal`; and ``image_direction``, ``Feature("image_direction", 0,
k)``, the ``k``-th direction of the image tokens at the projector's output
(``vision_projector.hook_out``) fitted by :mod:`icp_lens.directions.image`; and
``projector_neuron``, ``Feature("projector_neuron", 0, j)``, hidden neuron ``j`` of the
projector (``act(linear_1(x))``, the input of ``linear_2``; ``[batch, image tokens, d]``) at
``vision_projector.hook_hidden``, a hook point the bridge lacks and :mod:`icp_lens.hooks`
makes.

In every case the feature is a slice along dimension 2 of the activation: a scalar per
position for neurons and residual dimensions, a ``d_head`` vector per position for heads,
value, query and key vectors. ``Feature.select`` takes that slice, so interventions are
written once for all kinds. For grouped-query attention models the ``value`` and ``key``
indices run over the key/value heads (``n_key_value_heads``), the ``head`` and ``query``
indices over the query heads.

Query and key features move only *where* a head attends (its attention pattern). On both
``TransformerBridge`` and ``HookedTransformer`` ``hook_q``/``hook_k`` sit before the rotary
embedding (Llama, NeoX: ``hook_rot_q``/``hook_rot_k`` come after), so an intervention on
them is rotated like the clean vector. They are scored (exact patching, attribution and
its QK fix, ``icp_lens.scoring``) but not pruned (``icp_lens.pruning.arch``).

Features are frozen, hashable and ordered, so they can key dictionaries, live in sets and
be sorted into a stable (kind, layer, index) order. ``str(feature)`` is a compact label
(``"neuron L1.37"``) that ``Feature.parse`` reads back, which is how score tables and
prune plans store them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterable

    from icp_lens.model import HookedModel

__all__ = [
    "FeatureKind",
    "FEATURE_KINDS",
    "ALL_KINDS",
    "DIRECTION_SITES",
    "Feature",
    "parse_site",
    "hook_name_for",
    "feature_count",
    "enumerate_features",
    "validate_feature",
    "validate_features",
]

FeatureKind = Literal[
    "neuron", "head", "resid", "value", "query", "key", "direction", "token", "vision_neuron", "vision_head",
    "image_direction", "projector_neuron",
]
#: the kinds that are a slice of a hook's activation (enumerable per layer)
FEATURE_KINDS: tuple[str, ...] = ("neuron", "head", "resid", "value", "query", "key")
#: every kind a score table or plan may hold: the unit kinds, fitted directions
#: (``icp_lens.directions``), token-embedding rows (``icp_lens.scoring.tokens``) and the
#: MLP neurons and heads of a vision-language model's vision tower (``icp_lens.scoring.image_scores``)
ALL_KINDS: tuple[str, ...] = get_args(FeatureKind)
#: where a direction feature lives: the residual stream (edited at every writer), one
#: module's output, or one attention head's output ``z.H``
DIRECTION_SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "z.H")

_HOOK_TEMPLATES: dict[str, str] = {
    "neuron": "blocks.{layer}.mlp.hook_post",
    "head": "blocks.{layer}.attn.hook_z",
    "resid": "blocks.{layer}.hook_resid_pre",
    "value": "blocks.{layer}.attn.hook_v",
    "query": "blocks.{layer}.attn.hook_q",
    "key": "blocks.{layer}.attn.hook_k",
    # a LLaVA-style model's vision tower on TransformerBridge (image probes only)
    "vision_neuron": "vision_encoder.encoder_layers.{layer}.mlp.hook_post",
    "vision_head": "vision_encoder.encoder_layers.{layer}.attn.hook_z",
    # a fitted direction of the image tokens the projector writes (icp_lens.directions.image), layer 0
    "image_direction": "vision_projector.hook_out",
    # a hidden neuron of the projector (input of its linear_2; icp_lens.hooks makes this hook point), layer 0
    "projector_neuron": "vision_projector.hook_hidden",
}
_LABEL = re.compile(r"^\s*(?P<kind>[a-z_]+)\s+L(?P<layer>\d+)\.(?P<index>\d+)(@(?P<site>[a-z_]+(\.\d+)?))?\s*$")
_TOKEN_LABEL = re.compile(r"^\s*token\s+(?P<index>\d+)\s*$")
_SITE_HOOKS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "z": "blocks.{layer}.attn.hook_z",
}


def _check_kind(kind: str, kinds: tuple[str, ...] = ALL_KINDS) -> None:
    if kind not in kinds:
        close = difflib.get_close_matches(str(kind), kinds, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown feature kind {kind!r}; valid kinds: {list(kinds)}.{hint}")


def parse_site(site: str) -> tuple[str, int | None]:
    """``"resid_pre"`` -> ``("resid_pre", None)``; ``"z.3"`` (head 3's output) -> ``("z", 3)``."""
    name, _, head = str(site).partition(".")
    if name == "z" and head.isdigit():
        return "z", int(head)
    if name in _SITE_HOOKS and name != "z" and not head:
        return name, None
    raise ValueError(f"Unknown direction site {site!r}; valid sites: {list(DIRECTION_SITES)} (z.H: head H's output)")


def hook_name_for(kind: FeatureKind, layer: int, site: str = "") -> str:
    """The TransformerLens hook name that carries features of ``kind`` in ``layer``.

    Direction features name their ``site`` (see :data:`DIRECTION_SITES`); token
    features live at ``hook_embed``.
    """
    _check_kind(kind)
    if kind == "direction":
        return _SITE_HOOKS[parse_site(site)[0]].format(layer=layer)
    if kind == "token":
        return "hook_embed"
    return _HOOK_TEMPLATES[kind].format(layer=layer)


@dataclass(frozen=True, order=True)
class Feature:
    """One unit at one hook point: ``Feature("neuron", layer=1, index=37)``.

    Two kinds are not slices of an activation: ``Feature("direction", L, k, site="resid_pre")``
    is the ``k``-th fitted direction at that site of layer ``L`` (its vectors live in a
    ``DirectionSet``, see ``icp_lens.directions``), and ``Feature("token", 0, t)`` is the
    input-embedding row of token id ``t``.
    """

    kind: FeatureKind
    layer: int
    index: int
    site: str = ""

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        for name in ("layer", "index"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Feature {name} must be a non-negative int, got {value!r}")
        if self.kind == "direction":
            parse_site(self.site)
        elif self.site:
            raise ValueError(f"Only direction features have a site; got {self.kind} with site {self.site!r}")

    @property
    def hook_name(self) -> str:
        """The hook point whose activation holds this feature."""
        return hook_name_for(self.kind, self.layer, self.site)

    def select(self, activation: Float[Tensor, "batch pos n ..."]) -> Float[Tensor, "batch pos ..."]:
        """This feature's slice of its hook's activation (a view, dimension 2 removed)."""
        if self.kind not in (*FEATURE_KINDS, "vision_neuron", "vision_head", "projector_neuron"):
            raise TypeError(f"{self} is not a slice of an activation; see icp_lens.directions / scoring.tokens")
        return activation.select(2, self.index)

    def __str__(self) -> str:
        if self.kind == "token":
            return f"token {self.index}"
        if self.kind == "direction":
            return f"direction L{self.layer}.{self.index}@{self.site}"
        return f"{self.kind} L{self.layer}.{self.index}"

    @classmethod
    def parse(cls, label: str) -> Feature:
        """Read back ``str(feature)``, e.g. ``Feature.parse("head L0.3")``, ``"direction L3.0@resid_pre"``."""
        token = _TOKEN_LABEL.match(label)
        if token is not None:
            return cls("token", 0, int(token["index"]))
        match = _LABEL.match(label)
        if match is None:
            raise ValueError(
                f"Cannot parse feature label {label!r}; expected '<kind> L<layer>.<index>' "
                f"with kind in {list(FEATURE_KINDS)}, e.g. 'neuron L1.37', 'direction L3.0@resid_pre' or 'token 1207'."
            )
        return cls(match["kind"], int(match["layer"]), int(match["index"]), match["site"] or "")  # type: ignore[arg-type]


def feature_count(model: HookedModel, kind: FeatureKind) -> int:
    """How many features of ``kind`` one layer of ``model`` has."""
    from icp_lens.model import model_dims

    _check_kind(kind, FEATURE_KINDS)
    dims = model_dims(model)
    return {
        "neuron": dims.d_mlp,
        "head": dims.n_heads,
        "resid": dims.d_model,
        "value": dims.n_kv_heads,
        "query": dims.n_heads,
        "key": dims.n_kv_heads,
    }[kind]


def validate_feature(model: HookedModel, feature: Feature) -> None:
    """Raise ``IndexError`` naming the valid range if ``feature`` does not exist in ``model``."""
    from icp_lens.model import model_dims

    n_layers = model_dims(model).n_layers
    if feature.layer >= n_layers:
        raise IndexError(f"{feature}: layer {feature.layer} out of range; valid layers 0..{n_layers - 1}")
    count = feature_count(model, feature.kind)
    if feature.index >= count:
        raise IndexError(f"{feature}: index {feature.index} out of range; valid {feature.kind} indices 0..{count - 1}")


def validate_features(model: HookedModel, features: Iterable[Feature]) -> None:
    """:func:`validate_feature` for many features, reading the model's sizes once."""
    from icp_lens.model import model_dims

    features = list(features)
    n_layers = model_dims(model).n_layers
    counts = {kind: feature_count(model, kind) for kind in {f.kind for f in features}}
    for f in features:
        if f.layer >= n_layers or f.index >= counts[f.kind]:
            validate_feature(model, f)  # raises with the valid ranges


def enumerate_features(
    model: HookedModel,
    kind: FeatureKind,
    *,
    layers: int | list[int] | range | None = None,
) -> list[Feature]:
    """All features of ``kind`` in ``model``, optionally restricted to some layers, in order."""
    from icp_lens.model import model_dims

    n_layers = model_dims(model).n_layers
    if layers is None:
        layer_list = list(range(n_layers))
    elif isinstance(layers, int):
        layer_list = [layers]
    else:
        layer_list = list(layers)
    for layer in layer_list:
        if not 0 <= layer < n_layers:
            raise IndexError(f"layer {layer} out of range; valid layers 0..{n_layers - 1}")
    count = feature_count(model, kind)
    return [Feature(kind, layer, i) for layer in layer_list for i in range(count)]
