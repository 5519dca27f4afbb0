"""Compares two fine-tuning runs' metrics.jsonl row by row (same step and keys), leaving out the
timing metrics, and says where they first differ.

    python compare.py A/metrics.jsonl B/metrics.jsonl
"""

import json
import sys

TIMING = ("second", "fps", "per_s", "updates/s", "restarts", "flops")  # and the compile statistics


def rows(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main(path_a, path_b):
    equal, last = 0, None
    for row, other in zip(rows(path_a), rows(path_b)):  # two identical runs log the same rows in the same order
        if row["step"] != other["step"] or sorted(row) != sorted(other):
            print(f"step {row['step']}: the rows differ in step or keys ({other['step']}); first difference")
            break
        differing = [k for k in row if not any(t in k for t in TIMING) and row[k] != other[k]]
        if differing:
            k = differing[0]
            print(f"step {row['step']}: {len(differing)} metrics differ, e.g. {k} {row[k]!r} vs {other[k]!r}; first difference")
            break
        equal += sum(1 for k in row if not any(t in k for t in TIMING))
        last = row["step"]
    print(f"identical up to and including step {last}: {equal} values (timing metrics left out)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
