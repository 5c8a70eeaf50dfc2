"""Scale-out: 2 CPU processes (gloo) per strategy, against one process with the same global
batch. Every strategy's adapter matches the single-process one, loads with PEFT, and its
checkpoints resume, with the same or another number of processes."""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from edgetune.errors import ConfigError
from edgetune.train import TrainConfig, train

from .interrupt import start_interruptible, wait_for_checkpoint

# tolerances measured on this recipe: 2-rank vs 1-process adapters differ by <= 4e-7
# (summation order of the gradient reductions)
ATOL, RTOL = 5e-6, 1e-4
STEPS, PER_RANK = 6, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from edgetune.data import smart_home

    return smart_home.generate(tmp_path_factory.mktemp("dist-data"), 64, 16, 0)[0]


def cfg_for(tiny_model, data, out, **kw):
    base = dict(
        model=str(tiny_model),
        data=str(data),
        out=str(out),
        method="lora",
        rank=8,
        alpha=16,
        max_steps=STEPS,
        batch_size=PER_RANK,
        lr=3e-3,
        seq_len=128,
        save_every=2,
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def single(tiny_model, data, tmp_path_factory):
    """One process, batch 2 x PER_RANK: the run every 2-process run must reproduce."""
    out = tmp_path_factory.mktemp("dist-single") / "run"
    return train(cfg_for(tiny_model, data, out, batch_size=2 * PER_RANK), progress=False)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapter(run, ref):
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL)


def two_procs(tiny_model, data, out, strategy, resume=False, **kw):
    return train(
        cfg_for(tiny_model, data, out, nproc=2, strategy=strategy, **kw),
        resume=resume,
        progress=False,
    )


def interrupted_copy(run, dest):
    """The run dir as a run killed after its last checkpoint left it: no adapter, no plot."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "adapter")
    (dest / "loss.png").unlink()
    return dest


def test_ddp_matches_one_process_and_loads_in_peft(tiny_model, data, single, tmp_path):
    run = two_procs(tiny_model, data, tmp_path / "ddp", "ddp")
    ls = losses(run)
    assert len(ls) == STEPS and sum(ls[-2:]) < 0.95 * sum(ls[:2])  # loss falls
    assert ls == pytest.approx(losses(single), rel=1e-6)
    assert_same_adapter(run, single)
    for name in ("config.yaml", "ddp.json", "launch.sh", "loss.png", "checkpoints/step-0000004"):
        assert (run / name).exists(), name

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_fsdp_matches_and_resumes_in_one_process(tiny_model, data, single, tmp_path):
    run = two_procs(tiny_model, data, tmp_path / "fsdp", "fsdp")
    assert_same_adapter(run, single)
    assert json.loads((run / "fsdp.json").read_text())["mesh"] == [2]
    # FSDP's sharded state was gathered into the single-process format: one process resumes it
    resumed = interrupted_copy(run, tmp_path / "resumed")
    cfg = cfg_for(tiny_model, data, resumed, batch_size=2 * PER_RANK)
    train(cfg, resume=True, progress=False)
    assert losses(resumed) == pytest.approx(losses(single), rel=1e-5)
    assert_same_adapter(resumed, single)


def test_zero3_with_accumulation_matches_and_ddp_resumes_it(tiny_model, data, single, tmp_path):
    # 2 micro-batches of 2 rows per rank and step: the step's rows and loss are single's;
    # DeepSpeed steps its optimizer at the boundary only
    run = two_procs(
        tiny_model, data, tmp_path / "zero3", "zero3", batch_size=PER_RANK // 2, grad_accum=2
    )
    ls = losses(run)
    assert sum(ls[-2:]) < 0.95 * sum(ls[:2])
    assert ls == pytest.approx(losses(single), rel=1e-5)
    assert_same_adapter(run, single)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 2 * PER_RANK
    assert ds["gradient_accumulation_steps"] == 2
    # AdamW moments gathered from both ZeRO-3 partitions: two DDP workers continue exactly
    resumed = interrupted_copy(run, tmp_path / "resumed")
    two_procs(tiny_model, data, resumed, "ddp", resume=True)
    assert losses(resumed) == pytest.approx(losses(single), rel=1e-5)
    assert_same_adapter(resumed, single)


@pytest.mark.slow
def test_zero2_matches_and_zero3_resumes_its_checkpoint(tiny_model, data, single, tmp_path):
    run = two_procs(tiny_model, data, tmp_path / "zero2", "zero2")
    assert_same_adapter(run, single)
    # the checkpoint's full moments scattered into ZeRO-3's partitions by 2 new workers
    resumed = interrupted_copy(run, tmp_path / "resumed")
    train(
        cfg_for(tiny_model, data, resumed, nproc=2, strategy="zero3"), resume=True, progress=False
    )
    assert losses(resumed) == pytest.approx(losses(single), rel=1e-5)
    assert_same_adapter(resumed, single)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_qlora_two_processes(tiny_model, data, tmp_path, strategy):
    ref = train(
        cfg_for(tiny_model, data, tmp_path / "one", method="qlora", batch_size=2 * PER_RANK),
        progress=False,
    )
    run = two_procs(tiny_model, data, tmp_path / strategy, strategy, method="qlora")
    assert losses(run) == pytest.approx(losses(ref), rel=1e-5)
    assert_same_adapter(run, ref)


@pytest.mark.slow
def test_ctrl_c_then_resume_with_two_processes(tiny_model, data, single, tmp_path):
    """A real interruption: SIGINT to the whole job (as Ctrl-C in a terminal) after the first
    checkpoint, then --resume; the adapter is the uninterrupted one."""
    import os
    import signal
    import subprocess

    out = tmp_path / "run"
    args = [
        "--model",
        str(tiny_model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        "lora",
        "--rank",
        "8",
        "--alpha",
        "16",
        "--max-steps",
        str(STEPS),
        "--batch-size",
        str(PER_RANK),
        "--lr",
        "3e-3",
        "--seq-len",
        "128",
        "--save-every",
        "2",
        "--seed",
        "1",
        "--nproc",
        "2",
        "--strategy",
        "fsdp",
    ]
    cli = [sys.executable, "-m", "edgetune.cli", "train"]
    proc = start_interruptible(cli + args, start_new_session=True)
    wait_for_checkpoint(proc, out, timeout=300)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and not (out / "adapter").exists(), err.decode()[-2000:]
    subprocess.run(cli + args + ["--resume"], check=True, capture_output=True)
    assert_same_adapter(out, single)


# ---- bad input: one line, before any worker starts ----------------------------------------


def test_unknown_strategy_and_too_many_processes(tiny_model, data, tmp_path, capsys):
    from edgetune.cli import main

    with pytest.raises(ConfigError, match="strategy must be one of ddp, fsdp, zero1"):
        cfg_for(tiny_model, data, tmp_path / "a", strategy="zero4")
    argv = [
        "train",
        "--model",
        str(tiny_model),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "b"),
        "--nproc",
        "4096",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--nproc 4096 is more than" in err
    assert not (tmp_path / "b").exists()


def test_missing_deepspeed_says_what_to_install(tiny_model, data, tmp_path, monkeypatch, capsys):
    from edgetune.cli import main

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    argv = [
        "train",
        "--model",
        str(tiny_model),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "c"),
        "--nproc",
        "2",
        "--strategy",
        "zero3",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'edgetune[distributed]'" in err
