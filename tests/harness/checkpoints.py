"""Small random MoE (and dense) checkpoints, written with transformers' ``save_pretrained``.

They go through vLLM's real checkpoint loader (safetensors), like a downloaded model would.
A larger ``initializer_range`` than the default makes the next-token distribution peaked
enough that greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# Shapes vLLM's CPU attention accepts (head_dim >= 32) and small enough to start in seconds.
COMMON = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=512,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def build_qwen3_moe(path: str | Path, *, num_layers: int = 3, num_experts: int = 8,
                    top_k: int = 2, seed: int = 0, **shape) -> Path:
    """``shape`` overrides config keys (``hidden_size=1024``...) for bigger layers."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        **{**COMMON, "intermediate_size": 256, "moe_intermediate_size": 64, **shape},
        num_hidden_layers=num_layers,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    return _save(Qwen3MoeForCausalLM, cfg, path, seed)


def build_qwen2_moe(path: str | Path, *, num_layers: int = 3, num_experts: int = 6,
                    top_k: int = 2, seed: int = 0, **shape) -> Path:
    """Qwen2-MoE: routed experts plus a gated shared expert in every layer. ``shape``
    overrides config keys (``hidden_size=1024``...) for bigger layers."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **{**COMMON, "intermediate_size": 256, "moe_intermediate_size": 64,
           "shared_expert_intermediate_size": 96, **shape},
        num_hidden_layers=num_layers,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    return _save(Qwen2MoeForCausalLM, cfg, path, seed)


_EXPERT_WEIGHTS = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def _qwen3_moe_fp8_experts(path: Path, num_layers: int, num_experts: int, top_k: int,
                           seed: int, shape: dict, quantize, quantization_config: dict) -> Path:
    """Qwen3-MoE whose routed experts ``quantize`` rewrites as FP8; everything else stays bf16
    (listed in ``ignored_layers``)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    if (path / "config.json").exists():
        return path
    cfg = Qwen3MoeConfig(
        **{**COMMON, "intermediate_size": 256,
           "moe_intermediate_size": 256,  # a multiple of the 128-wide blocks, two K blocks in w2
           **shape},
        num_hidden_layers=num_layers,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[],
    )
    _save(Qwen3MoeForCausalLM, cfg, path, seed)
    quantize(path, _EXPERT_WEIGHTS)
    config = json.loads((path / "config.json").read_text())
    ignored = [f"model.layers.{i}.{m}" for i in range(num_layers) for m in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate")]
    config.update(torch_dtype="bfloat16", dtype="bfloat16", quantization_config={
        "quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ignored,
        **quantization_config})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def build_qwen3_moe_fp8(path: str | Path, *, num_layers: int = 3, num_experts: int = 8,
                        top_k: int = 2, seed: int = 0, **shape) -> Path:
    """Qwen3-MoE whose routed experts are stored as block-scaled FP8 (128 x 128 blocks,
    ``weight_scale_inv``), the format of the Qwen3-*-FP8 and DeepSeek-V3 checkpoints."""
    return _qwen3_moe_fp8_experts(Path(path), num_layers, num_experts, top_k, seed, shape,
                                  _quantize_block_fp8, {"weight_block_size": [128, 128]})


def build_qwen3_moe_fp8_tensor(path: str | Path, *, num_layers: int = 3, num_experts: int = 8,
                               top_k: int = 2, seed: int = 0, **shape) -> Path:
    """Qwen3-MoE whose routed experts are per-tensor FP8: each expert matrix one float32
    ``weight_scale`` (its largest magnitude over 448), activations quantised dynamically."""
    return _qwen3_moe_fp8_experts(Path(path), num_layers, num_experts, top_k, seed, shape,
                                  _quantize_tensor_fp8, {})


def _quantize_tensor_fp8(path: Path, weights: re.Pattern) -> None:
    from safetensors.torch import load_file, save_file

    for f in path.glob("*.safetensors"):
        out = {}
        for k, t in load_file(f).items():
            if weights.search(k):
                scale = t.float().abs().amax().clamp(min=1e-12) / 448.0
                out[k] = (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
                out[k.removesuffix("weight") + "weight_scale"] = scale.reshape(())
            else:
                out[k] = t.to(torch.bfloat16)
        save_file(out, f, metadata={"format": "pt"})


def build_qwen3(path: str | Path, *, num_layers: int = 3, seed: int = 0, **shape) -> Path:
    """A dense Qwen3 (no experts): attention and a SiLU-gated MLP in every layer. ``shape``
    overrides config keys (``hidden_size=1024``...) for tests that need bigger layers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{**COMMON, "intermediate_size": 256, **shape},
                      num_hidden_layers=num_layers)
    return _save(Qwen3ForCausalLM, cfg, path, seed)


def build_qwen3_fp8(path: str | Path, *, num_layers: int = 3, seed: int = 0, **shape) -> Path:
    """Dense Qwen3 whose decoder-layer linears (attention, MLP) are block-scaled FP8 (128 x
    128 blocks, ``weight_scale_inv``); embeddings, norms and lm_head stay bf16. Every linear
    dimension is a multiple of 128."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    shape = {"num_key_value_heads": 4, **shape}  # k and v 128 wide
    build_qwen3(path, num_layers=num_layers, seed=seed, **shape)
    _quantize_block_fp8(path, re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$"))
    config = json.loads((path / "config.json").read_text())
    config.update(torch_dtype="bfloat16", dtype="bfloat16", quantization_config={
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _quantize_block_fp8(path: Path, weights: re.Pattern) -> None:
    """Rewrite the checkpoint: tensors whose names match ``weights`` become block FP8
    (128 x 128 blocks) with a ``weight_scale_inv`` beside them, everything else bf16."""
    from safetensors.torch import load_file, save_file

    from vllm_dwdp_kernels.split_moe import quantize_blocks_reference

    for f in path.glob("*.safetensors"):
        out = {}
        for k, t in load_file(f).items():
            if weights.search(k):
                out[k], out[k + "_scale_inv"] = quantize_blocks_reference(t, 128, 128)
            else:
                out[k] = t.to(torch.bfloat16)
        save_file(out, f, metadata={"format": "pt"})


def dequantise_block_fp8(fp8_model: str | Path, dst: str | Path) -> Path:
    """A bf16 copy of a block-FP8 checkpoint: each FP8 weight times its ``weight_scale_inv``
    block by block. These are the weights the FP8 engines approximate (their only other
    error is activation quantisation), so stock vLLM on this copy is the FP8 tests' truth."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_dwdp_kernels.split_moe import dequantize_blocks_reference

    fp8_model, dst = Path(fp8_model), Path(dst)
    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((fp8_model / "config.json").read_text())
    block = config.pop("quantization_config")["weight_block_size"]
    for f in fp8_model.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    for f in fp8_model.glob("*.safetensors"):
        tensors, out = load_file(f), {}
        for k, t in tensors.items():
            if k.endswith("_scale_inv"):
                continue
            s = tensors.get(k + "_scale_inv")
            if s is not None:
                t = dequantize_blocks_reference(t, s, *block)
            out[k] = t.to(torch.bfloat16)
        save_file(out, dst / f.name, metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def build_gpt_oss_mxfp4(path: str | Path, *, num_layers: int = 2, num_experts: int = 8,
                        top_k: int = 2, seed: int = 0, **shape) -> Path:
    """gpt-oss with its routed experts in the MXFP4 format of the openai/gpt-oss checkpoints
    (``quant_method: mxfp4``): per expert, ``*_blocks`` (two FP4 E2M1 values a byte, 32 per
    block) and ``*_scales`` (one E8M0 exponent a block), bf16 biases; attention, router and
    embeddings in bf16. The FP4 bytes are random (every byte is a valid pair), the exponents
    2^-4 .. 2^-1, so the experts' outputs stay in the range of the other layers'."""
    from safetensors.torch import load_file, save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    shape = {"hidden_size": 256, "intermediate_size": 256, **shape}
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    cfg = GptOssConfig(
        **{**COMMON, "head_dim": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           **shape},
        num_hidden_layers=num_layers, num_local_experts=num_experts,
        num_experts_per_tok=top_k, sliding_window=128,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                     for i in range(num_layers)])
    _save(GptOssForCausalLM, cfg, path, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for f in path.glob("*.safetensors"):
        out = {}
        for k, t in load_file(f).items():
            if ".mlp.experts." not in k:
                out[k] = t.to(torch.bfloat16)
                continue
            base, leaf = k.rsplit(".", 1)
            if leaf == "gate_up_proj":  # transformers: [E, hidden, 2 * inter]
                rows, cols = 2 * inter, hidden
            elif leaf == "down_proj":   # [E, inter, hidden]
                rows, cols = hidden, inter
            else:                            # the biases: [E, rows]
                out[k] = t.to(torch.bfloat16)
                continue
            out[f"{base}.{leaf}_blocks"] = torch.randint(
                0, 256, (num_experts, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
            out[f"{base}.{leaf}_scales"] = torch.randint(
                123, 127, (num_experts, rows, cols // 32), dtype=torch.uint8, generator=g)
        save_file(out, f, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        index.unlink()  # the tensors' names changed; one shard needs no index
    config = json.loads((path / "config.json").read_text())
    config.update(torch_dtype="bfloat16", dtype="bfloat16", quantization_config={
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"]})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


BUILDERS = {"qwen3_moe": build_qwen3_moe, "qwen2_moe": build_qwen2_moe,
            "qwen3_moe_fp8": build_qwen3_moe_fp8,
            "qwen3_moe_fp8_tensor": build_qwen3_moe_fp8_tensor, "qwen3": build_qwen3,
            "qwen3_fp8": build_qwen3_fp8, "gpt_oss_mxfp4": build_gpt_oss_mxfp4}

_WORDS = ("the of and to in is you that it he was for on are as with his they at be this "
          "from have or by one had not but what all were when we there can an your which their "
          "said if do will each about how up out them then she many some so these would other "
          "into has more her two like him see time could no make than first been its who now "
          "people my made over did down only way find use may water long little very after "
          "words called just where most know expert weight peer layer token model fast slow "
          "memory link pull push rank data").split()


def save_word_tokenizer(path: str | Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` entries, so text prompts work offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|endoftext|>"] + list(dict.fromkeys(_WORDS))
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|endoftext|>")
    fast.save_pretrained(str(path))


def _save(model_cls, cfg, path, seed: int) -> Path:
    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32)
    with torch.no_grad():
        # transformers may leave some weights at their special init (zeros, ones);
        # give every parameter random values so no expert is trivially equal to another.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, cfg.initializer_range)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    # No tokenizer on disk: engines run with skip_tokenizer_init and token-id prompts.
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return path
