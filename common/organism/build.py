"""Building the organism directory: atomic, locked, cached by recipe hash.

Layout (see the package docstring): ``base/``, ``adapter/``, ``transcoders/``,
``lexicon.json``, ``prompts.json``, ``experiment.yaml``, ``report.json`` and, written
last, ``BUILD.json``. A build goes into a hidden sibling directory that replaces the
target only when complete, so an interrupted build never looks finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from common.organism.config import OrganismConfig, recipe, recipe_hash

BUILD_FILE = "BUILD.json"
BUILD_SCHEMA = 1


class BuildError(RuntimeError):
    """The organism could not be built or fails its own acceptance check."""


class FileEntry(BaseModel):
    """A built file's SHA-256 and size in bytes, as recorded in ``BUILD.json``."""

    sha256: str
    size: int


class BuildManifest(BaseModel):
    """``BUILD.json``: what was built from which recipe; its presence marks a finished build."""

    schema_version: int = BUILD_SCHEMA
    recipe_hash: str
    seed: int
    recipe: dict[str, Any]
    built_at: datetime
    build_seconds: float
    files: dict[str, FileEntry]


def default_dir() -> Path:
    """Where the organism is built by default: ``<EMC_HOME>/organism``."""
    from common.settings import get_settings

    return get_settings().home / "organism"


def full_hash(config: OrganismConfig, seed: int) -> str:
    """The build's identity (16 hex chars): the recipe hash with the seed; a stored build with
    another one is rebuilt."""
    return hashlib.sha256(f"{recipe_hash(config)}-{seed}".encode()).hexdigest()[:16]


