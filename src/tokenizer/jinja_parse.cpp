// Parser: tokens (jinja_lex.cpp) -> syntax tree (jinja_ast.h), following jinja2's grammar
// and operator precedence. Unsupported constructs fail here, naming the construct and line.
#include <algorithm>
#include <set>

#include "tokenizer/jinja_ast.h"

namespace fathom::jinja {
namespace {

const std::set<std::string, std::less<>> kFilters = {
    "abs", "capitalize", "count", "d", "default", "first", "float", "int", "items", "join", "last", "length",
    "list", "lower", "map", "reject", "rejectattr", "replace", "reverse", "safe", "select", "selectattr",
    "string", "title", "tojson", "trim", "upper"};
const std::set<std::string, std::less<>> kTests = {
    "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "even", "false", "float", "ge", "gt",
    "greaterthan", "in", "integer", "iterable", "le", "lower", "lt", "lessthan", "mapping", "ne", "none",
    "number", "odd", "sameas", "sequence", "string", "true", "undefined", "upper", "==", "!=", "<", "<=", ">",
    ">="};
const std::set<std::string, std::less<>> kUnsupportedTags = {
    "macro", "call", "include", "import", "from", "extends", "block", "filter", "with", "autoescape", "do",
    "trans", "pluralize", "endmacro", "endcall", "endblock", "endfilter", "endwith", "endautoescape"};

class Parser {
 public:
  Parser(std::vector<Token> tokens, const std::string& name, const Options& options)
      : toks_(std::move(tokens)), name_(name), opt_(options) {}

  Body parse_template() {
    std::string found;
    return parse_body({}, found, 0);
  }

 private:
  // Bounds parser recursion (and so evaluator recursion, which follows the tree).
  struct DepthGuard {
    Parser& p;
    DepthGuard(Parser& parser, int line) : p(parser) {
      if (++p.depth_ > p.opt_.limits.max_depth) p.fail(line, cat("template nested deeper than ", p.opt_.limits.max_depth, " levels"));
    }
    ~DepthGuard() { --p.depth_; }
  };

  [[noreturn]] void fail(int line, const std::string& msg) const { throw Error(cat(name_, " line ", line, ": ", msg)); }
  const Token& cur() const { return toks_[i_]; }
  const Token& peek(size_t k = 1) const { return toks_[std::min(i_ + k, toks_.size() - 1)]; }
  bool is_op(const char* op) const { return cur().type == Token::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == Token::Name && cur().text == n; }
  std::string describe(const Token& t) const {
    switch (t.type) {
      case Token::Eof: return "end of template";
      case Token::Text: return "text";
      case Token::VarEnd: return "'}}'";
      case Token::BlockEnd: return "'%}'";
      case Token::String: return "a string";
      case Token::Int: case Token::Float: return "number " + t.text;
      default: return "'" + t.text + "'";
    }
  }
  void expect_op(const char* op) {
    if (!is_op(op)) fail(cur().line, cat("expected '", op, "', found ", describe(cur())));
    ++i_;
  }
  std::string expect_name() {
    if (cur().type != Token::Name) fail(cur().line, cat("expected a name, found ", describe(cur())));
    return toks_[i_++].text;
  }
  void expect_block_end(const std::string& tag) {
    if (cur().type != Token::BlockEnd) fail(cur().line, cat("expected '%}' to end '", tag, "', found ", describe(cur())));
    ++i_;
  }

