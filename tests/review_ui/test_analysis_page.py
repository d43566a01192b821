"""The analysis page shows each ranking's score shares (with the error-node flag) and the
base-vs-adapted diff ranking; the prompt page never reads the rankings."""

from __future__ import annotations

from typing import Any

from common.diff import prompt_diff
from common.experiment import Experiment
from common.records import FeatureRanking, LayerShares, RankedFeature, ScoreShares
from common.store import FsStore
from common.store import keys as K
from tests.fixtures.data import Seeded
from tests.review_ui.conftest import Auth


def ranking(pid: str, exp: Experiment, variant: str, score: float, errors: float) -> FeatureRanking:
    flag = (
        f"error nodes of layer 1 carry {errors:+.0%} of the score, more than the features of "
        "any layer"
        if errors > 0.5
        else None
    )
    return FeatureRanking(
        prompt_id=pid,
        variant=variant,
        fingerprint=exp.fingerprint,
        labels_version="abc",
        label_source="judge",
        evil_token_ids=[1],
        safe_token_ids=[2],
        features=[
            RankedFeature(
                layer=2,
                pos=7,
                feature=4321,
                token=" allergy",
                score=score,
                evil=score,
                safe=0.0,
                activation=3.5,
            ),
            RankedFeature(
                layer=0,
                pos=3,
                feature=17,
                token=" safe",
                score=-0.01,
                evil=0.0,
                safe=0.01,
                activation=1.0,
            ),
        ],
        shares=ScoreShares(
            total=0.2,
            tokens=0.25,
            errors=errors,
            adapter=0.0,
            top_feature=score / 0.2,
            layers=[
                LayerShares(layer=0, features=-0.05, errors=0.0),
                LayerShares(layer=1, features=0.0, errors=errors),
                LayerShares(layer=2, features=score / 0.2, errors=0.0),
            ],
            flag=flag,
        ),
    )


def test_analysis_page_shows_shares_flag_and_diff(
    client: Any, auth: Auth, seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    auth.login()
    p = seeded["divergent"]
    fp = experiment.fingerprint
    adapted = ranking(p.pid, experiment, "adapted", 0.03, 0.7)
    store.put_json(K.features(experiment.name, p.pid, fp, "adapted"), adapted)
    html = client.get(f"/p/{p.pid}/analysis").get_data(as_text=True)
    assert "Where the score goes" in html and "error nodes of layer 1 carry +70%" in html
    assert "What changed from" not in html  # no base ranking: no diff
    base = ranking(p.pid, experiment, "base", 0.005, 0.1)
    store.put_json(K.features(experiment.name, p.pid, fp, "base"), base)
    html = client.get(f"/p/{p.pid}/analysis").get_data(as_text=True)
    assert "What changed from base to adapted" in html
    diff = prompt_diff(base, adapted)
    top = diff.nodes[0]
    assert top.label == "L1 errors"  # 0.14 - 0.02: the largest change
    assert f"<code>{top.label}</code>" in html and f"{top.change:+.4f}" in html
    assert html.index("<code>L1 errors</code>") < html.index("<code>L2/F4321@7</code>")


def test_prompt_page_does_not_read_the_rankings(
    client: Any, auth: Auth, seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    auth.login()
    p = seeded["divergent"]
    key = K.features(experiment.name, p.pid, experiment.fingerprint, "adapted")
    store.put_bytes(key, b"{ not a ranking")  # parsing it would fail the page
    assert client.get(f"/p/{p.pid}").status_code == 200
    assert client.get(f"/api/p/{p.pid}").status_code == 200
    assert client.get(f"/p/{p.pid}/analysis").status_code != 200  # this page does read it


def test_analysis_page_reads_the_digests(
    client: Any, auth: Auth, seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    """With digests stored the page shows them and never parses the whole rankings."""
    from common.records import RankingDigest

    auth.login()
    p = seeded["divergent"]
    fp = experiment.fingerprint
    for variant, score, errors in (("adapted", 0.03, 0.7), ("base", 0.005, 0.1)):
        r = ranking(p.pid, experiment, variant, score, errors)
        store.put_json(K.features_digest(experiment.name, p.pid, fp, variant), RankingDigest.of(r))
        store.put_bytes(K.features(experiment.name, p.pid, fp, variant), b"{ not read")
    html = client.get(f"/p/{p.pid}/analysis").get_data(as_text=True)
    assert "What changed from base to adapted" in html and "<code>L1 errors</code>" in html
    assert "Where the score goes" in html and "error nodes of layer 1 carry +70%" in html
