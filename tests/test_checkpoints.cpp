// The checkpoint manager and the run-directory lock as a library, in this process: commit by
// manifest, pruning, the fall-back past damaged and interrupted saves, and the lock. (test_train.cpp
// proves the same through neva-run, with kill -9 inside the writes.)
#include <doctest/doctest.h>

#include <unistd.h>

#include <ATen/ATen.h>

#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "neva/error.h"
#include "neva/io/atomic_file.h"
#include "neva/io/json.h"
#include "neva/train/checkpoints.h"
#include "neva/train/distributed_checkpoint.h"
#include "test_support.h"

using neva::test::TempDir;

namespace {

namespace fs = std::filesystem;

struct Run {
  TempDir dir;
  std::vector<std::string> warnings;
  neva::CheckpointManager manager() {
    return neva::CheckpointManager(dir.path(), [this](const std::string& text) { warnings.push_back(text); });
  }
  std::function<void(const fs::path&)> writer(const std::string& content) {
    return [content](const fs::path& directory) {
      neva::write_file_atomically((directory / "model.safetensors").string(), content);
      neva::write_file_atomically((directory / "trainer_state.json").string(), "{}");
    };
  }
  std::set<std::string> steps() const {
    std::set<std::string> out;
    for (const auto& entry : fs::directory_iterator(dir.path() / "checkpoints")) out.insert(entry.path().filename());
    return out;
  }
  bool warned(const std::string& part) const {
    for (const auto& w : warnings) {
      if (w.find(part) != std::string::npos) return true;
    }
    return false;
  }
};

}  // namespace

TEST_CASE("checkpoints: a save commits with its manifest, names itself latest and keeps the newest save_top_k") {
  Run run;
  auto manager = run.manager();
  CHECK(!manager.find_latest());
  for (std::int64_t step : {10, 20, 30}) manager.save(step, 2, run.writer("weights of " + std::to_string(step)));
  CHECK(run.steps() == std::set<std::string>{"latest", "step-0000020", "step-0000030"});
  CHECK(neva::read_file((run.dir.path() / "checkpoints/latest").string()) == "step-0000030\n");
  CHECK(neva::CheckpointManager::verify(run.dir.path() / "checkpoints/step-0000030").empty());
  auto reopened = run.manager();
  REQUIRE(reopened.find_latest());
  CHECK(reopened.latest()->filename() == "step-0000030");
  CHECK(run.warnings.empty());
  CHECK(neva::CheckpointManager::step_name(42) == "step-0000042");
  CHECK(neva::CheckpointManager::parse_step("step-0000042") == 42);
  CHECK(neva::CheckpointManager::parse_step("step-12a") == -1);
  CHECK(neva::CheckpointManager::parse_step("latest") == -1);
}

TEST_CASE("checkpoints: an interrupted save is never committed, and the next save of that step replaces it") {
  Run run;
  auto manager = run.manager();
  manager.save(10, 3, run.writer("ten"));
  CHECK_THROWS_AS(manager.save(20, 3, [](const fs::path& directory) {
                    neva::write_file_atomically((directory / "model.safetensors").string(), "half");
                    throw neva::Error("disk full");
                  }),
                  neva::Error);
  auto reopened = run.manager();
  REQUIRE(reopened.find_latest());
  CHECK(reopened.latest()->filename() == "step-0000010");  // step-20 has no manifest: not a checkpoint
  reopened.save(20, 3, run.writer("twenty"));
  CHECK(neva::CheckpointManager::verify(run.dir.path() / "checkpoints/step-0000020").empty());
  CHECK(neva::read_file((run.dir.path() / "checkpoints/step-0000020/model.safetensors").string()) == "twenty");
}

