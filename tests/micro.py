"""A seeded micro-model: a real HF checkpoint small enough to check numbers by hand."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<bos>", "<pad>", "<unk>", "a", "b", "c", "d", "e", "pos", "neg"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_micro(
    out_dir: Path, arch: str = "gpt2", seed: int = 0, constant_neuron: tuple[int, int] | None = None
) -> Path:
    """Save a 2-layer, 8-wide random model of ``arch`` with a 10-word tokenizer.

    ``constant_neuron=(layer, i)`` (GPT-2 only) zeroes neuron i's input weights, so its
    activation is gelu(bias): the same on every input and position.
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=len(WORDS), bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_positions=16,
                n_embd=8,
                n_layer=2,
                n_head=2,
                n_inner=16,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **common,
            )
        )
    elif arch == "neox":
        model = GPTNeoXForCausalLM(
            GPTNeoXConfig(
                hidden_size=8,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=16,
                max_position_embeddings=16,
                rotary_pct=0.5,
                tie_word_embeddings=False,
                **common,
            )
        )
    elif arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=8,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=16,
                max_position_embeddings=16,
                tie_word_embeddings=False,
                **common,
            )
        )
    else:
        raise ValueError(arch)
    with torch.no_grad():  # make weights large enough that every edit visibly moves the logits
        for p in model.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else p.uniform_(-0.3, 0.3)
    if constant_neuron is not None:
        layer, i = constant_neuron
        with torch.no_grad():
            model.transformer.h[layer].mlp.c_fc.weight[:, i] = 0.0
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    word_tokenizer().save_pretrained(out_dir)
    return out_dir
