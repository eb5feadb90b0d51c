#pragma once
// What generate, score and serve share: the recipe's model, tokenizer, conversation template and
// image processor, and how a conversation with images becomes prompt ids.
#include <memory>
#include <string>
#include <vector>

#include "neva/data/conversation.h"
#include "neva/data/image.h"
#include "neva/data/tokenizer.h"
#include "neva/inference/generation.h"
#include "neva/model/llava.h"
#include "neva/parallel/process_group.h"
#include "neva/recipe.h"

namespace neva {

// Generation and scoring run on one model-parallel group (tensor x pipeline x expert): every rank
// computes the same tokens (the logits are gathered over the tensor group and broadcast from the
// last pipeline stage, and sampling draws from one seed), rank 0 writes them.
class Session {
 public:
  explicit Session(const Recipe& recipe);

  // The templated prompt's ids for `turns` (ending with the user's) with their images' pixel values
  // (`images`: preprocessed, in placeholder order). A turn without an <image> placeholder gets one
  // per image of its own in front (LLaVA's convention) when `images_per_turn` says so. `system`
  // overrides inference.system and the template's. Errors name `where`.
  GenerationRequest prepare_conversation(std::vector<Turn> turns, const std::vector<std::size_t>& images_per_turn,
                                         std::vector<at::Tensor> images, const std::string& system,
                                         const std::string& where) const;
  // The encoder's pixel values for one decoded image (errors name `where`); refused without an encoder.
  at::Tensor preprocess(const Image& image, const std::string& where) const;
  at::Tensor load_image(const std::string& path, const std::string& where) const;
  std::int64_t max_image_pixels() const;

  // The recipe's [inference] sampling, the template's end and the tokenizer's end tokens as stops.
  SamplingConfig sampling() const;

  LlavaModel& model() { return model_; }
  const Recipe& recipe() const { return recipe_; }
  const World& world() const { return world_; }
  bool writes() const { return world_.rank == 0; }  // the rank that prints and writes the answers
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  // The precision recipe's forward scope (none for a model held in bf16 or fp32 throughout).
  std::unique_ptr<PrecisionScope> enter_forward() const { return recipe_.precision->enter_forward(context_); }

 private:
  const Recipe& recipe_;
  World world_;
  RuntimeContext context_;
  LlavaModel model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ConversationTemplate conversation_;
  ImageProcessorConfig processor_;  // the encoder's, with image_aspect_ratio (checked at construction)
};

}  // namespace neva
