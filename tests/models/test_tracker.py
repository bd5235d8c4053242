"""Video colorization tracker: colour quantization, clip windows, the loss is colorization_loss over
3 references, mask propagation with IoU, and a perfect feature propagates the mask exactly."""
import pytest
import torch

from fastssl.data import moving_shapes
from fastssl.models.don import PixelEncoder
from fastssl.models.tracker import ColorizationTracker, ColorQuantizer, clips, mask_iou, mean_iou, track
from fastssl.propagation import colorization_loss


def test_quantizer_labels_every_pixel_with_one_of_k_colours():
    v = moving_shapes(num_videos=2, frames=3, size=16, generator=torch.Generator().manual_seed(0))
    q = ColorQuantizer(8, samples=2000).fit(v.frames)
    labels, grey = q.labels(v.frames), q.grey(v.frames)
    assert labels.shape == (2, 3, 16, 16) and labels.dtype == torch.long and 0 <= labels.min() and labels.max() < 8
    assert len(labels.unique()) > 4
    assert grey.shape == (2, 3, 1, 16, 16) and 0 <= grey.min() and grey.max() <= 1
    with pytest.raises(RuntimeError, match="fit"):
        ColorQuantizer(4).labels(v.frames)
    with pytest.raises(ValueError, match="num_colors"):
        ColorQuantizer(0)


def test_clips_enumerate_every_window():
    w = clips(2, 5, 4)
    assert w.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_loss_is_the_colorization_loss_of_the_last_frame_from_the_others():
    torch.manual_seed(0)
    model = ColorizationTracker(PixelEncoder(1, width=4, out_dim=8, levels=1, stride=2), num_colors=5, radius=3.0).eval()
    grey, colors = torch.rand(2, 4, 1, 12, 12), torch.randint(5, (2, 4, 6, 6))
    feats = model(grey)
    assert feats.shape == (2, 4, 8, 6, 6)
    expected = colorization_loss(feats[:, 3], feats[:, :3], colors[:, :3], colors[:, 3], 5, temperature=0.05, radius=3.0)
    torch.testing.assert_close(model.loss(grey, colors), expected)
    with pytest.raises(ValueError, match="feature grid"):
        model.loss(grey, torch.randint(5, (2, 4, 12, 12)))
    with pytest.raises(ValueError, match="grey must be"):
        model.loss(grey[:, 0], colors)
    with pytest.raises(ValueError, match="temperature"):
        ColorizationTracker(PixelEncoder(1), temperature=-1.0)


def test_mask_iou():
    a = torch.zeros(2, 4, 4)
    a[:, :2] = 1
    b = a.clone()
    b[1, :, :2] = 0
    assert mask_iou(a, b).tolist() == [1.0, 0.5]
    assert mask_iou(torch.zeros(3, 3), torch.zeros(3, 3)).item() == 1.0


class PositionAndTexture(torch.nn.Module):
    """Features = (row, column, grey value): on a video whose frames are all equal,
    propagation from frame 0 must give the first mask back in every frame."""

    def forward(self, x):
        yy, xx = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
        pos = torch.stack([yy, xx]).float()[None].expand(len(x), -1, -1, -1)
        return torch.cat([pos, x], 1)


def test_a_static_video_keeps_its_first_mask():
    v = moving_shapes(num_videos=1, frames=4, size=16, speed=0.0, generator=torch.Generator().manual_seed(0))
    grey = v.frames.mean(2, keepdim=True)
    preds = track(PositionAndTexture(), grey[0], v.masks[0, 0], context=2, radius=2.0, topk=1, temperature=0.01)
    assert preds.shape == (4, 16, 16) and torch.equal(preds.float(), v.masks[0])
    value, _ = mean_iou(PositionAndTexture(), grey, v.masks, context=2, radius=2.0, topk=1, temperature=0.01)
    assert value == 1.0
