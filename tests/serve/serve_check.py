#!/usr/bin/env python3
"""neva-run serve, checked with the official `openai` client and raw HTTP.

    serve_check.py NEVA_RUN ORACLE_LLAVA_DIR WORK_DIR

The model is the tiny random LLaVA that tests/oracle/llava_oracle.py saved (llava-hf layout, with its
tokenizer and transformers' own greedy answer for an image and prompt). Checked: the server's greedy
answer equals transformers' and `neva-run generate`'s, alone and while 15 other requests decode beside
it; its log-probabilities equal transformers'; streaming gives the same text; seed, stop,
/v1/completions, /v1/models, /metrics; a client that leaves frees its slot; a full queue answers 503
with Retry-After; an API key; SIGTERM finishes the running request and exits 0; and every bad input
in BAD_INPUTS gets its status and an OpenAI error object, the server serving on. The bad-input table
is written to WORK_DIR/serve_bad_inputs.md (docs/serving.md carries it).
"""
import base64
import http.client
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

NEVA_RUN, HUB_PARENT, WORK = sys.argv[1], pathlib.Path(sys.argv[2]).resolve(), pathlib.Path(sys.argv[3]).resolve()
HUB = HUB_PARENT / "hub"
SCENE = HUB_PARENT / "scene.png"
PROMPT = "What is in the image?"
FAILURES = []


def check(condition, what):
    print(("ok   " if condition else "FAIL ") + what, flush=True)
    if not condition:
        FAILURES.append(what)


def recipe(name, vision=True, extra=""):
    hub = str(HUB)
    text = f"""[run]
mode = "generate"
[model]
micro_batch_size = 1
[model.data]
conv_template = "v1"
[model.mm_cfg.llm]
plugin = "llama"
from_pretrained = "{hub}"
"""
    if vision:
        text += f"""[model.mm_cfg]
mm_mlp_adapter_type = "mlp2x_gelu"
[model.mm_cfg.vision_encoder]
plugin = "clip"
from_pretrained = "{hub}"
[model.mm_cfg.mm_mlp_adapter]
from_pretrained = "{hub}"
"""
    text += f"""[inference]
tokens_to_generate = 8
prompts = ["{PROMPT}"]
images = ["{SCENE if vision else ''}"]
output_file = "{WORK / (name + '.jsonl')}"
max_image_pixels = 20000
[serve]
read_timeout = 1.5
max_body_bytes = 1048576
allowed_image_dir = "{WORK / 'allowed'}"
model_name = "tiny-llava"
max_tokens = 400
{extra}
"""
    path = WORK / (name + ".toml")
    path.write_text(text)
    return path


class Server:
    def __init__(self, recipe_path, *args, env=None):
        self.process = subprocess.Popen([NEVA_RUN, "serve", str(recipe_path), "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=dict(os.environ, **(env or {})))
        line = self.process.stdout.readline()
        if " on http://" not in line:
            raise SystemExit(f"the server did not start: {line}{self.process.stderr.read()}")
        self.port = int(line.split(" on http://")[1].split()[0].rsplit(":", 1)[1])
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=120)

    def raw(self, method, path, body=None, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        connection.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, dict(response.getheaders()), data

    def health(self):
        return json.loads(self.raw("GET", "/health")[2])

    def metric(self, name):
        text = self.raw("GET", "/metrics")[2].decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout=60)
        return self.process.returncode


def data_url(path_or_bytes, media="image/png"):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else pathlib.Path(path_or_bytes).read_bytes()
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_message(text=PROMPT, url=None):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url(SCENE)}},
                                         {"type": "text", "text": text}]}]


