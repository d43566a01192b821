"""One loading path for every variant: model reference -> ReplacementModel with transcoders.

- base: a hub id, a hub-cache snapshot or a local directory, resolved to local files
  (:func:`common.hub.resolve_model`: from the hub cache only when ``HF_HUB_OFFLINE`` is set);
- adapted: base + PEFT adapter, merged once (``merge_and_unload``) and cached under
  ``<cache_dir>/merged/<digest>`` where the digest covers the adapter files and the base's
  identity (content of a local directory; resolved commit and content of a hub id). An
  adapter whose recorded base (``adapter_config.json`` ``base_model_name_or_path``) is not the
  configured base is refused: the research logs found a merged model silently built on the
  wrong base. The same base is accepted however it is named (hub id, snapshot directory,
  ``--local-dir`` download, or under another name with the same weights), and
  ``adapter_base:`` declares the name explicitly.
- dtype: ``auto`` = bfloat16 on CUDA, float32 on CPU; float16 only when the experiment asks
  for it (with a loud warning: the logs traced 400+ activations and NaNs to fp16).
- then circuit-tracer's ReplacementModel (nnsight backend) with the experiment's transcoders.

The process-level cache of loaded models lives in :mod:`services.attribution.runtime`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from common.errors import UserError
from common.experiment import Experiment, VariantSpec, path_digest
from common.hub import (
    TRANSCODER_FILES,
    Resolved,
    repo_file,
    resolve_cached,
    resolve_model,
    weights_digest,
)
from services.attribution import ct

log = logging.getLogger(__name__)

#: bump when the merged directory's layout or the merge recipe changes
MERGE_FORMAT = 2
#: with lazy loading on ``auto``, transcoder sets larger than this stay on disk (rows read on demand)
LAZY_DECODER_BYTES = 2 * 2**30

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class AdapterMismatch(UserError, ValueError):
    """The adapter was trained on another base model than the one configured."""


def resolve_device(exp: Experiment) -> torch.device:
    """``experiment.device``: auto = CUDA when available, else CPU."""
    if exp.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "experiment.device is 'cuda' but no CUDA device is visible: set device: auto or cpu"
        )
    if exp.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(exp.device)


def resolve_dtype(exp: Experiment, device: torch.device) -> torch.dtype:
    """dtype policy: auto = bfloat16 on CUDA, float32 on CPU; float16 only when asked."""
    if exp.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if exp.dtype == "float16":
        msg = (
            "experiment.dtype is float16: fp16 overflows in the residual stream of many models "
            "(the research logs traced 400+ non-finite activations to it); the health checks "
            "will fail such prompts. Prefer bfloat16 (GPU) or float32."
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return _DTYPES[exp.dtype]


# ------------------------------------------------------------------------ adapters


def _recorded_base(adapter_dir: Path) -> str:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_config.json: variants.*.adapter must be a PEFT "
            "adapter directory (as written by PeftModel.save_pretrained)"
        )
    recorded = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not recorded:
        raise AdapterMismatch(
            f"{cfg_path} records no base_model_name_or_path, so emc cannot check that the "
            "adapter belongs to the configured base: add it to adapter_config.json"
        )
    return str(recorded)


def check_adapter_base(
    adapter_dir: str | Path, base: Resolved | str, variant: str, *, declared: str | None = None
) -> None:
    """Refuse an adapter whose recorded base differs from the configured one.

    Accepted: the recorded name is one of the base's names (:attr:`Resolved.names`: its hub
    id, path, the repo a snapshot or ``--local-dir`` download belongs to), or it resolves
    locally (a path or the hub cache; nothing is downloaded) to the same weights. With
    ``declared`` (the variant's ``adapter_base``) only that recorded name is accepted.
    """
    recorded = _recorded_base(Path(adapter_dir))
    if isinstance(base, str):
        base = resolve_cached(base) or Resolved(base, Path(base), "local")
    if declared is not None:
        if recorded == declared:
            return
        raise AdapterMismatch(
            f"variant {variant!r}: adapter {adapter_dir} records base {recorded!r}, but "
            f"variants.{variant}.adapter_base declares {declared!r}: use an adapter trained "
            "on this base, or correct adapter_base"
        )
    candidates = {recorded}
    rp = Path(recorded).expanduser()
    if rp.exists():
        candidates.add(str(rp.resolve()))
    known = base.names
    if candidates & known:
        return
    other = resolve_cached(recorded)
    if other is not None and base.path.is_dir():
        mine = weights_digest(base.path)
        if mine and weights_digest(other.path) == mine:
            return
    raise AdapterMismatch(
        f"variant {variant!r}: adapter {adapter_dir} was trained on base {recorded!r}, but "
        f"the experiment's base is {base.describe()} (known as {sorted(known)[:4]}"
        f"{', ...' if len(known) > 4 else ''}). Point variants.{variant}.model at the "
        "adapter's base, use an adapter trained on this base, or, if this IS that model "
        f"under another name, set variants.{variant}.adapter_base: {recorded!r}"
    )


def merged_digest(spec: VariantSpec) -> str:
    """Cache key of a merged model: adapter files + base identity + merge format."""
    if spec.adapter is None:
        raise ValueError("merged_digest needs a variant with an adapter")
    doc = {
        "format": MERGE_FORMAT,
        "base": path_digest(spec.model),
        "adapter": path_digest(spec.adapter),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _saved_dtype(base: Path) -> torch.dtype:
    """The dtype the base checkpoint is stored in (merged weights are saved the same way)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    name = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name
    if isinstance(name, str) and name in _DTYPES:
        return _DTYPES[name]
    return torch.float32


def _keep_base_version(base: Path, merged: Path) -> None:
    """Record the base's ``transformers_version`` in the merged config.json.

    transformers 4.57.3 takes any local directory saved by a version between 4.57.2 and 5.0
    for a Mistral tokenizer with a broken regex and warns on every load (a false alarm for
    Llama-3: tokenization is unchanged). The merged weights are the base's plus the LoRA
    delta; their config is the base's, so its version stamp is too.
    """
    try:
        version = json.loads((base / "config.json").read_text()).get("transformers_version")
        cfg_path = merged / "config.json"
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return
    if version:
        cfg["transformers_version"] = version
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def merge_adapter(spec: VariantSpec, variant: str, cache_dir: Path) -> Path:
    """The merged model directory for ``spec`` (built once, then reused from the cache).

    The base is loaded in the dtype it is stored in (bf16 for Llama-3.2) and the LoRA delta
    is added in place (PEFT computes it in float32 on CPU): no float32 copy of the whole
    model is ever held next to the saved one.
    """
    if spec.adapter is None:
        raise ValueError(f"variant {variant!r} has no adapter to merge")
    base = resolve_model(spec.model)
    check_adapter_base(spec.adapter, base, variant, declared=spec.adapter_base)
    root = cache_dir / "merged"
    final = root / merged_digest(spec)
    with _file_lock(root / f"{final.name}.lock"):
        if (final / "emc-merge.json").is_file():
            return final
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("merging adapter %s into %s -> %s", spec.adapter, base.describe(), final)
        save_dtype = _saved_dtype(base.path)
        base_model = AutoModelForCausalLM.from_pretrained(base.path, dtype=save_dtype)
        merged = PeftModel.from_pretrained(base_model, spec.adapter).merge_and_unload()
        del base_model
        tmp = root / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            merged.save_pretrained(tmp, safe_serialization=True)
            del merged
            _keep_base_version(base.path, tmp)
            # from the resolved directory: by name, transformers 4.57 asks the hub about
            # Llama-3 tokenizers even when offline (huggingface/transformers#44843)
            AutoTokenizer.from_pretrained(base.path).save_pretrained(tmp)
            (tmp / "emc-merge.json").write_text(
                json.dumps(
                    {
                        "format": MERGE_FORMAT,
                        "base": spec.model,
                        "base_resolved": base.describe(),
                        "adapter": spec.adapter,
                        "base_digest": path_digest(spec.model),
                        "adapter_digest": path_digest(spec.adapter),
                        "dtype": str(save_dtype).removeprefix("torch."),
                    },
                    indent=2,
                )
            )
            if final.exists():  # a half-written leftover without emc-merge.json
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return final


def model_dir(spec: VariantSpec, variant: str, cache_dir: Path) -> str:
    """What the ReplacementModel loads: the base's local directory, or the merged one."""
    if spec.adapter is None:
        return str(resolve_model(spec.model).path)
    return str(merge_adapter(spec, variant, cache_dir))


# ------------------------------------------------------------------------ transcoders + model


@dataclass(frozen=True)
class TranscoderFiles:
    """A transcoder set as local files, in circuit-tracer's terms."""

    kind: Literal["per_layer", "cross_layer"]
    directory: Path  # where the set lives (a local dir or a hub-cache snapshot)
    layer_files: list[Path]  # per_layer: layer_{i} files in layer order
    feature_input_hook: str
    feature_output_hook: str
    repo_id: str = ""  # circuit-tracer picks special loaders by repo name (gemma-scope)
    scan: str = ""

    @property
    def size_bytes(self) -> int:
        """Total bytes of the set's files (the layer files, else every safetensors file in
        ``directory``)."""
        files = self.layer_files or list(self.directory.glob("*.safetensors"))
        return sum(f.stat().st_size for f in files)


def _config_yaml(directory: Path) -> dict[str, object]:
    import yaml

    path = directory / "config.yaml"
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise TranscoderError(f"{path} is not a mapping: circuit-tracer's config.yaml is expected")
    return raw


class TranscoderError(UserError, ValueError):
    """The transcoder set cannot be read as circuit-tracer's layout."""


class TranscodersNotFound(TranscoderError, FileNotFoundError):
    """The transcoder set's directory or files do not exist."""


def _listed_file(entry: str, directory: Path) -> Path:
    """One ``transcoders:`` entry of a config.yaml as a local file (hf:// from the hub cache)."""
    if entry.startswith("hf://"):
        from urllib.parse import parse_qs, urlparse

        parsed = urlparse(entry)
        org_repo, _, filename = parsed.path.lstrip("/").partition("/")
        repo_id = f"{parsed.netloc}/{org_repo}"
        revision = parse_qs(parsed.query).get("revision", [None])[0]
        return repo_file(repo_id, filename, revision=revision)
    path = Path(entry).expanduser()
    return path if path.is_absolute() else directory / path


def transcoder_files(exp: Experiment) -> TranscoderFiles:
    """The experiment's transcoders as local files: an hf:// repo from the hub cache (no
    network call when HF_HUB_OFFLINE is set; every file its config.yaml lists, hf:// entries
    included), or a local directory (config.yaml, or just layer_{i}.safetensors files).

    Hooks come from the repo's config.yaml unless the experiment sets them.
    """
    spec = exp.transcoders
    repo_id, revision = "", None
    if spec.path.startswith("hf://"):
        resolved = resolve_model(spec.path.removeprefix("hf://"), allow_patterns=TRANSCODER_FILES)
        directory, repo_id, revision = resolved.path, resolved.repo_id or "", resolved.revision
    else:
        directory = Path(spec.path)
        if not directory.is_dir():
            raise TranscodersNotFound(
                f"transcoder directory {directory} does not exist: set the experiment's "
                "transcoders.path to a local directory of layer_{i}.safetensors files or an "
                "hf:// repo (cached when offline)"
            )
    cfg = _config_yaml(directory)
    explicit = spec.model_fields_set

    def hook(name: str) -> str:
        value = getattr(spec, name)
        return str(value if name in explicit or name not in cfg else cfg[name])

    kind = spec.kind
    if cfg.get("model_kind") == "cross_layer_transcoder":
        kind = "cross_layer"
    scan = f"{repo_id}@{revision}" if repo_id and revision else str(repo_id or directory)
    listed = cfg.get("transcoders")
    if kind == "cross_layer":
        layers: list[Path] = []
    elif isinstance(listed, list):
        layers = [_listed_file(str(e), directory) for e in listed]
    else:
        found = {
            int(f.stem.removeprefix("layer_")): f for f in directory.glob("layer_*.safetensors")
        }
        if not found or sorted(found) != list(range(len(found))):
            raise TranscodersNotFound(
                f"{directory} must hold layer_0.safetensors ... layer_{{n-1}}.safetensors (one "
                f"per model layer) or a config.yaml listing them; found layers {sorted(found)}"
            )
        layers = [found[i] for i in range(len(found))]
    missing = [f for f in layers if not f.is_file()]
    if missing:
        raise TranscodersNotFound(f"transcoder files missing: {', '.join(map(str, missing[:3]))}")
    return TranscoderFiles(
        kind=kind,
        directory=directory,
        layer_files=layers,
        feature_input_hook=hook("feature_input_hook"),
        feature_output_hook=hook("feature_output_hook"),
        repo_id=repo_id or str(cfg.get("repo_id", "")),
        scan=scan,
    )


def _lazy(setting: bool | str, files: TranscoderFiles) -> bool:
    if isinstance(setting, bool):
        return setting
    return files.size_bytes > LAZY_DECODER_BYTES


def load_transcoders(exp: Experiment, device: torch.device, dtype: torch.dtype) -> ct.Transcoders:
    """The experiment's transcoders, cast to the model dtype (lazy loading as configured)."""
    files = transcoder_files(exp)
    spec = exp.transcoders
    return ct.load_transcoders(
        files,
        device=device,
        dtype=dtype,
        lazy_encoder=_lazy(spec.lazy_encoder, files),
        lazy_decoder=_lazy(spec.lazy_decoder, files),
    )


def load_variant(
    exp: Experiment,
    variant: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path,
    transcoders: ct.Transcoders | None = None,
) -> tuple[ct.ReplacementModel, str]:
    """Load one variant as a ReplacementModel; returns (model, directory it was loaded from).

    ``transcoders`` (same device and dtype) may be shared by the variants of one experiment:
    they are read-only during attribution. Prefer
    :meth:`services.attribution.runtime.Runtime.variant`, which loads each variant once per
    process and shares one transcoder set.
    """
    if variant not in exp.variants:
        raise KeyError(
            f"variant {variant!r} is not in experiment {exp.name!r} (variants: "
            f"{sorted(exp.variants)})"
        )
    directory = model_dir(exp.variants[variant], variant, cache_dir)
    if transcoders is None:
        transcoders = load_transcoders(exp, device, dtype)
    model = ct.replacement_model(directory, transcoders, device=device, dtype=dtype)
    n_model = model.cfg.n_layers
    n_tc = int(transcoders.n_layers)
    if n_model != n_tc:
        raise ValueError(
            f"variant {variant!r}: model {directory} has {n_model} layers but the transcoders "
            f"{exp.transcoders.path} cover {n_tc}: they were trained for another model"
        )
    return model, directory
