"""The project's promises about itself: the library's import boundary, the command line."""

import subprocess
import sys
from pathlib import Path

from workflows import synthetic

RAYCLIP = Path(sys.executable).parent / "rayclip"


def test_clip_core_never_imports_ray_mlflow_or_torchvision():
    code = ("import sys, clip_core; clip_core.create_model('tiny'); clip_core.get_tokenizer()('a');"
            "print(sorted(m for m in ('ray', 'mlflow', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_demo_command_trains_and_predicts():
    result = subprocess.run([str(RAYCLIP), "demo", "--steps", "4", "--batch-size", "8"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "step    4/4  loss" in result.stdout
    assert "zero-shot top-1 on 256 images of 16 never-seen" in result.stdout
    assert "prediction for a held-out image of a" in result.stdout


def test_cli_errors_are_one_clear_line():
    result = subprocess.run([str(RAYCLIP), "demo", "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "rayclip demo: error: the demo needs steps >= 1 and batch_size >= 2 (contrastive pairs)"


def test_synthetic_heldout_classes_never_appear_in_training():
    heldout = set(synthetic.heldout_class_names())
    assert len(heldout) == 16
    seen = {sample.classname for sample in synthetic.samples(600, split="train")}
    assert seen and not seen & heldout
    # yet every colour and every shape is seen in training with some partner
    assert {name.split()[0] for name in seen} == set(synthetic.COLORS)
    assert {name.split()[1] for name in seen} == set(synthetic.SHAPES)
    assert {s.classname for s in synthetic.samples(200, split="heldout")} <= heldout


def test_synthetic_samples_are_deterministic():
    first = next(synthetic.samples(1, seed=7, start=5))
    again = next(synthetic.samples(1, seed=7, start=5))
    assert first.caption == again.caption and first.image.tobytes() == again.image.tobytes()
    assert first.classname.split()[0] in first.caption and first.classname.split()[1] in first.caption


def test_gpu_check_script_runs_end_to_end_on_cpu():
    from bench import gpu_check

    result = gpu_check.main(["--device", "cpu", "--dtype", "fp32", "--model", "tiny", "--batch-size", "4",
                             "--steps", "1", "--warmup", "1", "--report", ""])
    assert result["samples_per_s"] > 0
    # forward + backward ≈ 6 FLOPs per block weight per token: 6 blocks of 12 * 256^2 weights per tower,
    # 65 image tokens and ~15 caption tokens per sample, 4 samples
    expected = 4 * 6 * (6 * 12 * 256**2) * (65 + 15)
    assert 0.8 * expected < result["tflops_per_step"] * 1e12 < 1.2 * expected
