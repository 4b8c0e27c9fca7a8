import math

import open_clip.zero_shot_metadata as metadata
import pytest
import torch
import torch.nn.functional as F

import clip_core
from clip_core.zeroshot import accuracy, few_shot_indices, zero_shot_logits


def test_templates_are_the_papers():
    assert list(clip_core.IMAGENET_TEMPLATES) == [t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES]
    assert len(clip_core.IMAGENET_TEMPLATES) == 80
    assert list(clip_core.SIMPLE_TEMPLATES) == [t("{}") for t in metadata.SIMPLE_IMAGENET_TEMPLATES]


def test_classifier_is_the_renormalized_mean_of_prompt_embeddings(tokenize):
    model = clip_core.create_model("tiny").eval()
    templates = ["a photo of a {}.", "a drawing of a {}."]
    classifier = clip_core.zero_shot_classifier(model, tokenize, ["dog", "cat", "red car"], templates, batch_size=4)
    assert classifier.shape == (256, 3)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))
    with torch.no_grad():
        prompts = model.encode_text(tokenize(["a photo of a cat.", "a drawing of a cat."]), normalize=True)
    torch.testing.assert_close(classifier[:, 1], F.normalize(prompts.mean(dim=0), dim=0), atol=1e-5, rtol=0)


def test_bad_class_names_and_templates_are_rejected(tokenize):
    model = clip_core.create_model("tiny")
    # each would fail inside str.format (KeyError, IndexError, ValueError) or drop the class name
    for template in ("a photo of a dog", "a {} of {kind}", "a {} }", "a {0}", "a {!r}", "{} and {}"):
        with pytest.raises(ValueError, match="exactly one '{}' .* no other braces"):
            clip_core.zero_shot_classifier(model, tokenize, ["dog"], [template])
    assert clip_core.zero_shot_classifier(model, tokenize, ["dog"], ["a {{literal}} {}"]).shape == (256, 1)
    with pytest.raises(ValueError, match="entries \\[1\\] are not"):
        clip_core.zero_shot_classifier(model, tokenize, ["dog", " "])
    with pytest.raises(ValueError, match="at least one class name"):
        clip_core.zero_shot_classifier(model, tokenize, [])


def test_predict_ranks_classes_with_probabilities(tokenize):
    model = clip_core.create_model("tiny").eval()
    classifier = clip_core.zero_shot_classifier(model, tokenize, ["a", "b", "c", "d"])
    probs, indices = clip_core.predict(model, torch.randn(2, 3, 64, 64), classifier, top_k=3)
    assert probs.shape == indices.shape == (2, 3)
    assert (probs[:, :-1] >= probs[:, 1:]).all() and (probs.sum(dim=1) <= 1 + 1e-6).all()


def test_a_siglip_model_scores_each_label_by_its_own_sigmoid_not_a_softmax(tokenize):
    model = clip_core.create_model("tiny", init_logit_bias=-10.0).eval()
    classifier = clip_core.zero_shot_classifier(model, tokenize, ["a", "b", "c", "d"])
    images = torch.randn(2, 3, 64, 64)
    probs, indices = clip_core.predict(model, images, classifier, top_k=4)
    with torch.no_grad():
        cosine = model.encode_image(images, normalize=True) @ classifier
    expected = torch.sigmoid(model.logit_scale.exp() * cosine + model.logit_bias).detach()
    torch.testing.assert_close(probs, expected.gather(1, indices))
    assert (probs.sum(dim=1) < 0.5).all(), "at SigLIP's bias, no label of a random image is likely"


def test_accuracy_counts_top_k_and_per_class_recall():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 1, 2])
    result = accuracy(logits, labels, ks=(1, 2))
    assert result["top1"] == pytest.approx(0.5) and result["top2"] == pytest.approx(1.0)
    assert result["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_retrieval_metrics_on_a_known_ranking():
    image = torch.eye(4)
    text = torch.eye(4)[[0, 1, 3, 2]]  # captions 2 and 3 are swapped
    result = clip_core.retrieval_metrics(image, text)
    assert result["image_to_text_R@1"] == pytest.approx(0.5) and result["image_to_text_R@5"] == 1.0
    assert result["text_to_image_R@1"] == pytest.approx(0.5)
    # several captions per image: an image is found at its best caption
    multi = clip_core.retrieval_metrics(image[:2], torch.eye(4)[[0, 2, 1, 3]], text_to_image=torch.tensor([0, 0, 1, 1]))
    assert multi["image_to_text_R@1"] == 1.0 and multi["text_to_image_R@1"] == pytest.approx(0.5)
    assert multi["image_to_text_median_rank"] == 1.0


def test_retrieval_metrics_do_not_depend_on_the_rounding_of_duplicate_captions():
    """A caption that occurs twice embeds identically only up to float rounding, which depends on
    the batch it was encoded in: the tie must count the same however it rounded."""
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    text = F.normalize(image + 0.9 * torch.randn(8, 16, generator=generator), dim=-1)
    text[5] = text[2]  # caption 5 is caption 2 again (as "a photo of a dog" recurs in real sets)
    exact = clip_core.retrieval_metrics(image, text)
    for rounding in (1e-7, -1e-7):  # what encoding in another batch does (measured: ~6e-8 per feature)
        rounded = text.clone()
        rounded[5] = F.normalize(text[5] + rounding * image[2], dim=-1)  # image 2 scores it above or below its own
        assert clip_core.retrieval_metrics(image, rounded) == exact


def test_median_rank_is_openclips_for_an_even_number_of_queries():
    images = torch.eye(4)
    texts = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0.9, 0.5, 0.1, 0], [0.9, 0.6, 0.3, 0.1]])
    metrics = clip_core.retrieval_metrics(images, texts)  # text→image ranks 1, 1, 3, 4
    assert metrics["text_to_image_mean_rank"] == 2.25
    assert metrics["text_to_image_median_rank"] == 2.0  # floor(median([0, 0, 2, 3])) + 1; torch.median said 1