  // Statements until a block tag named in `ends`; consumes "{% end-name" and reports it.
  Body parse_body(std::initializer_list<const char*> ends, std::string& found, int opened_line) {
    Body body;
    while (true) {
      const Token& t = cur();
      if (t.type == Token::Eof) {
        if (ends.size() == 0) return body;
        fail(opened_line, cat("unclosed block: expected '", *ends.begin(), "' before the end of the template"));
      }
      if (t.type == Token::Text) {
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::Kind::Text;
        s->line = t.line;
        s->text = t.text;
        body.push_back(std::move(s));
        ++i_;
      } else if (t.type == Token::VarBegin) {
        ++i_;
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::Kind::Output;
        s->line = t.line;
        s->expr = parse_tuple(true);
        if (cur().type != Token::VarEnd) fail(cur().line, cat("expected '}}', found ", describe(cur())));
        ++i_;
        body.push_back(std::move(s));
      } else if (t.type == Token::BlockBegin) {
        const Token& tag = peek();
        if (tag.type != Token::Name) fail(tag.line, cat("expected a tag name after '{%', found ", describe(tag)));
        for (const char* end : ends)
          if (tag.text == end) {
            found = end;
            i_ += 2;
            return body;
          }
        ++i_;
        body.push_back(parse_statement());
      } else {
        fail(t.line, cat("unexpected ", describe(t)));
      }
    }
  }

  StmtPtr parse_statement() {
    const Token& tag = cur();
    DepthGuard guard(*this, tag.line);
    auto s = std::make_unique<Stmt>();
    s->line = tag.line;
    std::string name = expect_name();
    std::string found;
    if (name == "if") {
      s->kind = Stmt::Kind::If;
      s->conds.push_back(parse_tuple(true));
      expect_block_end("if");
      while (true) {
        s->bodies.push_back(parse_body({"elif", "else", "endif"}, found, s->line));
        if (found == "elif") {
          s->conds.push_back(parse_tuple(true));
          expect_block_end("elif");
          continue;
        }
        if (found == "else") {
          expect_block_end("else");
          s->else_body = parse_body({"endif"}, found, s->line);
        }
        expect_block_end("endif");
        break;
      }
    } else if (name == "for") {
      s->kind = Stmt::Kind::For;
      s->targets.push_back(expect_name());
      while (is_op(",")) {
        ++i_;
        s->targets.push_back(expect_name());
      }
      if (!is_name("in")) fail(cur().line, cat("expected 'in' in a for loop, found ", describe(cur())));
      ++i_;
      s->expr = parse_tuple(false);
      if (is_name("if")) {
        ++i_;
        s->filter = parse_tuple(true);
      }
      if (is_name("recursive")) fail(cur().line, "unsupported construct 'recursive' loop");
      expect_block_end("for");
      ++loop_depth_;
      s->bodies.push_back(parse_body({"else", "endfor"}, found, s->line));
      --loop_depth_;
      if (found == "else") {
        expect_block_end("else");
        s->else_body = parse_body({"endfor"}, found, s->line);
      }
      expect_block_end("endfor");
    } else if (name == "set") {
      s->targets.push_back(expect_name());
      if (is_op(".")) {
        ++i_;
        s->attr = expect_name();
      } else {
        while (is_op(",")) {
          ++i_;
          s->targets.push_back(expect_name());
        }
      }
      if (is_op("=")) {
        ++i_;
        s->kind = Stmt::Kind::Set;
        s->expr = parse_tuple(true);
        expect_block_end("set");
      } else {
        if (is_op("|")) fail(cur().line, "unsupported construct: filter on a block 'set'");
        if (!s->attr.empty() || s->targets.size() != 1) fail(cur().line, "a block 'set' takes one plain name");
        s->kind = Stmt::Kind::SetBlock;
        expect_block_end("set");
        s->bodies.push_back(parse_body({"endset"}, found, s->line));
        expect_block_end("endset");
      }
    } else if (name == "break" || name == "continue") {
      if (loop_depth_ == 0) fail(s->line, cat("'", name, "' outside a for loop"));
      s->kind = name == "break" ? Stmt::Kind::Break : Stmt::Kind::Continue;
      expect_block_end(name);
    } else if (name == "generation") {  // transformers' assistant-mask marker: renders its body
      s->kind = Stmt::Kind::Scope;
      expect_block_end(name);
      s->bodies.push_back(parse_body({"endgeneration"}, found, s->line));
      expect_block_end("endgeneration");
    } else if (kUnsupportedTags.count(name)) {
      fail(s->line, cat("unsupported tag '", name, "'"));
    } else if (name.rfind("end", 0) == 0 || name == "elif" || name == "else") {
      fail(s->line, cat("unexpected tag '", name, "' without a matching opening tag"));
    } else {
      fail(s->line, cat("unknown tag '", name, "'"));
    }
    return s;
  }

