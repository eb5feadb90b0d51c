"""Reference token ids for neva's tokenizers, from Hugging Face tokenizers / transformers.

Trains two small tokenizers on a fixed multilingual corpus and records what transformers encodes
and decodes for a set of test texts (special tokens, several scripts, emoji, digits, whitespace
runs, characters never seen in training):
  bytelevel/  Llama 3 style: byte-level BPE, Llama 3's split regex, ignore_merges, BOS template,
              special tokens <|begin_of_text|> ... <image>  (tokenizer.json)
  spbpe/      Llama 2 style: a SentencePiece BPE model with byte fallback (tokenizer.model), and the
              tokenizer.json transformers converts it to (Metaspace, ByteFallback decoder); the
              tokenizer.model alone as LlamaTokenizer reads it
  spbpe_*/, bytelevel_llamafast/  directories as checkpoints ship them (tokenizer.model or an old
              Llama-2-style tokenizer.json, tokenizer_config.json, config.json's model type), each
              recorded with AutoTokenizer; variants.json lists them
  spunigram/  a SentencePiece Unigram model (refused by neva)

Usage: tokenizer_oracle.py OUTPUT_DIR
"""
import json
import pathlib
import shutil
import sys

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
from transformers import logging as transformers_logging
from transformers.models.auto.tokenization_auto import MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, TOKENIZER_MAPPING_NAMES

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is shown in this image?",
    "A red circle is at the top left; a blue square is at the bottom right.",
    "Das ist schön. Über allen Gipfeln ist Ruh. Grüße aus München!",
    "这是一个测试。图片里有什么？ 我们喜欢学习机器学习。",
    "Il était une fois une petite fille. ¿Qué hay en la imagen? Sí, señor.",
    "def forward(self, x):\n    return self.linear(x) + 1234567890\n",
    "Numbers: 3.14159, 2718, 42, 1000000; emoji: 🙂🚀 and symbols #@$%^&*()",
    "I'm sure they'll say it's fine, we've done what you'd expect.\n\n\tTabs\tand  double  spaces.",
] * 20
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat's in this image? <image>\nDescribe it.<|eot_id|>",
    "Das ist schön – 这是什么？ 🙂 1234567 tokens!!",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\r\n\n\ttabbed   triple",
    "Ελληνικά και 한국어 are not in the training corpus; neither is ∮ or 𝔘.",
    "USER: <image>\nWhat color is the circle? ASSISTANT: red</s>",
    "",
    "I'LL SAY IT'S 3.14159!",
]

# Control symbols written in the text, and the spaces around them (where legacy matters).
CONTROL_TEXTS = [
    "<s>hello</s>",
    "USER: <image>\nWhat color is the circle? ASSISTANT: red</s>USER: And now? ASSISTANT: blue</s>",
    "x <image> y<image>z",
    "</s><s>two turns</s>",
    "a </s> b<s>c  d\n e",
    " one leading space",
]
MODEL_TYPE_TEXT = "USER: hi</s>USER: <image>\nx"
TOKEN = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
LLAVA_CONFIG = {  # the keys of liuhaotian/llava-v1.5-7b's tokenizer_config.json, and an added token
    "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", **TOKEN},
    "eos_token": {"__type": "AddedToken", "content": "</s>", **TOKEN},
    "unk_token": {"__type": "AddedToken", "content": "<unk>", **TOKEN},
    "pad_token": None, "model_max_length": 2048, "padding_side": "right", "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "added_tokens_decoder": {"600": {"content": "<image>", "special": True, **TOKEN}},
}


def record(directory, tokenizer, texts, name="reference.json"):
    cases = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=True)
        cases.append({"text": text, "ids": ids,
                      "ids_without_special": tokenizer.encode(text, add_special_tokens=False),
                      "decoded": tokenizer.decode(ids, skip_special_tokens=False),
                      "decoded_skip_special": tokenizer.decode(ids, skip_special_tokens=True)})
    (directory / name).write_text(json.dumps(cases, ensure_ascii=False, indent=1))


