"""LoRA through peft, for a model that runs inside a ``TransformerBridge``.

peft cannot wrap the bridge's modules, so the order is: ``get_peft_model`` on the plain
Hugging Face model first, then boot the bridge on ``peft_model.base_model.model`` (the HF
model with the LoRA layers injected). Booting renames modules in that tree (GPT-2's
``attn.c_proj`` becomes ``attn.o._original_component``), so :func:`add_lora` records
every LoRA layer under its *clean* HF name before the bridge exists; checkpoints and the
merge use those names.

*Which projections can carry an adapter.* For fused query/key/value projections (GPT-2
``c_attn``, GPT-NeoX ``query_key_value``) the bridge computes q, k and v from split
copies of the fused weight and never calls the module itself, so a LoRA layer there would
receive no gradient and change nothing. :data:`DEFAULT_TARGETS` leaves them out, and
:func:`dead_adapters` finds such layers after a backward pass (the trainer raises).

*Saving.* :func:`merge_lora` loads the trained adapter weights into a fresh peft model on a
clean copy of the base model and calls ``merge_and_unload``: the result is an ordinary HF
model (``W + scale * B @ A`` in every targeted module) that the pruner's export writes.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_TARGETS", "FUSED_QKV", "LoraHandle", "add_lora", "default_targets", "dead_adapters", "merge_lora"]

#: LoRA target module names per ``config.model_type`` (fused qkv projections excluded, see above)
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_proj", "c_fc"),
    "gpt_neox": ("dense", "dense_h_to_4h", "dense_4h_to_h"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
#: fused query/key/value projections that the bridge splits (an adapter there is dead)
FUSED_QKV: dict[str, str] = {"gpt2": "c_attn", "gpt_neox": "query_key_value"}


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA needs peft: pip install 'icp-lens[lora]' (or pip install peft)") from err
    return peft


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """LoRA target names for an HF model (see :data:`DEFAULT_TARGETS`)."""
    model_type = str(model.config.model_type)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"No default LoRA targets for model type {model_type!r}; pass lora_targets=... "
            f"(known types: {sorted(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


@dataclass
class LoraHandle:
    """A model with LoRA layers: the peft model, its config, and each LoRA layer by clean HF name."""

    peft_model: Any
    config: Any
    layers: dict[str, nn.Module]

    @property
    def hf_model(self) -> nn.Module:
        """The HF model with the LoRA layers injected (boot the bridge on this one)."""
        return self.peft_model.base_model.model

    def parameters(self) -> dict[str, nn.Parameter]:
        """The trainable adapter weights, by clean name (``<module>.lora_A.weight`` ...)."""
        out = {}
        for name, layer in self.layers.items():
            for part in ("lora_A", "lora_B"):
                out[f"{name}.{part}.weight"] = getattr(layer, part)["default"].weight
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.parameters().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        params = self.parameters()
        missing = sorted(set(params) - set(state))
        if missing:
            raise KeyError(f"LoRA state lacks {missing[:3]}")
        for name, p in params.items():
            p.copy_(state[name])


def add_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
    seed: int = 0,
) -> LoraHandle:
    """Inject LoRA layers into ``model`` (in place) with peft; seeded initialisation."""
    peft = _peft()
    model_type = str(model.config.model_type)
    names = tuple(targets) if targets is not None else default_targets(model)
    fused = FUSED_QKV.get(model_type)
    if fused is not None and fused in names:
        raise ValueError(
            f"LoRA on {fused!r} would be dead: TransformerBridge computes q/k/v from split copies of this "
            f"fused {model_type} projection and never calls it. Choose other targets, e.g. {default_targets(model)}"
        )
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(names),
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
        bias="none",
    )
    with torch.random.fork_rng(devices=[]), _quiet_peft():
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(model, config)
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise ValueError(f"No module of {type(model).__name__} matches the LoRA targets {list(names)}")
    return LoraHandle(peft_model=peft_model, config=config, layers=layers)


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft asks transformers 5.x ``is_gradient_checkpointing``, which warns of its own rename: not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def dead_adapters(handle: LoraHandle) -> list[str]:
    """LoRA layers whose ``lora_B`` got no gradient in the last backward pass (they change nothing)."""
    dead = []
    for name, layer in handle.layers.items():
        if layer.lora_B["default"].weight.grad is None:
            dead.append(name)
    return dead


@torch.no_grad()
def merge_lora(base: nn.Module, handle: LoraHandle) -> nn.Module:
    """An ordinary HF model: ``base`` (left untouched) with ``handle``'s adapters merged in."""
    peft = _peft()
    with _quiet_peft():
        fresh = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(handle.config))
    state = {f"base_model.model.{k}": v for k, v in handle.state_dict().items()}
    result = peft.set_peft_model_state_dict(fresh, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise RuntimeError(
            f"LoRA weights did not map onto the base model: unexpected {unexpected[:3]}, missing {missing[:3]}"
        )
    return fresh.merge_and_unload().eval()
