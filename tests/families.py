"""Tiny random-weight GGUF models of several llama.cpp architectures ("families").

:func:`write_random_family` writes one file per family in milliseconds; every file
loads in the vendored llama.cpp and gives finite logits with the stock cache. They
share the byte-level BPE vocabulary of :func:`pyllama_inf.testing.write_random_llama`
(278 tokens, BOS 0, EOS 1), so token ids 2..277 are valid for every family.

Sizes: 2 layers (smollm3 and gemma2 4, gemma3 6), n_embd 64, 4 query heads, 2 KV heads (1 for
starcoder, multi-query like the real one), head_dim 16 (32 for qwen3 and gemma3,
set with ``attention.key_length`` like the real models), n_ff 128, f32 weights.
Matrices are normal with std ``1/sqrt(fan_in)``, token embeddings standard normal,
norm weights ones and biases small normal values.

What each family exercises (the metadata keys and tensors are the ones the loaders
in ``vendor/llama.cpp/src/models/<arch>.cpp`` read):

==================  ===========================================================
llama               plain llama (NORM rope, GQA)
llama-rope-freqs    llama + ``rope_freqs.weight`` (Llama 3.1-style frequency factors)
llama-yarn          llama + YaRN scaling (factor 4 over 1024 trained positions) and
                    ``rope.scaling.attn_factor`` 0.8
qwen2               NEOX rope, q/k/v biases
qwen3               NEOX rope, per-head q/k RMS norms, head_dim 32 != n_embd/n_head
phi2                partial NEOX rope (8 of 16 dims), fused QKV with bias, LayerNorm
                    with bias, parallel attention/FFN
phi3                Phi-3 LongRoPE: ``rope_factors_long`` / ``rope_factors_short``
                    (the long ones apply: n_ctx > ``rope.scaling.original_context_length``
                    = 512), fused QKV without bias, fused gate/up FFN
stablelm            partial NEOX rope (4 of 16 dims), LayerNorm with bias
gemma               tied output, embeddings scaled by sqrt(n_embd), GELU FFN
gemma2              sliding-window layers (window 64, every other layer), attention
                    logit soft-capping (cap 1: the tanh bends the scores of this model),
                    post norms
gemma3              sliding-window layers (window 64, pattern 3: layers 2 and 5
                    global), separate rope bases, q/k norms, post norms, head_dim 32
granite             attention/residual/embedding/logit scales, rope on
granite-norope      granite with ``granite.rope.scaling.finetuned = false``: no rope
smollm3             every 4th layer without rope (layer 3 of 4)
starcoder           no rope, learned absolute position embeddings, fused QKV, MQA
glm4                partial NORM rope (8 of 16 dims), post norms, fused gate/up FFN
qwen3moe            mixture of experts (4 experts, 2 used), q/k norms
==================  ===========================================================
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Dict, Optional, Tuple

import gguf
import numpy as np

from pyllama_inf.testing import _MERGES, _add_weight, _array, _tiny_vocab, _typed

F32 = gguf.GGMLQuantizationType.F32


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one family: its llama.cpp architecture and its shape."""

    arch: str
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    head_dim: Optional[int] = None  # None: n_embd // n_head (no key_length key written)
    n_rot: Optional[int] = None     # None: head_dim
    note: str = ""

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def rot(self) -> int:
        return self.n_rot or self.hd


FAMILIES: Dict[str, Family] = {
    "llama": Family("llama", note="plain llama"),
    "llama-rope-freqs": Family("llama", note="rope_freqs.weight factors 1..8 (Llama 3.1)"),
    "llama-yarn": Family("llama", note="YaRN factor 4 over 1024 positions, attn_factor 0.8"),
    "qwen2": Family("qwen2", note="NEOX rope, q/k/v biases"),
    "qwen3": Family("qwen3", head_dim=32, note="per-head q/k norms, head_dim 32"),
    "phi2": Family("phi2", n_rot=8, note="partial rotary 8/16, fused qkv, parallel attn/ffn"),
    "phi3": Family("phi3", note="LongRoPE long/short factors (long in use), fused qkv and gate/up"),
    "stablelm": Family("stablelm", n_rot=4, note="partial rotary 4/16, LayerNorm with bias"),
    "gemma": Family("gemma", note="gemma 1: tied output, sqrt(n_embd) embedding scale"),
    "gemma2": Family("gemma2", n_layer=4, note="SWA 64 on layers 0, 2; attention logit soft-cap 1"),
    "gemma3": Family("gemma3", n_layer=6, head_dim=32, note="SWA 64, pattern 3 (layers 2, 5 global)"),
    "granite": Family("granite", note="granite scales, rope on"),
    "granite-norope": Family("granite", note="granite.rope.scaling.finetuned=false: no rope"),
    "smollm3": Family("smollm3", n_layer=4, note="layer 3 has no rope (fixed step 4)"),
    "starcoder": Family("starcoder", n_head_kv=1, note="no rope, learned positions, fused qkv, MQA"),
    "glm4": Family("glm4", n_rot=8, note="partial NORM rope 8/16, post norms, fused gate/up"),
    "qwen3moe": Family("qwen3moe", note="MoE: 4 experts, 2 used, expert ffn 32"),
}

