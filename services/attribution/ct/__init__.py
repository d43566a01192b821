"""The one package that calls circuit-tracer (pinned ``circuit-tracer==0.5.0``); :mod:`.fast`
is emc's attribution driver around upstream's pieces (docs/upstream-attribution.md).

Everything else in emc goes through these functions, so an upstream release that moves or
renames things is a change here only. Imports of circuit-tracer happen inside functions:
importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.graph.model import AttributionGraph
from common.records import GraphManifest
from common.tokens import token_text
from services.attribution.ct.fast import UpstreamChanged

if TYPE_CHECKING:
    from circuit_tracer.graph import Graph
    from circuit_tracer.replacement_model.replacement_model_nnsight import (
        NNSightReplacementModel,
    )
    from circuit_tracer.transcoder import TranscoderSet
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    from services.attribution.adapter import AdapterNodes
    from services.attribution.loading import TranscoderFiles

    ReplacementModel = NNSightReplacementModel
    Transcoders = TranscoderSet | CrossLayerTranscoder
else:
    ReplacementModel = Any
    Transcoders = Any

#: (layer, position, feature, value): the intervention tuple of ReplacementModel.
Intervention = tuple[int, int | slice, int, float]
#: With an empty list circuit-tracer re-tokenizes its input (and fails on token ids); this
#: intervention changes nothing (activations at position 0 are zeroed by circuit-tracer), so
#: "no intervention" runs the very same code path as a real one.
NO_OP: Intervention = (0, 0, 0, 0.0)


def load_transcoders(
    files: TranscoderFiles,
    *,
    device: torch.device,
    dtype: torch.dtype,
    lazy_encoder: bool,
    lazy_decoder: bool,
) -> Transcoders:
    """Transcoders from local files only (hub repos are resolved to local files first, by
    :func:`services.attribution.loading.transcoder_files`: circuit-tracer's own hub loader
    calls ``repo_info`` even when the files are cached, which fails offline)."""
    from circuit_tracer.utils.hf_utils import load_transcoders as _load

    if files.kind == "cross_layer":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        return load_clt(
            str(files.directory),
            feature_input_hook=files.feature_input_hook,
            feature_output_hook=files.feature_output_hook,
            scan=files.scan,
            device=device,
            dtype=dtype,
            lazy_encoder=lazy_encoder,
            lazy_decoder=lazy_decoder,
        )
    config = {
        "model_kind": "transcoder_set",
        "transcoders": [str(f) for f in files.layer_files],
        "repo_id": files.repo_id,
        "scan": files.scan,
        "feature_input_hook": files.feature_input_hook,
        "feature_output_hook": files.feature_output_hook,
    }
    return _load(
        config, device=device, dtype=dtype, lazy_encoder=lazy_encoder, lazy_decoder=lazy_decoder
    )


def replacement_model(
    model_dir: str, transcoders: Transcoders, *, device: torch.device, dtype: torch.dtype
) -> ReplacementModel:
    """circuit-tracer's ReplacementModel on the nnsight backend (accepts local directories;
    the transformerlens backend only takes official hub names)."""
    from circuit_tracer import ReplacementModel as _RM

    model = _RM.from_pretrained_and_transcoders(
        model_dir, transcoders, backend="nnsight", device=device, dtype=dtype
    )
    # nnsight generation fails on token_type_ids when a tokenizer lists them.
    model.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return model


def ensure_bos(model: ReplacementModel, input_ids: Sequence[int]) -> list[int]:
    """circuit-tracer's own rule: prepend a special token unless the ids start with one."""
    ids = model.ensure_tokenized(list(input_ids))
    return [int(x) for x in ids.tolist()]


