// safetensors reader/writer: round trips, the real fixtures, sharded checkpoints, and one
// crafted file for every way a header can be wrong (each must be one fathom::Error naming
// the file, never a crash).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/safetensors.h"

using namespace fathom;
namespace fs = std::filesystem;

namespace {

// A fresh directory under the system temp dir, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    std::random_device random;
    path_ = fs::temp_directory_path() / cat("fathom-safetensors-test-", ::getpid(), "-", counter++, "-", random());
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  fs::path path_;
};

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = char(uint8_t(n >> (8 * i)));
  return s;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes(fs::file_size(path), '\0');
  in.read(bytes.data(), std::streamsize(bytes.size()));
  return bytes;
}

// [8-byte length][header][data]; `declared` overrides the length field to craft liars.
std::string craft(const TempDir& dir, const std::string& header, const std::string& data,
                  std::optional<uint64_t> declared = std::nullopt, const std::string& name = "bad.safetensors") {
  std::string path = dir.file(name);
  write_bytes(path, le64(declared.value_or(header.size())) + header + data);
  return path;
}

// Passes when fn throws fathom::Error whose message contains every phrase.
testing::AssertionResult throws_error(const std::function<void()>& fn, const std::vector<std::string>& phrases) {
  try {
    fn();
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const auto& p : phrases)
      if (msg.find(p) == std::string::npos)
        return testing::AssertionFailure() << "message \"" << msg << "\" lacks \"" << p << "\"";
    return testing::AssertionSuccess() << msg;
  } catch (const std::exception& e) {
    return testing::AssertionFailure() << "threw a non-fathom::Error: " << e.what();
  }
  return testing::AssertionFailure() << "did not throw";
}

// Opening `path` fails with an Error that names the file and contains `phrase`.
testing::AssertionResult open_fails(const std::string& path, const std::string& phrase) {
  return throws_error([&] { SafetensorsFile::open(path); }, {fs::path(path).filename().string(), phrase});
}

// A valid one-tensor entry, for headers that are wrong elsewhere.
const std::string kGoodEntry = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
const std::string kEightBytes(8, '\x01');

std::string header_with_entry(const std::string& entry) { return "{" + entry + "}"; }

Tensor filled(Shape shape, DType dtype, uint8_t seed) {
  Tensor t = Tensor::empty(std::move(shape), dtype);
  auto* p = t.ptr<uint8_t>();
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = uint8_t(seed + 37 * i);
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.data(), b.data(), a.nbytes()) == 0);
}

}  // namespace

// ---- round trips ----------------------------------------------------------------------------

TEST(SafetensorsRoundTrip, SeveralDtypesAndShapes) {
  TempDir dir;
  // Odd byte sizes put the later tensors at unaligned offsets, which exercises the copy path.
  std::vector<std::pair<std::string, Tensor>> tensors = {
      {"a.f32", filled({2, 3}, DType::F32, 1)},       {"b.bf16", filled({4}, DType::BF16, 2)},
      {"c.f16", filled({3, 1}, DType::F16, 3)},       {"d.f8", filled({5}, DType::F8_E4M3, 4)},
      {"e.i64", filled({2}, DType::I64, 5)},          {"f.scalar", filled({}, DType::F32, 6)},
      {"g.empty", filled({0, 4}, DType::BF16, 7)},    {"h.big", filled({64, 33}, DType::F32, 8)},
  };
  SafetensorsWriter writer;
  for (const auto& [name, t] : tensors) writer.add(name, t);
  writer.set_metadata("producer", "fathom test");
  std::string path = dir.file("rt.safetensors");
  writer.write(path);

  auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->path(), path);
  ASSERT_EQ(file->tensors().size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    SCOPED_TRACE(name);
    EXPECT_EQ(file->tensors()[i].name, name);  // insertion order is file order
    ASSERT_TRUE(file->contains(name));
    const TensorInfo* info = file->find(name);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->dtype, t.dtype());
    EXPECT_EQ(info->shape, t.shape());
    EXPECT_EQ(info->end - info->begin, t.nbytes());
    Tensor back = file->tensor(name);
    EXPECT_TRUE(same_bytes(back, t));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(back.data()) % dtype_size(back.dtype()), 0u);
  }
  EXPECT_EQ(file->tensor("f.scalar").shape(), Shape{});
  EXPECT_EQ(file->tensor("f.scalar").numel(), 1);
  EXPECT_EQ(file->tensor("g.empty").numel(), 0);
  EXPECT_EQ(file->metadata().at("producer"), "fathom test");
  EXPECT_EQ(file->metadata().at("format"), "pt");
  EXPECT_FALSE(file->contains("nope"));
  EXPECT_EQ(file->find("nope"), nullptr);
}

