// fathom chat: an interactive conversation in the terminal. The whole conversation is
// re-rendered with the model's chat template each turn; the generator keeps the KV cache of
// the shared prefix, so only the new turn is prefilled.
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/error.h"
#include "engine/reasoning.h"
#include "text_common.h"

namespace fathom::cli {
namespace {

std::atomic<bool> g_interrupted{false};

void on_sigint(int) { g_interrupted.store(true); }

// Reads one line from stdin without stdio buffering so that Ctrl-C (EINTR) is seen at once.
enum class ReadStatus { Line, Eof, Interrupted };
ReadStatus read_line(std::string& line) {
  line.clear();
  for (;;) {
    char c;
    ssize_t n = ::read(0, &c, 1);
    if (n == 1) {
      if (c == '\n') return ReadStatus::Line;
      line.push_back(c);
      if (line.size() > (1u << 24)) throw Error("an input line is longer than 16 MiB");
      continue;
    }
    if (n == 0) return line.empty() ? ReadStatus::Eof : ReadStatus::Line;
    if (errno == EINTR) {
      if (g_interrupted.exchange(false)) return ReadStatus::Interrupted;
      continue;
    }
    throw Error(cat("cannot read standard input: ", std::strerror(errno)));
  }
}

struct Style {
  bool tty;
  const char* dim() const { return tty ? "\x1b[2m" : ""; }
  const char* bold() const { return tty ? "\x1b[1m" : ""; }
  const char* reset() const { return tty ? "\x1b[0m" : ""; }
};

void out(std::string_view s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

const char* kHelp =
    "Commands:\n"
    "  /reset          forget the conversation (the system prompt stays)\n"
    "  /system TEXT    set the system prompt and start over (/system alone clears it)\n"
    "  /help           this text\n"
    "  /exit, /quit    leave (Ctrl-D too)\n"
    "Multi-line input: end a line with \\ to continue it, or put \"\"\" on a line of its own to\n"
    "start and to end a block. Ctrl-C stops the current answer.\n";

}  // namespace

Command add_chat(CLI::App& app) {
  auto a = std::make_shared<ModelArgs>();
  auto tokenizer = std::make_shared<std::string>();
  auto system = std::make_shared<std::string>();
  auto s = std::make_shared<SamplingArgs>();
  CLI::App* cmd = app.add_subcommand("chat", "talk with a model in the terminal");
  add_model_options(cmd, *a);
  cmd->add_option("--tokenizer", *tokenizer, "tokenizer directory or tokenizer.json (default: the model directory's)");
  cmd->add_option("--system", *system, "system prompt");
  add_sampling_options(cmd, *s);
  s->temperature = 0.6;
  s->top_p = 0.95;
  s->max_tokens = 1024;
  return [=] {
    SamplingArgs sampling = *s;
    apply_generation_config(cmd, a->dir, sampling);
    GenerateOptions options = to_generate_options(sampling);
    auto tok = load_tokenizer(a->dir, *tokenizer);
    FATHOM_CHECK(!tok->config().chat_template.empty(), "no chat_template in the tokenizer_config.json beside ",
                 tok->source(), "; fathom chat needs one");
    auto m = open_model(*a);
    check_tokenizer_fits(*tok, *m);
    Generator gen(*m, *tok);
    const Style st{isatty(1) != 0};
    std::string system_prompt = *system;
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    auto fresh = [&] {
      messages = nlohmann::ordered_json::array();
      if (!system_prompt.empty()) messages.push_back({{"role", "system"}, {"content", system_prompt}});
    };
    fresh();
    // Probe the template once so that a broken template fails now, not after the first question.
    render_chat(*tok, messages, true);

    struct sigaction sa {};
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: a read in progress returns EINTR
    struct sigaction old {};
    sigaction(SIGINT, &sa, &old);

    const auto counts = m->param_counts();
    std::fprintf(stdout, "%sfathom chat%s — %s (%.1fM parameters, %.1fM active), vocabulary %d\n%s", st.bold(),
                 st.reset(), a->dir.c_str(), counts.total / 1e6, counts.active_per_token / 1e6, tok->vocab_size(),
                 "Type /help for commands, Ctrl-D to leave.\n");
    std::string line;
    for (;;) {
      out(cat(st.bold(), "> ", st.reset()));
      ReadStatus rs = read_line(line);
      if (rs == ReadStatus::Eof) {
        out("\n");
        break;
      }
      if (rs == ReadStatus::Interrupted) {
        out("\n(Ctrl-C: nothing to stop; /exit or Ctrl-D leaves)\n");
        continue;
      }
      // Multi-line input.
      std::string text = line;
      if (line == "\"\"\"") {
        text.clear();
        for (;;) {
          out(cat(st.dim(), "... ", st.reset()));
          rs = read_line(line);
          if (rs != ReadStatus::Line || line == "\"\"\"") break;
          text += (text.empty() ? "" : "\n") + line;
        }
        if (rs == ReadStatus::Interrupted) {
          out("\n(input discarded)\n");
          continue;
        }
      } else {
        while (!text.empty() && text.back() == '\\') {
          text.pop_back();
          text.push_back('\n');
          out(cat(st.dim(), "... ", st.reset()));
          rs = read_line(line);
          if (rs != ReadStatus::Line) break;
          text += line;
        }
      }
      if (!text.empty() && text.back() == '\r') text.pop_back();
      if (text.empty()) continue;
      if (size_t bad = utf8_invalid_offset(text); bad != std::string::npos) {
        out(cat("input is not valid UTF-8 at byte ", bad, "; ignored\n"));
        continue;
      }
      if (text == "/exit" || text == "/quit") break;
      if (text == "/help") {
        out(kHelp);
        continue;
      }
      if (text == "/reset") {
        fresh();
        gen.reset();
        out("(conversation cleared)\n");
        continue;
      }
      if (text == "/system" || text.rfind("/system ", 0) == 0) {
        system_prompt = text.size() > 8 ? text.substr(8) : "";
        fresh();
        gen.reset();
        out(system_prompt.empty() ? "(system prompt cleared; conversation cleared)\n"
                                  : "(system prompt set; conversation cleared)\n");
        continue;
      }
      if (text[0] == '/' && text.find(' ') == std::string::npos && text.size() < 16) {
        out(cat("unknown command ", text, "; /help lists them\n"));
        continue;
      }

      messages.push_back({{"role", "user"}, {"content", text}});
      const std::string prompt = render_chat(*tok, messages, true);
      // R1-style templates open the reasoning in the prompt itself.
      const bool starts_thinking = prompt.size() >= 8 && (prompt.rfind("<think>\n") == prompt.size() - 8 ||
                                                          prompt.rfind("<think>") == prompt.size() - 7);
      ReasoningParser reasoning(starts_thinking);
      std::string answer;
      bool in_thought = false;
      auto show = [&](const ReasoningDelta& d) {
        if (!d.reasoning.empty()) {
          if (!in_thought) out(cat(st.dim(), st.tty ? "thinking: " : "[reasoning] "));
          in_thought = true;
          out(d.reasoning);
        }
        if (!d.content.empty()) {
          if (in_thought) out(cat(st.tty ? "" : " [/reasoning]", st.reset(), "\n"));
          in_thought = false;
          answer += d.content;
          out(d.content);
        }
      };
      g_interrupted.store(false);
      GenerateResult r;
      try {
        r = gen.generate(tok->encode(prompt), options, [&](std::string_view piece) { show(reasoning.push(piece)); },
                         &g_interrupted);
      } catch (const Error& e) {
        messages.erase(messages.size() - 1);
        out(cat("\nerror: ", e.what(), "\n"));
        continue;
      }
      show(reasoning.flush());
      if (in_thought) out(cat(st.tty ? "" : " [/reasoning]", st.reset()));
      g_interrupted.store(false);
      messages.push_back({{"role", "assistant"}, {"content", answer}});
      out(cat("\n", st.dim(), "[", r.ids.size(), " tokens, ", r.decode_tokens_per_second() > 0 ? "" : "",
              static_cast<int>(r.decode_tokens_per_second() * 10) / 10.0, " tokens/s; prompt ", r.prompt_tokens,
              " tokens (", r.reused_tokens, " cached), prefill ", static_cast<int>(r.prefill_seconds * 1000), " ms",
              r.finish_reason == "cancelled" ? "; stopped by Ctrl-C" : r.finish_reason == "length" ? "; hit --max-tokens" : "",
              "]", st.reset(), "\n"));
    }
    sigaction(SIGINT, &old, nullptr);
  };
}

}  // namespace fathom::cli
