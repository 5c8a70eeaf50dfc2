"""Pretrain the tiny Phi-3-architecture base model that edgetune ships.

    python examples/pretrain_tiny_model.py --minutes 35 --out edgetune/assets/tiny-phi3

The corpus is the docstrings and comments of the Python standard library that runs this
script (every Python install ships it), so anyone can rebuild the model
without a network. Steps: collect docstrings and comments -> train a byte-level BPE
tokenizer -> train a ~3.8M-parameter Phi3ForCausalLM on packed 256-token
windows -> save fp16 safetensors (under 10 MB) plus tokenizer files.

The model is small on purpose: it is what the tests and the quickstart
fine-tune on a 2-core CPU in a couple of minutes. It knows English-ish
docstring text, nothing of the home-automation task.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Phi-3's chat format: <|role|>\ncontent<|end|>\n ... <|assistant|>\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _comment_paragraphs(source: str) -> list[str]:
    """Runs of consecutive ``#`` comment lines, joined into paragraphs."""
    paras, current = [], []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            current.append(stripped.lstrip("#").strip())
        elif current:
            paras.append(" ".join(current))
            current = []
    return [p for p in paras if len(p) > 60]


def stdlib_docstrings() -> list[str]:
    """Every module, class and function docstring of the standard library, and its comment
    paragraphs, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    docs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                source = Path(dirpath, name).read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs.extend(_comment_paragraphs(source))
            for node in ast.walk(tree):
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                ):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        docs.append(doc.strip())
    return docs


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def model_config(vocab_size: int, tok: Tokenizer) -> Phi3Config:
    return Phi3Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in larger Phi-3 variants
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|end|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
        dtype="float32",
    )


def packed_windows(ids: list[int], seq_len: int) -> torch.Tensor:
    n = len(ids) // (seq_len + 1)
    return torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="edgetune/assets/tiny-phi3")
    ap.add_argument("--minutes", type=float, default=35.0, help="wall-clock training budget")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    docs = stdlib_docstrings()
    random.shuffle(docs)
    print(f"corpus: {len(docs)} docstrings, {sum(map(len, docs)) / 1e6:.1f} M chars")

    tok = train_tokenizer(docs, args.vocab_size)
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids + [eot])
    data = packed_windows(ids, args.seq_len)
    print(f"tokens: {len(ids) / 1e6:.2f} M -> {len(data)} windows of {args.seq_len}")

    cfg = model_config(tok.get_vocab_size(), tok)
    model = Phi3ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    budget = args.minutes * 60
    warmup = 50
    start = time.time()
    step = 0
    model.train()
    while time.time() - start < budget:
        frac = min(1.0, (time.time() - start) / budget)
        lr = (
            args.lr
            * min(1.0, (step + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(len(data), (args.batch_size,))]  # (B, T+1)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(
                f"step {step:5d}  loss {out.loss.item():.3f}  lr {lr:.2e}  {time.time() - start:6.0f}s",
                flush=True,
            )
        step += 1

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float16)  # fp16 on disk keeps the package under 10 MB
    model.config.dtype = "float32"  # load back in fp32: training and export compute in fp32
    model.save_pretrained(out_dir, safe_serialization=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=cfg.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(out_dir)
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": [cfg.eos_token_id, eot],
        "pad_token_id": cfg.pad_token_id,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    print(f"saved to {out_dir} after {step} steps")


if __name__ == "__main__":
    main()
