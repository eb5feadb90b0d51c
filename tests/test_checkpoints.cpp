// The checkpoint manager and the run-directory lock as a library, in this process: commit by
// manifest, pruning, the fall-back past damaged and interrupted saves, and the lock. (test_train.cpp
// proves the same through neva-run, with kill -9 inside the writes.)
#include <doctest/doctest.h>

#include <unistd.h>

#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "neva/error.h"
#include "neva/io/atomic_file.h"
#include "neva/io/json.h"
#include "neva/train/checkpoints.h"
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
