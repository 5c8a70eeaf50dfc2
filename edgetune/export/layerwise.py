"""A Hugging Face causal LM run one decoder layer at a time, straight from its safetensors.

The export's parity report and GPTQ's calibration need the model's activations, not the
model: ``Layerwise`` builds the HF skeleton on the meta device (no weights), then for each
decoder layer in turn reads that layer's tensors (fp32, from ``SafetensorsSource``), runs
the hidden states of every sequence through HF's own layer module, and frees the layer
again. Peak memory is one layer's fp32 weights (+ one replacement weight), the hidden
states of all sequences, one fp32 chunk of the LM head (which stays as stored: bf16 in the
memory map, int8 codes from the bundle) and one group of sequences' logits per stream:
flat in the number of layers.

    lw = Layerwise(model_dir)
    with torch.inference_mode():
        states = lw.embed(token_lists)                 # all sequences' hidden states
        for i in range(lw.n_layers):
            lw.load_layer(i)
            lw.run_layer(i, states)                    # in place
            lw.free_layer(i)
        head = lw.head()
        logits = [head.logits(h) for h in states.sequences()]   # (T, V) each

Exactly HF's model, in fp32 eager attention: the layers, norms and rotary embedding are
HF's modules (Phi-3's longrope picks short or long factors by the sequence's length, as HF
does), the mask is HF's causal mask (with the sliding window where HF applies one: Mistral
and Phi-3 when ``sliding_window`` is set, Qwen2 on its ``sliding_attention`` layers), and
no padding. For speed, short sequences are packed side by side into rows of up to
``PACK_TOKENS`` (a block-diagonal causal mask, positions restarting at 0 per sequence), so
the projections multiply hundreds of rows at a time (2-3x the throughput of one 64-token
sequence on 2 cores); each sequence still sees only itself, and sequences on different
sides of Phi-3's short/long rope switch are never packed together.
``tests/export/test_layerwise.py`` checks the logits against ``AutoModelForCausalLM`` for
every family.

A weight override ``weights(name) -> array | None`` replaces any tensor by HF parameter
name (``model.layers.3.self_attn.qkv_proj.weight``, ``model.embed_tokens.weight``,
``lm_head.weight``) with an fp32 array in HF's layout, (out, in) for a projection — e.g.
the dequantized int4 weight the bundle holds; None keeps the checkpoint's. The head always
asks for ``lm_head.weight``, also when the checkpoint ties it to the embedding (the ONNX
bundle quantizes the head's MatMul on its own). ``parity`` runs the fp32 model and the
overridden one in one pass over the layers; ``logits`` and ``greedy`` run one model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError, ModelError
from ..models import read_config
from ..tensors import SafetensorsSource
from .lm_head import CheckpointRows, Head, WeightFn, override_rows, token_groups
from .scores import Scores

PACK_TOKENS = 512  # sequences packed into rows of up to this many tokens (eager attention
# holds heads x T^2 fp32 scores per row: 32 MB at 32 heads)
READ_ELEMENTS = 1 << 22  # a bf16/fp16 checkpoint tensor is widened this many values at a time


@overload
def as_weight_fn(weights: WeightFn | Mapping[str, np.ndarray]) -> WeightFn: ...


@overload
def as_weight_fn(weights: None) -> None: ...


@overload
def as_weight_fn(weights: WeightFn | Mapping[str, np.ndarray] | None) -> WeightFn | None: ...


def as_weight_fn(weights: WeightFn | Mapping[str, np.ndarray] | None) -> WeightFn | None:
    """A mapping {HF name: array} as a ``WeightFn`` (names it lacks keep the checkpoint's)."""
    if weights is None or callable(weights):
        return weights
    return weights.get


@contextmanager
def torch_threads():
    """Run torch on every core this process may use (and restore the setting after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(len(os.sched_getaffinity(0)), 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _set_param(module, name: str, value) -> None:
    """Replace parameter ``name`` (dotted, relative to ``module``) by tensor ``value``."""
    import torch

    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    setattr(mod, leaf, None if value is None else torch.nn.Parameter(value, requires_grad=False))


@dataclass
class States:
    """The hidden states of a set of sequences, packed: ``rows[r]`` is a (1, T_r, H) tensor
    holding the sequences ``layout[r]`` = [(index, offset, length), ...] side by side."""

    rows: list
    layout: list[list[tuple[int, int, int]]]
    _masks: dict = field(default_factory=dict)  # (row, window) -> additive mask
    _rope: dict = field(default_factory=dict)  # row -> ((cos, sin), position ids); "where"

    def __len__(self) -> int:
        return sum(len(r) for r in self.layout)

    def sequence(self, j: int):
        """Sequence ``j``'s (1, T, H) states (a view into its row)."""
        r, off, n = self._where()[j]
        return self.rows[r][:, off : off + n]

    def _where(self) -> dict[int, tuple[int, int, int]]:
        if "where" not in self._rope:  # index -> (row, offset, length), made once
            self._rope["where"] = {
                j: (r, off, n) for r, seqs in enumerate(self.layout) for j, off, n in seqs
            }
        return self._rope["where"]

    def sequences(self) -> Iterator:
        """Every sequence's (1, T, H) states, in the order they were given."""
        for j in range(len(self)):
            yield self.sequence(j)

    def like(self, rows: list) -> States:
        """Other states (another stream) of the same sequences in the same packing."""
        return States(rows, self.layout, self._masks, self._rope)


class Layerwise:
    """The causal LM of ``model_dir`` as a meta-device skeleton whose parts are read in,
    run and freed one at a time (see the module docstring). fp32 on CPU; call its methods
    under ``torch.inference_mode()``."""

    def __init__(self, model_dir: str | os.PathLike):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.dir = Path(model_dir)
        read_config(self.dir)  # a supported family, or a ModelError naming config.json
        self.source = SafetensorsSource(self.dir)
        cfg = AutoConfig.from_pretrained(str(self.dir), trust_remote_code=False)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(
                cfg, attn_implementation="eager", trust_remote_code=False, dtype=torch.float32
            )
        self.model.eval()
        self.config = self.model.config
        self.n_layers = int(self.config.num_hidden_layers)
        self.vocab = int(self.config.vocab_size)
        self.hidden = int(self.config.hidden_size)
        self.rotary = type(self.model.model.rotary_emb)(config=self.config, device="cpu")
        # every layer parameter's (name in the layer, shape), taken from the skeleton once
        self._params = [
            [(n, tuple(p.shape)) for n, p in layer.named_parameters()]
            for layer in self.model.model.layers
        ]

    # -- parts -----------------------------------------------------------------------------

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def linear_names(self, i: int) -> list[str]:
        """HF weight names of the ``nn.Linear`` projections of layer ``i`` (module order)."""
        import torch

        return [
            f"{self.layer_prefix(i)}{n}.weight"
            for n, m in self.model.model.layers[i].named_modules()
            if isinstance(m, torch.nn.Linear)
        ]

    def _read(self, name: str) -> np.ndarray:
        """The checkpoint's tensor in fp32, widened a chunk of rows at a time (so a bf16
        tensor costs its fp32 copy, not that plus the widening's full-size temporaries)."""
        info = self.source.info(name)
        if info.dtype == "F32" or len(info.shape) < 2:
            return self.source.array(name)
        out = np.empty(info.shape, np.float32)
        step = max(1, READ_ELEMENTS // max(1, info.numel // info.shape[0]))
        for a in range(0, info.shape[0], step):
            b = min(a + step, info.shape[0])
            out[a:b] = self.source.array(name, (a, b))
        return out

    def _tensor(self, name: str, shape: tuple[int, ...], weights: WeightFn | None):
        """fp32 torch tensor of ``name``: the override's if it gives one, else the checkpoint's."""
        import torch

        arr = weights(name) if weights is not None else None
        what = "weight override"
        if arr is None:
            arr, what = self._read(name), str(self.source.info(name).file)
        arr = np.asarray(arr)
        if arr.shape != tuple(shape):
            raise ModelError(
                f"{what}: tensor {name!r} has shape {list(arr.shape)}, the model "
                f"needs {list(shape)} (HF layout: (out, in) for a projection)"
            )
        if arr.dtype != np.float32 or not arr.flags.c_contiguous or not arr.flags.writeable:
            arr = np.array(arr, np.float32, order="C")  # torch shares, so own a writable copy
        return torch.from_numpy(arr)

    def _load_module(self, module, prefix: str, params, weights: WeightFn | None) -> None:
        for name, shape in params:
            _set_param(module, name, None)  # a reload frees the old tensor before reading
            _set_param(module, name, self._tensor(prefix + name, shape, weights))

    def load_layer(self, i: int, weights: WeightFn | None = None):
        """Read decoder layer ``i``'s tensors (overrides first) onto the CPU; the module."""
        layer = self.model.model.layers[i]
        self._load_module(layer, self.layer_prefix(i), self._params[i], weights)
        return layer

    def apply_weights(self, i: int, weights: WeightFn) -> None:
        """Swap the overrides ``weights`` gives into loaded layer ``i``, one tensor at a time
        (the rest stay as loaded): the quantized model's layer after the fp32 one has run."""
        layer = self.model.model.layers[i]
        for name, shape in self._params[i]:
            arr = weights(self.layer_prefix(i) + name)
            if arr is not None:

                def given(_n: str, a: np.ndarray = arr) -> np.ndarray:
                    return a

                _set_param(layer, name, None)  # free the old tensor before making the new one
                _set_param(layer, name, self._tensor(self.layer_prefix(i) + name, shape, given))

    def free_layer(self, i: int) -> None:
        """Send layer ``i`` back to the meta device (its CPU tensors are freed)."""
        import torch

        layer = self.model.model.layers[i]
        for name, shape in self._params[i]:
            _set_param(layer, name, torch.empty(shape, device="meta"))

    @contextmanager
    def layer(self, i: int, weights: WeightFn | None = None):
        """``load_layer`` … ``free_layer`` around a block."""
        layer = self.load_layer(i, weights)
        try:
            yield layer
        finally:
            self.free_layer(i)

    # -- running -----------------------------------------------------------------------------

    def window(self, i: int) -> int | None:
        """Sliding-window size of layer ``i``'s attention mask where HF's model uses one."""
        cfg = self.config
        if cfg.model_type == "llama":
            return None
        if cfg.model_type == "qwen2":
            types = getattr(cfg, "layer_types", None)
            if not types or types[i] != "sliding_attention":
                return None
        return getattr(cfg, "sliding_window", None) or None

    def _rope_group(self, t: int, j: int):
        """Sequences that may share a packed row: their rotary embedding must not depend on
        the row's longest sequence (longrope switches factors past the original length;
        dynamic rope rescales by length, so those run alone)."""
        kind = getattr(self.rotary, "rope_type", "default")
        if "dynamic" in kind:
            return ("alone", j)
        if kind == "longrope":
            orig = getattr(self.config, "original_max_position_embeddings", None)
            return t > (orig or self.config.max_position_embeddings)
        return None

    def pack(self, lengths: Sequence[int]) -> list[list[tuple[int, int, int]]]:
        """Rows of (index, offset, length): sequences in order, side by side while a row
        stays within ``PACK_TOKENS`` and one rope group; a longer sequence has a row alone."""
        rows: list[list[tuple[int, int, int]]] = []
        open_rows: dict = {}  # rope group -> (row index, tokens in it)
        for j, t in enumerate(lengths):
            g = self._rope_group(t, j)
            r, used = open_rows.get(g, (None, 0))
            if r is None or used + t > PACK_TOKENS:
                rows.append([])
                r, used = len(rows) - 1, 0
            rows[r].append((j, used, t))
            open_rows[g] = (r, used + t)
        return rows

    def _position(self, states: States, r: int):
        """(cos, sin) of HF's rotary embedding and the position ids of row ``r`` (positions
        restart at 0 for each sequence; the same for every layer, so made once)."""
        import torch

        if r not in states._rope:
            pos = torch.cat([torch.arange(n) for _, _, n in states.layout[r]])[None]
            states._rope[r] = (self.rotary(states.rows[r], pos), pos)
        return states._rope[r]

    @staticmethod
    def causal_mask(lengths: Sequence[int], window: int | None):
        """(1, 1, T, T) additive mask as HF's eager attention gets it, for sequences of
        ``lengths`` side by side: 0 where position q may see k (same sequence, k <= q, and
        k > q - window with a sliding window), the dtype's min elsewhere."""
        import torch

        seq = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
        idx = torch.arange(len(seq))
        q, k = idx[:, None], idx[None, :]
        allowed = (k <= q) & (seq[:, None] == seq[None, :])
        if window is not None:
            allowed &= k > q - window
        mask = torch.full((len(seq), len(seq)), torch.finfo(torch.float32).min)
        return mask.masked_fill_(allowed, 0.0)[None, None]

    def _mask(self, states: States, r: int, window: int | None):
        key = (r, window)
        if key not in states._masks:
            states._masks[key] = self.causal_mask([n for _, _, n in states.layout[r]], window)
        return states._masks[key]

    def run_row(self, i: int, states: States, r: int):
        """Row ``r`` of ``states`` through loaded layer ``i``: the output (1, T_r, H)."""
        rope, pos = self._position(states, r)
        y = self.model.model.layers[i](
            states.rows[r],
            position_ids=pos,
            position_embeddings=rope,
            attention_mask=self._mask(states, r, self.window(i)),
        )
        return y[0] if isinstance(y, tuple) else y

    def run_layer(self, i: int, states: States) -> States:
        """Every row of ``states`` through loaded layer ``i``, in place; returns ``states``."""
        for r in range(len(states.rows)):
            states.rows[r] = self.run_row(i, states, r)
        return states

    def embed(
        self, token_lists: Sequence[Sequence[int]], weights: WeightFn | None = None
    ) -> States:
        """The input embeddings of the sequences, packed. Reads only the rows the tokens
        use, unless ``weights`` overrides ``model.embed_tokens.weight`` (then its table)."""
        import torch

        name = "model.embed_tokens.weight"
        ids = [np.asarray(t, np.int64).reshape(-1) for t in token_lists]
        if not ids or not all(len(t) for t in ids):
            raise DataError("no tokens to run: every sequence needs at least one")
        used = np.unique(np.concatenate(ids))
        if used[0] < 0 or used[-1] >= self.vocab:
            bad = used[0] if used[0] < 0 else used[-1]
            raise DataError(f"token id {int(bad)} is outside the vocabulary of {self.vocab}")
        table = weights(name) if weights is not None else None
        if table is not None:
            rows_t = self._tensor(name, (self.vocab, self.hidden), lambda _n: table)
            row_ids: np.ndarray | None = None  # rows_t is the whole table: a token's row is its id
        else:
            self.source.expect(name, (self.vocab, self.hidden))
            rows = np.empty((len(used), self.hidden), np.float32)
            start = 0
            while start < len(used):  # runs of consecutive ids: one read each
                stop = start + 1
                while stop < len(used) and used[stop] == used[stop - 1] + 1:
                    stop += 1
                rows[start:stop] = self.source.array(
                    name, (int(used[start]), int(used[stop - 1]) + 1)
                )
                start = stop
            rows_t = torch.from_numpy(rows)
            row_ids = used  # rows_t holds the rows of the sorted used ids
        layout = self.pack([len(t) for t in ids])
        packed = []
        for row in layout:
            tok = np.concatenate([ids[j] for j, _, _ in row])
            packed.append(rows_t[tok if row_ids is None else np.searchsorted(row_ids, tok)][None])
        return States(packed, layout)

    def head(self, weights: WeightFn | None = None, like: Head | None = None) -> Head:
        """The final norm and LM head, loaded (the head asks ``weights`` for
        ``lm_head.weight``; without one it is the checkpoint's, the embedding when tied).
        ``like``: a head already holding the checkpoint's tensors, shared where ``weights``
        overrides nothing (so a second stream does not read the head again)."""
        norm_params = [(n, tuple(p.shape)) for n, p in self.model.model.norm.named_parameters()]
        norm_over = weights is not None and any(
            weights(f"model.norm.{n}") is not None for n, _ in norm_params
        )
        if like is not None and not norm_over:
            norm = like.norm
        else:
            norm = copy.deepcopy(self.model.model.norm)
            self._load_module(norm, "model.norm.", norm_params, weights)
        name, shape = "lm_head.weight", (self.vocab, self.hidden)
        rows = override_rows(weights, name, shape)
        if rows is not None:
            return Head(norm, rows)
        if like is not None:
            return Head(norm, like.weight)
        stored = "model.embed_tokens.weight" if self.config.tie_word_embeddings else name
        self.source.expect(stored, shape)
        return Head(norm, CheckpointRows(self.source, stored))

    def forward(
        self,
        token_lists: Sequence[Sequence[int]],
        weights: WeightFn | None = None,
        desc: str = "layers",
    ) -> States:
        """Every sequence's final hidden states (before the norm), one layer at a time."""
        states = self.embed(token_lists, weights)
        for i in tqdm(range(self.n_layers), desc=desc, unit="layer", disable=None, leave=False):
            self.load_layer(i, weights)
            try:
                self.run_layer(i, states)
            finally:
                self.free_layer(i)
        return states

    def logits(
        self, token_lists: Sequence[Sequence[int]], weights: WeightFn | None = None
    ) -> Iterator[np.ndarray]:
        """(T, V) fp32 logits of each sequence in turn (one pass over the layers, then the
        head per sequence). Runs under inference mode with every core."""
        import torch

        with torch_threads(), torch.inference_mode():
            states = self.forward(token_lists, weights)
            head = self.head(weights)
        for group in token_groups([len(t) for t in token_lists]):
            # the settings are not left on while the caller runs
            with torch_threads(), torch.inference_mode():
                out = head.logits_many([states.sequence(j) for j in group])
            for lg in out:
                yield lg.numpy()


# -- the two uses: parity of a quantized model, and greedy decoding -----------------------


@dataclass(frozen=True)
class Parity:
    """``parity``'s result: ``metrics`` has ``report.quant_vs_fp32``'s keys (JSON-ready);
    the first sequence's (T, V) fp32 logits of both streams, to check ONNX Runtime's run of
    the bundle against (max |Δlogit|)."""

    metrics: dict
    fp32_logits: np.ndarray
    quant_logits: np.ndarray


def parity(
    model_dir: str | os.PathLike,
    token_lists: Sequence[Sequence[int]],
    quant_weights: WeightFn | Mapping[str, np.ndarray],
) -> Parity:
    """The quantized model (checkpoint + ``quant_weights`` overrides, HF layout (out, in))
    against the fp32 checkpoint on ``token_lists``: top-1 next-token agreement, perplexity of
    each, ppl change, mean KL(fp32 || quant) per token (``report.quant_vs_fp32``'s keys and
    definitions). Both streams go through each layer while its weights are loaded: one pass
    over the checkpoint, each layer read once; the override is asked once per tensor."""
    import torch

    quant = as_weight_fn(quant_weights)
    lw = Layerwise(model_dir)
    with torch_threads(), torch.inference_mode():
        ref = lw.embed(token_lists)
        qst = ref.like(lw.embed(token_lists, quant).rows)
        for i in tqdm(range(lw.n_layers), desc="parity", unit="layer", disable=None, leave=False):
            lw.load_layer(i)
            try:
                lw.run_layer(i, ref)
                lw.apply_weights(i, quant)
                lw.run_layer(i, qst)
            finally:
                lw.free_layer(i)
        head_f = lw.head()
        head_q = lw.head(quant, like=head_f)
        scores, first = Scores(), None
        for group in token_groups([len(t) for t in token_lists]):
            lfs = head_f.logits_many([ref.sequence(j) for j in group])
            lqs = head_q.logits_many([qst.sequence(j) for j in group])
            for j, lf, lq in zip(group, lfs, lqs, strict=True):
                lf, lq = lf.numpy(), lq.numpy()
                scores.add(lf[:-1], lq[:-1], token_lists[j])
                if j == 0:
                    first = (lf.copy(), lq.copy())
    assert first is not None  # embed raised DataError unless there is a sequence 0
    return Parity(scores.result(), *first)


def logits(
    model_dir: str | os.PathLike,
    token_lists: Sequence[Sequence[int]],
    weights: WeightFn | Mapping[str, np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """(T, V) fp32 logits of each sequence in turn, of the checkpoint or, with ``weights``,
    of the overridden model: one pass over the layers, then the head per sequence."""
    return Layerwise(model_dir).logits(token_lists, as_weight_fn(weights))


def greedy(
    model_dir: str | os.PathLike,
    prompt_ids: Sequence[int],
    steps: int,
    quant_weights: WeightFn | Mapping[str, np.ndarray] | None = None,
) -> list[int]:
    """``steps`` greedy tokens (plain argmax, nothing suppressed) after ``prompt_ids``, of the
    checkpoint or, with ``quant_weights``, of the overridden model.

    No KV cache: each step runs the whole prefix through every layer, so it reads every
    weight once per step (and asks the override once per tensor per step) and costs
    ``steps`` forward passes over prefixes of growing length: fine for tiny models and a few
    dozen steps; at Phi-3-mini size, several seconds per step."""
    import torch

    weights = as_weight_fn(quant_weights)
    lw = Layerwise(model_dir)
    seq = [int(t) for t in prompt_ids]
    with torch_threads(), torch.inference_mode():
        for _ in range(steps):
            states = lw.forward([seq], weights, desc="greedy")
            seq.append(int(lw.head(weights).logits(states.sequence(0), last=True)[0].argmax()))
    return seq[len(prompt_ids) :]
