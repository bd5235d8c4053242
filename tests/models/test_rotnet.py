"""RotNet: the four rotations and their labels, and images that a rotation cannot keep in shape."""
import pytest
import torch

from fastssl.models.rotnet import rotations


def test_rotations_are_stacked_rotation_major_with_their_labels():
    x = torch.rand(2, 1, 5, 5)
    views, labels = rotations(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(views[2:4], torch.rot90(x, 1, dims=(2, 3)))


def test_rotations_refuse_non_square_images():
    """8 x 12 images died in torch.cat (a 90-degree turn gives 12 x 8)."""
    with pytest.raises(ValueError, match="square"):
        rotations(torch.rand(2, 1, 8, 12))
    with pytest.raises(ValueError, match="4-D"):
        rotations(torch.rand(1, 8, 8))
