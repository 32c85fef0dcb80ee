"""The Llama 4 model: layers, attention, MoE, text decoder."""
