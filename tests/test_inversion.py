"""DDIM inversion against the DDIM formula written out independently (float64)."""
import pytest
import torch

from tokenflow.method.inversion import ddim_invert, noise_from_inversion
from tokenflow.method.schedule import make_scheduler

from .test_schedule import SD_SCHEDULER


def _eps(x, t):
    return torch.tanh(x) * 0.3 + t / 2000.0


def test_inversion_step_is_the_ddim_formula():
    scheduler = make_scheduler(SD_SCHEDULER, 10)
    z0 = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    saved = ddim_invert(_eps, z0, scheduler, save={101, 501}, batch_size=2)
    a = scheduler.alphas_cumprod.double()
    x = z0.double()
    ts = list(range(1, 1000, 100))
    expected = {}
    for i, t in enumerate(ts):
        a_prev = a[ts[i - 1]] if i else a[0]  # final_alpha_cumprod = alpha_bar[0] when set_alpha_to_one=False
        eps = _eps(x, t)
        x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        x = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * eps
        expected[t] = x.clone()
    assert set(saved) == {101, 501, 901}  # + the noisiest, always
    for t in saved:
        assert torch.allclose(saved[t].double(), expected[t], atol=1e-5), t


def test_batching_does_not_change_the_result():
    scheduler = make_scheduler(SD_SCHEDULER, 10)
    z0 = torch.randn(7, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    a = ddim_invert(_eps, z0, scheduler, save=set(), batch_size=7)
    b = ddim_invert(_eps, z0, scheduler, save=set(), batch_size=3)
    assert torch.equal(a[901], b[901])


@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_constant_noise_round_trip_and_recovered_eps(alpha_to_one):
    """With a noise prediction that ignores x, DDIM inversion is closed-form: the first step moves
    z0 to x0_hat = (z0 - sqrt(1 - a_f) eps) / sqrt(a_f) (a_f = final_alpha_cumprod: alpha_bar[0]
    for SD, 1 with set_alpha_to_one), every later step keeps that x0, and
        x_T = sqrt(a_T) x0_hat + sqrt(1 - a_T) eps.
    The noise the edit starts from, recovered from (z0, x_T), must reproduce x_T from z0 and equal
    eps + sqrt(a_T / (1 - a_T)) (x0_hat - z0): eps itself when a_f = 1."""
    scheduler = make_scheduler({**SD_SCHEDULER, "set_alpha_to_one": alpha_to_one}, 50)
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(2, 4, 3, 3, generator=g)
    noise = torch.randn(z0.shape, generator=g)
    saved = ddim_invert(lambda x, t: noise, z0, scheduler, save=set(), batch_size=2)
    z_t = saved[981]
    eps = noise_from_inversion(z0, z_t, scheduler.alphas_cumprod[981])

    a_t, a_f = scheduler.alphas_cumprod[981].double(), torch.as_tensor(scheduler.final_alpha_cumprod).double()
    z0_, noise_ = z0.double(), noise.double()
    x0_hat = (z0_ - (1 - a_f).sqrt() * noise_) / a_f.sqrt()
    assert torch.allclose(z_t.double(), a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * noise_, atol=1e-5)  # the inversion
    assert torch.allclose(a_t.sqrt() * z0_ + (1 - a_t).sqrt() * eps.double(), z_t.double(), atol=1e-5)  # x_T from z0
    expected = noise_ + (a_t / (1 - a_t)).sqrt() * (x0_hat - z0_)
    assert torch.allclose(eps.double(), expected, atol=1e-5)
    if alpha_to_one:
        assert torch.allclose(eps, noise, atol=1e-5)
    else:   # the drift is real, and larger than the tolerance: the test tells the two apart
        assert (expected - noise_).abs().max() > 1e-3