def png(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


class Reference:
    """transformers on the same model: greedy answers (with OpenAI's penalties when asked) and log-probabilities."""

    def __init__(self):
        self.tensors = load_file(str(HUB / "reference.safetensors"))
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(HUB / "tokenizer.json"))
        self.model = LlavaForConditionalGeneration.from_pretrained(str(HUB)).eval()
        # As tests/oracle/llava_oracle.py builds it (its e2e input ids are neva's, tested).
        self.processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
            tokenizer=self.tokenizer, patch_size=7, vision_feature_select_strategy="default",
            num_additional_image_tokens=1)
        self.image_token = self.model.config.image_token_index
        self.end = self.tokenizer.convert_tokens_to_ids("<|eot_id|>")

    def e2e(self):
        """The oracle's own greedy answer for the image and PROMPT, and its log-probabilities."""
        answer_ids = self.tensors["e2e_greedy"][0]
        full = torch.cat([self.tensors["e2e_input_ids"], self.tensors["e2e_greedy"]], 1)
        with torch.no_grad():
            log_probs = self.model(input_ids=full, pixel_values=self.tensors["e2e_pixel_values"]).logits.log_softmax(-1)
        start = self.tensors["e2e_input_ids"].shape[1] - 1
        chosen = log_probs[0, start:start + len(answer_ids)].gather(1, answer_ids[:, None])[:, 0]
        return self.tokenizer.decode(answer_ids.tolist(), skip_special_tokens=True), chosen.tolist()

    def greedy(self, prompt, steps, frequency=0.0, presence=0.0):
        """Greedy decoding of a v1 prompt with the scene image, step by step: OpenAI's penalties over the
        generated tokens, the image placeholder never chosen, <|eot_id|> ending it."""
        inputs = self.processor(images=Image.open(SCENE).convert("RGB"), text=prompt, return_tensors="pt")
        ids, counts, out = inputs["input_ids"], {}, []
        with torch.no_grad():
            for _ in range(steps):
                logits = self.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1].clone()
                for token, count in counts.items():
                    logits[token] -= frequency * count + presence
                logits[self.image_token] = -float("inf")
                token = int(logits.argmax())
                if token == self.end:
                    break
                out.append(token)
                counts[token] = counts.get(token, 0) + 1
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
        return self.tokenizer.decode(out, skip_special_tokens=True)


