// The evaluator: walks the syntax tree with Python semantics and writes the output.
//
// Scoping follows jinja2: each for-loop iteration gets a fresh frame, so a `set` inside a
// loop is gone after it (templates carry state out through namespace objects); `if` has no
// frame of its own. Every loop iteration, every string or list built and every output byte
// is counted against Limits so that no template can run away.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <ctime>

#include "tokenizer/jinja_ast.h"

namespace fathom::jinja {
namespace {

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

const char* const kWhitespace = " \t\n\r\f\v";

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
  void charge(size_t bytes) {
    work_ += bytes;
    if (work_ > lim_.max_work_bytes)
      fail(cat("rendering built more than ", lim_.max_work_bytes, " bytes of strings and lists"));
  }
  Value new_str(std::string s) {
    if (s.size() > lim_.max_output_bytes) fail(cat("a string grew beyond ", lim_.max_output_bytes, " bytes"));
    charge(s.size());
    return Value(std::move(s));
  }
  Value new_list(std::vector<Value> items, bool is_tuple = false) {
    charge(items.size() * sizeof(Value));
    return make_list(std::move(items), lim_.max_depth, is_tuple);
  }
  void emit(const std::string& s) {
    if (out_.size() + s.size() > lim_.max_output_bytes)
      fail(cat("the output grew beyond ", lim_.max_output_bytes, " bytes"));
    out_ += s;
  }

  // ---- variables
  Value lookup(const std::string& name) const {
    for (auto frame = scopes_.rbegin(); frame != scopes_.rend(); ++frame)
      for (auto it = frame->rbegin(); it != frame->rend(); ++it)
        if (it->first == name) return it->second;
    static const char* const builtins[] = {"range", "namespace", "dict", "raise_exception", "strftime_now"};
    for (const char* b : builtins)
      if (name == b) return Value(Builtin{name});
    return Value();
  }
  void assign(const std::string& name, Value v) {
    for (auto& [k, old] : scopes_.back())
      if (k == name) {
        old = std::move(v);
        return;
      }
    scopes_.back().emplace_back(name, std::move(v));
  }

