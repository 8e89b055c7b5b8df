"""Running a ``TransformerBridge`` from block ``L`` onward, and only as far as a metric reads.

``HookedTransformer`` has ``start_at_layer``. A ``TransformerBridge`` delegates its forward
pass to the Hugging Face model, whose decoder loop runs every layer: TransformerLens 3.x's
bridge refuses ``start_at_layer``, and 4.x's accepts it but still runs blocks ``0..L-1``
inside the Hugging Face forward and then discards their output, which costs as much as
not skipping at all. ``BridgeBlocks.from_layer`` skips them for real:

* the Hugging Face model's decoder-layer list (``model.layers``, ``transformer.h`` ...,
  whose items *are* the bridge's ``blocks``) is replaced for the duration of the pass by
  a list of blocks ``L..`` only, so the model's own forward still prepares what the layers
  need (position ids, causal mask, rotary embeddings, key/value cache) and applies the
  final norm and the unembedding;
* a forward pre-hook on block ``L`` replaces its input hidden states with the given
  residual stream (what block ``L`` received in the clean run, possibly edited), so its
  ``hook_resid_pre`` and everything after it fire as in a full pass;
* optionally, block ``L``'s attention sublayer returns its clean output instead of
  computing it again: when the edits of block ``L`` are all MLP neurons, nothing before
  the MLP changes.

The token embedding still runs (a table lookup, discarded). This relies on the decoder
loop not reading a layer's position in the list. Loops that do read it pick a per-layer
attention mask from ``config.layer_types[i]`` (sliding-window layers): skipping ``L``
blocks shifts that index by ``L``, so ``supports(L)`` refuses any ``L`` where the
shifted types differ. ``icp_lens.scoring.exact`` also checks, the first time a layer is
skipped, that a pass with no edits reproduces the clean logits, and otherwise runs
every block (likewise for the reused attention output).

``ColumnUnembed`` computes the last position's logits of a few vocabulary entries (the
answer and alternatives that ``logit_diff`` reads) instead of the whole vocabulary: the
pass stops at the input of the unembedding ``Linear`` and multiplies by those rows of its
weight. On a small model with a large vocabulary (SmolLM2-135M: 49152 x 576) the full
unembedding costs as much as several blocks. Anything the model applies to its logits
after that ``Linear`` (a soft cap, a scale) is skipped, so ``exact`` checks the result
against the clean logits before using it. The column set is padded to a multiple of
:data:`COLUMN_MULTIPLE`: matrix-multiply kernels pick their reduction order by the
output width, and below about 16 columns (on CPU) the few logits would differ from the
full unembedding's by float round-off.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from icp_lens.hooks import module_hooks
from icp_lens.model import HookedModel, is_bridge

#: column sets for ``ColumnUnembed`` are padded to a multiple of this
COLUMN_MULTIPLE = 64

__all__ = ["BridgeBlocks", "ColumnUnembed", "hf_cache_prefix", "padded_columns", "tiled_hf_cache"]


class BridgeBlocks:
    """The Hugging Face decoder-layer list behind a bridge's ``blocks``, and how to skip its head."""

    def __init__(self, model: HookedModel, owner: torch.nn.Module, attr: str, layer_types: list[Any] | None) -> None:
        self.model = model
        self.owner = owner  # the module holding the list (e.g. LlamaModel)
        self.attr = attr  # its attribute name (e.g. "layers")
        self.blocks = list(model.blocks)
        self.layer_types = layer_types
        self._sliced: dict[int, torch.nn.ModuleList] = {}
        self._attn_arity: int | None = None  # the attention module's output: a tuple of this length (0: a tensor)

    @classmethod
    def find(cls, model: HookedModel) -> BridgeBlocks | None:
        """The bridge's layer list, or None where blocks cannot be skipped this way."""
        if not is_bridge(model):
            return None
        try:
            blocks = list(model.blocks)
            root = model.original_model
            cfg = model.cfg
            if not blocks or getattr(root.config, "is_encoder_decoder", False):
                return None
            if any(getattr(cfg, flag, False) for flag in ("is_multimodal", "is_audio_model", "is_visual_model")):
                return None
            name = getattr(blocks[0], "name", None)
            if not isinstance(name, str) or not name.endswith(".0"):
                return None
            list_path = name[: -len(".0")]
            owner_path, _, attr = list_path.rpartition(".")
            owner = root.get_submodule(owner_path) if owner_path else root
            layers = owner._modules.get(attr)
        except (AttributeError, TypeError):
            return None
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) != len(blocks):
            return None
        if any(a is not b for a, b in zip(layers, blocks, strict=True)):
            return None
        layer_types = getattr(getattr(owner, "config", None), "layer_types", None)
        return cls(model, owner, attr, list(layer_types) if layer_types is not None else None)

    def supports(self, layer: int) -> bool:
        """Whether blocks ``layer..`` can run alone (each then sees the mask its own type needs)."""
        if not 0 <= layer < len(self.blocks):
            return False
        types = self.layer_types
        return types is None or len(types) != len(self.blocks) or types[layer:] == types[: len(types) - layer]

    def attention(self, layer: int) -> torch.nn.Module | None:
        """Block ``layer``'s attention module (what its Hugging Face layer calls), or None."""
        attn = getattr(self.blocks[layer], "attn", None)
        hf_layer = getattr(self.blocks[layer], "original_component", None)
        if not isinstance(attn, torch.nn.Module) or hf_layer is None:
            return None
        return attn if any(child is attn for child in hf_layer.children()) else None

    @contextmanager
    def attention_outputs(self, layers: list[int]) -> Iterator[dict[int, Tensor]]:
        """Record the attention sublayer's output ``[batch, pos, d_model]`` of ``layers`` during the block."""
        store: dict[int, Tensor] = {}

        def make(layer: int) -> Callable[..., None]:
            def record(module: Any, args: Any, output: Any) -> None:
                first = output[0] if isinstance(output, tuple) and output else output
                if isinstance(first, Tensor) and first.dim() == 3:
                    store[layer] = first.detach()
                    self._attn_arity = len(output) if isinstance(output, tuple) else 0

            return record

        attns = [(layer, self.attention(layer)) for layer in layers]
        with module_hooks(post=[(attn, make(layer)) for layer, attn in attns if attn is not None]):
            yield store

    @contextmanager
    def from_layer(self, layer: int, resid: Tensor, attn_out: Tensor | None = None) -> Iterator[None]:
        """Inside the block, a forward pass runs blocks ``layer..`` only, block ``layer`` on ``resid``.

        ``resid`` ``[batch, pos, d_model]`` must have the shape of the hidden states the
        model's forward hands block ``layer`` (the input tokens' batch and positions).
        ``attn_out`` (same shape): block ``layer``'s attention sublayer returns it instead of
        computing it (its output is known when nothing before it changes, e.g. for edits of
        that block's MLP neurons; the attention's hooks and its key/value cache entry then
        do not run).
        """
        if layer not in self._sliced:
            self._sliced[layer] = torch.nn.ModuleList(self.blocks[layer:])
        full = self.owner._modules[self.attr]

        def inject(
            module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args and isinstance(args[0], Tensor):
                hidden, args = args[0], (resid, *args[1:])
            elif isinstance(kwargs.get("hidden_states"), Tensor):
                hidden, kwargs = kwargs["hidden_states"], {**kwargs, "hidden_states": resid}
            else:
                raise RuntimeError(f"block {layer} was called without hidden states to replace")
            if hidden.shape != resid.shape:
                raise RuntimeError(f"block {layer} got hidden states {tuple(hidden.shape)}, resid {tuple(resid.shape)}")
            return args, kwargs

        attn = None
        if attn_out is not None:
            attn, arity = self.attention(layer), self._attn_arity
            if attn is None or arity is None or attn_out.shape != resid.shape:
                raise RuntimeError(f"block {layer}'s attention output cannot be replaced")

            def known(*args: Any, **kwargs: Any) -> Any:
                return (attn_out, *([None] * (arity - 1))) if arity else attn_out

        with module_hooks(pre_kwargs=[(self.blocks[layer], inject)]):
            try:
                self.owner._modules[self.attr] = self._sliced[layer]
                if attn is not None:  # in the instance's own __dict__ (a bridge component would pass a plain
                    object.__setattr__(attn, "forward", known)  # setattr on to the module it wraps)
                yield
            finally:
                try:
                    if attn is not None and "forward" in vars(attn):
                        object.__delattr__(attn, "forward")
                finally:
                    self.owner._modules[self.attr] = full


def tiled_hf_cache(prefix: Any, k: int, batch: int, first_layer: int = 0, *, device: torch.device | str = "cpu") -> Any:
    """A Hugging Face key/value cache holding ``prefix`` ``k`` times along the batch (rows ``j*batch + i``).

    Only layers ``first_layer..`` are tiled (earlier ones are skipped by the pass and
    keep ``prefix``'s tensors, unchanged: an update would rebind the copy's attributes).
    The copy is fresh: the forward pass appends to it without touching ``prefix``.
    ``device``: where the cache's tensors are (the row index is made there).
    """
    index = torch.arange(batch, device=device).repeat(k)
    layers = getattr(prefix, "layers", None)
    if isinstance(layers, list) and all(hasattr(layer, "reorder_cache") for layer in layers):
        cache = copy.copy(prefix)
        cache.layers = [copy.copy(layer) for layer in layers]
        for layer in cache.layers[first_layer:]:
            layer.reorder_cache(index)
        return cache
    cache = copy.deepcopy(prefix)  # pragma: no cover - a cache class without per-layer storage
    cache.reorder_cache(index)
    return cache


def hf_cache_prefix(cache: Any, length: int, seq_len: int) -> Any:
    """The keys/values of positions ``< length`` in a Hugging Face cache of a ``seq_len``-token run.

    ``None`` where the cache does not hold every position as a ``[batch, heads, pos, d]``
    tensor per layer (a sliding-window layer, another cache class): the caller then runs the
    prefix on its own. The tensors are views of ``cache``'s; layer objects are copies.
    """
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not layers:
        return None
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if getattr(layer, "is_sliding", False) or not isinstance(keys, Tensor) or not isinstance(values, Tensor):
            return None
        if keys.dim() != 4 or keys.shape[2] != seq_len or values.shape[2] != seq_len:
            return None
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in layers]
    for layer in out.layers:
        layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
    return out


