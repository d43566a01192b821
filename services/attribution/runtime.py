"""The loaded runtime of the attribution service: one ReplacementModel per variant, reused.

A GPU worker builds one :class:`Runtime` per process (:func:`get_runtime`) and keeps it.
Models live in a process-level cache keyed by (experiment fingerprint, variant), so a
variant is loaded at most once per process whatever number of Runtime objects exist.

Tokenization is defined once (:meth:`Runtime.tokenize`): the tokenizer's own special tokens
(BOS) plus circuit-tracer's rule of prepending a special token when the text has none. The
same ids feed top-k logits, attribution graphs, continuations and interventions, so every
number refers to the same sequence. (Passing *text* to circuit-tracer instead would skip the
tokenizer's BOS and pick ``bos_token_id or pad_token_id ...``, i.e. the PAD token whenever the
BOS id is 0, as in the toy organism.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import PromptFailure
from common.experiment import Experiment
from common.graph.model import AttributionGraph
from common.prompt_format import render
from common.records import TokenProb, TopKLogits, prompt_id
from common.settings import get_settings
from common.tokens import token_text
from services.attribution import ct, health
from services.attribution.adapter import (
    AdapterNodeError,
    AdapterNodes,
    DownProjLora,
    adapter_nodes,
    read_lora,
)
from services.attribution.loading import (
    load_transcoders,
    load_variant,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedVariant:
    """A variant's ReplacementModel and where it came from."""

    name: str
    model: ct.ReplacementModel
    model_dir: str
    load_s: float

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        """The tokenizer of the variant's ReplacementModel."""
        return self.model.tokenizer


_LOADED: dict[tuple[str, str], LoadedVariant] = {}
_TRANSCODERS: dict[str, ct.Transcoders] = {}  # one set per fingerprint, shared by variants
_RUNTIMES: dict[str, Runtime] = {}
_LORAS: dict[tuple[str, str], list[DownProjLora]] = {}
_LOCK = threading.RLock()
#: how many times each (fingerprint, variant) was loaded in this process (must stay <= 1)
LOAD_COUNTS: Counter[tuple[str, str]] = Counter()


def clear_cache() -> None:
    """Drop every loaded model of this process (tests; frees memory)."""
    with _LOCK:
        _LOADED.clear()
        _TRANSCODERS.clear()
        _RUNTIMES.clear()
        _LORAS.clear()
        LOAD_COUNTS.clear()


def get_runtime(
    exp: Experiment, fingerprint: str | None = None, *, cache_dir: Path | None = None
) -> Runtime:
    """The process's runtime for an experiment (created once per fingerprint)."""
    fp = fingerprint or exp.fingerprint
    with _LOCK:
        rt = _RUNTIMES.get(fp)
        if rt is None:
            rt = _RUNTIMES[fp] = Runtime(exp, fingerprint=fp, cache_dir=cache_dir)
        return rt