TEST(SafetensorsRoundTrip, HeaderLayoutIsStandard) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("x", filled({3}, DType::BF16, 1));
  writer.add("y", filled({2, 2}, DType::F32, 2));
  std::string path = dir.file("layout.safetensors");
  writer.write(path);

  std::string bytes = read_bytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  EXPECT_EQ(n % 8, 0u) << "header padded to a multiple of 8";
  ASSERT_EQ(bytes.size(), 8 + n + 6 + 16);
  std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.front(), '{');
  auto j = nlohmann::json::parse(header);  // trailing spaces are JSON whitespace
  EXPECT_EQ(j["__metadata__"]["format"], "pt");
  EXPECT_EQ(j["x"]["dtype"], "BF16");
  EXPECT_EQ(j["x"]["data_offsets"], nlohmann::json::parse("[0, 6]"));
  EXPECT_EQ(j["y"]["shape"], nlohmann::json::parse("[2, 2]"));
  EXPECT_EQ(j["y"]["data_offsets"], nlohmann::json::parse("[6, 22]"));
}

TEST(SafetensorsRoundTrip, ViewsKeepTheMappingAlive) {
  TempDir dir;
  Tensor original = filled({1000}, DType::F32, 9);
  SafetensorsWriter writer;
  writer.add("w", original);
  writer.write(dir.file("alive.safetensors"));

  auto file = SafetensorsFile::open(dir.file("alive.safetensors"));
  Tensor view = file->tensor("w");
  EXPECT_GT(file.use_count(), 1) << "the view shares ownership of the file";
  file.reset();  // the view alone now keeps the mapping
  EXPECT_TRUE(same_bytes(view, original));
}

// HF's writer puts __metadata__ first and the tensors in data order with compact JSON; written
// in the same order, our file must be the identical bytes. (Files HF wrote without metadata
// differ by our {"format": "pt"}, so they are left out.)
TEST(SafetensorsRoundTrip, RewritingTheFixturesReproducesTheirBytes) {
  TempDir dir;
  int compared = 0;
  for (const auto& entry : fs::directory_iterator(FATHOM_SHARED_DATA "/fixtures")) {
    std::string fixture = (entry.path() / "model.safetensors").string();
    if (!fs::exists(fixture)) continue;
    auto file = SafetensorsFile::open(fixture);
    if (file->metadata().empty()) continue;
    SCOPED_TRACE(fixture);
    SafetensorsWriter writer;
    for (const auto& [k, v] : file->metadata()) writer.set_metadata(k, v);
    for (const TensorInfo& info : file->tensors()) writer.add(info.name, file->tensor(info.name));
    writer.write(dir.file("copy.safetensors"));
    EXPECT_TRUE(read_bytes(dir.file("copy.safetensors")) == read_bytes(fixture));
    ++compared;
  }
  EXPECT_GE(compared, 1);
}

// ---- the real fixtures ----------------------------------------------------------------------

