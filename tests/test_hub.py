"""Hugging Face Hub ids wherever a model dir is accepted, offline: a Hub cache is built in
huggingface_hub's own layout (blobs/, snapshots/<commit>/ of relative symlinks, refs/) with
the shipped tiny model as its content, and HF_HUB_OFFLINE=1 makes the cache all there is."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, reset_sessions

from edgetune.cli import main
from edgetune.errors import ModelError
from edgetune.hub import hub_source, resolve_model
from edgetune.merge import ADAPTER_META, merge
from edgetune.models import check_model_dir, tiny_model_path

REPO = "edgetune-test/tiny-phi3"
MAIN = "a" * 8 + "0123456789abcdef0123456789abcdef"  # refs/main
TAGGED = "b" * 8 + "0123456789abcdef0123456789abcdef"  # refs/v0.1, and a commit of its own


def blob_id(name: str, data: bytes) -> str:
    """The blob's name in the cache: the file's SHA-256 for LFS files (weights), its git
    blob SHA-1 (the ETag the Hub sends) for the others."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs=()):
    """One commit of ``repo_id`` as ``hf_hub_download`` leaves it in the cache."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / blob_id(name, data)
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as snapshot_download writes
    return snap


def tiny_files() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tiny_model_path().iterdir()) if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline Hub cache holding REPO at MAIN (refs/main) and TAGGED (refs/v0.1)."""
    root = tmp_path / "hf-cache"
    add_snapshot(root, REPO, MAIN, tiny_files(), refs=["main"])
    add_snapshot(root, REPO, TAGGED, tiny_files(), refs=["v0.1"])
    # huggingface_hub reads its env at import: the subprocesses see these, this process
    # sees the patched constants (and sessions made afresh, with the offline adapter)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reset_sessions()
    yield root
    reset_sessions()


def snapshot(cache: Path, commit: str) -> Path:
    return cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit


def test_a_hub_id_resolves_to_its_cached_snapshot(cache):
    got = resolve_model(REPO)
    assert got == snapshot(cache, MAIN)
    assert (got / "model.safetensors").is_symlink()  # the cache's layout, not a copy
    assert check_model_dir(got)["model_type"] == "phi3"
    assert hub_source(got) == {"repo_id": REPO, "revision": MAIN}
    assert resolve_model(REPO, revision="v0.1") == snapshot(cache, TAGGED)  # a tag in refs
    assert resolve_model(REPO, revision="main") == snapshot(cache, MAIN)
    assert resolve_model(REPO, revision=TAGGED) == snapshot(cache, TAGGED)  # a commit hash


def test_a_local_dir_is_used_as_it_is(cache):
    assert resolve_model(tiny_model_path()) == tiny_model_path()
    assert hub_source(tiny_model_path()) is None
    with pytest.raises(ModelError, match="--revision v0.1 is for Hugging Face Hub ids"):
        resolve_model(tiny_model_path(), revision="v0.1")


@pytest.mark.parametrize("name", ["/no/such/dir", "a/b/c", "bad--name/x", "./rel", "x/.y"])
def test_neither_a_dir_nor_a_hub_id(cache, name):
    with pytest.raises(ModelError, match="model directory not found .*not a Hugging Face Hub id"):
        resolve_model(name)


@pytest.mark.parametrize(
    "name, revision", [("edgetune-test/not-there", None), (REPO, "v9"), (REPO, "c" * 40)]
)
def test_offline_and_not_in_the_cache_says_so(cache, name, revision):
    with pytest.raises(ModelError) as e:
        resolve_model(name, revision)
    msg = str(e.value)
    assert msg.startswith(f"{name}: not a local directory, and not in the Hugging Face cache")
    assert str(cache) in msg
    assert "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_a_repo_with_only_pickle_weights_is_refused(cache):
    files = {n: d for n, d in tiny_files().items() if not n.endswith(".safetensors")}
    add_snapshot(
        cache, "edgetune-test/bin-only", MAIN, files | {"pytorch_model.bin": b"x"}, ["main"]
    )
    with pytest.raises(ModelError, match="safetensors only, never pickled .bin/.pt"):
        resolve_model("edgetune-test/bin-only")


def test_only_edgetunes_files_are_asked_for(monkeypatch, tmp_path):
    """What snapshot_download is asked for: no pickled weights, no repo code, no duplicate
    consolidated weights; and nothing that would override the Hub's own cache or offline
    settings (cache_dir, local_files_only, token: huggingface_hub reads HF_HUB_CACHE,
    HF_HUB_OFFLINE and HF_TOKEN itself)."""
    repo_files = [
        "config.json", "generation_config.json", "model.safetensors",
        "model-00001-of-00002.safetensors", "model.safetensors.index.json",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "tokenizer.model", "chat_template.jinja", "pytorch_model.bin",
        "pytorch_model.bin.index.json", "consolidated.safetensors", "original/consolidated.00.pth",
        "modeling_phi3.py", "README.md", "onnx/model.onnx", "flax_model.msgpack",
    ]  # fmt: skip
    asked = {}

    def fake(repo_id, **kw):
        asked.update(kw, repo_id=repo_id)
        snap = tmp_path / "snap"
        snap.mkdir(exist_ok=True)
        (snap / "model.safetensors").write_bytes(b"")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_model(REPO, revision="v0.1")
    assert asked.pop("repo_id") == REPO and asked.pop("revision") == "v0.1"
    assert set(asked) == {"allow_patterns"}
    got = set(filter_repo_objects(repo_files, allow_patterns=asked["allow_patterns"]))
    assert got == set(repo_files[:10])


