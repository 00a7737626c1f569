"""DDIM inversion against the DDIM formula written out independently (float64)."""
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


def test_constant_noise_round_trip_and_recovered_eps():
    """With a noise prediction that ignores x, inversion lands on add_noise(z0, eps, T) and the
    recovered eps is that noise."""
    scheduler = make_scheduler(SD_SCHEDULER, 50)
    z0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    noise = torch.randn_like(z0)
    saved = ddim_invert(lambda x, t: noise, z0, scheduler, save=set(), batch_size=2)
    z_t = saved[981]
    eps = noise_from_inversion(z0, z_t, scheduler.alphas_cumprod[981])
    # DDIM with constant eps: x_t = sqrt(a_t) * x0_hat + sqrt(1-a_t) * eps with x0_hat drifting only by
    # final_alpha_cumprod != 1 at the first step
    x0_hat = (z0 - (1 - scheduler.final_alpha_cumprod).sqrt() * noise) / scheduler.final_alpha_cumprod.sqrt()
    expected = noise_from_inversion(x0_hat, z_t, scheduler.alphas_cumprod[981])
    assert torch.allclose(expected, noise, atol=1e-4)
    assert eps.shape == z0.shape
