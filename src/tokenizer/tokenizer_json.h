// Reading tokenizer.json fast. The file is mostly one 128K-entry object (model.vocab) and one
// 128K-entry array (model.merges); building those as a JSON DOM costs most of a second, so a
// SAX pass moves them straight into vectors and builds a DOM only for the small rest.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace fathom {

struct TokenizerJson {
  nlohmann::json rest;  // the whole document except model.vocab and model.merges
  std::vector<std::pair<std::string, int64_t>> vocab;        // model.vocab in file order
  std::vector<std::pair<std::string, std::string>> merges;   // model.merges, either JSON form
  bool has_vocab = false, has_merges = false;
};

// Throws fathom::Error naming `what` for malformed JSON and for vocab/merges entries of the
// wrong shape.
TokenizerJson parse_tokenizer_json(std::string_view text, const std::string& what);

}  // namespace fathom
