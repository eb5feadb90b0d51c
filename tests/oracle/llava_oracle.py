"""Reference outputs for a LLaVA composition (llama + clip + mlp2x_gelu), from transformers'
LlavaForConditionalGeneration.

Saves one tiny random llava-hf model in three key layouts: as transformers 5.23 writes it
("transformers5": language_model.model.*, language_model.lm_head.*, vision_tower.* without
vision_model., multi_modal_projector.*), as the llava-hf hub files have it ("hub": the same with
vision_tower.vision_model.*), and as transformers 4.52+ names the nested LlavaModel ("nested":
model.language_model.*, model.vision_tower.vision_model.*, model.multi_modal_projector.*, lm_head.*).
Records logits and a greedy continuation for a prompt holding two images.

Usage: llava_oracle.py OUTPUT_DIR
"""
import pathlib
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

CORPUS = ["What is in the image? A red circle at the top left and a blue square.",
          "Describe the picture in one word. Shapes, colours, positions: left, right, top, bottom."] * 10


def make_tokenizer():
    """A small byte-level BPE whose "<image>" id is the model's image token, as in llava-hf."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin_of_text|>", "<|eot_id|>", "<image>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", 0)])
    return tokenizer


TOKENIZER = make_tokenizer()
IMAGE_TOKEN = TOKENIZER.token_to_id("<image>")
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, image_size=28, patch_size=7, hidden_act="quick_gelu")
TEXT = dict(model_type="llama", vocab_size=TOKENIZER.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            initializer_range=0.08, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LAYOUTS = {  # renames from the names transformers 5.23 writes
    "hub": [("vision_tower.", "vision_tower.vision_model.")],
    "nested": [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower.vision_model."),
               ("multi_modal_projector.", "model.multi_modal_projector.")],
}


def greedy(model, input_ids, pixel_values, steps=8):
    out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
    past, logits, tokens = out.past_key_values, out.logits[:, -1], []
    for _ in range(steps):
        top = logits.topk(2, dim=-1).values
        assert (top[0, 0] - top[0, 1]).item() > 1e-3, "greedy step too close to a tie; pick another seed"
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(tokens, 1)


def mistral_siglip(out_dir, strategy="full"):
    """A second composition: Mistral (sliding window) + SigLIP (no class token). With strategy 'full'
    every patch is an image token; with 'default' transformers drops the first patch (15 tokens)."""
    torch.manual_seed(5)
    text = {**TEXT, "model_type": "mistral", "sliding_window": 12}
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=28, patch_size=7)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "multi_modal_projector" in name:
                parameter.mul_(20.0)
    directory = out_dir / ("mistral_siglip" if strategy == "full" else "mistral_siglip_" + strategy)
    model.save_pretrained(directory, safe_serialization=True)
    TOKENIZER.save(str(directory / "tokenizer.json"))
    generator = torch.Generator().manual_seed(12)
    text_ids = lambda n: torch.randint(IMAGE_TOKEN + 1, TEXT["vocab_size"], (n,), generator=generator)
    input_ids = torch.cat([torch.tensor([0]), text_ids(5), torch.full((16 if strategy == "full" else 15,), IMAGE_TOKEN),
                           text_ids(7)]).unsqueeze(0)
    pixel_values = torch.randn(1, 3, 28, 28, generator=generator)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        continuation = greedy(model, input_ids, pixel_values)
    save_file({"input_ids": input_ids, "pixel_values": pixel_values, "logits": logits, "greedy": continuation},
              str(directory / "reference.safetensors"))


def main():
    out_dir = pathlib.Path(sys.argv[1])
    mistral_siglip(out_dir)
    mistral_siglip(out_dir, "default")
    torch.manual_seed(3)
    config = LlavaConfig(vision_config=VISION, text_config=TEXT, image_token_index=IMAGE_TOKEN,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
            if "multi_modal_projector" in name:  # projector init is tiny; make the images matter
                parameter.mul_(20.0)
    saved = out_dir / "transformers5"
    model.save_pretrained(saved, safe_serialization=True)
    directories = [saved]
    for layout, renames in LAYOUTS.items():
        directory = out_dir / layout
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(saved / "config.json", directory / "config.json")
        renamed = {}
        for name, tensor in load_file(str(saved / "model.safetensors")).items():
            for prefix, replacement in renames:
                if name.startswith(prefix):
                    name = replacement + name[len(prefix):]
                    break
            renamed[name] = tensor
        save_file(renamed, str(directory / "model.safetensors"), metadata={"format": "pt"})
        directories.append(directory)
    for directory in directories:
        TOKENIZER.save(str(directory / "tokenizer.json"))

    generator = torch.Generator().manual_seed(11)
    text = lambda n: torch.randint(IMAGE_TOKEN + 1, TEXT["vocab_size"], (n,), generator=generator)
    image = torch.full((16,), IMAGE_TOKEN)
    input_ids = torch.cat([torch.tensor([0]), text(3), image, text(4), image, text(5)]).unsqueeze(0)
    pixel_values = torch.randn(2, 3, 28, 28, generator=generator)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        continuation = greedy(model, input_ids, pixel_values)
        # transformers' sampling (repetition penalty, temperature, top-k, top-p, multinomial) from seed 42.
        model.generation_config.eos_token_id = None
        torch.manual_seed(42)
        sampled = model.generate(input_ids=input_ids, pixel_values=pixel_values, do_sample=True, temperature=0.7,
                                 top_k=50, top_p=0.9, repetition_penalty=1.3, max_new_tokens=12, min_new_tokens=12,
                                 pad_token_id=0)[:, input_ids.shape[1]:]
        # log p of each greedy token given everything before it
        full = torch.cat([input_ids, continuation], 1)
        log_probs = model(input_ids=full, pixel_values=pixel_values).logits.log_softmax(-1)[0, input_ids.shape[1] - 1:-1]
        scores = log_probs.gather(1, continuation[0, :, None])[:, 0]
    tensors = {"input_ids": input_ids, "pixel_values": pixel_values, "logits": logits, "greedy": continuation,
               "sampled": sampled, "greedy_log_probs": scores}
    # End to end through transformers' LlavaProcessor: a v1 prompt and a non-square image file.
    image_path = out_dir / "scene.png"
    pixels8 = torch.randint(0, 256, (45, 70, 3), generator=generator, dtype=torch.uint8).numpy()
    Image.fromarray(pixels8).save(image_path)
    prompt = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT:")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=TOKENIZER), patch_size=7,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processed = processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        answer = greedy(model, processed["input_ids"], processed["pixel_values"])
    tensors.update({"e2e_input_ids": processed["input_ids"], "e2e_pixel_values": processed["pixel_values"],
                    "e2e_greedy": answer})
    (out_dir / "e2e_prompt.txt").write_text(prompt)
    for directory in directories:
        save_file(tensors, str(directory / "reference.safetensors"))
    print("llava: logits", list(logits.shape), "greedy", continuation.tolist(), "sampled", sampled.tolist())


if __name__ == "__main__":
    main()