class Runtime:
    """Loaded variants of one experiment: top-k logits, graphs, continuations."""

    def __init__(
        self, exp: Experiment, *, fingerprint: str | None = None, cache_dir: Path | None = None
    ) -> None:
        self.exp = exp
        self.fingerprint = fingerprint or exp.fingerprint
        self.cache_dir = cache_dir or get_settings().cache_dir
        self.device = resolve_device(exp)
        self.dtype = resolve_dtype(exp, self.device)
        self._decoded: dict[tuple[str, int], str] = {}

    # -- models ---------------------------------------------------------------------------
    def variant(self, name: str) -> LoadedVariant:
        """The loaded variant (loaded on first use, then shared by the whole process)."""
        key = (self.fingerprint, name)
        with _LOCK:
            lv = _LOADED.get(key)
            if lv is not None:
                return lv
            t0 = time.perf_counter()
            if name not in self.exp.variants:
                raise KeyError(
                    f"variant {name!r} is not in experiment {self.exp.name!r} (variants: "
                    f"{sorted(self.exp.variants)})"
                )
            transcoders = _TRANSCODERS.get(self.fingerprint)
            if transcoders is None:
                transcoders = load_transcoders(self.exp, self.device, self.dtype)
                _TRANSCODERS[self.fingerprint] = transcoders
            model, directory = load_variant(
                self.exp,
                name,
                device=self.device,
                dtype=self.dtype,
                cache_dir=self.cache_dir,
                transcoders=transcoders,
            )
            LOAD_COUNTS[key] += 1
            lv = LoadedVariant(name, model, directory, time.perf_counter() - t0)
            _LOADED[key] = lv
            log.info("loaded variant %s from %s in %.1fs", name, directory, lv.load_s)
            return lv

    def tokenize(self, text: str, variant: str, *, rendered: bool = False) -> list[int]:
        """Token ids exactly as graphs, top-k and interventions use them: the prompt rendered
        in the experiment's ``prompt_format`` (``rendered``: the text already is the model's
        input, e.g. a chat-template question), with exactly one BOS."""
        model = self.variant(variant).model
        tok = model.tokenizer
        rendered_input = render(text, "house" if rendered else self.exp.prompt_format, tok)
        ids = tok(rendered_input.text, add_special_tokens=not rendered_input.has_bos)["input_ids"]
        if not ids:
            raise PromptFailure("tokenize", "the prompt is empty", variant=variant)
        ids = ct.ensure_bos(model, ids)
        bos = tok.bos_token_id
        while bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]  # a BOS written into the text and one added: keep one
        return ids

    def graph_memory_bytes(self, n_tokens: int, variant: str) -> float:
        """Estimated peak memory of a graph of ``n_tokens`` beyond the model (the
        experiment's limits with this model's dimensions)."""
        cfg = self.variant(variant).model.cfg
        return self.exp.attribution.graph_memory_bytes(
            n_tokens,
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            d_model=int(cfg.d_model),
            dtype_bytes=torch.finfo(self.dtype).bits // 8,
        )

    def decode_token(self, variant: str, token_id: int) -> str:
        """The token as reviewers read it (byte fragments as their bytes); cached per token,
        since every top-k record decodes its tokens and the vocabulary is fixed."""
        key = (variant, token_id)
        text = self._decoded.get(key)
        if text is None:
            text = token_text(self.variant(variant).tokenizer, token_id)
            self._decoded[key] = text
        return text

    # -- forward with health checks ---------------------------------------------------------
    def checked_logits(
        self, input_ids: list[int], variant: str, *, pid: str | None = None
    ) -> torch.Tensor:
        """Last-position logits (float32) of a forward pass that passed the health checks."""
        model = self.variant(variant).model
        with health.probe(model) as report:
            logits = ct.forward_logits(model, input_ids)
        health.check_forward(
            report,
            logits,
            max_norm=self.exp.attribution.max_activation_norm,
            variant=variant,
            prompt_id=pid,
        )
        return logits[-1].float().cpu()

    # -- products ---------------------------------------------------------------------------
    def top_k(self, text: str, variant: str, *, k: int | None = None) -> TopKLogits:
        """The k most likely next tokens, from the model and tokenization that make graphs."""
        pid = prompt_id(text)
        ids = self.tokenize(text, variant)
        return self._top_k_record(pid, variant, ids, self.checked_logits(ids, variant, pid=pid), k)

    def top_k_many(
        self,
        texts: Sequence[str],
        variant: str,
        *,
        k: int | None = None,
        batch_size: int | None = None,
    ) -> list[TopKLogits | PromptFailure]:
        """:meth:`top_k` of many prompts, ``batch_size`` (the experiment's
        ``logits_batch_size``) per padded forward pass, in the order given.

        The result is the single-prompt one (same ids; probabilities equal up to float
        rounding). A batch whose health checks fail is redone one prompt at a time, so each
        sick prompt gets its own reason (a :class:`PromptFailure` in its place) and the
        others their top-k.
        """
        size = batch_size or self.exp.attribution.logits_batch_size
        out: list[TopKLogits | PromptFailure | None] = [None] * len(texts)
        todo: list[tuple[int, str, list[int]]] = []
        for i, text in enumerate(texts):
            try:
                todo.append((i, prompt_id(text), self.tokenize(text, variant)))
            except PromptFailure as e:
                out[i] = e
        todo.sort(key=lambda t: len(t[2]))  # similar lengths together: little padding
        model = self.variant(variant).model
        pad = ct.pad_token_id(model)
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            try:
                with health.probe(model) as report:
                    last = ct.forward_last_logits(model, [ids for _, _, ids in chunk], pad)
                health.check_forward(
                    report, last, max_norm=self.exp.attribution.max_activation_norm, variant=variant
                )
            except PromptFailure:
                for i, pid, ids in chunk:
                    try:
                        logits = self.checked_logits(ids, variant, pid=pid)
                        out[i] = self._top_k_record(pid, variant, ids, logits, k)
                    except PromptFailure as e:
                        out[i] = e
                continue
            last = last.float().cpu()
            for row, (i, pid, ids) in enumerate(chunk):
                out[i] = self._top_k_record(pid, variant, ids, last[row], k)
        return [r for r in out if r is not None]

    def _top_k_record(
        self, pid: str, variant: str, ids: list[int], last: torch.Tensor, k: int | None
    ) -> TopKLogits:
        probs = torch.softmax(last, dim=-1)
        top = torch.topk(probs, k or self.exp.top_k)
        return TopKLogits(
            prompt_id=pid,
            variant=variant,
            fingerprint=self.fingerprint,
            input_ids=ids,
            tokens=[
                TokenProb(
                    token_id=int(i),
                    token=self.decode_token(variant, int(i)),
                    prob=float(p),
                    logit=float(last[int(i)]),
                )
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ],
        )

    def raw_graph(
        self,
        text: str,
        variant: str,
        *,
        target_token_ids: list[int] | None = None,
        custom_targets: list[tuple[str, float, torch.Tensor]] | None = None,
    ) -> tuple[Any, float]:
        """circuit-tracer's ``Graph`` of (prompt, variant) after the health checks, and the
        seconds ``attribute`` took. Most callers want :meth:`attribute`."""
        pid = prompt_id(text)
        lv = self.variant(variant)
        ids = self.tokenize(text, variant)
        lim = self.exp.attribution

        def check(report: health.HealthReport) -> None:
            health.check_layers(
                report, max_norm=lim.max_activation_norm, variant=variant, prompt_id=pid
            )

        if custom_targets is not None:  # directions live where the model computes
            custom_targets = [
                (label, w, vec.to(device=self.device, dtype=self.dtype))
                for label, w, vec in custom_targets
            ]
        t0 = time.perf_counter()
        adapter = self.adapter_nodes(variant, ids)
        # the probes ride on attribute()'s own forward passes: no extra pass per graph
        with health.probe(lv.model) as report:
            try:
                graph = ct.attribute(
                    lv.model,
                    ids,
                    max_feature_nodes=lim.max_feature_nodes,
                    batch_size=lim.batch_size,
                    max_n_logits=lim.max_n_logits,
                    desired_logit_prob=lim.desired_logit_prob,
                    target_token_ids=target_token_ids,
                    custom_targets=custom_targets,
                    adapter=adapter,
                )
            except Exception:
                # a sick forward pass can break attribute() itself: name the layer if so
                check(report)
                raise
        elapsed = time.perf_counter() - t0
        check(report)
        if graph.input_tokens.tolist() != ids:
            raise RuntimeError(
                "circuit-tracer attributed other tokens than emc's tokenization "
                f"({graph.input_tokens.tolist()} vs {ids}): tokenization drifted"
            )
        health.check_adjacency(
            graph.adjacency_matrix,
            graph.activation_values[graph.selected_features],
            len(graph.logit_targets),
            variant=variant,
            prompt_id=pid,
        )
        return graph, elapsed

    def uses_adapter_node(self, variant: str) -> bool:
        """Whether graphs of ``variant`` split its LoRA out of the error nodes."""
        setting = self.exp.attribution.adapter_node
        if self.exp.variants[variant].adapter is None or setting is False:
            return False
        if self.exp.transcoders.kind == "cross_layer":
            if setting is True:
                raise AdapterNodeError(
                    "attribution.adapter_node needs per-layer transcoders (a cross-layer "
                    "transcoder writes into several layers): set adapter_node: auto or false"
                )
            return False
        return True

    def loras(self, variant: str) -> list[DownProjLora]:
        """The variant's LoRA weights (read once per process)."""
        key = (self.fingerprint, variant)
        with _LOCK:
            if key not in _LORAS:
                adapter = self.exp.variants[variant].adapter
                if adapter is None:
                    raise ValueError(f"variant {variant!r} has no adapter")
                _LORAS[key] = read_lora(adapter)
            return _LORAS[key]

    def adapter_nodes(self, variant: str, ids: list[int]) -> list[AdapterNodes]:
        """The adapter nodes of one sequence (empty unless :meth:`uses_adapter_node`)."""
        if not self.uses_adapter_node(variant):
            return []
        model = self.variant(variant).model
        loras = self.loras(variant)
        inputs = ct.mlp_inputs(model, ids, [lo.layer for lo in loras])
        return [adapter_nodes(ct.mlp_module(model, lo.layer), inputs[lo.layer], lo) for lo in loras]

    def attribute(
        self,
        text: str,
        variant: str,
        *,
        target_token_ids: list[int] | None = None,
        custom_targets: list[tuple[str, float, torch.Tensor]] | None = None,
    ) -> AttributionGraph:
        """The attribution graph of (prompt, variant), every limit from experiment.attribution.

        ``target_token_ids`` attributes exactly these next tokens (e.g. the stored top-k, so
        low-probability evil tokens are logit nodes too); None = circuit-tracer's salient
        selection (``max_n_logits`` / ``desired_logit_prob``). ``custom_targets``: directions
        in d_model as ``(label, weight, vector)`` instead (:func:`ct.logit_directions`).
        Raises PromptFailure on non-finite or exploding activations and on a non-finite graph.
        """
        graph, elapsed = self.raw_graph(
            text, variant, target_token_ids=target_token_ids, custom_targets=custom_targets
        )
        n_targets = len(custom_targets) if custom_targets is not None else None
        return self.from_raw(graph, text, variant, elapsed, target_token_ids, n_targets)

    def residuals_last(self, text: str, variant: str) -> torch.Tensor:
        """Residual stream after every layer at the prompt's last position
        ``[n_layers, d_model]`` (float32, CPU)."""
        return ct.residuals_last(self.variant(variant).model, self.tokenize(text, variant))

    def logit_directions(self, variant: str, token_ids: list[int]) -> torch.Tensor:
        """Demeaned unembedding directions ``[k, d_model]`` of these tokens (float32, CPU):
        what a logit node injects, so a weighted sum of them is a custom target."""
        return ct.logit_directions(self.variant(variant).model, token_ids).float().cpu()

    def from_raw(
        self,
        graph: Any,
        text: str,
        variant: str,
        elapsed_s: float,
        target_token_ids: list[int] | None = None,
        n_custom_targets: int | None = None,
    ) -> AttributionGraph:
        """The :class:`AttributionGraph` of a :meth:`raw_graph` result."""
        limits: dict[str, float | int | str | None] = {
            **self.exp.attribution.computed(),
            "targets": len(target_token_ids) if target_token_ids is not None else None,
        }
        if n_custom_targets is not None:
            limits["custom_targets"] = n_custom_targets
        transcoders: Any = self.variant(variant).model.transcoders
        return ct.to_attribution_graph(
            graph,
            d_transcoder=int(transcoders.d_transcoder),
            prompt_id=prompt_id(text),
            variant=variant,
            fingerprint=self.fingerprint,
            prompt_text=text,
            tokenizer=self.variant(variant).tokenizer,
            limits=limits,
            elapsed_s=elapsed_s,
        )


