#include <doctest/doctest.h>
#include <torch/types.h>

#include <sys/resource.h>

#include <csignal>
#include <cstring>
#include <fstream>

#include "neva/error.h"
#include "neva/io/safetensors.h"
#include "neva/io/weights.h"
#include "test_support.h"

using neva::SafetensorsCheckpoint;
using neva::SafetensorsFile;
using neva::test::TempDir;

namespace {

// A file from a raw header (any bytes) and data, with the given declared header length.
std::string raw_file(const TempDir& dir, const std::string& header, const std::string& data = "",
                     std::optional<std::uint64_t> declared = std::nullopt) {
  std::uint64_t length = declared.value_or(header.size());
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &length, 8);
  return dir.write("t.safetensors", bytes + header + data).string();
}

std::string open_error(const std::string& path) {
  try {
    SafetensorsFile file(path);
  } catch (const neva::Error& error) {
    return error.what();
  }
  FAIL("expected an error opening " << path);
  return {};
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

const std::string kGoodHeader = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
const std::string kGoodData(8, '\0');

}  // namespace

TEST_CASE("write then read round-trips every dtype, zero-size and 0-rank tensors, with metadata") {
  TempDir dir;
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"f32", torch::randn({3, 4})},
      {"bf16", torch::randn({5}).to(at::kBFloat16)},
      {"f16", torch::randn({2, 2}).to(at::kHalf)},
      {"f8e4m3", torch::randn({7}).to(at::kFloat8_e4m3fn)},
      {"f8e5m2", torch::randn({7}).to(at::kFloat8_e5m2)},
      {"i64", torch::arange(5, at::kLong)},
      {"u8", torch::arange(3, at::kByte)},
      {"bool", torch::tensor({true, false, true})},
      {"scalar", torch::tensor(3.5)},
      {"empty", torch::zeros({0, 4})},
      {"strided", torch::arange(12, at::kFloat).reshape({3, 4}).t()},
  };
  auto path = (dir.path() / "m.safetensors").string();
  neva::write_safetensors(path, tensors, {{"format", "pt"}});
  SafetensorsFile file(path);
  CHECK(file.metadata().at("format") == "pt");
  for (const auto& [name, expected] : tensors) {
    CAPTURE(name);
    at::Tensor got = file.tensor(name);
    CHECK((got.scalar_type() == expected.scalar_type()));
    CHECK(got.sizes() == expected.sizes());
    CHECK(torch::equal(got.to(at::kFloat), expected.to(at::kFloat)));
    if (got.numel() > 0) CHECK(reinterpret_cast<std::uintptr_t>(got.data_ptr()) % got.element_size() == 0);
  }
  // The header is padded so that data starts at a multiple of 8.
  std::ifstream in(path, std::ios::binary);
  std::uint64_t header_size = 0;
  in.read(reinterpret_cast<char*>(&header_size), 8);
  CHECK(header_size % 8 == 0);
}

TEST_CASE("tensors are copy-on-write views: writing to one never changes the file") {
  TempDir dir;
  auto path = (dir.path() / "m.safetensors").string();
  neva::write_safetensors(path, {{"x", torch::ones({4})}});
  {
    SafetensorsFile file(path);
    at::Tensor view = file.tensor("x");
    view.mul_(5);
    CHECK(view.sum().item<float>() == 20);
  }
  CHECK(SafetensorsFile(path).tensor("x").sum().item<float>() == 4);
}

