// Normalizers rewrite text before it is cut and encoded (HF `normalizer`). DeepSeek's is an
// empty Sequence; fathom also implements Replace, Prepend and Strip and names any other type.
#pragma once
#include <memory>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace fathom {

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void apply(std::string& text) const = 0;
};

// nullptr when the normalizer does nothing (null, or a Sequence of nothing).
std::unique_ptr<Normalizer> parse_normalizer(const nlohmann::json& j, const std::string& where);

}  // namespace fathom
