"""Edit-friendly DDPM inversion (method/ddpm.py) against the paper's formulas written out
independently in float64, the reconstruction property with the tiny model's real UNet, and the
batched-over-timesteps inversion against the sequential one."""
import pytest
import torch

from tokenflow.method.ddpm import DDIMStepper, DDPMSchedule, DDPMStepper, ddpm_invert, ddpm_sample, noise_seed, row_groups
from tokenflow.method.schedule import make_scheduler
from tokenflow.models.load import encode_prompt

from .test_schedule import SD_SCHEDULER


def _eps(x, t, frames=None):
    t = t if isinstance(t, int) else t.view(-1, 1, 1, 1).float()
    return torch.tanh(x) * 0.3 + t / 2000.0


def _schedule(steps, eta=1.0):
    scheduler = make_scheduler(SD_SCHEDULER, steps)
    return scheduler, DDPMSchedule.of(scheduler, [int(t) for t in scheduler.timesteps], eta)


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_noise_maps_are_the_papers_formula(eta):
    """x_t from seeded independent noise, z_t = (x_prev - mu_t) / sigma_t, recomputed in float64."""
    scheduler, sched = _schedule(7, eta)
    z0 = torch.randn(3, 4, 5, 3, generator=torch.Generator().manual_seed(0))
    latents, noise = ddpm_invert(_eps, z0, sched, sched.timesteps, seed=5, rows_per_call=4)
    a = scheduler.alphas_cumprod.double()
    ts = sched.timesteps
    xs = {t: a[t].sqrt() * z0.double() + (1 - a[t]).sqrt() * torch.randn(
        z0.shape, generator=torch.Generator().manual_seed(noise_seed(5, t))).double() for t in ts}
    for i, t in enumerate(ts):
        assert torch.allclose(latents[t].double(), xs[t], atol=1e-6)
        prev_x = xs[ts[i + 1]] if i + 1 < len(ts) else z0.double()
        a_prev = a[ts[i + 1]] if i + 1 < len(ts) else a[0]   # final_alpha_cumprod (set_alpha_to_one False)
        sigma = eta * ((1 - a_prev) / (1 - a[t]) * (1 - a[t] / a_prev)).sqrt()
        eps = _eps(xs[t], t)
        mu = a_prev.sqrt() * (xs[t] - (1 - a[t]).sqrt() * eps) / a[t].sqrt() + (1 - a_prev - sigma ** 2).sqrt() * eps
        expected = (prev_x - mu) / sigma
        assert torch.allclose(noise[t].double(), expected, rtol=1e-4, atol=1e-4 / sigma.item()), (t, sigma)
    # the noise of a timestep does not depend on which timesteps a run draws
    tail, _ = ddpm_invert(_eps, z0, sched, ts[3:], seed=5, rows_per_call=4)
    assert torch.equal(tail[ts[3]], latents[ts[3]]) and set(tail) == set(ts[3:])


def test_the_noise_is_independent_per_timestep_and_seed():
    """The paper's x_t use independent noise per t: no two timesteps (or seeds) share a draw, and
    the drawn noises are uncorrelated (|r| < 0.05 over 4,800 values, ~3.5 standard errors)."""
    _, sched = _schedule(10)
    z0 = torch.zeros(3, 4, 20, 20)
    latents, _ = ddpm_invert(_eps, z0, sched, sched.timesteps, seed=3, rows_per_call=8)
    drawn = {t: latents[t] / sched.coefficients([t], "cpu")[0, 1] for t in sched.timesteps}   # x_t / sqrt(1 - a_t)
    ts = sched.timesteps
    assert len({noise_seed(3, t) for t in ts} | {noise_seed(4, t) for t in ts}) == 2 * len(ts)
    for i, t in enumerate(ts):
        assert abs(drawn[t].std().item() - 1) < 0.05
        for u in ts[i + 1:]:
            r = torch.corrcoef(torch.stack([drawn[t].flatten(), drawn[u].flatten()]))[0, 1].item()
            assert abs(r) < 0.05, (t, u, r)
    other, _ = ddpm_invert(_eps, z0, sched, ts, seed=4, rows_per_call=8)
    assert not torch.allclose(other[ts[0]], latents[ts[0]])


