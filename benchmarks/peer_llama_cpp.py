"""llama.cpp, the CPU engine users reach for, on the same model as the other variants of `e2e.py`.

`write_gguf` writes the compact Llama's weights as a bf16 GGUF file that llama.cpp's `llama` architecture
reads: tensors renamed, q/k rows permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's
interleaved one (what llama.cpp's own `convert_hf_to_gguf.py` does), Llama-3 frequency scaling as the
`rope_freqs` factors, and a placeholder vocabulary (the benchmark feeds token ids; nothing is tokenized).

`time_llama_cpp` runs greedy decoding of a prompt through `llama-cpp-python` in a child process, because
llama.cpp's worker threads and torch's OpenMP threads would fight over the cores in one process, and
returns the prefill and per-step decode seconds, the tokens, and the prompt's last logits (to check that
llama.cpp computes the same model). The weights are read into memory, not mapped, as torch holds them.

    pip install gguf llama-cpp-python   # llama-cpp-python builds llama.cpp from source (about 10 min on 2 cores)
    python benchmarks/e2e.py --model llama-3.2-1b --batch 1 --llama-cpp native q8_0
    python benchmarks/peer_llama_cpp.py --write --gguf /tmp/llama-3.2-1b-bf16.gguf   # the GGUF file alone
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from autocomp_compile.models.llama import Llama, LlamaConfig

# The child process imports neither torch nor the package: only numpy and llama.cpp's threads run there.

# Hugging Face parameter names (the compact Llama uses them) -> llama.cpp's GGUF tensor names.
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def missing_packages() -> list[str]:
    """The Python packages this benchmark needs that are not installed."""
    return [name for name, module in (("gguf", "gguf"), ("llama-cpp-python", "llama_cpp"))
            if importlib.util.find_spec(module) is None]


def gguf_name(name: str) -> str:
    """llama.cpp's name of a compact-Llama parameter; KeyError for one llama.cpp has no place for."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return f"blk.{parts[2]}.{_LAYER_TENSORS['.'.join(parts[3:])]}"
    raise KeyError(name)


def interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a q or k projection's rows per head from rotate-half pairs (i, i + d/2) to adjacent pairs
    (2i, 2i + 1): with that, llama.cpp's interleaved RoPE computes what rotate-half RoPE computes on `w`."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_factors(c: LlamaConfig) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` (the divisor of each unscaled frequency), or None for plain RoPE."""
    import torch

    from autocomp_compile.models.llama import rope_frequencies

    if c.rope_scaling is None:
        return None
    plain = rope_frequencies(dataclasses.replace(c, rope_scaling=None), torch.float64)
    return (plain / rope_frequencies(c, torch.float64)).float()


def _raw(t: torch.Tensor) -> tuple[np.ndarray, object]:
    """A numpy array and its GGML type: bf16 as its 16-bit pattern (numpy has no bfloat16), else float32."""
    import torch
    from gguf import GGMLQuantizationType

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), GGMLQuantizationType.BF16
    return t.float().numpy(), GGMLQuantizationType.F32


WEIGHT_TYPES = ("native", "q8_0")


