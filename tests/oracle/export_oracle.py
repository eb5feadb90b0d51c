"""Loads what neva exported with transformers alone — AutoProcessor (tokenizer + image processor from
the exported files) and LlavaForConditionalGeneration — and records, for a held-out image and
question in the demo's v1 template: the processor's input_ids and pixel_values, the logits, and a
greedy answer. The C++ side (test_export_oracle.cpp) rebuilds the same model through neva's plugins
from that directory and compares.

Usage: export_oracle.py DEMO_DIR OUTPUT_DIR
  the demo's stage-2 model (DEMO_DIR/runs/stage2/hf, Llama + CLIP), written by `neva-run demo`.
The other compositions (export_compositions.py) are recorded with record() below.
"""
import json
import pathlib
import sys

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
QUESTION = "What shape is in the image?"


def record(hf, image_path, out, facts=None):
    """transformers' view of the exported directory `hf` on one image and question, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    processor = AutoProcessor.from_pretrained(hf)
    model = LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    prompt = f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer_ids = generated[0, inputs["input_ids"].shape[1]:]
    save_file({"input_ids": inputs["input_ids"].contiguous(), "pixel_values": inputs["pixel_values"].contiguous(),
               "logits": logits.contiguous(), "answer_ids": answer_ids.contiguous()}, str(out / "export.safetensors"))
    (out / "export.json").write_text(json.dumps({
        "prompt": prompt, "image": str(image_path), "hf": str(hf),
        "answer": processor.tokenizer.decode(answer_ids, skip_special_tokens=True), **(facts or {})}))


def main():
    demo, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    last = sorted((demo / "runs" / "stage2" / "checkpoints").glob("step-*"))[-1]
    record(demo / "runs" / "stage2" / "hf", demo / "data" / "images" / "test" / "1.png", out,
           {"llm_plugin": "llama", "vision_plugin": "clip", "checkpoint": str(last)})


if __name__ == "__main__":
    main()
