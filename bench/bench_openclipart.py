"""The tiny preset's default recipe on real image-text data: Debian's openclipart (public-domain clip
art; a caption is each SVG's title and keywords), prepared once by `rayclip preprocess`, then trained by
the train stage and by OpenCLIP's own training script (`open_clip_train`) on the same prepared images
and captions, with the same architecture, batch, steps and hyperparameters. Both models (and an
untrained one, for chance) are scored by the same evaluation on a held-out split: zero-shot top-1
among the clip-art categories and image<->text retrieval. Writes bench/results/openclipart.md and
openclipart.png (the loss curves).

Needs the Debian packages (not used in CI): apt-get install openclipart-png openclipart-svg

    python bench/bench_openclipart.py [--epochs N]   # default: the recipe's 300 steps, in whole epochs
    python bench/bench_openclipart.py --patch-dropout 0.5   # two rows more: rayclip with patch dropout (FLIP),
                                                             # then also tuned on whole images for the last tenth
    python bench/bench_openclipart.py --seeds 3   # every row from 3 seeds: mean and standard deviation
    python bench/bench_openclipart.py --first-seed 2 --workdir /tmp/oc   # seed 2's runs, and keep their
                                                                          # checkpoints and data under /tmp/oc
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_core  # noqa: E402
from bench.common import markdown_table, plot_lines, write_report  # noqa: E402
from workflows.evaluate import EvaluateConfig, evaluate  # noqa: E402
from workflows.preprocess import PreprocessOptions, preprocess, read_manifest, read_prepared_table  # noqa: E402
from workflows.runtime import init_ray  # noqa: E402
from workflows.tracking import sqlite_uri  # noqa: E402
from workflows.train import RECIPES, TrainConfig, train  # noqa: E402

ROOT = Path("/usr/share/openclipart")
# the zero-shot classes: top-level folders holding a recognisable subject and >= 60 images
CLASSES = ["animals", "buildings", "computer", "food", "geography", "office", "people", "plants", "recreation",
           "shapes", "signs_and_symbols", "tools", "transportation"]
# the prompts' class names: the folder's, singular where the captions (titles and keywords) use the
# singular ("animal" is in 141 training captions, "animals" in 2), as zero-shot benchmarks curate their
# class names rather than take the folders'
PROMPT_NAMES = {"animals": "animal", "buildings": "building", "plants": "plant", "tools": "tool"}
TEMPLATES = ["{}", "clip art of {}."]
HELDOUT_PERCENT = 10
NS = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
      "cc": "http://web.resource.org/cc/"}
MODEL = "tiny"
PER_CLASS = "per class"  # scores()' per-class recall, reported in a table of its own


def caption(svg: Path) -> str:
    """'<title>. <keyword>, <keyword>, ...' from the SVG's Dublin Core metadata ('' when it has none)."""
    work = ElementTree.parse(svg).getroot().find(".//cc:Work", NS)
    if work is None:
        return ""
    title = " ".join((work.findtext("dc:title", default="", namespaces=NS) or "").split())
    keywords = []
    for item in work.findall("dc:subject/rdf:Bag/rdf:li", NS):
        word = " ".join((item.text or "").replace("_", " ").split()).lower()
        if word and word != "unsorted" and word not in keywords:
            keywords.append(word)
    return ". ".join(part for part in (title, ", ".join(keywords)) if part)