TEST_CASE("checkpoints: a damaged newest checkpoint is set aside, with a warning, for the newest intact one") {
  Run run;
  auto manager = run.manager();
  manager.save(10, 3, run.writer("ten"));
  manager.save(20, 3, run.writer("twenty"));
  const fs::path newest = run.dir.path() / "checkpoints/step-0000020";
  SUBCASE("a changed byte") {
    std::ofstream(newest / "model.safetensors", std::ios::binary | std::ios::in | std::ios::out) << "T";
    CHECK(neva::CheckpointManager::verify(newest).find("SHA-256") != std::string::npos);
  }
  SUBCASE("a truncated file") {
    fs::resize_file(newest / "model.safetensors", 2);
    CHECK(neva::CheckpointManager::verify(newest).find("(truncated?)") != std::string::npos);
  }
  SUBCASE("a missing file") {
    fs::remove(newest / "trainer_state.json");
    CHECK(neva::CheckpointManager::verify(newest).find("trainer_state.json is missing") != std::string::npos);
  }
  auto reopened = run.manager();
  REQUIRE(reopened.find_latest());
  CHECK(reopened.latest()->filename() == "step-0000010");
  CHECK(run.warned("checkpoint step-0000020 is damaged and is skipped"));
  CHECK(run.warned("is set aside as step-0000020.damaged"));
  CHECK(fs::exists(run.dir.path() / "checkpoints/step-0000020.damaged"));  // kept for the user
}

TEST_CASE("checkpoints: when every checkpoint is damaged, loading is an error naming each problem") {
  Run run;
  auto manager = run.manager();
  manager.save(10, 3, run.writer("ten"));
  fs::resize_file(run.dir.path() / "checkpoints/step-0000010/model.safetensors", 1);
  auto reopened = run.manager();
  CHECK_THROWS_WITH_AS(reopened.find_latest(), doctest::Contains("no intact checkpoint to resume from"), neva::Error);
  CHECK_THROWS_WITH_AS(reopened.find_latest(), doctest::Contains("step-0000010/model.safetensors has 1 bytes"),
                       neva::Error);
}

TEST_CASE("checkpoints: a latest marker naming something else is ignored with a warning") {
  Run run;
  auto manager = run.manager();
  manager.save(10, 3, run.writer("ten"));
  neva::write_file_atomically((run.dir.path() / "checkpoints/latest").string(), "../../elsewhere\n");
  auto reopened = run.manager();
  REQUIRE(reopened.find_latest());
  CHECK(reopened.latest()->filename() == "step-0000010");
  CHECK(run.warned("which is not a checkpoint of this run directory"));
}

TEST_CASE("run directory lock: one holder at a time, released with its holder") {
  TempDir dir;
  {
    neva::RunDirectoryLock first(dir.path());
    const std::string holder = "pid " + std::to_string(::getpid());
    CHECK_THROWS_WITH_AS(neva::RunDirectoryLock(dir.path()), doctest::Contains(holder.c_str()), neva::Error);
  }
  CHECK_NOTHROW(neva::RunDirectoryLock(dir.path()));
}

// ------------------------------------------------------------------ the distributed format's reader

namespace {

// A random region of a tensor of `shape`: a box, and half the time a flat run of it.
neva::TensorRegion random_region(const std::vector<std::int64_t>& shape, std::mt19937& random, bool flat) {
  neva::TensorRegion region;
  for (std::int64_t size : shape) {
    const std::int64_t begin = std::uniform_int_distribution<std::int64_t>(0, size - 1)(random);
    region.offsets.push_back(begin);
    region.lengths.push_back(std::uniform_int_distribution<std::int64_t>(1, size - begin)(random));
  }
  if (flat) {
    const std::int64_t n = region.numel();
    region.flat_begin = std::uniform_int_distribution<std::int64_t>(0, n - 1)(random);
    region.flat_end = std::uniform_int_distribution<std::int64_t>(region.flat_begin + 1, n)(random);
  }
  return region;
}

// The region's elements of `whole`, as the format defines them (torch's slicing, independently of the reader).
at::Tensor expected_region(const at::Tensor& whole, const neva::TensorRegion& region) {
  at::Tensor box = whole;
  for (std::size_t d = 0; d < region.offsets.size(); ++d) {
    box = box.narrow(static_cast<std::int64_t>(d), region.offsets[d], region.lengths[d]);
  }
  return region.flat() ? box.reshape({-1}).slice(0, region.flat_begin, region.flat_end) : box;
}

}  // namespace

