"""MB/s of `minicpm prepare` on the stdlib corpus against a single-process loop of `Tokenizer.encode_batch`.

Both run in this one invocation, alternating, on the same text and tokenizer; the best and the median of
`--repeats` runs of each are reported. Ours is the real command end to end (process start, reading files, encoding
in worker threads, writing and checksumming shards). The peer gets the text already in memory and only encodes it
(HF tokenizers' own thread pool on, as by default) and takes the ids out, batch by batch. Each run of either
side is a fresh process.

    python benchmarks/prepare.py [--tokenizer T] [--vocab-size 8192] [--workers N] [--repeats 3]

Without --tokenizer it first trains one on the stdlib corpus and reports how long that took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from minicpm.data.prepare import BATCH_BYTES, default_workers
from minicpm.data.sources import iter_documents
from minicpm.data.tokenizer import load_tokenizer, train_tokenizer, vocab_size


def stdlib_texts() -> list[str]:
    return [d.text for d in iter_documents("stdlib") if d.text]


def peer_seconds(tokenizer: Path) -> float:
    """The peer, in a fresh process like ours (neither inherits the other's heap or threads); only its loop is timed."""
    proc = subprocess.run([sys.executable, __file__, "--peer-once", "--tokenizer", str(tokenizer)],
                          check=True, capture_output=True, text=True)
    return float(proc.stdout.split()[-1])


def peer_loop_seconds(tokenizer: Path, texts: list[str]) -> float:
    """A single-process loop of Tokenizer.encode_batch over the texts, in batches like ours."""
    tok = load_tokenizer(tokenizer)
    batches, batch, size = [], [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    started = time.perf_counter()
    ids: list[list[int]] = []
    for batch in batches:
        ids.extend(e.ids for e in tok.encode_batch(batch, add_special_tokens=False))
    return time.perf_counter() - started


def ours_seconds(tokenizer: Path, out: Path, workers: int) -> tuple[float, dict]:
    """`minicpm prepare stdlib` in a fresh process, wall clock."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minicpm", "prepare", "stdlib", "--tokenizer", str(tokenizer),
                    "--out", str(out), "--workers", str(workers), "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return seconds, json.loads((out / "meta.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="tokenizer to use (default: train one on the stdlib corpus)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="when training (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="ours (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (default: %(default)s)")
    parser.add_argument("--peer-once", action="store_true", help="time the peer's loop once and print the seconds")
    args = parser.parse_args()
    if args.peer_once:
        print(peer_loop_seconds(Path(args.tokenizer), stdlib_texts()))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"cores available: {default_workers()}, load average at start: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.tokenizer:
            tokenizer = Path(args.tokenizer)
        else:
            started = time.perf_counter()
            tokenizer = train_tokenizer(["stdlib"], args.vocab_size, tmp / "tok")
            print(f"trained a {vocab_size(load_tokenizer(tokenizer))}-token tokenizer on the stdlib corpus in "
                  f"{time.perf_counter() - started:.1f} s")
        texts = stdlib_texts()
        megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6

        ours, peer = [], []
        for _ in range(args.repeats):
            peer.append(peer_seconds(tokenizer))
            seconds, meta = ours_seconds(tokenizer, tmp / "shards", args.workers)
            ours.append(seconds)
        prepared = sum(s["bytes"] for s in meta["splits"].values()) / 1e6
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        assert abs(prepared - megabytes) < 1e-6, (prepared, megabytes)

        ours_rate, peer_rate = megabytes / min(ours), megabytes / min(peer)
        print(f"stdlib corpus: {len(texts)} documents, {megabytes:.1f} MB, {tokens:,} tokens; "
              f"{args.repeats} runs of each (best first, then the median); ours with --workers {args.workers}")
        print()
        print("| figure | ours (`minicpm prepare`) | peer (encode_batch loop) | ratio |")
        print("|---|---|---|---|")
        print(f"| seconds | {min(ours):.1f} | {min(peer):.1f} | {min(peer) / min(ours):.2f}x |")
        print(f"| MB/s | {ours_rate:.2f} | {peer_rate:.2f} | {ours_rate / peer_rate:.2f}x |")
        print(f"| median seconds | {median(ours):.1f} | {median(peer):.1f} | {median(peer) / median(ours):.2f}x |")
        print(f"| all runs (s) | {', '.join(f'{s:.1f}' for s in ours)} | {', '.join(f'{s:.1f}' for s in peer)} | |")


if __name__ == "__main__":
    main()