  // ---- statements
  Flow exec_body(const Body& body) {
    for (const auto& s : body) {
      Flow f = exec(*s);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Flow exec(const Stmt& s) {
    line_ = s.line;
    switch (s.kind) {
      case Stmt::Kind::Text: emit(s.text); return Flow::Normal;
      case Stmt::Kind::Output: emit(to_str(eval(*s.expr))); return Flow::Normal;
      case Stmt::Kind::If:
        for (size_t i = 0; i < s.conds.size(); ++i)
          if (truthy(eval(*s.conds[i]))) return exec_body(s.bodies[i]);
        return exec_body(s.else_body);
      case Stmt::Kind::For: exec_for(s); return Flow::Normal;
      case Stmt::Kind::Set: exec_set(s, eval(*s.expr)); return Flow::Normal;
      case Stmt::Kind::SetBlock: {
        std::string saved;
        std::swap(saved, out_);
        exec_body(s.bodies[0]);
        std::swap(saved, out_);
        assign(s.targets[0], new_str(std::move(saved)));
        return Flow::Normal;
      }
      case Stmt::Kind::Break: return Flow::Break;
      case Stmt::Kind::Continue: return Flow::Continue;
      case Stmt::Kind::Scope: return exec_body(s.bodies[0]);
    }
    return Flow::Normal;
  }

  void exec_set(const Stmt& s, Value v) {
    if (!s.attr.empty()) {
      Value target = lookup(s.targets[0]);
      if (!target.is_namespace())
        fail(cat("cannot set attribute '", s.attr, "' of '", s.targets[0], "': only namespace objects take attributes"));
      if (contains_namespace(v)) fail("a namespace attribute cannot hold another namespace");
      target.ns().set(s.attr, std::move(v));
    } else if (s.targets.size() == 1) {
      assign(s.targets[0], std::move(v));
    } else {
      std::vector<Value> parts = unpack(v, s.targets.size());
      for (size_t i = 0; i < parts.size(); ++i) assign(s.targets[i], parts[i]);
    }
  }

  std::vector<Value> unpack(const Value& v, size_t n) {
    if (!v.is_list()) fail(cat("cannot unpack a value of type ", type_name(v), " into ", n, " names"));
    if (v.list().items.size() != n)
      fail(cat("cannot unpack ", v.list().items.size(), " values into ", n, " names"));
    return v.list().items;
  }

  void bind_targets(const Stmt& s, const Value& item) {
    if (s.targets.size() == 1) {
      assign(s.targets[0], item);
    } else {
      std::vector<Value> parts = unpack(item, s.targets.size());
      for (size_t i = 0; i < parts.size(); ++i) assign(s.targets[i], parts[i]);
    }
  }

  void count_iteration() {
    if (++iterations_ > lim_.max_loop_iterations)
      fail(cat("loops ran more than ", lim_.max_loop_iterations, " iterations"));
  }

  void exec_for(const Stmt& s) {
    std::vector<Value> items = iterate(eval(*s.expr));
    if (s.filter) {  // `for x in xs if cond`: loop.index and loop.length count kept items only
      std::vector<Value> kept;
      for (const Value& item : items) {
        count_iteration();
        scopes_.emplace_back();
        bind_targets(s, item);
        bool keep = truthy(eval(*s.filter));
        scopes_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t n = int64_t(items.size());
    for (int64_t i = 0; i < n; ++i) {
      count_iteration();
      scopes_.emplace_back();
      Items loop = {{"index", Value(i + 1)},
                    {"index0", Value(i)},
                    {"revindex", Value(n - i)},
                    {"revindex0", Value(n - i - 1)},
                    {"first", Value(i == 0)},
                    {"last", Value(i == n - 1)},
                    {"length", Value(n)},
                    {"previtem", i > 0 ? items[size_t(i - 1)] : Value()},
                    {"nextitem", i + 1 < n ? items[size_t(i + 1)] : Value()},
                    {"depth", Value(1)},
                    {"depth0", Value(0)}};
      scopes_.back().emplace_back("loop", Value(Value::Dict(std::make_shared<DictData>(DictData{std::move(loop), 1}))));
      bind_targets(s, items[size_t(i)]);
      Flow f = exec_body(s.bodies[0]);
      scopes_.pop_back();
      if (f == Flow::Break) break;
    }
    if (n == 0) exec_body(s.else_body);
  }

  // The elements a for loop (or list filter) sees.
  std::vector<Value> iterate(const Value& v) {
    if (v.is_list()) return v.list().items;
    if (v.is_undefined()) return {};
    if (v.is_dict()) {
      std::vector<Value> keys;
      for (const auto& kv : v.dict().items) keys.emplace_back(kv.first);
      return keys;
    }
    if (v.is_string()) {
      std::vector<Value> chars;
      for (auto& c : code_points(v.str())) chars.emplace_back(std::move(c));
      charge(chars.size() * sizeof(Value));
      return chars;
    }
    fail(cat("'", type_name(v), "' object is not iterable"));
  }

  // ---- expressions
  Value eval(const Expr& e) {
    line_ = e.line;
    switch (e.kind) {
      case Expr::Kind::Literal: return e.literal;
      case Expr::Kind::Name: return lookup(e.name);
      case Expr::Kind::List:
      case Expr::Kind::Tuple: {
        std::vector<Value> items;
        for (const auto& k : e.kids) items.push_back(eval(*k));
        return new_list(std::move(items), e.kind == Expr::Kind::Tuple);
      }
      case Expr::Kind::Dict: {
        Items items;
        for (size_t i = 0; i + 1 < e.kids.size(); i += 2) {
          Value key = eval(*e.kids[i]);
          if (!key.is_string()) fail(cat("dict keys must be strings, not ", type_name(key)));
          Value value = eval(*e.kids[i + 1]);
          auto it = std::find_if(items.begin(), items.end(), [&](const auto& kv) { return kv.first == key.str(); });
          if (it != items.end()) it->second = std::move(value);
          else items.emplace_back(key.str(), std::move(value));
        }
        charge(items.size() * sizeof(Value));
        return make_dict(std::move(items), lim_.max_depth);
      }
      case Expr::Kind::Attr: return get_attr(eval(*e.kids[0]), e.name, *e.kids[0]);
      case Expr::Kind::Item: return get_item(eval(*e.kids[0]), eval(*e.kids[1]), *e.kids[0]);
      case Expr::Kind::Slice: return eval_slice(e);
      case Expr::Kind::Call: return eval_call(e);
      case Expr::Kind::Filter: {
        Value v = eval(*e.kids[0]);
        return apply_filter(e.name, v, eval_args(e));
      }
      case Expr::Kind::Test: {
        Value v = eval(*e.kids[0]);
        bool r = apply_test(e.name, v, eval_args(e));
        return Value(e.negated ? !r : r);
      }
      case Expr::Kind::Neg:
      case Expr::Kind::Pos: {
        Value v = eval(*e.kids[0]);
        require_defined(v, *e.kids[0]);
        if (!v.is_number()) fail(cat("bad operand type for unary ", e.kind == Expr::Kind::Neg ? "-" : "+", ": '", type_name(v), "'"));
        if (e.kind == Expr::Kind::Pos) return v.is_bool() ? Value(v.as_int()) : v;
        if (v.is_float()) return Value(-v.as_float());
        if (v.as_int() == INT64_MIN) fail("integer overflow");
        return Value(-v.as_int());
      }
      case Expr::Kind::Not: return Value(!truthy(eval(*e.kids[0])));
      case Expr::Kind::And: {
        Value left = eval(*e.kids[0]);
        return truthy(left) ? eval(*e.kids[1]) : left;
      }
      case Expr::Kind::Or: {
        Value left = eval(*e.kids[0]);
        return truthy(left) ? left : eval(*e.kids[1]);
      }
      case Expr::Kind::Binary: return eval_binary(e);
      case Expr::Kind::Compare: {
        Value left = eval(*e.kids[0]);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value right = eval(*e.kids[i + 1]);
          if (!compare(e.ops[i], left, right)) return Value(false);
          left = std::move(right);
        }
        return Value(true);
      }
      case Expr::Kind::CondExpr:
        if (truthy(eval(*e.kids[1]))) return eval(*e.kids[0]);
        return e.kids[2] ? eval(*e.kids[2]) : Value();
    }
    return Value();
  }

  Args eval_args(const Expr& e) {
    Args args;
    for (size_t i = 1; i < e.kids.size(); ++i) args.pos.push_back(eval(*e.kids[i]));
    for (const auto& [k, v] : e.kwargs) args.kw.emplace_back(k, eval(*v));
    return args;
  }

  // jinja2's default Undefined: any use beyond printing, testing and iterating is an error.
  static void require_defined(const Value& v, const Expr& source) {
    if (!v.is_undefined()) return;
    if (source.kind == Expr::Kind::Name) fail(cat("'", source.name, "' is undefined"));
    if (source.kind == Expr::Kind::Attr) fail(cat("'", source.name, "' is undefined (no such attribute or key)"));
    fail("an undefined value was used");
  }

  Value get_attr(const Value& obj, const std::string& name, const Expr& source) {
    require_defined(obj, source);
    if (obj.is_dict()) {
      const Value* v = obj.dict().find(name);
      return v ? *v : Value();
    }
    if (obj.is_namespace()) {
      const Value* v = obj.ns().find(name);
      return v ? *v : Value();
    }
    return Value();
  }

  Value get_item(const Value& obj, const Value& key, const Expr& source) {
    require_defined(obj, source);
    if (obj.is_dict() || obj.is_namespace()) {
      if (!key.is_string()) return Value();
      const Value* v = obj.is_dict() ? obj.dict().find(key.str()) : obj.ns().find(key.str());
      return v ? *v : Value();
    }
    if ((obj.is_list() || obj.is_string()) && (key.is_int() || key.is_bool())) {
      int64_t i = key.as_int();
      if (obj.is_list()) {
        int64_t n = int64_t(obj.list().items.size());
        if (i < 0) i += n;
        return i >= 0 && i < n ? obj.list().items[size_t(i)] : Value();
      }
      std::vector<std::string> chars = code_points(obj.str());
      int64_t n = int64_t(chars.size());
      if (i < 0) i += n;
      return i >= 0 && i < n ? Value(chars[size_t(i)]) : Value();
    }
    return Value();
  }

  // Python slice semantics (PySlice_AdjustIndices) over list items or code points.
  Value eval_slice(const Expr& e) {
    Value obj = eval(*e.kids[0]);
    require_defined(obj, *e.kids[0]);
    int64_t bound[3] = {0, 0, 1};
    bool given[3] = {false, false, false};
    for (int k = 0; k < 3; ++k) {
      if (!e.kids[size_t(k) + 1]) continue;
      Value v = eval(*e.kids[size_t(k) + 1]);
      if (v.is_none()) continue;
      if (!v.is_int() && !v.is_bool()) fail(cat("slice indices must be integers or none, not ", type_name(v)));
      bound[k] = v.as_int();
      given[k] = true;
    }
    int64_t step = bound[2];
    if (step == 0) fail("slice step cannot be zero");
    if (step == INT64_MIN) fail("slice step out of range");
    std::vector<std::string> chars;
    if (obj.is_string()) chars = code_points(obj.str());
    else if (!obj.is_list()) fail(cat("'", type_name(obj), "' object cannot be sliced"));
    int64_t n = obj.is_string() ? int64_t(chars.size()) : int64_t(obj.list().items.size());
    auto adjust = [&](int64_t v, bool is_given, int64_t dflt) {
      if (!is_given) return dflt;
      if (v < 0) {
        v += n;
        if (v < 0) v = step < 0 ? -1 : 0;
      } else if (v >= n) {
        v = step < 0 ? n - 1 : n;
      }
      return v;
    };
    int64_t start = adjust(bound[0], given[0], step < 0 ? n - 1 : 0);
    int64_t stop = adjust(bound[1], given[1], step < 0 ? -1 : n);
    std::vector<size_t> picks;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) picks.push_back(size_t(i));
    if (obj.is_string()) {
      std::string s;
      for (size_t i : picks) s += chars[i];
      return new_str(std::move(s));
    }
    std::vector<Value> items;
    for (size_t i : picks) items.push_back(obj.list().items[i]);
    return new_list(std::move(items), obj.list().is_tuple);
  }

  Value eval_call(const Expr& e) {
    const Expr& callee = *e.kids[0];
    if (callee.kind == Expr::Kind::Attr) {  // a method: 'a,b'.split(','), d.items(), ...
      Value obj = eval(*callee.kids[0]);
      require_defined(obj, *callee.kids[0]);
      Args args = eval_args(e);
      line_ = e.line;
      Value result;
      if (call_method(obj, callee.name, args, result)) return result;
      Value attr = get_attr(obj, callee.name, *callee.kids[0]);
      if (attr.is_undefined()) fail(cat("'", type_name(obj), "' object has no method '", callee.name, "'"));
      return call_value(attr, args, callee);
    }
    Value fn = eval(callee);
    Args args = eval_args(e);
    line_ = e.line;
    return call_value(fn, args, callee);
  }

  Value call_value(const Value& fn, const Args& args, const Expr& callee) {
    require_defined(fn, callee);
    if (!fn.is_builtin()) fail(cat("'", type_name(fn), "' object is not callable"));
    const std::string& name = fn.builtin().name;
    if (name == "raise_exception") {
      const Value* msg = args.get(0, "message");
      fail(msg ? to_str(*msg) : "raise_exception was called");
    }
    if (name == "namespace" || name == "dict") {
      Items attrs;
      if (!args.pos.empty()) {
        if (args.pos.size() > 1 || !args.pos[0].is_dict()) fail(cat(name, "() takes one dict and keyword arguments"));
        attrs = args.pos[0].dict().items;
      }
      for (const auto& [k, v] : args.kw) attrs.emplace_back(k, v);
      if (name == "dict") return make_dict(std::move(attrs), lim_.max_depth);
      auto ns = std::make_shared<NamespaceData>();
      for (auto& [k, v] : attrs) {
        if (contains_namespace(v)) fail("a namespace attribute cannot hold another namespace");
        ns->set(k, std::move(v));
      }
      return Value(Value::Namespace(std::move(ns)));
    }
    if (name == "range") {
      std::vector<int64_t> b;
      for (const Value& v : args.pos) {
        if (!v.is_int() && !v.is_bool()) fail(cat("range() takes integers, not ", type_name(v)));
        b.push_back(v.as_int());
      }
      if (b.empty() || b.size() > 3) fail("range() takes 1 to 3 integers");
      int64_t start = b.size() > 1 ? b[0] : 0, stop = b.size() > 1 ? b[1] : b[0], step = b.size() > 2 ? b[2] : 1;
      if (step == 0) fail("range() step must not be zero");
      double count = std::max(0.0, std::ceil((double(stop) - double(start)) / double(step)));
      if (count > double(lim_.max_loop_iterations))
        fail(cat("range() of ", count, " items exceeds the limit of ", lim_.max_loop_iterations));
      std::vector<Value> items;
      for (int64_t i = 0; i < int64_t(count); ++i) items.emplace_back(start + i * step);
      return new_list(std::move(items));
    }
    if (name == "strftime_now") {
      const Value* fmt = args.get(0, "format");
      if (!fmt || !fmt->is_string()) fail("strftime_now() takes a format string");
      std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      size_t n = std::strftime(buf, sizeof buf, fmt->str().c_str(), &tm);
      return new_str(std::string(buf, n));
    }
    fail(cat("'", name, "' cannot be called"));
  }

  // ---- operators
  Value eval_binary(const Expr& e) {
    Value a = eval(*e.kids[0]);
    Value b = eval(*e.kids[1]);
    line_ = e.line;
    const std::string& op = e.name;
    if (op == "~") return new_str(to_str(a) + to_str(b));
    require_defined(a, *e.kids[0]);
    require_defined(b, *e.kids[1]);
    auto type_error = [&]() -> Value {
      fail(cat("unsupported operand types for ", op, ": '", type_name(a), "' and '", type_name(b), "'"));
    };
    if (op == "+") {
      if (a.is_string() && b.is_string()) return new_str(a.str() + b.str());
      if (a.is_list() && b.is_list() && a.list().is_tuple == b.list().is_tuple) {
        std::vector<Value> items = a.list().items;
        items.insert(items.end(), b.list().items.begin(), b.list().items.end());
        return new_list(std::move(items), a.list().is_tuple);
      }
    }
    if (op == "*" && (a.is_string() || a.is_list() || b.is_string() || b.is_list())) {
      const Value& seq = a.is_string() || a.is_list() ? a : b;
      const Value& count = &seq == &a ? b : a;
      if (!count.is_int() && !count.is_bool()) return type_error();
      int64_t times = std::max<int64_t>(0, count.as_int());
      if (seq.is_string()) {
        if (!seq.str().empty() && uint64_t(times) > lim_.max_output_bytes / seq.str().size())
          fail(cat("a string grew beyond ", lim_.max_output_bytes, " bytes"));
        std::string s;
        for (int64_t i = 0; i < times; ++i) s += seq.str();
        return new_str(std::move(s));
      }
      const auto& items = seq.list().items;
      if (!items.empty() && uint64_t(times) > lim_.max_work_bytes / (items.size() * sizeof(Value)))
        fail(cat("rendering built more than ", lim_.max_work_bytes, " bytes of strings and lists"));
      std::vector<Value> out;
      for (int64_t i = 0; i < times; ++i) out.insert(out.end(), items.begin(), items.end());
      return new_list(std::move(out), seq.list().is_tuple);
    }
    if (!a.is_number() || !b.is_number()) return type_error();
    if (op == "/") {
      if (b.as_float() == 0.0) fail("division by zero");
      return Value(a.as_float() / b.as_float());
    }
    if (a.is_float() || b.is_float() || (op == "**" && b.as_int() < 0)) {
      double x = a.as_float(), y = b.as_float();
      if (op == "+") return Value(x + y);
      if (op == "-") return Value(x - y);
      if (op == "*") return Value(x * y);
      if (op == "**") return Value(std::pow(x, y));
      if (y == 0.0) fail(op == "%" ? "float modulo by zero" : "float division by zero");
      if (op == "//") return Value(std::floor(x / y));
      double m = std::fmod(x, y);
      if (m != 0.0 && ((m < 0) != (y < 0))) m += y;
      return Value(m);
    }
    int64_t x = a.as_int(), y = b.as_int(), r = 0;
    bool overflow = false;
    if (op == "+") overflow = __builtin_add_overflow(x, y, &r);
    else if (op == "-") overflow = __builtin_sub_overflow(x, y, &r);
    else if (op == "*") overflow = __builtin_mul_overflow(x, y, &r);
    else if (op == "**") {
      r = 1;
      for (int64_t i = 0; i < y && !overflow; ++i) {
        overflow = __builtin_mul_overflow(r, x, &r);
        if (r == 0 || r == 1) break;  // 0**n and 1**n settle at once
      }
      if (x == -1) r = (y % 2) ? -1 : 1;
    } else {
      if (y == 0) fail(op == "%" ? "integer modulo by zero" : "integer division by zero");
      if (x == INT64_MIN && y == -1) fail("integer overflow");
      int64_t q = x / y, m = x % y;
      if (m != 0 && ((m < 0) != (y < 0))) --q, m += y;  // floor division, like Python
      r = op == "//" ? q : m;
    }
    if (overflow) fail("integer overflow (fathom's templates use 64-bit integers)");
    return Value(r);
  }

  bool compare(const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return equals(a, b);
    if (op == "!=") return !equals(a, b);
    if (op == "in" || op == "not in") return contains(b, a) == (op == "in");
    int c = order(a, b, op);
    if (op == "<") return c < 0;
    if (op == "<=") return c <= 0;
    if (op == ">") return c > 0;
    return c >= 0;
  }

  // Python ordering of numbers, strings and lists; anything else is a TypeError.
  int order(const Value& a, const Value& b, const std::string& op) {
    if (a.is_number() && b.is_number()) {
      if (a.is_float() || b.is_float()) {
        double x = a.as_float(), y = b.as_float();
        return x < y ? -1 : x > y ? 1 : 0;
      }
      return a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
    }
    if (a.is_string() && b.is_string()) return a.str().compare(b.str()) < 0 ? -1 : a.str() == b.str() ? 0 : 1;
    if (a.is_list() && b.is_list()) {
      const auto& x = a.list().items;
      const auto& y = b.list().items;
      for (size_t i = 0; i < x.size() && i < y.size(); ++i)
        if (!equals(x[i], y[i])) return order(x[i], y[i], op);
      return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
    }
    fail(cat("'", op, "' is not supported between '", type_name(a), "' and '", type_name(b), "'"));
  }

  bool contains(const Value& container, const Value& needle) {
    if (container.is_undefined()) return false;
    if (container.is_string()) {
      if (!needle.is_string()) fail(cat("'in <string>' needs a string on the left, not ", type_name(needle)));
      return container.str().find(needle.str()) != std::string::npos;
    }
    if (container.is_list()) {
      for (const Value& v : container.list().items)
        if (equals(v, needle)) return true;
      return false;
    }
    if (container.is_dict()) return needle.is_string() && container.dict().find(needle.str()) != nullptr;
    fail(cat("argument of type '", type_name(container), "' is not iterable"));
  }

  // ---- methods of str and dict
  static std::string strip_chars(const std::string& s, const Value* chars, bool left, bool right) {
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

  Value split(const std::string& s, const Value* sep_value, const Value* maxsplit_value) {
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

  static std::string replace_all(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
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

  static std::string ascii_case(std::string s, bool upper) {
    for (char& c : s)
      c = upper ? char(std::toupper(static_cast<unsigned char>(c))) : char(std::tolower(static_cast<unsigned char>(c)));
    return s;
  }

  bool call_method(const Value& obj, const std::string& name, const Args& args, Value& result) {
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

}  // namespace

std::string render_program(const Program& program, const Items& globals) {
  return Renderer(program, globals).run();
}

}  // namespace fathom::jinja
