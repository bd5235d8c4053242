"""CLIP: caption tokens, the text tower's padding, zero-shot prediction and the learnable scale."""
import pytest
import torch

from fastssl.models.clip import (CLIP, DIGIT_NAMES, TRAIN_TEMPLATES, ZERO_SHOT_TEMPLATE, Vocabulary, build,
                                 caption_tokens, caption_vocabulary, example)


def test_caption_tokens_spell_the_captions():
    vocab = caption_vocabulary()
    tokens = caption_tokens(vocab)
    assert tokens.shape[:2] == (len(TRAIN_TEMPLATES), 10)
    inverse = {i: w for w, i in vocab.ids.items()}
    row = tokens[TRAIN_TEMPLATES.index(ZERO_SHOT_TEMPLATE), 7]
    assert " ".join(inverse[i] for i in row.tolist() if i) == "a photo of the digit seven"
    assert len({tuple(t.tolist()) for t in tokens.flatten(0, 1)}) == len(TRAIN_TEMPLATES) * len(DIGIT_NAMES)


def test_vocabulary_rejects_unknown_words_and_bare_strings():
    vocab = Vocabulary(["a photo of the digit seven"])
    with pytest.raises(ValueError, match="unknown"):
        vocab.encode(["a photo of the digit eleven"])
    with pytest.raises(TypeError):
        vocab.encode("a photo")


def test_text_tower_ignores_padding():
    model = build(width=4, embed_dim=8).eval()
    vocab = caption_vocabulary()
    short = vocab.encode(["the number one"])
    padded = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(model.text_tower(short), model.text_tower(padded))


def test_zero_shot_predicts_a_class_a_image_and_scale_learns():
    model = build(width=4, embed_dim=8)
    tokens = caption_tokens(caption_vocabulary())
    preds = model.zero_shot(torch.rand(5, 1, 32, 32), tokens[0])
    assert preds.shape == (5,) and preds.max() < 10 and model.training
    loss = model.loss(torch.rand(10, 1, 32, 32), tokens[0])
    loss.backward()
    assert model.clip_loss.logit_scale.grad is not None and model.clip_loss.logit_scale.requires_grad


def test_each_loss_variant_owns_only_the_parameters_it_trains():
    """The sigmoid variant kept CLIPLoss's logit_scale: trainable, never reached by its loss."""
    for loss in ("softmax", "sigmoid"):
        model, args = example(loss=loss)
        model.loss(*args).backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
        assert hasattr(model, "clip_loss") == (loss == "softmax") and hasattr(model, "logit_bias") == (loss == "sigmoid")
    with pytest.raises(ValueError, match="init_temperature"):
        CLIP(model.image_tower, model.text_tower, init_temperature=0.0, loss="sigmoid")


def test_confusion_figure_is_written(tmp_path):
    from fastssl.models.clip import draw_confusion

    draw_confusion(torch.eye(10, dtype=torch.long) * 5, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 5000
