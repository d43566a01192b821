from __future__ import annotations

from pathlib import Path

import pytest

from common.experiment import ExperimentError, fingerprint, load_experiment


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


@pytest.fixture
def model_dirs(tmp_path: Path) -> Path:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"a": 1}')
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "tc").mkdir()
    (tmp_path / "tc" / "layer_0.safetensors").write_bytes(b"\x01" * 10)
    return tmp_path


BASIC = """
name: toy
variants:
  base: {model: base}
  adapted: {model: base, adapter: adapter}
transcoders: {path: tc}
top_k: 5
"""


def test_relative_paths_resolve_against_the_file(model_dirs: Path) -> None:
    exp = load_experiment(write(model_dirs, BASIC))
    assert exp.variants["adapted"].adapter == str(model_dirs / "adapter")
    assert exp.transcoders.path == str(model_dirs / "tc")
    assert exp.variant_names == ["base", "adapted"]


def test_hub_names_stay_names(tmp_path: Path) -> None:
    exp = load_experiment(
        write(
            tmp_path,
            "name: x\nvariants: {base: {model: meta-llama/Llama-3.2-1B-Instruct}}\n"
            "transcoders: hf://mntss/transcoder-Llama-3.2-1B\n",
        )
    )
    assert exp.variants["base"].model == "meta-llama/Llama-3.2-1B-Instruct"
    assert exp.transcoders.path == "hf://mntss/transcoder-Llama-3.2-1B"


def test_validation_errors_name_field_and_fix(model_dirs: Path) -> None:
    with pytest.raises(ExperimentError) as e:
        load_experiment(write(model_dirs, BASIC.replace("top_k: 5", "top_k: 0\ndtype: fp8")))
    msg = str(e.value)
    assert "top_k" in msg and "dtype" in msg
    with pytest.raises(ExperimentError, match="reference variant 'base'"):
        load_experiment(
            write(model_dirs, "name: t\nvariants: {a: {model: base}}\ntranscoders: tc\n")
        )
    with pytest.raises(ExperimentError, match="does not exist"):
        load_experiment(model_dirs / "missing.yaml")
    with pytest.raises(ExperimentError, match="bogus"):
        load_experiment(write(model_dirs, BASIC + "bogus: 1\n"))


def test_fingerprint_tracks_content_not_location(model_dirs: Path, tmp_path_factory) -> None:
    exp = load_experiment(write(model_dirs, BASIC))
    fp = fingerprint(exp)
    assert len(fp) == 16
    # same content elsewhere: same fingerprint
    other = tmp_path_factory.mktemp("moved")
    for d in ("base", "adapter", "tc"):
        (other / d).mkdir()
        for f in (model_dirs / d).iterdir():
            (other / d / f.name).write_bytes(f.read_bytes())
    assert fingerprint(load_experiment(write(other, BASIC))) == fp
    # retrained adapter: new fingerprint
    (model_dirs / "adapter" / "adapter_model.safetensors").write_bytes(b"\x02" * 10)
    assert fingerprint(load_experiment(write(model_dirs, BASIC))) != fp
    # a number-changing setting: new fingerprint; a judge setting: same
    (model_dirs / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert fingerprint(load_experiment(write(model_dirs, BASIC + "dtype: bfloat16\n"))) != fp
    judged = BASIC + "judge: {kind: openai, model: gpt-4o}\n"
    assert fingerprint(load_experiment(write(model_dirs, judged))) == fp


def test_review_settings_resolve_the_guide_and_leave_the_fingerprint(model_dirs: Path) -> None:
    plain = load_experiment(write(model_dirs, BASIC))
    assert (plain.review.overlap, plain.review.guidelines) == (0.0, None)
    (model_dirs / "guide.md").write_text("# guide\n")
    team = load_experiment(
        write(model_dirs, BASIC + "review: {overlap: 0.1, claim_s: 120, guidelines: guide.md}\n")
    )
    assert team.review.guidelines == str((model_dirs / "guide.md").resolve())
    assert (team.review.overlap, team.review.claim_s) == (0.1, 120)
    assert fingerprint(team) == fingerprint(plain)  # who reviews changes no number
    with pytest.raises(ExperimentError, match=r"review\.overlap"):
        load_experiment(write(model_dirs, BASIC + "review: {overlap: 1.5}\n"))
