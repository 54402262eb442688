// The renderer of the Jinja subset: its state and the evaluation steps, split over
// jinja_eval.cpp (statements and expressions) and jinja_builtins.cpp (methods, filters,
// tests). Internal to src/tokenizer; the public entry point is render_program (jinja_ast.h).
#pragma once
#include <string>
#include <vector>

#include "tokenizer/jinja_ast.h"

namespace fathom::jinja {

enum class Flow { Normal, Break, Continue };

// Call arguments: positional, then keyword.
struct Args {
  std::vector<Value> pos;
  Items kw;
  const Value* get(size_t index, const char* name) const {
    if (index < pos.size()) return &pos[index];
    for (const auto& [k, v] : kw)
      if (k == name) return &v;
    return nullptr;
  }
};

inline const char* const kWhitespace = " \t\n\r\f\v";

class Renderer {
 public:
  Renderer(const Program& program, const Items& globals)
      : prog_(program), lim_(program.options.limits), scopes_{globals} {}

  std::string run() {
    try {
      exec_body(prog_.body);
    } catch (const Error& e) {
      throw Error(cat(prog_.name, " line ", line_, ": ", e.what()));
    }
    return std::move(out_);
  }

 private:
  [[noreturn]] static void fail(const std::string& msg) { throw Error(msg); }

  // ---- resource accounting
  void charge(size_t bytes);
  Value new_str(std::string s);
  Value new_list(std::vector<Value> items, bool is_tuple = false);
  void emit(const std::string& s);

  // ---- variables
  Value lookup(const std::string& name) const;
  void assign(const std::string& name, Value v);

  // ---- statements
  Flow exec_body(const Body& body);
  Flow exec(const Stmt& s);
  void exec_set(const Stmt& s, Value v);
  std::vector<Value> unpack(const Value& v, size_t n);
  void bind_targets(const Stmt& s, const Value& item);
  void count_iteration();
  void exec_for(const Stmt& s);

  // The elements a for loop (or list filter) sees.
  std::vector<Value> iterate(const Value& v);

  // ---- expressions
  Value eval(const Expr& e);
  Args eval_args(const Expr& e);

  // jinja2's default Undefined: any use beyond printing, testing and iterating is an error.
  static void require_defined(const Value& v, const Expr& source);
  Value get_attr(const Value& obj, const std::string& name, const Expr& source);
  Value get_item(const Value& obj, const Value& key, const Expr& source);

  // Python slice semantics (PySlice_AdjustIndices) over list items or code points.
  Value eval_slice(const Expr& e);
  Value eval_call(const Expr& e);
  Value call_value(const Value& fn, const Args& args, const Expr& callee);

  // ---- operators
  Value eval_binary(const Expr& e);
  bool compare(const std::string& op, const Value& a, const Value& b);

  // Python ordering of numbers, strings and lists; anything else is a TypeError.
  int order(const Value& a, const Value& b, const std::string& op);
  bool contains(const Value& container, const Value& needle);

  // ---- methods of str and dict
  static std::string strip_chars(const std::string& s, const Value* chars, bool left, bool right);
  Value split(const std::string& s, const Value* sep_value, const Value* maxsplit_value);
  static std::string replace_all(const std::string& s, const std::string& from, const std::string& to, int64_t count);
  static std::string ascii_case(std::string s, bool upper);
  bool call_method(const Value& obj, const std::string& name, const Args& args, Value& result);

  // ---- filters and tests
  Value apply_filter(const std::string& name, const Value& v, const Args& args);
  bool apply_test(const std::string& name, const Value& v, const Args& args);
  const Program& prog_;
  const Limits& lim_;
  std::vector<Items> scopes_;
  std::string out_;
  int line_ = 1;
  int64_t iterations_ = 0;
  size_t work_ = 0;
};

}  // namespace fathom::jinja