@pytest.mark.parametrize(
    "error, needles",
    [
        (GatedRepoError("401 gated"), ["gated", "huggingface-cli login", "HF_TOKEN"]),
        (RepositoryNotFoundError("404"), ["no such model", "huggingface-cli login", "HF_TOKEN"]),
        (RevisionNotFoundError("404"), ["no revision 'main' on the Hugging Face Hub"]),
        (LocalEntryNotFoundError("no net"), ["Hub could not be reached", "does not have it"]),
    ],
)
def test_hub_errors_are_one_line(monkeypatch, error, needles):
    """Online failures (the Hub answers, or cannot be reached), as snapshot_download raises
    them."""

    def fake(repo_id, **kw):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError) as e:
        resolve_model(REPO)
    assert str(e.value).startswith(REPO) and "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value)


def cli(*args: str) -> subprocess.CompletedProcess:
    """``edgetune ARGS`` in a fresh process: huggingface_hub reads HF_HUB_* from its env."""
    return subprocess.run(
        [sys.executable, "-m", "edgetune.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_and_merge_from_a_hub_id_equal_the_local_dir_and_record_the_commit(
    cache, tmp_path, task_data
):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(Path(task_data[0]).read_text().splitlines(True)[:16]))
    flags = ["--data", data, "--method", "lora", "--max-steps", "2", "--batch-size", "4"]
    flags += ["--seq-len", "128", "--rank", "4", "--warmup-steps", "1", "--seed", "3"]
    flags = [str(f) for f in flags]
    local, hubrun = tmp_path / "local", tmp_path / "hub"
    assert main(["train", "--model", str(tiny_model_path()), "--out", str(local), *flags]) == 0
    assert main(["train", "--model", REPO, "--out", str(hubrun), *flags]) == 0

    weights = "adapter/adapter_model.safetensors"
    assert (hubrun / weights).read_bytes() == (local / weights).read_bytes()
    saved = yaml.safe_load((hubrun / "config.yaml").read_text())
    assert (saved["model"], saved["revision"]) == (REPO, MAIN)  # re-runs on the same commit
    meta = json.loads((hubrun / "adapter" / ADAPTER_META).read_text())
    assert (meta["base_repo_id"], meta["base_revision"]) == (REPO, MAIN)
    local_meta = json.loads((local / "adapter" / ADAPTER_META).read_text())
    assert meta["base_weights_sha256"] == local_meta["base_weights_sha256"]
    assert "base_repo_id" not in local_meta
    peft_cfg = json.loads((hubrun / "adapter" / "adapter_config.json").read_text())
    assert (peft_cfg["base_model_name_or_path"], peft_cfg["revision"]) == (REPO, MAIN)

    # merge in a fresh process, its env the only thing telling huggingface_hub where to look
    ref = merge(tiny_model_path(), local / "adapter", tmp_path / "merged-local")
    r = cli("merge", "--model", REPO, "--revision", "v0.1", "--adapter", hubrun / "adapter",
            "--out", tmp_path / "merged-hub")  # fmt: skip
    assert r.returncode == 0, r.stderr
    for f in sorted(p.name for p in ref.iterdir()):
        assert (tmp_path / "merged-hub" / f).read_bytes() == (ref / f).read_bytes(), f

    lora = {}
    for name, base in (("local", tiny_model_path()), ("hub", REPO)):
        lora[name] = tmp_path / f"{name}.gguf"
        argv = ["export-adapter", str(local / "adapter"), "--base", str(base), "--out"]
        assert main([*argv, str(lora[name])]) == 0
    assert lora["hub"].read_bytes() == lora["local"].read_bytes()

    r = cli("merge", "--model", "edgetune-test/absent", "--adapter", hubrun / "adapter",
            "--out", tmp_path / "m2")  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not in the Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_export_manifest_names_the_hub_commit(cache, tmp_path):
    from edgetune.bundle import verify
    from edgetune.models import weights_sha256

    out = tmp_path / "bundle"
    assert main(["export", REPO, "--revision", TAGGED, "--out", str(out), "--quant", "none"]) == 0
    source = verify(out)["source"]  # every file's SHA-256 checked too
    assert source == {
        "weights_sha256": weights_sha256(tiny_model_path()),
        "repo_id": REPO,
        "revision": TAGGED,
    }


def test_resume_continues_on_the_commit_the_run_began_on(cache, tmp_path, task_data):
    """main moves between a run and its --resume: the resumed run stays on its commit."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(Path(task_data[0]).read_text().splitlines(True)[:16]))
    flags = ["--data", data, "--method", "lora", "--batch-size", "4", "--seq-len", "128"]
    flags += ["--rank", "4", "--warmup-steps", "1", "--save-every", "1", "--out", tmp_path / "r"]
    flags = ["--model", REPO, *map(str, flags)]
    assert main(["train", *flags, "--max-steps", "2"]) == 0  # keeps its step-1 checkpoint
    repo = cache / "models--edgetune-test--tiny-phi3"
    (repo / "refs" / "main").write_text(TAGGED)  # the branch moves to another commit
    assert main(["train", *flags, "--max-steps", "3", "--resume"]) == 0
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (saved["model"], saved["revision"]) == (REPO, MAIN)
