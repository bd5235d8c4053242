"""CLIP (Radford et al. 2021): an image tower and a text tower map images and captions into one space;
``fastssl.losses.CLIPLoss`` (``fastssl.clip_loss`` with a learnable logit scale s = exp(log s)) makes
each image's caption the most similar of the batch and vice versa:

    logits = s * norm(f_img(x)) @ norm(f_txt(caption)).T,   loss = (CE(logits) + CE(logits.T)) / 2

Zero-shot classification embeds one caption a class ("a photo of the digit seven") and predicts the
class whose caption is most similar. The pairs are scikit-learn's digits with captions from a few
templates ("a handwritten seven", "the number seven", ...); the text tower reads word ids of a tiny
vocabulary (embedding + GRU).

>>> vocab = Vocabulary(["a photo of the digit seven", "the number one"])
>>> vocab.encode(["the number seven", "a photo"]).tolist()
[[4, 7, 6], [1, 2, 0]]
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..checks import check_positive
from ..data import digits
from ..losses import CLIPLoss, SigLipLoss
from ..training import Result, TrainConfig, fit, shuffled_batches
from .encoders import ConvEncoder

LOSSES = ("softmax", "sigmoid")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ZERO_SHOT_TEMPLATE = "a photo of the digit {}"
TRAIN_TEMPLATES = (ZERO_SHOT_TEMPLATE, "a handwritten {}", "the number {}", "a small picture of a {}",
                   "an image of the digit {}", "{} written by hand")


class Vocabulary:
    """Word-level tokenizer: lower-cased words split on spaces, ids from 1 in order of first appearance,
    0 is padding. An unknown word is an error (a tiny closed vocabulary)."""

    def __init__(self, sentences):
        if isinstance(sentences, str):
            raise TypeError("sentences must be a list of strings, not one string")
        self.ids = {}
        for sentence in sentences:
            for word in sentence.lower().split():
                self.ids.setdefault(word, len(self.ids) + 1)
        if not self.ids:
            raise ValueError("sentences contain no words")

    def __len__(self) -> int:
        return len(self.ids) + 1  # with padding

    def encode(self, sentences) -> torch.Tensor:
        """(N, longest) LongTensor of word ids, right-padded with 0."""
        if isinstance(sentences, str):
            raise TypeError("sentences must be a list of strings, not one string")
        rows = []
        for sentence in sentences:
            words = sentence.lower().split()
            unknown = [w for w in words if w not in self.ids]
            if unknown or not words:
                raise ValueError(f"cannot encode {sentence!r}: " + (f"unknown words {unknown}" if unknown else "no words"))
            rows.append([self.ids[w] for w in words])
        out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row)
        return out


class TextTower(nn.Module):
    """Word embeddings, a GRU over the words, its state after the last word, a linear projection."""

    def __init__(self, vocab_size: int, width: int = 64, embed_dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a (N, length) LongTensor, got {tuple(tokens.shape)} {tokens.dtype}")
        states = self.gru(self.embed(tokens))[0]
        last = (tokens != 0).sum(1).clamp_min(1) - 1
        return self.proj(states[torch.arange(len(tokens), device=tokens.device), last])


class ImageTower(nn.Module):
    """A :class:`ConvEncoder` and a linear projection into the joint space."""

    def __init__(self, encoder: ConvEncoder, embed_dim: int = 64):
        super().__init__()
        self.encoder, self.proj = encoder, nn.Linear(encoder.out_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(x))


class CLIP(nn.Module):
    """Image tower, text tower and CLIP's loss with a learnable temperature, or SigLIP's sigmoid loss.

    Args:
        image_tower: images (N, C, H, W) -> (N, D).
        text_tower: word ids (N, L) -> (N, D).
        init_temperature: the initial temperature 1 / s (``CLIPLoss``'s ``logit_scale`` starts at log(1 / t));
            softmax only.
        loss: ``"softmax"`` (CLIP's symmetric cross-entropy, ``fastssl.losses.CLIPLoss``) or ``"sigmoid"``
            (SigLIP, Zhai et al. 2023: ``fastssl.siglip_loss`` on the normalized features with a learnable
            log-scale started at log(10) and bias at -10, the paper's initialization).
    """

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, init_temperature: float = 0.07,
                 loss: str = "softmax"):
        super().__init__()
        if not isinstance(image_tower, nn.Module) or not isinstance(text_tower, nn.Module):
            raise TypeError("image_tower and text_tower must be nn.Modules")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        check_positive("init_temperature", init_temperature)
        self.image_tower, self.text_tower, self.loss_kind = image_tower, text_tower, loss
        if loss == "softmax":  # each variant owns only the parameters its loss trains
            self.clip_loss = CLIPLoss(init_temperature=init_temperature)
        else:
            self.sigmoid_loss = SigLipLoss()
            self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The loss of the N (image, caption) pairs of the batch: symmetric InfoNCE, or SigLIP's."""
        img, txt = self.image_tower(images), self.text_tower(tokens)
        if self.loss_kind == "sigmoid":
            img, txt = nn.functional.normalize(img, dim=1), nn.functional.normalize(txt, dim=1)
            return self.sigmoid_loss(img, txt, self.log_scale.exp(), self.logit_bias)
        return self.clip_loss(img, txt)

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor, class_tokens: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class of each image: the index of the most similar of the class captions."""
        was_training = self.training
        self.eval()
        text = nn.functional.normalize(self.text_tower(class_tokens), dim=1)
        preds = [(nn.functional.normalize(self.image_tower(images[i:i + batch_size]), dim=1) @ text.T).argmax(1)
                 for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(preds)


def caption_vocabulary() -> Vocabulary:
    return Vocabulary([t.format(name) for t in TRAIN_TEMPLATES for name in DIGIT_NAMES])


def caption_tokens(vocab: Vocabulary, templates=TRAIN_TEMPLATES) -> torch.Tensor:
    """(templates, 10, length) word ids: every template filled with every digit's name."""
    rows = vocab.encode([t.format(name) for t in templates for name in DIGIT_NAMES])
    return rows.view(len(templates), len(DIGIT_NAMES), -1)


def build(width: int = 16, embed_dim: int = 64, loss: str = "softmax") -> CLIP:
    return CLIP(ImageTower(ConvEncoder(1, width, 8 * width), embed_dim),
                TextTower(len(caption_vocabulary()), 4 * width, embed_dim), loss=loss)


def example(loss: str = "softmax"):
    """A tiny CLIP and a batch of (image, caption ids) for one training step: ``model.loss(*args)``."""
    tokens = caption_tokens(caption_vocabulary())[torch.arange(8) % len(TRAIN_TEMPLATES), torch.arange(8)]
    return build(width=4, embed_dim=16, loss=loss), (torch.rand(8, 1, 32, 32), tokens)


def train(config: TrainConfig) -> Result:
    """``fastssl train clip [--loss sigmoid]``: zero-shot accuracy on the digits' test split."""
    loss_kind = config.loss or "softmax"
    data = digits(32)
    model = build(loss=loss_kind).to(config.device)
    untrained = copy.deepcopy(model)
    tokens = caption_tokens(caption_vocabulary()).to(config.device)
    zero_shot_tokens = tokens[TRAIN_TEMPLATES.index(ZERO_SHOT_TEMPLATE)]
    g = torch.Generator().manual_seed(config.seed)
    images, labels = data.train_x.to(config.device), data.train_y.to(config.device)

    def step(idx):
        template = torch.randint(len(TRAIN_TEMPLATES), (len(idx),), generator=g).to(config.device)
        return model.loss(images[idx], tokens[template, labels[idx]])

    losses = fit(step, lambda: shuffled_batches(len(images), 128, g), model.parameters(),
                 epochs=config.epochs_or(12, 60), lr=2e-3, config=config, desc="clip")
    test_x, test_y = data.test_x.to(config.device), data.test_y.to(config.device)

    def accuracy(m):
        return (m.zero_shot(test_x, zero_shot_tokens) == test_y).float().mean().item()

    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((test_y.cpu(), model.zero_shot(test_x, zero_shot_tokens).cpu()), torch.ones(len(test_y), dtype=torch.long),
                         accumulate=True)
    scale = model.log_scale.exp() if loss_kind == "sigmoid" else model.clip_loss.logit_scale.exp()
    extra = {"loss": loss_kind, "logit_scale": scale.item(), "zero_shot_caption": ZERO_SHOT_TEMPLATE,
             "train_templates": list(TRAIN_TEMPLATES)}
    if loss_kind == "sigmoid":
        extra["logit_bias"] = model.logit_bias.item()
    return Result("clip" if loss_kind == "softmax" else "clip-sigmoid", "zero_shot_accuracy", accuracy(model), accuracy(untrained), losses=losses, extra=extra,
                  figures={"zero_shot_confusion.png": lambda path: draw_confusion(confusion, path)})


def draw_confusion(confusion: torch.Tensor, path: str) -> None:
    """Zero-shot confusion matrix on the test split: true digit (rows) against the caption chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(confusion.numpy(), cmap="Blues")
    for (i, j), n in zip(torch.cartesian_prod(torch.arange(10), torch.arange(10)).tolist(), confusion.flatten().tolist()):
        ax.text(j, i, n, ha="center", va="center", fontsize=6, color="white" if n > confusion.max() / 2 else "black")
    ax.set_xticks(range(10), range(10))
    ax.set_yticks(range(10), range(10))
    ax.set_xlabel('caption "a photo of the digit ..."')
    ax.set_ylabel("true digit")
    ax.set_title("CLIP zero-shot, digits test split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
