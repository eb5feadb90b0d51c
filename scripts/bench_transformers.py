"""The transformers side of scripts/bench_model.sh: the same measurement as neva-bench-model
(prefill and decode tokens/s at batch 1 with the KV cache; one image through the vision tower) on
randomly initialised models built from the same config.json files.

Usage: bench_transformers.py LLM_CONFIG VISION_CONFIG PROMPT_TOKENS NEW_TOKENS {32,bf16}
LLM_CONFIG "-": the vision tower only (neva-bench-model --encode-only). A CLIP tower gives the hidden
state LLaVA uses, the second to last (transformers runs all layers for it, as LLaVA does).
"""
import json
import sys
import time

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig,
                          SiglipVisionModel)


def prefill_decode_seconds(model, prompt, new_tokens, warm_up=None):
    """Seconds of one prefill of `prompt` (after a warm-up pass of `warm_up`, default the prompt) and of
    `new_tokens` greedy steps with the KV cache."""
    with torch.no_grad():
        model(input_ids=prompt if warm_up is None else warm_up, use_cache=True)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill = time.perf_counter() - start
        past, logits = out.past_key_values, out.logits[:, -1]
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=logits.argmax(-1, keepdim=True), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return prefill, time.perf_counter() - start


def main():
    llm_config, vision_config, prompt_tokens, new_tokens, precision = sys.argv[1:6]
    prompt_tokens, new_tokens = int(prompt_tokens), int(new_tokens)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    if llm_config != "-":
        config = AutoConfig.for_model(**json.load(open(llm_config)))
        model = AutoModelForCausalLM.from_config(config).eval().to(dtype)
        prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens))
        prefill, decode = prefill_decode_seconds(model, prompt, new_tokens)
        print(f"hf     {precision:<5} prefill {prompt_tokens:5d} tokens: {prompt_tokens / prefill:8.1f} tokens/s   "
              f"decode {new_tokens:4d} tokens: {new_tokens / decode:7.2f} tokens/s")
    settings = json.load(open(vision_config))
    clip = settings.get("model_type") == "clip_vision_model"
    kinds = (CLIPVisionConfig, CLIPVisionModel) if clip else (SiglipVisionConfig, SiglipVisionModel)
    vision = kinds[1](kinds[0](**{k: v for k, v in settings.items() if k not in ("model_type", "architectures")}))
    vision = vision.eval().to(dtype)
    side = vision.config.image_size
    pixels = torch.randn(1, 3, side, side, dtype=dtype)

    def features():
        if clip:  # LLaVA's feature layer, without the class token
            return vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        return vision(pixel_values=pixels).last_hidden_state

    with torch.no_grad():
        features()
        start = time.perf_counter()
        tokens = features().shape[1]
        encode = time.perf_counter() - start
    print(f"hf     {precision:<5} encode 1 image {side}x{side} -> {tokens} tokens: {encode * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
