// Streaming text utilities: stop strings (StopMatcher) and the <think> reasoning split
// (ReasoningParser). Every streamed result is checked against the whole text cut at every
// position, since a tag or stop string may straddle any piece boundary.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "engine/reasoning.h"
#include "engine/stop.h"

using namespace fathom;

namespace {

struct StopRun {
  std::string text;         // everything emitted, flush included
  std::vector<std::string> emitted;  // per push
  bool stopped = false;
  std::string matched;
};

StopRun run_stop(const std::vector<std::string>& stops, const std::vector<std::string>& pieces) {
  StopMatcher m(stops);
  StopRun r;
  for (const std::string& p : pieces) {
    r.emitted.push_back(m.push(p));
    r.text += r.emitted.back();
  }
  r.text += m.flush();
  r.stopped = m.stopped();
  r.matched = m.matched();
  return r;
}

std::vector<std::string> bytes_of(const std::string& s) {
  std::vector<std::string> out;
  for (char c : s) out.emplace_back(1, c);
  return out;
}

// The whole-text answer: the stop that ends first, the longest of those ending together.
StopRun stop_oracle(const std::vector<std::string>& stops, const std::string& text) {
  for (size_t end = 1; end <= text.size(); ++end) {
    const std::string* best = nullptr;
    for (const std::string& s : stops)
      if (s.size() <= end && text.compare(end - s.size(), s.size(), s) == 0 && (!best || s.size() > best->size()))
        best = &s;
    if (best) return {text.substr(0, end - best->size()), {}, true, *best};
  }
  return {text, {}, false, ""};
}

// Cuts text at the given ascending positions.
std::vector<std::string> cut(const std::string& text, const std::vector<size_t>& at) {
  std::vector<std::string> out;
  size_t prev = 0;
  for (size_t a : at) out.push_back(text.substr(prev, a - prev)), prev = a;
  out.push_back(text.substr(prev));
  return out;
}

ReasoningDelta run_reasoning(bool starts_in_reasoning, const std::vector<std::string>& pieces) {
  ReasoningParser p(starts_in_reasoning);
  ReasoningDelta all;
  for (const std::string& piece : pieces) {
    ReasoningDelta d = p.push(piece);
    all.reasoning += d.reasoning;
    all.content += d.content;
  }
  ReasoningDelta d = p.flush();
  all.reasoning += d.reasoning;
  all.content += d.content;
  return all;
}

}  // namespace

TEST(StopMatcher, StopSplitAcrossManyPieces) {
  const std::string text = "Hello, world. STOP and more";
  StopRun r = run_stop({"STOP"}, bytes_of(text));
  EXPECT_EQ(r.text, "Hello, world. ");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.matched, "STOP");
  // While "S", "ST", "STO" arrive nothing is emitted; after the stop nothing either.
  for (size_t i = 14; i < text.size(); ++i) EXPECT_EQ(r.emitted[i], "") << i;
  for (size_t i = 0; i <= text.size(); ++i)
    for (size_t j = i; j <= text.size(); ++j)
      EXPECT_EQ(run_stop({"STOP"}, cut(text, {i, j})).text, "Hello, world. ") << i << "," << j;
}

TEST(StopMatcher, NothingHeldBackWithoutAPrefix) {
  StopMatcher m({"xyz", "\n\n"});
  EXPECT_EQ(m.push("hello"), "hello");
  EXPECT_EQ(m.push(" wor"), " wor");
  EXPECT_EQ(m.push("ldx"), "ld");  // "x" could start "xyz"
  EXPECT_EQ(m.push("a"), "xa");
  EXPECT_EQ(m.push("\n"), "");
  EXPECT_EQ(m.push("b\n"), "\nb");
  EXPECT_EQ(m.flush(), "\n");
  EXPECT_FALSE(m.stopped());
  EXPECT_EQ(m.matched(), "");
}

TEST(StopMatcher, OverlappingCandidates) {
  // "aab" inside "aaab": the first "a" can never start it once the third "a" arrives.
  StopRun r = run_stop({"aab"}, bytes_of("aaab tail"));
  EXPECT_EQ(r.text, "a");
  EXPECT_EQ(r.emitted[2], "a");
  EXPECT_EQ(run_stop({"abab"}, bytes_of("abababX")).text, "");
  EXPECT_EQ(run_stop({"abac"}, bytes_of("ababac")).text, "ab");
  // A prefix of one stop that is a full other stop: the shorter one completes first.
  StopRun nested = run_stop({"abcd", "bc"}, bytes_of("xabcd"));
  EXPECT_EQ(nested.text, "xa");
  EXPECT_EQ(nested.matched, "bc");
  // Both end at the same byte: the longer (earlier) one wins.
  StopRun same_end = run_stop({"cd", "bcd"}, {"abcd"});
  EXPECT_EQ(same_end.text, "a");
  EXPECT_EQ(same_end.matched, "bcd");
}

