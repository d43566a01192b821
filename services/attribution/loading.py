"""One loading path for every variant: model directory -> ReplacementModel with transcoders.

- base: a hub name or a local directory, used as is;
- adapted: base + PEFT adapter, merged once (``merge_and_unload``) and cached under
  ``<cache_dir>/merged/<digest>`` where the digest covers the adapter files and the base's
  identity (content digest of a local directory, or its hub name). An adapter whose recorded
  base (``adapter_config.json`` ``base_model_name_or_path``) is not the configured base is
  refused: the research logs found a merged model silently built on the wrong base.
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
from pathlib import Path

import torch

from common.experiment import Experiment, VariantSpec, path_digest
from services.attribution import ct

log = logging.getLogger(__name__)

#: bump when the merged directory's layout or the merge recipe changes
MERGE_FORMAT = 1
#: transcoder sets larger than this keep decoder rows on disk (read on demand)
LAZY_DECODER_BYTES = 2 * 2**30

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class AdapterMismatch(ValueError):
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


def _base_identities(base: str) -> set[str]:
    """Names under which a configured base may be recorded by an adapter."""
    names = {base}
    p = Path(base).expanduser()
    if p.exists():
        names.add(str(p.resolve()))
        cfg = p / "config.json"
        if cfg.is_file():
            recorded = json.loads(cfg.read_text()).get("_name_or_path")
            if recorded:
                names.add(str(recorded))
    return names


def check_adapter_base(adapter_dir: str | Path, base: str, variant: str) -> None:
    """Refuse an adapter whose recorded base differs from the configured one.

    Matches by the same string, the same resolved local path, or the configured local
    directory's ``config.json`` ``_name_or_path``.
    """
    recorded = _recorded_base(Path(adapter_dir))
    candidates = {recorded}
    rp = Path(recorded).expanduser()
    if rp.exists():
        candidates.add(str(rp.resolve()))
    known = _base_identities(base)
    if candidates & known:
        return
    raise AdapterMismatch(
        f"variant {variant!r}: adapter {adapter_dir} was trained on base "
        f"{recorded!r}, but the experiment's base is {base!r} (known as {sorted(known)}). "
        f"Point variants.{variant}.model at the adapter's base model, or use an adapter "
        "trained on this base."
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


def _saved_dtype(base: str) -> torch.dtype:
    """The dtype the base checkpoint is stored in (merged weights are saved the same way)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    name = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name
    if isinstance(name, str) and name in _DTYPES:
        return _DTYPES[name]
    return torch.float32


def merge_adapter(spec: VariantSpec, variant: str, cache_dir: Path) -> Path:
    """The merged model directory for ``spec`` (built once, then reused from the cache)."""
    if spec.adapter is None:
        raise ValueError(f"variant {variant!r} has no adapter to merge")
    check_adapter_base(spec.adapter, spec.model, variant)
    root = cache_dir / "merged"
    final = root / merged_digest(spec)
    with _file_lock(root / f"{final.name}.lock"):
        if (final / "emc-merge.json").is_file():
            return final
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("merging adapter %s into %s -> %s", spec.adapter, spec.model, final)
        save_dtype = _saved_dtype(spec.model)
        base_model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base_model, spec.adapter).merge_and_unload()
        tmp = root / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            merged.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(spec.model).save_pretrained(tmp)
            (tmp / "emc-merge.json").write_text(
                json.dumps(
                    {
                        "format": MERGE_FORMAT,
                        "base": spec.model,
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
    """What the ReplacementModel loads: the base itself, or the merged directory."""
    if spec.adapter is None:
        return spec.model
    return str(merge_adapter(spec, variant, cache_dir))


# ------------------------------------------------------------------------ transcoders + model


def _lazy_decoder(path: str) -> bool:
    p = Path(path)
    if not p.is_dir():
        return True  # hub sets are large
    size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return size > LAZY_DECODER_BYTES


def load_transcoders(exp: Experiment, device: torch.device, dtype: torch.dtype) -> ct.Transcoders:
    """The experiment's transcoders, cast to the model dtype."""
    spec = exp.transcoders
    return ct.load_transcoders(
        spec.path,
        kind=spec.kind,
        feature_input_hook=spec.feature_input_hook,
        feature_output_hook=spec.feature_output_hook,
        device=device,
        dtype=dtype,
        lazy_decoder=_lazy_decoder(spec.path),
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
