"""Runtime: top-k logits and graphs agree (same model, same tokens), continuations, interventions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.experiment import Experiment
from services.attribution import interventions as iv
from services.attribution.runtime import Runtime, sample_continuations


@pytest.fixture(scope="module")
def topk_rt(env_exp: Experiment, model_cache: Path) -> Runtime:
    """The experiment with attribution limits that make the graph's logit set the top-k."""
    lim = env_exp.attribution.model_copy(
        update={"max_n_logits": env_exp.top_k, "desired_logit_prob": 1.0}
    )
    return Runtime(env_exp.model_copy(update={"attribution": lim}), cache_dir=model_cache)


def test_graph_logits_are_the_stored_top_k(topk_rt: Runtime, env_prompts: list[str]) -> None:
    for prompt in env_prompts[:1]:
        for variant in topk_rt.exp.variant_names:
            tk = topk_rt.top_k(prompt, variant)
            g = topk_rt.attribute(prompt, variant).manifest
            assert tk.fingerprint == g.fingerprint == topk_rt.fingerprint
            assert g.input_ids == tk.input_ids
            assert tk.input_ids[0] == topk_rt.variant(variant).tokenizer.bos_token_id
            assert len(tk.tokens) == topk_rt.exp.top_k
            assert g.logit_token_ids == [t.token_id for t in tk.tokens]
            assert g.logit_tokens == [t.token for t in tk.tokens]
            for p, t in zip(g.logit_probabilities, tk.tokens, strict=True):
                assert abs(p - t.prob) < 1e-4
            # explicit targets (the stored top-k) give the same logit nodes
            ids = [t.token_id for t in tk.tokens]
            g2 = topk_rt.attribute(prompt, variant, target_token_ids=ids).manifest
            assert g2.logit_token_ids == ids
            assert (
                max(
                    abs(a - b)
                    for a, b in zip(g2.logit_probabilities, g.logit_probabilities, strict=True)
                )
                < 1e-6
            )


def test_default_limits_come_from_the_experiment(env_rt: Runtime, env_prompts: list[str]) -> None:
    g = env_rt.attribute(env_prompts[0], env_rt.exp.reference).manifest
    lim = env_rt.exp.attribution
    assert g.n_features <= lim.max_feature_nodes and g.n_logits <= lim.max_n_logits
    assert g.limits["max_feature_nodes"] == lim.max_feature_nodes
    assert g.limits["desired_logit_prob"] == lim.desired_logit_prob
    assert sum(g.logit_probabilities) >= lim.desired_logit_prob or g.n_logits == lim.max_n_logits


def test_sample_continuations(env_rt: Runtime, env_prompts: list[str]) -> None:
    prompt, variant = env_prompts[0], env_rt.exp.variant_names[-1]
    token = env_rt.top_k(prompt, variant).tokens[0].token_id
    a = sample_continuations(env_rt, prompt, variant, token, 4, 8, 2.0, seed=7)
    b = sample_continuations(env_rt, prompt, variant, token, 4, 8, 2.0, seed=7)
    c = sample_continuations(env_rt, prompt, variant, token, 4, 8, 2.0, seed=8)
    assert a == b and len(a) == 4 and all(isinstance(s, str) for s in a)
    assert len(set(a) | set(c)) > 1  # sampling, not a constant
    greedy = sample_continuations(env_rt, prompt, variant, token, 2, 8, 0.0, seed=0)
    assert greedy[0] == greedy[1] and greedy[0].strip()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample_continuations(env_rt, prompt, variant, 10**9, 1, 4, 1.0, seed=0)


def test_interventions(env_rt: Runtime, env_prompts: list[str]) -> None:
    variant = env_rt.exp.variant_names[-1]
    graph = env_rt.attribute(env_prompts[0], variant)
    ids = graph.manifest.input_ids
    clean = iv.intervene_logits(env_rt, variant, ids, [])
    tk = env_rt.top_k(env_prompts[0], variant)
    assert abs(float(clean[tk.tokens[0].token_id]) - tk.tokens[0].prob) < 1e-5
    # the graph's features have the graph's activations
    feats = [tuple(int(x) for x in f) for f in graph.features[:5].tolist()]
    acts = iv.feature_activations(env_rt, variant, ids, feats)  # type: ignore[arg-type]
    assert torch.allclose(torch.tensor(acts), graph.activations[:5], rtol=1e-4, atol=1e-5)
    # setting features to their own values changes nothing
    same = iv.scaled(env_rt, variant, ids, feats, 1.0)  # type: ignore[arg-type]
    assert torch.allclose(iv.intervene_logits(env_rt, variant, ids, same), clean, atol=1e-5)
    # ablating the most active features changes the prediction; scaling by 0 == setting 0
    # transcoder features only: an adapter node (feature id < 0) is not settable
    acts = graph.activations.masked_fill(graph.features[:, 2] < 0, float("-inf"))
    top = torch.argsort(acts, descending=True)[:10].tolist()
    strong = [tuple(int(x) for x in graph.features[i].tolist()) for i in top]
    ablated = iv.intervene_logits(env_rt, variant, ids, [(la, p, f, 0.0) for la, p, f in strong])
    assert float((ablated - clean).abs().max()) > 1e-3
    zero = iv.scaled(env_rt, variant, ids, strong, 0.0)  # type: ignore[arg-type]
    assert torch.allclose(iv.intervene_logits(env_rt, variant, ids, zero), ablated, atol=1e-6)
    with pytest.raises(ValueError, match="position"):
        iv.intervene_logits(env_rt, variant, ids, [(0, len(ids), 0, 1.0)])


def test_steered_generate(env_rt: Runtime, env_prompts: list[str]) -> None:
    variant = env_rt.exp.variant_names[-1]
    graph = env_rt.attribute(env_prompts[0], variant)
    ids = graph.manifest.input_ids
    plain = iv.steered_generate(env_rt, variant, ids, [], n=2, max_new_tokens=6, seed=3)
    assert plain == iv.steered_generate(env_rt, variant, ids, [], n=2, max_new_tokens=6, seed=3)
    top = int(torch.argmax(graph.activations.masked_fill(graph.features[:, 2] < 0, -1.0)))
    layer, pos, feat = (int(x) for x in graph.features[top].tolist())
    big = 20.0 * float(graph.activations[top])
    steered = iv.steered_generate(
        env_rt, variant, ids, [(layer, slice(pos, None), feat, big)], n=2, max_new_tokens=6, seed=3
    )
    assert len(steered) == 2 and steered != plain
