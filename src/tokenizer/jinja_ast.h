// Internals of the Jinja interpreter shared by jinja.cpp (values), jinja_parse.cpp (lexer
// and parser) and the evaluator (jinja_renderer.h: jinja_eval.cpp, jinja_builtins.cpp). Not
// part of the public API.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "core/error.h"
#include "tokenizer/jinja.h"

namespace fathom::jinja {

// ---- values: Python's object model, restricted to what templates need.
struct Undefined {};  // a missing variable/key: renders "", falsy, iterates as empty
struct None {};       // Python None / JSON null
struct ListData;
struct DictData;
struct NamespaceData;
struct Builtin { std::string name; };  // a global function (range, namespace, raise_exception...)

class Value {
 public:
  using Str = std::shared_ptr<const std::string>;  // shared: copying values is cheap
  using List = std::shared_ptr<const ListData>;    // lists and dicts are immutable
  using Dict = std::shared_ptr<const DictData>;
  using Namespace = std::shared_ptr<NamespaceData>;  // the one mutable, shared object

  Value() = default;
  Value(None) : v_(None{}) {}
  Value(bool b) : v_(b) {}
  Value(int64_t i) : v_(i) {}
  Value(int i) : v_(int64_t{i}) {}
  Value(double f) : v_(f) {}
  Value(std::string s) : v_(std::make_shared<const std::string>(std::move(s))) {}
  Value(const char* s) : Value(std::string(s)) {}
  Value(Str s) : v_(std::move(s)) {}
  Value(List l) : v_(std::move(l)) {}
  Value(Dict d) : v_(std::move(d)) {}
  Value(Namespace n) : v_(std::move(n)) {}
  Value(Builtin b) : v_(std::move(b)) {}

  bool is_undefined() const { return std::holds_alternative<Undefined>(v_); }
  bool is_none() const { return std::holds_alternative<None>(v_); }
  bool is_bool() const { return std::holds_alternative<bool>(v_); }
  bool is_int() const { return std::holds_alternative<int64_t>(v_); }
  bool is_float() const { return std::holds_alternative<double>(v_); }
  bool is_number() const { return is_int() || is_float() || is_bool(); }
  bool is_string() const { return std::holds_alternative<Str>(v_); }
  bool is_list() const { return std::holds_alternative<List>(v_); }
  bool is_dict() const { return std::holds_alternative<Dict>(v_); }
  bool is_namespace() const { return std::holds_alternative<Namespace>(v_); }
  bool is_builtin() const { return std::holds_alternative<Builtin>(v_); }

  bool as_bool() const { return std::get<bool>(v_); }
  int64_t as_int() const { return is_bool() ? int64_t{as_bool()} : std::get<int64_t>(v_); }
  double as_float() const { return is_float() ? std::get<double>(v_) : double(as_int()); }
  const std::string& str() const { return *std::get<Str>(v_); }
  const Str& str_ptr() const { return std::get<Str>(v_); }
  const ListData& list() const { return *std::get<List>(v_); }
  const DictData& dict() const { return *std::get<Dict>(v_); }
  NamespaceData& ns() const { return *std::get<Namespace>(v_); }
  const Namespace& ns_ptr() const { return std::get<Namespace>(v_); }
  const Builtin& builtin() const { return std::get<Builtin>(v_); }

  // Nesting depth of lists/dicts (1 for scalars), kept to bound recursion.
  int depth() const;

