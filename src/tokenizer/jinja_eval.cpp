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

#include "tokenizer/jinja_renderer.h"

namespace fathom::jinja {

void Renderer::charge(size_t bytes) {
  work_ += bytes;
  if (work_ > lim_.max_work_bytes)
    fail(cat("rendering built more than ", lim_.max_work_bytes, " bytes of strings and lists"));
}

Value Renderer::new_str(std::string s) {
  if (s.size() > lim_.max_output_bytes) fail(cat("a string grew beyond ", lim_.max_output_bytes, " bytes"));
  charge(s.size());
  return Value(std::move(s));
}

Value Renderer::new_list(std::vector<Value> items, bool is_tuple) {
  charge(items.size() * sizeof(Value));
  return make_list(std::move(items), lim_.max_depth, is_tuple);
}

void Renderer::emit(const std::string& s) {
  if (out_.size() + s.size() > lim_.max_output_bytes)
    fail(cat("the output grew beyond ", lim_.max_output_bytes, " bytes"));
  out_ += s;
}

Value Renderer::lookup(const std::string& name) const {
  for (auto frame = scopes_.rbegin(); frame != scopes_.rend(); ++frame)
    for (auto it = frame->rbegin(); it != frame->rend(); ++it)
      if (it->first == name) return it->second;
  static const char* const builtins[] = {"range", "namespace", "dict", "raise_exception", "strftime_now"};
  for (const char* b : builtins)
    if (name == b) return Value(Builtin{name});
  return Value();
}

void Renderer::assign(const std::string& name, Value v) {
  for (auto& [k, old] : scopes_.back())
    if (k == name) {
      old = std::move(v);
      return;
    }
  scopes_.back().emplace_back(name, std::move(v));
}

Flow Renderer::exec_body(const Body& body) {
  for (const auto& s : body) {
    Flow f = exec(*s);
    if (f != Flow::Normal) return f;
  }
  return Flow::Normal;
}

Flow Renderer::exec(const Stmt& s) {
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

void Renderer::exec_set(const Stmt& s, Value v) {
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

std::vector<Value> Renderer::unpack(const Value& v, size_t n) {
  if (!v.is_list()) fail(cat("cannot unpack a value of type ", type_name(v), " into ", n, " names"));
  if (v.list().items.size() != n)
    fail(cat("cannot unpack ", v.list().items.size(), " values into ", n, " names"));
  return v.list().items;
}

void Renderer::bind_targets(const Stmt& s, const Value& item) {
  if (s.targets.size() == 1) {
    assign(s.targets[0], item);
  } else {
    std::vector<Value> parts = unpack(item, s.targets.size());
    for (size_t i = 0; i < parts.size(); ++i) assign(s.targets[i], parts[i]);
  }
}

void Renderer::count_iteration() {
  if (++iterations_ > lim_.max_loop_iterations)
    fail(cat("loops ran more than ", lim_.max_loop_iterations, " iterations"));
}

void Renderer::exec_for(const Stmt& s) {
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

std::vector<Value> Renderer::iterate(const Value& v) {
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

Value Renderer::eval(const Expr& e) {
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

Args Renderer::eval_args(const Expr& e) {
  Args args;
  for (size_t i = 1; i < e.kids.size(); ++i) args.pos.push_back(eval(*e.kids[i]));
  for (const auto& [k, v] : e.kwargs) args.kw.emplace_back(k, eval(*v));
  return args;
}

void Renderer::require_defined(const Value& v, const Expr& source) {
  if (!v.is_undefined()) return;
  if (source.kind == Expr::Kind::Name) fail(cat("'", source.name, "' is undefined"));
  if (source.kind == Expr::Kind::Attr) fail(cat("'", source.name, "' is undefined (no such attribute or key)"));
  fail("an undefined value was used");
}

Value Renderer::get_attr(const Value& obj, const std::string& name, const Expr& source) {
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

Value Renderer::get_item(const Value& obj, const Value& key, const Expr& source) {
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

Value Renderer::eval_slice(const Expr& e) {
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

Value Renderer::eval_call(const Expr& e) {
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

Value Renderer::call_value(const Value& fn, const Args& args, const Expr& callee) {
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

Value Renderer::eval_binary(const Expr& e) {
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

bool Renderer::compare(const std::string& op, const Value& a, const Value& b) {
  if (op == "==") return equals(a, b);
  if (op == "!=") return !equals(a, b);
  if (op == "in" || op == "not in") return contains(b, a) == (op == "in");
  int c = order(a, b, op);
  if (op == "<") return c < 0;
  if (op == "<=") return c <= 0;
  if (op == ">") return c > 0;
  return c >= 0;
}

int Renderer::order(const Value& a, const Value& b, const std::string& op) {
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

bool Renderer::contains(const Value& container, const Value& needle) {
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

std::string render_program(const Program& program, const Items& globals) {
  return Renderer(program, globals).run();
}

}  // namespace fathom::jinja