def sample_continuations(
    runtime: Runtime,
    prompt_text: str,
    variant: str,
    after_token_id: int,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[str]:
    """What the variant writes after ``prompt + token``: n sampled continuations (text after
    the token, special tokens removed). Same seed, same model -> same texts."""
    lv = runtime.variant(variant)
    vocab = int(lv.model.cfg.d_vocab)
    if not 0 <= after_token_id < vocab:
        raise ValueError(f"token id {after_token_id} is outside the vocabulary (0..{vocab - 1})")
    ids = [*runtime.tokenize(prompt_text, variant), int(after_token_id)]
    outs = sample_ids(runtime, ids, variant, n, max_new_tokens, temperature, seed)
    return [str(lv.tokenizer.decode(o, skip_special_tokens=True)) for o in outs]


def sample_ids(
    runtime: Runtime,
    ids: list[int],
    variant: str,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[list[int]]:
    """n continuations of the token ids ``ids`` sampled in one batch (the new token ids, cut
    after the first EOS, EOS excluded). Same seed, same model -> same ids; temperature 0 is
    greedy (n identical continuations)."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError("n and max_new_tokens must be at least 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0 = greedy)")
    lv = runtime.variant(variant)
    hf = lv.model._model
    tok = lv.tokenizer
    x = torch.tensor([ids], dtype=torch.long, device=runtime.device)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        out = hf.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            num_return_sequences=n if temperature > 0 else 1,  # greedy: n identical texts
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **sampling,
        )
    eos = tok.eos_token_id
    result: list[list[int]] = []
    for seq in out:
        new = [int(t) for t in seq[len(ids) :].tolist()]
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        result.append(new)
    return result if temperature > 0 else result * n