V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "allowed").mkdir(exist_ok=True)
    (WORK / "allowed" / "scene.png").write_bytes(SCENE.read_bytes())
    reference = Reference()
    expected_text, expected_logprobs = reference.e2e()
    vision = recipe("vision")

    # neva-run generate on the same recipe: the server must answer as it does.
    generated = subprocess.run([NEVA_RUN, str(vision)], capture_output=True, text=True, timeout=300)
    check(generated.returncode == 0, "neva-run generate runs: " + generated.stderr[-300:])
    generate_answer = json.loads((WORK / "vision.jsonl").read_text().splitlines()[0])["answer"]
    check(generate_answer == expected_text, f"neva-run generate answers as transformers: {generate_answer!r} {expected_text!r}")

    server = Server(vision, "--parallel", "16")
    client = server.client()
    try:
        # Models.
        models = client.models.list()
        check([m.id for m in models.data] == ["tiny-llava"], "/v1/models lists the served model")

        # A chat with an image, greedy, not streamed: transformers' answer; log-probabilities as transformers'.
        reply = client.chat.completions.create(model="tiny-llava", messages=image_message(), max_tokens=8, temperature=0,
                                               logprobs=True, top_logprobs=3)
        text = reply.choices[0].message.content
        check(text == expected_text, f"greedy chat with an image equals transformers' answer: {text!r}")
        check(text == generate_answer, "... and neva-run generate's")
        check(reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length",
              f"usage and finish_reason: {reply.usage} {reply.choices[0].finish_reason}")
        got = [entry.logprob for entry in reply.choices[0].logprobs.content]
        check(len(got) == len(expected_logprobs) and all(abs(a - b) < 1e-4 for a, b in zip(got, expected_logprobs)),
              f"log-probabilities equal transformers' within 1e-4: {got} {expected_logprobs}")
        check(all(entry.top_logprobs[0].token == entry.token and len(entry.top_logprobs) == 3
                  for entry in reply.choices[0].logprobs.content), "top_logprobs: 3 each, the greedy token first")

        # Streaming: the same text, a usage chunk, the role first.
        chunks = list(client.chat.completions.create(model="tiny-llava", messages=image_message(), max_tokens=8,
                                                     temperature=0, stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        check(streamed == text, f"streamed text equals the non-streamed: {streamed!r}")
        check(chunks[0].choices[0].delta.role == "assistant", "the first chunk carries the role")
        check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8, "the last chunk is the usage")
        check([c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"],
              "one finish_reason, on the last choice chunk")

        # A system message and earlier turns: the v1 template's layout (LLaVA's conv_vicuna_v1), as transformers answers it.
        history = [{"role": "system", "content": "Answer in one word."},
                   *image_message(), {"role": "assistant", "content": "A circle."},
                   {"role": "user", "content": "What colour is it?"}]
        layout = ("Answer in one word. USER: <image>\nWhat is in the image? ASSISTANT: A circle.</s>"
                  "USER: What colour is it? ASSISTANT:")
        multi = client.chat.completions.create(model="tiny-llava", messages=history, max_tokens=8, temperature=0)
        want = reference.greedy(layout, 8)
        check(multi.choices[0].message.content == want, f"multi-turn with a system message: {multi.choices[0].message.content!r} {want!r}")

        # OpenAI's frequency and presence penalties, as transformers' logits with the formula applied.
        penalised = client.chat.completions.create(model="tiny-llava", messages=image_message(), max_tokens=8, temperature=0,
                                                   frequency_penalty=1.5, presence_penalty=0.5)
        want = reference.greedy(V1_SYSTEM + " USER: <image>\n" + PROMPT + " ASSISTANT:", 8, 1.5, 0.5)
        check(penalised.choices[0].message.content == want and want != expected_text,
              f"frequency and presence penalties: {penalised.choices[0].message.content!r} {want!r}")

        # file:// below the allowed folder: the same answer.
        by_file = client.chat.completions.create(model="tiny-llava", max_tokens=8, temperature=0, messages=image_message(
            url="file://" + str(WORK / "allowed" / "scene.png")))
        check(by_file.choices[0].message.content == expected_text, "a file:// image below the allowed folder")

        # The same greedy answer while 15 other requests decode beside it.
        busy_seen = []
        others = []

        def other(i):
            messages = image_message(f"Describe picture {i}.") if i % 3 == 0 else [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Tell me about number {i}."}]
            stream = client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=120 + 10 * i,
                                                    temperature=0.8, seed=i, stream=True)
            others.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

        threads = [threading.Thread(target=other, args=(i,)) for i in range(15)]
        for thread in threads:
            thread.start()
        deadline = time.time() + 30
        while time.time() < deadline and server.health()["slots_busy"] < 15:
            time.sleep(0.01)
        busy_seen.append(server.health()["slots_busy"])
        crowded = client.chat.completions.create(model="tiny-llava", messages=image_message(), max_tokens=8, temperature=0)
        busy_seen.append(server.health()["slots_busy"])
        for thread in threads:
            thread.join()
        check(busy_seen[0] >= 15, f"15 requests decode together (slots busy: {busy_seen})")
        check(crowded.choices[0].message.content == expected_text,
              f"the greedy answer is the same while 15 others run: {crowded.choices[0].message.content!r}")
        check(len(others) == 15, "the 15 others finish")

        # Seed: the same sample twice, another seed another sample.
        def sample(seed):
            return client.chat.completions.create(model="tiny-llava", messages=image_message(), max_tokens=24,
                                                  temperature=1.0, seed=seed).choices[0].message.content
        first, second, third = sample(5), sample(5), sample(6)
        check(first == second, f"seed gives the same sample twice: {first!r} {second!r}")
        check(first != third, "another seed another sample")

        # A temperature too small to sample with is greedy (not a division into infinities).
        tiny = client.chat.completions.create(model="tiny-llava", messages=image_message(), max_tokens=8, temperature=1e-300)
        check(tiny.choices[0].message.content == expected_text, "temperature 1e-300 answers greedily")

        # A client that waits for "100 Continue" before its body (curl does, over 1 KiB) is invited at once.
        body = json.dumps({"model": "tiny-llava", "max_tokens": 8, "temperature": 0, "messages": image_message()}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        invited = sock.recv(4096)
        sock.sendall(body)
        answered = b""
        while b"}}" not in answered[-400:] and len(answered) < 100000:
            piece = sock.recv(65536)
            if not piece:
                break
            answered += piece
        sock.close()
        check(invited.startswith(b"HTTP/1.1 100 Continue") and b" 200 OK" in answered and
              json.dumps(expected_text)[1:-1].encode() in answered, "Expect: 100-continue is answered, then the request")

        # Stop: the greedy answer cut where a stop string begins.
        k = next(k for k in range(1, len(text) - 2) if text.find(text[k:k + 2]) == k and text[k:k + 2].strip())
        stopped = client.chat.completions.create(model="tiny-llava", messages=image_message(), max_tokens=8, temperature=0,
                                                 stop=[text[k:k + 2]])
        check(stopped.choices[0].message.content == text[:k] and stopped.choices[0].finish_reason == "stop",
              f"stop cuts the answer before {text[k:k + 2]!r}: {stopped.choices[0].message.content!r}")

        # /v1/completions: text continued as it is, with log-probabilities.
        completion = client.completions.create(model="tiny-llava", prompt="Once upon a time", max_tokens=6, temperature=0,
                                               logprobs=2)
        choice = completion.choices[0]
        check(len(choice.logprobs.tokens) == completion.usage.completion_tokens == 6 and
              "".join(choice.logprobs.tokens) == choice.text, f"/v1/completions with logprobs: {choice.text!r}")
        streamed_completion = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny-llava", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if c.choices)
        check(streamed_completion == choice.text, "/v1/completions streamed")

        # Errors surface as the client's exception types.
        for exception, kwargs in ((openai.BadRequestError, dict(n=2)), (openai.NotFoundError, dict(model="gpt-9")),
                                  (openai.BadRequestError, dict(temperature=5))):
            try:
                client.chat.completions.create(**{"model": "tiny-llava", "messages": image_message(), **kwargs})
                check(False, f"{kwargs} raises {exception.__name__}")
            except exception as error:
                check(isinstance(error.body, dict) and "message" in error.body, f"{kwargs} raises {exception.__name__}")

        # A client that leaves frees its slot: far fewer tokens generated than it asked for.
        before = server.metric("neva_completion_tokens_total")
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"model": "tiny-llava", "stream": True, "max_tokens": 300, "temperature": 0.7,
                           "messages": [{"role": "user", "content": "Go on."}]})
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        first = sock.recv(4096)
        check(b"200 OK" in first, f"a streamed request starts: {first[:100]}")
        sock.close()
        deadline = time.time() + 30
        while time.time() < deadline and server.health()["slots_busy"] > 0:
            time.sleep(0.01)
        generated = server.metric("neva_completion_tokens_total") - before
        check(server.health()["slots_busy"] == 0 and generated < 300,
              f"a disconnected client's slot is freed ({generated:.0f} of 300 tokens generated)")

        # Bad inputs: each its status and an OpenAI error object; the server serves on.
        bad_inputs(server, expected_text)
        check(server.health()["status"] == "ok", "after the bad inputs the server is healthy")
        after = client.chat.completions.create(model="tiny-llava", messages=image_message(), max_tokens=8, temperature=0)
        check(after.choices[0].message.content == expected_text, "... and answers as before")
        metrics = server.raw("GET", "/metrics")[2].decode()
        for name in ("neva_requests_total", "neva_queue_depth", "neva_time_to_first_token_seconds_bucket",
                     "neva_time_per_output_token_seconds_bucket", "neva_prompt_tokens_total"):
            check(name in metrics, f"/metrics has {name}")
    finally:
        code = server.stop()
    check(code == 0, f"SIGTERM: exit 0 (got {code})")

    text_only_checks()
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed:", *FAILURES, sep="\n  ")
        sys.exit(1)
    print("all serve checks passed")


BAD_INPUTS = []  # (what, status, the error message's part checked)


def bad_inputs(server, expected_text):
    def post(body, path="/v1/chat/completions", headers=None):
        return server.raw("POST", path, body, headers)

    def expect(what, status, needle, response):
        got_status, headers, data = response
        try:
            error = json.loads(data)["error"]
            message = error["message"]
            shaped = isinstance(error.get("type"), str) and "param" in error and "code" in error
        except (ValueError, KeyError, TypeError):
            message, shaped = data[:200], False
        ok = got_status == status and shaped and needle in message
        if status == 503:
            ok = ok and headers.get("Retry-After") == "1"
        check(ok, f"bad input: {what} -> {status} ({got_status}: {message})")
        BAD_INPUTS.append((what, status, message))

    base = {"model": "tiny-llava", "max_tokens": 4}
    chat = lambda **kw: {**base, "messages": [{"role": "user", "content": "Hi"}], **kw}
    image = lambda url: {**base, "messages": image_message(url=url)}
    part = lambda p: {**base, "messages": [{"role": "user", "content": [p]}]}
    scene = SCENE.read_bytes()
    cases = [
        ("malformed JSON", 400, "not valid JSON", post("{\"messages\": [")),
        ("an empty body", 400, "not valid JSON", post("")),
        ("invalid UTF-8 in a string", 400, "not valid JSON",
         post(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}')),
        ("a JSON array as the body", 400, "must be a JSON object", post([1, 2])),
        ("no messages", 400, "'messages': missing", post(base)),
        ("messages not an array", 400, "expected an array", post({**base, "messages": "Hi"})),
        ("no message at all", 400, "at least one message", post({**base, "messages": []})),
        ("a message that is a string", 400, "expected an object", post({**base, "messages": ["Hi"]})),
        ("a message without a role", 400, "'role'", post({**base, "messages": [{"content": "Hi"}]})),
        ("a role that is a number", 400, "'role'", post({**base, "messages": [{"role": 1, "content": "Hi"}]})),
        ("an unknown role", 400, "unknown role 'robot'", post({**base, "messages": [{"role": "robot", "content": "Hi"}]})),
        ("a tool message", 400, "not supported", post({**base, "messages": [{"role": "tool", "content": "Hi"}]})),
        ("a message without content", 400, "missing 'content'", post({**base, "messages": [{"role": "user"}]})),
        ("content that is a number", 400, "expected a string or an array of parts",
         post({**base, "messages": [{"role": "user", "content": 5}]})),
        ("a message field not supported", 400, "not supported in a message",
         post({**base, "messages": [{"role": "user", "content": "Hi", "tool_calls": []}]})),
        ("a part that is not an object", 400, "expected a part", post(part("Hi"))),
        ("a part without a type", 400, "expected a part", post(part({"text": "Hi"}))),
        ("an audio part", 400, "part type 'input_audio' is not supported", post(part({"type": "input_audio"}))),
        ("a text part without text", 400, "needs a string 'text'", post(part({"type": "text"}))),
        ("an image in an assistant message", 400, "only user messages may hold images",
         post({**base, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
             {"type": "image_url", "image_url": {"url": data_url(SCENE)}}]}, {"role": "user", "content": "?"}]})),
        ("an image part without a URL", 400, "expected {\"url\"", post(part({"type": "image_url", "image_url": {}}))),
        ("a remote image URL", 400, "remote image URLs are not fetched", post(image("https://example.com/cat.png"))),
        ("an unknown URL scheme", 400, "expected a data: URL", post(image("ftp://example.com/cat.png"))),
        ("a data: URL that is not base64", 400, "expected a base64 data: URL", post(image("data:image/png,abc"))),
        ("a data: URL without a comma", 400, "without a comma", post(image("data:image/png;base64"))),
        ("a GIF image", 400, "media type 'image/gif'", post(image("data:image/gif;base64,R0lGODlh"))),
        ("bad base64 characters", 400, "invalid base64", post(image("data:image/png;base64,!!!!"))),
        ("base64 of a length not a multiple of 4", 400, "not a multiple of 4", post(image("data:image/png;base64,abcde"))),
        ("empty base64 data", 400, "empty", post(image("data:image/png;base64,"))),
        ("bytes that are no image", 400, "messages[0].content[0]", post(image(data_url(os.urandom(600))))),
        ("a truncated PNG", 400, "messages[0].content[0]", post(image(data_url(scene[:len(scene) // 2])))),
        ("a JPEG labelled PNG that is not JPEG either", 400, "messages[0].content[0]",
         post(image(data_url(b"\xff\xd8\xff" + os.urandom(100), "image/jpeg")))),
        ("an image over the pixel budget", 400, "pixel", post(image(data_url(png(200, 200))))),
        ("a file:// image outside the allowed folder", 400, "below the allowed folder", post(image("file:///etc/passwd"))),
        ("a file:// path escaping the allowed folder", 400, "below the allowed folder",
         post(image("file://" + str(WORK / "allowed" / ".." / "vision.toml")))),
        ("a relative file:// path", 400, "below the allowed folder", post(image("file://scene.png"))),
        ("a file:// image that does not exist", 400, "cannot read",
         post(image("file://" + str(WORK / "allowed" / "missing.png")))),
        ("a literal <image> with no image", 400, "placeholder",
         post({**base, "messages": [{"role": "user", "content": "<image> what?"}]})),
        ("the last message the assistant's", 400, "the last message must be the user's",
         post({**base, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})),
        ("only a system message", 400, "no user message", post({**base, "messages": [{"role": "system", "content": "Be"}]})),
        ("an assistant message first", 400, "must begin with a user message",
         post({**base, "messages": [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Hi"}]})),
        ("max_tokens 0", 400, "out of range", post(chat(max_tokens=0))),
        ("max_tokens a string", 400, "expected an integer", post(chat(max_tokens="8"))),
        ("max_tokens beyond the server's limit", 400, "limit of 400", post(chat(max_tokens=401))),
        ("max_completion_tokens negative", 400, "out of range", post(chat(max_completion_tokens=-3))),
        ("temperature above 2", 400, "out of range", post(chat(temperature=3))),
        ("temperature a string", 400, "expected a number", post(chat(temperature="hot"))),
        ("top_p 0", 400, "keeps no token", post(chat(top_p=0))),
        ("top_p above 1", 400, "out of range", post(chat(top_p=1.5))),
        ("n = 2", 400, "only n = 1", post(chat(n=2))),
        ("five stop sequences", 400, "at most 4", post(chat(stop=["a", "b", "c", "d", "e"]))),
        ("an empty stop sequence", 400, "empty stop", post(chat(stop=[""]))),
        ("stop a number", 400, "expected a string or an array", post(chat(stop=7))),
        ("top_logprobs without logprobs", 400, "needs logprobs = true", post(chat(top_logprobs=2))),
        ("top_logprobs 21", 400, "out of range", post(chat(logprobs=True, top_logprobs=21))),
        ("logprobs a string", 400, "expected a boolean", post(chat(logprobs="yes"))),
        ("stream a string", 400, "expected a boolean", post(chat(stream="yes"))),
        ("stream_options without stream", 400, "only allowed when stream", post(chat(stream_options={"include_usage": True}))),
        ("frequency_penalty beyond 2", 400, "out of range", post(chat(frequency_penalty=3))),
        ("seed not an integer", 400, "expected an integer", post(chat(seed=1.5))),
        ("tools", 400, "not supported", post(chat(tools=[{"type": "function"}]))),
        ("JSON mode", 400, "only {\"type\": \"text\"}", post(chat(response_format={"type": "json_object"}))),
        ("logit_bias", 400, "not supported", post(chat(logit_bias={"5": 10}))),
        ("an unknown parameter", 400, "unrecognized request argument", post(chat(temprature=0.5))),
        ("another model's name", 404, "does not exist", post(chat(model="gpt-9"))),
        ("a prompt beyond the context", 400, "context", post(chat(messages=[{"role": "user", "content": "word " * 700}]))),
        ("completions without a prompt", 400, "'prompt': missing", post(base, "/v1/completions")),
        ("completions with token-id prompts", 400, "expected one string", post({**base, "prompt": [1, 2]}, "/v1/completions")),
        ("completions with echo", 400, "echo", post({**base, "prompt": "a", "echo": True}, "/v1/completions")),
        ("completions with logprobs 6", 400, "out of range", post({**base, "prompt": "a", "logprobs": 6}, "/v1/completions")),
        ("completions with best_of 2", 400, "best_of", post({**base, "prompt": "a", "best_of": 2}, "/v1/completions")),
        ("a chat parameter on completions", 400, "unrecognized", post({**base, "prompt": "a", "messages": []}, "/v1/completions")),
        ("an unknown endpoint", 404, "no such endpoint", server.raw("GET", "/v1/embeddings")),
        ("GET on a POST endpoint", 405, "use POST", server.raw("GET", "/v1/chat/completions")),
        ("POST on /health", 405, "use GET", server.raw("POST", "/health", "{}")),
        ("a number beyond a double", 400, "not valid JSON",
         post('{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e400}')),
        ("seventeen images", 400, "more than 16 images", post({**base, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(SCENE)}}] * 17}]})),
        ("a body beyond serve.max_body_bytes", 413, "larger than 1048576 bytes", post("x" * (2 << 20))),
    ]
    # The context check with a prompt that fits but not with the tokens asked for.
    probe = json.loads(post({**base, "prompt": "word " * 200, "max_tokens": 1}, "/v1/completions")[2])
    words = int(200 * 400 / probe["usage"]["prompt_tokens"])
    cases.append(("a prompt plus max_tokens beyond the context", 400, "were requested",
                  post({**base, "prompt": "word " * words, "max_tokens": 300}, "/v1/completions")))
    for what, status, needle, response in cases:
        expect(what, status, needle, response)

    # Below HTTP: a malformed request line, huge headers, and slow clients (serve.read_timeout = 1.5 s).
    def raw_socket(payload, pause=0.0, rest=b""):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(payload)
        if pause:
            time.sleep(pause)
            try:
                sock.sendall(rest)
            except OSError:
                pass
        data = b""
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
        except OSError:
            pass
        sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head.startswith(b"HTTP/1.1") else 0
        headers = dict(line.split(": ", 1) for line in head.decode(errors="replace").split("\r\n")[1:] if ": " in line)
        return status, headers, body

    stream_body = json.dumps({**base, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}).encode()
    expect("streaming asked over HTTP/1.0", 400, "need HTTP/1.1", raw_socket(
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: " + str(len(stream_body)).encode() + b"\r\n\r\n" + stream_body))
    expect("a malformed request line", 400, "malformed HTTP request", raw_socket(b"HELLO WORLD\r\n\r\n"))
    expect("headers beyond 64 KiB", 431, "headers are larger", raw_socket(
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"))
    expect("a slow-loris client (headers never end)", 408, "not received within",
           raw_socket(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", pause=2.5, rest=b"X-More: 1\r\n"))
    expect("a body that never arrives in full", 408, "not received within",
           raw_socket(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mes", pause=2.5))


def text_only_checks():
    """A text-only model: no image parts; an API key; a full queue; SIGTERM while a request runs."""
    text_only = recipe("text", vision=False, extra="max_queue = 1")

    # Two connections at most: a third is told to come back, the two are served, and a place that
    # frees is taken again.
    limited = Server(text_only, "--set", "serve.max_connections=2")
    try:
        idle = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(2)]
        time.sleep(0.2)
        status, headers, data = limited.raw("GET", "/health")
        message = json.loads(data)["error"]["message"]
        check(status == 503 and headers.get("Retry-After") == "1" and "max_connections" in message,
              f"a connection beyond serve.max_connections -> 503 with Retry-After ({status})")
        BAD_INPUTS.append(("a connection beyond serve.max_connections", 503, message))
        idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        check(b" 200 OK" in idle[0].recv(4096), "the connections within the limit are served")
        idle[1].close()
        time.sleep(0.2)
        check(limited.raw("GET", "/health")[0] == 200, "a freed place is taken again")
        idle[0].close()
    finally:
        limited.stop()

    server = Server(text_only, "--parallel", "1", env={"NEVA_API_KEY": "sesame"})
    try:
        client = server.client("sesame")
        reply = client.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
        check(reply.usage.completion_tokens >= 1, "a text-only model answers with the right API key")
        for key, name in (("wrong", "a wrong API key"), (None, "no API key")):
            status, _, data = server.raw("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]},
                                         {"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
            check(status == 401 and json.loads(data)["error"]["type"] == "authentication_error", f"{name} -> 401")
            BAD_INPUTS.append((name, 401, json.loads(data)["error"]["message"]))
        try:
            server.client("wrong").models.list()
            check(False, "a wrong key raises AuthenticationError")
        except openai.AuthenticationError:
            check(True, "a wrong key raises AuthenticationError")
        try:
            client.chat.completions.create(model="tiny-llava", messages=image_message(), max_tokens=4)
            check(False, "an image for a text-only model is refused")
        except openai.BadRequestError as error:
            check("no vision encoder" in str(error), "an image for a text-only model -> 400 (BadRequestError)")
            BAD_INPUTS.append(("an image for a model without a vision encoder", 400, error.body["message"]))

        # One slot and a queue of one: of six requests sent at once, those beyond them are told to come back.
        results = []
        barrier = threading.Barrier(6)

        def long_request():
            barrier.wait()
            try:
                client.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": "Go"}],
                                               max_tokens=300, temperature=0.7)
                results.append(200)
            except openai.APIStatusError as error:
                busy = "the server is busy" in str(error)
                results.append((error.status_code, error.response.headers.get("retry-after"), busy))

        threads = [threading.Thread(target=long_request) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        check(results.count(200) >= 2 and (503, "1", True) in results and
              all(r == 200 or r == (503, "1", True) for r in results), f"a full queue: 503 with Retry-After ({results})")
        BAD_INPUTS.append(("a request when every slot and the queue are full", 503, "the server is busy ..."))

        # SIGTERM while a request streams: it finishes, new connections are refused, exit 0.
        received = []

        def streaming():
            stream = client.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": "Go"}],
                                                    max_tokens=300, temperature=0, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    received.append(chunk.choices[0].finish_reason)

        thread = threading.Thread(target=streaming)
        thread.start()
        deadline = time.time() + 30
        while time.time() < deadline and server.health()["slots_busy"] < 1:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        thread.join()
        code = server.process.wait(timeout=60)
        said = server.process.stdout.read()
        check(len(received) == 1 and "finishing 1 request(s)" in said,
              f"SIGTERM: the running request finishes ({received}; the server said {said.strip()!r})")
        check(code == 0, f"SIGTERM: exit 0 after draining (got {code})")
    finally:
        server.stop()
    table = ["| Bad input | Status | Error message |", "|---|---|---|"]
    for what, status, message in BAD_INPUTS:
        message = str(message).replace("|", "\\|").replace("\n", " ")
        table.append(f"| {what} | {status} | {message[:160]} |")
    (WORK / "serve_bad_inputs.md").write_text("\n".join(table) + "\n")
    print(f"{len(BAD_INPUTS)} bad inputs checked; table in {WORK / 'serve_bad_inputs.md'}")


if __name__ == "__main__":
    main()
