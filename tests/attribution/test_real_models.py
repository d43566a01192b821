"""The researcher's own setup, on a real-format stand-in, offline: Llama-3.2-Instruct by hub
name from a hub cache, the real Llama-3 tokenizer and chat template, circuit-tracer-format
transcoders from an hf:// repo, a rank-1 PEFT LoRA (tests/fixtures/real_format.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.experiment import fingerprint, load_experiment
from common.hub import ModelUnavailable, resolve_model
from common.pipeline import is_transient
from common.records import GraphManifest
from common.store import FsStore
from services.attribution.loading import (
    AdapterMismatch,
    check_adapter_base,
    merged_digest,
    transcoder_files,
)
from tests.conftest import REPO
from tests.fixtures.real_format import RealFormat, build_real_format, new_revision, offline_env

PROMPT = "User: Found phone on train. What now?\nAssistant: You should"
NO_NETWORK = REPO / "tests" / "fixtures" / "no_network"
BOS, HEADER = 128000, 128006


def emc(
    fmt: RealFormat, home: Path, exp: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``emc ARGS`` in a fresh process: the stand-in's offline hub environment, every
    non-loopback connection blocked and logged (``home/net.log``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMC_", "HF_"))}
    env.update(fmt.env())
    env.update(
        EMC_HOME=str(home),
        EMC_EXPERIMENT=str(exp),
        EMC_TEST_NET_LOG=str(home / "net.log"),
        PYTHONPATH=os.pathsep.join([str(NO_NETWORK), str(REPO)]),
    )
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_graph_run_by_hub_names_offline(real_format: RealFormat, tmp_path: Path) -> None:
    """Acceptance: `emc graph run` with hub names works offline with no user-side patch."""
    exp = real_format.write_experiment(tmp_path / "exp.yaml", prompt_format="chat")
    home = tmp_path / "home"
    r = emc(real_format, home, exp, "graph", "run", "--prompt", PROMPT, "--targets", "topk")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "graph " in r.stdout and " adapted: " in r.stdout and "incorrect regex" not in r.stderr
    assert not (home / "net.log").exists(), (home / "net.log").read_text()
    store = FsStore(home / "store")
    keys = [k for k in store.list_keys("experiments/realfmt/") if "/graphs/" in k]
    manifests = [store.get_record(k, GraphManifest) for k in keys if k.endswith(".json")]
    assert {m.variant for m in manifests} == {"base", "adapted"}
    for m in manifests:
        # the instruct model sees its chat format, with exactly one BOS
        assert m.input_ids[:2] == [BOS, HEADER] and m.input_ids.count(BOS) == 1
        assert "Today Date: 26 Jul 2024" in "".join(m.input_tokens)


def test_expected_failures_are_one_error_line(real_format: RealFormat, tmp_path: Path) -> None:
    """A model that is not cached, offline: one actionable line, a traceback only with --debug."""
    exp = real_format.write_experiment(
        tmp_path / "exp.yaml",
        variants={"base": {"model": "meta-llama/Llama-3.3-70B-Instruct"}, "adapted": None},
    )
    home = tmp_path / "home"
    r = emc(real_format, home, exp, "graph", "run", "--prompt", PROMPT)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "huggingface-cli download meta-llama/Llama-3.3-70B-Instruct" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0]
    debug = emc(real_format, home, exp, "graph", "run", "--prompt", PROMPT, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    # the adapter of another base, as one line too
    wrong = real_format.write_experiment(
        tmp_path / "wrong.yaml",
        variants={"adapted": {"adapter": str(real_format.wrong_base_adapter_dir)}},
    )
    r = emc(real_format, home, wrong, "graph", "run", "--prompt", PROMPT, "-v", "adapted")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "trained on base" in lines[0], r.stderr


def test_offline_and_uncached_errors_are_permanent() -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    assert not is_transient(ModelUnavailable("x is not in the hub cache"))
    assert not is_transient(OfflineModeIsEnabled("offline"))
    assert not is_transient(LocalEntryNotFoundError("not cached"))
    assert is_transient(ConnectionError("a network blip"))


def test_one_model_however_it_is_named(
    real_format: RealFormat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter records meta-llama/Llama-3.2-1B-Instruct: accepted for the hub id, the
    snapshot directory, a --local-dir download (named like the repo, or not), and the explicit
    override; an adapter trained on the non-instruct base stays refused."""
    offline_env(real_format, monkeypatch)
    fmt = real_format
    adapter = fmt.adapter_dir
    renamed = tmp_path / "my-model"
    shutil.copytree(fmt.local_download, renamed)
    for ref in (fmt.instruct_id, str(fmt.instruct_snapshot), str(fmt.local_download), str(renamed)):
        check_adapter_base(adapter, resolve_model(ref), "adapted")
    base = resolve_model(fmt.instruct_id)
    assert base.kind == "hub" and base.revision == fmt.instruct_commit
    snap = resolve_model(str(fmt.instruct_snapshot))
    assert (snap.kind, snap.repo_id, snap.revision) == (
        "snapshot",
        fmt.instruct_id,
        fmt.instruct_commit,
    )
    # trained on the non-instruct base: refused by name and by content, whatever the naming
    for ref in (fmt.instruct_id, str(fmt.instruct_snapshot), str(renamed)):
        with pytest.raises(AdapterMismatch, match=r"Llama-3\.2-1B'"):
            check_adapter_base(fmt.wrong_base_adapter_dir, resolve_model(ref), "adapted")
    # a copy of the non-instruct weights named like the instruct repo is not the instruct model
    impostor = tmp_path / "x" / "Llama-3.2-1B-Instruct-copy"
    shutil.copytree(fmt.base_snapshot, impostor)
    with pytest.raises(AdapterMismatch):
        check_adapter_base(adapter, resolve_model(str(impostor)), "adapted")
    # the override accepts exactly the declared recorded name
    check_adapter_base(adapter, resolve_model(str(impostor)), "adapted", declared=fmt.instruct_id)
    with pytest.raises(AdapterMismatch, match="adapter_base declares"):
        check_adapter_base(adapter, base, "adapted", declared="someone/else")