TEST(StopMatcher, StopAtTheVeryStart) {
  StopRun r = run_stop({"<|end|>"}, {"<|end|>", "more"});
  EXPECT_EQ(r.text, "");
  EXPECT_TRUE(r.stopped);
  StopRun r2 = run_stop({"<|end|>"}, bytes_of("<|end|>more"));
  EXPECT_EQ(r2.text, "");
  EXPECT_TRUE(r2.stopped);
}

TEST(StopMatcher, MultipleStopsEarliestWins) {
  StopRun r = run_stop({"world", "hello"}, {"say hello world"});
  EXPECT_EQ(r.text, "say ");
  EXPECT_EQ(r.matched, "hello");
  StopRun r2 = run_stop({"world", "hello"}, bytes_of("say hello world"));
  EXPECT_EQ(r2.text, "say ");
  EXPECT_EQ(r2.matched, "hello");
}

TEST(StopMatcher, AfterTheStopEverythingIsEmpty) {
  StopMatcher m({"END"});
  EXPECT_EQ(m.push("abcEN"), "abc");
  EXPECT_EQ(m.push("Dxyz"), "");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.push("more"), "");
  EXPECT_EQ(m.flush(), "");
}

TEST(StopMatcher, MultiByteUtf8Stops) {
  const std::string text = "你好，停下来吧。然后停止吧";  // "停" alone is not the stop "停止"
  const std::vector<std::string> stops = {"停止", "。。"};
  EXPECT_EQ(run_stop(stops, bytes_of(text)).text, "你好，停下来吧。然后");
  // Whole characters in, whole characters out: nothing emitted ever ends inside a character.
  std::vector<std::string> chars;
  for (size_t i = 0; i < text.size();) {
    size_t n = (unsigned char)text[i] < 0x80 ? 1 : (unsigned char)text[i] < 0xE0 ? 2 : (unsigned char)text[i] < 0xF0 ? 3 : 4;
    chars.push_back(text.substr(i, n));
    i += n;
  }
  StopRun r = run_stop(stops, chars);
  EXPECT_EQ(r.text, "你好，停下来吧。然后");
  for (const std::string& e : r.emitted) EXPECT_EQ(e.size() % 3, 0u) << e;
  EXPECT_EQ(r.matched, "停止");
}

TEST(StopMatcher, EmptyStopIsAnErrorNoStopsPassThrough) {
  EXPECT_THROW(StopMatcher({"ok", ""}), Error);
  StopMatcher none({});
  EXPECT_EQ(none.push("anything"), "anything");
  EXPECT_EQ(none.flush(), "");
}

TEST(StopMatcher, RandomTextsAndCutsMatchTheWholeTextOracle) {
  std::mt19937 rng(17);
  const std::vector<std::vector<std::string>> stop_sets = {
      {"ab", "bca", "cc"}, {"aaa", "aab"}, {"abcabc", "ca"}, {"c"}, {"bbbb", "abab", "ba"}};
  for (int trial = 0; trial < 3000; ++trial) {
    std::string text;
    const int n = int(rng() % 16);
    for (int i = 0; i < n; ++i) text += char('a' + rng() % 3);
    const auto& stops = stop_sets[size_t(trial) % stop_sets.size()];
    std::vector<size_t> at;
    for (size_t i = 1; i < text.size(); ++i)
      if (rng() % 3 == 0) at.push_back(i);
    const StopRun got = run_stop(stops, cut(text, at));
    const StopRun want = stop_oracle(stops, text);
    ASSERT_EQ(got.text, want.text) << "text '" << text << "'";
    ASSERT_EQ(got.stopped, want.stopped) << text;
    ASSERT_EQ(got.matched, want.matched) << text;
  }
}

TEST(Reasoning, WholeTextSplit) {
  EXPECT_EQ(split_reasoning("<think>\nLet me think.\nOK.\n</think>\n\nThe answer is 4.").reasoning, "Let me think.\nOK.");
  EXPECT_EQ(split_reasoning("<think>\nLet me think.\nOK.\n</think>\n\nThe answer is 4.").content, "The answer is 4.");
  // R1's template already opened the reasoning.
  auto r = split_reasoning("Hmm.\n</think>\n\n4", true);
  EXPECT_EQ(r.reasoning, "Hmm.");
  EXPECT_EQ(r.content, "4");
  // A doubled opening tag is still removed.
  r = split_reasoning("<think>\nHmm.</think>4", true);
  EXPECT_EQ(r.reasoning, "Hmm.");
  EXPECT_EQ(r.content, "4");
  // No reasoning at all.
  r = split_reasoning("Just an answer. </think> stays", false);
  EXPECT_EQ(r.reasoning, "");
  EXPECT_EQ(r.content, "Just an answer. </think> stays");
  // The opening tag only counts at the very start.
  r = split_reasoning(" <think>x</think>y", false);
  EXPECT_EQ(r.content, " <think>x</think>y");
  // Unfinished reasoning: everything is reasoning, trailing newlines kept.
  r = split_reasoning("<think>\n\nstill going\n", false);
  EXPECT_EQ(r.reasoning, "still going\n");
  EXPECT_EQ(r.content, "");
  // Only '\n' is trimmed, and only at the three places.
  r = split_reasoning("<think> \r\na\n\nb \n</think> \nc\n", false);
  EXPECT_EQ(r.reasoning, " \r\na\n\nb ");
  EXPECT_EQ(r.content, " \nc\n");
  // Later tags in the content are text.
  r = split_reasoning("a</think>b</think><think>c", true);
  EXPECT_EQ(r.reasoning, "a");
  EXPECT_EQ(r.content, "b</think><think>c");
  r = split_reasoning("<think></think>", false);
  EXPECT_EQ(r.reasoning, "");
  EXPECT_EQ(r.content, "");
}