TEST(SafetensorsFixture, V3TinyEmbedTokens) {
  auto file = SafetensorsFile::open(FATHOM_SHARED_DATA "/fixtures/v3-tiny/model.safetensors");
  const TensorInfo* info = file->find("model.embed_tokens.weight");
  ASSERT_NE(info, nullptr);
  EXPECT_EQ(info->dtype, DType::BF16);
  EXPECT_EQ(info->shape, (Shape{1024, 256}));
  Tensor t = file->tensor("model.embed_tokens.weight");
  EXPECT_EQ(t.dtype(), DType::BF16);
  EXPECT_EQ(t.shape(), (Shape{1024, 256}));
  Tensor f = to_f32(t);
  double sum_sq = 0;
  for (int64_t i = 0; i < f.numel(); ++i) {
    ASSERT_TRUE(std::isfinite(f.f32()[i]));
    sum_sq += double(f.f32()[i]) * f.f32()[i];
  }
  EXPECT_GT(sum_sq, 0.0);
  EXPECT_EQ(file->metadata().at("format"), "pt");

  SafetensorsSet set = SafetensorsSet::open_dir(FATHOM_SHARED_DATA "/fixtures/v3-tiny");
  EXPECT_TRUE(set.contains("model.embed_tokens.weight"));
  EXPECT_EQ(set.names().size(), file->tensors().size());
  EXPECT_TRUE(same_bytes(set.tensor("model.embed_tokens.weight"), t));
}

TEST(SafetensorsFixture, EveryFixtureFileValidates) {
  int opened = 0;
  for (const auto& entry : fs::directory_iterator(FATHOM_SHARED_DATA "/fixtures")) {
    if (!entry.is_directory()) continue;
    for (const char* name : {"model.safetensors", "reference.safetensors"}) {
      fs::path p = entry.path() / name;
      if (!fs::exists(p)) continue;
      SCOPED_TRACE(p.string());
      auto file = SafetensorsFile::open(p.string());
      EXPECT_FALSE(file->tensors().empty());
      // HF writes tensors back to back: the data section is exactly covered.
      uint64_t covered = 0;
      for (const TensorInfo& t : file->tensors()) covered += t.end - t.begin;
      EXPECT_EQ(covered, file->data_bytes());
      ++opened;
    }
  }
  EXPECT_GT(opened, 0);
}

// ---- sharded checkpoints --------------------------------------------------------------------

TEST(SafetensorsSharded, WriteShardedThenOpenDirGivesSameTensors) {
  TempDir dir;
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (int i = 0; i < 6; ++i) tensors.emplace_back(cat("model.layers.", i, ".w"), filled({10, 10}, DType::F32, uint8_t(i)));
  tensors.emplace_back("model.huge", filled({1000}, DType::F32, 99));  // above the limit: a shard of its own
  tensors.emplace_back("model.scalar", filled({}, DType::BF16, 3));
  SafetensorsWriter writer;
  for (const auto& [name, t] : tensors) writer.add(name, t);
  writer.write_sharded(dir.str(), 1000);  // 400-byte tensors: two per shard

  std::vector<std::string> expected_files = {"model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors",
                                             "model-00003-of-00005.safetensors", "model-00004-of-00005.safetensors",
                                             "model-00005-of-00005.safetensors", "model.safetensors.index.json"};
  EXPECT_EQ(dir.listing(), expected_files);

  auto index = nlohmann::json::parse(read_bytes(dir.file("model.safetensors.index.json")));
  EXPECT_EQ(index["metadata"]["total_size"], 6 * 400 + 4000 + 2);
  EXPECT_EQ(index["weight_map"]["model.layers.0.w"], "model-00001-of-00005.safetensors");
  EXPECT_EQ(index["weight_map"]["model.layers.2.w"], "model-00002-of-00005.safetensors");
  EXPECT_EQ(index["weight_map"]["model.huge"], "model-00004-of-00005.safetensors");
  EXPECT_EQ(index["weight_map"]["model.scalar"], "model-00005-of-00005.safetensors");

  SafetensorsSet set = SafetensorsSet::open_dir(dir.str());
  EXPECT_EQ(set.dir(), dir.str());
  EXPECT_EQ(set.files().size(), 5u) << "each shard opened once";
  std::vector<std::string> names;
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    names.push_back(name);
    ASSERT_TRUE(set.contains(name));
    EXPECT_TRUE(same_bytes(set.tensor(name), t));
    EXPECT_EQ(set.find(name)->shape, t.shape());
    EXPECT_EQ(fs::path(set.file_of(name)).filename().string(), index["weight_map"][name].get<std::string>());
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(set.names(), names);
}

