"""Zero-shot classification, retrieval metrics and the linear probe (Radford et al. 2021, §3 and app. A)."""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# the 80 prompts OpenAI used for ImageNet (CLIP's "Prompt_Engineering_for_ImageNet" notebook)
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
# the 7-prompt subset the same notebook found best; the short default
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def check_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    if not templates:
        raise ValueError("at least one prompt template is needed, e.g. 'a photo of a {}.'")
    bad = [t for t in templates if not _one_name_field(t)]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' where the class name goes and no other "
                         f"braces (write a literal brace as '{{{{' or '}}}}'); these do not: {bad[:5]}")
    return templates


def _one_name_field(template) -> bool:
    """`template.format(name)` fills exactly one `{}` and can fail on nothing else."""
    if not isinstance(template, str):
        return False
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:  # a lone brace
        return False
    return fields == [("", "", None)]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def zero_shot_classifier(model, tokenize: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                         templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256) -> torch.Tensor:
    """Class embeddings [D, C]: per class, the renormalized mean of its normalized prompt embeddings."""
    classnames = list(classnames)
    if not classnames:
        raise ValueError("at least one class name is needed")
    empty = [i for i, name in enumerate(classnames) if not isinstance(name, str) or not name.strip()]
    if empty:
        raise ValueError(f"class names must be non-empty strings; entries {empty[:5]} are not")
    templates = check_templates(templates)
    prompts = [template.format(name) for name in classnames for template in templates]
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        embeddings = torch.cat([
            model.encode_text(tokenize(prompts[i : i + batch_size]).to(device), normalize=True).float()
            for i in range(0, len(prompts), batch_size)
        ])
    finally:
        model.train(was_training)
    per_class = embeddings.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor,
                     logit_scale: float = 100.0) -> torch.Tensor:
    """Scaled cosine similarities [N, C] of normalized image features with the classifier."""
    return logit_scale * F.normalize(image_features.float(), dim=-1) @ classifier.to(image_features.device)


def probabilities(logits: torch.Tensor, logit_bias: torch.Tensor | float | None = None) -> torch.Tensor:
    """Scores of scaled similarities [..., C] as the model was trained to give them: a softmax over the
    C candidates (CLIP's contrastive loss), or with a logit bias (SigLIP's sigmoid loss) each candidate's
    own probability, sigmoid(logit + bias), as SigLIP and Hugging Face's zero-shot pipeline score them."""
    return logits.softmax(dim=-1) if logit_bias is None else torch.sigmoid(logits + logit_bias)