def attribute(
    model: ReplacementModel,
    input_ids: Sequence[int],
    *,
    max_feature_nodes: int,
    batch_size: int,
    max_n_logits: int,
    desired_logit_prob: float,
    target_token_ids: Sequence[int] | None = None,
    custom_targets: Sequence[tuple[str, float, torch.Tensor]] | None = None,
    adapter: Sequence[AdapterNodes] = (),
    rows_per_pass: int | None = None,
) -> Graph:
    """An attribution graph: circuit-tracer's graph for these limits, computed by emc's own
    driver (:mod:`.fast`: gather-free contraction, pass width per device; same numbers as
    stock ``attribute`` with this ``batch_size``, checked by tests/attribution).

    ``adapter``: adapter nodes split out of their layers' error nodes
    (:func:`inject_adapter_nodes`); they are always in the graph (attributed first), with
    feature ids ``d_transcoder + j``. ``rows_per_pass`` None: chosen per device.
    ``custom_targets``: ``(label, weight, vector)`` directions in d_model as the logit nodes
    instead of tokens (their node ids are ``vocab_size + i``, circuit-tracer's virtual ids).
    """
    from services.attribution.ct import fast

    prepare = None
    if adapter:
        transcoders: Any = model.transcoders
        d_tc = int(transcoders.d_transcoder)

        def prepare(ctx: Any) -> torch.Tensor:
            inject_adapter_nodes(ctx, adapter, d_tc)
            features = ctx.activation_matrix.indices()[2]
            return torch.nonzero(features >= d_tc).flatten()

    return fast.attribute(
        model,
        list(input_ids),
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        target_token_ids=target_token_ids,
        custom_targets=custom_targets,
        rows_per_pass=rows_per_pass,
        prepare=prepare,
    )


def logit_directions(model: ReplacementModel, token_ids: Sequence[int]) -> torch.Tensor:
    """The demeaned unembedding directions ``[k, d_model]`` circuit-tracer injects for these
    tokens' logit nodes (a logit minus the mean logit: softmax ignores a shared shift)."""
    from circuit_tracer.attribution.targets import AttributionTargets

    unembed = model.unembed_proj  # nnsight backend: (d_vocab, d_model)
    if int(unembed.shape[1]) != int(model.cfg.d_model):
        raise UpstreamChanged(
            f"unembed_proj has shape {tuple(unembed.shape)}, not (vocab, d_model)"
        )
    vocab = int(unembed.shape[0])
    targets = AttributionTargets(
        attribution_targets=torch.tensor(list(token_ids), dtype=torch.long),
        logits=torch.zeros(vocab),
        unembed_proj=model.unembed_proj,
        tokenizer=model.tokenizer,
    )
    vecs: torch.Tensor = targets.logit_vectors
    return vecs


def hook_modules(model: ReplacementModel, layer: int) -> list[tuple[str, torch.nn.Module, str]]:
    """Plain torch modules to probe at one layer: (hook name, module, 'input'|'output').

    Uses circuit-tracer's own architecture mapping for the transcoder hooks; locations inside
    a module's source (nnsight ``.source``) cannot take torch hooks and are left out.
    """
    hf = model._model
    out: list[tuple[str, torch.nn.Module, str]] = []
    spec = [
        ("mlp.hook_in", model._feature_input_pattern, model._feature_input_io),
        ("mlp.hook_out", model._feature_output_pattern, "output"),
        ("hook_resid_post", f"{model._pre_logit_location}.layers[{{layer}}]", "output"),
    ]
    for name, pattern, io in spec:
        if ".source" in pattern:
            continue
        out.append((name, model._resolve_attr(hf, pattern.format(layer=layer)), io))
    return out


def forward_logits(model: ReplacementModel, input_ids: Sequence[int]) -> torch.Tensor:
    """Logits ``[pos, vocab]`` of one sequence, traced exactly as ``attribute`` traces it."""
    from nnsight import save

    with torch.inference_mode(), model.trace(torch.tensor(list(input_ids), dtype=torch.long)):
        logits = save(model.output.logits)
    return logits[0]


