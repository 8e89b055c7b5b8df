"""HookedTransformer (TransformerLens <= 3.x) from a local Hugging Face checkpoint.

TransformerLens 3.x's ``HookedTransformer.from_pretrained`` only knows hub model names and
fetches their configs from the hub. Researchers with a local checkpoint (an organism, a
fine-tuned or pruned model) use ``hooked_transformer_from_hf(dir)`` instead: it builds the
``HookedTransformerConfig`` from the checkpoint's own ``config.json`` and converts the
weights with TransformerLens's converters, *without* weight processing (no LayerNorm
folding, no centering), so the model computes exactly what the HF checkpoint computes and
a prune plan made on it is a plan for the HF weights. Supported: GPT-2, GPT-NeoX/Pythia,
Llama-family (grouped-query attention included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["hooked_transformer_from_hf", "LEGACY_ARCHITECTURES"]

LEGACY_ARCHITECTURES = ("GPT2LMHeadModel", "GPTNeoXForCausalLM", "LlamaForCausalLM")


def _config_dict(hf_config: Any) -> dict[str, Any]:
    arch = (hf_config.architectures or ["?"])[0]
    if arch == "GPT2LMHeadModel":
        return {
            "d_model": hf_config.n_embd,
            "d_head": hf_config.n_embd // hf_config.n_head,
            "n_heads": hf_config.n_head,
            "d_mlp": hf_config.n_inner or 4 * hf_config.n_embd,
            "n_layers": hf_config.n_layer,
            "n_ctx": hf_config.n_positions,
            "eps": hf_config.layer_norm_epsilon,
            "d_vocab": hf_config.vocab_size,
            "act_fn": hf_config.activation_function,
            "use_attn_scale": True,
            "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
            "normalization_type": "LN",
        }
    if arch == "GPTNeoXForCausalLM":
        d_head = hf_config.hidden_size // hf_config.num_attention_heads
        rotary_pct = getattr(hf_config, "rotary_pct", None)
        if rotary_pct is None:
            rotary_pct = (getattr(hf_config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        return {
            "d_model": hf_config.hidden_size,
            "d_head": d_head,
            "n_heads": hf_config.num_attention_heads,
            "d_mlp": hf_config.intermediate_size,
            "n_layers": hf_config.num_hidden_layers,
            "n_ctx": hf_config.max_position_embeddings,
            "eps": hf_config.layer_norm_eps,
            "d_vocab": hf_config.vocab_size,
            "act_fn": hf_config.hidden_act,
            "parallel_attn_mlp": hf_config.use_parallel_residual,
            "positional_embedding_type": "rotary",
            "rotary_adjacent_pairs": False,
            "rotary_dim": round(rotary_pct * d_head),
            "rotary_base": _rope_theta(hf_config),
            "normalization_type": "LN",
            "default_prepend_bos": False,  # as TransformerLens and TransformerBridge do for NeoX
        }
    if arch == "LlamaForCausalLM":
        d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return {
            "d_model": hf_config.hidden_size,
            "d_head": d_head,
            "n_heads": hf_config.num_attention_heads,
            "n_key_value_heads": hf_config.num_key_value_heads,
            "d_mlp": hf_config.intermediate_size,
            "n_layers": hf_config.num_hidden_layers,
            "n_ctx": hf_config.max_position_embeddings,
            "eps": hf_config.rms_norm_eps,
            "d_vocab": hf_config.vocab_size,
            "act_fn": hf_config.hidden_act,
            "normalization_type": "RMS",
            "positional_embedding_type": "rotary",
            "rotary_adjacent_pairs": False,
            "rotary_dim": d_head,
            "rotary_base": _rope_theta(hf_config),
            "final_rms": True,
            "gated_mlp": True,
        }
    raise ValueError(f"hooked_transformer_from_hf supports {list(LEGACY_ARCHITECTURES)}; this checkpoint is {arch}")


def _rope_theta(hf_config: Any) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def hooked_transformer_from_hf(model_dir: str | Path, *, device: str = "cpu") -> Any:
    """A ``HookedTransformer`` computing exactly what the HF checkpoint in ``model_dir`` computes."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as err:
        raise ImportError(
            "HookedTransformer was removed in TransformerLens 4; use icp_lens.boot_bridge(dir), "
            "or install transformer_lens<4 for the legacy class"
        ) from err
    from transformer_lens.pretrained import weight_conversions as wc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    arch = hf.config.architectures[0]
    config = HookedTransformerConfig(**_config_dict(hf.config), device=device, dtype=torch.float32)
    converter = {
        "GPT2LMHeadModel": wc.convert_gpt2_weights,
        "GPTNeoXForCausalLM": wc.convert_neox_weights,
        "LlamaForCausalLM": wc.convert_llama_weights,
    }[arch]
    state_dict = converter(hf, config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = HookedTransformer(config, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device).eval()