TEST(SafetensorsSharded, OpenDirWithSingleFileAndExplicitFilePath) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("a", filled({3}, DType::I64, 1));
  writer.write(dir.file("model.safetensors"));

  SafetensorsSet from_dir = SafetensorsSet::open_dir(dir.str());
  EXPECT_EQ(from_dir.names(), std::vector<std::string>{"a"});
  EXPECT_EQ(from_dir.file_of("a"), dir.file("model.safetensors"));

  SafetensorsSet from_file = SafetensorsSet::open_file(dir.file("model.safetensors"));
  EXPECT_TRUE(same_bytes(from_file.tensor("a"), from_dir.tensor("a")));
  EXPECT_EQ(from_file.dir(), dir.str());
  SafetensorsSet via_open_dir = SafetensorsSet::open_dir(dir.file("model.safetensors"));
  EXPECT_TRUE(via_open_dir.contains("a"));
}

// ---- bad files: each must be one fathom::Error naming the file -------------------------------

TEST(SafetensorsBadFile, MissingFile) {
  TempDir dir;
  EXPECT_TRUE(open_fails(dir.file("absent.safetensors"), "does not exist"));
}

TEST(SafetensorsBadFile, DirectoryIsNotARegularFile) {
  TempDir dir;
  fs::create_directory(dir.file("adir.safetensors"));
  EXPECT_TRUE(open_fails(dir.file("adir.safetensors"), "not a regular file"));
}

TEST(SafetensorsBadFile, FifoIsRejectedWithoutBlocking) {
  TempDir dir;
  ASSERT_EQ(::mkfifo(dir.file("pipe.safetensors").c_str(), 0600), 0);
  EXPECT_TRUE(open_fails(dir.file("pipe.safetensors"), "not a regular file"));
}

TEST(SafetensorsBadFile, UnreadablePath) {
  TempDir dir;
  write_bytes(dir.file("plain"), "x");
  // A regular file used as a directory: stat fails with ENOTDIR, even for root.
  EXPECT_TRUE(open_fails(dir.file("plain") + "/inner.safetensors", "cannot be opened for reading"));
}

TEST(SafetensorsBadFile, UnreadablePermissions) {
  if (::geteuid() == 0) GTEST_SKIP() << "root reads files regardless of permissions";
  TempDir dir;
  std::string path = craft(dir, header_with_entry(kGoodEntry), kEightBytes);
  fs::permissions(path, fs::perms::none);
  EXPECT_TRUE(open_fails(path, "cannot be opened for reading"));
}

TEST(SafetensorsBadFile, ShorterThanEightBytes) {
  TempDir dir;
  write_bytes(dir.file("short.safetensors"), "\x05\x00\x00");
  EXPECT_TRUE(open_fails(dir.file("short.safetensors"), "truncated"));
  write_bytes(dir.file("empty.safetensors"), "");
  EXPECT_TRUE(open_fails(dir.file("empty.safetensors"), "truncated"));
}

TEST(SafetensorsBadFile, TruncatedInTheMiddleOfTheData) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("first", filled({16}, DType::F32, 1));
  writer.add("second", filled({16}, DType::F32, 2));
  std::string path = dir.file("cut.safetensors");
  writer.write(path);
  fs::resize_file(path, fs::file_size(path) - 10);
  EXPECT_TRUE(open_fails(path, "is truncated or its header lies: tensor \"second\" ends at byte 128 but the data section has 118 bytes"));
}

TEST(SafetensorsBadFile, HeaderLengthTwoToTheSixty) {
  TempDir dir;
  std::string path = craft(dir, header_with_entry(kGoodEntry), kEightBytes, uint64_t(1) << 60);
  EXPECT_TRUE(open_fails(path, "header length of 1152921504606846976 bytes"));
}

TEST(SafetensorsBadFile, HeaderLengthJustBeyondTheFile) {
  TempDir dir;
  std::string header = header_with_entry(kGoodEntry);
  std::string path = craft(dir, header, "", header.size() + 1);
  EXPECT_TRUE(open_fails(path, "only " + std::to_string(header.size()) + " bytes follow"));
}

