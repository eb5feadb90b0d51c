"""TensorBoard reads what neva-run writes: trains the demo's stage 2 for 4 steps (checkpoints at 2 and
4), then "crashes" (the step-4 checkpoint removed) and resumes from step 2, and reads the run directory
with TensorBoard's own EventAccumulator (what `tensorboard --logdir` runs): every number of every
metrics.jsonl record is a scalar at its step with the same value (as float32), each step once (the
resumed launch's SessionLog START made TensorBoard drop what the first launch logged past step 2).
Also checks loss.png: 800 x 480, a white background with drawn lines and text.

Usage: tensorboard_check.py NEVA_RUN WORK_DIR
"""
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

from PIL import Image
from tensorboard.backend.event_processing import event_accumulator


def run(command):
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "NEVA_PLUGIN_PATH": ""})
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def flatten(prefix, value, out):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}/{key}" if prefix else key, item, out)


def float32(value):
    return struct.unpack("f", struct.pack("f", value))[0]


def main():
    neva_run, work = (pathlib.Path(a).resolve() for a in sys.argv[1:3])
    shutil.rmtree(work, ignore_errors=True)
    demo = work / "demo"
    run([neva_run, "demo", "--prepare-only", "--dir", demo])
    train = [neva_run, demo / "stage2.toml", "--set", f"exp_manager.explicit_log_dir={work / 'run'}",
             "--set", "model.mm_cfg.pretrain_mm_mlp_adapter=\"\"", "--set", "trainer.max_steps=4",
             "--set", "model.optim.sched.warmup_steps=1",
             "--set", "model.micro_batch_size=2", "--set", "model.global_batch_size=2",
             "--set", "exp_manager.export_hf=false", "--set", "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
             "--set", "exp_manager.checkpoint_callback_params.save_top_k=5"]
    run(train)
    events = sorted((work / "run").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    # A crash after step 4 was logged, before its checkpoint: the relaunch resumes from step 2.
    shutil.rmtree(work / "run" / "checkpoints" / "step-0000004")
    resumed = run(train)
    assert "step 2" in resumed.stderr, resumed.stderr
    assert len(list((work / "run").glob("events.out.tfevents.*"))) == 2

    expected = {}
    for line in (work / "run" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        values = {}
        flatten("", record, values)
        for tag, value in values.items():
            if tag != "step":
                expected.setdefault(tag, []).append((record["step"], value))
    accumulator = event_accumulator.EventAccumulator(str(work / "run"), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert tags == set(expected), f"TensorBoard's tags {sorted(tags)} != metrics.jsonl's {sorted(expected)}"
    for tag, points in expected.items():
        got = [(event.step, event.value) for event in accumulator.Scalars(tag)]
        assert [step for step, _ in got] == [1, 2, 3, 4], f"{tag}: steps {[step for step, _ in got]}"
        for (step, want), (_, value) in zip(points, got):
            assert value == float32(want), f"{tag} at step {step}: TensorBoard has {value}, metrics.jsonl {want}"
    print(f"TensorBoard read {len(tags)} scalar tags over steps 1-4 (resumed at 2), equal to metrics.jsonl")

    image = Image.open(work / "run" / "loss.png").convert("RGB")
    assert image.size == (800, 480), image.size
    colors = image.getcolors(800 * 480)
    white = max(colors)[1]
    assert white == (255, 255, 255), white
    dark = sum(count for count, color in colors if max(color) < 80)
    assert dark > 500, f"loss.png has {dark} dark pixels: no text or axes?"
    print(f"loss.png: {image.size[0]} x {image.size[1]}, {len(colors)} colours, {dark} dark pixels")


if __name__ == "__main__":
    main()