@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_batched_over_timesteps_equals_one_timestep_per_call(rows):
    _, sched = _schedule(6)
    z0 = torch.randn(5, 4, 3, 2, generator=torch.Generator().manual_seed(2))
    seen = []

    def eps_fn(x, t, frames):
        seen.append((x.shape[0], t if isinstance(t, int) else tuple(t.tolist())))
        return _eps(x, t)

    across = ddpm_invert(eps_fn, z0, sched, sched.timesteps, seed=1, rows_per_call=rows)
    calls_across, seen[:] = list(seen), []
    single = ddpm_invert(eps_fn, z0, sched, sched.timesteps, seed=1, rows_per_call=rows, across_timesteps=False)
    for a, b in zip(across, single):
        assert set(a) == set(b) and all(torch.allclose(a[t], b[t], atol=1e-6) for t in a)
    assert len(calls_across) == -(-6 * 5 // rows)   # full calls except the last one
    assert all(isinstance(t, int) for _, t in seen) and all(n <= min(rows, 5) for n, _ in seen)


def test_row_groups_cover_every_row_once():
    for frames, rows, across in [(5, 3, True), (5, 3, False), (2, 7, True), (2, 7, False), (4, 4, False)]:
        groups = row_groups([30, 20, 10], frames, rows, across)
        flat = [r for g in groups for r in g]
        assert sorted(flat) == sorted((t, j) for t in (30, 20, 10) for j in range(frames))
        assert all(0 < len(g) <= rows for g in groups)
        if not across:
            assert all(len({t for t, _ in g}) == 1 for g in groups)


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_sampling_with_the_noise_maps_reconstructs_the_source_with_the_real_unet(tiny_sd, steps):
    """Plain sampling under the inversion prompt (no guidance) returns z0 to float32 rounding."""
    scheduler, sched = _schedule(steps)
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    text = encode_prompt(tiny_sd, "a wolf", (64, 64))

    def eps_fn(x, t, frames):
        t = torch.tensor(t) if isinstance(t, int) else t
        return tiny_sd.unet(x, t, encoder_hidden_states=text.expand(x.shape[0], -1, -1)).sample.float()

    with torch.no_grad():
        latents, noise = ddpm_invert(eps_fn, z0, sched, sched.timesteps, seed=3, rows_per_call=5)
        out = ddpm_sample(eps_fn, latents[sched.timesteps[0]], sched, sched.timesteps, noise)
        # another prompt does not reconstruct: the property is the noise maps', not the sampler's
        other = encode_prompt(tiny_sd, "a red car", (64, 64))
        wrong = ddpm_sample(lambda x, t, f: tiny_sd.unet(x, torch.tensor(t), encoder_hidden_states=other.expand(
            x.shape[0], -1, -1)).sample.float(), latents[sched.timesteps[0]], sched, sched.timesteps, noise)
    err = (out - z0).abs().max().item()
    assert err < 2e-5 * steps, err
    assert (wrong - z0).abs().max().item() > 100 * max(err, 1e-7)
    # skipping the first steps starts from the stored latent there and reconstructs too
    if steps > 1:
        with torch.no_grad():
            late = ddpm_sample(eps_fn, latents[sched.timesteps[1]], sched, sched.timesteps[1:], noise)
        assert (late - z0).abs().max().item() < 2e-5 * steps


def test_steppers_apply_the_same_noise_to_every_prompt():
    scheduler, sched = _schedule(5)
    z = {t: torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(t)) for t in sched.timesteps}
    x = torch.randn(2 * 2, 4, 2, 2)          # 2 prompts x frames 1..2
    eps = torch.randn(4, 4, 2, 2)
    t = sched.timesteps[1]
    out = DDPMStepper(sched, z).step(eps, t, x, slice(1, 3))
    for p in range(2):
        rows = slice(2 * p, 2 * p + 2)
        alone = DDPMStepper(sched, {t: z[t][1:3]}).step(eps[rows], t, x[rows], slice(0, 2))
        assert torch.equal(out[rows], alone)
    # eta -> 0 is DDIM's step (the noise maps' weight vanishes)
    _, nearly = _schedule(5, eta=1e-6)
    ddim = DDIMStepper(scheduler).step(eps, t, x, slice(1, 3))
    assert torch.allclose(DDPMStepper(nearly, z).step(eps, t, x, slice(1, 3)), ddim, atol=1e-5)


@pytest.mark.parametrize("change", [dict(set_alpha_to_one=True), dict(timestep_spacing="linspace", steps_offset=0)])
def test_a_last_step_without_noise_is_deterministic_not_nan(change):
    """Schedulers whose last step has sigma 0 (onto alpha_bar 1, or a linspace schedule ending at
    timestep 0): that noise map is 0 and every value stays finite; the steps before reconstruct."""
    scheduler = make_scheduler({**SD_SCHEDULER, **change}, 5)
    sched = DDPMSchedule.of(scheduler, [int(t) for t in scheduler.timesteps], 1.0)
    last = sched.timesteps[-1]
    assert sched.coefficients([last], torch.device("cpu"))[0, 4].item() == 0.0
    z0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    latents, noise = ddpm_invert(_eps, z0, sched, sched.timesteps, seed=2, rows_per_call=3)
    assert torch.equal(noise[last], torch.zeros_like(noise[last]))
    assert all(torch.isfinite(noise[t]).all() for t in sched.timesteps)
    x = ddpm_sample(_eps, latents[sched.timesteps[0]], sched, sched.timesteps[:-1], noise)
    assert torch.allclose(x, latents[last], atol=1e-5)   # exact up to the deterministic last step
    out = ddpm_sample(_eps, latents[sched.timesteps[0]], sched, sched.timesteps, noise)
    assert torch.isfinite(out).all()
