"""Per-rank memory of the sample order at 10^6 and 10^9 samples: does it stay flat?

Each size runs in a fresh process that does what a rank does with its data (the rank's imports,
torch included; open_data on a token store; batches drawn at positions in the first, a middle and
a later epoch). The store is simulated: a token file that is a hole (no disk, reads give zeros)
and one row, so the only thing that grows with the sample count is the order. Reported: the
process's peak RSS (VmHWM) after the imports and at the end, and the growth between them.
Baseline, in the same run: the stored permutations the order replaced (two of n int64, as
numpy's permutation made them), at 10^6 samples; at 10^9 they would take 16 GB, so they are
computed, not run.

    python bench/order_memory.py      # about 30 s
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRETRAIN_TEXT, save_results, table, work_dir  # noqa: E402

SEQ_LEN = 4

RANK = """
import json, sys
import numpy as np
from harness.plan import DataSpec
from harness.records.token_store import META, OFFSETS, STORE_FORMAT, TOKENS, StoreMeta, StoreRequest
from harness.worker.data import SampleStream
from harness.worker.objectives import open_data

def peak_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024

folder, samples, seq_len, how, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
imported = peak_mb()
if how == "stored":  # the order before: a split permutation and an epoch permutation, n int64 each
    rng = np.random.default_rng(1234)
    split, epoch = rng.permutation(samples), rng.permutation(samples - 64)
    drawn = [split[epoch[p % (samples - 64)]] for p in (0, samples // 2)]
else:
    request = StoreRequest(kind="pretrain", data=DataSpec(files=[text]), tokenizer="bytes", cache_dir=folder, where="data", key="simulated")
    request.folder.mkdir(parents=True)
    tokens = samples * seq_len
    with open(request.folder / TOKENS, "wb") as f:
        f.truncate(2 * tokens)  # a hole: no disk space
    np.array([0, tokens], np.int64).tofile(request.folder / OFFSETS)
    (request.folder / META).write_text(StoreMeta(format=STORE_FORMAT, key=request.key, kind="pretrain", dtype="uint16", rows=1,
                                                 tokens=tokens, input_bytes=0, inputs=["simulated"], tokenizer="bytes-v1",
                                                 build_seconds=0).model_dump_json())
    stream = SampleStream(open_data(request, seq_len, 1234, 0))
    for position in (0, samples // 2, 3 * samples + 5):
        stream.batch(position, 64)
print(json.dumps({"imported_mb": imported, "end_mb": peak_mb()}))
"""


def measure(folder: Path, samples: int, how: str) -> dict:
    """Peak RSS of one rank-like process ordering `samples` samples (how: 'computed' or 'stored')."""
    out = subprocess.run([sys.executable, "-c", RANK, str(folder / f"{how}-{samples}"), str(samples), str(SEQ_LEN), how, str(PRETRAIN_TEXT)],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    return {"samples": samples, "how": how, **result, "growth_mb": result["end_mb"] - result["imported_mb"]}


def main() -> None:
    folder = work_dir("order-memory")
    results = [measure(folder, 10**6, "stored"), measure(folder, 10**6, "computed"), measure(folder, 10**9, "computed")]
    base = results[1]
    rows = [[f"{r['samples']:,}", r["how"], f"{r['imported_mb']:.0f}", f"{r['end_mb']:.0f}", f"{r['growth_mb']:.1f}",
             f"{r['end_mb'] / base['end_mb']:.3f}"] for r in results]
    rows.append(["1,000,000,000", "stored (computed: 2 x 8 bytes x n)", "", "", f"{2 * 8 * 10**9 / 2**20:,.0f}", ""])
    print(table(["samples", "order", "peak RSS MB after imports", "peak RSS MB at end", "growth MB", "end vs computed 10^6"], rows))
    print(f"wrote {save_results('order-memory', {'results': results})}")


if __name__ == "__main__":
    main()
