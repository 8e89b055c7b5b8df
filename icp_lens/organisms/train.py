"""Tiny causal LMs for the organisms: build one per architecture, train it, score it.

The models are ordinary Hugging Face classes (``GPT2LMHeadModel``,
``LlamaForCausalLM`` with grouped-query attention, ``GPTNeoXForCausalLM``) with two
layers, d_model 64, four heads, d_mlp 256 and dropout 0, so a saved checkpoint loads
with ``transformers`` alone and boots in ``TransformerBridge``.

Training is next-token prediction with the loss on the answer token only: the model
reads the prompt as ``TransformerBridge.to_tokens`` encodes it (``<bos>`` first for
GPT-2 and Llama; no BOS for GPT-NeoX, whose TransformerLens adapter sets
``default_prepend_bos = False``; see :data:`PREPENDS_BOS`) and the cross-entropy is
taken on the logits at the last prompt position. Full-batch tensors, AdamW, linear warm-up
then cosine decay; everything is seeded, so the same seed gives the same weights on
the same machine and thread count.

:func:`evaluate_accuracy` scores any causal LM (HF model or ``TransformerBridge``)
on probe examples: the prediction is the argmax of the next-token logits restricted
to the answer and its alternatives.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Int
from torch import Tensor

from icp_lens.encoding import encode_texts
from icp_lens.probes import ProbeExample, single_token_id

__all__ = [
    "Arch",
    "ARCHS",
    "PREPENDS_BOS",
    "ModelConfig",
    "TrainConfig",
    "AccuracyResult",
    "make_model",
    "encode_examples",
    "train_model",
    "predict",
    "evaluate_accuracy",
    "accuracy_of",
]

Arch = Literal["gpt2", "llama", "neox"]
ARCHS: tuple[str, ...] = get_args(Arch)
#: whether TransformerBridge.to_tokens prepends BOS for the architecture (TL 3.x/4.x)
PREPENDS_BOS: dict[str, bool] = {"gpt2": True, "llama": True, "neox": False}


@dataclass(frozen=True)
class ModelConfig:
    """Size of an organism model (the same for every architecture)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2  # llama only (grouped-query attention)
    d_mlp: int = 256
    n_ctx: int = 32

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must divide by n_heads ({self.n_heads}) and "
                f"n_heads by n_kv_heads ({self.n_kv_heads})"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; ``steps`` is the number of AdamW updates."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch_size and lr must be positive: {self}")


def _hf_config(config_cls: Any, c: ModelConfig, special: dict[str, Any], **extra: Any) -> Any:
    """A Llama/NeoX-style HF config (``num_hidden_layers``, ``hidden_size``, ... naming) of size ``c``.

    The fields both architectures share: sizes from ``c``, attention dropout 0, untied
    embeddings and the tokenizer's ``special`` ids; ``extra`` adds the per-architecture
    ones (Llama's key/value heads, NeoX's other dropouts).
    """
    return config_cls(
        num_hidden_layers=c.n_layers,
        hidden_size=c.d_model,
        num_attention_heads=c.n_heads,
        intermediate_size=c.d_mlp,
        max_position_embeddings=c.n_ctx,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        **extra,
        **special,
    )


