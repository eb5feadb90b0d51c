"""Operators of a PyTorch profiler trace by self time: what `neva-run` writes with trainer.profile
(profile.json) and what torch.profiler's export_chrome_trace writes for a Python run, so that two
runs of the same step can be compared operator by operator.

Usage: profile_summary.py TRACE.json [TOP]   (TOP rows, default 25)
Self time is an operator's duration minus that of the operators it called on the same thread.
"""
import collections
import json
import sys


def summarize(path, top):
    events = json.load(open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "kernel", "gpu_memcpy", "gpu_memset")]
    by_thread = collections.defaultdict(list)
    for e in ops:
        by_thread[(e.get("cat") == "cpu_op", e.get("pid"), e.get("tid"))].append(e)
    self_time = collections.Counter()
    calls = collections.Counter()
    for (is_cpu, _, _), items in by_thread.items():
        items.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # (end, name) of the operators enclosing the current one on this thread
        for e in items:
            name = e["name"] if is_cpu else "[gpu] " + e["name"][:60]
            while stack and e["ts"] >= stack[-1][0]:
                stack.pop()
            if stack:
                self_time[stack[-1][1]] -= e["dur"]  # the caller's time spent in this callee
            calls[name] += 1
            self_time[name] += e["dur"]
            stack.append((e["ts"] + e["dur"], name))
    total = sum(v for k, v in self_time.items() if not k.startswith("[gpu]"))
    print(f"{path}: {total / 1e3:.1f} ms of operator self time on the CPU")
    print(f"{'operator':<48} {'calls':>7} {'self ms':>10} {'share':>7}")
    for name, us in self_time.most_common(top):
        share = 100 * us / total if total and not name.startswith("[gpu]") else float("nan")
        print(f"{name[:48]:<48} {calls[name]:>7} {us / 1e3:>10.2f} {share:>6.1f}%")


if __name__ == "__main__":
    summarize(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
