"""Retraining the unembedding after pruning (the "+ retrain" step of SHIFT, Marks et al. 2024).

After the spurious features are pruned, the last layer can be refitted on the *original,
biased* training data: with the shortcut's internal carriers gone, the unembedding can
only re-weight what is left, so it recovers accuracy without re-learning the shortcut
through them. Only the output projection (``lm_head``) is trained; every other weight is
frozen, so the final hidden states are fixed and computed once, and training is a
multinomial logistic regression on them (seconds on a CPU).

Models that tie the unembedding to the token embedding (GPT-2) are untied first: the
output projection becomes its own copy, and the input embedding is left as it was (the
config's ``tie_word_embeddings`` is set to ``False`` so a saved checkpoint keeps them
apart)::

    from icp_lens.retrain import retrain_unembedding

    model = retrain_unembedding(pruned_hf_model, tokenizer, organism.probes("train"), steps=300, seed=0)

The loss is the cross-entropy of the answer token at the last prompt position, over the
whole vocabulary, as the organisms are trained (:mod:`icp_lens.organisms.train`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from icp_lens.probes import ProbeExample, single_token_id

__all__ = ["untie_unembedding", "final_hidden_states", "retrain_unembedding"]


@torch.no_grad()
def untie_unembedding(model: nn.Module) -> nn.Module:
    """Give ``model`` its own copy of the unembedding if it shares the token embedding (in place)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to retrain")
    embed = model.get_input_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):  # multimodal configs keep it on the text config too
        model.config.get_text_config().tie_word_embeddings = False
    return model


@torch.no_grad()
def final_hidden_states(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 512
) -> torch.Tensor:
    """The input of the unembedding at each prompt's last position, ``[n, d_model]``.

    Prompts are encoded with special tokens (``tokenizer(prompt)``, as
    :func:`icp_lens.organisms.train.predict` does for an HF model) and batched by token
    length, so no padding is involved.
    """
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    width = model.config.hidden_size if hasattr(model.config, "hidden_size") else 0
    out = torch.empty(len(encoded), width, device="cpu")
    head = model.get_output_embeddings()
    for idxs in by_len.values():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            result = model(ids, output_hidden_states=True)
            hidden = result.hidden_states[-1][:, -1].float()
            logits = result.logits[:, -1].float()
            if not torch.allclose(head(hidden.to(head.weight.dtype)).float(), logits, atol=1e-3, rtol=1e-3):
                raise RuntimeError(
                    "The last hidden state does not feed the unembedding directly in this model "
                    "(a final norm or soft cap after it?); retrain_unembedding cannot use it"
                )
            if out.shape[1] != hidden.shape[1]:
                out = torch.empty(len(encoded), hidden.shape[1], device="cpu")
            out[chunk] = hidden.cpu()
    return out


def retrain_unembedding(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[ProbeExample],
    *,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Untie and retrain only the unembedding of ``model`` on ``examples`` (in place; returned).

    ``steps`` AdamW updates on minibatches of ``batch_size`` examples drawn with a
    generator seeded by ``seed``; the loss is the cross-entropy of each example's
    ``answer`` token at the last prompt position. The model is left in eval mode.
    """
    if not examples:
        raise ValueError("retrain_unembedding needs at least one training example")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps, batch_size and lr must be positive; got {steps}, {batch_size}, {lr}")
    model.eval()
    untie_unembedding(model)
    head = model.get_output_embeddings()
    hidden = final_hidden_states(model, tokenizer, [ex.prompt for ex in examples])
    token_of = {a: single_token_id(tokenizer, a) for a in {ex.answer for ex in examples}}
    targets = torch.tensor([token_of[ex.answer] for ex in examples], device="cpu")
    device = head.weight.device
    params = [head.weight] + ([head.bias] if getattr(head, "bias", None) is not None else [])
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=gen, device="cpu")
                h = hidden[idx].to(device, head.weight.dtype)
                loss = nn.functional.cross_entropy(head(h).float(), targets[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
    model.eval()
    return model