TEST_CASE("load_weights maps a CPU parameter of the stored dtype instead of copying it: training writes never reach the file") {
  TempDir dir;
  auto path = (dir.path() / "m.safetensors").string();
  const at::Tensor stored = torch::randn({64, 64});
  const at::Tensor row = torch::randn({8});
  neva::write_safetensors(path, {{"x.weight", stored}, {"y.weight", torch::randn({8})}, {"z.weight", row}});
  struct Part : torch::nn::Module {
    at::Tensor a = register_parameter("a", torch::zeros({64, 64}));
    at::Tensor b = register_parameter("b", torch::zeros({64, 64}));          // the same tensor as a's
    at::Tensor c = register_parameter("c", torch::zeros({8}, at::kBFloat16));  // another dtype
    at::Tensor fused = torch::zeros({2, 8});
    at::Tensor d = register_parameter("d", fused[0]);  // a view: its memory is fused's
  };
  const neva::WeightMap map{{{"a", "x.weight"}, {"b", "x.weight"}, {"c", "y.weight"}, {"d", "z.weight"}}, nullptr};
  Part part;
  const void* const a_before = part.a.data_ptr();
  const void* const b_before = part.b.data_ptr();
  const void* const c_before = part.c.data_ptr();
  neva::load_weights(part, SafetensorsCheckpoint(path), map, "test part");
  CHECK(at::equal(part.a, stored));
  CHECK(at::equal(part.b, stored));
  CHECK(at::equal(part.c, SafetensorsFile(path).tensor("y.weight").to(at::kBFloat16)));
  CHECK(part.a.data_ptr() != a_before);  // mapped: the file's pages, not the construction's memory
  CHECK(part.b.data_ptr() == b_before);  // the second user of a tensor gets a copy of its own
  CHECK(part.c.data_ptr() == c_before);  // converted into its own memory
  CHECK(at::equal(part.fused[0], row));   // a view is filled in place, so what shares its memory sees it
  CHECK(at::equal(part.d, row));
  CHECK(part.a.requires_grad());
  // An optimizer's in-place update touches the parameter only: not the file, not its other user,
  // not a second model mapped from the same file.
  Part second;
  neva::load_weights(second, SafetensorsCheckpoint(path), map, "test part");
  {
    torch::NoGradGuard no_grad;
    part.a.add_(1);
  }
  CHECK(at::equal(part.a, stored + 1));
  CHECK(at::equal(part.b, stored));
  CHECK(at::equal(second.a, stored));
  CHECK(at::equal(SafetensorsFile(path).tensor("x.weight"), stored));
}

TEST_CASE("a tensor outlives the file object that mapped it") {
  TempDir dir;
  auto path = (dir.path() / "m.safetensors").string();
  neva::write_safetensors(path, {{"x", torch::full({1000}, 2.0)}});
  at::Tensor kept = SafetensorsFile(path).tensor("x");
  CHECK(kept.sum().item<float>() == 2000);
}

TEST_CASE("header size limits are enforced before anything is allocated") {
  TempDir dir;
  CHECK(contains(open_error(raw_file(dir, "", "", UINT64_MAX)), "exceeds the limit of 100000000"));
  CHECK(contains(open_error(raw_file(dir, "", "", 100'000'001)), "safetensors header of 100000001 bytes exceeds"));
  CHECK(contains(open_error(raw_file(dir, kGoodHeader, "", 1000)), "runs past the end of the"));
  CHECK(contains(open_error(dir.write("short.safetensors", "abc").string()), "shorter than the 8-byte header size"));
}

TEST_CASE("the header must be strict JSON starting with '{'") {
  TempDir dir;
  CHECK(contains(open_error(raw_file(dir, " " + kGoodHeader, kGoodData)), "does not start with '{'"));
  CHECK(contains(open_error(raw_file(dir, "{\"a\":", kGoodData)), "invalid JSON"));
  CHECK(contains(open_error(raw_file(dir, "{\"a\":\"\xff\xfe\"}")), "invalid JSON"));
  CHECK(contains(open_error(raw_file(dir,
                                     R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                     R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                     kGoodData)),
                 "duplicate key 'a'"));
  CHECK(contains(open_error(raw_file(dir, R"({"__metadata__":{"k":1}})")), "__metadata__ value 'k' is not a string"));
  CHECK(contains(open_error(raw_file(dir, "{\"a\":" + std::string(20, '[') + std::string(20, ']') + "}")),
                 "nest deeper than 8 levels"));
}

TEST_CASE("unknown dtypes are errors, not skipped") {
  TempDir dir;
  auto message = open_error(raw_file(dir, R"({"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}})", "x"));
  CHECK(contains(message, "tensor 'a': unknown dtype 'F4'"));
}

