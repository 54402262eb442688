#!/usr/bin/env bash
# Room for the GPU machine's data. A device call sends the working tree (tracked files, untracked
# files git does not ignore, the carried folders) up to 64 MiB in all; the shipped fathom-mini
# weights (models/fathom-mini, 41.6 MiB) would leave too little for device-test-data/ or
# device-mini-data/. A tracked file missing from the working tree does not travel, so:
#   bash scripts/device-room.sh hide      before the device calls: deletes the weights' shards
#                                         from the working tree (git still has them)
#   bash scripts/device-room.sh restore   after them: git checks the shards out again
# `status` says which state the tree is in. No device script reads models/fathom-mini's weights.
set -euo pipefail
cd "$(dirname "$0")/.."
shards=(models/fathom-mini/model-*-of-*.safetensors)
case "${1:-status}" in
  hide)
    [ -f "${shards[0]}" ] || { echo "device-room: the shards are already hidden"; exit 0; }
    git diff --quiet HEAD -- models/fathom-mini 2>/dev/null ||
      { echo "device-room: models/fathom-mini has uncommitted changes; commit them first" >&2; exit 1; }
    # skip-worktree: while hidden, `git add -A` / `commit -a` do not record the shards as deleted
    # (that happened on 2026-12-02, as it had with device-serve.sh's file before its guard)
    git update-index --skip-worktree "${shards[@]}"
    rm -f "${shards[@]}"
    echo "device-room: fathom-mini's shards hidden; 'bash scripts/device-room.sh restore' brings them back" ;;
  restore)
    git update-index --no-skip-worktree $(git ls-files 'models/fathom-mini/model-*-of-*.safetensors')
    git checkout -- models/fathom-mini
    echo "device-room: fathom-mini's shards restored" ;;
  status)
    if [ -f "${shards[0]}" ]; then echo "device-room: shards present (hide them before device calls)"; else echo "device-room: shards hidden"; fi ;;
  *)
    echo "usage: $0 hide | restore | status" >&2; exit 2 ;;
esac
