"""Reference outputs for the vision encoder plugins, from transformers' CLIPVisionModel, CLIPModel,
SiglipVisionModel (with and without its pooling head) and SiglipModel.

Saves tiny random towers as Hugging Face directories and records, for fixed pixel values, every
hidden state (output_hidden_states=True): the C++ tests pick the one vision_select_layer names and
drop the class token or not.

Usage: vision_oracle.py OUTPUT_DIR
"""
import pathlib
import sys

import torch
from safetensors.torch import save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipConfig, SiglipModel,
                          SiglipVisionConfig, SiglipVisionModel)

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, layer_norm_eps=1e-5, hidden_act="quick_gelu", initializer_factor=1.0)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7)


def perturb_norms(model):
    with torch.no_grad():  # LayerNorms away from the identity, so a skipped or misplaced norm shows
        for name, parameter in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))


def record(model, vision_model, directory):
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randn(2, 3, VISION["image_size"], VISION["image_size"], generator=generator)
    wide = torch.randn(1, 3, VISION["image_size"], VISION["image_size"] * 3 // 2, generator=generator)
    with torch.no_grad():
        hidden = vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        tensors = {"pixel_values": pixels, "hidden_states": torch.stack(hidden)}
        if isinstance(vision_model, CLIPVisionModel) or hasattr(vision_model, "embeddings") and hasattr(
                vision_model.embeddings, "class_embedding"):
            # image_aspect_ratio "keep": a non-square image, positions interpolated
            wide_hidden = vision_model(pixel_values=wide, output_hidden_states=True,
                                       interpolate_pos_encoding=True).hidden_states
            tensors.update({"wide_pixel_values": wide, "wide_hidden_states": torch.stack(wide_hidden)})
    save_file(tensors, str(directory / "reference.safetensors"))
    print(f"{directory.name}: {len(hidden)} hidden states of {tuple(hidden[0].shape)}")


def main():
    out_dir = pathlib.Path(sys.argv[1])
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    perturb_norms(vision)
    vision.save_pretrained(out_dir / "vision_model", safe_serialization=True)
    record(vision, vision, out_dir / "vision_model")

    torch.manual_seed(1)
    full = CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(hidden_size=32, intermediate_size=64,
                                                                       num_hidden_layers=2, num_attention_heads=4,
                                                                       vocab_size=99, bos_token_id=1, eos_token_id=2,
                                                                       pad_token_id=0), projection_dim=16)).eval()
    perturb_norms(full)
    full.save_pretrained(out_dir / "clip_model", safe_serialization=True)
    record(full, full.vision_model, out_dir / "clip_model")

    torch.manual_seed(2)
    siglip = SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).eval()
    perturb_norms(siglip)
    siglip.save_pretrained(out_dir / "siglip_vision_model", safe_serialization=True)
    record(siglip, siglip, out_dir / "siglip_vision_model")

    torch.manual_seed(3)
    headless = SiglipVisionModel(SiglipVisionConfig(**SIGLIP, vision_use_head=False)).eval()
    perturb_norms(headless)
    headless.save_pretrained(out_dir / "siglip_headless", safe_serialization=True)
    record(headless, headless, out_dir / "siglip_headless")

    torch.manual_seed(4)
    dual = SiglipModel(SiglipConfig(vision_config=SIGLIP, text_config=dict(hidden_size=32, intermediate_size=64,
                                                                          num_hidden_layers=2, num_attention_heads=4,
                                                                          vocab_size=99, bos_token_id=1, eos_token_id=2,
                                                                          pad_token_id=0))).eval()
    perturb_norms(dual)
    dual.save_pretrained(out_dir / "siglip_model", safe_serialization=True)
    record(dual, dual.vision_model, out_dir / "siglip_model")


if __name__ == "__main__":
    main()