TEST_CASE("offsets must be contiguous and cover the data exactly") {
  TempDir dir;
  // gap
  CHECK(contains(open_error(raw_file(dir, R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", "xx")),
                 "starts at byte 1 of the data, expected 0"));
  // overlap
  CHECK(contains(open_error(raw_file(dir,
                                     R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                                     R"("b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})",
                                     "xxx")),
                 "tensor 'b' starts at byte 1"));
  // end before begin
  CHECK(contains(open_error(raw_file(dir, R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[2,1]}})", "")),
                 "end before they begin"));
  // trailing bytes
  CHECK(contains(open_error(raw_file(dir, kGoodHeader, kGoodData + "zz")), "trailing bytes"));
  // truncated data
  CHECK(contains(open_error(raw_file(dir, kGoodHeader, "1234")), "truncated"));
  // size disagreeing with the shape
  CHECK(contains(open_error(raw_file(dir, R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", kGoodData)),
                 "data_offsets span 8 bytes, but F32 [3] needs 12"));
  // shuffled order is fine
  SafetensorsFile shuffled(raw_file(dir,
                                    R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},)"
                                    R"("a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
                                    "AB"));
  CHECK(shuffled.tensor("b").item<std::uint8_t>() == 'B');
}

TEST_CASE("shape arithmetic that overflows is an error, not an empty tensor") {
  TempDir dir;
  auto message = open_error(raw_file(
      dir, R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"));
  CHECK(contains(message, "overflows"));
  auto huge = open_error(raw_file(dir, R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}})"));
  CHECK(contains(huge, "overflows"));
}

TEST_CASE("tensor names are data: a name with path characters reads like any other") {
  TempDir dir;
  auto path = (dir.path() / "m.safetensors").string();
  neva::write_safetensors(path, {{"../../etc/passwd", torch::ones({1})}});
  CHECK(SafetensorsFile(path).tensor("../../etc/passwd").item<float>() == 1);
  CHECK(!std::filesystem::exists(dir.path() / "../../etc/passwd.safetensors"));
}

TEST_CASE("sharded checkpoints resolve names through the index, and refuse shards outside the directory") {
  TempDir dir;
  neva::write_safetensors((dir.path() / "model-00001-of-00002.safetensors").string(), {{"a", torch::ones({2})}});
  neva::write_safetensors((dir.path() / "model-00002-of-00002.safetensors").string(), {{"b", torch::zeros({3})}});
  dir.write("model.safetensors.index.json",
            R"({"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}})");
  SafetensorsCheckpoint checkpoint(dir.path().string());
  CHECK(checkpoint.names() == std::vector<std::string>{"a", "b"});
  CHECK(checkpoint.tensor("b", {3}).sum().item<float>() == 0);
  CHECK_THROWS_WITH_AS(checkpoint.tensor("b", {4}),
                       doctest::Contains("tensor 'b' has shape [3], expected [4]"), neva::Error);
  CHECK_THROWS_WITH_AS(checkpoint.tensor("c"), doctest::Contains(": missing tensor 'c'"), neva::Error);

  dir.write("model.safetensors.index.json", R"({"weight_map":{"a":"../model-00001-of-00002.safetensors"}})");
  CHECK_THROWS_WITH_AS(SafetensorsCheckpoint(dir.path().string()),
                       doctest::Contains("which is not a file name in the checkpoint directory"), neva::Error);
  dir.write("model.safetensors.index.json", R"({"weight_map":{"b":"model-00001-of-00002.safetensors"}})");
  CHECK_THROWS_WITH_AS(SafetensorsCheckpoint(dir.path().string()),
                       doctest::Contains("puts 'b' in model-00001-of-00002.safetensors, which does not hold it"),
                       neva::Error);
}

TEST_CASE("a missing checkpoint is named") {
  CHECK_THROWS_WITH_AS(SafetensorsCheckpoint("/nonexistent/model"), "/nonexistent/model: no such file or directory",
                       neva::Error);
}

