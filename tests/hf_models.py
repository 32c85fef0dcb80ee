"""Tiny Llama 4 checkpoints built with transformers (`save_pretrained`), for parity tests.

Dimensions are odd or prime where the architecture allows, so a transposed or
mis-reshaped weight cannot go unnoticed; every architectural feature is switched on
somewhere: scanned groups, dense and MoE layers, top-1 and top-2, qk norm, llama3 RoPE
scaling, chunks of 8 and 16, small floor_scale so the NoPE temperature changes.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
import os

import numpy as np

from llama4_jax.config import Llama4Config, RopeScaling, TextConfig, to_hf

TEXT = {
    # Scout-like: every layer MoE, qk norm, llama3 scaling 16/1/1, top-1; 8 layers, period 4.
    "scout_like": TextConfig(
        vocab_size=331, hidden_size=60, intermediate_size=28, intermediate_size_mlp=44, num_hidden_layers=8,
        num_attention_heads=6, num_key_value_heads=2, head_dim=10, num_local_experts=5, num_experts_per_tok=1,
        moe_layers=tuple(range(8)), no_rope_layers=(1, 1, 1, 0) * 2, attention_chunk_size=8, floor_scale=6,
        use_qk_norm=True, rope_scaling=RopeScaling(16.0, 1.0, 1.0, 32), rope_theta=10000.0,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    ),
    # Maverick-like: MoE every other layer (dense MLP on even layers), no qk norm, no
    # scaling, top-2, GQA ratio 5 (5 heads on 1 KV head), chunk 16.
    "maverick_like": TextConfig(
        vocab_size=293, hidden_size=45, intermediate_size=26, intermediate_size_mlp=38, num_hidden_layers=8,
        num_attention_heads=5, num_key_value_heads=1, head_dim=14, num_local_experts=6, num_experts_per_tok=2,
        moe_layers=tuple(range(1, 8, 2)), no_rope_layers=(1, 1, 1, 0) * 2, attention_chunk_size=16, floor_scale=12,
        use_qk_norm=False, rope_scaling=None, rope_theta=500000.0,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    ),
    # The real constants (chunk 8192, floor_scale 8192, Scout's scaling) on tiny widths.
    "real_constants": TextConfig(
        vocab_size=97, hidden_size=24, intermediate_size=16, intermediate_size_mlp=20, num_hidden_layers=4,
        num_attention_heads=3, num_key_value_heads=1, head_dim=8, num_local_experts=3, num_experts_per_tok=1,
        moe_layers=(1, 3), no_rope_layers=(1, 1, 1, 0), attention_chunk_size=8192, floor_scale=8192,
        use_qk_norm=True, rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192), rope_theta=500000.0,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    ),
}


@dataclasses.dataclass
class Checkpoint:
    path: str
    config: Llama4Config
    hf_model: object  # transformers model in fp32, eval mode


def randomize_(model, seed: int):
    """Give every parameter (norm weights included) a random value of a useful size."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights: around 1, not exactly 1
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if "experts" not in name else p.shape[-2]
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


def make_hf(config: Llama4Config, seed: int = 0):
    import torch
    import transformers

    d = to_hf(config)
    if config.vision is None:
        hf_cfg = transformers.Llama4TextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
        model = transformers.Llama4ForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.Llama4Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
        model = transformers.Llama4ForConditionalGeneration(hf_cfg)
    randomize_(model, seed)
    model = model.to(torch.float32).eval()
    if config.vision is not None:
        # `.to(dtype)` casts the complex vision RoPE buffer `freqs_ci` to real (dropping
        # the sines); rebuild it so the reference is transformers' model as it runs.
        rope = model.vision_model.rotary_embedding
        rope.freqs_ci = rope._compute_freqs_ci(model.config.vision_config)
    return model


@functools.lru_cache(maxsize=None)
def _build_cached(name: str, root: str, max_shard_size: str | None, conditional: bool):
    text = TEXT[name]
    if conditional:
        from llama4_jax.config import PRESETS

        config = Llama4Config(text=text, vision=PRESETS["tiny-vision"].vision,
                              architecture="Llama4ForConditionalGeneration")
    else:
        config = Llama4Config(text=text)
    model = make_hf(config, seed=zlib.crc32(name.encode()) % 1000)  # str hash() is salted per process
    path = os.path.join(root, name + ("_cond" if conditional else "") + (f"_{max_shard_size}" if max_shard_size else ""))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return Checkpoint(path, config, model)


def build(name: str, tmp_path_factory, *, max_shard_size: str | None = None, conditional: bool = False) -> Checkpoint:
    root = str(tmp_path_factory.getbasetemp())
    return _build_cached(name, root, max_shard_size, conditional)


def hf_logits(model, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)),
            position_ids=None if position_ids is None else torch.as_tensor(np.asarray(position_ids)),
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )
    logits = out.logits.float().numpy()
    if output_hidden_states:
        return logits, [h.float().numpy() for h in out.hidden_states]
    return logits
