// Jinja values (Python semantics for str/repr/==/json.dumps) and the public Template API.
#include "tokenizer/jinja.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "tokenizer/jinja_ast.h"

namespace fathom::jinja {

int Value::depth() const {
  if (is_list()) return list().depth;
  if (is_dict()) return dict().depth;
  return 1;
}

const Value* DictData::find(const std::string& key) const {
  for (const auto& [k, v] : items)
    if (k == key) return &v;
  return nullptr;
}

const Value* NamespaceData::find(const std::string& key) const {
  for (const auto& [k, v] : attrs)
    if (k == key) return &v;
  return nullptr;
}

void NamespaceData::set(const std::string& key, Value value) {
  for (auto& [k, v] : attrs)
    if (k == key) {
      v = std::move(value);
      return;
    }
  attrs.emplace_back(key, std::move(value));
}

Value make_list(std::vector<Value> items, int max_depth, bool is_tuple) {
  auto data = std::make_shared<ListData>();
  for (const Value& v : items) data->depth = std::max(data->depth, v.depth() + 1);
  FATHOM_CHECK(data->depth <= max_depth, "a list is nested deeper than ", max_depth, " levels");
  data->items = std::move(items);
  data->is_tuple = is_tuple;
  return Value(Value::List(std::move(data)));
}

Value make_dict(Items items, int max_depth) {
  auto data = std::make_shared<DictData>();
  for (const auto& kv : items) data->depth = std::max(data->depth, kv.second.depth() + 1);
  FATHOM_CHECK(data->depth <= max_depth, "a dict is nested deeper than ", max_depth, " levels");
  data->items = std::move(items);
  return Value(Value::Dict(std::move(data)));
}

bool truthy(const Value& v) {
  if (v.is_undefined() || v.is_none()) return false;
  if (v.is_bool()) return v.as_bool();
  if (v.is_int()) return v.as_int() != 0;
  if (v.is_float()) return v.as_float() != 0.0;
  if (v.is_string()) return !v.str().empty();
  if (v.is_list()) return !v.list().items.empty();
  if (v.is_dict()) return !v.dict().items.empty();
  return true;  // namespaces and functions
}

std::string type_name(const Value& v) {
  if (v.is_undefined()) return "Undefined";
  if (v.is_none()) return "NoneType";
  if (v.is_bool()) return "bool";
  if (v.is_int()) return "int";
  if (v.is_float()) return "float";
  if (v.is_string()) return "str";
  if (v.is_list()) return v.list().is_tuple ? "tuple" : "list";
  if (v.is_dict()) return "dict";
  if (v.is_namespace()) return "Namespace";
  return "function";
}

// Python's float repr: the shortest digits that round-trip, fixed notation for decimal
// exponents in [-4, 16), scientific otherwise, and always a '.0' or exponent.
std::string format_float(double f) {
  if (std::isnan(f)) return "nan";
  if (std::isinf(f)) return f > 0 ? "inf" : "-inf";
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*e", precision - 1, f);
    if (std::strtod(buf, nullptr) == f) break;
  }
  // buf is "-d.ddde+XX": split digits and exponent.
  std::string s = buf;
  bool negative = s[0] == '-';
  if (negative) s.erase(0, 1);
  size_t e = s.find('e');
  int exponent = std::atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (s[i] != '.') digits += s[i];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exponent >= -4 && exponent < 16) {
    if (exponent < 0) {
      out = "0.";
      out.append(size_t(-exponent - 1), '0');
      out += digits;
    } else if (size_t(exponent) + 1 >= digits.size()) {
      out = digits + std::string(size_t(exponent) + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, size_t(exponent) + 1) + "." + digits.substr(size_t(exponent) + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) {
      out += '.';
      out.append(digits, 1, std::string::npos);
    }
    char exp_buf[16];
    std::snprintf(exp_buf, sizeof exp_buf, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += exp_buf;
  }
  return negative ? "-" + out : out;
}

std::vector<std::string> code_points(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    size_t n = 1;
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0xF0) n = 4;
    else if (c >= 0xE0) n = 3;
    else if (c >= 0xC0) n = 2;
    n = std::min(n, s.size() - i);
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

// Python's str repr: single quotes unless the text has ' and no ".
static std::string repr_string(const std::string& s) {
  char quote = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, quote);
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (ch == quote || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (ch == '\n') {
      out += "\\n";
    } else if (ch == '\r') {
      out += "\\r";
    } else if (ch == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + quote;
}

static void repr_items(const Items& items, std::string& out) {
  bool first = true;
  for (const auto& [k, v] : items) {
    if (!first) out += ", ";
    first = false;
    out += repr_string(k) + ": " + repr(v);
  }
}

std::string repr(const Value& v) {
  if (v.is_string()) return repr_string(v.str());
  if (v.is_list()) {
    const ListData& l = v.list();
    std::string out = l.is_tuple ? "(" : "[";
    for (size_t i = 0; i < l.items.size(); ++i) out += (i ? ", " : "") + repr(l.items[i]);
    if (l.is_tuple && l.items.size() == 1) out += ",";
    return out + (l.is_tuple ? ")" : "]");
  }
  if (v.is_dict()) {
    std::string out = "{";
    repr_items(v.dict().items, out);
    return out + "}";
  }
  if (v.is_namespace()) {
    std::string out = "<Namespace {";
    repr_items(v.ns().attrs, out);
    return out + "}>";
  }
  return to_str(v);
}

std::string to_str(const Value& v) {
  if (v.is_undefined()) return "";
  if (v.is_none()) return "None";
  if (v.is_bool()) return v.as_bool() ? "True" : "False";
  if (v.is_int()) return std::to_string(v.as_int());
  if (v.is_float()) return format_float(v.as_float());
  if (v.is_string()) return v.str();
  if (v.is_builtin()) return "<built-in function " + v.builtin().name + ">";
  return repr(v);
}

bool equals(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) return a.as_float() == b.as_float();
    return a.as_int() == b.as_int();
  }
  if (a.is_undefined() || b.is_undefined()) return a.is_undefined() && b.is_undefined();
  if (a.is_none() || b.is_none()) return a.is_none() && b.is_none();
  if (a.is_string() && b.is_string()) return a.str() == b.str();
  if (a.is_list() && b.is_list()) {
    const auto& x = a.list().items;
    const auto& y = b.list().items;
    if (x.size() != y.size() || a.list().is_tuple != b.list().is_tuple) return false;
    for (size_t i = 0; i < x.size(); ++i)
      if (!equals(x[i], y[i])) return false;
    return true;
  }
  if (a.is_dict() && b.is_dict()) {
    const auto& x = a.dict();
    const auto& y = b.dict();
    if (x.items.size() != y.items.size()) return false;
    for (const auto& [k, v] : x.items) {
      const Value* other = y.find(k);
      if (!other || !equals(v, *other)) return false;
    }
    return true;
  }
  if (a.is_namespace() && b.is_namespace()) return a.ns_ptr() == b.ns_ptr();
  if (a.is_builtin() && b.is_builtin()) return a.builtin().name == b.builtin().name;
  return false;
}

