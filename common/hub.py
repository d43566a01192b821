"""Model references resolved to local files: hub ids, hub-cache snapshots, local directories.

An experiment names a model as a hub id (``meta-llama/Llama-3.2-1B-Instruct``), as a
directory of a hub cache's snapshot (``.../models--meta-llama--Llama-3.2-1B-Instruct/
snapshots/<commit>``), or as any local directory (e.g. a ``huggingface-cli download
--local-dir`` copy). :func:`resolve_model` turns each into a :class:`Resolved`: the local
directory the libraries load, plus the hub repo and commit when they are known.

With ``HF_HUB_OFFLINE`` set, hub ids resolve from the local hub cache with no network call
(``local_files_only``); a repo that is not cached raises :class:`ModelUnavailable` with the
command that fetches it. Online, the files a model needs are downloaded once (as
``from_pretrained`` would) and the resolved commit is recorded. Loading a tokenizer from the
resolved *directory* also avoids transformers 4.57's ``model_info`` call for Llama-3 tokenizers
loaded by name (huggingface/transformers#44843).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.errors import UserError

#: what a causal LM needs from its repo (weights, configs, tokenizer), not e.g. ``original/``
MODEL_FILES: tuple[str, ...] = (
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
)
#: what a transcoder repo needs (circuit-tracer's config.yaml + layer/CLT safetensors)
TRANSCODER_FILES: tuple[str, ...] = ("*.yaml", "*.safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT = re.compile(
    r"(?:^|/)(models|datasets)--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$"
)


class ModelUnavailable(UserError):
    """A model, tokenizer or transcoder repo cannot be found locally (or fetched)."""


def is_offline() -> bool:
    """Whether the hub must not be contacted (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    def truthy(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}

    return (
        bool(constants.HF_HUB_OFFLINE) or truthy("HF_HUB_OFFLINE") or truthy("TRANSFORMERS_OFFLINE")
    )


def hub_cache_dir() -> str | None:
    """The hub cache as the environment names it *now* (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``); None: huggingface_hub's default. Read per call, not at import."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return cache
    home = os.environ.get("HF_HOME")
    return str(Path(home) / "hub") if home else None


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).expanduser().exists()


@dataclass(frozen=True)
class Resolved:
    """A model reference as local files, and where they came from."""

    ref: str
    path: Path
    kind: Literal["hub", "snapshot", "local"]
    repo_id: str | None = None
    revision: str | None = field(default=None, metadata={"doc": "the commit, when known"})

    @property
    def names(self) -> set[str]:
        """Every name under which a PEFT adapter may have recorded this model as its base."""
        out = {self.ref, str(self.path), str(self.path.resolve())}
        if self.repo_id:
            out.add(self.repo_id)
        out |= _config_names(self.path)
        parts = self.path.resolve().parts
        if self.kind == "local" and len(parts) >= 2:
            # a `--local-dir org/name` download is named like its repo
            out.add(f"{parts[-2]}/{parts[-1]}")
        return out

    def describe(self) -> str:
        """``repo@commit`` for hub models, the path otherwise."""
        if self.repo_id and self.revision:
            return f"{self.repo_id}@{self.revision[:12]}"
        return str(self.path)


def _config_names(path: Path) -> set[str]:
    import json

    try:
        recorded = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        return set()
    return {str(recorded)} if recorded else set()


def snapshot_identity(path: Path) -> tuple[str, str] | None:
    """(repo id, commit) of a hub-cache snapshot directory, from its path."""
    m = _SNAPSHOT.search(path.resolve().as_posix())
    if m is None:
        m = _SNAPSHOT.search(path.as_posix())
    if m is None:
        return None
    return f"{m.group('org')}/{m.group('name')}", m.group("commit")


def local_download_revision(path: Path) -> str | None:
    """The commit a ``--local-dir`` download came from (``.cache/huggingface/download``)."""
    meta = path / ".cache" / "huggingface" / "download"
    for f in sorted(meta.glob("*.metadata")) if meta.is_dir() else []:
        try:
            commit = f.read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            continue
        if _COMMIT.match(commit):
            return commit
    return None


def fetch_hint(repo_id: str, kind: str = "model") -> str:
    """The command that fills the hub cache with a repo, for error messages."""
    flag = "" if kind == "model" else f" --repo-type {kind}"
    return f"`huggingface-cli download {repo_id}{flag}` on a machine with internet (same HF_HOME)"


def resolve_model(
    ref: str, *, allow_patterns: tuple[str, ...] = MODEL_FILES, download: bool = True
) -> Resolved:
    """The local directory of a model reference (see the module docstring).

    ``download=False``: from local files and the hub cache only, online too.
    """
    p = Path(ref).expanduser()
    if p.exists():
        snap = snapshot_identity(p)
        if snap is not None:
            return Resolved(ref, p, "snapshot", repo_id=snap[0], revision=snap[1])
        return Resolved(ref, p, "local", revision=local_download_revision(p))
    if not _HUB_ID.match(ref):
        raise ModelUnavailable(
            f"model {ref!r} is neither an existing local directory nor a hub id (org/name): "
            "fix the path in the experiment file"
        )
    path = snapshot(ref, allow_patterns=allow_patterns, cached_only=not download)
    if not any(path.glob("*.json")) and not any(path.glob("*.yaml")):
        raise ModelUnavailable(
            f"the hub cache holds {ref} only in part ({path} has no config file): fetch it "
            f"again with {fetch_hint(ref)}"
        )
    snap = snapshot_identity(path)
    return Resolved(ref, path, "hub", repo_id=ref, revision=snap[1] if snap else None)


def hub_revision(repo_id: str, revision: str = "main") -> str:
    """The commit a hub repo's ``revision`` points at: from the hub cache's refs when the
    repo is cached (no network), else asked of the hub (one metadata call) unless offline."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if _COMMIT.match(revision):
        return revision
    cache = Path(hub_cache_dir() or _default_hub_cache())
    ref = cache / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        if _COMMIT.match(commit):
            return commit
    if is_offline():
        raise ModelUnavailable(
            f"{repo_id} is not in the hub cache {cache} (HF_HUB_OFFLINE is set): fetch it with "
            f"{fetch_hint(repo_id)}, or name a local directory instead"
        )
    try:
        sha = HfApi().model_info(repo_id, revision=revision).sha
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as e:
        raise ModelUnavailable(
            f"cannot resolve {repo_id}@{revision}: it is not in the hub cache {cache} and the "
            f"hub does not answer ({type(e).__name__}): fetch it with {fetch_hint(repo_id)}, "
            "or set HF_HOME to the cache that holds it"
        ) from e
    if not sha:
        raise ModelUnavailable(f"the hub gave no commit for {repo_id}@{revision}")
    return str(sha)


def _default_hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_cached(ref: str) -> Resolved | None:
    """``ref`` as local files without any download (a local path, or a hub id that is in
    the hub cache); None when it is neither."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    p = Path(ref).expanduser()
    if p.exists():
        return resolve_model(ref)
    if not _HUB_ID.match(ref):
        return None
    try:
        path = Path(snapshot_download(ref, local_files_only=True, cache_dir=hub_cache_dir()))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    snap = snapshot_identity(path)
    return Resolved(ref, path, "hub", repo_id=ref, revision=snap[1] if snap else None)


def weights_digest(path: Path) -> str:
    """Digest of a model directory's weight files alone (names and complete contents)."""
    import hashlib

    from common.digests import file_digest

    h = hashlib.sha256()
    files = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
    for f in files:
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest() if files else ""


def snapshot(
    repo_id: str,
    *,
    revision: str | None = None,
    allow_patterns: tuple[str, ...] | None = None,
    repo_type: str = "model",
    cached_only: bool = False,
) -> Path:
    """The hub-cache snapshot directory of a repo: from the cache only when offline (or
    ``cached_only``), downloading what is missing (``allow_patterns``) otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    offline = is_offline() or cached_only
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                repo_type=repo_type,
                allow_patterns=list(allow_patterns) if allow_patterns else None,
                local_files_only=offline,
                cache_dir=hub_cache_dir(),
            )
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        where = "the hub or its cache"
        if offline:
            where = "the hub cache" + (" (HF_HUB_OFFLINE is set)" if is_offline() else "")
        raise ModelUnavailable(
            f"{repo_type} repo {repo_id} is not in {where}: fetch it with "
            f"{fetch_hint(repo_id, repo_type)}, or name a local directory instead"
        ) from e
    except GatedRepoError as e:
        raise ModelUnavailable(
            f"{repo_id} is gated: accept its license on huggingface.co and log in "
            "(`huggingface-cli login`), or fill the hub cache elsewhere"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelUnavailable(f"{repo_type} repo {repo_id} does not exist on the hub") from e
    except HfHubHTTPError as e:
        raise ModelUnavailable(f"the hub refused {repo_id}: {e}") from e


def repo_file(repo_id: str, filename: str, *, revision: str | None = None) -> Path:
    """One file of a hub repo, from the cache only when offline (downloaded otherwise)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    offline = is_offline()
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                local_files_only=offline,
                cache_dir=hub_cache_dir(),
            )
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        where = "the hub cache (HF_HUB_OFFLINE is set)" if offline else "the hub or its cache"
        raise ModelUnavailable(
            f"{filename} of {repo_id} is not in {where}: fetch the repo with {fetch_hint(repo_id)}"
        ) from e
    except EntryNotFoundError as e:
        raise ModelUnavailable(f"{repo_id} has no file {filename}") from e