TEST(SafetensorsBadFile, HeaderLengthAboveOneHundredMegabytes) {
  TempDir dir;
  std::string path = craft(dir, "{}", "", 100'000'008);
  fs::resize_file(path, 8 + 100'000'008);  // sparse: costs no disk
  EXPECT_TRUE(open_fails(path, "100 MB limit"));
}

TEST(SafetensorsBadFile, HeaderNotJson) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, "{\"w\": nonsense}", ""), "not valid JSON"));
  EXPECT_TRUE(open_fails(craft(dir, "", ""), "not valid JSON"));
  EXPECT_TRUE(open_fails(craft(dir, "{\"unterminated", ""), "not valid JSON"));
  EXPECT_TRUE(open_fails(craft(dir, "{\"\xff\xfe\":1}", ""), "not valid JSON"));  // not UTF-8
}

TEST(SafetensorsBadFile, HeaderNotAnObject) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, "[1, 2, 3]", ""), "not a JSON object"));
  EXPECT_TRUE(open_fails(craft(dir, "\"w\"    ", ""), "not a JSON object"));
}

TEST(SafetensorsBadFile, DeeplyNestedHeaderDoesNotCrash) {
  TempDir dir;
  std::string deep = std::string(200'000, '[') + std::string(200'000, ']');
  EXPECT_TRUE(open_fails(craft(dir, deep, ""), "not a JSON object"));
  std::string deep_entry = "{\"w\":" + std::string(200'000, '[') + std::string(200'000, ']') + "}";
  EXPECT_TRUE(open_fails(craft(dir, deep_entry, ""), "instead of an object"));
}

TEST(SafetensorsBadFile, EntryNotAnObject) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w": [0, 8]})", kEightBytes), "tensor \"w\""));
  EXPECT_TRUE(open_fails(craft(dir, R"({"w": [0, 8]})", kEightBytes), "instead of an object"));
}

TEST(SafetensorsBadFile, EntryWithoutDtype) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"shape":[2],"data_offsets":[0,8]}})", kEightBytes), "no \"dtype\" field"));
}

TEST(SafetensorsBadFile, EntryWithoutShape) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", kEightBytes), "no \"shape\" field"));
}

TEST(SafetensorsBadFile, EntryWithoutDataOffsets) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F32","shape":[2]}})", kEightBytes), "no \"data_offsets\" field"));
}

TEST(SafetensorsBadFile, DtypeNotAString) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", kEightBytes),
                         "\"dtype\" that is not a string"));
}

TEST(SafetensorsBadFile, UnknownDtype) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}})", kEightBytes),
                         "unknown dtype \"F7\""));
}

TEST(SafetensorsBadFile, ShapeNotAnArray) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", kEightBytes),
                         "\"shape\" that is not an array"));
}

TEST(SafetensorsBadFile, NegativeShapeDimension) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,8]}})", kEightBytes),
                         "dimension 1 equal to the number -1; dimensions must be non-negative integers"));
}

TEST(SafetensorsBadFile, NonIntegerShapeDimension) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", kEightBytes),
                         "non-negative integers"));
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", kEightBytes),
                         "non-negative integers"));
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8]}})",
                               kEightBytes),
                         "non-negative integers"));
}

TEST(SafetensorsBadFile, ElementCountOverflow) {
  TempDir dir;
  // 2^32 * 2^32 elements: the product wraps to 0 in 64 bits and would "match" an empty range.
  EXPECT_TRUE(open_fails(
      craft(dir, R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", ""),
      "more elements than a 64-bit size can count"));
  // Fits in int64 as elements, but not as bytes.
  EXPECT_TRUE(open_fails(
      craft(dir, R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})", ""),
      "more elements than a 64-bit size can count"));
  // A zero dimension does not excuse the others from overflowing.
  EXPECT_TRUE(open_fails(
      craft(dir, R"({"w":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})", ""),
      "more elements than a 64-bit size can count"));
}

TEST(SafetensorsBadFile, DataOffsetsNotTwoNonNegativeIntegers) {
  TempDir dir;
  for (const char* offsets : {"[0]", "[0,8,8]", "[-8,8]", "[0,8.5]", "\"0,8\"", "[0,18446744073709551616]"}) {
    SCOPED_TRACE(offsets);
    std::string header = cat(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":)", offsets, "}}");
    EXPECT_TRUE(open_fails(craft(dir, header, kEightBytes), "expected two non-negative integers [begin, end]"));
  }
}

