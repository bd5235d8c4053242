"""MoCo: momentum update of the key encoder, the queue, and argument checks."""
import pytest
import torch

from fastssl.models.encoders import ConvEncoder
from fastssl.models.moco import MoCo


def small(**kw):
    torch.manual_seed(0)
    return MoCo(ConvEncoder(1, 4, 16), proj_dim=8, queue_size=12, **kw)


def test_key_encoder_starts_as_a_frozen_copy():
    m = small()
    for k, q in zip(m.key_encoder.parameters(), m.encoder.parameters()):
        assert torch.equal(k, q) and not k.requires_grad and q.requires_grad


def test_momentum_update_is_an_exponential_moving_average():
    m = small(momentum=0.9)
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.key_encoder.parameters()]
    m.momentum_update()
    for b, k, q in zip(before, m.key_encoder.parameters(), m.encoder.parameters()):
        torch.testing.assert_close(k, 0.9 * b + 0.1 * q)


def test_loss_enqueues_unit_keys_and_only_queries_get_gradients():
    m = small()
    x = torch.rand(5, 1, 16, 16)
    m.loss(x, torch.Generator().manual_seed(0)).backward()
    assert m.queue.ptr == 5
    torch.testing.assert_close(m.queue.negatives()[:5].norm(dim=1), torch.ones(5))
    assert all(p.grad is None for p in m.key_encoder.parameters())
    assert all(p.grad is not None for p in m.encoder.parameters())
    m.loss(x).backward()  # the second step reads the queue the first one wrote
    assert m.queue.ptr == 10


def test_shuffled_key_groups_keep_the_order_of_the_batch():
    m = small(key_bn_groups=1).eval()
    x = torch.rand(6, 1, 16, 16)
    torch.testing.assert_close(m.keys(x, torch.Generator().manual_seed(3)), m.key_head(m.key_encoder(x)))


def test_key_groups_are_balanced_and_a_group_of_one_is_refused_up_front():
    """10 samples in 4 groups: 3, 3, 2, 2 (chunk gave 3, 3, 3, 1 and batch norm died on the group of one)."""
    m = small(key_bn_groups=4)
    assert torch.isfinite(m.loss(torch.rand(10, 1, 16, 16), torch.Generator().manual_seed(0)))
    for n, groups in ((3, 2), (5, 4)):
        m = small(key_bn_groups=groups)
        with pytest.raises(ValueError, match=f"x has {n} samples but key_bn_groups={groups}"):
            m.loss(torch.rand(n, 1, 16, 16))
        assert m.queue.ptr == 0  # refused before any state changed


@pytest.mark.parametrize("kw", [{"momentum": 1.0}, {"momentum": -0.1}, {"temperature": 0.0}, {"key_bn_groups": 0}])
def test_bad_arguments_raise(kw):
    with pytest.raises(ValueError):
        small(**kw)
    with pytest.raises(TypeError):
        MoCo(torch.nn.Linear(2, 2))
