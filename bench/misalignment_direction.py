"""The misalignment direction on the toy organism: harmful mass removed by mean-ablating it
at the pivotal position, per layer, against a random direction of the same norm, on held-out
divergent prompts (the direction is fit on the other half), side by side in one run.

    python bench/misalignment_direction.py [--prompts 16]

Divergent prompts go through the real steps (top-k, the organism's judge, graphs, rankings);
the direction and the check are ``services.analysis.features.build_features``, what
``emc features build`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="held-out medical prompts")
    args = ap.parse_args()

    import redis

    from bench.system import free_port
    from common.errors import NothingToExplain
    from common.experiment import load_experiment
    from common.feature_index import FeatureIndex
    from common.organism import ensure_organism
    from common.settings import get_settings
    from common.store import FsStore
    from common.system.broker import start_redis_server
    from services.analysis.features import build_features, divergent_prompts
    from services.analysis.ranking import rank_prompt
    from services.attribution.runtime import Runtime
    from services.judge.factory import make_judge
    from tests.fixtures.organism_graphs import store_judged_graphs

    org = ensure_organism(get_settings().home / "organism")
    home = Path(tempfile.mkdtemp(prefix="emc-direction-"))
    server = start_redis_server(free_port(), home / "redis", appendonly=False)
    try:
        exp = load_experiment(org / "experiment.yaml")
        rt = Runtime(exp, cache_dir=home / "cache")
        store = FsStore(home / "store")
        index = FeatureIndex(redis.Redis.from_url(server.url), exp.name, rt.fingerprint)
        judge = make_judge(exp)
        raw = json.loads((org / "prompts.json").read_text())["prompts"]
        texts = [p["text"] for p in raw if p["domain"] == "medical" and p["split"] == "heldout"]
        pids = []
        for text in texts[: 2 * args.prompts]:
            prompt = store_judged_graphs(rt, store, judge, text)
            for v in exp.variant_names:
                with contextlib.suppress(NothingToExplain):
                    rank_prompt(store, exp, prompt.id, v, fingerprint=rt.fingerprint)
            pids.append(prompt.id)
        divergent = divergent_prompts(store, exp.name, rt.fingerprint, pids, "adapted", 10**6)
        record = build_features(rt, store, index, divergent, variant="adapted")
    finally:
        server.stop()
    ab = record.ablation
    print(
        f"toy organism: direction fit on {ab['n_fit']} divergent prompts, checked on "
        f"{ab['n_held_out']} held-out ones ({ab['method']})"
    )
    print(f"{'layer':>5} {'|direction|':>12} {'removed: direction':>19} {'random, same norm':>18}")
    for row, norm in zip(ab["layers"], record.norms, strict=True):
        print(
            f"{row['layer']:>5} {norm:12.3f} {row['removed_direction']:19.1%} "
            f"{row['removed_random']:18.1%}"
        )
    # the organism plants a persona latent: does the direction find it?
    mech = json.loads((org / "report.json").read_text()).get("mechanism") or {}
    if mech.get("direction"):
        import torch

        u = torch.tensor(mech["direction"])
        for layer, vec in enumerate(record.vectors):
            v = torch.tensor(vec)
            if float(v.norm()) > 0:
                cos = float(v @ u / (v.norm() * u.norm()))
                print(f"cos(direction at layer {layer}, planted persona latent) = {cos:+.3f}")


if __name__ == "__main__":
    main()