def forward_last_logits(
    model: ReplacementModel, sequences: Sequence[Sequence[int]], pad_id: int
) -> torch.Tensor:
    """Logits ``[n, vocab]`` at the last real token of each sequence, from one traced pass.

    Sequences are right-padded with ``pad_id`` under an attention mask; attention is causal,
    so a sequence's own positions never see its padding and positions keep their ids.
    """
    from nnsight import save

    lengths = [len(s) for s in sequences]
    input_ids = torch.full((len(sequences), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    # one line: nnsight reads the with-statement's source and cannot parse a wrapped one
    with torch.inference_mode(), model.trace(inputs):
        logits = save(model.output.logits)
    last = torch.tensor(lengths, dtype=torch.long, device=logits.device) - 1
    return logits[torch.arange(len(sequences), device=logits.device), last]


def pad_token_id(model: ReplacementModel) -> int:
    """The id used to pad batches: the tokenizer's pad token, else EOS, else 0 (masked out,
    so any valid id does)."""
    pad = _pad_id(model.tokenizer)
    return int(pad) if pad is not None else 0


def transcoder_activations(model: ReplacementModel, input_ids: Sequence[int]) -> torch.Tensor:
    """Feature activations ``[layers, pos, d_transcoder]`` (dense) of one sequence."""
    _, acts = model.get_activations(torch.tensor(list(input_ids), dtype=torch.long))
    return acts


def feature_intervention(
    model: ReplacementModel, input_ids: Sequence[int], interventions: Sequence[Intervention]
) -> torch.Tensor:
    """Logits ``[pos, vocab]`` with features SET to values (attention frozen, effects
    propagate through later transcoders)."""
    run: Any = model.feature_intervention  # upstream's bare @torch.no_grad confuses mypy
    logits, _ = run(
        torch.tensor(list(input_ids), dtype=torch.long),
        list(interventions) or [NO_OP],
        freeze_attention=True,
        return_activations=False,
    )
    return logits[0]


def feature_intervention_generate(
    model: ReplacementModel,
    input_ids: Sequence[int],
    interventions: Sequence[Intervention],
    *,
    max_new_tokens: int,
    temperature: float,
) -> str:
    """One sampled continuation with interventions applied; returns the full decoded text
    (prompt included, as circuit-tracer decodes it).

    circuit-tracer's generation fails (nnsight: "cannot unpack non-iterable NoneType") when
    the model stops (EOS) one token before ``max_new_tokens``; the sample is then drawn again
    from the same random state with a smaller budget, which gives the same tokens up to the
    stop.
    """
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    run: Any = model.feature_intervention_generate
    cuda = torch.cuda.is_available()
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if cuda else None
    for budget in range(max_new_tokens, 0, -1):
        torch.random.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        try:
            text, _, _ = run(
                torch.tensor(list(input_ids), dtype=torch.long),
                list(interventions) or [NO_OP],
                freeze_attention=True,
                return_activations=False,
                max_new_tokens=budget,
                pad_token_id=_pad_id(model.tokenizer),
                **sampling,
            )
        except Exception as e:  # nnsight wraps every error in its own exception type
            if budget == 1 or "cannot unpack non-iterable NoneType" not in str(e):
                raise
            continue
        return str(text)
    raise AssertionError("unreachable: the loop returns or raises")


def _pad_id(tokenizer: Any) -> int | None:
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else tokenizer.eos_token_id


def make_graph(
    *,
    input_ids: Sequence[int],
    input_string: str,
    features: torch.Tensor,
    activations: torch.Tensor,
    adjacency: torch.Tensor,
    logit_token_ids: Sequence[int],
    logit_tokens: Sequence[str],
    logit_probabilities: Sequence[float],
    cfg: Any,
    vocab_size: int,
    scan: str | None,
) -> Graph:
    """A circuit-tracer ``Graph`` from stored parts (every stored feature is 'selected')."""
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.graph import Graph as _Graph

    return _Graph(
        input_string=input_string,
        input_tokens=torch.tensor(list(input_ids), dtype=torch.long),
        active_features=features.to(torch.long),
        adjacency_matrix=adjacency.to(torch.float32),
        cfg=cfg,
        selected_features=torch.arange(features.shape[0], dtype=torch.long),
        activation_values=activations.to(torch.float32),
        logit_targets=[
            LogitTarget(token_str=s, vocab_idx=int(i))
            for s, i in zip(logit_tokens, logit_token_ids, strict=True)
        ],
        logit_probabilities=torch.tensor(list(logit_probabilities), dtype=torch.float32),
        scan=scan,
        vocab_size=vocab_size,
    )


def unified_config(model_dir: str, n_layers: int) -> Any:
    """circuit-tracer's UnifiedConfig for a model directory (offline: reads config.json)."""
    from circuit_tracer.utils.tl_nnsight_mapping import convert_nnsight_config_to_transformerlens
    from transformers import AutoConfig

    cfg = convert_nnsight_config_to_transformerlens(AutoConfig.from_pretrained(model_dir))
    if cfg.n_layers != n_layers:
        raise ValueError(
            f"model {model_dir} has {cfg.n_layers} layers but the graph has {n_layers}: "
            "the graph was made with another model"
        )
    cfg.tokenizer_name = model_dir
    return cfg


def write_viewer_files(
    graph: Graph,
    tokenizer: Any,
    out_dir: Path,
    *,
    slug: str,
    scan: str,
    node_threshold: float,
    edge_threshold: float,
) -> Path:
    """circuit-tracer's ``create_graph_files`` with a local tokenizer object (no hub lookup)
    and collision-free error-node ids; returns the graph JSON path.

    Upstream issue 78: circuit-tracer 0.5.0 names error nodes ``0_{layer}_{pos}``, which
    collides with the layer-0 feature ``{layer}_{feature}_{pos}`` whenever feature id ==
    error layer (and the viewer's ``jsNodeId`` ``{layer}_{pos}-0`` collides with feature
    ``{layer}_{feature}-0``). The upstream fix (PRs 100/102) names them ``{layer}_-1_{pos}``;
    we apply the same ids here before edges are built.
    """
    from circuit_tracer.frontend.utils import add_graph_metadata
    from circuit_tracer.graph import prune_graph
    from circuit_tracer.utils.create_graph_files import (
        build_model,
        create_nodes,
        create_used_nodes_and_edges,
    )

    node_mask, edge_mask, cumulative_scores = prune_graph(graph, node_threshold, edge_threshold)
    nodes = create_nodes(graph, node_mask, tokenizer, cumulative_scores)
    for node in nodes.values():
        if node.feature_type == "mlp reconstruction error":
            fixed = f"{node.layer}_-1_{node.ctx_idx}"
            node.node_id = fixed
            node.jsNodeId = f"{fixed}-0"
    used_nodes, used_edges = create_used_nodes_and_edges(graph, nodes, edge_mask)
    model = build_model(graph, used_nodes, used_edges, slug, scan, node_threshold, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slug}.json"
    path.write_text(model.model_dump_json(indent=2))
    add_graph_metadata(model.metadata.model_dump(), str(out_dir))
    return path


def to_attribution_graph(
    graph: Any,
    *,
    prompt_id: str,
    variant: str,
    fingerprint: str,
    prompt_text: str,
    tokenizer: Any,
    limits: dict[str, float | int | str | None],
    elapsed_s: float = 0.0,
    d_transcoder: int | None = None,
) -> AttributionGraph:
    """Convert a circuit-tracer ``Graph`` (dense, unpruned) to :class:`AttributionGraph`.

    Feature nodes are the graph's *selected* features, in circuit-tracer's order.
    """
    sel = graph.selected_features.cpu()
    features = graph.active_features.cpu()[sel].to(torch.int64)
    if d_transcoder is not None:
        # adapter nodes came in as extra features d_transcoder + j: emc's id is -(j + 1)
        extra = features[:, 2] >= d_transcoder
        features[extra, 2] = -(features[extra, 2] - d_transcoder) - 1
    activations = graph.activation_values.cpu()[sel].to(torch.float32)
    adjacency = graph.adjacency_matrix.cpu().to(torch.float32)
    ids = [int(x) for x in graph.input_tokens.cpu().tolist()]
    n_layers = int(graph.cfg.n_layers)
    n_pos, n_feat, n_logits = len(ids), int(features.shape[0]), len(graph.logit_targets)
    n = n_feat + (n_layers + 1) * n_pos + n_logits
    if tuple(adjacency.shape) != (n, n):
        raise ValueError(
            f"adjacency {tuple(adjacency.shape)} does not match {n_feat} features, "
            f"{n_layers} layers x {n_pos} positions and {n_logits} logits"
        )
    scan = graph.scan
    manifest = GraphManifest(
        prompt_id=prompt_id,
        variant=variant,
        fingerprint=fingerprint,
        prompt_text=prompt_text,
        input_ids=ids,
        input_tokens=[token_text(tokenizer, i) for i in ids],
        n_layers=n_layers,
        n_pos=n_pos,
        n_features=n_feat,
        n_logits=n_logits,
        logit_token_ids=[int(t.vocab_idx) for t in graph.logit_targets],
        logit_tokens=[str(t.token_str) for t in graph.logit_targets],
        logit_probabilities=[float(p) for p in graph.logit_probabilities.cpu().tolist()],
        adjacency_dtype="float32",
        tensors={"adjacency": [n, n], "features": [n_feat, 3], "activations": [n_feat]},
        limits=dict(limits),
        scan="-".join(scan) if isinstance(scan, list) else scan,
        elapsed_s=elapsed_s,
    )
    return AttributionGraph(
        manifest=manifest, adjacency=adjacency, features=features, activations=activations
    )


# ------------------------------------------------------------------------ the adapter as nodes


def mlp_inputs(
    model: ReplacementModel, input_ids: Sequence[int], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """The MLP inputs ``[n_pos, d_model]`` of the given layers for one sequence (one plain
    forward pass of the underlying model)."""
    hf = model._model
    modules = dict(hf.named_modules())
    found: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        name = next((n for n in modules if n.endswith(f"layers.{layer}.mlp")), None)
        if name is None:
            raise ValueError(f"the model has no layers.{layer}.mlp module")

        def keep(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], layer: int = layer) -> None:
            found[layer] = args[0].detach()[0]

        handles.append(modules[name].register_forward_pre_hook(keep))
    try:
        device = next(hf.parameters()).device
        with torch.no_grad():
            hf(torch.tensor([list(input_ids)], dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    return found


def mlp_module(model: ReplacementModel, layer: int) -> torch.nn.Module:
    """The underlying model's MLP module of one layer."""
    modules = dict(model._model.named_modules())
    name = next((n for n in modules if n.endswith(f"layers.{layer}.mlp")), None)
    if name is None:
        raise ValueError(f"the model has no layers.{layer}.mlp module")
    return modules[name]


def inject_adapter_nodes(ctx: Any, nodes: Sequence[AdapterNodes], d_transcoder: int) -> int:
    """Add adapter nodes to circuit-tracer's attribution context as extra active "features"
    (feature id ``d_transcoder + j``) and take what they write out of their layer's error
    nodes; returns how many nodes were added.

    Each node gets the activation, the activation-scaled write (``decoder_vecs``) and the
    input direction (``encoder_vecs``, injected at the MLP input like a feature's encoder
    row) of :class:`services.attribution.adapter.AdapterNodes`. Positions that circuit-tracer
    zeroes (BOS) and nodes with activation 0 are left out. The context's sparse activation
    matrix stays coalesced, with the vectors permuted to match.
    """
    acts = ctx.activation_matrix
    n_layers, n_pos, _ = acts.shape
    idx, vals = acts.indices(), acts.values()
    enc, dec = ctx.encoder_vecs, ctx.decoder_vecs
    rank = max((n.activations.shape[1] for n in nodes), default=0)
    new_idx, new_vals, new_enc, new_dec = [], [], [], []
    for n in nodes:
        for p in range(1, n_pos):  # position 0 (BOS) is zeroed by circuit-tracer
            for j in range(n.activations.shape[1]):
                a = float(n.activations[p, j])
                if a == 0.0:
                    continue
                new_idx.append((n.layer, p, d_transcoder + j))
                new_vals.append(a)
                new_enc.append(n.input_grads[p, j])
                new_dec.append(n.writes[p, j])
            ctx.error_vectors[n.layer, p] -= n.writes[p].sum(dim=0).to(ctx.error_vectors.dtype)
    if not new_idx:
        return 0
    device = idx.device
    all_idx = torch.cat([idx, torch.tensor(new_idx, device=device).T], dim=1)
    all_vals = torch.cat([vals, torch.tensor(new_vals, device=vals.device, dtype=vals.dtype)])
    all_enc = torch.cat([enc, torch.stack(new_enc).to(device=enc.device, dtype=enc.dtype)])
    all_dec = torch.cat([dec, torch.stack(new_dec).to(device=dec.device, dtype=dec.dtype)])
    width = d_transcoder + rank
    key = (all_idx[0] * n_pos + all_idx[1]) * width + all_idx[2]
    order = torch.argsort(key)
    matrix = torch.sparse_coo_tensor(
        all_idx[:, order], all_vals[order], (n_layers, n_pos, width), check_invariants=False
    ).coalesce()
    ctx.activation_matrix = matrix
    ctx.encoder_vecs = all_enc[order.to(all_enc.device)]
    ctx.decoder_vecs = all_dec[order.to(all_dec.device)]
    ctx.encoder_to_decoder_map = torch.arange(matrix._nnz(), device=device)
    ctx.decoder_locations = matrix.indices()[:2]
    ctx._row_size = int(matrix._nnz()) + (n_layers + 1) * n_pos
    return len(new_idx)


# ------------------------------------------------------------------ residual stream and decoders


def _resid_post(model: ReplacementModel, layer: int) -> torch.nn.Module:
    for name, module, _ in hook_modules(model, layer):
        if name == "hook_resid_post":
            return module
    raise UpstreamChanged(f"no hook_resid_post module at layer {layer}")


def residuals_last(model: ReplacementModel, input_ids: Sequence[int]) -> torch.Tensor:
    """The residual stream after every layer at the last position, ``[n_layers, d_model]``."""
    n_layers = int(model.cfg.n_layers)
    out: list[torch.Tensor | None] = [None] * n_layers
    handles = []

    def keep(layer: int) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            value = output[0] if isinstance(output, tuple) else output
            out[layer] = value[0, -1].detach().float().cpu()

        return hook

    try:
        for layer in range(n_layers):
            handles.append(_resid_post(model, layer).register_forward_hook(keep(layer)))
        forward_logits(model, input_ids)
    finally:
        for h in handles:
            h.remove()
    if any(r is None for r in out):
        raise UpstreamChanged("a residual-stream hook did not fire")
    return torch.stack([r for r in out if r is not None])


def forward_logits_ablated(
    model: ReplacementModel,
    input_ids: Sequence[int],
    layer: int,
    direction: torch.Tensor,
    value: float = 0.0,
) -> torch.Tensor:
    """Last-position logits with the residual stream's component along the unit
    ``direction`` after ``layer`` set to ``value`` at the last position (directional
    ablation; ``value`` the reference model's mean there makes it a mean ablation)."""
    unit = direction / direction.norm()

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        value_t = output[0] if isinstance(output, tuple) else output
        u = unit.to(device=value_t.device, dtype=value_t.dtype)
        last = value_t[:, -1]
        new_last = last - ((last @ u) - value).unsqueeze(-1) * u
        value_t = torch.cat([value_t[:, :-1], new_last.unsqueeze(1)], dim=1)
        return (value_t, *output[1:]) if isinstance(output, tuple) else value_t

    handle = _resid_post(model, layer).register_forward_hook(hook)
    try:
        return forward_logits(model, input_ids)[-1]
    finally:
        handle.remove()


def decoder_rows(model: ReplacementModel, layer: int, features: Sequence[int]) -> torch.Tensor:
    """Decoder vectors ``[n, d_model]`` of per-layer transcoder features (float32, CPU)."""
    transcoders: Any = model.transcoders
    ids = torch.tensor(list(features), dtype=torch.long)
    vecs = transcoders._get_decoder_vectors(layer, ids)  # lazy decoders load only these rows
    return torch.as_tensor(vecs).reshape(len(ids), -1).float().cpu()
