from __future__ import annotations

import pytest
import torch

from icp_lens import UnknownHookError, active_hook_count, capturing, hooked, resolve_hook_point

pytestmark = pytest.mark.hooks


def test_hooks_removed_after_exception(micro, micro_tokens) -> None:
    assert active_hook_count(micro) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(
            micro, [("blocks.0.mlp.hook_post", lambda a, hook: a * 0), ("blocks.1.attn.hook_z", lambda a, hook: a)]
        ):
            assert active_hook_count(micro) == 2
            raise RuntimeError("boom")
    assert active_hook_count(micro) == 0


def test_hooks_removed_when_the_hook_itself_raises(micro, micro_tokens) -> None:
    def bad(act, hook):
        raise ValueError("bad hook")

    with pytest.raises(ValueError, match="bad hook"):
        with hooked(micro, [("blocks.0.hook_resid_pre", bad)]):
            micro(micro_tokens)
    assert active_hook_count(micro) == 0
    clean = micro(micro_tokens)
    assert torch.isfinite(clean).all()


def test_nested_contexts_remove_only_their_own(micro, micro_tokens) -> None:
    clean = micro(micro_tokens)
    outer = ("blocks.0.mlp.hook_post", lambda a, hook: a * 0)
    with hooked(micro, [outer]):
        ablated = micro(micro_tokens)
        with hooked(
            micro, [("blocks.0.mlp.hook_post", lambda a, hook: a + 1), ("blocks.1.hook_resid_pre", lambda a, hook: a)]
        ):
            assert active_hook_count(micro) == 3
        assert active_hook_count(micro) == 1
        torch.testing.assert_close(micro(micro_tokens), ablated, rtol=0, atol=0)
        with pytest.raises(KeyError):
            with hooked(micro, [("blocks.1.hook_resid_pre", lambda a, hook: a)]):
                raise KeyError("inner failure")
        assert active_hook_count(micro) == 1
    assert active_hook_count(micro) == 0
    assert not torch.allclose(ablated, clean)
    torch.testing.assert_close(micro(micro_tokens), clean, rtol=0, atol=0)


def test_hooked_leaves_foreign_hooks_alone(micro, micro_tokens) -> None:
    point = resolve_hook_point(micro, "blocks.0.mlp.hook_post")
    point.add_hook(lambda a, hook: None)  # a user's own TransformerLens hook
    with hooked(micro, [("blocks.0.mlp.hook_post", lambda a, hook: a)]):
        assert active_hook_count(micro) == 2
    assert active_hook_count(micro) == 1
    micro.reset_hooks()
    assert active_hook_count(micro) == 0


def test_unknown_hook_names_suggest_close_matches(micro) -> None:
    with pytest.raises(UnknownHookError, match=r"Closest hook names: \['blocks.0.mlp.hook_post'"):
        resolve_hook_point(micro, "blocks.0.mlp.hook_pots")
    with pytest.raises(UnknownHookError, match=r"Layer 7 is out of range: valid layers are 0..1"):
        resolve_hook_point(micro, "blocks.7.mlp.hook_post")
    with pytest.raises(UnknownHookError):
        with hooked(micro, [("blocks.0.hook_resid_pre", lambda a, hook: a), ("nonsense", lambda a, hook: a)]):
            pass
    assert active_hook_count(micro) == 0


def test_capturing_reads_standard_shapes(micro, micro_tokens) -> None:
    names = ["blocks.0.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_v"]
    with capturing(micro, names) as store:
        micro(micro_tokens)
    assert {n: tuple(store[n].shape) for n in names} == {
        "blocks.0.mlp.hook_post": (3, 6, 16),
        "blocks.1.attn.hook_z": (3, 6, 2, 4),
        "blocks.0.hook_resid_pre": (3, 6, 8),
        "blocks.1.attn.hook_v": (3, 6, 2, 4),
    }
    assert active_hook_count(micro) == 0


def test_the_projectors_made_hook_point_is_refused_on_a_model_without_one(micro, micro_tokens) -> None:
    """``vision_projector.hook_hidden`` is made from a LLaVA projector's act module (tests/test_multimodal_organism
    checks it there); a text model, bridge or HookedTransformer, has none: a clear error, no hook left behind."""
    with pytest.raises(ValueError, match="made from a LLaVA-style projector's act module"):
        with hooked(micro, [("blocks.0.mlp.hook_post", lambda a, hook: a), ("vision_projector.hook_hidden", print)]):
            pass
    assert active_hook_count(micro) == 0
    with capturing(micro, ["blocks.0.mlp.hook_post"]) as store:
        micro(micro_tokens)
    assert tuple(store["blocks.0.mlp.hook_post"].shape) == (3, 6, 16)
