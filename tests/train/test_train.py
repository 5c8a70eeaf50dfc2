"""The trainer: loss goes down, the adapter is standard PEFT, Ctrl-C + --resume is exact."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from edgetune.errors import ConfigError, OutputExistsError
from edgetune.train import TrainConfig, train

from .interrupt import start_interruptible, wait_for_checkpoint


def cfg_for(tiny_model, task_data, out, **kw):
    base = dict(
        model=str(tiny_model),
        data=str(task_data[0]),
        eval_data=str(task_data[1]),
        out=str(out),
        max_steps=12,
        batch_size=8,
        lr=3e-3,
        rank=8,
        alpha=16,
        seq_len=128,
        eval_every=6,
        save_every=4,
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_qlora_run_dir_and_peft_adapter(tiny_model, task_data, tmp_path):
    cfg = cfg_for(tiny_model, task_data, tmp_path / "run", max_steps=20)
    run = train(cfg, progress=False)
    ls = losses(run)
    assert sum(ls[-4:]) / 4 < 0.5 * sum(ls[:4]) / 4  # loss falls
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
        "config.yaml",
    ):
        assert (run / name).is_file(), name
    last_eval = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]

    # the adapter loads with plain PEFT on the original (fp) base and keeps what it learned:
    # held-out loss as in training on the NF4 base (measured 1.566 vs 1.556), base 4.56
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.models import load_tokenizer
    from edgetune.train.recipe import eval_loss, prepare_rows

    tok = load_tokenizer(tiny_model)
    heldout = prepare_rows(cfg, tok, str(task_data[1]))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    with torch.no_grad():
        base_loss = eval_loss(base, heldout, cfg, tok.pad_token_id, "cpu")
        peft_loss = eval_loss(
            PeftModel.from_pretrained(base, str(run / "adapter")),
            heldout,
            cfg,
            tok.pad_token_id,
            "cpu",
        )
    assert peft_loss == pytest.approx(last_eval, rel=0.05)
    assert peft_loss <= 0.5 * base_loss, (peft_loss, base_loss)


def test_adapter_on_nf4_base_reproduces_training_logits(tiny_model, task_data, tmp_path):
    from edgetune.merge import load_adapted
    from edgetune.models import load_model
    from edgetune.train.adapters import wrap_with_adapter

    cfg = cfg_for(tiny_model, task_data, tmp_path / "run", max_steps=8)
    run = train(cfg, progress=False)
    # the training-time model: the same NF4 base and PEFT wrapping, with the trained weights
    trained = wrap_with_adapter(load_model(tiny_model), cfg)
    loaded = load_adapted(tiny_model, run / "adapter").eval()
    x = torch.randint(0, 2000, (2, 24))
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for k, v in loaded.state_dict().items():
            if "lora" in k:
                params[k].copy_(v)
        torch.testing.assert_close(loaded(x).logits, trained.eval()(x).logits, rtol=1e-5, atol=1e-5)


def test_existing_run_dir_refused(tiny_model, task_data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--resume"):
        train(cfg_for(tiny_model, task_data, tmp_path / "run"), progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]


def test_bad_method_is_config_error(tiny_model, task_data, tmp_path):
    with pytest.raises(ConfigError, match="method"):
        cfg_for(tiny_model, task_data, tmp_path, method="full")


def test_packing_keeps_examples_apart(tiny_model, task_data, tmp_path):
    """A packed batch gives each example the same loss as when it is alone."""
    from edgetune.data import load_examples, tokenize_examples
    from edgetune.models import load_model, load_tokenizer
    from edgetune.train.recipe import collate, pack_examples, token_loss_sum

    tok = load_tokenizer(tiny_model)
    rows = tokenize_examples(tok, load_examples(task_data[0])[:6], 256)
    model = load_model(tiny_model).eval()
    with torch.no_grad():
        alone = sum(token_loss_sum(model, collate([r], tok.pad_token_id, "cpu"))[0] for r in rows)
        packed = pack_examples(rows, 256)
        assert len(packed) < len(rows)
        together = token_loss_sum(model, collate(packed, tok.pad_token_id, "cpu"))[0]
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-3)


def test_ctrl_c_then_resume_matches_uninterrupted_run(tiny_model, task_data, tmp_path):
    args = [
        "--model",
        str(tiny_model),
        "--data",
        str(task_data[0]),
        "--max-steps",
        "14",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--rank",
        "8",
        "--seq-len",
        "128",
        "--save-every",
        "3",
        "--seed",
        "3",
        "--method",
        "qlora",
    ]
    cli = [sys.executable, "-m", "edgetune.cli", "train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(cli + args + ["--out", str(straight)], check=True, env=env, capture_output=True)

    broken = tmp_path / "broken"
    proc = start_interruptible(cli + args + ["--out", str(broken)], env=env)
    wait_for_checkpoint(proc, broken, timeout=120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"--resume" in err
    assert not (broken / "adapter").exists()
    subprocess.run(
        cli + args + ["--out", str(broken), "--resume"], check=True, env=env, capture_output=True
    )

    assert losses(broken) == pytest.approx(losses(straight), rel=1e-6)
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_and_accumulation_give_the_same_losses(
    tiny_model, task_data, tmp_path
):
    plain = train(
        cfg_for(tiny_model, task_data, tmp_path / "a", max_steps=3, eval_data=None), progress=False
    )
    ckpt = train(
        cfg_for(
            tiny_model,
            task_data,
            tmp_path / "b",
            max_steps=3,
            eval_data=None,
            gradient_checkpointing=True,
        ),
        progress=False,
    )
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-5)
    # 2 micro-batches of 4 = one batch of 8: same data, same token-weighted loss and update
    accum = train(
        cfg_for(
            tiny_model,
            task_data,
            tmp_path / "c",
            max_steps=3,
            eval_data=None,
            batch_size=4,
            grad_accum=2,
        ),
        progress=False,
    )
    assert losses(accum)[0] == pytest.approx(losses(plain)[0], rel=1e-5)


def test_full_chat_format_trains_and_weight_zero_is_never_learned(tiny_model, task_data, tmp_path):
    """The OpenAI/Azure variants (a byte-order mark, developer role, content parts, a
    weight-0 decoy turn) go through the trainer's own data path and train."""
    from edgetune.data import load_examples
    from edgetune.data.tokenize import IGNORE
    from edgetune.models import load_tokenizer
    from edgetune.train.recipe import prepare_rows

    lines = []
    for ex in load_examples(task_data[0])[:64]:
        chat = ex.as_chat()
        question, answer = chat[-2]["content"], chat[-1]["content"]
        lines.append(
            {
                "messages": [
                    {"role": "developer", "content": "Answer in JSON."},
                    {"role": "user", "content": [{"type": "text", "text": question}]},
                    {"role": "assistant", "content": "zzz decoy zzz", "weight": 0},
                    {"role": "user", "content": "The JSON, please."},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    data = tmp_path / "variants.jsonl"
    body = "".join(json.dumps(x, ensure_ascii=False) + "\r\n" for x in lines)
    data.write_bytes(b"\xef\xbb\xbf" + body.encode())
    cfg = cfg_for(tiny_model, (data, data), tmp_path / "run", method="lora", max_steps=12)
    tok = load_tokenizer(tiny_model)
    rows = prepare_rows(cfg, tok, str(data))
    learned = tok.decode([t for r in rows for t in r.labels if t != IGNORE])
    assert "decoy" not in learned and learned.count("<|end|>") == len(lines)
    ls = losses(train(cfg, progress=False))
    assert sum(ls[-3:]) / 3 < 0.7 * sum(ls[:3]) / 3
