"""Shared fixtures, all session-wide and built only when a test asks for them.

``task_data`` is the shipped smart-home task, generated (well under a second): asking for
it trains nothing. The trained stages come from one real quickstart run (train -> merge ->
export), made the first time a test asks for ``quickstart_run``, ``trained_adapter``,
``merged_model``, ``int4_bundle`` or ``fp32_bundle``, so the suite trains it once."""

import json
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model():
    from edgetune.models import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from edgetune.models import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory):
    """The bundled smart-home task exactly as ``edgetune quickstart`` generates it (same
    sizes and seed): (train, heldout). Data only: nothing is trained."""
    from edgetune.data import smart_home
    from edgetune.quickstart import QuickstartConfig

    cfg = QuickstartConfig()
    return smart_home.generate(
        tmp_path_factory.mktemp("task") / "data", cfg.n_train, cfg.n_heldout, cfg.seed
    )


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """``edgetune quickstart`` with its default settings, run as a user runs it (the CLI, in
    its own process): (table rows, output dir). The one training of the suite (minutes);
    only the stage fixtures below and test_pipeline ask. What it printed is
    ``quickstart_console``."""
    import subprocess
    import sys

    from edgetune.quickstart import TABLE, Row

    out = tmp_path_factory.mktemp("quickstart") / "qs"
    cmd = [sys.executable, "-m", "edgetune.cli", "quickstart", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=out.parent)
    (out.parent / "console.json").write_text(
        json.dumps({"stdout": done.stdout, "stderr": done.stderr})
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [Row.from_dict(r) for r in json.loads((out / TABLE).read_text())]
    return rows, out


@pytest.fixture(scope="session")
def quickstart_console(quickstart_run):
    """(stdout, stderr) of ``quickstart_run``'s command."""
    c = json.loads((quickstart_run[1].parent / "console.json").read_text())
    return c["stdout"], c["stderr"]


@pytest.fixture(scope="session")
def trained_adapter(quickstart_run):
    """The quickstart's QLoRA adapter (PEFT format), trained on ``task_data``'s train split."""
    return quickstart_run[1] / "run" / "adapter"


@pytest.fixture(scope="session")
def merged_model(quickstart_run):
    """The shipped tiny model with ``trained_adapter`` merged in (fp32 safetensors)."""
    return quickstart_run[1] / "merged"


@pytest.fixture(scope="session")
def int4_bundle(quickstart_run):
    """``merged_model`` exported with the default int4 settings, parity report included."""
    return quickstart_run[1] / "bundle"


@pytest.fixture(scope="session")
def fp32_bundle(quickstart_run):
    """``merged_model`` exported unquantized."""
    return quickstart_run[1] / "bundle-fp32"


def tiny_family_config(family: str):
    """A tiny random-weight config of one supported family (Phi-3 with long-context rope)."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=5,
        pad_token_id=1,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    half = 64 // 4 // 2  # rope factors: one per rotary frequency (head_dim / 2)
    return Phi3Config(
        **{**common, "max_position_embeddings": 1024},
        original_max_position_embeddings=256,
        sliding_window=None,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0] * half,
            "long_factor": [1.0 + i / half for i in range(half)],
        },
    )


@pytest.fixture(scope="session")
def family_config():
    """``tiny_family_config``, for tests that change a config before building the model."""
    return tiny_family_config


@pytest.fixture(scope="session")
def family_model(tmp_path_factory, tiny_model):
    """family -> a saved tiny random-weight model dir of that family (with the shipped
    tokenizer), built once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.models import copy_tokenizer

    made = {}

    def make(family: str):
        if family not in made:
            d = tmp_path_factory.mktemp(family)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(tiny_family_config(family)).save_pretrained(d)
            copy_tokenizer(tiny_model, d)
            made[family] = d
        return made[family]

    return make