TEST_CASE("distributed checkpoints: any region reads back exactly from pieces of any layout (boxes and flat runs)") {
  std::mt19937 random(7);
  for (int trial = 0; trial < 40; ++trial) {
    TempDir dir;
    // A tensor of 1 to 3 dimensions, cut along a random dimension into blocks; each block a box piece,
    // or cut again into flat runs (a distributed optimizer's shares); the pieces spread over 3 ranks.
    const int rank_count = 3;
    std::vector<std::int64_t> shape;
    const int dims = std::uniform_int_distribution<int>(1, 3)(random);
    for (int d = 0; d < dims; ++d) shape.push_back(std::uniform_int_distribution<std::int64_t>(1, 9)(random));
    const at::Tensor whole = at::arange(neva::whole_region(shape).numel(), at::kDouble).reshape(shape);
    std::vector<std::vector<neva::CheckpointPiece>> pieces(rank_count);
    const auto cut = static_cast<std::size_t>(std::uniform_int_distribution<int>(0, dims - 1)(random));
    for (std::int64_t begin = 0; begin < shape[cut];) {
      const std::int64_t length = std::uniform_int_distribution<std::int64_t>(1, shape[cut] - begin)(random);
      neva::TensorRegion box = neva::whole_region(shape);
      box.offsets[cut] = begin;
      box.lengths[cut] = length;
      begin += length;
      const bool runs = random() % 2 == 0;
      for (std::int64_t from = 0; from < box.numel();) {
        neva::TensorRegion region = box;
        if (runs) {
          region.flat_begin = from;
          region.flat_end = std::uniform_int_distribution<std::int64_t>(from + 1, box.numel())(random);
          from = region.flat_end;
        } else {
          from = box.numel();
        }
        pieces[random() % rank_count].push_back({"w", shape, region, expected_region(whole, region).clone()});
      }
    }
    std::vector<nlohmann::json> ranks;
    for (int r = 0; r < rank_count; ++r) {
      ranks.push_back(neva::write_rank_shard(dir.path(), r, pieces[r], {{"rng.cpu", at::full({2}, r, at::kByte)}}));
    }
    neva::CheckpointManager::write_manifest(dir.path(), 1, neva::merge_rank_shards(ranks));
    const neva::CheckpointReader reader(dir.path());
    REQUIRE(reader.shape("w") == shape);
    CHECK(at::equal(reader.read_whole("w"), whole));
    for (int read = 0; read < 20; ++read) {
      const neva::TensorRegion region = random_region(shape, random, read % 2 == 1);
      at::Tensor out = at::empty(region.data_shape(), at::kFloat);  // converted on the way
      reader.read("w", region, out);
      INFO("shape " << c10::str(at::IntArrayRef(shape)) << ", region offsets " << c10::str(at::IntArrayRef(region.offsets))
                    << " lengths " << c10::str(at::IntArrayRef(region.lengths)) << " flat " << region.flat_begin << ".."
                    << region.flat_end);
      CHECK(at::equal(out, expected_region(whole, region).to(at::kFloat)));
    }
    CHECK(at::equal(reader.own_tensor(2, "rng.cpu"), at::full({2}, 2, at::kByte)));
    CHECK(at::equal(reader.own_tensor(5, "rng.cpu"), at::full({2}, 0, at::kByte)));  // a rank the writer lacked: rank 0's
  }
  // A piece written twice is refused before anything is committed.
  TempDir dir;
  const at::Tensor whole = at::ones({4}, at::kFloat);
  const neva::CheckpointPiece piece{"w", {4}, neva::whole_region({4}), whole};
  CHECK_THROWS_WITH_AS(neva::merge_rank_shards({neva::write_rank_shard(dir.path(), 0, {piece}, {}),
                                                neva::write_rank_shard(dir.path(), 1, {piece}, {})}),
                       doctest::Contains("the ranks' pieces of 'w' hold 8 elements, the tensor [4] has 4"), neva::Error);
}

