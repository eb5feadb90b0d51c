#pragma once
// A decoder-only language model assembled from core blocks: token embedding, pre-norm layers of
// self-attention (GQA, RoPE, optional sliding window) and a feed-forward block (gated, plain or
// sparse MoE), a final norm and the LM head (tied or not). Backbone plugins (llama, mistral,
// mixtral, nemotron) fill a DecoderConfig from their config.json and build this.
//
// Parameter names are transformers': model.embed_tokens, model.layers.N.{input_layernorm,
// self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp | block_sparse_moe}, model.norm, lm_head.

#include <cstdint>
#include <string>
#include <vector>

#include "neva/context.h"
#include "neva/nn/linear.h"
#include "neva/io/hf_config.h"
#include "neva/language_backbone.h"
#include "neva/nn/rotary.h"
#include "neva/io/weights.h"

namespace neva {

struct DecoderConfig {
  std::string source;  // the config.json it came from, for messages
  std::int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  std::int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  std::string norm = "rms";        // rms | layernorm1p
  double norm_eps = 1e-6;
  std::string mlp = "gated";       // gated | plain | moe
  std::string activation = "silu";
  bool attention_bias = false;         // q/k/v projections
  bool attention_output_bias = false;  // o_proj (Llama: as attention_bias; Qwen2: q/k/v only)
  bool mlp_bias = false, tie_word_embeddings = false;
  std::int64_t sliding_window = 0;  // 0: none
  std::int64_t num_experts = 0, experts_per_token = 0;  // moe
  double router_aux_loss_coef = 0;                      // moe: weight of the load-balancing loss
  RopeConfig rope;
  // moe: Megatron's moe_expert_capacity_factor (0: dropless, as transformers' Mixtral) and
  // moe_token_drop_policy ("probs": an expert over capacity keeps its most probable assignments;
  // "position": its first ones). Set from the recipe's [model.mm_cfg.llm] table.
  double moe_capacity_factor = 0;
  std::string moe_drop_policy = "probs";
};

class DecoderModel;  // model.*: embed_tokens, layers, norm

// Which parts of a decoder of `num_layers` layers a pipeline rank holds (groups.pipeline of p ranks,
// context.virtual_pipeline_chunks = v chunks each): pipeline chunk c = v' x p + rank for each of this
// rank's v' < v, with the layers context.pipeline_layer_split gives it (default: an even split).
// The first chunk has the token embedding, the last the final norm and the LM head (and, with tied
// embeddings, a copy of the embedding, its gradient summed with the first's over groups.embedding).
struct PipelinePlacement {
  struct Chunk {
    std::int64_t index = 0;                    // in the whole pipeline
    std::int64_t first_layer = 0, end_layer = 0;
  };
  std::vector<Chunk> chunks;  // this rank's, in order
  std::int64_t total_chunks = 1;
  bool first_stage = true, last_stage = true;
};
// Throws naming the keys when the layers do not split into the chunks.
NEVA_API PipelinePlacement pipeline_placement(const RuntimeContext& context, std::int64_t num_layers);

class NEVA_API DecoderBackbone : public LanguageBackbone {
 public:
  DecoderBackbone(const DecoderConfig& config, const RuntimeContext& context);
  ~DecoderBackbone() override;

  at::Tensor embed(const at::Tensor& token_ids) override;
  // In training mode with experts, aux_loss = router_aux_loss_coef * load-balancing loss.
  BackboneOutputs forward(const BackboneInputs& inputs) override;
  std::unique_ptr<KVCache> new_cache(std::int64_t batch, std::int64_t max_tokens) override;
  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t vocab_size() const override { return config_.vocab_size; }
  std::int64_t max_position_embeddings() const override { return config_.rope.max_position_embeddings; }
  const PipelinePlacement& placement() const { return placement_; }
  std::int64_t num_layers() const { return config_.num_layers; }  // of the whole decoder, every stage's
  // Pipeline parallelism with tied embeddings: this stage's copy of the embedding (the first stage's
  // input embedding, the last stage's LM head), whose gradient the two stages sum; undefined otherwise.
  at::Tensor pipeline_tied_embedding() const;
  // Pipeline parallelism: the shape of the hidden states passed between chunks for `batch` sequences
  // of `sequence_length` positions (this rank's part of them under sequence or context parallelism,
  // padded as the layers hold it): what a stage receives without being told.
  std::vector<std::int64_t> pipeline_hidden_shape(std::int64_t batch, std::int64_t sequence_length) const;

  // Loads a checkpoint in CausalLM names or a llava-hf text model (hub, nested or transformers 5
  // layouts), strictly; `what` names the architecture in errors.
  void load(const std::string& checkpoint, const std::string& what);

 private:
  DecoderConfig config_;
  RuntimeContext context_;
  RotaryEmbedding rotary_;
  nn::TensorParallelRegion region_;
  nn::VocabularyShard vocabulary_;  // this rank's rows of the (padded) vocabulary
  PipelinePlacement placement_;
  std::shared_ptr<DecoderModel> model_;
  nn::Linear lm_head_;
};

// Throws naming config.json's key when the decoder does not split over `tp` tensor-parallel ranks:
// num_attention_heads and intermediate_size must divide by it, num_key_value_heads must be a
// multiple or a divisor of it. (The vocabulary is padded instead: make_vocab_size_divisible_by.)
NEVA_API void check_tensor_parallel_split(const DecoderConfig& config, int tp);

// An architecture's transformers defaults for absent config.json keys.
struct DecoderDefaults {
  std::int64_t vocab_size, hidden_size, intermediate_size, num_layers, num_heads;
  std::int64_t num_kv_heads;  // 0: as many as the attention heads; -1: config.json must say
  const char* activation;
  double rope_theta;
  std::int64_t max_position_embeddings;
};

// Reads the keys every decoder shares (sizes, heads, head_dim, hidden_act, tie_word_embeddings,
// RoPE) with the architecture's defaults; the plugin sets what is its own.
NEVA_API void read_decoder_shape(const HfConfig& hf, const DecoderDefaults& defaults, DecoderConfig& config);

// What a Hugging Face decoder plugin parses: the architecture's settings and where its weights are.
struct NEVA_API DecoderPluginConfig : LanguageBackboneConfig {
  std::string architecture;  // "Llama", "Mistral", ... for messages
  DecoderConfig decoder;
  std::string weights;       // "" = random initialisation
  ~DecoderPluginConfig() override;
};

// A plugin's parse_config: reads from_pretrained / config (HfSource; a llava-hf directory's
// text_config), checks model_type, and lets `read` fill the DecoderConfig from config.json.
NEVA_API DecoderPluginConfig* parse_decoder_plugin_config(const ConfigSection& section, const std::string& architecture,
                                                          const std::string& model_type,
                                                          void (*read)(const HfConfig&, DecoderConfig&));
// A plugin's create: the DecoderBackbone, with its weights loaded when from_pretrained was given.
NEVA_API Component* create_decoder_backbone(const ComponentConfig& config, const RuntimeContext& context);

}  // namespace neva
