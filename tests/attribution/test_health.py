"""Health checks: a broken layer fails the prompt with a reason that names it, never zeros."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common.errors import PromptFailure
from common.experiment import Experiment
from services.attribution.health import HealthReport, LayerStat, check_adjacency, check_forward
from services.attribution.runtime import Runtime
from tests.fixtures.tiny import PROMPTS


@pytest.fixture(scope="module")
def sick_rt(tiny_exp: Experiment, model_cache: Path) -> Iterator[Runtime]:
    """A runtime with its own copy of the base model (its own fingerprint key) to break."""
    yield Runtime(tiny_exp, fingerprint="health-test", cache_dir=model_cache)


def test_inf_injected_in_layer_fails_with_layer_name(sick_rt: Runtime) -> None:
    hf = sick_rt.variant("base").model._model
    mlp = hf.model.layers[2].mlp
    handle = mlp.register_forward_hook(lambda m, i, o: torch.full_like(o, math.inf))
    try:
        with pytest.raises(PromptFailure) as e:
            sick_rt.attribute(PROMPTS[0], "base")
    finally:
        handle.remove()
    f = e.value
    assert f.step == "attribution" and f.variant == "base"
    assert f.reason.startswith("non-finite activations at layer 2 (mlp.hook_out), max |x| = inf")
    assert "dtype float32" in f.reason
    assert f.to_record().prompt_id == f.prompt_id and f.prompt_id
    # healthy again once the hook is gone
    sick_rt.top_k(PROMPTS[0], "base")


def test_exploding_weights_fail_top_k_and_attribution(sick_rt: Runtime) -> None:
    hf = sick_rt.variant("base").model._model
    w = hf.model.layers[1].mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1e30)
        for call in (sick_rt.top_k, sick_rt.attribute):
            with pytest.raises(PromptFailure) as e:
                call(PROMPTS[1], "base")
            assert "at layer 1 (mlp.hook_out)" in e.value.reason
            assert "exploding activations" in e.value.reason or "non-finite" in e.value.reason
            assert "max_activation_norm" in e.value.reason or "inf" in e.value.reason
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_fp16_reason_and_norm_limit() -> None:
    report = HealthReport(
        dtype=torch.float16,
        stats=[
            LayerStat(0, "mlp.hook_out", 3.0, 5.0, 1, True),
            LayerStat(2, "hook_resid_post", math.inf, math.inf, 3, False),
        ],
    )
    with pytest.raises(PromptFailure) as e:
        check_forward(report, torch.zeros(4), max_norm=1e4, variant="adapted")
    assert e.value.reason == (
        "non-finite activations at layer 2 (hook_resid_post), max |x| = inf, dtype float16: "
        "fp16 overflows here, use bfloat16 or float32"
    )
    # the first layer over the norm limit is the one reported
    with pytest.raises(PromptFailure, match=r"exploding activations at layer 0 \(mlp.hook_out\)"):
        check_forward(report, torch.zeros(4), max_norm=4.0)
    with pytest.raises(PromptFailure, match="non-finite logits"):
        check_forward(
            HealthReport(torch.float32, [report.stats[0]]),
            torch.tensor([math.nan]),
            max_norm=10.0,
        )


def test_adjacency_checks() -> None:
    a = torch.zeros(6, 6)
    a[-1, 0] = 1.0
    check_adjacency(a, torch.ones(2), 1)
    bad = a.clone()
    bad[2, 1] = math.nan
    with pytest.raises(PromptFailure, match="1 non-finite edges"):
        check_adjacency(bad, torch.ones(2), 1)
    with pytest.raises(PromptFailure, match="no edge reaches any logit"):
        check_adjacency(torch.zeros(6, 6), torch.ones(2), 1)
    with pytest.raises(PromptFailure, match="non-finite transcoder feature activations"):
        check_adjacency(a, torch.tensor([1.0, math.inf]), 1)
