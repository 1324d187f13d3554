"""A Llama built from a config with random weights, on a real tokenizer: for tests and benchmarks.

The default head size is 64, one that vLLM's CPU attention supports.

    python tests/tiny_model.py OUT_DIR [--hidden 64 --layers 2 ...]   (tokenizer: the embedded model's)
"""
import argparse
from pathlib import Path

from personamath.embedded_model import ensure_embedded_model


def make_tiny_llama(out_dir, hidden: int = 128, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                    intermediate: int | None = None, max_positions: int = 2048, tokenizer_dir=None,
                    seed: int = 0, dtype: str = "float32") -> Path:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or ensure_embedded_model())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv_heads", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's)")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    print(make_tiny_llama(a.out_dir, a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate,
                          tokenizer_dir=a.tokenizer, dtype=a.dtype))


if __name__ == "__main__":
    main()
