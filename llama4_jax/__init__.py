"""llama4_jax: a functional JAX/Flax implementation of the Llama 4 family.

    import llama4_jax
    config, params = llama4_jax.load("path/to/checkpoint", dtype="float32")
    logits = llama4_jax.forward(config, params, input_ids)

    # with images (conditional-generation checkpoints)
    processor = llama4_jax.Processor.from_pretrained("path/to/checkpoint")
    batch = processor([processor.apply_chat_template(messages)], [[image]])
    logits = llama4_jax.forward(config, params, batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=batch["pixel_values"])
"""

from .config import Llama4Config, TextConfig, VisionConfig, from_hf, load_config, preset, to_hf
from .model.text import abstract_params, forward, init_params
from .generate import Completion, generate  # binds the function, not the submodule of the same name
from .sampling import Greedy, MinP, Sampling, Temperature, TopK, TopP
from .processor import ImageProcessor, Processor
from .model.vision import image_features
from . import distributed


def load(path, *, dtype="bfloat16", quantize=None, group_size=None, mesh=None, rules=None, shardings=None,
         progress=False):
    """Load a checkpoint directory: returns (config, params).

    `path` is a Hugging Face directory (safetensors, FP8 dequantized) or one written by
    `llama4-jax convert`. With `mesh` (see `llama4_jax.sharding.make_mesh`) each
    parameter is read straight into its shards under `rules` (default: the mesh's
    `sharding.default_rules`); pass the same mesh and rules to `forward`. `shardings`:
    alternatively, an explicit pytree like params of `jax.sharding.Sharding`s (see
    `llama4_jax.checkpoint.load_hf`); None with no mesh means the default device.

    dtype: the dtype of the float parameters, "float32", "bfloat16" or "float16" (or
    the numpy / jax dtype); None keeps a converted directory's stored dtype. It never
    selects a weight format (that is `quantize`): anything else, "int8" or
    "float8_e4m3fn" included, is refused before anything is read (ConfigError, or
    CheckpointError for a quantized directory, see `checkpoint.check_load_dtype`).

    quantize: None, "int8", "int4" or "fp8" (group_size: int4 elements per scale,
    default 128): the tree of `abstract_params(config, dtype=dtype, quantize=)`, each
    attention / MLP / expert matrix quantized from its stored values as it is read,
    one tensor at a time (host memory about one tensor; the float model is never
    formed), and on a mesh each device receives its shard of the quantized weights
    and scales; the other (float) leaves are cast to `dtype`. An FP8 checkpoint loaded
    with quantize="fp8" keeps its stored e4m3 weights and per-channel scales (its
    weights stored in bf16/fp32 are quantized from their values); on a checkpoint with
    no FP8 weights "fp8" quantizes every such matrix from its values (per output
    channel, max|w| / 448), like "int8" and "int4". A converted directory stored
    quantized (`llama4-jax convert --quantize`) loads as stored: quantize None or its
    own format (another raises CheckpointError), its quantized weights and fp32 scales
    as stored and only its float leaves cast to `dtype`.

    Bad input is refused with a one-line CheckpointError naming the tensor: an FP8
    tensor whose scale's shape does not fit it (checked from the safetensors headers
    before any data is read), or a converted directory's stored array (a weight, a
    scale) whose shape differs from what its config describes (checked from the orbax
    metadata before anything is restored). An unknown format or a bad group size
    raises `quant.QuantError`.
    """
    from .checkpoint import check_load_dtype, load_checkpoint, load_format

    fmt = load_format(path, quantize, group_size)
    check_load_dtype(path, dtype)
    if mesh is not None:
        if shardings is not None:
            raise ValueError("load: pass either mesh (with optional rules) or shardings, not both")
        from .sharding import param_shardings

        shardings = param_shardings(load_config(path), mesh, rules, dtype=dtype, quantize=fmt)
    elif rules is not None:
        raise ValueError("load: rules need a mesh")
    return load_checkpoint(path, dtype=dtype, shardings=shardings, progress=progress, quantize=fmt)


__all__ = [
    "Llama4Config", "TextConfig", "VisionConfig", "from_hf", "to_hf", "load_config", "preset",
    "forward", "init_params", "abstract_params", "load",
    "generate", "Completion", "Greedy", "Temperature", "TopK", "TopP", "MinP", "Sampling",
    "Processor", "ImageProcessor", "image_features", "distributed",
]
__version__ = "0.1.0"