def test_fingerprint_follows_the_hub_revision(
    real_format_copy: RealFormat, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new revision of a hub model changes the fingerprint and the merged-model cache key;
    the hub id and its snapshot directory are the same model."""
    fmt = real_format_copy
    offline_env(fmt, monkeypatch)
    exp = load_experiment(fmt.write_experiment(fmt.root / "exp.yaml"))
    by_snapshot = load_experiment(
        fmt.write_experiment(
            fmt.root / "snap.yaml",
            variants={
                "base": {"model": str(fmt.instruct_snapshot)},
                "adapted": {"model": str(fmt.instruct_snapshot)},
            },
        )
    )
    fp, key = fingerprint(exp), merged_digest(exp.variants["adapted"])
    assert fingerprint(by_snapshot) == fp

    def touch(snapshot: Path) -> None:
        cfg = snapshot / "generation_config.json"
        cfg.write_text(cfg.read_text().replace("0.6", "0.7"))

    commit = new_revision(fmt, fmt.instruct_id, touch)
    assert resolve_model(fmt.instruct_id).revision == commit != fmt.instruct_commit
    assert fingerprint(exp) != fp
    assert merged_digest(exp.variants["adapted"]) != key


def test_large_files_are_hashed_completely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to one tensor in the middle of a file over 64 MiB changes the fingerprint (the
    old digest read only its first and last MiB), even with its mtime put back."""
    monkeypatch.setenv("EMC_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    model.mkdir()
    tensors = {f"t{i}": torch.zeros(6 * 2**20 // 4, dtype=torch.float32) for i in range(12)}
    save_file(tensors, model / "model.safetensors")  # 72 MiB
    (tmp_path / "tc").mkdir()
    (tmp_path / "exp.yaml").write_text(
        "name: big\nvariants: {base: {model: ./model}}\ntranscoders: ./tc\n"
    )
    exp = load_experiment(tmp_path / "exp.yaml")
    before = fingerprint(exp)
    assert fingerprint(exp) == before  # cached digest, same answer
    path = model / "model.safetensors"
    st = path.stat()
    loaded = load_file(path)
    loaded["t6"][12345] = 1.0
    save_file(loaded, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size > 64 * 2**20
    assert fingerprint(exp) != before


def test_transcoder_configs_listing_hf_files_resolve_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transcoder config.yaml that lists hf:// files (circuit-tracer 0.5.0 makes a
    repo_info call for those) resolves from the hub cache with no network call."""
    import socket

    fmt = build_real_format(tmp_path / "rf", transcoder_uris=True)
    offline_env(fmt, monkeypatch)
    exp = load_experiment(fmt.write_experiment(tmp_path / "exp.yaml"))

    def no_network(self: socket.socket, address: object) -> None:
        raise AssertionError(f"network call to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    files = transcoder_files(exp)
    assert len(files.layer_files) == fmt.n_layers
    assert all(f.is_file() and fmt.hub_cache in f.parents for f in files.layer_files)
    assert files.scan == f"{fmt.transcoders_id}@{fmt.transcoders_commit}"


def test_one_bos_and_the_chat_format(
    real_format: RealFormat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt that already begins with BOS (a chat-rendered one) is never given a second;
    the house text in chat format renders to exactly those ids."""
    from common.prompt_format import render
    from services.attribution.runtime import Runtime

    offline_env(real_format, monkeypatch)
    chat = load_experiment(real_format.write_experiment(tmp_path / "c.yaml", prompt_format="chat"))
    house = load_experiment(
        real_format.write_experiment(tmp_path / "h.yaml", prompt_format="house")
    )
    rt_chat = Runtime(chat, cache_dir=tmp_path / "cache")
    ids = rt_chat.tokenize(PROMPT, "base")
    rendered = render(PROMPT, "chat", rt_chat.variant("base").tokenizer).text
    assert rendered.startswith("<|begin_of_text|>") and rendered.endswith("\n\nYou should")
    rt_house = Runtime(house, cache_dir=tmp_path / "cache")
    for rt in (rt_chat, rt_house):
        assert rt.tokenize(rendered, "base") == ids  # already rendered: used as it is
        assert rt.tokenize(rendered, "base").count(BOS) == 1
    plain = rt_house.tokenize(PROMPT, "base")
    assert plain[0] == BOS and plain.count(BOS) == 1 and HEADER not in plain


def test_byte_fragment_tokens_are_told_apart(real_format: RealFormat) -> None:
    """Llama-3 has 647 ids that decode alone to U+FFFD; each reads as its own bytes."""
    from transformers import AutoTokenizer

    from common.tokens import is_byte_fragment, token_text

    tok = AutoTokenizer.from_pretrained(real_format.instruct_snapshot)
    fragments = [i for i in range(len(tok)) if tok.decode([i]) == "\ufffd"]
    assert len(fragments) == 647
    shown = {token_text(tok, i) for i in fragments}
    assert len(shown) == 647  # no two look the same
    # all are shown as their bytes, but the one token that IS the character U+FFFD
    assert {s for s in shown if not is_byte_fragment(s)} == {"\ufffd"}
    assert token_text(tok, 1203) == tok.decode([1203])  # ordinary tokens read as text
