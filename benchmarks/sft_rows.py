"""SFT rows: how many answer tokens an epoch trains with whole-conversation rows (ours) and with fixed windows over
the concatenated conversations (the pretraining layout, peer), the rows each takes, the filler ours adds, and the
time best-fit decreasing takes to pack a million conversations.

    python benchmarks/sft_rows.py CHAT_DIR [--seq-len 256 512]    # CHAT_DIR from `minicpm prepare --format chat`
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from minicpm.data.chat_rows import ConversationRows, best_fit_decreasing
from minicpm.data.shards import TokenDataset


def fixed_window_coverage(ds: TokenDataset, seq_len: int, seed: int = 0) -> tuple[float, int]:
    """Share of answer tokens that are targets in one epoch of fixed windows, and the number of windows: a token
    is a target only if its conversation starts inside the token's window (else the window lost the prompt)."""
    lengths = ds.document_lengths()
    order = np.random.default_rng(seed).permutation(len(lengths))
    starts = np.repeat(np.concatenate([[0], np.cumsum(lengths[order])[:-1]]), lengths[order])
    mask = np.concatenate([ds.loss_mask(int(ds.doc_starts[d]), int(ds.doc_starts[d + 1])) for d in order])
    p = np.arange(len(mask))
    window, windows = (p - 1) // seq_len, (len(mask) - 1) // seq_len  # label p of window w: w*seq_len+1 .. +seq_len
    trained = mask & (p >= 1) & (window < windows) & (starts >= window * seq_len)
    return trained.sum() / mask.sum(), windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chat_dir")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    ds = TokenDataset(args.chat_dir)
    lengths = ds.document_lengths()
    answers = int(ds.loss_mask(0, ds.num_tokens).sum())
    print(f"{args.chat_dir}: {len(lengths)} conversations, {answers} answer tokens")
    print(f"{'figure':<44} {'ours':>10} {'peer':>10} {'ratio':>7}")
    for seq_len in args.seq_len:
        peer, windows = fixed_window_coverage(ds, seq_len)
        rows = ConversationRows(args.chat_dir, ds, seq_len)
        kept = np.flatnonzero(lengths <= seq_len + 1)
        ours = sum(int(ds.loss_mask(int(ds.doc_starts[i]), int(ds.doc_starts[i + 1])).sum()) for i in kept) / answers
        filler = 1 - lengths[kept].sum() / (len(rows) * (seq_len + 1))
        print(f"{f'answer tokens trained per epoch, seq_len {seq_len}':<44} {ours:>10.1%} {peer:>10.1%} {ours / peer:>7.2f}")
        print(f"{f'rows per epoch, seq_len {seq_len}':<44} {len(rows):>10} {windows:>10} {len(rows) / windows:>7.2f}")
        print(f"{f'filler share of rows, seq_len {seq_len}':<44} {filler:>10.1%} {0:>10.1%} {'':>7}")
        print(f"{f'conversations skipped (too long), seq_len {seq_len}':<44} {rows.skipped_too_long:>10} {0:>10} "
              f"{'':>7}")
    synthetic = np.random.default_rng(0).integers(20, 1500, 1_000_000)
    started = time.perf_counter()
    packed = best_fit_decreasing(synthetic, 2049)
    print(f"{'pack 1M conversations (20-1500 tok) into 2049, s':<44} {time.perf_counter() - started:>10.1f} "
          f"{'-':>10} {'':>7}  ({len(packed)} rows)")


if __name__ == "__main__":
    main()
