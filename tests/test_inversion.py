"""DDIM inversion against the DDIM formula written out independently (float64), and which edits
an Inversion serves (the edit it was made for, and any other whose timesteps it holds)."""
import pytest
import torch

from tokenflow.config import EditConfig
from tokenflow.errors import ConfigError
from tokenflow.method.inversion import Inversion, ddim_invert, edit_config_for, edit_timesteps, noise_from_inversion
from tokenflow.method.schedule import inversion_save_timesteps, make_scheduler, timesteps_of

from .test_schedule import SD_SCHEDULER


def _eps(x, t, frames=None):
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
    saved = ddim_invert(lambda x, t, frames: noise, z0, scheduler, save=set(), batch_size=2)
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


# --- Inversion: the edit it was made for --------------------------------------------------------

def _made_for(steps, inversion_steps=500, method="pnp", sdedit_start=0.9, model="m"):
    """An Inversion holding what ``Editor.invert`` keeps for that edit (latents are placeholders)."""
    kept = inversion_save_timesteps(timesteps_of(SD_SCHEDULER, inversion_steps),
                                    edit_timesteps(SD_SCHEDULER, steps, method, sdedit_start))
    return Inversion(clip=None, z0=torch.zeros(1), latents={t: torch.zeros(1) for t in kept}, inversion_prompt="a wolf",
                     inversion_steps=inversion_steps, steps=steps, method=method, sdedit_start=sdedit_start, model=model)


def test_an_inversion_serves_the_edits_whose_timesteps_it_holds():
    # 49 and 48 steps space their timesteps 20 apart (1000 // n) too
    assert _made_for(50).serves(SD_SCHEDULER) == [50, 49, 48, 25, 10, 5, 2, 1]
    assert _made_for(10).serves(SD_SCHEDULER) == [10, 5, 2, 1]
    # an SDEdit inversion holds the truncated schedule only: no PnP edit of 10 steps, but SDEdit ones
    sdedit = _made_for(10, method="sdedit", sdedit_start=0.5)
    assert sdedit.serves(SD_SCHEDULER)[0] == 10 and 10 not in sdedit.serves(SD_SCHEDULER, method="pnp")


def test_edit_config_takes_what_the_inversion_was_made_for_unless_named():
    inv = _made_for(10, method="sdedit", sdedit_start=0.6)
    config = edit_config_for(inv, EditConfig(prompt="x"), set(), SD_SCHEDULER)
    assert (config.steps, config.method, config.sdedit_start) == (10, "sdedit", 0.6)
    assert (config.inversion_prompt, config.inversion_steps) == ("a wolf", 500)
    # a named step count it holds is used (fewer steps: a subset of the timesteps)
    assert edit_config_for(_made_for(10), EditConfig(steps=5), {"steps"}, SD_SCHEDULER).steps == 5


def test_edit_config_refuses_steps_the_inversion_cannot_serve_naming_what_it_serves():
    with pytest.raises(ConfigError) as caught:
        edit_config_for(_made_for(10), EditConfig(steps=50), {"steps"}, SD_SCHEDULER)
    message = str(caught.value)
    assert "made for steps=10" in message and "which steps=50 needs" in message
    assert "it serves steps 10, 5, 2, 1" in message
    assert "leave steps out" in message and "invert again with steps=50" in message
    with pytest.raises(ConfigError, match="made for steps=10, method='sdedit', sdedit_start=0.5.*pnp"):
        edit_config_for(_made_for(10, method="sdedit", sdedit_start=0.5), EditConfig(method="pnp"), {"method"},
                        SD_SCHEDULER)


def test_edit_config_refuses_another_inversion_prompt_or_model():
    with pytest.raises(ConfigError, match="inversion_prompt='a dog', but the given Inversion was made with "
                                          "inversion_prompt='a wolf'"):
        edit_config_for(_made_for(10), EditConfig(inversion_prompt="a dog"), {"inversion_prompt"}, SD_SCHEDULER)
    # not named (a config='s value): the inversion's own replaces it
    assert edit_config_for(_made_for(10), EditConfig(inversion_prompt="a dog"), set(),
                           SD_SCHEDULER).inversion_prompt == "a wolf"
    with pytest.raises(ConfigError, match="made with model m, not this editor's \\(other\\)"):
        edit_config_for(_made_for(10), EditConfig(), set(), SD_SCHEDULER, model="other")
