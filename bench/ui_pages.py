"""The review UI's prompt page and analysis page with two 8192-feature rankings stored.

A prompt with logits and verdicts for both variants and a :class:`FeatureRanking` of
``--features`` rows per variant, a real Redis, the Flask app through its test client
(logged in). Prints the median answer time of the prompt page (goal < 50 ms) and of the
analysis page (from the rankings' digests), and, as the baselines in the same run, the
prompt page's loader as it was (reading both rankings it never shows) and the analysis page
with no digests stored (reading both whole rankings).

    python bench/ui_pages.py [--features 8192] [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--features", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)

    import random

    import redis

    from common.celery_app import make_app
    from common.records import FeatureRanking, RankedFeature, RankingDigest
    from common.settings import Settings, StoreSettings
    from common.store import FsStore
    from common.store import keys as K
    from common.system.broker import start_redis_server
    from services.review_ui import create_app
    from services.review_ui.context import ReviewContext
    from services.review_ui.review import load_prompt_view
    from services.review_ui.users import add_user
    from tests.fixtures.data import DIVERGENT, TEXT_DIVERGENT, seed_prompt, write_experiment
    from tests.fixtures.servers import free_port
    from tests.review_ui.conftest import PASSWORD, Auth

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_redis_server(free_port(), root / "redis", appendonly=False)
        try:
            exp = write_experiment(root)
            store = FsStore(root / "store")
            pid = seed_prompt(store, exp, TEXT_DIVERGENT, DIVERGENT).pid
            rng = random.Random(0)
            for variant in exp.variant_names:
                rows = [
                    RankedFeature(
                        layer=rng.randrange(16),
                        pos=rng.randrange(24),
                        feature=rng.randrange(8192),
                        token=f" t{i % 24}",
                        score=rng.gauss(0, 1e-3),
                        evil=rng.gauss(0, 1e-3),
                        safe=rng.gauss(0, 1e-3),
                        activation=rng.random() * 5,
                    )
                    for i in range(args.features)
                ]
                rows.sort(key=lambda r: -r.score)
                ranking = FeatureRanking(
                    prompt_id=pid,
                    variant=variant,
                    fingerprint=exp.fingerprint,
                    labels_version="bench",
                    label_source="judge",
                    evil_token_ids=[1],
                    safe_token_ids=[2],
                    features=rows,
                )
                # as the analysis step writes them: the ranking, then its digest
                store.put_json(K.features(exp.name, pid, exp.fingerprint, variant), ranking)
                store.put_json(
                    K.features_digest(exp.name, pid, exp.fingerprint, variant),
                    RankingDigest.of(ranking),
                )
            add_user(store, "alice", PASSWORD)
            settings = Settings(
                home=root / "home",
                broker_url=server.url,
                store=StoreSettings(root=root / "store"),
                experiment=Path(exp.source or ""),
            )
            app: Any = create_app(
                settings,
                store=store,
                redis=redis.Redis.from_url(server.url),
                testing=True,
                experiment=exp,
                celery=make_app(settings),
            )
            client = app.test_client()
            Auth(client).login()
            ranking_bytes = store.size(K.features(exp.name, pid, exp.fingerprint, "adapted"))
            digest_bytes = store.size(K.features_digest(exp.name, pid, exp.fingerprint, "adapted"))

            def page(path: str) -> None:
                resp = client.get(path)
                if resp.status_code != 200:
                    raise RuntimeError(f"{path}: {resp.status_code}")

            prompt_ms = _median_ms(lambda: page(f"/p/{pid}"), args.repeat)
            api_ms = _median_ms(lambda: page(f"/api/p/{pid}"), args.repeat)
            analysis_ms = _median_ms(lambda: page(f"/p/{pid}/analysis"), args.repeat)
            with app.app_context():
                from services.review_ui.context import ctx

                c: ReviewContext = ctx()
                before_ms = _median_ms(
                    lambda: load_prompt_view(c, pid, rankings="full"), max(3, args.repeat // 3)
                )
                now_ms = _median_ms(lambda: load_prompt_view(c, pid, rankings="none"), args.repeat)
            # baseline: the same page with no digests stored, reading the whole rankings
            for variant in exp.variant_names:
                store.delete(K.features_digest(exp.name, pid, exp.fingerprint, variant))
            full_ms = _median_ms(lambda: page(f"/p/{pid}/analysis"), max(3, args.repeat // 3))
        finally:
            server.stop()
    print(
        f"{args.features} features per ranking ({ranking_bytes / 1e6:.1f} MB of JSON each, "
        f"digest {digest_bytes / 1e6:.2f} MB), median of {args.repeat}:"
    )
    print(f"  prompt page /p/{{pid}}:        {prompt_ms:6.1f} ms (goal < 50 ms)")
    print(f"  prompt API  /api/p/{{pid}}:    {api_ms:6.1f} ms")
    print(
        f"  analysis page:                {analysis_ms:6.1f} ms from the digests vs {full_ms:.1f} ms "
        f"reading the whole rankings ({full_ms / analysis_ms:.0f}x; shows 40 rows, shares, diff)"
    )
    print(
        f"  prompt page loader: {now_ms:.1f} ms now vs {before_ms:.1f} ms reading both rankings "
        f"as before ({before_ms / now_ms:.0f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
