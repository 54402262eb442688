// fathom convert: a checkpoint rewritten as FP8 (DeepSeek's 128x128 block scales), BF16 or F32
// (src/model/convert.h).
#include <cstdio>
#include <memory>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "model/convert.h"

namespace fathom::cli {

Command add_convert(CLI::App& app) {
  struct Args {
    std::string in, out, dtype = "fp8";
    double shard_mb = 16;
  };
  auto a = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand(
      "convert", "rewrite a checkpoint as FP8 e4m3 with 128x128 block scales (DeepSeek's layout), BF16 or F32");
  cmd->add_option("--model", a->in, "the checkpoint directory to read")->required();
  cmd->add_option("-o,--out", a->out, "the new checkpoint directory (must not exist, or be empty)")->required();
  cmd->add_option("--dtype", a->dtype, "fp8, bf16 or f32")->check(CLI::IsMember({"fp8", "bf16", "f32"}));
  cmd->add_option("--shard-mb", a->shard_mb, "safetensors shards of at most this many MiB (0: one file)")
      ->check(CLI::Range(0.0, 1e6));
  return [=] {
    ConvertOptions o;
    o.dtype = a->dtype == "fp8" ? DType::F8_E4M3 : a->dtype == "bf16" ? DType::BF16 : DType::F32;
    o.max_shard_bytes = size_t(a->shard_mb * 1024 * 1024);
    const ConvertSummary s = convert_checkpoint(a->in, a->out, o);
    std::printf("%lld tensors, %.1f MiB in %d shard%s: %s\n", (long long)s.tensors, double(s.bytes) / (1 << 20), s.shards,
                s.shards == 1 ? "" : "s", a->out.c_str());
  };
}

}  // namespace fathom::cli