def build_csvs(root: Path, out: Path) -> dict:
    """train.csv (filepath, caption) and heldout.csv (filepath, caption, label): each image once (the
    packages link some files from several folders), a tenth of the CLASSES' images held out by a hash of
    their content, so a copy never sits on both sides."""
    from PIL import Image

    seen, rows, counts = set(), {"train": [], "heldout": []}, {"files": 0, "copies": 0, "no_caption": 0, "bombs": 0}
    for png in sorted((root / "png").rglob("*.png")):
        counts["files"] += 1
        data = png.read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen:
            counts["copies"] += 1
            continue
        seen.add(digest)
        try:  # the header only: what a loader without a reject path would meet
            Image.open(png).close()
        except Image.DecompressionBombError:
            counts["bombs"] += 1
        svg = root / "svg" / png.relative_to(root / "png").with_suffix(".svg")
        text = caption(svg) if svg.exists() else ""
        if not text:
            counts["no_caption"] += 1
            continue
        category = png.relative_to(root / "png").parts[0]
        heldout = category in CLASSES and int(digest[:8], 16) % 100 < HELDOUT_PERCENT
        rows["heldout" if heldout else "train"].append((str(png), text, category))
    largest = collections.Counter(category for _, _, category in rows["heldout"]).most_common(1)[0]
    counts.update(majority=largest[0].replace("_", " "), majority_share=largest[1] / len(rows["heldout"]))
    for split, items in rows.items():
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["filepath", "caption", "label"] if split == "heldout" else ["filepath", "caption"])
            writer.writerows(item if split == "heldout" else item[:2] for item in items)
        counts[split] = len(items)
    return counts


def prepared_images(out: Path) -> list[str]:
    """OpenCLIP's training set: the images rayclip's preprocessing kept, as it wrote them (JPEG, transparency
    composited on white, shortest side at the model's resolution), as files with a CSV (filepath, caption).
    Both systems then train on the same pixels and captions, and are scored on the same held-out pixels.
    Returns the original image paths of those rows."""
    table = read_prepared_table(str(out / "prepared-train"), ["key", "image", "caption"]).to_pydict()
    with open(out / "train.csv", newline="", encoding="utf-8") as file:
        originals = [row["filepath"] for row in csv.DictReader(file)]
    images = out / "openclip-images"
    images.mkdir()
    with open(out / "openclip-train.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "caption"])
        for index, (image, text) in enumerate(zip(table["image"], table["caption"])):
            (images / f"{index}.jpg").write_bytes(image)
            writer.writerow([str(images / f"{index}.jpg"), text])
    return [originals[int(key.rsplit(":", 1)[1])] for key in table["key"]]


def folder_share(kept: list[str], window: int) -> tuple[float, float]:
    """The mean share of the most common top-level folder among each `window` consecutive rows of the
    prepared training set (`kept`: its images' paths in stored order, from prepared_images), what a shuffle
    buffer of `window` rows draws a batch from; and the largest folder's share of the whole set (what a
    shuffled order's windows would show)."""
    order = [path.rsplit("/png/", 1)[1].split("/", 1)[0] for path in kept]
    shares = [collections.Counter(order[i:i + window]).most_common(1)[0][1] / len(order[i:i + window])
              for i in range(0, len(order), window)]
    return statistics.mean(shares), collections.Counter(order).most_common(1)[0][1] / len(order)


def transparency(paths: list[str], sample: int = 200) -> dict:
    """How many images have transparent pixels (from their headers), and in a sample of those, how many
    turn dark where transparent when converted to RGB as OpenCLIP's loader does (`Image.convert("RGB")`
    keeps the colour stored under the alpha; rayclip's composites them on white)."""
    import random

    import numpy as np
    from PIL import Image

    transparent = []
    for path in paths:
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                transparent.append(path)
    dark = 0
    chosen = random.Random(0).sample(transparent, min(sample, len(transparent)))
    for path in chosen:
        with Image.open(path) as image:
            alpha = np.asarray(image.convert("RGBA").getchannel("A"))
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        under = rgb[alpha == 0]
        dark += bool(len(under)) and float(under.mean()) < 32
    return {"transparent": len(transparent), "sampled": len(chosen), "dark": dark}


def classnames() -> list[str]:
    """The zero-shot prompts' class names, in CLASSES' order."""
    return [PROMPT_NAMES.get(name, name.replace("_", " ")) for name in CLASSES]


def prepare(out: Path) -> tuple[dict, float]:
    quiet = lambda *_: None  # noqa: E731
    started = time.perf_counter()
    size = clip_core.get_config(MODEL).vision.image_size
    preprocess(str(out / "train.csv"), str(out / "prepared-train"), PreprocessOptions(image_size=size), echo=quiet)
    (out / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    preprocess(str(out / "heldout.csv"), str(out / "prepared-heldout"),
               PreprocessOptions(image_size=size, label_key="label", classnames=str(out / "classnames.txt")),
               echo=quiet)
    return {split: read_manifest(str(out / f"prepared-{split}"))["counts"] for split in ("train", "heldout")}, \
        time.perf_counter() - started


def train_ours(out: Path, config: TrainConfig) -> dict:
    started = time.perf_counter()
    result = train(config, echo=lambda *_: None)
    wall = time.perf_counter() - started
    import mlflow

    client = mlflow.MlflowClient(config.mlflow_tracking_uri)
    loss = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "loss")}
    rate = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "samples_per_s")}
    scale = max(client.get_metric_history(result.mlflow_run_id, "logit_scale"), key=lambda m: m.step).value
    return {"checkpoint": config.output, "loss": loss, "samples_per_s": _steady(rate), "wall_s": wall,
            "logit_scale": scale}


