"""llama4_jax: a functional JAX/Flax implementation of the Llama 4 family.

    import llama4_jax
    config, params = llama4_jax.load("path/to/checkpoint", dtype="float32")
    logits = llama4_jax.forward(config, params, input_ids)
"""

from .config import Llama4Config, TextConfig, VisionConfig, from_hf, load_config, preset, to_hf
from .model.text import abstract_params, forward, init_params
from .generate import Completion, generate  # binds the function, not the submodule of the same name
from .sampling import Greedy, MinP, Sampling, Temperature, TopK, TopP


def load(path, *, dtype="bfloat16"):
    """Load a Hugging Face Llama 4 checkpoint directory: returns (config, params)."""
    import jax

    from .checkpoint import load_hf

    config, params = load_hf(path, dtype=dtype)
    return config, jax.tree_util.tree_map(jax.numpy.asarray, params)


__all__ = [
    "Llama4Config", "TextConfig", "VisionConfig", "from_hf", "to_hf", "load_config", "preset",
    "forward", "init_params", "abstract_params", "load",
    "generate", "Completion", "Greedy", "Temperature", "TopK", "TopP", "MinP", "Sampling",
]
__version__ = "0.1.0"
