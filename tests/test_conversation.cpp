// Conversation templates against the strings LLaVA's and NeMo's conversation.py produce
// (../shared/reference/numerics.md section 9, where each example is spelled out).
#include <doctest/doctest.h>

#include "neva/data/conversation.h"
#include "neva/error.h"

using neva::Turn;

namespace {
std::vector<Turn> one_question(const std::string& text) { return {{Turn::Role::User, text}}; }
}  // namespace

TEST_CASE("llava_v1 inference prompt") {
  CHECK(neva::render_conversation(neva::conversation_template("llava_v1"), one_question("<image>\nDescribe."), true) ==
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nDescribe. ASSISTANT:");
}

TEST_CASE("vicuna_v1 separates turns with a space and ends answers with </s>") {
  std::vector<Turn> turns = {{Turn::Role::User, "Hi"}, {Turn::Role::Assistant, "Hello"}, {Turn::Role::User, "Bye"}};
  CHECK(neva::render_conversation(neva::conversation_template("v1"), turns, true) ==
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello</s>USER: Bye ASSISTANT:");
}

TEST_CASE("llava_llama_2 wraps the system prompt into the first instruction and strips the leading <s>") {
  std::vector<Turn> turns = {{Turn::Role::User, "Q1"}, {Turn::Role::Assistant, "A1"}, {Turn::Role::User, "Q2"}};
  CHECK(neva::render_conversation(neva::conversation_template("llava_llama_2"), turns, true) ==
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language.\n"
        "<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]");
  // The Llama 2 system prompt has two spaces after "safe.".
  CHECK(neva::conversation_template("llama_2").system.find("while being safe.  Your answers") != std::string::npos);
}

TEST_CASE("nvgpt puts NeMo's value label before the answer") {
  CHECK(neva::render_conversation(neva::conversation_template("nvgpt"), one_question("What is it?"), true) ==
        "<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions.\n\n<extra_id_1>User\nWhat is it?\n"
        "<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,"
        "coherence:4,complexity:4,verbosity:4\n");
}

TEST_CASE("llama_3 uses the Llama 3 chat headers") {
  CHECK(neva::render_conversation(neva::conversation_template("llama_3"), one_question("Hi"), true, "Be brief.") ==
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
  CHECK(neva::assistant_end(neva::conversation_template("llama_3")) == "<|eot_id|>");
}

TEST_CASE("plain concatenates messages, each followed by a newline") {
  std::vector<Turn> turns = {{Turn::Role::User, "<image>"}, {Turn::Role::Assistant, "a red circle"}};
  CHECK(neva::render_conversation(neva::conversation_template("plain"), turns, false) == "<image>\na red circle\n");
}

TEST_CASE("unknown templates and out-of-order turns are errors") {
  CHECK_THROWS_WITH_AS(neva::conversation_template("vicuna_1"),
                       doctest::Contains("unknown conversation template 'vicuna_1' (did you mean"), neva::Error);
  CHECK_THROWS_AS(neva::render_conversation(neva::conversation_template("v1"), {{Turn::Role::Assistant, "x"}}, true),
                  neva::Error);
}
