"""One loading path: dtype policy, adapter/base check, merged-model cache, one load per process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.experiment import Experiment, VariantSpec, load_experiment
from services.attribution import runtime as rt_mod
from services.attribution.loading import (
    AdapterMismatch,
    check_adapter_base,
    merge_adapter,
    merged_digest,
    resolve_device,
    resolve_dtype,
)
from tests.fixtures.tiny import BASE_NAME, PROMPTS


def _with(exp: Experiment, **update: object) -> Experiment:
    return exp.model_copy(update=update)


def test_dtype_policy(tiny_exp: Experiment) -> None:
    cpu = torch.device("cpu")
    assert resolve_device(tiny_exp) == cpu
    assert resolve_dtype(_with(tiny_exp, dtype="auto"), cpu) == torch.float32
    assert resolve_dtype(_with(tiny_exp, dtype="auto"), torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(_with(tiny_exp, dtype="bfloat16"), cpu) == torch.bfloat16
    with pytest.warns(RuntimeWarning, match="fp16 overflows"):
        assert resolve_dtype(_with(tiny_exp, dtype="float16"), cpu) == torch.float16


def test_adapter_base_matching(tiny_dir: Path, tmp_path: Path) -> None:
    adapter, base = tiny_dir / "adapter", tiny_dir / "base"
    # recorded "emc/tiny-base" == the configured local dir's config _name_or_path
    check_adapter_base(adapter, str(base), "adapted")
    # same string
    check_adapter_base(adapter, BASE_NAME, "adapted")
    # recorded as a path that resolves to the configured directory
    other = tmp_path / "adapter"
    shutil.copytree(adapter, other)
    cfg = other / "adapter_config.json"
    raw = json.loads(cfg.read_text())
    raw["base_model_name_or_path"] = str(base / ".." / "base")
    cfg.write_text(json.dumps(raw))
    check_adapter_base(other, str(base), "adapted")
    # a different base is refused, and the message names both and the fix
    raw["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    cfg.write_text(json.dumps(raw))
    with pytest.raises(AdapterMismatch) as e:
        check_adapter_base(other, str(base), "adapted")
    msg = str(e.value)
    assert "meta-llama/Llama-3.2-1B" in msg and str(base) in msg and "variants.adapted" in msg


def test_mismatched_adapter_refused_before_merge(tiny_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "adapter"
    shutil.copytree(tiny_dir / "adapter", other)
    cfg = other / "adapter_config.json"
    raw = json.loads(cfg.read_text())
    raw["base_model_name_or_path"] = "emc/some-other-base"
    cfg.write_text(json.dumps(raw))
    spec = VariantSpec(model=str(tiny_dir / "base"), adapter=str(other))
    with pytest.raises(AdapterMismatch, match="emc/some-other-base"):
        merge_adapter(spec, "adapted", tmp_path / "cache")
    assert not (tmp_path / "cache" / "merged" / merged_digest(spec)).exists()


def test_merged_model_is_cached_and_equals_peft(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = VariantSpec(model=str(tiny_dir / "base"), adapter=str(tiny_dir / "adapter"))
    cache = tmp_path / "cache"
    first = merge_adapter(spec, "adapted", cache)
    assert first == cache / "merged" / merged_digest(spec)
    stamp = (first / "emc-merge.json").stat().st_mtime_ns
    again = merge_adapter(spec, "adapted", cache)
    assert again == first and (first / "emc-merge.json").stat().st_mtime_ns == stamp
    meta = json.loads((first / "emc-merge.json").read_text())
    assert meta["adapter"] == spec.adapter and meta["base"] == spec.model

    x = torch.tensor([[0, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(first)(x).logits
        peft = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(spec.model), str(spec.adapter)
        )(x).logits
        base = AutoModelForCausalLM.from_pretrained(spec.model)(x).logits
    assert torch.allclose(merged, peft, atol=1e-4)
    assert not torch.allclose(merged, base, atol=1e-2)  # the adapter does something

    # a changed adapter is a different cache entry
    changed = tmp_path / "adapter2"
    shutil.copytree(tiny_dir / "adapter", changed)
    (changed / "README.md").write_text("retrained\n")
    assert merged_digest(VariantSpec(model=spec.model, adapter=str(changed))) != merged_digest(spec)


def test_each_variant_loads_once_per_process(tiny_exp: Experiment, model_cache: Path) -> None:
    rt_mod.clear_cache()
    a = rt_mod.get_runtime(tiny_exp, cache_dir=model_cache)
    b = rt_mod.Runtime(tiny_exp, cache_dir=model_cache)
    assert rt_mod.get_runtime(tiny_exp) is a
    for _ in range(2):
        for prompt in PROMPTS[:2]:
            a.top_k(prompt, "adapted")
            b.top_k(prompt, "adapted")
    assert a.variant("adapted").model is b.variant("adapted").model
    assert rt_mod.LOAD_COUNTS[(a.fingerprint, "adapted")] == 1
    assert a.variant("base").model is not a.variant("adapted").model
    # one transcoder set per process and experiment, shared by the variants
    assert (
        a.variant("base").model.transcoders._module
        is a.variant("adapted").model.transcoders._module
    )
    assert rt_mod.LOAD_COUNTS[(a.fingerprint, "base")] == 1
    assert a.variant("adapted").model_dir.startswith(str(model_cache / "merged"))
    assert a.variant("base").model_dir == tiny_exp.variants["base"].model


def test_unknown_variant_and_missing_transcoders(tiny_dir: Path, tmp_path: Path) -> None:
    exp = load_experiment(tiny_dir / "experiment.yaml")
    rt = rt_mod.Runtime(exp, cache_dir=tmp_path)
    with pytest.raises(KeyError, match="variant 'nope'"):
        rt.variant("nope")
    broken = exp.model_copy(
        update={"transcoders": exp.transcoders.model_copy(update={"path": str(tmp_path / "x")})}
    )
    with pytest.raises(FileNotFoundError, match="transcoder directory"):
        rt_mod.Runtime(broken, fingerprint="broken", cache_dir=tmp_path).variant("base")