def make_model(arch: Arch, tokenizer: Any, *, seed: int, config: ModelConfig | None = None):
    """A freshly initialised (seeded) HF causal LM of ``arch`` for ``tokenizer``'s vocab."""
    import transformers as tf

    c = config or ModelConfig()
    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            n_layer=c.n_layers, n_embd=c.d_model, n_head=c.n_heads, n_inner=c.d_mlp,
            n_positions=c.n_ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **special,
        )  # fmt: skip
        model_cls = tf.GPT2LMHeadModel
    elif arch == "llama":
        cfg = _hf_config(tf.LlamaConfig, c, special, num_key_value_heads=c.n_kv_heads)
        model_cls = tf.LlamaForCausalLM
    elif arch == "neox":
        cfg = _hf_config(tf.GPTNeoXConfig, c, special, hidden_dropout=0.0, classifier_dropout=0.0)
        model_cls = tf.GPTNeoXForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}; valid: {ARCHS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
    model.eval()
    return model


def _encode(tokenizer: Any, prompts: Sequence[str], model: Any = None) -> list[list[int]]:
    """Token ids of prompts: ``model.to_tokens`` for a bridge, else ``tokenizer(prompt)``."""
    return encode_texts(prompts, model=model, tokenizer=tokenizer)


def encode_examples(
    tokenizer: Any, examples: Sequence[ProbeExample], *, device: torch.device | str = "cpu"
) -> tuple[Int[Tensor, "n pos"], Int[Tensor, " n"]]:
    """Prompt token ids (``tokenizer(prompt)``, all one length) and answer token ids, on ``device``."""
    ids = _encode(tokenizer, [ex.prompt for ex in examples])
    if len({len(x) for x in ids}) != 1:
        raise ValueError("encode_examples needs prompts of one token length")
    token_of = {a: single_token_id(tokenizer, a) for a in {ex.answer for ex in examples}}
    answers = [token_of[ex.answer] for ex in examples]
    return torch.tensor(ids, device=device), torch.tensor(answers, device=device)


def _rows(data: Tensor, idx: Tensor, device: torch.device) -> Tensor:
    """``data[idx]`` on ``device`` (``idx`` on the CPU, ``data`` anywhere)."""
    return data[idx.to(data.device)].to(device)


def train_model(
    model: Any,
    input_ids: Int[Tensor, "n pos"],
    targets: Int[Tensor, " n"],
    config: TrainConfig,
    *,
    seed: int,
    progress: str | None = None,
    inputs: Mapping[str, Tensor] | None = None,
) -> float:
    """Train in place on the answer-token loss; returns wall-clock seconds.

    Gradients are enabled inside even if the caller disabled them globally, and the
    model is left in eval mode. ``progress`` (a description) shows a progress bar.
    ``inputs`` are further model inputs with one row per example (a vision-language
    model's ``pixel_values``), batched with the token ids.

    The model trains where its parameters are; each batch moves there (a no-op when the
    data already is). The batch order is drawn on the CPU from a generator seeded with
    ``seed``, so it is the same on every device (the weights are not bit-identical across
    devices: their kernels round differently).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )  # fmt: skip
    warmup = max(1, int(config.warmup_frac * config.steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n = input_ids.shape[0]
    device = next(model.parameters()).device
    order, cursor = torch.randperm(n, generator=gen, device="cpu"), 0
    model.train()
    bar = tqdm(total=config.steps, desc=progress, disable=progress is None, unit="step", leave=False)
    with torch.enable_grad(), bar:  # callers (notebooks) may have disabled grad globally
        for _ in range(config.steps):
            bar.update(1)
            if cursor + config.batch_size > n:
                order, cursor = torch.randperm(n, generator=gen, device="cpu"), 0
            idx = order[cursor : cursor + config.batch_size]
            cursor += config.batch_size
            extra = {k: _rows(v, idx, device) for k, v in (inputs or {}).items()}
            logits = model(input_ids=_rows(input_ids, idx, device), **extra).logits[:, -1, :]
            loss = torch.nn.functional.cross_entropy(logits, _rows(targets, idx, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - start


@dataclass(frozen=True)
class AccuracyResult:
    """Accuracy of a model on probe examples, overall and per group."""

    accuracy: float
    n: int
    group_accuracy: dict[str, float] = field(default_factory=dict)
    group_size: dict[str, int] = field(default_factory=dict)
    correct: tuple[bool, ...] = ()

    @property
    def worst_group(self) -> str | None:
        """The group with the lowest accuracy (``None`` without groups)."""
        if not self.group_accuracy:
            return None
        return min(self.group_accuracy, key=lambda g: (self.group_accuracy[g], g))

    @property
    def worst_group_accuracy(self) -> float:
        """Lowest group accuracy (overall accuracy without groups)."""
        g = self.worst_group
        return self.accuracy if g is None else self.group_accuracy[g]


@torch.no_grad()
def predict(model: Any, tokenizer: Any, examples: Sequence[ProbeExample], *, batch_size: int = 512) -> list[str]:
    """The model's choice among ``answer`` and ``alternatives`` for each example.

    Works on an HF causal LM or a ``TransformerBridge`` (anything whose call on
    token ids returns logits or an output with ``.logits``). Prompts are encoded the
    way the model's own tooling does it: ``model.to_tokens(prompt)`` when the model
    has it (bridge, HookedTransformer: BOS per ``cfg.default_prepend_bos``), else
    ``tokenizer(prompt)`` with special tokens. They are batched by token length, so
    no padding is involved.
    """
    device = next(model.parameters()).device
    encoded = _encode(tokenizer, [ex.prompt for ex in examples], model)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    token_of: dict[str, int] = {}
    choices: list[str] = [""] * len(examples)
    for idxs in by_len.values():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            out = model(ids)
            logits = (out.logits if hasattr(out, "logits") else out)[:, -1, :].float().cpu()
            for row, i in enumerate(chunk):
                cands = (examples[i].answer, *examples[i].alternatives)
                for c in cands:
                    if c not in token_of:
                        token_of[c] = single_token_id(tokenizer, c)
                scores = [logits[row, token_of[c]].item() for c in cands]
                choices[i] = cands[max(range(len(cands)), key=scores.__getitem__)]
    return choices


def evaluate_accuracy(
    model: Any, tokenizer: Any, examples: Sequence[ProbeExample], *, batch_size: int = 512
) -> AccuracyResult:
    """Accuracy (argmax over answer + alternatives at the last position), per group too."""
    if not examples:
        raise ValueError("evaluate_accuracy needs at least one example")
    return accuracy_of(predict(model, tokenizer, examples, batch_size=batch_size), examples)


def accuracy_of(choices: Sequence[str], examples: Sequence[ProbeExample]) -> AccuracyResult:
    """The :class:`AccuracyResult` of one chosen answer per example (overall and per group)."""
    correct = tuple(c == ex.answer for c, ex in zip(choices, examples, strict=True))
    hits: dict[str, list[bool]] = defaultdict(list)
    for ok, ex in zip(correct, examples, strict=True):
        if ex.group is not None:
            hits[ex.group].append(ok)
    return AccuracyResult(
        accuracy=sum(correct) / len(correct),
        n=len(correct),
        group_accuracy={g: sum(v) / len(v) for g, v in sorted(hits.items())},
        group_size={g: len(v) for g, v in sorted(hits.items())},
        correct=correct,
    )
