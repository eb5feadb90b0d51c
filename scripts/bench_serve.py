"""Load figures for neva-run serve (called by scripts/bench_serve.sh; loopback only, bounded).

For each model (tiny: the oracle's 2-layer LLaVA; bench: a ~150M-parameter Llama-shaped LLaVA, random
weights made here with transformers) and each concurrency, clients stream chat completions with
`max_tokens` new tokens each; measured per request: time to first token (TTFT) and time per output
token after it (TPOT); overall: generated tokens per second. The throughput at the highest
concurrency over that of one client at a time is the batching factor.
"""
import argparse
import http.client
import json
import pathlib
import statistics
import subprocess
import sys
import threading
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

# The oracle's tokenizer and vision tower (a 320-piece byte-level BPE whose "<image>" is the image token).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "oracle"))
from llava_oracle import VISION, make_tokenizer  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "bench": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                  num_key_value_heads=8),
}


def make_model(directory, shape):
    if (directory / "model.safetensors").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    text = dict(model_type="llama", vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=1024,
                rms_norm_eps=1e-5, initializer_range=0.05, bos_token_id=0, eos_token_id=1, pad_token_id=0, **SHAPES[shape])
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=VISION, text_config=text, image_token_index=tokenizer.token_to_id("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory / "tokenizer.json"))


def recipe(directory, precision):
    path = directory / f"serve-{precision}.toml"
    path.write_text(f"""[run]
mode = "serve"
[trainer]
precision = "{precision}"
[model.data]
conv_template = "v1"
[model.mm_cfg]
mm_mlp_adapter_type = "mlp2x_gelu"
[model.mm_cfg.llm]
plugin = "llama"
from_pretrained = "{directory}"
[model.mm_cfg.vision_encoder]
plugin = "clip"
from_pretrained = "{directory}"
[model.mm_cfg.mm_mlp_adapter]
from_pretrained = "{directory}"
[serve]
max_tokens = 512
""")
    return path


def one_request(port, index, max_tokens, out):
    body = json.dumps({"messages": [{"role": "user", "content": f"Describe picture number {index} in detail."}],
                       "max_tokens": max_tokens, "temperature": 0.7, "seed": index, "stream": True,
                       "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = last = None
    tokens = 0
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
    connection.close()
    if first is None:
        return
    out.append({"ttft": first - start, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens})


def measure(port, concurrency, requests, max_tokens):
    results, lock, counter = [], threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                if counter[0] >= requests:
                    return
                counter[0] += 1
                index = counter[0]
            one_request(port, index, max_tokens, results)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    quantile = lambda values, q: statistics.quantiles(values, n=20)[int(q * 20) - 1] if len(values) > 1 else values[0]
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results]
    return {"requests": len(results), "tokens": sum(r["tokens"] for r in results), "seconds": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p95_ms": 1e3 * quantile(ttft, 0.95),
            "tpot_p50_ms": 1e3 * statistics.median(tpot), "tpot_p95_ms": 1e3 * quantile(tpot, 0.95)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("neva_run")
    parser.add_argument("work")
    parser.add_argument("--models", default="tiny,bench")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--precision", default="32")
    parser.add_argument("--json")
    args = parser.parse_args()
    work = pathlib.Path(args.work).resolve()
    levels = [int(c) for c in args.concurrency.split(",")]
    report = {}
    print(f"| model | clients | requests | tokens/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms |")
    print(f"|---|---|---|---|---|---|")
    for name in args.models.split(","):
        directory = work / name
        make_model(directory, name)
        server = subprocess.Popen([args.neva_run, "serve", str(recipe(directory, args.precision)), "--port", "0",
                                   "--parallel", str(max(levels))], stdout=subprocess.PIPE, text=True)
        line = server.stdout.readline()
        port = int(line.split(" on http://")[1].split()[0].rsplit(":", 1)[1])
        try:
            measure(port, 1, 2, 8)  # warm-up
            report[name] = {}
            for clients in levels:
                figures = measure(port, clients, max(8, 2 * clients), args.max_tokens)
                report[name][f"c{clients}"] = figures
                print(f"| {name} | {clients} | {figures['requests']} | {figures['tokens_per_s']:.1f} | "
                      f"{figures['ttft_p50_ms']:.1f} / {figures['ttft_p95_ms']:.1f} | "
                      f"{figures['tpot_p50_ms']:.2f} / {figures['tpot_p95_ms']:.2f} |", flush=True)
            top = f"c{max(levels)}"
            report[name]["batching_factor"] = report[name][top]["tokens_per_s"] / report[name]["c1"]["tokens_per_s"]
        finally:
            server.terminate()
            server.wait(timeout=120)
    for name in report:
        print(f"{name}: throughput at {max(levels)} clients / 1 client (sequential): {report[name]['batching_factor']:.2f}x")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
