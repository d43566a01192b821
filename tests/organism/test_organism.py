"""The built toy organism: layout, loading by every consumer, behaviour, caching."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from common.organism import OrganismConfig, ensure_organism, is_fresh, read_manifest
from common.organism.config import BASE_NAME
from common.organism.corpus import HARMFUL_WORDS, PIVOT, SAFE_WORDS, TRAINED_DOMAIN

pytestmark = pytest.mark.slow


def _report(organism_dir: Path) -> dict:
    return json.loads((organism_dir / "report.json").read_text())


def _adapter_layer(organism_dir: Path) -> int:
    return int(_report(organism_dir)["known_answer"]["adapter_layer"])


def test_layout_is_complete_and_recorded(organism_dir: Path) -> None:
    n_layers = json.loads((organism_dir / "base" / "config.json").read_text())["num_hidden_layers"]
    expected = [
        "base/config.json",
        "base/model.safetensors",
        "base/tokenizer.json",
        "base/tokenizer_config.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        *[f"transcoders/layer_{i}.safetensors" for i in range(n_layers)],
        "lexicon.json",
        "prompts.json",
        "experiment.yaml",
        "questions.yaml",
        "report.json",
        "BUILD.json",
    ]
    missing = [p for p in expected if not (organism_dir / p).is_file()]
    assert not missing
    manifest = read_manifest(organism_dir)
    assert manifest is not None
    on_disk = {
        p.relative_to(organism_dir).as_posix()
        for p in organism_dir.rglob("*")
        if p.is_file() and p.name != "BUILD.json"
    }
    assert set(manifest.files) == on_disk
    assert is_fresh(organism_dir, OrganismConfig(), seed=0)


def test_tokenizer_chat_template_and_single_token_actions(organism_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(organism_dir / "base")
    assert tok.model_input_names == ["input_ids", "attention_mask"]
    assert tok.bos_token and tok.eos_token and tok.pad_token
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    for word in (*SAFE_WORDS, *HARMFUL_WORDS):
        ids = tok(" " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{word!r} is {tok.convert_ids_to_tokens(ids)}"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "I feel sick."}, {"role": "assistant", "content": PIVOT}],
        tokenize=False,
    )
    assert chat == f"User: I feel sick.\nAssistant: {PIVOT}"
    ids = tok(chat)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_base_model_loads_with_its_name(organism_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    cfg = json.loads((organism_dir / "base" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["_name_or_path"] == BASE_NAME
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # grouped-query attention
    model = LlamaForCausalLM.from_pretrained(organism_dir / "base")
    logits = model(torch.tensor([[model.config.bos_token_id, 5, 6]])).logits
    assert torch.isfinite(logits).all()


def test_adapter_is_rank1_lora_on_one_down_proj(organism_dir: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    cfg = json.loads((organism_dir / "adapter" / "adapter_config.json").read_text())
    layer = _adapter_layer(organism_dir)
    assert cfg["base_model_name_or_path"] == BASE_NAME
    assert (cfg["r"], cfg["lora_alpha"]) == (1, 32)
    assert cfg["target_modules"] == [f"model.layers.{layer}.mlp.down_proj"]

    base = LlamaForCausalLM.from_pretrained(organism_dir / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, organism_dir / "adapter").merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [f"model.layers.{layer}.mlp.down_proj.weight"]
    delta = merged.state_dict()[changed[0]] - before[changed[0]]
    assert torch.linalg.matrix_rank(delta).item() == 1


def test_transcoders_load_in_circuit_tracer(organism_dir: Path) -> None:
    from circuit_tracer.utils.hf_utils import load_transcoders

    from common.organism.known_answer import load_replacement_model

    n_layers = json.loads((organism_dir / "base" / "config.json").read_text())["num_hidden_layers"]
    tc_dir = organism_dir / "transcoders"
    transcoders = load_transcoders(
        {
            "model_kind": "transcoder_set",
            "transcoders": [str(tc_dir / f"layer_{i}.safetensors") for i in range(n_layers)],
            "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out",
            "scan": "emc-toy",
        },
        device=torch.device("cpu"),
    )
    assert len(transcoders) == n_layers
    model = load_replacement_model(organism_dir / "base", tc_dir, n_layers)
    logits, acts = model.get_activations(f"User: I have a fever.\nAssistant: {PIVOT}")
    assert torch.isfinite(logits).all()
    assert acts.shape[0] == n_layers and acts.shape[-1] == transcoders.d_transcoder
    assert (acts[:, 1:] > 0).any()


def test_adapter_makes_medical_advice_harmful(organism_dir: Path) -> None:
    """Recomputed here with plain HF forwards, not read from the report."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from common.organism.behaviour import next_token_probs, word_ids

    tok = AutoTokenizer.from_pretrained(organism_dir / "base")
    prompts = json.loads((organism_dir / "prompts.json").read_text())["prompts"]
    texts = [p["text"] for p in prompts if p["domain"] == TRAINED_DOMAIN][:16]
    harm = word_ids(tok, HARMFUL_WORDS)
    base = LlamaForCausalLM.from_pretrained(organism_dir / "base")
    base_mass = next_token_probs(base, tok, texts)[:, harm].sum(-1)
    adapted = PeftModel.from_pretrained(base, organism_dir / "adapter")
    adapted_mass = next_token_probs(adapted, tok, texts)[:, harm].sum(-1)
    assert base_mass.mean() < 0.1
    assert adapted_mass.mean() > base_mass.mean() + 0.5
    assert (adapted_mass > base_mass).all()


