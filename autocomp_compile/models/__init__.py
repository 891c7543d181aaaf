"""Llama models for end-to-end runs: the compact static-KV-cache implementation, weights, generation."""
from autocomp_compile.models.generate import Generation, generate
from autocomp_compile.models.llama import CONFIGS, Llama, LlamaConfig, build_llama, get_config
from autocomp_compile.models.weights import config_from_hf, load_pretrained, load_safetensors

__all__ = ["CONFIGS", "Generation", "Llama", "LlamaConfig", "build_llama", "config_from_hf", "generate",
           "get_config", "load_pretrained", "load_safetensors"]