# Byte sequences that are not valid UTF-8 (truncated, overlong, surrogate, past U+10FFFF, stray
# continuation bytes), decoded from one token per byte. tokenizers' ByteLevel decoder replaces each
# maximal ill-formed subpart by one U+FFFD (Rust's from_utf8_lossy, as Python's errors="replace");
# its ByteFallback decoder replaces every byte of an invalid run.
INVALID_UTF8 = [b"\xe2\x82A", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf0\x9f\x99", b"\xff\xfe",
                b"\x80\x80x", b"a\xe0\x80\xafb", b"\xf0\x9f\x99\x82\xf0\x9f", b"\xc3", b"\xe1\x80\xe2\x82\xac"]


def record_invalid_utf8(directory, tokenizer, token_of_byte):
    cases = []
    for data in INVALID_UTF8:
        ids = [tokenizer.convert_tokens_to_ids(token_of_byte(b)) for b in data]
        cases.append({"bytes": data.hex(), "ids": ids, "decoded": tokenizer.decode(ids, skip_special_tokens=False)})
    (directory / "invalid_utf8.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1))


def bytelevel(out_dir):
    directory = out_dir / "bytelevel"
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIAL)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", tokenizer.token_to_id("<|begin_of_text|>"))])])
    tokenizer.save(str(directory / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    record(directory, fast, TEXTS)
    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    table = {}  # GPT-2's byte -> printable character table
    printable = [b for b in range(256) if ord("!") <= b <= ord("~") or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    assert set(table.values()) == set(byte_symbols)
    record_invalid_utf8(directory, fast, lambda b: table[b])


def spbpe(out_dir):
    directory = out_dir / "spbpe"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(directory / "corpus.txt"), model_prefix=str(directory / "tokenizer"),
                                   model_type="bpe", vocab_size=600, byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, add_dummy_prefix=True,
                                   split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", minloglevel=2)
    (directory / "corpus.txt").unlink()
    (directory / "tokenizer.vocab").unlink()
    converted = directory / "converted"
    tokenizer = LlamaTokenizer.from_pretrained(str(directory), legacy=False)
    tokenizer.save_pretrained(str(converted))
    for name in ("tokenizer.model",):
        path = converted / name
        if path.exists():
            path.unlink()
    record(directory, tokenizer, [t for t in TEXTS if "<|" not in t])
    record_invalid_utf8(directory, tokenizer, lambda b: f"<0x{b:02X}>")  # byte fallback pieces
    # The tokenizer.model alone, as transformers' LlamaTokenizer reads it: with no tokenizer_config.json,
    # its documented defaults (legacy=False, add_bos_token=True; 5.23 itself adds no BOS there).
    texts = [t for t in TEXTS if "<|" not in t] + CONTROL_TEXTS
    record(directory, LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True), texts,
           "sentencepiece.json")
    # An old Llama-2-style tokenizer.json (a Prepend normalizer: "▁" after every special token, and a
    # BOS template), as meta-llama/Llama-2-7b-hf ships it, with an added <image>.
    old_style = json.loads((converted / "tokenizer.json").read_text())
    old_style["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    old_style["pre_tokenizer"] = None
    old_style["model"]["unk_token"] = "<unk>"
    old_style["added_tokens"].append({"id": 600, "content": "<image>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    old_style["post_processor"] = {
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    bytelevel_json = json.loads((out_dir / "bytelevel" / "tokenizer.json").read_text())
    no_bos_keys = {key: value for key, value in LLAVA_CONFIG.items() if key not in ("add_bos_token", "add_eos_token")}
    no_added = {key: value for key, value in no_bos_keys.items() if key != "added_tokens_decoder"}
    loose_image = {"600": {"content": "<image>", "special": False, "lstrip": True, "rstrip": True, "normalized": False}}
    # Directories as checkpoints ship them, each read by AutoTokenizer: which class it picks
    # (tokenizer_config.json's or config.json's tokenizer_class, overridden by model types transformers
    # registers to its generic backend and by byte-level files) decides whether the file's pipeline runs
    # as written or LlamaTokenizer builds its own.
    variants = {
        # tokenizer.model: original LLaVA-1.5's keys with an added token; the legacy prefix with an EOS.
        "spbpe_llava": ("model", LLAVA_CONFIG, None),
        "spbpe_legacy": ("model", {**LLAVA_CONFIG, "legacy": True, "add_eos_token": True, "added_tokens_decoder": {}}, None),
        # old-style tokenizer.json naming LlamaTokenizer, legacy false and true
        "spbpe_llama2json": ("json", {**no_bos_keys, "legacy": False}, None),
        "spbpe_llama2json_legacy": ("json", {**no_bos_keys, "legacy": True}, None),
        # ... with the model types of Llama and LLaVA-1.5 checkpoints (LlamaTokenizer), and those
        # transformers reads with its generic backend (the file as written)
        **{f"spbpe_type_{model_type}": ("json", {**no_bos_keys, "legacy": False}, {"model_type": model_type})
           for model_type in ("llama", "llava_llama", "mistral", "mixtral", "llava", "llava_next", "nemotron", "vipllava")},
        # the class named by config.json only
        "spbpe_class_in_config": ("json", {**no_added, "legacy": False, "tokenizer_class": None},
                                  {"model_type": "llama", "tokenizer_class": "LlamaTokenizer"}),
        # the config's added_tokens_decoder wins over the file's flags (LlamaTokenizer and as written)
        "spbpe_config_tokens": ("json", {**no_bos_keys, "added_tokens_decoder": loose_image}, None),
        "spbpe_config_tokens_generic": ("json", {**no_bos_keys, "tokenizer_class": "PreTrainedTokenizerFast",
                                                 "added_tokens_decoder": loose_image}, None),
        # a config listing tokens without the file's <image>: LlamaTokenizer drops it
        "spbpe_config_tokens_without_image": ("json", {**no_bos_keys, "added_tokens_decoder": {
            str(i): {"content": c, "special": True} for i, c in enumerate(["<unk>", "<s>", "</s>"])}}, None),
        # a byte-level tokenizer.json whose config says LlamaTokenizerFast: the file as written
        "bytelevel_llamafast": ("bytelevel", {"tokenizer_class": "LlamaTokenizerFast"}, None),
    }
    for name, (kind, config, model_config) in variants.items():
        variant = out_dir / name
        variant.mkdir(parents=True, exist_ok=True)
        if kind == "model":
            (variant / "tokenizer.model").write_bytes((directory / "tokenizer.model").read_bytes())
        else:
            content = old_style if kind == "json" else bytelevel_json
            (variant / "tokenizer.json").write_text(json.dumps(content, ensure_ascii=False))
        (variant / "tokenizer_config.json").write_text(
            json.dumps({key: value for key, value in config.items() if value is not None}, indent=1))
        if model_config:
            (variant / "config.json").write_text(json.dumps(model_config, indent=1))
        tokenizer = AutoTokenizer.from_pretrained(str(variant))
        record(variant, tokenizer, texts if kind != "bytelevel" else TEXTS)
        (variant / "meta.json").write_text(json.dumps({"class": type(tokenizer).__name__, "size": len(tokenizer)}))
    (out_dir / "variants.json").write_text(json.dumps(sorted(variants)))
    # The class AutoTokenizer builds for the old-style file and a config naming LlamaTokenizer, under
    # every model type transformers knows (config.json), with the ids of a text where LlamaTokenizer's
    # pipeline and the file's differ.
    base = out_dir / "spbpe_llama2json"
    model_types = {}
    for model_type in sorted(set(TOKENIZER_MAPPING_NAMES) | set(MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)):
        variant = out_dir / "model_types" / model_type
        variant.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (variant / name).write_bytes((base / name).read_bytes())
        (variant / "config.json").write_text(json.dumps({"model_type": model_type}))
        tokenizer = AutoTokenizer.from_pretrained(str(variant))
        model_types[model_type] = {"class": type(tokenizer).__name__, "ids": tokenizer.encode(MODEL_TYPE_TEXT)}
        shutil.rmtree(variant)
    (out_dir / "model_types.json").write_text(json.dumps({"text": MODEL_TYPE_TEXT, "types": model_types}, indent=1))
    # A Unigram model, which neva refuses by name (LlamaTokenizer is BPE).
    unigram = out_dir / "spunigram"
    unigram.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(unigram / "tokenizer"),
                                   model_type="unigram", vocab_size=120, minloglevel=2)
    (unigram / "tokenizer.vocab").unlink()


def main():
    transformers_logging.set_verbosity_error()  # one warning per model type otherwise
    out_dir = pathlib.Path(sys.argv[1])
    bytelevel(out_dir)
    spbpe(out_dir)
    print("tokenizers recorded in", out_dir)


if __name__ == "__main__":
    main()
