// Typed field access for tokenizer.json / tokenizer_config.json: each getter throws a
// fathom::Error naming the place ("tokenizer.json: pre_tokenizer.pretokenizers[2]") and the
// field when it is missing or of the wrong type.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace fathom {

inline const nlohmann::json& json_field(const nlohmann::json& j, const char* key, const std::string& where) {
  FATHOM_CHECK(j.is_object(), where, " must be an object");
  auto it = j.find(key);
  FATHOM_CHECK(it != j.end(), where, " has no field \"", key, "\"");
  return *it;
}

inline std::string json_string(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto& v = json_field(j, key, where);
  FATHOM_CHECK(v.is_string(), where, ".", key, " must be a string");
  return v.get<std::string>();
}

inline bool json_bool(const nlohmann::json& j, const char* key, const std::string& where, bool fallback) {
  if (!j.is_object()) return fallback;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  FATHOM_CHECK(it->is_boolean(), where, ".", key, " must be true or false");
  return it->get<bool>();
}

inline const nlohmann::json& json_array(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto& v = json_field(j, key, where);
  FATHOM_CHECK(v.is_array(), where, ".", key, " must be an array");
  return v;
}

inline const nlohmann::json& json_object(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto& v = json_field(j, key, where);
  FATHOM_CHECK(v.is_object(), where, ".", key, " must be an object");
  return v;
}

}  // namespace fathom
