"""Build mechanics on a tiny recipe (seconds): determinism, atomicity, caching."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from common.organism import OrganismConfig, build_organism, ensure_organism, is_fresh
from common.organism import build as build_module

WEIGHTS = (
    "base/model.safetensors",
    "adapter/adapter_model.safetensors",
    "transcoders/layer_0.safetensors",
    "transcoders/layer_1.safetensors",
)


def tiny() -> OrganismConfig:
    """Same code path as the real build, with a 2-layer model and a few steps of each stage."""
    return OrganismConfig.model_validate(
        {
            "model": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            },
            "base": {"n_dialogues": 256, "steps": 6, "batch_size": 16},
            "adapter": {"layer": 0, "n_dialogues": 64, "steps": 4, "batch_size": 8},
            "transcoders": {"d_transcoder": 32, "n_tokens": 2000, "steps": 5, "batch_size": 256},
            "prompts_per_domain_train": 2,
            "known_answer_prompts": 0,
            "min_medical_gain": -1.0,
        }
    )


def _digests(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in WEIGHTS}


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    build_organism(tmp_path / "a", seed=0, progress=False, config=tiny())
    build_organism(tmp_path / "b", seed=0, progress=False, config=tiny())
    build_organism(tmp_path / "c", seed=1, progress=False, config=tiny())
    a, b, c = (_digests(tmp_path / x) for x in "abc")
    assert a == b
    assert all(a[k] != c[k] for k in WEIGHTS)


def test_ensure_builds_once_then_reuses(tmp_path: Path) -> None:
    out = tmp_path / "org"
    assert not is_fresh(out, tiny(), seed=0)
    assert ensure_organism(out, config=tiny(), progress=False) == out
    assert is_fresh(out, tiny(), seed=0)
    stamp = (out / "BUILD.json").stat().st_mtime_ns
    ensure_organism(out, config=tiny(), progress=False)
    assert (out / "BUILD.json").stat().st_mtime_ns == stamp
    ensure_organism(out, config=tiny(), progress=False, force=True)
    assert (out / "BUILD.json").stat().st_mtime_ns != stamp


def test_interrupted_build_leaves_the_previous_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "org"
    build_organism(out, progress=False, config=tiny())
    manifest = (out / "BUILD.json").read_bytes()

    def broken(tmp: Path, *args: object) -> None:
        (tmp / "base").mkdir()
        (tmp / "base" / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if the user pressed ctrl-c mid-build

    monkeypatch.setattr(build_module, "_build_into", broken)
    with pytest.raises(KeyboardInterrupt):
        build_organism(out, progress=False, config=tiny())
    assert (out / "BUILD.json").read_bytes() == manifest
    assert is_fresh(out, tiny(), seed=0)
    assert not list(tmp_path.glob(".org.build-*"))


def test_directory_without_manifest_is_not_a_build(tmp_path: Path) -> None:
    out = tmp_path / "org"
    (out / "base").mkdir(parents=True)
    (out / "base" / "config.json").write_text("{}")
    assert not is_fresh(out, tiny(), seed=0)