TEST_CASE("distributed checkpoints: a shard's place in the whole tensor (fused blocks, vocabulary padding, shares)") {
  neva::nn::ParameterSharding fused;  // q/k/v fused along dim 0 in 3 blocks of 8 rows, over 2 ranks
  fused.tensor_parallel_dim = 0;
  fused.partition_stride = 3;
  const auto blocks = neva::shard_segments({12, 5}, fused, 1, 2);
  REQUIRE(blocks.size() == 3);
  CHECK(blocks[1].local_begin == 4);
  CHECK(blocks[1].box.offsets == std::vector<std::int64_t>{12, 0});  // block 1 (rows 8..15), rank 1's half
  CHECK(blocks[1].box.lengths == std::vector<std::int64_t>{4, 5});
  neva::nn::ParameterSharding padded;  // a vocabulary of 97 padded to 2 x 56 rows
  padded.tensor_parallel_dim = 0;
  padded.logical_size = 97;
  const auto last = neva::shard_segments({56, 3}, padded, 1, 2);
  REQUIRE(last.size() == 1);
  CHECK(last[0].box.offsets == std::vector<std::int64_t>{56, 0});
  CHECK(last[0].length == 41);  // the padding rows are in no segment
  // A share of rank 1's shard, elements 100..150 of [56, 3]: rows 33..49 of the local tensor, real
  // rows only up to 41 -> elements 100..123 of the box.
  const auto shares = neva::flat_regions(last, {56, 3}, 100, 50);
  REQUIRE(shares.size() == 1);
  CHECK(shares[0].first.flat_begin == 100);
  CHECK(shares[0].first.flat_end == 123);
  CHECK(shares[0].second == 0);
  neva::nn::ParameterSharding rows;  // row-parallel: split along dim 1
  rows.tensor_parallel_dim = 1;
  const auto share = neva::flat_regions(neva::shard_segments({4, 6}, rows, 1, 2), {4, 6}, 5, 10);
  REQUIRE(share.size() == 1);  // the whole local tensor is one box: a flat run of it
  CHECK(share[0].first.offsets == std::vector<std::int64_t>{0, 6});
  CHECK(share[0].first.flat_begin == 5);
  CHECK(share[0].first.flat_end == 15);
}

