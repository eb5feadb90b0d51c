// The trainer as a library, in this process: gradient accumulation against one big batch, the
// schedule and gradient-sync hooks, resume from its saved state (bitwise), and its errors.
#include <doctest/doctest.h>

#include <ATen/ATen.h>

#include "neva/error.h"
#include "neva/io/json.h"
#include "neva/model/llava.h"
#include "neva/train/loss.h"
#include "neva/train/checkpoints.h"
#include "neva/train/trainer.h"
#include "float64_precision.h"
#include "random_sample.h"
#include "tiny_decoder.h"
#include "test_support.h"

namespace {

using neva::test::Float64;

struct Setup {
  Float64 precision;
  neva::RuntimeContext context = neva::RuntimeContext::seeded(3);
  std::unique_ptr<neva::LlavaModel> model;

  explicit Setup(const std::string& mlp = "gated") {
    context.dtypes = precision.dtype_policy();
    auto backbone = std::make_shared<neva::DecoderBackbone>(neva::test::tiny_decoder(mlp), context);
    model = std::make_unique<neva::LlavaModel>(nullptr, nullptr, backbone, -1);
  }
  neva::TrainerOptions options() const {
    neva::TrainerOptions options;
    options.optim.lr = 1e-3;
    options.optim.max_steps = 10;
    options.title = "test";
    options.source = "test_trainer.cpp";
    return options;
  }
  std::map<std::string, at::Tensor> weights() const {
    std::map<std::string, at::Tensor> out;
    for (const auto& item : model->backbone().named_parameters()) out[item.key()] = item.value().detach().clone();
    return out;
  }
};

neva::TrainingSample sample(std::int64_t length, std::int64_t seed) {
  return neva::test::random_sample(length, seed, length / 3);
}

double max_difference(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  double worst = 0;
  for (const auto& [name, tensor] : a) worst = std::max(worst, (tensor - b.at(name)).abs().max().item<double>());
  return worst;
}

}  // namespace

TEST_CASE("trainer: micro-batches accumulated make the step one big batch makes (fp64)") {
  const std::vector<neva::TrainingSample> data{sample(21, 1), sample(13, 2), sample(17, 3)};
  Setup whole, split;
  neva::Trainer big(*whole.model, whole.precision, whole.context, whole.options());
  neva::Trainer small(*split.model, split.precision, split.context, split.options());
  for (int step = 0; step < 2; ++step) {
    const auto one = big.train_step({neva::collate(data, false, 0)});
    const auto three = small.train_step(
        {neva::collate({data[0]}, false, 0), neva::collate({data[1]}, false, 0), neva::collate({data[2]}, false, 0)});
    CHECK(one.loss == doctest::Approx(three.loss).epsilon(1e-12));
    CHECK(one.grad_norm == doctest::Approx(three.grad_norm).epsilon(1e-10));
    CHECK(one.labelled_tokens == three.labelled_tokens);
  }
  CHECK(big.step() == 2);
  CHECK(max_difference(whole.weights(), split.weights()) < 1e-12);
}

// The passes as text: F<chunk>.<micro-batch> / B<chunk>.<micro-batch>.
static std::string passes_text(const neva::Schedule& schedule, std::size_t micro_batches) {
  std::string text;
  for (const auto& pass : schedule.order(micro_batches)) {
    text += (text.empty() ? "" : " ") + std::string(pass.forward ? "F" : "B") + std::to_string(pass.chunk) + "." +
            std::to_string(pass.micro_batch);
  }
  return text;
}

TEST_CASE("pipeline schedules: Megatron-core's 1F1B and interleaved 1F1B orders") {
  // 1F1B over 4 stages, 6 micro-batches: stage r runs p - r - 1 forward passes first
  // (forward_backward_pipelining_without_interleaving's num_warmup_microbatches).
  CHECK(passes_text(*neva::pipeline_schedule(4, 0, 1), 6) ==
        "F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 B0.3 B0.4 B0.5");
  CHECK(passes_text(*neva::pipeline_schedule(4, 3, 1), 6) ==
        "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3 F0.4 B0.4 F0.5 B0.5");
  CHECK(passes_text(*neva::pipeline_schedule(4, 1, 1), 2) == "F0.0 F0.1 B0.0 B0.1");  // fewer than the warm-up
  // Interleaved, 2 stages x 2 chunks, 4 micro-batches: warm-up (p - r - 1) x 2 + (v - 1) x p
  // virtual micro-batches; virtual micro-batch k is micro-batch (k / (p v)) p + k % p of chunk
  // (k % (p v)) / p, counted from the last chunk for backward passes.
  CHECK(passes_text(*neva::pipeline_schedule(2, 0, 2), 4) ==
        "F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 B1.2 B1.3 B0.2 B0.3");
  CHECK(passes_text(*neva::pipeline_schedule(2, 1, 2), 4) ==
        "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 B0.2 B0.3");
  // As many micro-batches as stages: every forward pass first.
  CHECK(passes_text(*neva::pipeline_schedule(2, 1, 2), 2) == "F0.0 F0.1 F1.0 F1.1 B1.0 B1.1 B0.0 B0.1");
  CHECK_THROWS_WITH_AS(neva::pipeline_schedule(2, 0, 2)->order(3),
                       doctest::Contains("needs the micro-batches of a step on each replica to be a multiple of "
                                         "pipeline_model_parallel_size = 2; got 3"),
                       neva::Error);
  CHECK(passes_text(*neva::sequential_schedule(), 2) == "F0.0 B0.0 F0.1 B0.1");
}