def test_linear_probe_learns_separable_features_and_tunes_l2():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=generator) * 3
    labels = torch.arange(5).repeat(40)
    features = centers[labels] + torch.randn(len(labels), 32, generator=generator)
    test_labels = torch.arange(5).repeat(10)
    test_features = centers[test_labels] + torch.randn(len(test_labels), 32, generator=generator)
    result = clip_core.linear_probe(features, labels, test_features, test_labels)
    assert result["top1"] > 0.95
    assert 1e-6 <= result["l2"] <= 1e6
    chance = clip_core.linear_probe(features, labels[torch.randperm(len(labels), generator=generator)],
                                    test_features, test_labels)
    assert chance["top1"] < 0.6


def test_a_few_shot_probe_chooses_l2_on_held_out_examples_of_classes_it_fits():
    """A random validation split of a 1- or 2-shot set held out classes the fit never saw: every λ scored 0,
    the strongest won the tie, and well-separated classes probed at chance."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=generator) * 3
    test_labels = torch.arange(10).repeat(10)
    test_features = centers[test_labels] + torch.randn(len(test_labels), 32, generator=generator)
    for shots in (1, 2):
        labels = torch.arange(10).repeat(shots)
        features = centers[labels] + torch.randn(len(labels), 32, generator=generator)
        result = clip_core.linear_probe(features, labels, test_features, test_labels)
        assert result["top1"] > 0.9, (shots, result)
    assert result["val_top1"] == 1.0  # 2 shots: one of each class held out, scored by a fit that saw the class
    one_shot = clip_core.linear_probe(features[:10], labels[:10], test_features, test_labels)
    assert one_shot["l2"] == 0.1 and math.isnan(one_shot["val_top1"])  # nothing to choose on: 1 / examples


def test_logistic_fit_reaches_the_optimum_autograd_sees_from_any_start():
    """The probe's hand-written gradient: at its solution the objective's autograd gradient vanishes, and a
    warm start (the regularization path) ends at the same optimum as a cold one."""
    from clip_core.zeroshot import _fit_logistic

    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(6).repeat(20)
    features = F.normalize(torch.randn(6, 24, generator=generator)[labels] + torch.randn(120, 24, generator=generator),
                           dim=-1).double()
    l2 = 1e-2
    cold = _fit_logistic(features, labels, 6, l2)
    warm = _fit_logistic(features, labels, 6, l2, start=_fit_logistic(features, labels, 6, 1.0))
    weight, bias = (t.clone().requires_grad_() for t in cold)
    loss = F.cross_entropy(features @ weight + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-6 and bias.grad.abs().max() < 1e-6
    for a, b in zip(cold, warm):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_few_shot_indices_take_k_per_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    chosen = few_shot_indices(labels, shots=2)
    assert torch.bincount(labels[chosen]).tolist() == [2, 2, 1]


def test_zero_shot_logits_scale_cosine_similarity():
    classifier = F.normalize(torch.eye(3), dim=0)
    logits = zero_shot_logits(torch.tensor([[2.0, 0.0, 0.0]]), classifier, logit_scale=10.0)
    torch.testing.assert_close(logits, torch.tensor([[10.0, 0.0, 0.0]]))


def test_retrieval_metrics_in_blocks_rank_as_the_whole_similarity_matrix_does():
    """Past 8,192 rows the similarities are taken a block at a time: every rank as from the whole matrix."""
    import math

    generator = torch.Generator().manual_seed(0)
    n_images = 9000
    text_to_image = torch.cat([torch.arange(n_images), torch.randint(n_images, (300,), generator=generator)])
    images = F.normalize(torch.randn(n_images, 8, generator=generator), dim=-1)
    texts = F.normalize(images[text_to_image] + 0.8 * torch.randn(len(text_to_image), 8, generator=generator), dim=-1)
    similarity = images @ texts.T
    positive = text_to_image[None, :] == torch.arange(n_images)[:, None]
    true_score = similarity.T[torch.arange(len(text_to_image)), text_to_image]
    t2i = ((similarity.T >= true_score[:, None]) & ~positive.T).sum(dim=1) + 1
    best_true = similarity.masked_fill(~positive, -math.inf).max(dim=1).values
    i2t = ((similarity >= best_true[:, None]) & ~positive).sum(dim=1) + 1
    metrics = clip_core.retrieval_metrics(images, texts, text_to_image, tie_tolerance=0.0)
    for direction, ranks in (("image_to_text", i2t.float()), ("text_to_image", t2i.float())):
        assert metrics[f"{direction}_R@5"] == float((ranks <= 5).float().mean())
        assert metrics[f"{direction}_mean_rank"] == pytest.approx(float(ranks.mean()), rel=1e-6)
        assert metrics[f"{direction}_median_rank"] == float(ranks.median())


def test_predict_scores_each_image_alone_in_eval_mode_and_leaves_the_models_mode(tokenize):
    # a ResNet's BatchNorm in training mode scores an image by its batch, and rewrites its running statistics
    model = clip_core.create_model("RN50", image_size=64)
    assert model.training
    classifier = clip_core.zero_shot_classifier(model, tokenize, ["a", "b", "c"])
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    running = model.visual.bn1.running_mean.clone()
    in_batch = clip_core.predict(model, images, classifier, top_k=3)
    alone = clip_core.predict(model, images[:1], classifier, top_k=3)
    torch.testing.assert_close(alone[0], in_batch[0][:1])
    assert torch.equal(alone[1], in_batch[1][:1])
    assert model.training and torch.equal(model.visual.bn1.running_mean, running)