TEST_CASE("writing is atomic: a write that fails midway leaves the previous file whole and no temporary") {
  TempDir dir;
  auto path = (dir.path() / "m.safetensors").string();
  neva::write_safetensors(path, {{"x", torch::ones({2})}});
  {
    // A file-size limit makes write(2) fail with EFBIG after 4 KiB of the new 400 KB file: a disk
    // filling up in the middle of the tensor data.
    rlimit previous{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &previous) == 0);
    rlimit low = previous;
    low.rlim_cur = 4096;
    auto previous_handler = std::signal(SIGXFSZ, SIG_IGN);
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &low) == 0);
    std::string error;
    try {
      neva::write_safetensors(path, {{"x", torch::ones({100000})}});
    } catch (const neva::Error& e) {
      error = e.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &previous);
    std::signal(SIGXFSZ, previous_handler);
    CHECK_MESSAGE(error.find("write failed") != std::string::npos, error);
  }
  CHECK(SafetensorsFile(path).tensor("x").numel() == 2);  // the old file, whole
  CHECK(SafetensorsFile(path).tensor("x").sum().item<float>() == 2);
  // A tensor list refused before writing (a duplicate name) changes nothing either.
  CHECK_THROWS_AS(neva::write_safetensors(path, {{"x", torch::ones({2})}, {"x", torch::ones({2})}}), neva::Error);
  std::size_t leftovers = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) leftovers += entry.path() != path;
  CHECK(leftovers == 0);  // no temporary file left behind
}

TEST_CASE("the streaming writer: header first, one tensor at a time in order(), checked, atomic") {
  TempDir dir;
  const auto path = (dir.path() / "s.safetensors").string();
  const std::vector<neva::SafetensorsWriter::Spec> specs = {
      {"b", at::kBFloat16, {3}}, {"a", at::kFloat, {2, 2}}, {"c", at::kDouble, {}}, {"d", at::kFloat, {0}}};
  {
    neva::SafetensorsWriter writer(path, specs, {{"format", "pt"}});
    // Descending alignment, then name: every tensor's data aligned.
    std::vector<std::string> order;
    for (const auto& spec : writer.order()) order.push_back(spec.name);
    CHECK(order == std::vector<std::string>{"c", "a", "d", "b"});
    writer.write(torch::tensor(2.5, at::kDouble));
    writer.write(torch::arange(4, at::kFloat).reshape({2, 2}).t());  // not contiguous: written as its values
    // A tensor unlike its spec is named; nothing is written for it.
    try {
      writer.write(torch::zeros({3}, at::kFloat));
      FAIL("expected an error");
    } catch (const neva::Error& error) {
      CHECK(contains(error.what(), "s.safetensors: tensor 'd' is Float [3], the header says Float [0]"));
    }
    writer.write(torch::zeros({0}, at::kFloat));
    CHECK(!std::filesystem::exists(path));  // not committed yet
    CHECK_THROWS_WITH_AS(writer.commit(), doctest::Contains("1 of 4 tensors not written"), neva::Error);
    writer.write(torch::ones({3}, at::kBFloat16));
    CHECK_THROWS_WITH_AS(writer.write(torch::ones({1})), doctest::Contains("more tensors written than the header lists"),
                         neva::Error);
    writer.commit();
  }
  SafetensorsFile file(path);
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.tensor("c").item<double>() == 2.5);
  CHECK(at::equal(file.tensor("a"), torch::arange(4, at::kFloat).reshape({2, 2}).t()));
  CHECK(file.tensor("d").numel() == 0);
  CHECK(at::equal(file.tensor("b"), torch::ones({3}, at::kBFloat16)));
  // Abandoned before commit: the earlier file stays, no temporary is left.
  {
    neva::SafetensorsWriter abandoned(path, {{"x", at::kFloat, {1}}});
    abandoned.write(torch::ones({1}));
  }
  CHECK(SafetensorsFile(path).contains("a"));
  std::size_t leftovers = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) leftovers += entry.path() != path;
  CHECK(leftovers == 0);
  CHECK_THROWS_WITH_AS(neva::SafetensorsWriter(path, {{"x", at::kComplexFloat, {1}}}),
                       doctest::Contains("tensor 'x' has dtype ComplexFloat, which safetensors cannot store"), neva::Error);
}
