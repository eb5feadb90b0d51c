"""The transformers side of scripts/bench_train.sh: the same NeVA stage-2 training step as
`neva-run configs/bench/train.toml` (LlavaForConditionalGeneration built from the same config.json
files, vision tower frozen, AdamW over the connector and the language model, gradient clipping at 1,
micro-batch 4 of the demo's conversations in the v1 template, right-padded), in PyTorch eager from
the same torch wheel. Prints tokens/s (real tokens, as neva counts them) and the model FLOPs per
token of this batch mix, which the script turns into MFU for both. (transformers computes the
LM head and the loss at every position; the labels are left unmasked, which costs it nothing more.)

Usage: bench_train_transformers.py LLM_CONFIG VISION_CONFIG DEMO_DIR {32,bf16-mixed} STEPS
"""
import json
import os
import pathlib
import statistics
import sys
import time

import torch
from PIL import Image
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast)

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def v1(turns, image_tokens):
    out = SYSTEM + " "
    for i, turn in enumerate(turns):
        text = turn["value"].replace("<image>", "<image>" * image_tokens)
        out += ("USER: " if i % 2 == 0 else "ASSISTANT: ") + text + (" " if i % 2 == 0 else "</s>")
    return out


def main():
    llm_path, vision_path, demo, precision, steps = sys.argv[1:6]
    demo, steps = pathlib.Path(demo), int(steps)
    strip = lambda d: {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
    text = LlamaConfig(**strip(json.load(open(llm_path))))
    vision = CLIPVisionConfig(**strip(json.load(open(vision_path))))
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=3, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).train()
    tower = model.model.vision_tower
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # transformers' Trainer default for torch >= 2.8 ("adamw_torch_fused"): the same fused kernel neva runs.
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(demo / "model/tokenizer/tokenizer.json"),
                                        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    size = vision.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image_tokens = (size // vision.patch_size) ** 2
    records = json.load(open(demo / "data/stage2.json"))
    batch, batches = 4, []
    for start in range(0, batch * (steps + 2), batch):
        chunk = records[start:start + batch]
        encoded = tokenizer([v1(r["conversations"], image_tokens) for r in chunk], padding=True, return_tensors="pt")
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        pixels = images([Image.open(demo / "data/images" / r["image"]).convert("RGB") for r in chunk],
                        return_tensors="pt")["pixel_values"]
        batches.append(dict(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                            pixel_values=pixels, labels=labels))

    # BENCH_TRACE=FILE: torch.profiler over steps 3 and 4 (0-based), like neva's trainer.profile.
    trace = os.environ.get("BENCH_TRACE")
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) if trace else None
    times, tokens, phases = [], [], []
    for i, inputs in enumerate(batches):
        if trace and i == 3:
            profiler.start()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "32"):
            loss = model(**inputs).loss
        loss.backward()
        computed = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        end = time.perf_counter()
        if trace and i == 4:
            profiler.stop()
            profiler.export_chrome_trace(trace)
        if i >= 2:  # warm-up steps excluded, as for neva
            times.append(end - start)
            phases.append((computed - start, end - computed))
            tokens.append(int(inputs["attention_mask"].sum()))

    # Model FLOPs per token: 6 x trained matmul weights (decoder layers and LM head; embeddings are
    # lookups) + attention 12 x layers x sequence x width; per image token, 2 x the frozen tower's
    # weights (forward only; 50 positions incl. the class token) and 6 x the connector's.
    decoder = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n and "embed_tokens" not in n)
    decoder += model.lm_head.weight.numel()
    tower_params = sum(p.numel() for p in tower.parameters())
    connector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    mean_length = statistics.mean(int(b["attention_mask"].sum(1).float().mean()) for b in batches)
    per_token = 6 * decoder + 12 * text.num_hidden_layers * mean_length * text.hidden_size
    image_share = image_tokens / mean_length  # one image per sample
    per_token += image_share * (2 * tower_params * (image_tokens + 1) / image_tokens + 6 * connector)
    # What the last layer computes for a position beyond its keys and values (query, output
    # projection, MLP, attention scores): needed only where a logit is.
    last = model.model.language_model.layers[-1]
    query_side = sum(p.numel() for n, p in last.named_parameters()
                     if not any(k in n for k in ("k_proj", "v_proj", "input_layernorm")))
    rate = sum(tokens) / sum(times)
    print(json.dumps({"precision": precision, "tokens_per_second": rate, "flops_per_token": per_token,
                      "lm_head_flops_per_token": 6 * model.lm_head.weight.numel(),
                      "last_layer_query_flops_per_token": 6 * query_side + 12 * mean_length * text.hidden_size,
                      "decoder_parameters": decoder,
                      "tower_parameters": tower_params, "mean_length": mean_length,
                      "forward_backward_seconds": statistics.mean(p[0] for p in phases),
                      "optimizer_seconds": statistics.mean(p[1] for p in phases)}))


if __name__ == "__main__":
    main()
