// Decoders turn each token back into the bytes it stands for (HF `decoder`): ByteLevel maps
// the byte-level alphabet back to bytes; Replace, ByteFallback (<0x41> → 'A'), Fuse, Strip
// and Metaspace (▁ → space) cover sentencepiece-style vocabularies. Applied token by token,
// which is what lets StreamDecoder emit text as ids arrive.
#pragma once
#include <memory>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace fathom {

class Decoder {
 public:
  virtual ~Decoder() = default;
  // `token`: the token's text, rewritten in place to its bytes; `first`: it starts the output.
  virtual void apply(std::string& token, bool first) const = 0;
};

// nullptr for null (tokens are output as written).
std::unique_ptr<Decoder> parse_decoder(const nlohmann::json& j, const std::string& where);

}  // namespace fathom
