#pragma once
// A training sample of random token ids for the tiny decoder (vocabulary 97), seeded: the first
// `prompt` tokens are not learned (kIgnoreIndex), the rest are their own labels.
#include <ATen/ATen.h>

#include <cstdint>

#include "neva/context.h"
#include "neva/data/dataset.h"
#include "neva/data/labels.h"

namespace neva::test {

inline TrainingSample random_sample(std::int64_t length, std::int64_t seed, std::int64_t prompt) {
  at::Generator generator = make_generator(seed);
  at::Tensor ids = at::randint(4, 97, {length}, generator, at::kLong);
  TrainingSample s;
  s.input_ids.assign(ids.data_ptr<std::int64_t>(), ids.data_ptr<std::int64_t>() + length);
  s.labels = s.input_ids;
  for (std::int64_t t = 0; t < prompt; ++t) s.labels[t] = kIgnoreIndex;
  return s;
}

}  // namespace neva::test