TEST(SafetensorsBadFile, DataOffsetsBeginAfterEnd) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", kEightBytes),
                         "[8, 0] whose begin is after its end"));
}

TEST(SafetensorsBadFile, OffsetsOutsideTheFile) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[1000000,1000008]}})", kEightBytes),
                         "tensor \"w\" ends at byte 1000008 but the data section has 8 bytes"));
  EXPECT_TRUE(open_fails(
      craft(dir, R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}})",
            kEightBytes),
      "header lies"));
}

TEST(SafetensorsBadFile, ByteLengthDoesNotMatchShape) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}})", kEightBytes),
                         "has 8 bytes in data_offsets [0, 8] but its shape [2, 3] of BF16 needs 12 bytes"));
}

TEST(SafetensorsBadFile, OverlappingTensors) {
  TempDir dir;
  std::string header = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                       R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})";
  std::string path = craft(dir, header, std::string(24, '\0'));
  EXPECT_TRUE(open_fails(path, "tensors \"a\" and \"b\""));
  EXPECT_TRUE(open_fails(path, "overlap: bytes [0, 16) and [8, 24)"));
  // A tensor nested inside a long one, listed after a short one in between.
  std::string nested = R"({"long":{"dtype":"U8","shape":[20],"data_offsets":[0,20]},)"
                       R"("short":{"dtype":"U8","shape":[2],"data_offsets":[1,3]},)"
                       R"("inner":{"dtype":"U8","shape":[2],"data_offsets":[10,12]}})";
  EXPECT_TRUE(open_fails(craft(dir, nested, std::string(20, '\0')), "overlap"));
}

TEST(SafetensorsBadFile, EmptyTensorsOverlapNothing) {
  TempDir dir;
  std::string header = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                       R"("z":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}})";
  auto file = SafetensorsFile::open(craft(dir, header, std::string(16, '\0')));
  EXPECT_EQ(file->tensor("z").numel(), 0);
}

TEST(SafetensorsBadFile, DuplicateTensorName) {
  TempDir dir;
  std::string header = "{" + kGoodEntry + "," + kGoodEntry + "}";
  EXPECT_TRUE(open_fails(craft(dir, header, kEightBytes), "has the key \"w\" twice"));
}

TEST(SafetensorsBadFile, MetadataNotAStringMap) {
  TempDir dir;
  EXPECT_TRUE(open_fails(craft(dir, "{\"__metadata__\":[\"pt\"]," + kGoodEntry + "}", kEightBytes),
                         "__metadata__ in safetensors file"));
  EXPECT_TRUE(open_fails(craft(dir, "{\"__metadata__\":{\"format\":\"pt\",\"n\":3}," + kGoodEntry + "}", kEightBytes),
                         "must map strings to strings, but key \"n\" maps to the number 3"));
}

TEST(SafetensorsBadFile, MissingTensorLookup) {
  TempDir dir;
  auto file = SafetensorsFile::open(craft(dir, header_with_entry(kGoodEntry), kEightBytes));
  EXPECT_TRUE(throws_error([&] { file->tensor("nope"); }, {"bad.safetensors has no tensor \"nope\""}));
}

// Random corruption of a valid file: opening either succeeds or throws fathom::Error, and
// every tensor of a file that opens reads within bounds (ASan watches).
TEST(SafetensorsBadFile, RandomCorruptionNeverCrashes) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("a", filled({3, 5}, DType::F32, 1));
  writer.add("b", filled({7}, DType::BF16, 2));
  writer.add("c", filled({}, DType::I64, 3));
  writer.write(dir.file("good.safetensors"));
  const std::string good = read_bytes(dir.file("good.safetensors"));
  std::mt19937 rng(1234);
  int opened = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    std::string bytes = good;
    int edits = 1 + int(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      size_t pos = rng() % bytes.size();
      switch (rng() % 4) {
        case 0: bytes[pos] = char(rng()); break;
        case 1: bytes[pos] = "0123456789[]{}\",:-."[rng() % 19]; break;
        case 2: bytes.resize(pos); break;
        default: bytes.insert(pos, 1, char(rng())); break;
      }
      if (bytes.empty()) break;
    }
    std::string path = dir.file("fuzz.safetensors");
    write_bytes(path, bytes);
    try {
      auto file = SafetensorsFile::open(path);
      for (const TensorInfo& info : file->tensors()) {
        Tensor t = file->tensor(info.name);
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < t.nbytes(); ++i) sink = sink ^ t.ptr<uint8_t>()[i];
      }
      ++opened;
    } catch (const Error&) {
    }
  }
  EXPECT_GT(opened, 0);  // some mutations (e.g. inside tensor data) leave a valid file
}

