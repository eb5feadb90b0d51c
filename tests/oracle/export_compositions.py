"""Export beyond the demo: trains each composition below for two steps on the demo's data with
`neva-run` (tiny random models from configs/tiny/models, stage 2, export_hf = true), then records what
transformers makes of each exported directory (export_oracle.record) for test_export_oracle.cpp:
SigLIP towers (no class token: transformers' "full" strategy, 729 image tokens), Mistral, Mixtral and
Nemotron-4 text configs inside LlavaForConditionalGeneration.

Usage: export_compositions.py NEVA_RUN TINY_MODELS_DIR WORK_DIR OUTPUT_DIR
"""
import os
import pathlib
import shutil
import subprocess
import sys

from export_oracle import record

COMPOSITIONS = {  # name: (llm plugin, tiny llm config, vision plugin, tiny vision config)
    "mistral_siglip": ("mistral", "mistral", "siglip", "siglip-so400m"),
    "nemotron4_siglip": ("nemotron4", "nemotron-4", "siglip", "siglip-so400m"),
    "mixtral_clip": ("mixtral", "mixtral", "clip", "clip-vit-l-336"),
}


def run(command):
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "NEVA_PLUGIN_PATH": ""})
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def main():
    neva_run, models, work, out = (pathlib.Path(a).resolve() for a in sys.argv[1:5])
    shutil.rmtree(work, ignore_errors=True)
    demo = work / "demo"
    run([neva_run, "demo", "--prepare-only", "--dir", demo])
    stage2 = (demo / "stage2.toml").read_text()
    base = stage2[:stage2.index("[model.mm_cfg.llm]")]
    for name, (llm, llm_config, vision, vision_config) in COMPOSITIONS.items():
        recipe = demo / f"{name}.toml"
        recipe.write_text(base + f'[model.mm_cfg.llm]\nplugin = "{llm}"\nconfig = "{models / llm_config}/config.json"\n'
                          f'freeze = false\n\n[model.mm_cfg.vision_encoder]\nplugin = "{vision}"\n'
                          f'config = "{models / vision_config}/config.json"\nfreeze = true\n')
        run([neva_run, recipe, "--set", f"exp_manager.explicit_log_dir={work / name}",
             "--set", "model.mm_cfg.pretrain_mm_mlp_adapter=\"\"", "--set", "trainer.max_steps=2",
             "--set", "model.optim.sched.warmup_steps=1", "--set", "model.micro_batch_size=2",
             "--set", "model.global_batch_size=2", "--set", "model.encoder_seq_length=1024",
             "--set", "exp_manager.export_hf=true"])
        record(work / name / "hf", demo / "data" / "images" / "test" / "1.png", out / name,
               {"llm_plugin": llm, "vision_plugin": vision,
                "checkpoint": str(work / name / "checkpoints" / "step-0000002")})
        print(f"{name}: exported and recorded")


if __name__ == "__main__":
    main()