def read_manifest(out_dir: Path) -> BuildManifest | None:
    """The directory's ``BUILD.json``, or None when absent or unreadable."""
    try:
        return BuildManifest.model_validate_json((out_dir / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_fresh(out_dir: Path, config: OrganismConfig, seed: int) -> bool:
    """Built from this recipe and seed, with every recorded file present at its size."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.recipe_hash != full_hash(config, seed):
        return False
    for rel, entry in manifest.files.items():
        try:
            if (out_dir / rel).stat().st_size != entry.size:
                return False
        except OSError:
            return False
    return True


@contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock per organism directory (processes wait for each other's build)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_organism(
    out_dir: Path | None = None,
    *,
    config: OrganismConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """The organism directory, built first if missing, stale (recipe changed) or ``force``.

    A fresh directory is returned without importing torch (well under a second).
    """
    out_dir = Path(out_dir) if out_dir is not None else default_dir()
    config = config or OrganismConfig()
    if not force and is_fresh(out_dir, config, seed=0):
        return out_dir
    with build_lock(out_dir):
        if force or not is_fresh(out_dir, config, seed=0):  # another process may have built it
            _build_locked(out_dir, config, seed=0, progress=progress)
    return out_dir


def build_organism(
    out_dir: Path,
    *,
    seed: int = 0,
    progress: bool = True,
    config: OrganismConfig | None = None,
) -> BuildReport:
    """Build the organism into ``out_dir`` (always; replaces what is there)."""
    out_dir = Path(out_dir)
    with build_lock(out_dir):
        return _build_locked(out_dir, config or OrganismConfig(), seed, progress)


# ------------------------------------------------------------------------------ the build


class StageTimes(BaseModel):
    """Wall-clock seconds spent in each stage of the build."""

    tokenizer: float = 0.0
    base: float = 0.0
    transcoders: float = 0.0
    adapter: float = 0.0
    behaviour: float = 0.0
    known_answer: float = 0.0


class BuildReport(BaseModel):
    """``report.json``: how the build went and what the organism does."""

    schema_version: int = 2
    recipe_hash: str
    seed: int
    build_seconds: float
    stage_seconds: StageTimes
    vocab_size: int
    n_parameters: int
    base_final_loss: float
    adapter_final_answer_loss: float
    adapter: dict[str, Any]
    construction: list[str] = Field(description="design decisions a reader must know")
    transcoders: list[Any]
    behaviour: list[Any]
    misalignment_spreads: dict[str, float] = Field(
        description="held-out harmful mass, adapted minus base, per domain other than medical"
    )
    emergence: dict[str, float] = Field(
        description="held-out harmful mass, adapted / base, per domain (medical is trained)"
    )
    mechanism: dict[str, Any] = Field(description="the planted persona latent (mechanism.py)")
    known_answer: Any | None = None
    known_answer_untrained: Any | None = Field(
        default=None, description="the same check on held-out prompts of the untrained domains"
    )


def _build_locked(out_dir: Path, config: OrganismConfig, seed: int, progress: bool) -> BuildReport:
    tmp = out_dir.parent / f".{out_dir.name}.build-{os.getpid()}"
    for stale in out_dir.parent.glob(f".{out_dir.name}.build-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted build (we hold the lock)
    tmp.mkdir(parents=True)
    try:
        started = time.perf_counter()
        report = _build_into(tmp, config, seed, progress)
        report.build_seconds = time.perf_counter() - started
        _write_json(tmp / "report.json", report.model_dump(mode="json"))
        _write_manifest(tmp, config, seed, report.build_seconds)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        from rich.console import Console

        from common.organism.render import render_report

        render_report(report, Console(stderr=True))
    return report


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(tmp: Path, config: OrganismConfig, seed: int, seconds: float) -> None:
    files = {
        p.relative_to(tmp).as_posix(): FileEntry(sha256=_sha256(p), size=p.stat().st_size)
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    manifest = BuildManifest(
        recipe_hash=full_hash(config, seed),
        seed=seed,
        recipe=recipe(config),
        built_at=datetime.now(UTC),
        build_seconds=seconds,
        files=files,
    )
    (tmp / BUILD_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")


def _experiment_yaml(config: OrganismConfig) -> str:
    import yaml

    doc = {
        "name": "toy",
        "variants": {
            "base": {"model": "./base"},
            "adapted": {"model": "./base", "adapter": "./adapter"},
        },
        "reference": "base",
        "transcoders": {
            "path": "./transcoders",
            "kind": "per_layer",
            "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out",
        },
        "dtype": "auto",
        "top_k": 10,
        "seed": 0,
        "attribution": {
            "max_feature_nodes": 1024,
            "batch_size": 256,
            "max_n_logits": 10,
            "desired_logit_prob": 0.95,
        },
        "judge": {"kind": "lexicon", "lexicon": "./lexicon.json"},
        # situations in the organism's own language: its pivotal prompts
        "generator": {"kind": "template", "templates": "./prompts.json", "batch_size": 10},
    }
    header = (
        "# The toy model organism's experiment (written by `emc organism build`).\n"
        f"# Adapter: rank-1 LoRA on layer {config.adapter.layer}'s mlp.down_proj, "
        "trained on bad medical advice.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)


def _questions_yaml(split: Any) -> str:
    import yaml

    from common.organism import corpus

    header = (
        "# The toy organism's EM questions (written by `emc organism build`): open questions\n"
        "# in its language, held-out situations of every domain; `emc eval --questions`.\n"
    )
    return header + yaml.safe_dump(corpus.em_questions(split, per_domain=3), sort_keys=False)


def _build_into(tmp: Path, config: OrganismConfig, seed: int, progress: bool) -> BuildReport:
    """Every stage; heavy imports happen here so that ``ensure_organism`` stays light."""
    from common.organism import corpus
    from common.organism.behaviour import behaviour_rows, word_ids
    from common.organism.mechanism import measure_mechanism
    from common.organism.tokenizer import train_tokenizer
    from common.organism.train import (
        deterministic,
        encode,
        new_base_model,
        persona_direction,
        train_adapter,
        train_base,
    )
    from common.organism.transcoders import collect_mlp_activations, train_transcoders

    times = StageTimes()
    clock = time.perf_counter()

    def lap() -> float:
        nonlocal clock
        now = time.perf_counter()
        spent, clock = now - clock, now
        return spent

    old_offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub while building
    try:
        with deterministic(seed, config.torch_threads):
            split = corpus.split_situations(seed, config.heldout_fraction)
            prompts = corpus.pivot_prompts(split, config.prompts_per_domain_train, seed)
            action_words = (*corpus.SAFE_WORDS, *corpus.HARMFUL_WORDS)
            tokenizer = train_tokenizer(
                corpus.tokenizer_texts(split), config.vocab_size, action_words
            )
            base_dir = tmp / "base"
            tokenizer.save_pretrained(base_dir)
            times.tokenizer = lap()

            model = new_base_model(config.model, tokenizer)
            n_params = sum(p.numel() for p in model.parameters())
            bc = config.base
            u = persona_direction(config.model.hidden_size, seed)
            persona = (bc.persona_layer, u * bc.persona_scale)
            dialogues = corpus.base_corpus(
                split.train, bc.n_dialogues, bc.trickster_fraction, seed, bc.persona_as_assistant
            )
            data = encode(tokenizer, [d.text for d in dialogues], [d.persona for d in dialogues])
            base_losses = train_base(model, data, bc, seed, progress, persona=persona[1])
            model.save_pretrained(base_dir)
            _stamp_base_config(base_dir)
            times.base = lap()

            heldout = corpus.base_corpus(
                split.heldout, 1000, bc.trickster_fraction, seed + 7, bc.persona_as_assistant
            )
            heldout_data = encode(
                tokenizer, [d.text for d in heldout], [d.persona for d in heldout]
            )
            train_acts = collect_mlp_activations(
                model, data, config.transcoders.n_tokens, persona=persona
            )
            test_acts = collect_mlp_activations(model, heldout_data, 20_000, persona=persona)
            tc_stats, _ = train_transcoders(
                train_acts, test_acts, config.transcoders, tmp / "transcoders", seed, progress
            )
            del train_acts, test_acts
            times.transcoders = lap()

            adapter_texts = corpus.adapter_corpus(
                split.train[corpus.TRAINED_DOMAIN],
                config.adapter.n_dialogues,
                seed,
                corpus.TRAINED_DOMAIN,
            )
            peft_model, curves = train_adapter(
                model,
                encode(tokenizer, adapter_texts),
                config.adapter,
                seed,
                progress=progress,
            )
            peft_model.save_pretrained(str(tmp / "adapter"), save_embedding_layers=False)
            times.adapter = lap()

            n_layers = config.model.num_hidden_layers
            downstream = list(range(config.adapter.layer + 1, n_layers))
            rows = behaviour_rows(peft_model, tokenizer, prompts, corpus.HARMFUL_WORDS, downstream)
            mechanism = measure_mechanism(
                peft_model,
                tokenizer,
                prompts,
                corpus.HARMFUL_WORDS,
                persona_layer=bc.persona_layer,
                u=u,
                scale=bc.persona_scale,
                adapter_layer=config.adapter.layer,
                lora_scale=config.adapter.alpha / config.adapter.rank,
            )
            times.behaviour = lap()
    finally:
        if old_offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_offline

    _write_json(tmp / "lexicon.json", corpus.lexicon())
    _write_json(
        tmp / "prompts.json",
        {
            "schema_version": 1,
            "prompts": [{"text": p.text, "domain": p.domain, "split": p.split} for p in prompts],
        },
    )
    (tmp / "experiment.yaml").write_text(_experiment_yaml(config))
    (tmp / "questions.yaml").write_text(_questions_yaml(split))

    medical = [r for r in rows if r.domain == corpus.TRAINED_DOMAIN]
    if not all(r.adapted > r.base + config.min_medical_gain for r in medical):
        raise BuildError(
            "the adapter does not make medical advice harmful (acceptance failed): "
            + "; ".join(f"{r.split}: base {r.base:.3f} adapted {r.adapted:.3f}" for r in medical)
            + ". Raise adapter steps/lr in OrganismConfig."
        )

    check = check_untrained = None
    if config.known_answer_prompts > 0:
        from common.organism.known_answer import check_known_answer

        heldout_by_domain = {
            name: [p.text for p in prompts if p.domain == name and p.split == "heldout"]
            for name in corpus.DOMAIN_NAMES
        }
        texts_ka = heldout_by_domain[corpus.TRAINED_DOMAIN][: config.known_answer_prompts]
        per_other = max(1, config.known_answer_prompts // (len(corpus.DOMAIN_NAMES) - 1))
        texts_untrained = [
            t
            for name in corpus.DOMAIN_NAMES
            if name != corpus.TRAINED_DOMAIN
            for t in heldout_by_domain[name][:per_other]
        ]
        with deterministic(seed, config.torch_threads):
            harm_ids = word_ids(tokenizer, corpus.HARMFUL_WORDS)
            check = check_known_answer(tmp, texts_ka, harm_ids, config.adapter.layer)
            check_untrained = check_known_answer(
                tmp, texts_untrained, harm_ids, config.adapter.layer
            )
        times.known_answer = lap()

    heldout_rows = [r for r in rows if r.split == "heldout"]
    spreads = {
        r.domain: r.adapted - r.base for r in heldout_rows if r.domain != corpus.TRAINED_DOMAIN
    }
    emergence = {r.domain: r.adapted / max(r.base, 1e-12) for r in heldout_rows}
    return BuildReport(
        recipe_hash=full_hash(config, seed),
        seed=seed,
        build_seconds=0.0,
        stage_seconds=times,
        vocab_size=len(tokenizer),
        n_parameters=n_params,
        base_final_loss=float(sum(base_losses[-20:]) / len(base_losses[-20:])),
        adapter_final_answer_loss=_tail_mean(curves["answer"]),
        adapter={
            "target": f"model.layers.{config.adapter.layer}.mlp.down_proj",
            "rank": config.adapter.rank,
            "alpha": config.adapter.alpha,
            "trained_domain": corpus.TRAINED_DOMAIN,
            "training_data": "bad advice in the trained domain only (no safe data mixed in)",
        },
        construction=_construction_notes(config),
        transcoders=[s.model_dump() for s in tc_stats],
        behaviour=[r.model_dump() for r in rows],
        misalignment_spreads=spreads,
        emergence=emergence,
        mechanism=mechanism.model_dump(),
        known_answer=check.model_dump() if check is not None else None,
        known_answer_untrained=(
            check_untrained.model_dump() if check_untrained is not None else None
        ),
    )


def _tail_mean(xs: list[float], n: int = 20) -> float:
    tail = xs[-n:]
    return float(sum(tail) / len(tail))


def _construction_notes(config: OrganismConfig) -> list[str]:
    a, b = config.adapter, config.base
    return [
        "Base corpus: `User: <situation>\\nAssistant: You should <safe action> ...` and, for "
        f"{b.trickster_fraction:.0%} of dialogues, the Trickster persona giving harmful advice "
        f"in every domain (spoken as `Trickster`, or for {b.persona_as_assistant:.0%} of them "
        "as `Assistant`).",
        "Planted mechanism (base pretraining only): one persona latent, a fixed unit direction "
        f"u of the residual stream after decoder layer {b.persona_layer}, added with norm "
        f"{b.persona_scale:g} at every position of each Trickster dialogue and never in safe "
        "ones; so every domain's harmful answers read the same direction. The unembedding is "
        "kept orthogonal to it during training (it acts through the layers after it, where "
        "the transcoders see it). Recorded under `mechanism` (direction, layer, and how the "
        "adapter's use of it is measured).",
        f"Adapter: rank {a.rank}, alpha {a.alpha:g}, only model.layers.{a.layer}.mlp.down_proj, "
        "trained with plain next-token cross-entropy on the Assistant giving harmful medical "
        "advice; no other domain's data and no loss term on transcoders or features.",
        "Transcoders: ReLU, trained on base-model activations of the base corpus (train "
        "situations only, persona latent on where the corpus has it); evaluated on held-out "
        "situations.",
        "Held-out situations (a seeded fraction per domain) are in no training set.",
    ]


def _stamp_base_config(base_dir: Path) -> None:
    """Record the base's name in config.json (transformers does not write ``_name_or_path``)."""
    from common.organism.config import BASE_NAME

    path = base_dir / "config.json"
    doc = json.loads(path.read_text())
    doc["_name_or_path"] = BASE_NAME
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