N_EXPERT, N_EXPERT_USED, N_FF_EXP = 4, 2, 32
SWA_WINDOW, SWA_PATTERN = 64, 3
# small, so that tanh bends the attention scores: without the cap this model's logits move by
# an NMSE of 1.4e-2 (measured), though its top-1 tokens stay (test_families checks the NMSE)
GEMMA2_SOFTCAP = 1.0

_U32 = gguf.GGUFValueType.UINT32
_F32V = gguf.GGUFValueType.FLOAT32
_STR = gguf.GGUFValueType.STRING
_BOOL = gguf.GGUFValueType.BOOL


class _Writer:
    """Random tensors for one file, in the order they are added."""

    def __init__(self, writer: gguf.GGUFWriter, seed: int) -> None:
        self.w = writer
        self.rng = np.random.default_rng(seed)

    def matrix(self, name: str, n_out: int, n_in: int, std: Optional[float] = None) -> None:
        # numpy (n_out, n_in) is ggml ne = {n_in, n_out}
        scale = n_in ** -0.5 if std is None else std
        m = self.rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(scale)
        _add_weight(self.w, name, m, F32)

    def experts(self, name: str, n_expert: int, n_out: int, n_in: int) -> None:
        # numpy (n_expert, n_out, n_in) is ggml ne = {n_in, n_out, n_expert}
        m = self.rng.standard_normal((n_expert, n_out, n_in), dtype=np.float32) * np.float32(n_in ** -0.5)
        _add_weight(self.w, name, m, F32)

    def ones(self, name: str, n: int) -> None:
        self.w.add_tensor(name, np.ones(n, dtype=np.float32))

    def bias(self, name: str, n: int) -> None:
        self.w.add_tensor(name, self.rng.standard_normal(n, dtype=np.float32) * np.float32(0.1))

    def vector(self, name: str, values: np.ndarray) -> None:
        self.w.add_tensor(name, np.asarray(values, dtype=np.float32))


def _llama3_rope_factors(n: int) -> np.ndarray:
    """n frequency factors like Llama 3.1's: 1 for the fast dimensions, 8 for the slow ones,
    a smooth ramp in between."""
    lo, hi = n // 4, n - n // 4
    f = np.ones(n, dtype=np.float32)
    ramp = np.geomspace(1.0, 8.0, hi - lo + 2)[1:-1]
    f[lo:hi] = ramp
    f[hi:] = 8.0
    return f


# Phi-3's original context: the child processes use n_ctx 1024 > 512, so the long factors apply
PHI3_ORIG_CTX = 512


