"""`rayclip demo`: the embedded default, end to end on this machine.

Until the Ray pipeline lands (preprocess → train → register → serve), the demo is a short
clip_core training run on the built-in synthetic pairs: it prints the falling contrastive loss,
then zero-shot accuracy on colour-shape combinations the model never saw, and one prediction.
"""

from __future__ import annotations

import math
import time

import torch

import clip_core
from clip_core.zeroshot import zero_shot_logits

from . import synthetic


def run_demo(steps: int = 60, batch_size: int = 64, seed: int = 0, print_every: int = 10, echo=print) -> dict:
    if steps < 1 or batch_size < 2:
        raise ValueError("the demo needs steps >= 1 and batch_size >= 2 (contrastive pairs)")
    torch.manual_seed(seed)
    model = clip_core.create_model("tiny")
    tokenize = clip_core.get_tokenizer()
    preprocess = clip_core.image_transform(model.image_size, train=False)
    echo(f"model: tiny CLIP, {model.num_parameters() / 1e6:.1f}M parameters, {torch.get_num_threads()} CPU threads")

    started = time.perf_counter()
    train = list(synthetic.samples(steps * batch_size, split="train", seed=seed, image_size=model.image_size))
    images = torch.stack([preprocess(s.image) for s in train])
    texts = tokenize([s.caption for s in train])
    echo(f"data: {len(train)} synthetic pairs, e.g. \"{train[0].caption}\" ({time.perf_counter() - started:.1f}s)")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    loss_fn = clip_core.ClipLoss()
    losses = []
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        loss = loss_fn(*model(images[batch], texts[batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        model.clamp_logit_scale_()
        losses.append(loss.item())
        if step % print_every == 0 or step == steps - 1:
            echo(f"step {step + 1:4d}/{steps}  loss {losses[-1]:.3f}  "
                 f"({(step + 1) * batch_size / (time.perf_counter() - started):.0f} samples/s)")

    heldout_names = synthetic.heldout_class_names()
    label_names = synthetic.class_names()
    evaluation = list(synthetic.samples(256, split="heldout", seed=seed + 1, image_size=model.image_size))
    model.eval()
    with torch.no_grad():
        classifier = clip_core.zero_shot_classifier(model, tokenize, heldout_names)
        features = model.encode_image(torch.stack([preprocess(s.image) for s in evaluation]))
        probs = zero_shot_logits(features, classifier, float(model.logit_scale.exp())).softmax(dim=-1)
    truth = torch.tensor([heldout_names.index(label_names[s.label]) for s in evaluation])
    accuracy = float((probs.argmax(dim=-1) == truth).float().mean())
    echo(f"zero-shot top-1 on {len(evaluation)} images of {len(heldout_names)} never-seen colour-shape "
         f"combinations: {accuracy:.1%} (chance {1 / len(heldout_names):.1%})")
    top = probs[0].topk(3)
    ranked = ", ".join(f"{heldout_names[i]} {p:.0%}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
    echo(f"prediction for a held-out image of a {evaluation[0].classname}: {ranked}")
    return {"losses": losses, "heldout_top1": accuracy}