class _Unembedding(Exception):  # noqa: N818 - control flow, never seen by a user
    """Raised at the unembedding's input to end a forward pass there."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__("stopped at the unembedding")
        self.hidden = hidden


class ColumnUnembed:
    """Last-position logits of chosen vocabulary entries, without the full unembedding."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.linear = linear

    @classmethod
    def find(cls, model: HookedModel) -> ColumnUnembed | None:
        """The bridge's unembedding as a plain ``torch.nn.Linear``, or None."""
        if not is_bridge(model):
            return None
        try:
            head = model.original_model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        linear = getattr(head, "original_component", head)
        return cls(linear) if type(linear) is torch.nn.Linear else None

    def run(self, forward: Callable[[], Any], columns: Tensor) -> Tensor:
        """``[batch, len(columns)]``: the logits ``forward()`` would give at the last position, for ``columns``."""

        def stop(module: Any, args: tuple[Any, ...]) -> None:
            raise _Unembedding(args[0])

        with module_hooks(pre=[(self.linear, stop)]):
            try:
                forward()
            except _Unembedding as reached:
                hidden = reached.hidden
            else:
                raise RuntimeError("the forward pass did not reach the unembedding")
        bias = self.linear.bias
        return torch.nn.functional.linear(
            hidden[:, -1], self.linear.weight[columns], None if bias is None else bias[columns]
        )


def padded_columns(needed: Tensor, vocab: int, multiple: int | None = None) -> Tensor:
    """The distinct token ids in ``needed`` (negative: none), sorted, padded with other low ids to a multiple.

    ``multiple``: :data:`COLUMN_MULTIPLE` unless given (the whole vocabulary at most).
    """
    multiple = multiple or COLUMN_MULTIPLE
    ids = needed[needed >= 0].unique().cpu()
    n = min(vocab, -(-max(len(ids), 1) // multiple) * multiple)
    free = torch.ones(vocab, dtype=torch.bool, device="cpu")  # next to ids; the result moves
    free[ids] = False
    extra = free.nonzero().flatten()[: n - len(ids)]
    return torch.cat([ids, extra]).sort().values.to(needed.device)