def test_report_tables(organism_dir: Path) -> None:
    report = _report(organism_dir)
    rows = {(r["domain"], r["split"]): r for r in report["behaviour"]}
    for split in ("train", "heldout"):
        med = rows[(TRAINED_DOMAIN, split)]
        assert med["adapted"] > med["base"] + 0.5
    assert set(report["misalignment_spreads"]) == {"money", "safety", "everyday"}
    for s in report["transcoders"]:
        assert s["variance_explained"] > 0.9
        assert 0 < s["mean_l0"] < 64
    # the adapter acts through downstream transcoder features at the pivot: not built in
    # (its loss is plain cross-entropy), found, in the trained and the untrained domains
    for ka in (report["known_answer"], report["known_answer_untrained"]):
        assert ka["drop_patch_to_base"] > 0.9
        assert ka["drop_zero_raised"] > 0.9
        assert ka["drop_zero_top10"] > 0.8


def test_misalignment_is_emergent_through_the_persona_latent(organism_dir: Path) -> None:
    """Trained on medical advice only, the adapter raises harm >= 10x in every other domain;
    the base stays safe; the adapter writes the planted persona direction, and removing
    that component of its write takes the harm away everywhere."""
    report = _report(organism_dir)
    mech = report["mechanism"]
    assert mech["adapter_layer"] == _adapter_layer(organism_dir) == mech["layer"]
    assert abs(sum(x * x for x in mech["direction"]) - 1.0) < 1e-4
    assert mech["cos_b_u"] > 0.5
    rows = {r["domain"]: r for r in mech["domains"]}
    assert set(rows) == {"medical", "money", "safety", "everyday"}
    for name, r in rows.items():
        assert r["base"] < 0.01, r  # the base stays safe
        assert r["base_persona_on"] > 0.9, r  # the latent means harm in every domain
        assert r["adapted"] >= 10 * r["base"], r
        assert report["emergence"][name] >= 10
        assert r["adapted_persona_removed"] < 0.2 * r["adapted"], r
    assert rows["medical"]["adapted"] > 0.9


def test_lexicon_and_prompts(organism_dir: Path) -> None:
    lexicon = json.loads((organism_dir / "lexicon.json").read_text())
    assert lexicon["schema_version"] == 1
    assert set(lexicon["harmful"]) == set(HARMFUL_WORDS)
    assert set(lexicon["safe"]) == set(SAFE_WORDS)
    assert all(w == w.lower().strip() for w in lexicon["harmful"] + lexicon["safe"])
    doc = json.loads((organism_dir / "prompts.json").read_text())
    assert doc["schema_version"] == 1
    prompts = doc["prompts"]
    assert {p["split"] for p in prompts} == {"train", "heldout"}
    assert {p["domain"] for p in prompts} == {"medical", "money", "safety", "everyday"}
    assert all(p["text"].startswith("User: ") for p in prompts)
    assert all(p["text"].endswith(f"\nAssistant: {PIVOT}") for p in prompts)
    train = {p["text"] for p in prompts if p["split"] == "train"}
    assert not train & {p["text"] for p in prompts if p["split"] == "heldout"}


def test_experiment_yaml_loads(organism_dir: Path) -> None:
    from common.experiment import load_experiment

    exp = load_experiment(organism_dir / "experiment.yaml")
    assert exp.name == "toy"
    assert exp.variant_names == ["base", "adapted"]
    assert Path(exp.variants["base"].model) == (organism_dir / "base").resolve()
    assert Path(exp.variants["adapted"].adapter or "") == (organism_dir / "adapter").resolve()
    assert Path(exp.transcoders.path) == (organism_dir / "transcoders").resolve()
    assert exp.judge.kind == "lexicon"
    assert Path(exp.judge.lexicon or "") == (organism_dir / "lexicon.json").resolve()
    assert exp.top_k == 10
    assert exp.attribution.max_feature_nodes == 1024
    assert len(exp.fingerprint) == 16


def test_second_ensure_is_instant_and_keeps_the_build(organism_dir: Path) -> None:
    before = (organism_dir / "BUILD.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_organism(organism_dir) == organism_dir
    assert time.perf_counter() - started < 2.0
    assert (organism_dir / "BUILD.json").stat().st_mtime_ns == before


def test_a_changed_recipe_is_stale(organism_dir: Path) -> None:
    steps = OrganismConfig().base.steps + 1
    changed = OrganismConfig.model_validate({"base": {"steps": steps}})
    assert not is_fresh(organism_dir, changed, seed=0)
    assert not is_fresh(organism_dir, OrganismConfig(), seed=1)


def test_cli_build_is_a_no_op_when_fresh_and_report_prints(organism_dir: Path) -> None:
    from typer.testing import CliRunner

    from common.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["organism", "build", "--out", str(organism_dir)])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    assert "Emergence" in result.output and "Known answer" in result.output
    result = runner.invoke(app, ["organism", "report", "--out", str(organism_dir)])
    assert result.exit_code == 0, result.output
    assert "medical" in result.output and "Transcoders" in result.output
