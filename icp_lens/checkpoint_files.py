"""Checkpoint directories on disk: what counts as a path, safetensors only, a tokenizer beside the weights.

icp_lens never unpickles weights (:func:`require_safetensors` refuses pickle-only
folders with the command that converts them) and needs the tokenizer files next to the
weights (:func:`require_tokenizer`). :func:`looks_like_path` tells a typed model argument
that is a folder (``./run``, ``/data/m``, ``a/b/c``) from a hub name (``org/model``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PICKLE_SUFFIXES", "TOKENIZER_FILES", "looks_like_path", "require_safetensors", "require_tokenizer"]


def looks_like_path(name_or_dir: str | Path) -> bool:
    """Whether a model argument is a filesystem path (not a hub name such as ``org/model``)."""
    raw = str(name_or_dir)
    return isinstance(name_or_dir, Path) or raw.startswith((".", "/", "~")) or raw.count("/") > 1


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path: str | Path) -> Path:
    """``path`` if it is a checkpoint directory whose weights are safetensors.

    icp_lens never unpickles weights: a directory holding only ``pytorch_model.bin``
    (or other pickle files) is refused with the way to convert it, in an environment
    you trust, once.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No such model directory: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: no config.json inside")
    if any(path.glob("*.safetensors")) or any(path.glob("*.gguf")):
        return path
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path} holds pickle weights only ({', '.join(pickles[:3])}); icp_lens loads safetensors only, "
            "because unpickling can run code. Convert once, in an environment you trust: "
            f'python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\""
        )
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def require_tokenizer(path: str | Path) -> Path:
    """``path`` if the checkpoint directory holds tokenizer files (or a GGUF, which carries one)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"No such model directory: {path}")
    if any((path / name).is_file() for name in TOKENIZER_FILES) or any(path.glob("*.gguf")):
        return path
    raise FileNotFoundError(
        f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it beside the weights: "
        "AutoTokenizer.from_pretrained(SOURCE).save_pretrained(DIR)"
    )