  ExprPtr node(Expr::Kind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // An expression, or a bare tuple `a, b` (as in `{% set x = 1, 2 %}`).
  ExprPtr parse_tuple(bool with_condexpr) {
    int line = cur().line;
    ExprPtr first = with_condexpr ? parse_expression() : parse_or();
    if (!is_op(",")) return first;
    ExprPtr t = node(Expr::Kind::Tuple, line);
    t->kids.push_back(std::move(first));
    while (is_op(",")) {
      ++i_;
      if (cur().type == Token::BlockEnd || cur().type == Token::VarEnd || is_op(")") || is_name("if")) break;
      t->kids.push_back(with_condexpr ? parse_expression() : parse_or());
    }
    return t;
  }

  ExprPtr parse_expression() {
    DepthGuard guard(*this, cur().line);
    ExprPtr value = parse_or();
    ChainGuard chain(*this);
    while (is_name("if")) {
      int line = cur().line;
      chain.link(line);
      ++i_;
      ExprPtr e = node(Expr::Kind::CondExpr, line);
      e->kids.push_back(std::move(value));
      e->kids.push_back(parse_or());
      if (is_name("else")) {
        ++i_;
        e->kids.push_back(parse_expression());
      } else {
        e->kids.push_back(nullptr);
      }
      value = std::move(e);
    }
    return value;
  }

  // Left-deep chains (a + b + c ...) are built by loops, not recursion, so each link counts
  // towards the depth limit too; the guard releases them when the chain is done.
  struct ChainGuard {
    Parser& p;
    int links = 0;
    explicit ChainGuard(Parser& parser) : p(parser) {}
    void link(int line) {
      ++links;
      if (++p.depth_ > p.opt_.limits.max_depth) p.fail(line, cat("expression nested deeper than ", p.opt_.limits.max_depth, " levels"));
    }
    ~ChainGuard() { p.depth_ -= links; }
  };

  // `a or b or c` / `a and b`: a left-associative chain of one keyword over the next level.
  ExprPtr parse_keyword_chain(const char* keyword, Expr::Kind kind, ExprPtr (Parser::*operand)()) {
    ExprPtr left = (this->*operand)();
    ChainGuard chain(*this);
    while (is_name(keyword)) {
      chain.link(cur().line);
      ExprPtr e = node(kind, cur().line);
      ++i_;
      e->kids.push_back(std::move(left));
      e->kids.push_back((this->*operand)());
      left = std::move(e);
    }
    return left;
  }
  ExprPtr parse_or() { return parse_keyword_chain("or", Expr::Kind::Or, &Parser::parse_and); }
  ExprPtr parse_and() { return parse_keyword_chain("and", Expr::Kind::And, &Parser::parse_not); }

  ExprPtr parse_not() {
    if (is_name("not")) {
      DepthGuard guard(*this, cur().line);
      ExprPtr e = node(Expr::Kind::Not, cur().line);
      ++i_;
      e->kids.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    int line = cur().line;
    ExprPtr first = parse_binary(0);
    ExprPtr cmp;
    ChainGuard chain(*this);
    while (true) {
      chain.link(cur().line);
      std::string op;
      if (cur().type == Token::Op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                      cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        op = cur().text;
        ++i_;
      } else if (is_name("in")) {
        op = "in";
        ++i_;
      } else if (is_name("not") && peek().type == Token::Name && peek().text == "in") {
        op = "not in";
        i_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(Expr::Kind::Compare, line);
        cmp->kids.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->kids.push_back(parse_binary(0));
    }
    return cmp ? std::move(cmp) : std::move(first);
  }

  // Binary operator levels, loosest first: + -, ~, * / // %, **.
  ExprPtr parse_binary(int level) {
    static const std::vector<std::vector<std::string>> levels = {{"+", "-"}, {"~"}, {"*", "/", "//", "%"}, {"**"}};
    if (level == int(levels.size())) return parse_unary(true);
    ExprPtr left = parse_binary(level + 1);
    ChainGuard chain(*this);
    while (cur().type == Token::Op) {
      const auto& ops = levels[size_t(level)];
      if (std::find(ops.begin(), ops.end(), cur().text) == ops.end()) break;
      chain.link(cur().line);
      ExprPtr e = node(Expr::Kind::Binary, cur().line);
      e->name = toks_[i_++].text;
      e->kids.push_back(std::move(left));
      e->kids.push_back(parse_binary(level + 1));
      left = std::move(e);
    }
    return left;
  }

  ExprPtr parse_unary(bool with_filter) {
    DepthGuard guard(*this, cur().line);
    ExprPtr value;
    if (is_op("-") || is_op("+")) {
      value = node(is_op("-") ? Expr::Kind::Neg : Expr::Kind::Pos, cur().line);
      ++i_;
      value->kids.push_back(parse_unary(false));
    } else {
      value = parse_primary();
    }
    value = parse_postfix(std::move(value));
    return with_filter ? parse_filter_expr(std::move(value)) : std::move(value);
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    ExprPtr e;
    if (t.type == Token::Name) {
      ++i_;
      if (t.text == "true" || t.text == "True") return literal(Value(true), t.line);
      if (t.text == "false" || t.text == "False") return literal(Value(false), t.line);
      if (t.text == "none" || t.text == "None") return literal(Value(None{}), t.line);
      e = node(Expr::Kind::Name, t.line);
      e->name = t.text;
      return e;
    }
    if (t.type == Token::String) {
      std::string s;
      while (cur().type == Token::String) s += toks_[i_++].text;  // "a" "b" concatenates
      return literal(Value(std::move(s)), t.line);
    }
    if (t.type == Token::Int) return ++i_, literal(Value(t.ival), t.line);
    if (t.type == Token::Float) return ++i_, literal(Value(t.fval), t.line);
    if (is_op("(")) {
      ++i_;
      if (is_op(")")) {
        ++i_;
        return node(Expr::Kind::Tuple, t.line);
      }
      e = parse_tuple(true);
      expect_op(")");
      return e;
    }
    if (is_op("[") || is_op("{")) {
      bool is_dict = is_op("{");
      ++i_;
      e = node(is_dict ? Expr::Kind::Dict : Expr::Kind::List, t.line);
      const char* close = is_dict ? "}" : "]";
      while (!is_op(close)) {
        if (!e->kids.empty()) expect_op(",");
        if (is_op(close)) break;  // trailing comma
        e->kids.push_back(parse_expression());
        if (is_dict) {
          expect_op(":");
          e->kids.push_back(parse_expression());
        }
      }
      ++i_;
      return e;
    }
    fail(t.line, cat("unexpected ", describe(t), " in an expression"));
  }

  ExprPtr literal(Value v, int line) {
    ExprPtr e = node(Expr::Kind::Literal, line);
    e->literal = std::move(v);
    return e;
  }

  ExprPtr parse_postfix(ExprPtr value) {
    ChainGuard chain(*this);
    while (true) {
      int line = cur().line;
      chain.link(line);
      if (is_op(".")) {
        ++i_;
        if (cur().type == Token::Int) {  // `x.0` is x[0]
          ExprPtr e = node(Expr::Kind::Item, line);
          e->kids.push_back(std::move(value));
          e->kids.push_back(literal(Value(toks_[i_++].ival), line));
          value = std::move(e);
          continue;
        }
        ExprPtr e = node(Expr::Kind::Attr, line);
        e->name = expect_name();
        e->kids.push_back(std::move(value));
        value = std::move(e);
      } else if (is_op("[")) {
        ++i_;
        value = parse_subscript(std::move(value), line);
      } else if (is_op("(")) {
        ExprPtr e = node(Expr::Kind::Call, line);
        e->kids.push_back(std::move(value));
        parse_call_args(*e);
        value = std::move(e);
      } else {
        return value;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr value, int line) {
    ExprPtr parts[3];
    int n = 0;
    bool is_slice = false;
    while (true) {
      if (!is_op(":") && !is_op("]")) parts[n] = parse_expression();
      if (is_op(":")) {
        is_slice = true;
        if (++n > 2) fail(line, "a slice takes at most three parts");
        ++i_;
        continue;
      }
      break;
    }
    expect_op("]");
    ExprPtr e = node(is_slice ? Expr::Kind::Slice : Expr::Kind::Item, line);
    e->kids.push_back(std::move(value));
    if (!is_slice) {
      if (!parts[0]) fail(line, "empty subscript '[]'");
      e->kids.push_back(std::move(parts[0]));
    } else {
      for (auto& p : parts) e->kids.push_back(std::move(p));
    }
    return e;
  }

  void parse_call_args(Expr& call) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) {
        expect_op(",");
        if (is_op(")")) break;  // trailing comma
      }
      first = false;
      if (is_op("*") || is_op("**")) fail(cur().line, "unsupported construct: *args/**kwargs in a call");
      if (cur().type == Token::Name && peek().type == Token::Op && peek().text == "=") {
        std::string key = toks_[i_].text;
        i_ += 2;
        call.kwargs.emplace_back(key, parse_expression());
      } else {
        if (!call.kwargs.empty()) fail(cur().line, "a positional argument follows a keyword argument");
        call.kids.push_back(parse_expression());
      }
    }
    ++i_;
  }

  ExprPtr parse_filter_expr(ExprPtr value) {
    ChainGuard chain(*this);
    while (true) {
      int line = cur().line;
      chain.link(line);
      if (is_op("|")) {
        ++i_;
        ExprPtr e = node(Expr::Kind::Filter, line);
        e->name = expect_name();
        if (!kFilters.count(e->name)) fail(line, cat("unknown filter '", e->name, "'"));
        e->kids.push_back(std::move(value));
        if (is_op("(")) parse_call_args(*e);
        value = std::move(e);
      } else if (is_name("is")) {
        ++i_;
        ExprPtr e = node(Expr::Kind::Test, line);
        if (is_name("not")) {
          e->negated = true;
          ++i_;
        }
        if (cur().type == Token::Name) e->name = toks_[i_++].text;
        else if (cur().type == Token::Op && kTests.count(cur().text)) e->name = toks_[i_++].text;
        else fail(line, cat("expected a test name after 'is', found ", describe(cur())));
        if (!kTests.count(e->name)) fail(line, cat("unknown test '", e->name, "'"));
        e->kids.push_back(std::move(value));
        if (is_op("(")) {
          parse_call_args(*e);
        } else if ((cur().type == Token::Name || cur().type == Token::String || cur().type == Token::Int ||
                    cur().type == Token::Float || is_op("(") || is_op("[") || is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and")) {
          if (is_name("is")) fail(cur().line, "a test cannot be followed by 'is'");
          e->kids.push_back(parse_postfix(parse_primary()));  // `x is divisibleby 3`
        }
        value = std::move(e);
      } else if (is_op("(")) {
        ExprPtr e = node(Expr::Kind::Call, line);
        e->kids.push_back(std::move(value));
        parse_call_args(*e);
        value = std::move(e);
      } else {
        return value;
      }
    }
  }

  std::vector<Token> toks_;
  size_t i_ = 0;
  const std::string& name_;
  const Options& opt_;
  int depth_ = 0;
  int loop_depth_ = 0;
};

}  // namespace

std::shared_ptr<const Program> parse_program(const std::string& source, const std::string& name,
                                             const Options& options) {
  // jinja2 normalises newlines to "\n" and drops one trailing newline before lexing.
  std::string src;
  src.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      src += source[i];
    }
  }
  if (!options.keep_trailing_newline && !src.empty() && src.back() == '\n') src.pop_back();
  auto program = std::make_shared<Program>();
  program->name = name;
  program->options = options;
  Parser parser(lex_template(std::move(src), name, options), name, options);
  program->body = parser.parse_template();
  return program;
}

}  // namespace fathom::jinja
