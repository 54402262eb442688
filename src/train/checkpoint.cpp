#include "train/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/safetensors.h"
#include "core/sha256.h"

namespace fs = std::filesystem;

namespace fathom::train {
namespace {

constexpr const char* kFiles[] = {"config.json", "model.safetensors", "optimizer.safetensors"};
constexpr const char* kTokenizerFiles[] = {"tokenizer.json", "tokenizer_config.json"};
constexpr const char* kExpAvg = ".exp_avg";
constexpr const char* kExpAvgSq = ".exp_avg_sq";

// step-NNNNNNNN -> N, or -1 for any other name (a .tmp- directory included)
int64_t step_of(const std::string& name) {
  const std::string prefix = "step-";
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return -1;
  int64_t v = 0;
  for (size_t i = prefix.size(); i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || v > (int64_t(1) << 50)) return -1;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

}  // namespace

std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step-%08lld", (long long)step);
  return buf;
}

std::string save_checkpoint(const std::string& root, const std::string& config_json, const AdamW& optimizer,
                            const TrainerState& state, const std::string& tokenizer_dir) {
  std::error_code ec;
  fs::create_directories(root, ec);
  FATHOM_CHECK(!ec && fs::is_directory(root), "checkpoint: cannot create '", root, "': ", ec.message());
  const fs::path final_dir = fs::path(root) / checkpoint_name(state.step);
  FATHOM_CHECK(!fs::exists(final_dir), "checkpoint: '", final_dir.string(), "' already exists.");
  const fs::path tmp = fs::path(root) / (checkpoint_name(state.step) + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  FATHOM_CHECK(!ec, "checkpoint: cannot create '", tmp.string(), "': ", ec.message());
  try {
    SafetensorsWriter model, moments;
    for (const Param& p : optimizer.params()) {
      model.add(p.name, p.value);
      moments.add(p.name + kExpAvg, p.m);
      moments.add(p.name + kExpAvgSq, p.v);
    }
    write_file_atomic((tmp / "config.json").string(), config_json);
    model.write((tmp / "model.safetensors").string());
    moments.write((tmp / "optimizer.safetensors").string());
    nlohmann::json files = nlohmann::json::object();
    for (const char* f : kFiles) files[f] = sha256_hex(read_file((tmp / f).string()));
    if (!tokenizer_dir.empty()) {
      for (const char* f : kTokenizerFiles) {
        const fs::path src = fs::path(tokenizer_dir) / f;
        if (!fs::exists(src)) continue;
        const std::string text = read_file(src.string());
        write_file_atomic((tmp / f).string(), text);
        files[f] = sha256_hex(text);
      }
    }
    nlohmann::json st;
    st["step"] = state.step;
    st["optimizer_steps"] = state.optimizer_steps;
    st["rng"] = state.rng;
    st["data"] = {{"shard", state.data_shard}, {"offset", state.data_offset}};
    st["files"] = files;
    write_file_atomic((tmp / "trainer_state.json").string(), st.dump(2) + "\n");
    fs::rename(tmp, final_dir, ec);
    FATHOM_CHECK(!ec, "cannot move '", tmp.string(), "' into place: ", ec.message());
  } catch (const Error& e) {
    // never leave half a checkpoint behind (a full disk lands here); the message says which
    // checkpoint was lost before the file and the OS error that stopped it
    fs::remove_all(tmp, ec);
    throw Error(cat("checkpoint '", final_dir.string(), "' was not saved (older checkpoints are untouched): ", e.what()));
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  return final_dir.string();
}

namespace {

// trainer_state.json of a checkpoint directory, after checking every file it lists against its hash
nlohmann::json verified_state(const std::string& dir) {
  const fs::path d(dir);
  FATHOM_CHECK(fs::is_directory(d), "checkpoint '", dir, "' is not a directory.");
  const fs::path state_path = d / "trainer_state.json";
  FATHOM_CHECK(fs::exists(state_path), "checkpoint '", dir, "' has no trainer_state.json (incomplete).");
  const nlohmann::json st = nlohmann::json::parse(read_file(state_path.string()), nullptr, false);
  FATHOM_CHECK(st.is_object() && st.contains("files") && st["files"].is_object() && st.contains("step"),
               "checkpoint '", dir, "': trainer_state.json is not a trainer state.");
  for (const char* f : kFiles)
    FATHOM_CHECK(st["files"].contains(f), "checkpoint '", dir, "': trainer_state.json records no hash for ", f, ".");
  for (const auto& [name, hash] : st["files"].items()) {
    const fs::path p = d / name;
    FATHOM_CHECK(fs::exists(p), "checkpoint '", dir, "': ", name, " is missing.");
    FATHOM_CHECK(hash.is_string() && sha256_hex(read_file(p.string())) == hash.get<std::string>(), "checkpoint '",
                 dir, "': ", name, " does not match its recorded SHA-256 (truncated or altered).");
  }
  return st;
}

}  // namespace

Checkpoint load_checkpoint(const std::string& dir) {
  Checkpoint c;
  c.dir = dir;
  const fs::path d(dir);
  const nlohmann::json st = verified_state(dir);
  try {
    c.state.step = st.at("step").get<int64_t>();
    c.state.optimizer_steps = st.at("optimizer_steps").get<int64_t>();
    c.state.rng = st.at("rng").get<std::string>();
    c.state.data_shard = st.at("data").at("shard").get<int64_t>();
    c.state.data_offset = st.at("data").at("offset").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat("checkpoint '", dir, "': trainer_state.json: ", e.what()));
  }
  c.config_json = read_file((d / "config.json").string());
  auto copy_all = [](const SafetensorsSet& set, const std::string& name) {
    const Tensor t = set.tensor(name);
    Tensor own = Tensor::empty(t.shape(), t.dtype());
    std::copy_n(static_cast<const char*>(t.data()), t.nbytes(), static_cast<char*>(own.data()));
    return own;
  };
  const SafetensorsSet model = SafetensorsSet::open_file((d / "model.safetensors").string());
  const SafetensorsSet moments = SafetensorsSet::open_file((d / "optimizer.safetensors").string());
  for (const std::string& name : model.names()) {
    c.values[name] = copy_all(model, name);
    for (const char* suffix : {kExpAvg, kExpAvgSq})
      FATHOM_CHECK(moments.contains(name + suffix), "checkpoint '", dir, "': optimizer.safetensors has no ", name,
                   suffix, ".");
    c.exp_avg[name] = copy_all(moments, name + kExpAvg);
    c.exp_avg_sq[name] = copy_all(moments, name + kExpAvgSq);
  }
  return c;
}

void restore(AdamW& optimizer, const Checkpoint& c) {
  for (Param& p : optimizer.params()) {
    const auto it = c.values.find(p.name);
    FATHOM_CHECK(it != c.values.end(), "checkpoint '", c.dir, "' has no parameter ", p.name, ".");
    FATHOM_CHECK(it->second.shape() == p.value.shape() && it->second.dtype() == DType::F32, "checkpoint '", c.dir,
                 "': ", p.name, " is ", shape_str(it->second.shape()), ", the model's ", shape_str(p.value.shape()), ".");
    FATHOM_CHECK(c.exp_avg.count(p.name) && c.exp_avg.at(p.name).numel() == p.m.numel() &&
                     c.exp_avg_sq.count(p.name) && c.exp_avg_sq.at(p.name).numel() == p.v.numel(),
                 "checkpoint '", c.dir, "': the moments of ", p.name, " are missing or of another size.");
    std::copy_n(it->second.f32(), p.value.numel(), p.value.f32());
    std::copy_n(c.exp_avg.at(p.name).f32(), p.m.numel(), p.m.f32());
    std::copy_n(c.exp_avg_sq.at(p.name).f32(), p.v.numel(), p.v.f32());
  }
  optimizer.set_steps(c.state.optimizer_steps);
}

std::optional<std::string> latest_checkpoint(const std::string& root, std::vector<std::string>* rejected) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return std::nullopt;
  std::vector<std::pair<int64_t, std::string>> found;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const int64_t step = step_of(e.path().filename().string());
    if (step >= 0 && e.is_directory()) found.emplace_back(step, e.path().string());
  }
  std::sort(found.rbegin(), found.rend());
  for (const auto& [step, dir] : found) {
    try {
      verified_state(dir);
      return dir;
    } catch (const Error& e) {
      if (rejected) rejected->push_back(e.what());
    }
  }
  return std::nullopt;
}

}  // namespace fathom::train
