"""The model side of the planted-shortcut organisms: batching, accuracy and the LoRA fine-tune.

:mod:`icp_lens.organisms.planted` builds the data and the checkpoints; this module runs
the model on them: :func:`planted_accuracy` (answer against alternatives at the last
real token, overall and per group) and the LoRA fine-tune that plants the shortcut.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from icp_lens.probes import ProbeExample

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.organisms.planted import PlantedFinetune

__all__ = ["planted_accuracy"]


def _batches(tokenizer: Any, examples: Sequence[ProbeExample], batch_size: int, device: Any) -> Any:
    import torch

    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        enc = [tokenizer(ex.prompt)["input_ids"] for ex in chunk]
        width = max(map(len, enc))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=device)
        last = torch.tensor([len(e) - 1 for e in enc], device=device)
        yield chunk, ids, mask, last


def _answer_ids(tokenizer: Any, examples: Sequence[ProbeExample]) -> dict[str, int]:
    out = {}
    for ex in examples:
        for a in (ex.answer, *ex.alternatives):
            if a not in out:
                ids = tokenizer(a, add_special_tokens=False)["input_ids"]
                if len(ids) != 1:
                    raise ValueError(f"answer {a!r} is {len(ids)} tokens; planted tasks need one-token answers")
                out[a] = ids[0]
    return out


def planted_accuracy(
    model: Any, tokenizer: Any, examples: Sequence[ProbeExample], *, batch_size: int = 16
) -> dict[str, Any]:
    """Accuracy (answer vs alternatives at the last real token), overall and per group.

    Right-padded batches with an attention mask: in a causal model the logits at the
    last real token do not see the padding, so this equals one prompt at a time.
    """
    import torch

    device = next(model.parameters()).device
    token_of = _answer_ids(tokenizer, examples)
    hits: dict[str, list[bool]] = {}
    correct = []
    with torch.no_grad():
        for chunk, ids, mask, last in _batches(tokenizer, examples, batch_size, device):
            logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(chunk), device=device), last]
            logits = logits.float()
            for row, ex in enumerate(chunk):
                cands = (ex.answer, *ex.alternatives)
                best = max(cands, key=lambda c: logits[row, token_of[c]].item())
                ok = best == ex.answer
                correct.append(ok)
                hits.setdefault(ex.group or "all", []).append(ok)
    groups = {g: sum(v) / len(v) for g, v in sorted(hits.items())}
    worst = min(groups, key=lambda g: (groups[g], g))
    return {"accuracy": sum(correct) / len(correct), "groups": groups, "worst_group": worst, "worst": groups[worst]}


def _finetune(
    model: Any, tokenizer: Any, examples: Sequence[ProbeExample], ft: PlantedFinetune, *, seed: int
) -> tuple[Any, float, float]:
    """LoRA fine-tune in place, merged; returns (plain HF model, final loss, seconds)."""
    import torch

    from icp_lens.training.lora import add_lora, default_targets

    start = time.perf_counter()
    n_layers = int(model.config.num_hidden_layers)
    first = max(0, n_layers - ft.lora_layers)
    names = default_targets(model)
    targets = [
        n
        for n, _ in model.named_modules()
        if n.split(".")[-1] in names and _layer_of(n) is not None and _layer_of(n) >= first
    ]
    handle = add_lora(model, r=ft.lora_rank, alpha=ft.lora_alpha, targets=targets, seed=seed)
    params = list(handle.parameters().values())
    opt = torch.optim.AdamW(params, lr=ft.lr, weight_decay=ft.weight_decay)
    steps = ft.epochs * math.ceil(len(examples) / ft.batch_size)
    # linear warm-up, then constant, the last 20% of steps decaying linearly to 10%
    tail = max(1, steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / max(1, ft.warmup_steps)) * min(1.0, 0.1 + 0.9 * max(0, steps - s) / tail),
    )
    token_of = _answer_ids(tokenizer, examples)
    gen = np.random.default_rng(seed)
    device = next(model.parameters()).device
    loss_value = float("nan")
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="LoRA fine-tune", unit="step", mininterval=5.0)
    with torch.enable_grad(), bar:
        for _ in range(ft.epochs):
            order = [examples[i] for i in gen.permutation(len(examples))]
            for chunk, ids, mask, last in _batches(tokenizer, order, ft.batch_size, device):
                target = torch.tensor([token_of[ex.answer] for ex in chunk], device=device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ft.mixed_precision == "bf16"):
                    rows = torch.arange(len(chunk), device=device)
                    logits = handle.hf_model(input_ids=ids, attention_mask=mask).logits[rows, last]
                loss = torch.nn.functional.cross_entropy(logits.float(), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_value = loss.item()
                bar.update()
                bar.set_postfix_str(f"loss {loss_value:.4f}", refresh=False)
    merged = handle.peft_model.merge_and_unload().eval()
    return merged, loss_value, time.perf_counter() - start


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a in ("layers", "h", "layer") and b.isdigit():
            return int(b)
    return None