 private:
  std::variant<Undefined, None, bool, int64_t, double, Str, List, Dict, Namespace, Builtin> v_;
};

using Items = std::vector<std::pair<std::string, Value>>;  // insertion-ordered like a Python dict

struct ListData {
  std::vector<Value> items;
  bool is_tuple = false;  // only changes the repr: (a, b) instead of [a, b]
  int depth = 1;
};
struct DictData {
  Items items;  // keys are strings; JSON gives nothing else
  int depth = 1;
  const Value* find(const std::string& key) const;
};
struct NamespaceData {
  Items attrs;
  const Value* find(const std::string& key) const;
  void set(const std::string& key, Value value);
};

// Builders that compute the nesting depth and refuse values deeper than max_depth.
Value make_list(std::vector<Value> items, int max_depth, bool is_tuple = false);
Value make_dict(Items items, int max_depth);

bool truthy(const Value& v);
std::string type_name(const Value& v);       // Python's type name, for error messages
std::string to_str(const Value& v);          // Python str(): what {{ v }} prints
std::string repr(const Value& v);            // Python repr()
std::string format_float(double f);          // Python float repr: 0.1, 1.0, 1e+16
bool equals(const Value& a, const Value& b);  // Python ==
bool contains_namespace(const Value& v);
// json.dumps(v, ensure_ascii, indent, sort_keys); throws Error for values JSON lacks.
std::string to_json(const Value& v, int indent, bool sort_keys, bool ensure_ascii);

// UTF-8 helpers: Python strings index by code point.
std::vector<std::string> code_points(const std::string& s);

// ---- the syntax tree
struct Expr;
struct Stmt;
using ExprPtr = std::unique_ptr<Expr>;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Expr {
  enum class Kind {
    Literal, Name, List, Tuple, Dict,  // Dict: kids alternate key, value
    Attr, Item, Slice,                 // kids[0] is the object; Slice: start, stop, step may be null
    Call, Filter, Test,                // kids[0] callee/operand, kids[1..] args, plus kwargs
    Neg, Pos, Not, Binary, And, Or,    // Binary: op in `name`
    Compare,                           // kids[0] ops[0] kids[1] ops[1] kids[2] ...
    CondExpr,                          // kids: value, condition, else value (may be null)
  };
  Kind kind;
  int line;
  Value literal;
  std::string name;  // variable, attribute, filter, test or operator
  std::vector<ExprPtr> kids;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;
  bool negated = false;  // `is not`
};

struct Stmt {
  enum class Kind { Text, Output, If, For, Set, SetBlock, Break, Continue, Scope };
  Kind kind;
  int line;
  std::string text;                  // Text
  ExprPtr expr;                      // Output value, For iterable, Set value
  std::vector<ExprPtr> conds;        // If: one condition per branch
  std::vector<Body> bodies;          // If: one body per branch; For/SetBlock/Scope: bodies[0]
  Body else_body;                    // If and For
  std::vector<std::string> targets;  // For/Set/SetBlock: names (several = unpacking)
  std::string attr;                  // Set: `set ns.attr = ...`
  ExprPtr filter;                    // For: `for x in xs if cond`
};

struct Program {
  std::string name;
  Options options;
  Body body;
};

// jinja_lex.cpp: the source (newlines already normalised) as tokens, ending with Eof.
struct Token {
  enum Type { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };
  Type type;
  std::string text;  // Text/Name/String/Op contents
  int line;
  int64_t ival = 0;
  double fval = 0;
};
std::vector<Token> lex_template(std::string source, const std::string& name, const Options& options);

// jinja_parse.cpp
std::shared_ptr<const Program> parse_program(const std::string& source, const std::string& name,
                                             const Options& options);
// jinja_eval.cpp: `globals` holds the context variables.
std::string render_program(const Program& program, const Items& globals);

// Converts parsed JSON (either nlohmann flavour) to a Value, refusing deep nesting.
template <typename Json>
Value value_from_json(const Json& j, int max_depth, int depth = 1) {
  FATHOM_CHECK(depth <= max_depth, "template context is nested deeper than ", max_depth, " levels");
  switch (j.type()) {
    case Json::value_t::null: return Value(None{});
    case Json::value_t::boolean: return Value(j.template get<bool>());
    case Json::value_t::number_integer: return Value(j.template get<int64_t>());
    case Json::value_t::number_unsigned: {
      uint64_t u = j.template get<uint64_t>();
      if (u <= uint64_t(INT64_MAX)) return Value(int64_t(u));
      return Value(double(u));
    }
    case Json::value_t::number_float: return Value(j.template get<double>());
    case Json::value_t::string: return Value(j.template get<std::string>());
    case Json::value_t::array: {
      std::vector<Value> items;
      for (const auto& e : j) items.push_back(value_from_json(e, max_depth, depth + 1));
      return make_list(std::move(items), max_depth);
    }
    case Json::value_t::object: {
      Items items;
      for (auto it = j.begin(); it != j.end(); ++it)
        items.emplace_back(it.key(), value_from_json(it.value(), max_depth, depth + 1));
      return make_dict(std::move(items), max_depth);
    }
    default: throw Error("template context holds a binary or discarded JSON value");
  }
}

}  // namespace fathom::jinja
