"""Token-embedding features: one feature per vocabulary token, its input-embedding row.

A planted shortcut often *is* a token (a tag, a name, a filler word). Every unit that
reads it is also used by the real task, but the token's own input-embedding row is used
by nothing else, so it is the cleanest thing to remove. Pruning a token feature sets its
row of the input embedding to zero (zero mode) or to the mean input embedding over a
reference set (mean mode; the model has never seen a zero vector at its input, and the
mean is often the better "no information here" value). The model then no longer *reads*
the token, but it must still be able to *predict* it: a model whose unembedding is tied
to the input embedding (GPT-2, many small Llamas) is untied first, the output projection
keeping its own copy of the original matrix (``config.tie_word_embeddings = False``, and
``lm_head.weight`` is written to the checkpoint).

The run-time equivalent, which the export is verified against, replaces the embedding
*activation* at the positions holding the token: a forward hook on the HF model's
input-embedding module (:func:`token_ablation`), or a hook on ``hook_embed`` of a
``TransformerBridge`` / ``HookedTransformer`` (:func:`hooked_token_ablation`). Neither
touches a weight, so a tied unembedding stays as it was in the reference.

This needs an input embedding that is a plain lookup (``embed(ids) == weight[ids]``);
models that scale inside the embedding module (Gemma) are refused.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from icp_lens.hooks import hooked, module_hooks

if TYPE_CHECKING:
    from icp_lens.pruning.plan import TokenRow

__all__ = [
    "EMBED_HOOK",
    "check_token_ids",
    "check_plain_lookup",
    "resolve_tokens",
    "replace_tokens",
    "token_ablation",
    "hooked_token_ablation",
    "edit_token_rows",
    "embedding_mean",
    "prune_token_embeddings",
]

#: The hook point of the token embedding on a TransformerBridge and a HookedTransformer.
EMBED_HOOK = "hook_embed"


def _is_hooked(model: Any) -> bool:
    return hasattr(model, "hook_dict")


def vocab_size(model: Any) -> int:
    """Rows of the input embedding (HF model) or ``cfg.d_vocab`` (hooked model)."""
    if _is_hooked(model):
        return int(model.cfg.d_vocab)
    return int(model.get_input_embeddings().weight.shape[0])


def check_token_ids(model: Any, token_ids: Sequence[int]) -> list[int]:
    """``token_ids`` as ints; raise with the valid range on ids the model's vocabulary lacks."""
    n = vocab_size(model)
    out = []
    for t in token_ids:
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            raise TypeError(f"Token ids must be integers, got {t!r} ({type(t).__name__})") from None
        if not 0 <= t < n:
            raise ValueError(f"Token id {t} out of range: the model's input embedding has {n} rows (valid 0..{n - 1})")
        out.append(t)
    if len(set(out)) != len(out):
        raise ValueError(f"Each token is listed once; got {out}")
    return out


def resolve_tokens(model: Any, tokens: Sequence[int | str], tokenizer: Any = None) -> list[int]:
    """Token ids from ids or vocabulary strings (as the tokenizer spells them, e.g. ``'Ġwow'``)."""
    ids: list[int] = []
    for t in tokens:
        if isinstance(t, str):
            tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
            if tok is None:
                raise ValueError(f"Token {t!r} given as a string: pass tokenizer=... to look it up")
            vocab = tok.get_vocab()
            if t not in vocab:
                import difflib

                close = difflib.get_close_matches(t, list(vocab), n=5)
                raise ValueError(f"Token {t!r} is not in the vocabulary; close matches: {close}")
            ids.append(int(vocab[t]))
        else:
            ids.append(t)  # type: ignore[arg-type]
    return check_token_ids(model, ids)


@torch.no_grad()
def check_plain_lookup(model: nn.Module) -> nn.Module:
    """The HF model's input-embedding module, after checking it is a plain row lookup."""
    embed = model.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    if weight is None:
        raise NotImplementedError(f"{type(model).__name__}'s input embedding has no weight matrix")
    ids = torch.arange(min(4, weight.shape[0]), device=weight.device)[None]
    if not torch.equal(embed(ids), weight[ids]):
        raise NotImplementedError(
            f"{type(model).__name__}'s input embedding ({type(embed).__name__}) is not a plain lookup "
            "(it scales or transforms the rows), so editing a row is not the same as replacing the token's "
            "embedding; token features are not supported for this model"
        )
    return embed


def _rows_table(rows: Sequence[TokenRow], width: int, dtype: torch.dtype, device: torch.device):
    ids = torch.tensor([r.token_id for r in rows], dtype=torch.long, device=device)
    values = torch.zeros(len(rows), width, dtype=dtype, device=device)
    for i, r in enumerate(rows):
        if r.value is not None:
            if len(r.value) != width:
                raise ValueError(
                    f"The replacement for token {r.token_id} has {len(r.value)} values; the embedding has width {width}"
                )
            values[i] = torch.tensor(r.value, dtype=torch.float64, device="cpu").to(dtype)
    return ids, values


def replace_tokens(
    activation: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"], rows: Sequence[TokenRow]
) -> Float[Tensor, "batch pos d_model"]:
    """``activation`` with the positions holding each row's token set to its replacement."""
    if not rows:
        return activation
    ids, values = _rows_table(rows, activation.shape[-1], activation.dtype, activation.device)
    tokens = tokens.to(activation.device)
    match = tokens[..., None] == ids  # [batch, pos, n_rows]
    hit = match.any(-1)
    if not bool(hit.any()):
        return activation
    which = match.float().argmax(-1)
    return torch.where(hit[..., None], values[which], activation)