// ---- bad checkpoint directories -------------------------------------------------------------

namespace {
// A directory with one valid shard "shard-1.safetensors" holding tensor "w".
void make_shard(const TempDir& dir) {
  SafetensorsWriter writer;
  writer.add("w", filled({2}, DType::F32, 1));
  writer.write(dir.file("shard-1.safetensors"));
}
testing::AssertionResult open_dir_fails(const TempDir& dir, const std::vector<std::string>& phrases) {
  return throws_error([&] { SafetensorsSet::open_dir(dir.str()); }, phrases);
}
}  // namespace

TEST(SafetensorsBadDir, DirectoryDoesNotExist) {
  TempDir dir;
  EXPECT_TRUE(throws_error([&] { SafetensorsSet::open_dir(dir.file("nothing")); }, {"nothing", "does not exist"}));
}

TEST(SafetensorsBadDir, NeitherModelFileNorIndex) {
  TempDir dir;
  EXPECT_TRUE(open_dir_fails(dir, {dir.str() + " contains neither model.safetensors nor model.safetensors.index.json"}));
}

TEST(SafetensorsBadDir, IndexNotJson) {
  TempDir dir;
  write_bytes(dir.file("model.safetensors.index.json"), "{\"weight_map\": ");
  EXPECT_TRUE(open_dir_fails(dir, {"model.safetensors.index.json", "not valid JSON"}));
}

TEST(SafetensorsBadDir, IndexNotAnObject) {
  TempDir dir;
  write_bytes(dir.file("model.safetensors.index.json"), "[]");
  EXPECT_TRUE(open_dir_fails(dir, {"model.safetensors.index.json", "not a JSON object"}));
}

TEST(SafetensorsBadDir, IndexWithoutWeightMap) {
  TempDir dir;
  write_bytes(dir.file("model.safetensors.index.json"), R"({"metadata": {"total_size": 8}})");
  EXPECT_TRUE(open_dir_fails(dir, {"model.safetensors.index.json", "has no \"weight_map\""}));
  write_bytes(dir.file("model.safetensors.index.json"), R"({"weight_map": ["w"]})");
  EXPECT_TRUE(open_dir_fails(dir, {"model.safetensors.index.json", "\"weight_map\" that is not an object"}));
}

TEST(SafetensorsBadDir, IndexMapsToANonString) {
  TempDir dir;
  make_shard(dir);
  write_bytes(dir.file("model.safetensors.index.json"), R"({"weight_map": {"w": 1}})");
  EXPECT_TRUE(open_dir_fails(dir, {"model.safetensors.index.json", "tensor \"w\" to the number 1"}));
}

TEST(SafetensorsBadDir, IndexNamesAMissingShard) {
  TempDir dir;
  make_shard(dir);
  write_bytes(dir.file("model.safetensors.index.json"),
              R"({"weight_map": {"w": "shard-1.safetensors", "v": "shard-2.safetensors"}})");
  EXPECT_TRUE(open_dir_fails(dir, {"model.safetensors.index.json", "shard-2.safetensors", "does not exist"}));
}

TEST(SafetensorsBadDir, IndexMapsATensorToAShardWithoutIt) {
  TempDir dir;
  make_shard(dir);
  write_bytes(dir.file("model.safetensors.index.json"), R"({"weight_map": {"w": "shard-1.safetensors", "v": "shard-1.safetensors"}})");
  EXPECT_TRUE(open_dir_fails(dir, {"model.safetensors.index.json", "shard-1.safetensors has no tensor \"v\""}));
}

