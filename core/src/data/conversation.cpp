#include "neva/data/conversation.h"

#include "neva/error.h"
#include "neva/suggest.h"

namespace neva {

namespace {

const char* kVicunaSystem =
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions.";
const char* kLlavaSystem =
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the human's questions.";
const char* kLlama2System =
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information.";
const char* kLlavaLlama2System =
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language.";
const char* kNvgptLabel =
    "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4";

bool is_user(const Turn& turn) { return turn.role == Turn::Role::User; }

// LLaVA's SeparatorStyle.TWO: system + " " + "USER: m ASSISTANT: a</s>USER: ..." + "ASSISTANT:".
std::string render_two(const std::string& system, const std::vector<Turn>& turns, bool open, const std::string& end) {
  std::string out = system + " ";
  for (std::size_t i = 0; i < turns.size(); ++i) {
    out += (is_user(turns[i]) ? "USER: " : "ASSISTANT: ") + turns[i].text + (i % 2 == 0 ? " " : end);
  }
  if (open) out += "ASSISTANT:";
  return out;
}

// LLaVA's SeparatorStyle.LLAMA_2, then lstrip("<s>") as LLaVA does (the tokenizer adds BOS).
std::string render_llama_2(const std::string& system, const std::vector<Turn>& turns, bool open) {
  std::string out;
  for (std::size_t i = 0; i < turns.size(); ++i) {
    if (is_user(turns[i])) {
      std::string message = turns[i].text;
      if (i == 0 && !system.empty()) message = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + message;
      out += (i == 0 ? "" : "<s>") + std::string("[INST] ") + message + " [/INST]";
    } else {
      out += " " + turns[i].text + " </s>";
    }
  }
  (void)open;  // the open assistant slot adds nothing in this style
  std::size_t strip = out.find_first_not_of("<s>");
  return strip == std::string::npos ? std::string() : out.substr(strip);
}

std::string render_llama_3(const std::string& system, const std::vector<Turn>& turns, bool open) {
  auto header = [](const char* role) { return std::string("<|start_header_id|>") + role + "<|end_header_id|>\n\n"; };
  std::string out = "<|begin_of_text|>";
  if (!system.empty()) out += header("system") + system + "<|eot_id|>";
  for (const auto& turn : turns) out += header(is_user(turn) ? "user" : "assistant") + turn.text + "<|eot_id|>";
  if (open) out += header("assistant");
  return out;
}

// NeMo's SeparatorStyle.NVGPT.
std::string render_nvgpt(const std::string& system, const std::vector<Turn>& turns, bool open) {
  const std::string sep = "<extra_id_1>";
  std::string out = "<extra_id_0>System\n" + system + sep;
  for (const auto& turn : turns) {
    if (is_user(turn)) {
      out += "User\n" + turn.text + "\n" + sep;
    } else {
      out += "Assistant\n<extra_id_2>" + std::string(kNvgptLabel) + "\n" + turn.text + "\n" + sep;
    }
  }
  if (open) out += "Assistant\n<extra_id_2>" + std::string(kNvgptLabel) + "\n";
  return out;
}

}  // namespace

std::vector<std::string> conversation_template_names() {
  return {"plain", "v1", "vicuna_v1", "llava_v1", "llama_2", "llava_llama_2", "llama_3", "nvgpt"};
}

ConversationTemplate conversation_template(const std::string& name) {
  if (name == "plain") return {name, ""};
  if (name == "v1" || name == "vicuna_v1") return {name, kVicunaSystem};
  if (name == "llava_v1") return {name, kLlavaSystem};
  if (name == "llama_2") return {name, kLlama2System};
  if (name == "llava_llama_2") return {name, kLlavaLlama2System};
  if (name == "llama_3") return {name, ""};
  if (name == "nvgpt") return {name, std::string(kVicunaSystem) + "\n\n"};
  auto names = conversation_template_names();
  throw Error("unknown conversation template '" + name + "'" + did_you_mean(name, names) + " (known: " + join(names) + ")");
}

std::string render_conversation(const ConversationTemplate& conversation, const std::vector<Turn>& turns,
                                bool open_assistant, const std::string& system_override) {
  for (std::size_t i = 0; i < turns.size(); ++i) {
    if (is_user(turns[i]) != (i % 2 == 0)) throw Error("conversation turns must alternate, starting with the user");
  }
  const std::string& system = system_override.empty() ? conversation.system : system_override;
  const std::string& name = conversation.name;
  if (name == "plain") {  // LLaVA's PLAIN: messages concatenated, each followed by "\n"
    std::string out;
    for (const auto& turn : turns) out += turn.text + "\n";
    return out;
  }
  if (name == "llama_2" || name == "llava_llama_2") return render_llama_2(system, turns, open_assistant);
  if (name == "llama_3") return render_llama_3(system, turns, open_assistant);
  if (name == "nvgpt") return render_nvgpt(system, turns, open_assistant);
  return render_two(system, turns, open_assistant, "</s>");
}

std::string assistant_end(const ConversationTemplate& conversation) {
  if (conversation.name == "llama_3") return "<|eot_id|>";
  if (conversation.name == "nvgpt") return "<extra_id_1>";
  if (conversation.name == "plain") return "\n";
  return "</s>";
}

}  // namespace neva
