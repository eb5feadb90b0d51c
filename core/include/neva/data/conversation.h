#pragma once
// Conversation templates: how LLaVA and NeMo NeVA lay a dialogue out as one prompt string. The
// strings are those of LLaVA's llava/conversation.py and NeMo's neva conversation.py; llama_3 is
// Meta's Llama 3 chat format.
#include <string>
#include <vector>

#include "neva/api.h"

namespace neva {

struct Turn {
  enum class Role { User, Assistant };
  Role role;
  std::string text;
};

struct ConversationTemplate {
  std::string name;
  std::string system;  // default system prompt ("" for none)
};

// Names: plain, v1, vicuna_v1, llava_v1, llama_2, llava_llama_2, llama_3, nvgpt.
NEVA_API ConversationTemplate conversation_template(const std::string& name);
NEVA_API std::vector<std::string> conversation_template_names();

// The prompt for `turns` (alternating, starting with the user). With `open_assistant`, it ends with
// the assistant's cue so that the model writes the next answer. `system` overrides the default when
// not empty. For nvgpt, assistant turns carry NeMo's default value label, as NeMo's inference does.
NEVA_API std::string render_conversation(const ConversationTemplate& conversation, const std::vector<Turn>& turns,
                                         bool open_assistant, const std::string& system = "");

// The string that ends an assistant turn in this template ("</s>", "<|eot_id|>", ...): a stop string
// for generation.
NEVA_API std::string assistant_end(const ConversationTemplate& conversation);

}  // namespace neva
