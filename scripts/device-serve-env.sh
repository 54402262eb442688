# Sourced by the GPU-machine scripts that run on device-serve-data (device-serve.sh,
# device-gemv.sh): unpacks the build dependencies and the reference data it carries, and provides
# the programs — those packed here by scripts/device-pack.sh (device-bin/) when carried, else a
# build there in build/device-serve.
#   serve_env NAME                 checks and unpacks; sets deps, shared, LD_LIBRARY_PATH
#   serve_programs NAME TARGET...  sets bin to the folder holding the programs
serve_env() {
  local name=$1 data=device-serve-data f
  for f in deps.tar.xz shared.tar.xz; do
    [ -s "$data/$f" ] || { echo "$name: $data/$f is missing: run 'bash scripts/device-serve.sh --prepare' here and carry $data" >&2; exit 1; }
  done
  deps=/tmp/fathom-deps
  rm -rf "$deps" /tmp/fathom-serve && mkdir -p "$deps" /tmp/fathom-serve
  tar -C "$deps" -xJf "$data/deps.tar.xz"
  tar -C /tmp/fathom-serve -xJf "$data/shared.tar.xz"
  export LD_LIBRARY_PATH="$deps/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  shared=/tmp/fathom-serve/shared/data
  echo "$name: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU')"
}
serve_programs() {
  local name=$1
  shift
  if [ -s device-bin/bin.tar.xz ]; then
    bin=/tmp/fathom-bin
    rm -rf "$bin" && mkdir -p "$bin" && tar -C "$bin" -xJf device-bin/bin.tar.xz
    echo "$name: the programs packed here (device-bin/)"
    # the CLI tests run the packed fathom program when it is there (device-pack.sh ... fathom)
    if [ -x "$bin/fathom" ]; then export FATHOM_TEST_BINARY="$bin/fathom"; fi
    return
  fi
  bin=build/device-serve
  cmake -S . -B "$bin" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_BENCH=ON -DFATHOM_TESTS=ON \
    -DFATHOM_DEPS_DIR="$deps" -DFATHOM_SHARED_DATA_DIR="$shared" >/dev/null
  cmake --build "$bin" --target "$@" 2>&1 | grep -E "warning:|error:|FAILED" || true
  cmake --build "$bin" --target "$@" >/dev/null
}
