"""Shared fixtures: seeded micro-models on every available TransformerLens model class."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from micro import build_micro  # noqa: E402

try:  # TransformerLens <= 3.x
    from transformer_lens import HookedTransformer  # noqa: F401

    HAS_HOOKED_TRANSFORMER = True
except ImportError:  # TransformerLens 4.x removed it
    HAS_HOOKED_TRANSFORMER = False

#: The model classes every hook-level test runs on in this environment.
BACKENDS = ["bridge"] + (["hooked_transformer"] if HAS_HOOKED_TRANSFORMER else [])


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Organisms are cached per test session (each trains once), never in the user's cache."""
    if os.environ.get("ICP_LENS_TEST_REUSE_CACHE") != "1":  # set it to 1 to reuse ICP_LENS_CACHE
        os.environ["ICP_LENS_CACHE"] = str(tmp_path_factory.mktemp("icp_lens_cache"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def micro_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("micro")
    dirs = {arch: build_micro(root / arch, arch) for arch in ("gpt2", "llama", "neox")}
    dirs["gpt2-constant"] = build_micro(root / "gpt2-constant", "gpt2", constant_neuron=(1, 5))
    return dirs


def load_backend(backend: str, model_dir: Path):
    if backend == "bridge":
        from icp_lens import boot_bridge

        return boot_bridge(model_dir)
    from icp_lens.legacy import hooked_transformer_from_hf

    return hooked_transformer_from_hf(model_dir)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def micro(backend: str, micro_dirs: dict[str, Path]):
    """The GPT-2 micro-model on one TransformerLens model class."""
    return load_backend(backend, micro_dirs["gpt2"])


@pytest.fixture
def micro_tokens() -> torch.Tensor:
    # <bos> a b c d e / <bos> e d c b a / <bos> a a b b c
    return torch.tensor([[0, 3, 4, 5, 6, 7], [0, 7, 6, 5, 4, 3], [0, 3, 3, 4, 4, 5]])