TEST(Reasoning, StreamingAtEveryCutEqualsWholeText) {
  const std::vector<std::string> texts = {
      "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
      "Hmm.\n\n</think>\n\n4\n",
      "<think>\n\n</think>\n\nanswer",
      "<think>a</th</think>b",
      "<think>a\n</thin\n</think>\n",
      "<thin",
      "<think",
      "\n\n<think>x",
      "plain answer with </think> inside",
      "<<think>>",
      "<think>unfinished\n\n",
      "",
      "\n",
      "</think>",
      "思考\n</think>\n\n答案：四",
  };
  for (const std::string& text : texts) {
    for (bool sir : {false, true}) {
      const ReasoningDelta want = split_reasoning(text, sir);
      for (size_t i = 0; i <= text.size(); ++i) {
        for (size_t j = i; j <= text.size(); ++j) {
          const ReasoningDelta got = run_reasoning(sir, cut(text, {i, j}));
          ASSERT_EQ(got.reasoning, want.reasoning) << "'" << text << "' cut at " << i << "," << j << " sir=" << sir;
          ASSERT_EQ(got.content, want.content) << "'" << text << "' cut at " << i << "," << j << " sir=" << sir;
        }
      }
      const ReasoningDelta bytes = run_reasoning(sir, bytes_of(text));
      EXPECT_EQ(bytes.reasoning, want.reasoning) << text;
      EXPECT_EQ(bytes.content, want.content) << text;
    }
  }
}

TEST(Reasoning, RandomTextsAndCutsMatchTheWholeText) {
  std::mt19937 rng(23);
  const std::vector<std::string> atoms = {"<think>", "</think>", "<th", "</thi", "\n", "\n\n", "x", "<", "/", "k>", " "};
  for (int trial = 0; trial < 4000; ++trial) {
    std::string text;
    const int n = int(rng() % 8);
    for (int i = 0; i < n; ++i) text += atoms[rng() % atoms.size()];
    std::vector<size_t> at;
    for (size_t i = 1; i < text.size(); ++i)
      if (rng() % 4 == 0) at.push_back(i);
    const bool sir = rng() % 2;
    const ReasoningDelta want = split_reasoning(text, sir);
    const ReasoningDelta got = run_reasoning(sir, cut(text, at));
    ASSERT_EQ(got.reasoning, want.reasoning) << "'" << text << "' sir=" << sir;
    ASSERT_EQ(got.content, want.content) << "'" << text << "' sir=" << sir;
  }
}

TEST(Reasoning, TagsNeverLeakAndStreamIsIncremental) {
  ReasoningParser p(true);
  ReasoningDelta d = p.push("First, ");
  EXPECT_EQ(d.reasoning, "First, ");  // emitted at once, nothing to hold back
  d = p.push("add.\n</th");
  EXPECT_EQ(d.reasoning, "add.");  // "\n</th" may be the newline and tag that end it
  EXPECT_TRUE(p.in_reasoning());
  d = p.push("ink>\n\n");
  EXPECT_EQ(d.reasoning, "");
  EXPECT_EQ(d.content, "");
  EXPECT_FALSE(p.in_reasoning());
  d = p.push("4");
  EXPECT_EQ(d.content, "4");
  d = p.flush();
  EXPECT_EQ(d.reasoning + d.content, "");
}

TEST(Reasoning, CustomTagsAndBadTags) {
  ReasoningParser p(false, "<reason>", "</reason>");
  ReasoningDelta d = p.push("<reason>why</reason>what");
  EXPECT_EQ(d.reasoning, "why");
  EXPECT_EQ(d.content, "what");
  EXPECT_EQ(split_reasoning("<reason>why</reason>what", false, "<reason>", "</reason>").content, "what");
  EXPECT_THROW(ReasoningParser(false, "", "</think>"), Error);
  EXPECT_THROW(ReasoningParser(false, "<think>", ""), Error);
  EXPECT_THROW(split_reasoning("x", false, "<think>", ""), Error);
}