TEST_CASE("trainer: the schedule decides the order, the gradient-sync hook runs before the update") {
  const std::vector<neva::TrainingSample> data{sample(15, 4), sample(19, 5)};
  SUBCASE("a schedule that runs the micro-batches backwards gives the same step") {
    struct Backwards : neva::Schedule {
      mutable std::vector<std::size_t> order_seen;
      std::vector<neva::ScheduledPass> order(std::size_t n) const override {
        std::vector<neva::ScheduledPass> passes;
        for (std::size_t i = n; i-- > 0;) {
          order_seen.push_back(i);
          passes.push_back({true, 0, i});
          passes.push_back({false, 0, i});
        }
        return passes;
      }
    };
    Setup forwards_setup, backwards_setup;
    auto schedule = std::make_unique<Backwards>();
    const Backwards* seen = schedule.get();
    neva::Trainer forwards(*forwards_setup.model, forwards_setup.precision, forwards_setup.context,
                           forwards_setup.options());
    neva::Trainer backwards(*backwards_setup.model, backwards_setup.precision, backwards_setup.context,
                            backwards_setup.options(), std::move(schedule));
    const std::vector<neva::TrainingBatch> batches{neva::collate({data[0]}, false, 0), neva::collate({data[1]}, false, 0)};
    CHECK(forwards.train_step(batches).loss == doctest::Approx(backwards.train_step(batches).loss).epsilon(1e-12));
    CHECK(seen->order_seen == std::vector<std::size_t>{1, 0});
    CHECK(max_difference(forwards_setup.weights(), backwards_setup.weights()) < 1e-12);
  }
  SUBCASE("a hook that zeroes the gradients leaves the weights as they were") {
    Setup setup;
    neva::Trainer trainer(*setup.model, setup.precision, setup.context, setup.options());
    std::size_t synced = 0;
    trainer.gradients_ready = [&](std::vector<neva::TrainedTensor>& tensors) {
      synced = tensors.size();
      for (auto& t : tensors) {
        if (t.main.grad().defined()) t.main.mutable_grad().zero_();
      }
    };
    const auto before = setup.weights();
    const auto report = trainer.train_step({neva::collate(data, false, 0)});
    CHECK(synced == trainer.trained().size());
    CHECK(report.grad_norm == 0);
    CHECK(max_difference(before, setup.weights()) == 0);
  }
}

TEST_CASE("trainer: a run resumed from the trainer's saved state continues bitwise (MoE, dropout-free)") {
  neva::test::TempDir dir;
  const std::vector<std::vector<neva::TrainingSample>> steps{
      {sample(14, 6), sample(11, 7)}, {sample(18, 8)}, {sample(12, 9), sample(16, 10)}};
  Setup straight("moe");
  neva::Trainer uninterrupted(*straight.model, straight.precision, straight.context, straight.options());
  for (const auto& batch : steps) (void)uninterrupted.train_step({neva::collate(batch, false, 0)});

  {
    Setup first("moe");
    neva::Trainer trainer(*first.model, first.precision, first.context, first.options());
    for (int step = 0; step < 2; ++step) (void)trainer.train_step({neva::collate(steps[step], false, 0)});
    neva::CheckpointManager::write_manifest(dir.path(), 2, trainer.save(dir.path(), {42}));
  }
  Setup resumed("moe");
  // Another seed: every weight, moment and the generator must come from the checkpoint.
  resumed.context.generator = neva::make_generator(99);
  neva::Trainer trainer(*resumed.model, resumed.precision, resumed.context, resumed.options());
  CHECK(trainer.restore(dir.path()) == std::vector<std::uint64_t>{42});
  CHECK(trainer.step() == 2);
  (void)trainer.train_step({neva::collate(steps[2], false, 0)});
  CHECK(max_difference(straight.weights(), resumed.weights()) == 0);
  CHECK(resumed.context.generator.current_seed() == straight.context.generator.current_seed());
  // Data parallelism: every replica's data position is kept (rank 0's also as consumed_samples).
  neva::test::TempDir replicas;
  neva::CheckpointManager::write_manifest(replicas.path(), 3, trainer.save(replicas.path(), {30, 31, 32}));
  CHECK(trainer.restore(replicas.path()) == std::vector<std::uint64_t>{30, 31, 32});
  CHECK(neva::read_json_file((replicas.path() / "trainer_state.json").string())["consumed_samples"] == 30);
}

TEST_CASE("trainer: a batch without labelled tokens and a model with nothing to train are errors") {
  Setup setup;
  neva::Trainer trainer(*setup.model, setup.precision, setup.context, setup.options());
  neva::TrainingSample prompt_only = sample(9, 11);
  prompt_only.labels.assign(prompt_only.labels.size(), neva::kIgnoreIndex);
  CHECK_THROWS_WITH_AS(trainer.train_step({neva::collate({prompt_only}, false, 0)}),
                       "test: step 1: the global batch holds no labelled token", neva::Error);
  Setup frozen;
  for (auto& parameter : frozen.model->backbone().parameters()) parameter.set_requires_grad(false);
  CHECK_THROWS_WITH_AS(neva::Trainer(*frozen.model, frozen.precision, frozen.context, frozen.options()),
                       "test_trainer.cpp: nothing to train: every component is frozen", neva::Error);
}
