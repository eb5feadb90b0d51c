"""The fp8 recipe's proof that it trains: the built-in demo's stage 2 again, with model.fp8 (hybrid,
delayed scaling) over the demo's fp32, beside the fp32 run README command 1 just made (the `demo`
fixture), then the demo's evaluation of the FP8-trained model.

Passes when the mean loss of the last 100 steps is within 2% of the starting loss of the fp32 run's
(the two runs round differently, so their last steps wander apart by a few hundredths of a nat on
losses near zero: a relative bound on the final loss itself would measure that noise), every
decoder linear layer stayed in FP8, and the exact-match accuracy on the held-out images is in the
demo's band (>= 90%, what `neva-run demo` requires of itself).

Usage: fp8_demo_check.py NEVA_RUN DEMO_DIR
"""
import json
import pathlib
import subprocess
import sys


def losses(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main():
    neva_run, demo = sys.argv[1], pathlib.Path(sys.argv[2])
    out = demo / "runs" / "stage2-fp8"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    subprocess.run([neva_run, str(demo / "stage2.toml"), "--set", "exp_manager.explicit_log_dir=runs/stage2-fp8",
                    "--set", "model.fp8=true", "--set", "model.fp8_hybrid=true", "--set", "model.fp8_check_interval=100"],
                   check=True)
    answers = demo / "runs" / "eval-fp8.jsonl"
    hf = "runs/stage2-fp8/hf"
    subprocess.run([neva_run, str(demo / "eval.toml"), "--set", f"model.mm_cfg.llm.from_pretrained={hf}",
                    "--set", f"model.mm_cfg.vision_encoder.from_pretrained={hf}",
                    "--set", f"model.mm_cfg.mm_mlp_adapter.from_pretrained={hf}",
                    "--set", f"inference.output_file=runs/eval-fp8.jsonl"], check=True)
    fp32, fp8 = losses(demo / "runs" / "stage2"), losses(out)
    assert len(fp32) == len(fp8) >= 100, (len(fp32), len(fp8))
    start = sum(r["loss"] for r in fp32[:10]) / 10
    tail32 = sum(r["loss"] for r in fp32[-100:]) / 100
    tail8 = sum(r["loss"] for r in fp8[-100:]) / 100
    layers = fp8[-1].get("linear_layers")
    truth = [json.loads(line) for line in (demo / "data" / "test.jsonl").read_text().splitlines() if line.strip()]
    got = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]
    correct = sum(a["answer"].strip() == t["answer"] for a, t in zip(got, truth))
    accuracy = 100.0 * correct / len(truth)
    print(f"fp32: start {start:.4f}, last-100 mean {tail32:.5f}; fp8: last-100 mean {tail8:.5f} "
          f"(difference {abs(tail8 - tail32):.5f}, bound {0.02 * start:.4f}); layers {layers}; "
          f"fp8 accuracy {correct}/{len(truth)} = {accuracy:.1f}%")
    ok = abs(tail8 - tail32) <= 0.02 * start and layers and set(layers) == {"fp8"} and accuracy >= 90.0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
