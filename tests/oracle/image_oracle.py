"""Reference pixels for neva's image decoding and preprocessing, from Pillow and transformers'
PIL image processors (CLIPImageProcessorPil, LlavaImageProcessorPil with do_pad,
SiglipImageProcessorPil).

Writes deterministic images (non-square RGB and RGBA PNGs, a palette PNG, colour and grey JPEGs,
one smaller than the processor's size) and records, for each, Pillow's decoded RGB and each
processor's pixel_values.

Usage: image_oracle.py OUTPUT_DIR
"""
import json
import pathlib
import sys

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

PROCESSORS = {
    "clip": CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}),
    "llava_pad": LlavaImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, do_pad=True),
    "siglip": SiglipImageProcessorPil(size={"height": 40, "width": 40}),
}


def pattern(width, height, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(-40, 40, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def main():
    out_dir = pathlib.Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    files["wide.png"] = Image.fromarray(pattern(131, 77, 1))
    rgba = np.concatenate([pattern(60, 90, 2), np.full((90, 60, 1), 128, np.uint8)], -1)
    files["tall_rgba.png"] = Image.fromarray(rgba, "RGBA")
    files["palette.png"] = Image.fromarray(pattern(70, 50, 3)).convert("P", palette=Image.ADAPTIVE, colors=32)
    files["photo.jpg"] = Image.fromarray(pattern(150, 101, 4))
    files["grey.jpg"] = Image.fromarray(pattern(64, 64, 5)[..., 0], "L")
    files["small.png"] = Image.fromarray(pattern(23, 17, 6))
    tensors, manifest = {}, []
    for name, image in files.items():
        path = out_dir / name
        if name.endswith(".jpg"):
            image.save(path, quality=90)
        else:
            image.save(path)
        decoded = Image.open(path).convert("RGB")
        tensors[f"{name}/rgb"] = np.asarray(decoded)
        for processor_name, processor in PROCESSORS.items():
            pixels = processor(images=decoded, return_tensors="np")["pixel_values"][0]
            tensors[f"{name}/{processor_name}"] = pixels.astype(np.float32)
        # NeMo's image_aspect_ratio "keep": shortest edge int(min(448 / aspect, 224)), no centre crop.
        aspect = max(decoded.size) / min(decoded.size)
        keep = CLIPImageProcessorPil(size={"shortest_edge": int(min(448 / aspect, 224))}, do_center_crop=False)
        tensors[f"{name}/clip_keep"] = keep(images=decoded, return_tensors="np")["pixel_values"][0].astype(np.float32)
        manifest.append(name)
    save_file(tensors, str(out_dir / "reference.safetensors"))
    (out_dir / "images.json").write_text(json.dumps(manifest))
    print("images recorded:", manifest)


if __name__ == "__main__":
    main()
