"""Ratios of a benchmark result against a stored one, so that a change that slows a path shows in
review: every number both JSON files hold (nested keys joined with '.'), new / reference.

Usage: bench_compare.py RESULT.json REFERENCE.json
Prints one line per figure; exits 0 (a comparison, not a test: speed targets live in
docs/benchmarks.md, judged by people with the machine in front of them).
"""
import json
import sys


def flatten(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix, float(value)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: bench_compare.py RESULT.json REFERENCE.json")
    result, reference = (dict(flatten(json.load(open(path)))) for path in sys.argv[1:])
    width = max((len(key) for key in result), default=0)
    for key, value in result.items():
        if key not in reference:
            print(f"{key:<{width}}  {value:12.4g}  (not in the reference)")
        elif reference[key] == 0:
            print(f"{key:<{width}}  {value:12.4g}  reference 0")
        else:
            print(f"{key:<{width}}  {value:12.4g}  reference {reference[key]:12.4g}  ratio {value / reference[key]:.3f}")
    for key in reference.keys() - result.keys():
        print(f"{key:<{width}}  missing (the reference has {reference[key]:.4g})")


if __name__ == "__main__":
    main()