bool contains_namespace(const Value& v) {
  if (v.is_namespace()) return true;
  if (v.is_list())
    return std::any_of(v.list().items.begin(), v.list().items.end(), contains_namespace);
  if (v.is_dict())
    for (const auto& kv : v.dict().items)
      if (contains_namespace(kv.second)) return true;
  return false;
}

// json.dumps string escaping: ", \, and control characters; non-ASCII stays as UTF-8
// unless ensure_ascii, which writes \uXXXX (surrogate pairs above the BMP).
static void json_string(const std::string& s, bool ensure_ascii, std::string& out) {
  out += '"';
  for (size_t i = 0; i < s.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    char buf[16];
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20 || (ensure_ascii && c == 0x7F)) {
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else if (c >= 0x80 && ensure_ascii) {
          size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
          uint32_t cp = n == 4 ? c & 0x07 : n == 3 ? c & 0x0F : n == 2 ? c & 0x1F : c;
          for (size_t k = 1; k < n && i + k < s.size(); ++k)
            cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
          i += std::min(n, s.size() - i) - 1;
          if (cp >= 0x10000) {
            cp -= 0x10000;
            std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
          } else {
            std::snprintf(buf, sizeof buf, "\\u%04x", cp);
          }
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

static void json_value(const Value& v, int indent, bool sort_keys, bool ensure_ascii, int level,
                       std::string& out) {
  // With an indent, json.dumps puts each element on its own line and uses "," not ", ".
  auto newline = [&](int lvl) {
    if (indent < 0) return;
    out += '\n';
    out.append(size_t(indent) * size_t(lvl), ' ');
  };
  const char* item_sep = indent >= 0 ? "," : ", ";
  if (v.is_none()) {
    out += "null";
  } else if (v.is_bool()) {
    out += v.as_bool() ? "true" : "false";
  } else if (v.is_int()) {
    out += std::to_string(v.as_int());
  } else if (v.is_float()) {
    double f = v.as_float();
    out += std::isnan(f) ? "NaN" : std::isinf(f) ? (f > 0 ? "Infinity" : "-Infinity") : format_float(f);
  } else if (v.is_string()) {
    json_string(v.str(), ensure_ascii, out);
  } else if (v.is_list()) {
    const auto& items = v.list().items;
    if (items.empty()) {
      out += "[]";
      return;
    }
    out += '[';
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out += item_sep;
      newline(level + 1);
      json_value(items[i], indent, sort_keys, ensure_ascii, level + 1, out);
    }
    newline(level);
    out += ']';
  } else if (v.is_dict() || v.is_namespace()) {
    if (v.is_namespace()) throw Error("tojson cannot serialize a namespace object");
    Items items = v.dict().items;
    if (items.empty()) {
      out += "{}";
      return;
    }
    if (sort_keys)
      std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    out += '{';
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out += item_sep;
      newline(level + 1);
      json_string(items[i].first, ensure_ascii, out);
      out += ": ";
      json_value(items[i].second, indent, sort_keys, ensure_ascii, level + 1, out);
    }
    newline(level);
    out += '}';
  } else {
    throw Error(cat("tojson cannot serialize a value of type ", type_name(v)));
  }
}

std::string to_json(const Value& v, int indent, bool sort_keys, bool ensure_ascii) {
  std::string out;
  json_value(v, indent, sort_keys, ensure_ascii, 0, out);
  return out;
}

// ---- public API

Template Template::parse(const std::string& source, const std::string& name, const Options& options) {
  Template t;
  t.program_ = parse_program(source, name, options);
  return t;
}

template <typename Json>
static std::string render_json(const Program& program, const Json& context) {
  FATHOM_CHECK(context.is_object(), program.name, ": the render context must be a JSON object, not ",
               context.type_name());
  Items globals;
  int max_depth = program.options.limits.max_depth;
  for (auto it = context.begin(); it != context.end(); ++it)
    globals.emplace_back(it.key(), value_from_json(it.value(), max_depth, 2));
  return render_program(program, globals);
}

std::string Template::render(const nlohmann::json& context) const { return render_json(*program_, context); }
std::string Template::render(const nlohmann::ordered_json& context) const {
  return render_json(*program_, context);
}
const std::string& Template::name() const { return program_->name; }

}  // namespace fathom::jinja