def train_openclip(out: Path, epochs: int, config: TrainConfig) -> dict:
    """OpenCLIP's training script on the same CSV, architecture and hyperparameters as `config`, in its own
    process (fp32, CPU); what it writes goes under out/openclip-seed<seed>."""
    data, out = out, out / f"openclip-seed{config.seed}"
    models = out / "models"
    models.mkdir(parents=True)
    name = "rayclip-tiny"  # its model config: the same shapes, from clip_core
    (models / f"{name}.json").write_text(json.dumps(clip_core.checkpoint.openclip_model_config(
        clip_core.get_config(MODEL))))
    runner = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
              "from open_clip_train.main import main; main(sys.argv[2:])")
    args = ["--train-data", str(data / "openclip-train.csv"), "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "caption", "--model", name, "--device", "cpu",
            "--precision", "fp32", "--batch-size", str(config.batch_size), "--epochs", str(epochs),
            "--lr", str(config.lr), "--wd", str(config.weight_decay), "--warmup", str(config.warmup_steps),
            "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", str(config.grad_clip_norm),
            "--workers", "1", "--seed", str(config.seed), "--save-frequency", "0", "--zeroshot-frequency", "0",
            "--log-every-n-steps", "1", "--logs", str(out / "logs"), "--name", "run"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", runner, str(models), *args], capture_output=True, text=True, cwd=out)
    wall = time.perf_counter() - started
    log = out / "logs" / "run" / "out.log"
    if done.returncode:
        raise SystemExit(f"open_clip_train failed ({done.returncode}):\n{done.stderr[-4000:]}\n"
                         f"{log.read_text()[-4000:] if log.exists() else ''}")
    # 'Train Epoch: 0 [ 128/6016 (2%)] ... Batch (t): 3.9, 32.8/s, 32.8/s/gpu LR: ... Contrastive_loss: 4.85 (4.85)'
    loss, rate, scale = {}, {}, 0.0
    for step, line in enumerate((x for x in log.read_text().splitlines() if "Contrastive_loss:" in x), start=1):
        loss[step] = float(re.search(r"Contrastive_loss: ([0-9.]+)", line).group(1))
        rate[step] = float(re.search(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s", line).group(1))
        scale = float(re.search(r"Logit Scale: ([0-9.]+)", line).group(1))
    # its checkpoint loads as it is: clip_core infers the architecture and reads the activation from `name`
    model = clip_core.load_model(out / "logs" / "run" / "checkpoints" / f"epoch_{epochs}.pt")
    clip_core.save_checkpoint(model, out / "final")
    return {"checkpoint": str(out / "final"), "loss": loss, "samples_per_s": _steady(rate), "wall_s": wall,
            "logit_scale": scale}


def spread(values: list[float], form: str, unit: str = "") -> str:
    """'mean unit', or 'mean ± standard deviation unit' over several seeds."""
    mean = form.format(statistics.mean(values))
    return f"{mean} ± {form.format(statistics.stdev(values))}{unit}" if len(values) > 1 else f"{mean}{unit}"


def _reasons(counts: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts["rejected_by_reason"].items()) or "none"


def _steady(rate: dict[int, float]) -> float:
    """The median rate over the second half of the steps (start-up excluded)."""
    steps = sorted(rate)
    return statistics.median(rate[s] for s in steps[len(steps) // 2:])


def scores(out: Path, checkpoint: str) -> dict:
    heldout = str(out / "prepared-heldout")
    metrics = evaluate(EvaluateConfig(model=checkpoint, zeroshot=heldout, classnames=classnames(), templates=TEMPLATES,
                                      retrieval=heldout), echo=lambda *_: None)
    zeroshot = metrics["zeroshot"]
    return {"zero-shot top1": zeroshot["top1"], "zero-shot top5": zeroshot["top5"],
            "zero-shot mean per-class recall": zeroshot["mean_per_class_recall"],
            **{k: v for k, v in metrics["retrieval"].items() if k in ("image_to_text_R1", "image_to_text_R5",
                                                                      "text_to_image_R1", "text_to_image_R5")},
            PER_CLASS: zeroshot["per_class_recall"]}


def class_counts(out: Path) -> dict[str, tuple[int, float, float]]:
    """Per zero-shot class (by prompt name): its held-out images, and the shares of the training captions
    that name it by its prompt name and by its folder's name (the words as a phrase, any case): how often
    the prompt's words were seen in training."""
    labels = collections.Counter(read_prepared_table(str(out / "prepared-heldout"), ["label"])["label"].to_pylist())
    with open(out / "openclip-train.csv", newline="", encoding="utf-8") as file:
        captions = [row["caption"].lower() for row in csv.DictReader(file)]

    def share(words: str) -> float:
        phrase = re.compile(rf"\b{re.escape(words)}\b")
        return sum(bool(phrase.search(text)) for text in captions) / len(captions)

    return {name: (labels[index], share(name), share(folder.replace("_", " ")))
            for index, (name, folder) in enumerate(zip(classnames(), CLASSES))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training set (default: as many "
                        "as the recipe's steps make)")
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--patch-dropout", type=float, default=0.0, help="also train rayclip with this patch "
                        "dropout, and with it and unmasked tuning for the last tenth of the steps")
    parser.add_argument("--seeds", type=int, default=1, help="train every row from this many seeds (the recipe's "
                        "seed and the next ones); the table gives each metric's mean and standard deviation")
    parser.add_argument("--first-seed", type=int, default=None, help="the first seed (default: the recipe's)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the prepared data, checkpoints and MLflow "
                        "store in this new directory (default: a temporary one, removed at the end)")
    options = parser.parse_args()
    if options.workdir and options.workdir.exists():
        parser.error(f"--workdir {options.workdir}: exists; give a new directory")
    if options.seeds < 1:
        parser.error(f"--seeds {options.seeds}: give 1 or more")
    if not (options.root / "png").is_dir() or not (options.root / "svg").is_dir():
        raise SystemExit(f"no openclipart under {options.root}: apt-get install openclipart-png openclipart-svg")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # with its dashboard, as `rayclip` starts it: Ray Train's placement-group cleaner queries its State API
    init_ray(dashboard=True)
    recipe = RECIPES[MODEL]
    with contextlib.ExitStack() as stack:
        if options.workdir:
            options.workdir.mkdir(parents=True)
            out = options.workdir.resolve()
        else:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-openclipart-")))
        counts = build_csvs(options.root, out)
        prepared, prepare_s = prepare(out)
        kept = prepared_images(out)
        per_class_counts = class_counts(out)
        alpha = transparency(kept)
        # OpenCLIP counts whole epochs of full batches: both run exactly its number of steps
        steps_per_epoch = len(kept) // recipe["batch_size"]
        epochs = options.epochs or max(1, round(recipe["steps"] / steps_per_epoch))
        steps = epochs * steps_per_epoch
        # the recipe as the train stage resolves it for this many steps (a shorter run warms up for a tenth)
        config = TrainConfig(data=[str(out / "prepared-train")], model=MODEL, steps=steps, workers=1, log_every=1,
                             checkpoint_every=steps, storage=str(out / "runs"), output=str(out / "ours"),
                             mlflow_tracking_uri=sqlite_uri(str(out / "mlflow.db")))
        mixing, largest = folder_share(kept, config.shuffle_buffer)
        manifest = read_manifest(str(out / "prepared-train"))
        shards, stored = len(manifest["shards"]), sum(shard["bytes"] for shard in manifest["shards"])
        tuned = round(steps / 10)
        variants = {"rayclip": {}}
        if options.patch_dropout:
            variants[f"rayclip, patch dropout {options.patch_dropout:g}"] = {"patch_dropout": options.patch_dropout}
            variants[f"rayclip, patch dropout {options.patch_dropout:g}, last {tuned} steps unmasked"] = {
                "patch_dropout": options.patch_dropout, "unmasked_tuning_steps": tuned}
        first = config.seed if options.first_seed is None else options.first_seed
        seeds = [first + offset for offset in range(options.seeds)]
        runs: dict[str, list[dict]] = collections.defaultdict(list)  # name -> one run per seed
        results: dict[str, list[dict]] = collections.defaultdict(list)
        for seed in seeds:  # seed by seed: the rows of one seed run close in time (the machine's load drifts)
            for index, (name, update) in enumerate(variants.items()):
                where = out / f"rayclip-{index}-seed{seed}"
                runs[name].append(train_ours(out, config.model_copy(update={
                    "seed": seed, "storage": str(where / "runs"), "output": str(where / "final"), **update})))
            runs["OpenCLIP"].append(train_openclip(out, epochs, config.model_copy(update={"seed": seed})))
            for name in (*variants, "OpenCLIP"):
                results[name].append(scores(out, runs[name][-1]["checkpoint"]))
        untrained = out / "untrained"
        torch.manual_seed(config.seed)
        clip_core.save_checkpoint(clip_core.create_model(MODEL), untrained)
        results["untrained"].append(scores(out, str(untrained)))

    keys = [key for key in results["rayclip"][0] if key != PER_CLASS]
    header = ["model", *keys, "final loss (mean of last 10 steps)", "final logit scale", "train samples/s",
              "train wall s"]
    final_loss = {name: [statistics.mean(run["loss"][s] for s in sorted(run["loss"])[-10:]) for run in each]
                  for name, each in runs.items()}

    def row(name: str) -> list[str]:
        each = runs.get(name)
        return [name, *(spread([100 * result[k] for result in results[name]], "{:.1f}", "%") for k in keys),
                *((spread(final_loss[name], "{:.3f}"), spread([run["logit_scale"] for run in each], "{:.1f}"),
                   spread([run["samples_per_s"] for run in each], "{:.1f}"),
                   spread([run["wall_s"] for run in each], "{:.0f}")) if each else ("", "", "", ""))]

    def ratio(of: dict[str, list[dict]], key: str) -> str:  # of the means over the seeds
        ours, theirs = (statistics.mean(item[key] for item in of[name]) for name in ("rayclip", "OpenCLIP"))
        return f"**{ours / theirs:.2f}x**" if theirs else "n/a"

    table = [row(name) for name in ("rayclip", "OpenCLIP", "untrained")]
    table.append(["rayclip / OpenCLIP", *(ratio(results, k) for k in keys), "", "", ratio(runs, "samples_per_s"),
                  ratio(runs, "wall_s")])
    table += [row(name) for name in runs if name not in ("rayclip", "OpenCLIP")]  # the patch dropout rows
    each_run = [[name, seed, *(f"{100 * result[k]:.1f}%" for k in keys), f"{loss:.3f}", f"{run['logit_scale']:.1f}",
                 f"{run['samples_per_s']:.1f}", f"{run['wall_s']:.0f}"]
                for name in runs for seed, result, run, loss in zip(seeds, results[name], runs[name], final_loss[name])]
    per_class = [[name, f"{images}", f"{100 * named:.1f}%", f"{100 * by_folder:.1f}%",
                  *(spread([100 * result[PER_CLASS].get(name, 0.0) for result in results[model]], "{:.0f}", "%")
                    for model in ("rayclip", "OpenCLIP", "untrained"))]
                 for name, (images, named, by_folder) in per_class_counts.items()]
    heldout = prepared["heldout"]
    sections = [
        "## What ran",
        "",
        f"Data: {counts['files']:,} PNG files in `{options.root}/png`; {counts['copies']:,} were copies of another "
        f"(the packages link some files from several folders) and {counts['no_caption']} had neither title nor "
        f"keywords; of the rest, {counts['heldout']:,} images of the {len(CLASSES)} zero-shot classes "
        f"({HELDOUT_PERCENT}% of those classes, chosen by a hash of the content) are held out and "
        f"{counts['train']:,} train. A caption is the SVG's title and keywords, e.g. `Soft Blue Couch. furniture`. "
        f"Preprocessing (`rayclip preprocess`, {clip_core.get_config(MODEL).vision.image_size} px) kept "
        f"{len(kept):,} of {prepared['train']['read']:,} training rows (rejected: "
        f"{_reasons(prepared['train'])}) and {heldout['kept']:,} of {heldout['read']:,} held-out rows "
        f"({_reasons(heldout)}) in {prepare_s:.0f} s. OpenCLIP trains on the images rayclip's preprocessing "
        "wrote, listed in a CSV with their captions, and loads and augments them with its own data loader: "
        "both see the same pixels (see Backgrounds for why not the PNGs).",
        "",
        f"Training: the `{MODEL}` preset with its default recipe (global batch {config.batch_size}, lr "
        f"{config.lr:g}, {config.warmup_steps} warm-up steps, weight decay {config.weight_decay}, AdamW "
        f"beta2 0.98, eps 1e-6, gradient norm clipped at {config.grad_clip_norm:g}, cosine schedule, fp32) for "
        f"{steps} steps = {epochs} epoch(s) of {steps_per_epoch} full batches (the recipe: {recipe['steps']} steps), "
        "on this machine's cores: rayclip's train stage (Ray Train, 1 worker, Ray Data streaming the prepared "
        "shards) and OpenCLIP's `open_clip_train.main` (1 process, 1 data-loader worker), each from the same "
        "seed. Both checkpoints are scored by `rayclip evaluate` on the held-out split: zero-shot among the "
        f"{len(CLASSES)} top-level folders, prompted by their names, singular where the captions use the "
        f"singular ({', '.join(f'`{PROMPT_NAMES[k]}` for `{k}`' for k in PROMPT_NAMES)}: see the per-class table; "
        "before 2026-12-03 the folders' names were the prompts' class names) "
        f"(templates {TEMPLATES}; chance {100 / len(CLASSES):.1f}%; always "
        f"answering the largest class, {counts['majority']}, scores {100 * counts['majority_share']:.1f}% top-1; "
        "mean per-class recall, the top-1 of each class averaged over the classes, gives every class the same "
        f"weight: chance and any one answer score {100 / len(CLASSES):.1f}% there) and "
        f"recall@k of each image's caption among all {heldout['kept']:,} held-out captions and back. OpenCLIP's "
        "checkpoint is loaded through `clip_core.load_model` as it was written (its `epoch_N.pt`).",
        "",
        f"Backgrounds: {alpha['transparent']:,} of the {len(kept):,} training images have transparent "
        f"pixels; OpenCLIP's loader converts them with `Image.convert('RGB')`, which keeps the colour stored "
        f"under the transparency: dark in {alpha['dark']} of {alpha['sampled']} sampled here, so the typical "
        "black outline drawing would reach its model on black; rayclip's preprocessing composites transparency "
        f"on white (as a viewer shows clip art). And PIL refuses {counts['bombs']} of the PNGs as decompression "
        "bombs, which OpenCLIP's loader does not catch: its run would stop at the first (rayclip's preprocessing "
        "rejects and counts them). Training OpenCLIP on rayclip's prepared images keeps both out of the "
        "comparison.",
        "",
        f"Data order: the CSV is sorted by folder; `rayclip preprocess` writes the kept rows in a seeded random "
        f"order (its default: in {config.shuffle_buffer}-row windows of the stored order one folder makes up "
        f"{mixing:.0%} of the rows on average, against {largest:.0%} for the largest folder's share of the whole set; "
        "in the CSV's order one folder filled 74% of each window, and the train stage's retrieval was a quarter "
        f"of OpenCLIP's), and the train stage shuffles all the rows ({stored / 2**20:.1f} MiB in {shards} shard(s) "
        "here) afresh on every pass over the data (`global_shuffle`, its default up to 1 GiB of prepared data), "
        "as OpenCLIP's CSV loader does every epoch. Streaming the stored order through its 512-row shuffle buffer "
        "instead, the same neighbours every pass (`global_shuffle: false`, the default before), rayclip reached "
        "11.3 ± 3.6% zero-shot top-1 (seeds 0 and 1, the folders' names as prompts) against OpenCLIP's "
        "19.9 ± 3.4%.",
        "",
        *([f"Patch dropout (`--patch-dropout {options.patch_dropout:g}`): the same train stage, recipe and steps, "
           f"each training image's vision tower fed a random {1 - options.patch_dropout:.0%} of its patches "
           "(FLIP; evaluation sees every patch); the second such row trains the last tenth of the steps on whole "
           "images (`unmasked_tuning_steps`, FLIP's unmasked tuning, here on the tail of the same cosine "
           "schedule). Their training loss is over the kept patches, so it is not comparable with the other rows'.",
           ""] if options.patch_dropout else []),
        (f"{len(seeds)} runs of each row, from seeds {', '.join(map(str, seeds))} (each run's model initialisation, "
         "data order and augmentation): a cell is the mean ± the standard deviation over the runs, the ratio row "
         "divides the means, and the loss curves are the runs' mean." if len(seeds) > 1 else
         f"One run each, from seed {first}: a difference of a few points in a metric is within what another seed "
         "could change (`--seeds N` runs each row from N seeds)."),
        "",
        "Samples/s: the median over the second half of the steps, as each loop logs it; wall: the whole command "
        "(start-up, data, training, final checkpoint). The `rayclip / OpenCLIP` row divides rayclip's figure "
        "by OpenCLIP's: above 1 is better for the metrics and samples/s, below 1 for the wall time.",
        "",
        "## Results",
        "",
        markdown_table(header, table),
        "",
        *(["Each run:", "", markdown_table([header[0], "seed", *header[1:]], each_run), ""] if len(seeds) > 1 else []),
        "Zero-shot top-1 recall of each class (the mean per-class recall is these rows' mean), with the held-out "
        "images of the class and the share of the training captions that name it (the words as a phrase, any "
        "case): by the prompt's class name, and by the folder's name:",
        "",
        markdown_table(["class (prompt name)", "held-out images", "training captions naming it",
                        "... by the folder's name", "rayclip", "OpenCLIP", "untrained"], per_class),
        "",
        plot_lines("openclipart", f"{MODEL} on openclipart: training loss"
                   + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""),
                   {name: {step: statistics.mean(run["loss"][step] for run in each) for step in each[0]["loss"]}
                    for name, each in runs.items()}, xlabel="step", ylabel="contrastive loss"),
    ]
    path = write_report("openclipart", "Training recipe on real data: openclipart, rayclip vs OpenCLIP", sections)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