@torch.no_grad()
def predict(model, images: torch.Tensor, classifier: torch.Tensor, top_k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [N, k], class indices [N, k]) for preprocessed images, best first (`probabilities`:
    a SigLIP model's are each label's own). In eval mode, as `zero_shot_classifier`: a ResNet's BatchNorm
    in training mode would score each image by its batch's statistics, and overwrite its running ones."""
    device = _model_device(model)
    logit_scale = float(model.logit_scale.exp().clamp(max=100))
    was_training = model.training
    model.eval()
    try:
        features = model.encode_image(images.to(device))
    finally:
        model.train(was_training)
    logits = zero_shot_logits(features, classifier, logit_scale)
    bias = getattr(model, "logit_bias", None)
    probs = probabilities(logits, None if bias is None else float(bias))
    return probs.topk(min(top_k, probs.shape[-1]), dim=-1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """top-k accuracy and mean per-class recall of `logits` [N, C] against `labels` [N]."""
    labels = labels.to(logits.device)
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    out = {f"top{k}": float(hits[:, :k].any(dim=1).float().mean()) for k in ks}
    correct = hits[:, 0].float()
    recalls = [float(correct[labels == c].mean()) for c in labels.unique()]
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return out


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor | None = None, ks: Sequence[int] = (1, 5, 10),
                      tie_tolerance: float = 1e-6) -> dict[str, float]:
    """Image→text and text→image recall@k and mean/median rank (1-based).

    `text_to_image[j]` is the image index caption j describes (default: caption j ↔ image j);
    an image counts as found at the best rank of any of its captions. A wrong answer scoring within
    `tie_tolerance` of the true one ties with it, and ties count against: a caption or image that
    occurs twice embeds identically only up to float rounding (~1e-7 in fp32), which depends on the
    batch it was encoded in, so without the tolerance the metrics would change with the batching.
    """
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if text_to_image is None:
        if n_images != n_texts:
            raise ValueError(f"{n_images} images and {n_texts} captions: pass text_to_image to pair them")
        text_to_image = torch.arange(n_texts)
    device = image_features.device
    text_to_image = torch.as_tensor(text_to_image, device=device)
    images = torch.arange(n_images, device=device)
    # similarities a block of rows at a time (~256 MB of them): the whole [images, texts] matrix and its
    # masks took ~20 GB for 50k pairs. Ranks are 1 + the wrong answers scoring at least as high (ties count
    # against). text→image: the true image among all images, per caption
    block = max(1, 2**26 // max(n_images, n_texts, 1))
    t2i_rank = torch.empty(n_texts, dtype=torch.long, device=device)
    for start in range(0, n_texts, block):
        rows = slice(start, start + block)
        similarity = text_features[rows] @ image_features.T  # shape = [block of texts, images]
        true_score = similarity.gather(1, text_to_image[rows, None])
        wrong = text_to_image[rows, None] != images[None, :]
        t2i_rank[rows] = ((similarity >= true_score - tie_tolerance) & wrong).sum(dim=1) + 1
    # image→text: the best-scoring true caption among all captions, per image
    i2t_rank = torch.empty(n_images, dtype=torch.long, device=device)
    for start in range(0, n_images, block):
        rows = slice(start, start + block)
        similarity = image_features[rows] @ text_features.T  # shape = [block of images, texts]
        positive = text_to_image[None, :] == images[rows, None]
        best_true = similarity.masked_fill(~positive, -math.inf).max(dim=1).values
        i2t_rank[rows] = ((similarity >= best_true[:, None] - tie_tolerance) & ~positive).sum(dim=1) + 1

    out = {}
    for direction, ranks in (("image_to_text", i2t_rank), ("text_to_image", t2i_rank)):
        ranks = ranks.float()
        for k in ks:
            out[f"{direction}_R@{k}"] = float((ranks <= k).float().mean())
        out[f"{direction}_mean_rank"] = float(ranks.mean())
        # OpenCLIP's (floor(np.median(0-based ranks)) + 1): the mean of the middle two, rounded down
        middle = ranks.sort().values[[(len(ranks) - 1) // 2, len(ranks) // 2]]
        out[f"{direction}_median_rank"] = float(middle.mean().floor())
    return out


# ------------------------------------------------------------------------------ linear probe


def _fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
                  start: tuple[torch.Tensor, torch.Tensor] | None = None,
                  max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS from `start` (default zeros); `l2` penalizes the weights
    (not the bias). The gradient is written out (softmax minus one-hot): autograd's bookkeeping cost more
    than the arithmetic on probe-sized problems."""
    weight = torch.zeros(features.shape[1], num_classes, dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    if start is not None:
        weight.copy_(start[0])
        bias.copy_(start[1])
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    onehot = F.one_hot(labels, num_classes).to(features.dtype)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        log_probs = torch.log_softmax(features @ weight + bias, dim=1)
        residual = (log_probs.exp() - onehot) / len(labels)
        torch.addmm(l2 * weight, features.T, residual, out=weight.grad)
        torch.sum(residual, dim=0, out=bias.grad)
        return -(log_probs * onehot).sum() / len(labels) + 0.5 * l2 * weight.pow(2).sum()

    optimizer.step(closure)
    weight.grad = bias.grad = None
    return weight, bias


def _probe_accuracy(params, features, labels) -> float:
    weight, bias = params
    return float(((features @ weight + bias).argmax(dim=1) == labels).double().mean())


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, val_fraction: float = 0.2, seed: int = 0) -> dict[str, float]:
    """Logistic regression on frozen features, L2 strength chosen on a validation split.

    As in the paper's appendix A.3: λ is searched over 1e-6..1e6, first at every second decade,
    then by halving the interval around the best value down to 8 steps per decade; the final
    model is refit on train + validation with the chosen λ. The validation split holds out
    `val_fraction` of each class that has two examples or more (a random split of a few-shot set held
    out classes the fit never saw, scoring every λ 0); with one example a class there is nothing to
    choose on, and λ is 1 / examples (scikit-learn's default C = 1).
    """
    train_features = F.normalize(train_features.double(), dim=-1)
    test_features = F.normalize(test_features.double(), dim=-1)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    if len(train_labels) < 2:
        raise ValueError(f"linear probe needs at least 2 training examples, got {len(train_labels)}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    held, kept = [], []
    for c in train_labels.unique().tolist():
        members = (train_labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        held.append(members[:n_val])
        kept.append(members[n_val:])
    val_idx, fit_idx = torch.cat(held), torch.cat(kept)
    if len(val_idx) == 0:
        l2 = 1.0 / len(train_labels)
        params = _fit_logistic(train_features, train_labels, num_classes, l2)
        return {"top1": _probe_accuracy(params, test_features, test_labels), "l2": l2, "val_top1": math.nan}

    scores: dict[float, float] = {}
    solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def score(exponent: float) -> float:
        if exponent not in scores:
            # warm-started from the nearest strength fitted so far (a regularization path, as sklearn's
            # LogisticRegressionCV): the weakly regularized fits start near their optimum
            nearest = min(solutions, key=lambda e: abs(e - exponent), default=None)
            solutions[exponent] = _fit_logistic(train_features[fit_idx], train_labels[fit_idx], num_classes,
                                                10.0**exponent, start=solutions.get(nearest))
            scores[exponent] = _probe_accuracy(solutions[exponent], train_features[val_idx], train_labels[val_idx])
        return scores[exponent]

    # strongest first, so each fit starts from the next stronger one; ties go to the stronger regularization
    grid = [6, 4, 2, 0, -2, -4, -6]
    best = max(grid, key=lambda e: (score(e), e))
    step = 2.0
    while step > 1 / 8:
        step /= 2
        best = max([e for e in (best - step, best, best + step) if -6 <= e <= 6], key=lambda e: (score(e), e))
    l2 = 10.0**best
    params = _fit_logistic(train_features, train_labels, num_classes, l2, start=solutions[best])
    return {"top1": _probe_accuracy(params, test_features, test_labels), "l2": l2,
            "val_top1": scores[best]}


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int = 0) -> torch.Tensor:
    """Indices of `shots` examples per class (all of a class when it has fewer)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values
