// The renderer's built-ins: string methods (strip, split, replace, ...), filters and tests,
// with Python's semantics where templates rely on them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <ctime>

#include "tokenizer/jinja_renderer.h"

namespace fathom::jinja {

std::string Renderer::strip_chars(const std::string& s, const Value* chars, bool left, bool right) {
  std::vector<std::string> cps = code_points(s);
  std::vector<std::string> set;
  if (chars && !chars->is_none()) {
    if (!chars->is_string()) fail("strip() takes a string of characters");
    set = code_points(chars->str());
  } else {
    for (const char* w = kWhitespace; *w; ++w) set.emplace_back(1, *w);
  }
  auto in_set = [&](const std::string& c) { return std::find(set.begin(), set.end(), c) != set.end(); };
  size_t begin = 0, end = cps.size();
  while (left && begin < end && in_set(cps[begin])) ++begin;
  while (right && end > begin && in_set(cps[end - 1])) --end;
  std::string out;
  for (size_t i = begin; i < end; ++i) out += cps[i];
  return out;
}

Value Renderer::split(const std::string& s, const Value* sep_value, const Value* maxsplit_value) {
  int64_t maxsplit = maxsplit_value && maxsplit_value->is_int() ? maxsplit_value->as_int() : -1;
  std::vector<Value> parts;
  if (!sep_value || sep_value->is_none()) {  // runs of whitespace, no empty parts
    size_t i = s.find_first_not_of(kWhitespace);
    while (i != std::string::npos) {
      if (maxsplit >= 0 && int64_t(parts.size()) == maxsplit) {
        parts.emplace_back(s.substr(i, s.find_last_not_of(kWhitespace) + 1 - i));
        break;
      }
      size_t j = s.find_first_of(kWhitespace, i);
      parts.emplace_back(s.substr(i, j == std::string::npos ? std::string::npos : j - i));
      i = j == std::string::npos ? j : s.find_first_not_of(kWhitespace, j);
    }
  } else {
    if (!sep_value->is_string()) fail("split() separator must be a string");
    const std::string& sep = sep_value->str();
    if (sep.empty()) fail("split() separator is empty");
    size_t i = 0;
    while (true) {
      size_t j = s.find(sep, i);
      if (j == std::string::npos || (maxsplit >= 0 && int64_t(parts.size()) == maxsplit)) {
        parts.emplace_back(s.substr(i));
        break;
      }
      parts.emplace_back(s.substr(i, j - i));
      i = j + sep.size();
    }
  }
  charge(s.size());
  return new_list(std::move(parts));
}

std::string Renderer::replace_all(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
  std::string out;
  size_t i = 0;
  for (int64_t done = 0; count < 0 || done < count; ++done) {
    if (from.empty()) {  // Python inserts `to` between every character
      if (i > s.size()) break;
      out += to;
      if (i == s.size()) { ++i; break; }
      size_t n = code_points(s.substr(i, 4))[0].size();
      out += s.substr(i, n);
      i += n;
      continue;
    }
    size_t j = s.find(from, i);
    if (j == std::string::npos) break;
    out += s.substr(i, j - i) + to;
    i = j + from.size();
  }
  if (i < s.size()) out += s.substr(i);
  return out;
}

std::string Renderer::ascii_case(std::string s, bool upper) {
  for (char& c : s)
    c = upper ? char(std::toupper(static_cast<unsigned char>(c))) : char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool Renderer::call_method(const Value& obj, const std::string& name, const Args& args, Value& result) {
  if (obj.is_string()) {
    const std::string& s = obj.str();
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      result = new_str(strip_chars(s, args.get(0, "chars"), name != "rstrip", name != "lstrip"));
    } else if (name == "split") {
      result = split(s, args.get(0, "sep"), args.get(1, "maxsplit"));
    } else if (name == "startswith" || name == "endswith") {
      const Value* arg = args.get(0, "prefix");
      if (!arg) fail(cat(name, "() takes a string"));
      std::vector<Value> options = arg->is_list() ? arg->list().items : std::vector<Value>{*arg};
      bool hit = false;
      for (const Value& o : options) {
        if (!o.is_string()) fail(cat(name, "() takes strings, not ", type_name(o)));
        const std::string& p = o.str();
        hit = hit || (p.size() <= s.size() &&
                      (name == "startswith" ? s.compare(0, p.size(), p) == 0 : s.compare(s.size() - p.size(), p.size(), p) == 0));
      }
      result = Value(hit);
    } else if (name == "replace") {
      const Value* from = args.get(0, "old");
      const Value* to = args.get(1, "new");
      const Value* count = args.get(2, "count");
      if (!from || !to || !from->is_string() || !to->is_string()) fail("replace() takes two strings");
      result = new_str(replace_all(s, from->str(), to->str(), count && count->is_int() ? count->as_int() : -1));
    } else if (name == "upper" || name == "lower") {
      result = new_str(ascii_case(s, name == "upper"));
    } else if (name == "title" || name == "capitalize") {
      std::string out = ascii_case(s, false);
      bool start = true;
      for (char& c : out) {
        bool letter = std::isalpha(static_cast<unsigned char>(c));
        if (letter && start) c = char(std::toupper(static_cast<unsigned char>(c)));
        start = name == "title" ? !letter : false;
      }
      result = new_str(std::move(out));
    } else if (name == "find" || name == "count") {
      const Value* sub = args.get(0, "sub");
      if (!sub || !sub->is_string()) fail(cat(name, "() takes a string"));
      if (name == "find") {
        size_t at = s.find(sub->str());
        result = Value(at == std::string::npos ? int64_t{-1} : int64_t(code_points(s.substr(0, at)).size()));
      } else {
        result = Value(int64_t(sub->str().empty() ? code_points(s).size() + 1 : 0));
        for (size_t at = s.find(sub->str()); !sub->str().empty() && at != std::string::npos; at = s.find(sub->str(), at + sub->str().size()))
          result = Value(result.as_int() + 1);
      }
    } else if (name == "join") {
      const Value* seq = args.get(0, "iterable");
      if (!seq) fail("join() takes an iterable");
      std::string out;
      bool first = true;
      for (const Value& v : iterate(*seq)) {
        if (!v.is_string()) fail(cat("join() takes strings, not ", type_name(v)));
        out += (first ? "" : s) + v.str();
        first = false;
      }
      result = new_str(std::move(out));
    } else if (name == "isdigit" || name == "isalpha" || name == "isspace") {
      auto pred = name == "isdigit" ? ::isdigit : name == "isalpha" ? ::isalpha : ::isspace;
      result = Value(!s.empty() && std::all_of(s.begin(), s.end(), [&](char c) { return pred(static_cast<unsigned char>(c)) != 0; }));
    } else {
      return false;
    }
    return true;
  }
  if (obj.is_dict()) {
    const DictData& d = obj.dict();
    if (name == "get") {
      const Value* key = args.get(0, "key");
      const Value* dflt = args.get(1, "default");
      const Value* found = key && key->is_string() ? d.find(key->str()) : nullptr;
      result = found ? *found : dflt ? *dflt : Value(None{});
    } else if (name == "items" || name == "keys" || name == "values") {
      std::vector<Value> out;
      for (const auto& [k, v] : d.items) {
        if (name == "items") out.push_back(new_list({Value(k), v}, true));
        else out.push_back(name == "keys" ? Value(k) : v);
      }
      result = new_list(std::move(out));
    } else {
      return false;
    }
    return true;
  }
  return false;
}


Value Renderer::apply_filter(const std::string& name, const Value& v, const Args& args) {
  auto arg_str = [&](size_t i, const char* key, const char* dflt) -> std::string {
    const Value* a = args.get(i, key);
    if (!a) return dflt;
    if (!a->is_string()) fail(cat("filter '", name, "' takes a string for '", key, "', not ", type_name(*a)));
    return a->str();
  };
  if (name == "default" || name == "d") {
    const Value* dflt = args.get(0, "default_value");
    const Value* boolean = args.get(1, "boolean");
    bool use_default = v.is_undefined() || (boolean && truthy(*boolean) && !truthy(v));
    return use_default ? (dflt ? *dflt : Value(std::string())) : v;
  }
  if (name == "safe") return v;
  if (name == "string") return v.is_string() ? v : new_str(to_str(v));
  if (name == "length" || name == "count") {
    if (v.is_undefined()) return Value(0);
    if (v.is_string()) return Value(int64_t(code_points(v.str()).size()));
    if (v.is_list()) return Value(int64_t(v.list().items.size()));
    if (v.is_dict()) return Value(int64_t(v.dict().items.size()));
    fail(cat("object of type '", type_name(v), "' has no length"));
  }
  if (name == "trim") return new_str(strip_chars(to_str(v), args.get(0, "chars"), true, true));
  if (name == "upper" || name == "lower") return new_str(ascii_case(to_str(v), name == "upper"));
  if (name == "capitalize") {
    std::string s = ascii_case(to_str(v), false);
    if (!s.empty()) s[0] = char(std::toupper(static_cast<unsigned char>(s[0])));
    return new_str(std::move(s));
  }
  if (name == "title") {  // jinja2 starts words after whitespace, '-', and opening brackets
    std::string s = to_str(v), out;
    bool start = true;
    for (char c : s) {
      bool boundary = std::strchr(" \t\n\r\f\v-([{<", c) != nullptr && c != 0;
      out += start && !boundary ? char(std::toupper(static_cast<unsigned char>(c))) : char(std::tolower(static_cast<unsigned char>(c)));
      start = boundary;
    }
    return new_str(std::move(out));
  }
  if (name == "replace") {
    const Value* count = args.get(2, "count");
    return new_str(replace_all(to_str(v), arg_str(0, "old", ""), arg_str(1, "new", ""),
                               count && count->is_int() ? count->as_int() : -1));
  }
  if (name == "join") {
    std::string sep = arg_str(0, "d", "");
    const Value* attribute = args.get(1, "attribute");
    std::string out;
    bool first = true;
    for (const Value& item : iterate(v)) {
      Value x = attribute ? get_item(item, *attribute, Expr{}) : item;
      out += (first ? "" : sep) + to_str(x);
      first = false;
      if (out.size() > lim_.max_output_bytes) fail(cat("a string grew beyond ", lim_.max_output_bytes, " bytes"));
    }
    return new_str(std::move(out));
  }
  if (name == "first" || name == "last") {
    std::vector<Value> items = iterate(v);
    if (items.empty()) return Value();
    return name == "first" ? items.front() : items.back();
  }
  if (name == "list") return v.is_list() && !v.list().is_tuple ? v : new_list(iterate(v));
  if (name == "reverse") {
    if (v.is_string()) {
      std::vector<std::string> cps = code_points(v.str());
      std::string out;
      for (auto it = cps.rbegin(); it != cps.rend(); ++it) out += *it;
      return new_str(std::move(out));
    }
    std::vector<Value> items = iterate(v);
    std::reverse(items.begin(), items.end());
    return new_list(std::move(items));
  }
  if (name == "items") {
    if (v.is_undefined()) return new_list({});
    if (!v.is_dict()) fail(cat("filter 'items' needs a dict, not ", type_name(v)));
    std::vector<Value> out;
    for (const auto& [k, x] : v.dict().items) out.push_back(new_list({Value(k), x}, true));
    return new_list(std::move(out));
  }
  if (name == "int" || name == "float") {
    const Value* dflt = args.get(0, "default");
    Value fallback = dflt ? *dflt : name == "int" ? Value(0) : Value(0.0);
    double f = 0;
    if (v.is_number()) {
      f = v.as_float();
      if (name == "int" && !v.is_float()) return Value(v.as_int());
    } else if (v.is_string()) {
      std::string s = strip_chars(v.str(), nullptr, true, true);
      char* end = nullptr;
      errno = 0;
      long long i = std::strtoll(s.c_str(), &end, 10);
      if (!s.empty() && *end == 0 && errno == 0) return name == "int" ? Value(int64_t(i)) : Value(double(i));
      f = std::strtod(s.c_str(), &end);
      if (s.empty() || *end != 0) return fallback;
    } else {
      return fallback;
    }
    if (name == "float") return Value(f);
    if (!std::isfinite(f) || std::fabs(f) >= 9.2e18) return fallback;
    return Value(int64_t(f));
  }
  if (name == "abs") {
    if (!v.is_number()) fail(cat("bad operand type for abs(): '", type_name(v), "'"));
    if (v.is_float()) return Value(std::fabs(v.as_float()));
    if (v.as_int() == INT64_MIN) fail("integer overflow");
    return Value(v.as_int() < 0 ? -v.as_int() : v.as_int());
  }
  if (name == "tojson") {
    for (const auto& [k, x] : args.kw)
      if (k != "indent" && k != "sort_keys" && k != "ensure_ascii")
        fail(cat("filter 'tojson' does not support the argument '", k, "'"));
    const Value* indent = args.get(0, "indent");
    const Value* ensure_ascii = args.get(1, "ensure_ascii");
    const Value* sort_keys = args.get(3, "sort_keys");
    int64_t spaces = indent && (indent->is_int() || indent->is_bool()) ? indent->as_int() : -1;
    if (spaces > 64) fail("tojson indent is larger than 64");
    std::string json = to_json(v, int(spaces < 0 ? -1 : spaces), sort_keys && truthy(*sort_keys),
                               ensure_ascii && truthy(*ensure_ascii));
    return new_str(std::move(json));
  }
  if (name == "map" || name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    std::vector<Value> out;
    const Value* attribute = args.get(name == "map" ? 99 : 0, "attribute");
    for (const Value& item : iterate(v)) {
      if (name == "map") {
        if (attribute) {
          Value x = get_item(item, *attribute, Expr{});
          const Value* dflt = args.get(99, "default");
          out.push_back(x.is_undefined() && dflt ? *dflt : x);
        } else {
          if (args.pos.empty() || !args.pos[0].is_string()) fail("filter 'map' takes a filter name or attribute=");
          Args rest{std::vector<Value>(args.pos.begin() + 1, args.pos.end()), args.kw};
          out.push_back(apply_filter(args.pos[0].str(), item, rest));
        }
        continue;
      }
      bool by_attr = name == "selectattr" || name == "rejectattr";
      if (by_attr && (!attribute || !attribute->is_string())) fail(cat("filter '", name, "' takes an attribute name"));
      Value x = by_attr ? get_item(item, *attribute, Expr{}) : item;
      size_t test_at = by_attr ? 1 : 0;
      bool ok;
      if (args.pos.size() > test_at) {
        if (!args.pos[test_at].is_string()) fail(cat("filter '", name, "' takes a test name"));
        Args rest{std::vector<Value>(args.pos.begin() + long(test_at) + 1, args.pos.end()), {}};
        ok = apply_test(args.pos[test_at].str(), x, rest);
      } else {
        ok = truthy(x);
      }
      if (ok == (name == "select" || name == "selectattr")) out.push_back(item);
    }
    return new_list(std::move(out));
  }
  fail(cat("unknown filter '", name, "'"));
}

bool Renderer::apply_test(const std::string& name, const Value& v, const Args& args) {
  const Value* arg = args.get(0, "value");
  auto need_arg = [&]() -> const Value& {
    if (!arg) fail(cat("test '", name, "' needs an argument"));
    return *arg;
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.as_bool();
  if (name == "false") return v.is_bool() && !v.as_bool();
  if (name == "string") return v.is_string();
  if (name == "number") return v.is_int() || v.is_float();
  if (name == "integer") return v.is_int();
  if (name == "float") return v.is_float();
  if (name == "mapping") return v.is_dict();
  if (name == "sequence") return v.is_list() || v.is_string() || v.is_dict();
  if (name == "iterable") return v.is_list() || v.is_string() || v.is_dict() || v.is_undefined();
  if (name == "callable") return v.is_builtin();
  if (name == "lower" || name == "upper") {
    if (!v.is_string()) return false;
    std::string s = to_str(v);
    return ascii_case(s, name == "upper") == s && ascii_case(s, name != "upper") != s;
  }
  if (name == "odd" || name == "even" || name == "divisibleby") {
    if (!v.is_int() && !v.is_bool()) fail(cat("test '", name, "' needs an integer, not ", type_name(v)));
    if (name != "divisibleby") return (v.as_int() % 2 != 0) == (name == "odd");
    const Value& d = need_arg();
    if (!d.is_int() || d.as_int() == 0) fail("test 'divisibleby' needs a non-zero integer");
    return d.as_int() == -1 || v.as_int() % d.as_int() == 0;
  }
  if (name == "sameas") {
    const Value& o = need_arg();
    if (v.is_namespace() && o.is_namespace()) return v.ns_ptr() == o.ns_ptr();
    return (v.is_none() && o.is_none()) || (v.is_bool() && o.is_bool() && v.as_bool() == o.as_bool());
  }
  if (name == "in") return contains(need_arg(), v);
  static const std::pair<const char*, const char*> ops[] = {
      {"eq", "=="}, {"equalto", "=="}, {"==", "=="}, {"ne", "!="}, {"!=", "!="}, {"lt", "<"}, {"lessthan", "<"},
      {"<", "<"}, {"le", "<="}, {"<=", "<="}, {"gt", ">"}, {"greaterthan", ">"}, {">", ">"}, {"ge", ">="}, {">=", ">="}};
  for (const auto& [test, op] : ops)
    if (name == test) return compare(op, v, need_arg());
  fail(cat("unknown test '", name, "'"));
}

}  // namespace fathom::jinja
