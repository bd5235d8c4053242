"""The class-conditional DDPM: shapes, Algorithm 1 through fastssl.q_sample, label dropout to the null
class, guided sampling through fastssl.sample, and the independent judge."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl.models.ddpm import DDPM, TinyUNet, timestep_embedding
from fastssl.models.judge import SmallCNN, real_vs_fake_accuracy, train_classifier


def tiny(p_uncond=0.1):
    torch.manual_seed(0)
    return DDPM(TinyUNet(width=8, emb_dim=16), num_timesteps=50, p_uncond=p_uncond)


def test_unet_keeps_the_shape_and_listens_to_time_and_class():
    net = tiny().net
    x = torch.randn(3, 1, 16, 16)
    t, y = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 10])
    out = net(x, t, y)
    assert out.shape == x.shape and net.null_class == 10
    assert not torch.allclose(out, net(x, t, torch.tensor([5, 5, 5])))
    assert not torch.allclose(out, net(x, t + 20, y))
    assert timestep_embedding(t, 16).shape == (3, 16)


def test_loss_is_algorithm_1_with_q_sample():
    model = tiny(p_uncond=0.0)
    x0, y = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([1, 2, 3, 4])
    loss = model.loss(x0, y, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order
    t = torch.randint(50, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = fastssl.q_sample(x0, t, noise, model.schedule)
    assert torch.allclose(x_t, model.schedule.alphas_cumprod[t].sqrt()[:, None, None, None] * x0
                          + (1 - model.schedule.alphas_cumprod[t]).sqrt()[:, None, None, None] * noise, atol=1e-6)
    assert torch.allclose(loss, F.mse_loss(model.net(x_t, t, y), noise))


@pytest.mark.parametrize("p_uncond, expect_null", [(0.0, False), (1.0, True)])
def test_label_dropout_feeds_the_null_class(p_uncond, expect_null):
    model, seen = tiny(p_uncond), []
    model.net.register_forward_hook(lambda mod, args, out: seen.append(args[2].clone()))
    model.loss(torch.rand(6, 1, 16, 16), torch.arange(6))
    assert torch.equal(seen[0], torch.full((6,), 10) if expect_null else torch.arange(6))


def test_generate_is_reproducible_in_range_and_guidance_changes_it():
    model = tiny()
    y = torch.tensor([3, 7])
    a = model.generate(y, guidance=2.0, num_steps=4, generator=0)
    assert a.shape == (2, 1, 16, 16) and a.abs().max() <= 1
    assert torch.equal(a, model.generate(y, guidance=2.0, num_steps=4, generator=0))
    assert not torch.allclose(a, model.generate(y, guidance=0.0, num_steps=4, generator=0))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="p_uncond"):
        DDPM(TinyUNet(width=8, emb_dim=16), p_uncond=1.5)
    with pytest.raises(TypeError, match="null_class"):
        DDPM(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="emb_dim"):
        TinyUNet(emb_dim=15)
    with pytest.raises(ValueError, match="width"):
        TinyUNet(width=0)
    with pytest.raises(ValueError, match="labels"):
        tiny().loss(torch.rand(4, 1, 16, 16), torch.arange(3))
    with pytest.raises(ValueError, match="num_classes"):
        SmallCNN(num_classes=1)


def test_labels_must_be_integer_class_ids_in_range():
    """Float labels and ids past the null class died inside the embedding; the null class itself is a label."""
    model, x = tiny(), torch.rand(4, 1, 16, 16)
    assert torch.isfinite(model.loss(x, torch.full((4,), 10)))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        model.loss(x, torch.arange(4.0))
    for bad in (torch.full((4,), 11), torch.tensor([0, 1, -1, 2])):
        with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 10\]"):
            model.loss(x, bad)
    with pytest.raises(ValueError, match="labels must be class ids"):
        model.generate(torch.tensor([3, 12]), num_steps=2, generator=0)


def test_judges_separate_what_differs_and_not_what_does_not():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 16, 16, generator=g)
    y = torch.arange(200) % 2
    x[y == 1, :, :8] += 1.0  # class 1 is bright on top
    model = train_classifier(x[:100], y[:100], 2, epochs=5, seed=0, width=8)
    assert not model.training
    from fastssl.models.judge import accuracy
    assert accuracy(model, x[100:], y[100:]) > 0.95
    assert real_vs_fake_accuracy(x[y == 1], x[y == 0], epochs=5, width=8) > 0.95
    same = torch.rand(200, 1, 16, 16, generator=g)
    assert real_vs_fake_accuracy(same[:100], same[100:], epochs=5, width=8) < 0.75
    with pytest.raises(ValueError, match="same shape"):
        real_vs_fake_accuracy(x[:10], x[:12])