TEST_CASE("distributed checkpoints: converted offline into a TP x PP layout's files, each tensor where that layout reads it") {
  TempDir dir;
  // One process's checkpoint: whole tensors with their recorded splits (dimension, fused blocks).
  struct Source {
    std::string name;
    std::vector<std::int64_t> shape;
    std::int64_t dim, blocks;
  };
  const std::vector<Source> sources = {
      {"connector.0.weight", {4, 3}, 0, 1},
      {"llm.model.embed_tokens.weight", {7, 4}, 0, 1},  // 7 rows over 2 ranks: 4 and 3
      {"llm.model.layers.0.self_attn.qkv_proj.weight", {12, 4}, 0, 3},
      {"exp_avg.llm.model.layers.0.self_attn.qkv_proj.weight", {12, 4}, 0, 3},
      {"llm.model.layers.1.input_layernorm.weight", {4}, -1, 1},
      {"llm.model.layers.3.mlp.down_proj.weight", {4, 6}, 1, 1},
      {"llm.model.norm.weight", {4}, -1, 1},
      {"llm.lm_head.weight", {7, 4}, 0, 1},
      {"step.llm.lm_head.weight", {}, -1, 1}};
  std::map<std::string, at::Tensor> whole;
  std::vector<neva::CheckpointPiece> pieces;
  for (const auto& source : sources) {
    whole[source.name] = at::randn(source.shape, at::kDouble);
    pieces.push_back({source.name, source.shape, neva::whole_region(source.shape), whole[source.name], source.dim, source.blocks});
  }
  const fs::path original = dir.path() / "original", converted = dir.path() / "converted";
  fs::create_directories(original);
  nlohmann::json content =
      neva::merge_rank_shards({neva::write_rank_shard(original, 0, pieces, {{"rng.cpu", at::full({2}, 9, at::kByte)}})});
  content["layout"] = {{"world_size", 1}};
  neva::CheckpointManager::write_manifest(original, 3, content);
  neva::write_file_atomically((original / "trainer_state.json").string(), "{\"step\": 3, \"consumed_samples\": 12}\n");
  neva::reshard_checkpoint(neva::CheckpointReader(original), converted, 2, 2);

  const neva::CheckpointReader reader(converted);
  CHECK(reader.world_size() == 4);
  CHECK(reader.manifest()["layout"]["tensor_model_parallel_size"] == 2);
  CHECK(reader.manifest()["layout"]["pipeline_model_parallel_size"] == 2);
  CHECK(reader.manifest()["layout"]["converted_from"]["world_size"] == 1);
  CHECK(fs::exists(converted / "trainer_state.json"));
  for (const auto& source : sources) {
    INFO(source.name);
    CHECK(at::equal(reader.read_whole(source.name), whole[source.name]));
    CHECK(reader.split(source.name) == std::pair<std::int64_t, std::int64_t>{source.dim, source.blocks});
  }
  // Each piece's file and box: stage = layer x 2 / 4 layers (embedding, connector first; norm, head last),
  // tensor-parallel rank r the r-th run of each block.
  auto placed = [&](const std::string& name) {
    std::vector<std::string> out;
    for (const auto& shard : reader.manifest()["tensors"][name]["shards"]) {
      out.push_back(shard["file"].get<std::string>() + " " + shard["offsets"].dump() + " " + shard["lengths"].dump());
    }
    std::sort(out.begin(), out.end());
    return out;
  };
  using List = std::vector<std::string>;
  CHECK(placed("connector.0.weight") == List{"rank-00000.safetensors [0,0] [2,3]", "rank-00001.safetensors [2,0] [2,3]"});
  CHECK(placed("llm.model.embed_tokens.weight") ==
        List{"rank-00000.safetensors [0,0] [4,4]", "rank-00001.safetensors [4,0] [3,4]"});
  CHECK(placed("llm.model.layers.0.self_attn.qkv_proj.weight") ==
        List{"rank-00000.safetensors [0,0] [2,4]", "rank-00000.safetensors [4,0] [2,4]", "rank-00000.safetensors [8,0] [2,4]",
             "rank-00001.safetensors [10,0] [2,4]", "rank-00001.safetensors [2,0] [2,4]", "rank-00001.safetensors [6,0] [2,4]"});
  CHECK(placed("exp_avg.llm.model.layers.0.self_attn.qkv_proj.weight").size() == 6);
  CHECK(placed("llm.model.layers.1.input_layernorm.weight") == List{"rank-00000.safetensors [0] [4]"});
  CHECK(placed("llm.model.layers.3.mlp.down_proj.weight") ==
        List{"rank-00002.safetensors [0,0] [4,3]", "rank-00003.safetensors [0,3] [4,3]"});
  CHECK(placed("llm.model.norm.weight") == List{"rank-00002.safetensors [0] [4]"});
  CHECK(placed("llm.lm_head.weight") == List{"rank-00002.safetensors [0,0] [4,4]", "rank-00003.safetensors [4,0] [3,4]"});
  CHECK(placed("step.llm.lm_head.weight") == List{"rank-00002.safetensors [] []"});
  for (int rank = 0; rank < 4; ++rank) CHECK(at::equal(reader.own_tensor(rank, "rng.cpu"), at::full({2}, 9, at::kByte)));
  CHECK_THROWS_WITH_AS(neva::reshard_checkpoint(neva::CheckpointReader(original), converted, 2, 2),
                       doctest::Contains("exists and is not empty"), neva::Error);
  CHECK_THROWS_WITH_AS(neva::reshard_checkpoint(neva::CheckpointReader(original), dir.path() / "deep", 1, 8),
                       doctest::Contains("4 decoder layers do not split over 8 pipeline stages"), neva::Error);
}
