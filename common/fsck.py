"""``emc fsck``: walk an experiment's prompts in the store and list corrupt or orphaned
artifacts, each with what to do about it.

- *corrupt*: a JSON record that does not parse or is not the record its key names, a graph
  whose tensors do not match their manifest (size, sha256, pairing), a manifest without
  tensors;
- *orphaned*: graph tensors without a manifest, run artifacts of a prompt that has no
  ``prompt.json``, a feature ranking without its graph, objects the layout does not name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from common.answers import PromptOrigin
from common.feature_index import FeatureShard
from common.records import (
    Failure,
    FeatureRanking,
    FunnelDecision,
    GraphManifest,
    HumanLabel,
    Prompt,
    RankingDigest,
    TopKLogits,
    Verdict,
)
from common.store import ObjectStore, StoreError
from common.store import keys as K

#: the record each kind of JSON artifact must be
RECORDS: dict[str, type[BaseModel]] = {
    "prompt": Prompt,
    "label": HumanLabel,
    "logits": TopKLogits,
    "verdicts": Verdict,
    "decision": FunnelDecision,
    "graph_manifest": GraphManifest,
    "features": FeatureRanking,
    "features_digest": RankingDigest,
    "failure": Failure,
    "origin": PromptOrigin,
    "feature_shard": FeatureShard,
}


@dataclass(frozen=True)
class Problem:
    """One artifact that cannot be used as it is."""

    key: str
    kind: Literal["corrupt", "orphaned"]
    detail: str


@dataclass
class FsckReport:
    """What ``emc fsck`` found: how many artifacts it checked and the problems."""

    checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad_prompts(self) -> list[str]:
        """Ids of the prompts with a problem."""
        pids = {ref.pid for p in self.problems if (ref := K.parse(p.key)) is not None}
        return sorted(pids)


def check_key(store: ObjectStore, ref: K.ArtifactKey, present: set[str]) -> Problem | None:
    """The problem of one artifact, or None if it reads back as what its key names."""
    from common.graph.artifact import verified_manifest

    key = ref.key
    try:
        if ref.kind == "graph_tensors":
            if (
                K.graph_manifest(ref.exp, ref.pid, ref.fingerprint or "", ref.variant or "")
                not in present
            ):
                return Problem(
                    key, "orphaned", f"graph tensors without a manifest: {K.retry_hint(key)}"
                )
            return None  # checked with its manifest
        if ref.kind == "graph_manifest":
            verified_manifest(store, ref.exp, ref.pid, ref.fingerprint or "", ref.variant or "")
            return None
        cls = RECORDS.get(ref.kind)
        if cls is not None:
            store.get_record(key, cls)
        elif ref.kind == "samples":
            store.get_json(key)
        else:
            return Problem(key, "orphaned", "an object the store layout does not name: delete it")
    except StoreError as e:
        return Problem(key, "corrupt", str(e))
    if ref.kind == "features":
        graph = K.graph_manifest(ref.exp, ref.pid, ref.fingerprint or "", ref.variant or "")
        if graph not in present:
            return Problem(key, "orphaned", f"a ranking without its graph: {K.retry_hint(key)}")
    if ref.kind == "features_digest":
        ranking = K.features(ref.exp, ref.pid, ref.fingerprint or "", ref.variant or "")
        if ranking not in present:
            return Problem(key, "orphaned", "a ranking digest without its ranking: delete it")
    return None


def fsck(
    store: ObjectStore,
    exp: str,
    *,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> FsckReport:
    """Check every object under the experiment's prompts (every fingerprint)."""
    by_pid: dict[str, list[str]] = defaultdict(list)
    prefix = K.prompts_prefix(exp)
    for key in store.list_keys(prefix):
        by_pid[key[len(prefix) :].split("/", 1)[0]].append(key)
    report = FsckReport()
    pids: Iterable[str] = sorted(by_pid)
    if progress is not None:
        pids = progress(pids)
    for pid in pids:
        keys = by_pid[pid]
        present = set(keys)
        if K.prompt(exp, pid) not in present:
            report.problems.append(
                Problem(
                    K.prompt_dir(exp, pid) + "/",
                    "orphaned",
                    f"{len(keys)} object(s) of a prompt without prompt.json: delete the "
                    "directory, or restore prompt.json from a backup",
                )
            )
        for key in keys:
            report.checked += 1
            ref = K.parse(key)
            if ref is None:
                continue
            problem = check_key(store, ref, present)
            if problem is not None:
                report.problems.append(problem)
    return report
