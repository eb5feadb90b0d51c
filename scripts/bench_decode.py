"""The Python parts of scripts/bench_decode.sh: a ~1.1B-parameter Llama-shaped decoder (TinyLlama-1.1B's
shape: 22 layers, hidden 2048, FFN 5632, 32 query and 4 KV heads, vocabulary 32000) with random
weights in Hugging Face's layout, and the same prefill/decode measurement as neva-bench-model through
transformers (the project's venv) and llama.cpp (llama-cpp-python, in the bench-only venv
.bench-venv; never a project dependency).

  bench_decode.py make DIR                       config.json, model.safetensors (fp32), tokenizer.model
  bench_decode.py bytes DIR {32,bf16}            weight bytes one decoding step reads
  bench_decode.py hf DIR PROMPT NEW BATCH {32,bf16}
  bench_decode.py llamacpp GGUF PROMPT NEW THREADS

Every engine gets the same prompt length and token count, greedy decoding, the KV cache, batch 1 unless
told; the prompt's token ids are random (the weights are, too: speed does not depend on them).
"""
import io
import json
import os
import sys
import time

SHAPE = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=2048,
             intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
             tie_word_embeddings=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2,
             torch_dtype="float32")


def make(directory):
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in SHAPE.items() if k not in ("model_type", "architectures", "torch_dtype")})
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100GB")
    # llama.cpp's converter reads the vocabulary from a SentencePiece model; a small one (the rest of
    # the 32000 rows padded by the converter) is enough for random token ids.
    words = ["neva", "llama", "vision", "language", "model", "token", "image", "decode", "prefill", "memory",
             "bandwidth", "bench", "random", "weights", "layer", "attention", "cache", "thread", "speed"]
    corpus = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model_file, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as out:
        out.write(model_file.getvalue())
    with open(os.path.join(directory, "config.json")) as f:
        written = json.load(f)
    print(f"made {directory}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters "
          f"({written.get('architectures')})")


def step_bytes(directory, precision):
    """Bytes of weights one decoding step reads: every matrix but the embedding table (one row of it)."""
    config = json.load(open(os.path.join(directory, "config.json")))
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h
    elements = layers * per_layer + h + config["vocab_size"] * h
    return elements * (2 if precision == "bf16" else 4)


def hf(directory, prompt_tokens, new_tokens, batch, precision):
    import torch
    from transformers import AutoModelForCausalLM

    from bench_transformers import prefill_decode_seconds  # scripts/, beside this file

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    torch.manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_tokens))
    prefill, decode = prefill_decode_seconds(model, prompt, new_tokens, warm_up=prompt[:, :16])
    print(f"hf        {precision:<5} batch {batch}  prefill {prompt_tokens:4d} tokens: {batch * prompt_tokens / prefill:8.1f} "
          f"tokens/s   decode {new_tokens:3d} tokens: {batch * new_tokens / decode:7.2f} tokens/s")


def llamacpp(gguf, prompt_tokens, new_tokens, threads):
    import numpy as np
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=prompt_tokens + new_tokens + 16, n_batch=prompt_tokens, n_ubatch=prompt_tokens,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    load = time.perf_counter() - start
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, llm.n_vocab(), prompt_tokens)]
    llm.eval(prompt[:16])  # warm-up
    llm.reset()  # the next eval drops the cache past position 0
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        llm.eval([token])
    decode = time.perf_counter() - start
    ftype = "bf16" if "bf16" in os.path.basename(gguf).lower() else "32"
    print(f"llama.cpp {ftype:<5} batch 1  prefill {prompt_tokens:4d} tokens: {prompt_tokens / prefill:8.1f} "
          f"tokens/s   decode {new_tokens:3d} tokens: {new_tokens / decode:7.2f} tokens/s   (load {load:.1f} s)")


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "make":
        make(args[0])
    elif command == "bytes":
        print(step_bytes(args[0], args[1]))
    elif command == "hf":
        hf(args[0], int(args[1]), int(args[2]), int(args[3]), args[4])
    elif command == "llamacpp":
        llamacpp(args[0], int(args[1]), int(args[2]), int(args[3]))
    else:
        sys.exit(f"unknown command {command!r}: make, bytes, hf or llamacpp")


if __name__ == "__main__":
    main()
