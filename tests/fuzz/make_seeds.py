"""Seed corpora and assets for the fuzz targets (scripts/fuzz.sh runs this in the repo venv).

Usage: make_seeds.py SOURCE_DIR WORK_DIR MAIN_BUILD_DIR

Seeds come from the test data: the recipes in configs/, the tiny models' config.json files, the
demo's dataset, tokenizer and images (WORK_DIR/demo, written by `neva-run demo --prepare-only`), the
tokenizers the oracle recorded (MAIN_BUILD_DIR/tests/oracle, when the tests have run), small files
made here with the reference libraries (safetensors, SentencePiece, Pillow) where the tests make
theirs on the fly, and every input that once crashed a target (tests/fuzz/regressions/). Targets
that take a leading selector byte get it prepended.
"""
import io
import json
import pathlib
import sys

import numpy as np
import sentencepiece as spm
from PIL import Image
from safetensors.numpy import save as save_safetensors

source, work, main_build = (pathlib.Path(p) for p in sys.argv[1:4])
seeds = work / "seeds"
demo = work / "demo"


def seed(target, name, data, selector=None):
    directory = seeds / target
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    if selector is not None:
        data = bytes([selector]) + data
    (directory / name).write_bytes(data)


# safetensors: files (selector even) and an index over the harness's shard (odd).
seed("safetensors", "two.safetensors", save_safetensors({"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                                         "b": np.ones(4, dtype=np.int64)}), 0)
seed("safetensors", "meta.safetensors", save_safetensors({"w": np.zeros((3, 1), dtype=np.float16)},
                                                         metadata={"format": "pt"}), 0)
seed("safetensors", "empty.safetensors", save_safetensors({"e": np.zeros((0, 5), dtype=np.float32),
                                                           "s": np.array(3.0, dtype=np.float64)}), 0)
seed("safetensors", "index.json", json.dumps({"metadata": {"total_size": 32},
                                              "weight_map": {"a": "shard.safetensors", "b": "shard.safetensors"}}), 1)

# Recipes: every recipe of configs/, and --set lines.
for path in sorted(source.glob("configs/**/*.toml")):
    seed("recipe", path.relative_to(source).as_posix().replace("/", "_"), path.read_bytes())
for name, text in {"sizes": "model.micro_batch_size=3\ntrainer.precision=bf16",
                   "table": "model.mm_cfg.vision_encoder.vision_select_layer=-2\ninference.top_p=0.5",
                   "array": "inference.prompts=[\"a\", \"b\"]\ninference.images=[\"\", \"x.png\"]",
                   "string": "run.mode=score\ninference.input_file=requests.jsonl"}.items():
    seed("set_overrides", name, text)

# config.json of each plugin (selector: llama mistral mixtral nemotron4 clip siglip).
for model, selector in {"llama-2": 0, "llama-3": 0, "mistral": 1, "mixtral": 2, "nemotron-4": 3,
                        "clip-vit-l-336": 4, "siglip-so400m": 5}.items():
    seed("hf_config", model + ".json", (source / "configs/tiny/models" / model / "config.json").read_bytes(), selector)

# Tokenizers: the demo's tokenizer.json and its config, and what the oracle recorded.
tokenizer_dir = demo / "model/tokenizer"
seed("tokenizer_json", "demo.json", (tokenizer_dir / "tokenizer.json").read_bytes())
for path in sorted((main_build / "tests/oracle/tokenizers").glob("*/tokenizer.json")):
    seed("tokenizer_json", path.parent.name + ".json", path.read_bytes())
seed("tokenizer_config", "demo.json", (tokenizer_dir / "tokenizer_config.json").read_bytes(), 0)
llava_config = {"add_bos_token": True, "add_eos_token": False, "legacy": False, "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "added_tokens_decoder": {"300": {"content": "<image>", "special": True, "lstrip": False,
                                                 "rstrip": False, "normalized": False, "single_word": False}}}
seed("tokenizer_config", "llava.json", json.dumps(llava_config), 2)
seed("tokenizer_config", "model_type.json", json.dumps({"model_type": "llava", "tokenizer_class": "LlamaTokenizer"}), 3)

# A small SentencePiece BPE model (the kind Llama 2 ships), as an asset and a seed.
corpus = work / "corpus.txt"
corpus.write_text("\n".join(["USER: What is in this image? ASSISTANT: a red circle in the top left.",
                             "Grüße aus München! 这是一个测试。 1234567 🙂"] * 50))
(work / "assets/sentencepiece").mkdir(parents=True, exist_ok=True)
spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(work / "assets/sentencepiece/tokenizer"),
                               model_type="bpe", vocab_size=400, byte_fallback=True, character_coverage=1.0,
                               minloglevel=2)
corpus.unlink()
seed("sentencepiece", "bpe.model", (work / "assets/sentencepiece/tokenizer.model").read_bytes())
for path in sorted((main_build / "tests/oracle/tokenizers").glob("*/tokenizer.model")):
    seed("sentencepiece", path.parent.name + ".model", path.read_bytes())

# LLaVA records: the demo's (a slice), as .json (selector 0) and .jsonl (1).
records = json.loads((demo / "data/stage2.json").read_text())[:8]
seed("llava_records", "stage2.json", json.dumps(records), 0)
seed("llava_records", "stage2.jsonl", "\n".join(json.dumps(r) for r in records) + "\n", 1)
seed("llava_records", "stage1.json", json.dumps(json.loads((demo / "data/stage1.json").read_text())[:4]), 0)

# Images: the demo's PNGs, and JPEGs and PNGs of the kinds the decoders distinguish.
for path in sorted((demo / "data/images/train").glob("*.png"))[:4]:
    seed("image", path.name, path.read_bytes())
picture = Image.fromarray((np.arange(24 * 40 * 3) % 251).astype(np.uint8).reshape(24, 40, 3))
for name, image, options in [("baseline.jpg", picture, {"format": "JPEG"}),
                             ("progressive.jpg", picture, {"format": "JPEG", "progressive": True}),
                             ("grey.jpg", picture.convert("L"), {"format": "JPEG"}),
                             ("palette.png", picture.convert("P"), {"format": "PNG"}),
                             ("alpha.png", picture.convert("RGBA"), {"format": "PNG"}),
                             ("grey16.png", picture.convert("I;16"), {"format": "PNG"}),
                             ("interlaced.png", picture, {"format": "PNG", "interlace": 1})]:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    seed("image", name, buffer.getvalue())

# Conversations: selector = template index (| 0x80: open the assistant's turn); 0x1E between turns.
for selector, text in [(0x81, "<image>\nWhat is shown?\x1ea red circle\x1eAnd where?"),
                       (0x02, "system prompt\x1dhello\x1ehi there"),
                       (0x85, "<image>\n<image>\ntwo images\x1e</s> in the text"),
                       (0x07, "")]:
    seed("conversation", f"turns-{selector:02x}", text, selector)
# Inputs that once crashed a target (tests/fuzz/regressions/<target>/): every run replays them.
for path in sorted((source / "tests/fuzz/regressions").glob("*/*")):
    seed(path.parent.name, "regression-" + path.name, path.read_bytes())
print("seeds in", seeds)