TEST(SafetensorsBadDir, IndexShardOutsideTheDirectory) {
  TempDir dir;
  write_bytes(dir.file("model.safetensors.index.json"), R"({"weight_map": {"w": "../elsewhere.safetensors"}})");
  EXPECT_TRUE(open_dir_fails(dir, {"model.safetensors.index.json", "not a file name inside"}));
}

TEST(SafetensorsBadDir, BadShardIsNamed) {
  TempDir dir;
  write_bytes(dir.file("shard-1.safetensors"), "garbage");
  write_bytes(dir.file("model.safetensors.index.json"), R"({"weight_map": {"w": "shard-1.safetensors"}})");
  EXPECT_TRUE(open_dir_fails(dir, {"shard-1.safetensors", "truncated"}));
}

TEST(SafetensorsBadDir, MissingTensorLookup) {
  TempDir dir;
  make_shard(dir);
  write_bytes(dir.file("model.safetensors.index.json"), R"({"weight_map": {"w": "shard-1.safetensors"}})");
  SafetensorsSet set = SafetensorsSet::open_dir(dir.str());
  EXPECT_TRUE(set.contains("w"));
  EXPECT_EQ(set.find("nope"), nullptr);
  EXPECT_TRUE(throws_error([&] { set.tensor("nope"); }, {dir.str(), "has no tensor \"nope\""}));
  EXPECT_TRUE(throws_error([&] { set.file_of("nope"); }, {dir.str(), "has no tensor \"nope\""}));
}

// ---- writer failures ------------------------------------------------------------------------

TEST(SafetensorsWriter, FailedWriteThrowsAndLeavesNoFile) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("w", filled({4}, DType::F32, 1));
  std::string path = dir.file("no-such-dir/out.safetensors");
  EXPECT_TRUE(throws_error([&] { writer.write(path); }, {"out.safetensors"}));
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(dir.listing().empty());
}

TEST(SafetensorsWriter, FailedRenameRemovesTheTemporaryFile) {
  TempDir dir;
  fs::create_directory(dir.file("occupied"));
  SafetensorsWriter writer;
  writer.add("w", filled({4}, DType::F32, 1));
  EXPECT_TRUE(throws_error([&] { writer.write(dir.file("occupied")); }, {"occupied", "renaming"}));
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"occupied"});
}

TEST(SafetensorsWriter, OverwritesAnExistingFileWhole) {
  TempDir dir;
  std::string path = dir.file("model.safetensors");
  SafetensorsWriter big;
  big.add("w", filled({1000}, DType::F32, 1));
  big.write(path);
  SafetensorsWriter small;
  small.add("v", filled({2}, DType::F32, 2));
  small.write(path);
  auto file = SafetensorsFile::open(path);
  EXPECT_FALSE(file->contains("w"));
  EXPECT_EQ(file->data_bytes(), 8u);
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"model.safetensors"});
}

TEST(SafetensorsWriter, RejectsDuplicateAndReservedNames) {
  SafetensorsWriter writer;
  writer.add("w", filled({1}, DType::F32, 1));
  EXPECT_TRUE(throws_error([&] { writer.add("w", filled({1}, DType::F32, 1)); }, {"already has a tensor named \"w\""}));
  EXPECT_TRUE(throws_error([&] { writer.add("__metadata__", filled({1}, DType::F32, 1)); }, {"__metadata__"}));
  EXPECT_TRUE(throws_error([&] { writer.add("bad\xff", filled({1}, DType::F32, 1)); }, {"not valid UTF-8"}));
  EXPECT_EQ(writer.size(), 1u);
}

TEST(SafetensorsWriter, ShardedIntoAMissingDirectoryFails) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("w", filled({1}, DType::F32, 1));
  EXPECT_TRUE(throws_error([&] { writer.write_sharded(dir.file("missing"), 100); }, {"missing", "not an existing directory"}));
  EXPECT_TRUE(throws_error([&] { writer.write_sharded(dir.str(), 0); }, {"limit of 0 bytes"}));
  EXPECT_TRUE(dir.listing().empty());
}