def write_gguf(model: Llama, path: str | Path, weights: str = "native") -> Path:
    """Write `model` as a GGUF file llama.cpp loads. `weights`: "native" keeps the model's bf16 or fp32
    matrices; "q8_0" stores them in llama.cpp's 8-bit blocks (32 int8 and one fp16 scale: 1.06 bytes per
    weight), as `convert_hf_to_gguf.py --outtype q8_0` does. Norms are float32 either way."""
    import gguf
    import gguf.quants
    import torch

    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights {weights!r}: choose one of {WEIGHT_TYPES}")
    c = model.config
    if c.head_dim * c.heads != c.hidden:
        raise ValueError(f"llama.cpp's llama architecture needs heads x head_dim == hidden "
                         f"({c.heads} x {c.head_dim} != {c.hidden})")
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("autocomp-compile compact Llama (random or loaded weights)")
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.hidden)
    writer.add_block_count(c.layers)
    writer.add_feed_forward_length(c.intermediate)
    writer.add_head_count(c.heads)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.eps)
    writer.add_vocab_size(c.vocab)
    bf16 = model.model.embed_tokens.weight.dtype == torch.bfloat16
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if weights == "q8_0" else
                         gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")  # a placeholder vocabulary: token i is "<i>"
    writer.add_token_list([f"<{i}>" for i in range(c.vocab)])
    writer.add_token_scores([0.0] * c.vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * c.vocab)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(min(1, c.vocab - 1))
    factors = rope_factors(c)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors.numpy())
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        try:
            target = gguf_name(name)
        except KeyError:
            continue  # buffers (RoPE tables, masks, KV caches)
        if target.endswith(("attn_q.weight", "attn_k.weight")):
            value = interleave_rope_rows(value, c.heads if target.endswith("attn_q.weight") else c.kv_heads)
        if target.endswith("norm.weight"):
            value = value.float()
        if weights == "q8_0" and not target.endswith("norm.weight"):
            if value.shape[-1] % 32:
                raise ValueError(f"q8_0 stores rows in blocks of 32 weights: {name} has rows of {value.shape[-1]}")
            array = gguf.quants.quantize(value.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
            kind = gguf.GGMLQuantizationType.Q8_0
        else:
            array, kind = _raw(value)
        writer.add_tensor(target, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass
class LlamaCppRun:
    prefill_s: float
    decode_s: list[float]
    tokens: list[int]
    first_logits: np.ndarray  # the prompt's last position, float32 [vocab]


def time_llama_cpp(gguf_path: str | Path, prompt: list[int], new_tokens: int, threads: int,
                   extra_buffers: bool = True, timeout_s: float = 1800) -> LlamaCppRun:
    """Greedy decoding of `new_tokens` tokens after `prompt` by llama.cpp, in a child process, timed there.

    `extra_buffers=False` keeps llama.cpp from repacking weights for its AMX and other CPU-specific kernels
    (its `use_extra_bufts`): on the Xeon these benchmarks ran on, llama.cpp's AMX 8-bit kernels died with
    SIGILL (a tile instruction faulting, with the tile state granted), so 8-bit weights run its AVX-512 VNNI dot
    products instead. llama.cpp keeps its KV cache in fp16 (its default): 2 bytes per element, as a bf16
    model's cache here."""
    with tempfile.TemporaryDirectory(prefix="llama_cpp_") as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, __file__, "--child", "--gguf", str(gguf_path), "--prompt", ",".join(map(str, prompt)),
               "--new-tokens", str(new_tokens), "--threads", str(threads), "--out", str(out)]
        if not extra_buffers:
            cmd.append("--no-extra-buffers")
        # numpy's OpenBLAS would start a thread per core beside llama.cpp's; the child never calls it
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp child failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        res = json.loads(out.read_text())
        logits = np.load(Path(tmp) / "logits.npy")
    return LlamaCppRun(res["prefill_s"], res["decode_s"], res["tokens"], logits)


def _request_amx_state() -> None:
    """Ask Linux for the AMX tile state, as autocomp's CPU target does (`isa.amx_permitted`) and as any process
    running tile instructions must. (llama.cpp's AMX 8-bit kernels still died with SIGILL on the Xeon these
    benchmarks ran on, with the state granted: see `time_llama_cpp`'s `extra_buffers`.)"""
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        ctypes.CDLL(None).syscall(158, 0x1023, 18)  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA


def _child(args: argparse.Namespace) -> None:
    """Run in the child process: load, prefill, decode, write the timings."""
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    _request_amx_state()
    if args.no_extra_buffers:  # Llama() exposes no argument for it: change the defaults it starts from
        defaults = low_level.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = without_extra_buffers

    prompt = [int(t) for t in args.prompt.split(",")]
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=len(prompt) + args.new_tokens, n_batch=max(len(prompt), 1),
                          n_threads=args.threads, n_threads_batch=args.threads, use_mmap=False, verbose=False)
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # the batch's last position: the only one llama.cpp computes logits for
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

    t0 = time.perf_counter()
    llm.eval(prompt)
    logits = last_logits().copy()
    token = int(logits.argmax())
    prefill_s = time.perf_counter() - t0
    tokens, decode_s = [token], []
    for _ in range(1, args.new_tokens):
        t0 = time.perf_counter()
        llm.eval([token])
        token = int(last_logits().argmax())
        decode_s.append(time.perf_counter() - t0)
        tokens.append(token)
    out = Path(args.out)
    np.save(out.parent / "logits.npy", logits)
    out.write_text(json.dumps({"prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gguf", required=True)
    p.add_argument("--prompt", help="comma-separated token ids")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out")
    p.add_argument("--no-extra-buffers", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="llama-3.2-1b", help="with --write: the model to export (random weights)")
    p.add_argument("--write", action="store_true", help="write the model's GGUF to --gguf and stop")
    p.add_argument("--weights", choices=WEIGHT_TYPES, default="native", help="with --write: how to store the matrices")
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    if args.write:
        from autocomp_compile.models import build_llama

        print(write_gguf(build_llama(args.model, "bf16", seed=0), args.gguf, args.weights))
        return
    p.error("use --write (export), or run it through benchmarks/e2e.py --llama-cpp")


if __name__ == "__main__":
    main()