@contextmanager
def token_ablation(model: nn.Module, rows: Sequence[TokenRow]) -> Iterator[nn.Module]:
    """Replace the listed tokens' embeddings of an HF model at run time (module hook; weights untouched)."""
    if not rows:
        yield model
        return
    embed = check_plain_lookup(model)
    check_token_ids(model, [r.token_id for r in rows])

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return replace_tokens(output, args[0], rows)

    with module_hooks(post=[(embed, hook)]):
        yield model


@contextmanager
def hooked_token_ablation(model: Any, tokens: Tensor, rows: Sequence[TokenRow]) -> Iterator[Any]:
    """The same on a hooked model, for forward passes on ``tokens``: a hook on ``hook_embed``."""
    if not rows:
        yield model
        return
    check_token_ids(model, [r.token_id for r in rows])
    with hooked(model, [(EMBED_HOOK, lambda act, hook: replace_tokens(act, tokens, rows))]):
        yield model


@torch.no_grad()
def edit_token_rows(model: nn.Module, rows: Sequence[TokenRow]) -> tuple[int, bool]:
    """Write ``rows`` into the HF model's input embedding, untying a tied unembedding first (in place).

    Returns the number of embedding entries set to zero that were not zero, and whether
    the unembedding was untied.
    """
    if not rows:
        return 0, False
    from icp_lens.retrain import untie_unembedding

    embed = check_plain_lookup(model)
    check_token_ids(model, [r.token_id for r in rows])
    head = model.get_output_embeddings()
    tied = head is not None and (head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr())
    if head is not None:
        untie_unembedding(model)
    weight = model.get_input_embeddings().weight
    ids, values = _rows_table(rows, weight.shape[1], weight.dtype, weight.device)
    zero_rows = torch.tensor([r.value is None for r in rows], device=weight.device)
    zeroed = int(((weight[ids] != 0) & zero_rows[:, None]).sum())
    weight[ids] = values
    return zeroed, tied


@torch.no_grad()
def embedding_mean(
    model: Any, reference: Any, *, tokenizer: Any = None, batch_size: int = 512
) -> Float[Tensor, " d_model"]:
    """Mean input embedding over every position of the reference prompts (the mean-mode row).

    ``reference``: a ``ProbeSet`` (its prompt tokens), or prompts / ``ProbeExample``s / a
    JSONL path (encoded as :func:`icp_lens.encoding.encode_texts` does). On a hooked model
    the mean is taken at ``hook_embed``; on an HF model over the embedding rows.
    """
    from icp_lens.probeset import ProbeSet

    site = EmbeddingSite(model)
    if isinstance(reference, ProbeSet):
        batches: Iterator[Tensor] = (b.tokens for b in reference.batches(batch_size, device=site.device))
    else:
        from icp_lens.encoding import encode_texts, length_batches
        from icp_lens.pruning.means import reference_texts

        texts = reference_texts(reference)
        encoded = encode_texts(texts, model=model if _is_hooked(model) else None, tokenizer=tokenizer)
        batches = (tokens for _, tokens in length_batches(encoded, batch_size, device=site.device))
    total, n = None, 0
    for tokens in batches:
        e = site.embed(tokens).double().sum((0, 1))
        total = e if total is None else total + e
        n += tokens.numel()
    if total is None:
        raise ValueError("The reference set is empty")
    return (total / n).float().cpu()


class EmbeddingSite:
    """Where a model's token embeddings are read and replaced.

    ``hook_embed`` on a ``TransformerBridge`` / ``HookedTransformer``; the output of the
    input-embedding module on an HF model (which must be a plain lookup).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.hooked = _is_hooked(model)
        self.module = None if self.hooked else check_plain_lookup(model)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        tokens = tokens.to(self.device)
        if not self.hooked:
            return self.module(tokens)
        from icp_lens.hooks import capturing

        with capturing(self.model, [EMBED_HOOK]) as store:
            self.model(tokens)
        return store[EMBED_HOOK]

    @contextmanager
    def replacing(self, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """Every forward pass inside the block has its token embeddings mapped through ``fn``."""
        if self.hooked:
            with hooked(self.model, [(EMBED_HOOK, lambda act, hook: fn(act))]):
                yield
        else:
            with module_hooks(post=[(self.module, lambda module, args, out: fn(out))]):
                yield

    @torch.no_grad()
    def logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        out = self.model(tokens.to(self.device))
        return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def prune_token_embeddings(
    hf_model: nn.Module,
    token_ids: Sequence[int],
    *,
    mode: Literal["zero", "mean"] = "mean",
    mean: Tensor | None = None,
) -> nn.Module:
    """Set the embedding rows of ``token_ids`` to zero or to ``mean`` (in place; returned).

    A tied unembedding is untied first, so only the *input* side of each token changes.
    For a checkpoint with a plan and verification use ``make_plan(..., tokens=...)`` and
    ``apply_plan``; this is the bare edit.
    """
    from icp_lens.pruning.plan import TokenRow

    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "mean" and mean is None:
        raise ValueError("mean mode needs the mean embedding (embedding_mean(model, reference))")
    value = None if mode == "zero" else tuple(mean.double().tolist())  # type: ignore[union-attr]
    edit_token_rows(hf_model, [TokenRow(int(t), value) for t in check_token_ids(hf_model, token_ids)])
    return hf_model
