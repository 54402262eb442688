#!/usr/bin/env python3
"""The HuggingFace `tokenizers` (Rust) peer of bench_tokenizer.

Loads tokenizer.json with `tokenizers.Tokenizer.from_file` and encodes a corpus file without
special tokens added:
  * single thread: `encode` on the whole text (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false);
  * batch: `encode_batch` on the corpus cut into chunks of whole lines (a chunk ends at the
    first line end at or after --chunk-bytes bytes from its start; bench_tokenizer cuts the
    same way), once per thread count. Rayon's pool is sized once per process, so each thread
    count runs in a child process of this script with RAYON_NUM_THREADS set.

usage: python3 bench/tokenizer_peer_hf.py [--tokenizer DIR_OR_JSON] [--runs N] [--chunk-bytes B]
                                          [--threads 1,2,4] [--dump-ids FILE] CORPUS
Prints one JSON line: {"impl", "load_ms", "bytes", "mb_per_s", "seconds", "n_ids", "ids_sha256",
"batch": [{"threads", "chunks", "mb_per_s", "seconds", "n_ids", "ids_sha256"}, ...]}.
ids_sha256 is the sha256 of the ids as decimal text joined by ',' (for the batch: all chunks'
ids in order, joined the same way); --dump-ids writes that text for the single-thread ids.
Timing: warm-up once on the first 256 KiB, then `runs` runs; the best one counts.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time


def split_chunks(data: bytes, chunk_bytes: int):
    """Whole-line chunks: each ends at the first b'\\n' at or after chunk_bytes from its start."""
    chunks, start, n = [], 0, len(data)
    while start < n:
        end = data.find(b"\n", min(start + chunk_bytes, n) - 1)
        end = n if end < 0 else end + 1
        chunks.append(data[start:end])
        start = end
    return chunks


def ids_text(ids) -> str:
    return ",".join(map(str, ids))


def tokenizer_json_path(p: str) -> str:
    return os.path.join(p, "tokenizer.json") if os.path.isdir(p) else p


def load(path: str):
    from tokenizers import Tokenizer  # imported after the thread variables are set
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(tokenizer_json_path(path))
    return tok, (time.perf_counter() - t0) * 1e3


def run_batch_worker(args, data: bytes):
    """Child process: encode_batch over the chunks on RAYON_NUM_THREADS threads."""
    tok, _ = load(args.tokenizer)
    chunks = [c.decode("utf-8") for c in split_chunks(data, args.chunk_bytes)]
    tok.encode_batch(chunks[: max(1, len(chunks) // 16)], add_special_tokens=False)  # warm-up
    best, encodings = float("inf"), None
    for _ in range(args.runs):
        t0 = time.perf_counter()
        encodings = tok.encode_batch(chunks, add_special_tokens=False)
        best = min(best, time.perf_counter() - t0)
    all_ids = [i for e in encodings for i in e.ids]
    return {
        "threads": args.batch_worker,
        "chunks": len(chunks),
        "mb_per_s": len(data) / 1e6 / best,
        "seconds": best,
        "n_ids": len(all_ids),
        "ids_sha256": hashlib.sha256(ids_text(all_ids).encode()).hexdigest(),
    }


def main():
    ap = argparse.ArgumentParser(description="HF tokenizers peer of bench_tokenizer")
    ap.add_argument("corpus")
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                        "shared", "data", "deepseek-v3-tokenizer"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chunk-bytes", type=int, default=4096)
    ap.add_argument("--threads", default="", help="comma-separated thread counts for encode_batch; none: skip")
    ap.add_argument("--dump-ids", default="")
    ap.add_argument("--batch-worker", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.runs = max(1, args.runs)

    with open(args.corpus, "rb") as f:
        data = f.read()

    if args.batch_worker:
        print(json.dumps(run_batch_worker(args, data)), flush=True)
        return

    # Single thread: no Rayon pool beyond one thread, no parallel paths.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["RAYON_RS_NUM_CPUS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import tokenizers
    tok, load_ms = load(args.tokenizer)
    text = data.decode("utf-8")
    tok.encode(text[: 256 * 1024], add_special_tokens=False)  # warm-up
    best, ids = float("inf"), None
    for _ in range(args.runs):
        t0 = time.perf_counter()
        ids = tok.encode(text, add_special_tokens=False).ids
        best = min(best, time.perf_counter() - t0)
    text_ids = ids_text(ids)
    if args.dump_ids:
        with open(args.dump_ids, "w") as f:
            f.write(text_ids)
    result = {
        "impl": f"HF tokenizers {tokenizers.__version__} (Python {sys.version.split()[0]})",
        "load_ms": load_ms,
        "bytes": len(data),
        "mb_per_s": len(data) / 1e6 / best,
        "seconds": best,
        "n_ids": len(ids),
        "ids_sha256": hashlib.sha256(text_ids.encode()).hexdigest(),
        "batch": [],
    }

    for n in [int(t) for t in args.threads.split(",") if t.strip()]:
        env = dict(os.environ, RAYON_NUM_THREADS=str(n), RAYON_RS_NUM_CPUS=str(n), TOKENIZERS_PARALLELISM="true")
        cmd = [sys.executable, os.path.abspath(__file__), args.corpus, "--tokenizer", args.tokenizer,
               "--runs", str(args.runs), "--chunk-bytes", str(args.chunk_bytes), "--batch-worker", str(n)]
        out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
        result["batch"].append(json.loads(out.strip().splitlines()[-1]))

    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
