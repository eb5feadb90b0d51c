"""The regression guard of the bench scripts: `--save FILE` keeps a run's printed figures, `--compare
REF` prints the run again with every figure that moved annotated by its ratio to the reference.

    bench_guard.py save OUTPUT.txt FILE        (a copy, with the machine line)
    bench_guard.py compare OUTPUT.txt REF.txt  (lines matched by their words, numbers compared in order)

A line of a bench script's output is its words with the numbers taken out; lines of the two runs with
the same words are the same figure, and each number that differs gets "(x ratio)" after it. It reads
what the scripts print, so every scripts/bench_*.sh has the guard without a format of its own. A
comparison, not a test: speed targets are judged in docs/benchmarks.md with the machine in view.
"""
import re
import shutil
import sys

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def figures(path):
    table = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("machine:"):  # the sitting's description (its date is no figure)
            continue
        key = NUMBER.sub("#", line)
        if "#" in key:
            table.setdefault(key, []).append((line, [float(x) for x in NUMBER.findall(line)]))
    return table


def compare(result, reference):
    old = figures(reference)
    seen = {}
    moved = 0
    for key, entries in figures(result).items():
        for index, (line, values) in enumerate(entries):
            if key not in old or index >= len(old[key]):
                print(f"{line}   (not in the reference)")
                continue
            before = old[key][index][1]
            parts, position = [], 0
            for match, now, then in zip(NUMBER.finditer(line), values, before):
                parts.append(line[position:match.end()])
                position = match.end()
                if now != then:
                    parts.append(f" (x{now / then:.3f})" if then else " (reference 0)")
                    moved += 1
            parts.append(line[position:])
            print("".join(parts))
            seen[key] = index + 1
    for key, entries in old.items():
        for line, _ in entries[seen.get(key, 0):]:
            print(f"missing from this run: {line}")
    print(f"{moved} figure(s) differ from {reference}")


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("save", "compare"):
        sys.exit(__doc__)
    if sys.argv[1] == "save":
        shutil.copyfile(sys.argv[2], sys.argv[3])
    else:
        compare(sys.argv[2], sys.argv[3])


if __name__ == "__main__":
    main()