def write_random_family(path, family: str, *, seed: int = 0, n_ctx_train: int = 4096,
                        rope_factors: Optional[np.ndarray] = None, **kw: Any) -> pathlib.Path:
    """Write a tiny random-weight GGUF model of ``family`` (a key of :data:`FAMILIES`).

    ``rope_factors`` (n_rot/2 values) replaces the frequency factors of the families that
    have them (``llama-rope-freqs``: ``rope_freqs.weight``; ``phi3``: the long factors).

    ``kw`` overrides the family's shape (``n_layer``, ``n_embd``, ``n_head``,
    ``n_head_kv``, ``n_ff``, ``head_dim``, ``n_rot``); ``extra_kv`` (a dict) adds or
    replaces metadata keys, typed as :func:`pyllama_inf.testing.write_random_llama`
    types them (``None`` removes a key). The same arguments always write the same file.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
    extra_kv = kw.pop("extra_kv", None) or {}
    spec = dataclasses.replace(FAMILIES[family], **kw)  # TypeError for unknown fields
    arch = spec.arch
    n_embd, n_head, n_head_kv, n_ff, n_layer = spec.n_embd, spec.n_head, spec.n_head_kv, spec.n_ff, spec.n_layer
    hd, rot = spec.hd, spec.rot
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    n_q, n_kv = n_head * hd, n_head_kv * hd
    tokens, token_types = _tiny_vocab()
    n_vocab = len(tokens)

    layer_norm = arch in ("phi2", "stablelm", "starcoder")  # LayerNorm (with bias), not RMSNorm
    kv: Dict[str, gguf.GGUFValue] = {}

    def put(key: str, value: Any, vtype: gguf.GGUFValueType) -> None:
        kv[key] = gguf.GGUFValue(value, vtype)

    # llama-vocab.cpp looks up "<unk>" and "<|endoftext|>" for any model whose name has
    # "phi3" in it, which this vocabulary lacks: the phi3 file gets another name
    put("general.name", "random-longrope" if arch == "phi3" else f"random-{family}", _STR)
    put("general.file_type", int(gguf.LlamaFileType.ALL_F32), _U32)
    put(f"{arch}.context_length", n_ctx_train, _U32)
    put(f"{arch}.embedding_length", n_embd, _U32)
    put(f"{arch}.block_count", n_layer, _U32)
    put(f"{arch}.feed_forward_length", n_ff, _U32)
    put(f"{arch}.attention.head_count", n_head, _U32)
    put(f"{arch}.attention.head_count_kv", n_head_kv, _U32)
    if spec.head_dim is not None:
        put(f"{arch}.attention.key_length", hd, _U32)
        put(f"{arch}.attention.value_length", hd, _U32)
    if arch != "starcoder":
        put(f"{arch}.rope.dimension_count", rot, _U32)
        put(f"{arch}.rope.freq_base", 1e6 if arch in ("qwen2", "qwen3", "qwen3moe", "gemma3") else 1e4, _F32V)
    if layer_norm:
        put(f"{arch}.attention.layer_norm_epsilon", 1e-5, _F32V)
    else:
        put(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6, _F32V)

    # per-family metadata
    if arch == "gemma3":
        # read in src/models/gemma3.cpp: window > 0 turns SWA on, then load_swa_pattern(ml, 6)
        # (src/llama-model.cpp) takes a uint32 period (layer il is SWA unless il % p == p - 1)
        # or a bool array per layer
        put("gemma3.attention.sliding_window", SWA_WINDOW, _U32)
        put("gemma3.attention.sliding_window_pattern", SWA_PATTERN, _U32)
        put("gemma3.rope.freq_base_swa", 1e4, _F32V)
    if arch == "gemma2":
        # src/models/gemma2.cpp: SWA always on, period 2 (layer il is SWA unless il % 2 == 1),
        # soft-capping always on with the cap read here (default 50)
        put("gemma2.attention.sliding_window", SWA_WINDOW, _U32)
        put("gemma2.attn_logit_softcapping", GEMMA2_SOFTCAP, _F32V)
        put("gemma2.final_logit_softcapping", 30.0, _F32V)
    if arch == "granite":
        # src/models/granite.cpp: logit_scale is required, the others optional
        put("granite.logit_scale", 2.0, _F32V)
        put("granite.residual_scale", 0.5, _F32V)
        put("granite.embedding_scale", 4.0, _F32V)
        put("granite.attention.scale", 2.0 / hd ** 0.5, _F32V)   # sharper than the default 1/sqrt(hd)
        if family == "granite-norope":
            # src/models/granite.cpp: rope.scaling.finetuned (default true) switches rope
            # on or off for every layer (hparams.rope_pattern)
            put("granite.rope.scaling.finetuned", False, _BOOL)
    if family == "llama-yarn":
        # src/llama-model.cpp: rope.scaling.type selects YaRN, the factor sets
        # freq_scale = 1/factor; attn_factor multiplies YaRN's magnitude scale
        put("llama.rope.scaling.type", "yarn", _STR)
        put("llama.rope.scaling.factor", 4.0, _F32V)
        put("llama.rope.scaling.original_context_length", 1024, _U32)
        put("llama.rope.scaling.attn_factor", 0.8, _F32V)
    if arch == "phi3":
        put("phi3.rope.scaling.original_context_length", PHI3_ORIG_CTX, _U32)
    if arch == "qwen3moe":
        put("qwen3moe.expert_count", N_EXPERT, _U32)
        put("qwen3moe.expert_used_count", N_EXPERT_USED, _U32)
        put("qwen3moe.expert_feed_forward_length", N_FF_EXP, _U32)

    put("tokenizer.ggml.model", "gpt2", _STR)
    put("tokenizer.ggml.pre", "smollm", _STR)
    put("tokenizer.ggml.bos_token_id", 0, _U32)
    put("tokenizer.ggml.eos_token_id", 1, _U32)
    put("tokenizer.ggml.add_bos_token", True, _BOOL)
    put("tokenizer.ggml.add_eos_token", False, _BOOL)
    kv["tokenizer.ggml.tokens"] = _array(tokens, _STR)
    kv["tokenizer.ggml.token_type"] = _array(token_types, gguf.GGUFValueType.INT32)
    kv["tokenizer.ggml.merges"] = _array(_MERGES, _STR)
    for key, value in extra_kv.items():
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = value if isinstance(value, gguf.GGUFValue) else _typed(key, value)

    writer = gguf.GGUFWriter(os.fspath(path), arch)
    for key, value in kv.items():
        writer.add_key_value(key, value.value, value.type, value.sub_type)
    t = _Writer(writer, seed)

    def norm(name: str, with_bias: bool = False) -> None:
        t.ones(f"{name}.weight", n_embd)
        if with_bias:
            t.bias(f"{name}.bias", n_embd)

    def qkv_separate(p: str, biases: bool = False) -> None:
        t.matrix(f"{p}.attn_q.weight", n_q, n_embd)
        t.matrix(f"{p}.attn_k.weight", n_kv, n_embd)
        t.matrix(f"{p}.attn_v.weight", n_kv, n_embd)
        if biases:
            t.bias(f"{p}.attn_q.bias", n_q)
            t.bias(f"{p}.attn_k.bias", n_kv)
            t.bias(f"{p}.attn_v.bias", n_kv)

    def qkv_fused(p: str) -> None:
        t.matrix(f"{p}.attn_qkv.weight", n_q + 2 * n_kv, n_embd)
        t.bias(f"{p}.attn_qkv.bias", n_q + 2 * n_kv)

    def swiglu_ffn(p: str) -> None:
        t.matrix(f"{p}.ffn_gate.weight", n_ff, n_embd)
        t.matrix(f"{p}.ffn_up.weight", n_ff, n_embd)
        t.matrix(f"{p}.ffn_down.weight", n_embd, n_ff)

    t.matrix("token_embd.weight", n_vocab, n_embd, 1.0)
    if arch == "starcoder":
        t.matrix("position_embd.weight", n_ctx_train, n_embd, 0.5)
    if family == "llama-rope-freqs":
        t.vector("rope_freqs.weight", _llama3_rope_factors(rot // 2) if rope_factors is None else rope_factors)
    if arch == "phi3":
        # src/models/phi3.cpp: model-wide factor tensors; get_rope_factors picks the long ones
        # when n_ctx_seq > n_ctx_orig_yarn
        t.vector("rope_factors_long.weight",
                 np.linspace(1.0, 6.0, rot // 2) if rope_factors is None else rope_factors)
        t.vector("rope_factors_short.weight", np.linspace(1.0, 1.5, rot // 2))

    for i in range(n_layer):
        p = f"blk.{i}"
        if arch in ("llama", "granite", "smollm3", "gemma", "qwen2"):
            norm(f"{p}.attn_norm")
            qkv_separate(p, biases=arch == "qwen2")
            t.matrix(f"{p}.attn_output.weight", n_embd, n_q)
            norm(f"{p}.ffn_norm")
            swiglu_ffn(p)
        elif arch in ("qwen3", "qwen3moe"):
            norm(f"{p}.attn_norm")
            qkv_separate(p)
            t.ones(f"{p}.attn_q_norm.weight", hd)
            t.ones(f"{p}.attn_k_norm.weight", hd)
            t.matrix(f"{p}.attn_output.weight", n_embd, n_q)
            norm(f"{p}.ffn_norm")
            if arch == "qwen3":
                swiglu_ffn(p)
            else:
                t.matrix(f"{p}.ffn_gate_inp.weight", N_EXPERT, n_embd)
                t.experts(f"{p}.ffn_gate_exps.weight", N_EXPERT, N_FF_EXP, n_embd)
                t.experts(f"{p}.ffn_up_exps.weight", N_EXPERT, N_FF_EXP, n_embd)
                t.experts(f"{p}.ffn_down_exps.weight", N_EXPERT, n_embd, N_FF_EXP)
        elif arch == "phi2":
            norm(f"{p}.attn_norm", with_bias=True)
            qkv_fused(p)
            t.matrix(f"{p}.attn_output.weight", n_embd, n_q)
            t.bias(f"{p}.attn_output.bias", n_embd)
            t.matrix(f"{p}.ffn_up.weight", n_ff, n_embd)
            t.bias(f"{p}.ffn_up.bias", n_ff)
            t.matrix(f"{p}.ffn_down.weight", n_embd, n_ff)
            t.bias(f"{p}.ffn_down.bias", n_embd)
        elif arch == "phi3":
            norm(f"{p}.attn_norm")
            t.matrix(f"{p}.attn_qkv.weight", n_q + 2 * n_kv, n_embd)
            t.matrix(f"{p}.attn_output.weight", n_embd, n_q)
            norm(f"{p}.ffn_norm")
            t.matrix(f"{p}.ffn_up.weight", 2 * n_ff, n_embd)   # gate and up, fused
            t.matrix(f"{p}.ffn_down.weight", n_embd, n_ff)
        elif arch == "stablelm":
            norm(f"{p}.attn_norm", with_bias=True)
            qkv_separate(p, biases=True)
            t.matrix(f"{p}.attn_output.weight", n_embd, n_q)
            norm(f"{p}.ffn_norm", with_bias=True)
            swiglu_ffn(p)
        elif arch == "gemma2":
            norm(f"{p}.attn_norm")
            qkv_separate(p)
            t.matrix(f"{p}.attn_output.weight", n_embd, n_q)
            norm(f"{p}.post_attention_norm")
            norm(f"{p}.ffn_norm")
            swiglu_ffn(p)
            norm(f"{p}.post_ffw_norm")
        elif arch == "gemma3":
            norm(f"{p}.attn_norm")
            qkv_separate(p)
            t.ones(f"{p}.attn_q_norm.weight", hd)
            t.ones(f"{p}.attn_k_norm.weight", hd)
            t.matrix(f"{p}.attn_output.weight", n_embd, n_q)
            norm(f"{p}.post_attention_norm")
            norm(f"{p}.ffn_norm")
            swiglu_ffn(p)
            norm(f"{p}.post_ffw_norm")
        elif arch == "starcoder":
            norm(f"{p}.attn_norm", with_bias=True)
            qkv_fused(p)
            t.matrix(f"{p}.attn_output.weight", n_embd, n_q)
            t.bias(f"{p}.attn_output.bias", n_embd)
            norm(f"{p}.ffn_norm", with_bias=True)
            t.matrix(f"{p}.ffn_up.weight", n_ff, n_embd)
            t.bias(f"{p}.ffn_up.bias", n_ff)
            t.matrix(f"{p}.ffn_down.weight", n_embd, n_ff)
            t.bias(f"{p}.ffn_down.bias", n_embd)
        elif arch == "glm4":
            norm(f"{p}.attn_norm")
            qkv_separate(p, biases=True)
            t.matrix(f"{p}.attn_output.weight", n_embd, n_q)
            norm(f"{p}.post_attention_norm")
            norm(f"{p}.ffn_norm")
            t.matrix(f"{p}.ffn_up.weight", 2 * n_ff, n_embd)   # gate and up, fused
            t.matrix(f"{p}.ffn_down.weight", n_embd, n_ff)
            norm(f"{p}.post_ffw_norm")
        else:  # pragma: no cover - FAMILIES and this switch go together
            raise AssertionError(arch)

    norm("output_norm", with_bias=layer_norm)
    if arch not in ("gemma", "gemma2"):   # these tie the output to token_embd (llama.cpp requires it)
        t.matrix("output.weight", n_vocab, n_embd)
    if arch == "phi2":
        t.bias("output.bias", n_vocab)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(path)


def write_all(directory, **kw: Any) -> Dict[str, pathlib.Path]:
    """Write every family into ``directory`` as ``<family>.gguf``; returns name -> path."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {name: write_random_family(directory / f"{name}.gguf", name, **kw) for name in FAMILIES}
