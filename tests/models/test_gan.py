"""The DCGAN: shapes, each player's loss reaching only its own parameters, the non-saturating generator
loss, and k discriminator steps per generator step."""
import pytest
import torch
import torch.nn.functional as F

from fastssl.models.gan import GAN, Discriminator, Generator, fit_gan
from fastssl.training import TrainConfig


def tiny():
    torch.manual_seed(0)
    return GAN(Generator(z_dim=8, width=8), Discriminator(width=8))


def test_shapes():
    gan = tiny()
    x = gan.generator(torch.randn(5, 8))
    assert x.shape == (5, 1, 16, 16) and x.abs().max() <= 1
    assert gan.discriminator(x).shape == (5,)


def grads(module):
    return [p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()]


def test_each_player_loss_reaches_only_its_own_parameters():
    gan, real, z = tiny(), torch.rand(6, 1, 16, 16) * 2 - 1, torch.randn(6, 8)
    gan.d_loss(real, z).backward()
    assert all(grads(gan.discriminator)) and not any(grads(gan.generator))
    gan.zero_grad(set_to_none=True)
    gan.g_loss(z).backward()
    assert all(grads(gan.generator)) and not any(grads(gan.discriminator))


def test_losses_are_the_cross_entropies_and_the_non_saturating_generator_loss():
    gan, real, z = tiny(), torch.rand(6, 1, 16, 16) * 2 - 1, torch.randn(6, 8)
    gan.eval()  # fixed BatchNorm statistics, so every call sees the same networks
    with torch.no_grad():
        d_real, d_fake = gan.discriminator(real), gan.discriminator(gan.generator(z))
        assert torch.allclose(gan.g_loss(z), -torch.log(torch.sigmoid(d_fake)).mean(), atol=1e-6)
        expected = F.binary_cross_entropy_with_logits(d_real, torch.ones(6)) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros(6))
        assert torch.allclose(gan.d_loss(real, z), expected, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_k_discriminator_steps_per_generator_step(k, monkeypatch):
    gan, calls = tiny(), {"d": 0, "g": 0}
    d_loss, g_loss = gan.d_loss, gan.g_loss
    monkeypatch.setattr(gan, "d_loss", lambda *a: calls.__setitem__("d", calls["d"] + 1) or d_loss(*a))
    monkeypatch.setattr(gan, "g_loss", lambda *a: calls.__setitem__("g", calls["g"] + 1) or g_loss(*a))
    g_losses, d_losses = fit_gan(gan, torch.rand(48, 1, 16, 16) * 2 - 1, epochs=2, k=k, batch_size=8,
                                 config=TrainConfig(progress=False), generator=torch.Generator().manual_seed(0))
    assert calls == {"d": 12, "g": 12 // k} and len(g_losses) == len(d_losses) == 2


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="z_dim"):
        Generator(z_dim=0)
    with pytest.raises(ValueError, match="width"):
        Discriminator(width=-1)
    with pytest.raises(TypeError, match="z_dim"):
        GAN(torch.nn.Linear(2, 2), Discriminator())
    with pytest.raises(ValueError, match="16 x 16"):
        tiny().discriminator(torch.rand(2, 1, 8, 8))


def test_update_ema_moves_the_average_toward_the_model_and_copies_buffers():
    from fastssl.models.gan import update_ema

    model, average = Generator(z_dim=4, width=4), Generator(z_dim=4, width=4)
    model.project[1].running_mean.fill_(3.0)
    before = [p.detach().clone() for p in average.parameters()]
    update_ema(average, model, decay=0.75)
    for b, a, p in zip(before, average.parameters(), model.parameters()):
        assert torch.allclose(a, 0.75 * b + 0.25 * p)
    assert torch.equal(average.project[1].running_mean, model.project[1].running_mean)
