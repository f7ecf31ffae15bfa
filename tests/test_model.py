"""TwinVAE shapes, deterministic inference, variants."""

import pytest
import torch

from twinvae.models import ModelConfig, TwinVAE
from twinvae.models.twin_vae import set_trainable

TINY = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,))


def test_paper_sizes_give_paper_shapes() -> None:
    model = TwinVAE()
    x = torch.rand(2, 1, 128, 128)
    features = model.encoders["natural"](x)
    assert features.shape == (2, 256, 5, 5)
    mu, logvar = model.shared_encoder(features)
    assert mu.shape == logvar.shape == (2, 256)
    assert model.shared_decoder(mu).shape == (2, 256, 5, 5)
    out = model(x, "synthetic")
    assert out.recon is not None and out.recon.shape == (2, 1, 128, 128)
    assert out.count.shape == (2,)
    recon = out.recon.detach()
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0


def test_inference_is_deterministic_and_uses_mu() -> None:
    torch.manual_seed(0)
    model = TwinVAE(TINY).eval()
    x = torch.rand(3, 1, 128, 128)
    first, second = model.count(x), model.count(x)
    torch.testing.assert_close(first, second)
    mu, _ = model.encode(x, "natural")
    torch.testing.assert_close(first, model.regress(mu))


def test_counting_network_matches_model_count() -> None:
    torch.manual_seed(1)
    model = TwinVAE(TINY).eval()
    x = torch.rand(4, 1, 128, 128)
    network = model.counting_network("natural", with_mu=True)
    count, mu = network(x)
    assert count.shape == (4, 1)
    torch.testing.assert_close(count[:, 0], model.count(x))
    torch.testing.assert_close(mu, model.encode(x, "natural")[0])


def test_translation_decodes_in_the_other_domain() -> None:
    torch.manual_seed(2)
    model = TwinVAE(TINY).eval()
    x = torch.rand(2, 1, 128, 128)
    translated = model.translate(x, "natural", "synthetic")
    expected = model.decoders["synthetic"](model.shared_decoder(model.encode(x, "natural")[0]))
    torch.testing.assert_close(translated, expected)


def test_shared_decoder_regressor_variant_and_orthogonal_init() -> None:
    config = TINY.model_copy(update={"regressor_input": "shared_decoder", "init": "orthogonal"})
    model = TwinVAE(config).eval()
    x = torch.rand(2, 1, 128, 128)
    assert model.count(x).shape == (2,)
    assert torch.all(model.regressor[0].bias == 0)
    weight = model.regressor[-1].weight  # (1, 8): orthogonal rows have unit norm
    torch.testing.assert_close(weight.norm(), torch.tensor(1.0))


def test_set_trainable_freezes_parameters() -> None:
    model = TwinVAE(TINY)
    set_trainable([model.shared_encoder], False)
    assert not any(p.requires_grad for p in model.shared_encoder.parameters())
    assert all(p.requires_grad for p in model.regressor.parameters())


def test_unknown_domain_is_rejected() -> None:
    model = TwinVAE(TINY)
    with pytest.raises(KeyError):
        model.encode(torch.rand(1, 1, 128, 128), "other")  # type: ignore[arg-type]


def test_standardized_input_ignores_brightness_and_contrast() -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 1, 128, 128) * 0.2
    brighter = 0.5 + 2.0 * images  # the same scene, brighter and with more contrast
    plain = TwinVAE(TINY).eval()
    standardized = TwinVAE(TINY.model_copy(update={"standardize_input": True})).eval()
    standardized.load_state_dict(plain.state_dict())
    same = standardized.count(images)
    torch.testing.assert_close(standardized.count(brighter), same, atol=1e-3, rtol=0)  # eps
    assert not torch.allclose(plain.count(brighter), plain.count(images))
    flat = standardized.count(torch.full((1, 1, 128, 128), 0.7))
    assert torch.isfinite(flat).all()
    output = standardized(images, "natural", sample=False)
    assert output.recon is not None and output.recon.shape == images.shape


@pytest.mark.parametrize("c_kernels", [True, False])  # False: as without a C compiler
def test_independent_pass_draws_from_its_generator_and_defers_running_statistics(
    c_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twinvae.models import cpu_kernels, domain_pass

    if not c_kernels:
        monkeypatch.setattr(cpu_kernels, "_loaded", True)
        monkeypatch.setattr(cpu_kernels, "_library", None)
    torch.manual_seed(0)
    model = TwinVAE(TINY).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.fast_kernels = True
    model.train()
    x = torch.rand(4, 1, 128, 128).contiguous(memory_format=torch.channels_last)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    global_state = torch.get_rng_state()
    outputs, pending = [], []
    for _ in range(2):
        with domain_pass.independent_pass(torch.Generator().manual_seed(7)) as updates:
            outputs.append(model(x, "natural"))
        pending.append(updates)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global generator is untouched
    assert torch.equal(outputs[0].z, outputs[1].z)  # same generator seed: same sample and masks
    assert outputs[0].recon is not None and outputs[1].recon is not None
    assert torch.equal(outputs[0].recon, outputs[1].recon)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name  # nothing applied yet
    assert len(pending[0]) == 5  # the shared decoder's batch norm and the outer decoder's four
    domain_pass.apply_running_updates(pending[0])
    norm = model.shared_decoder.deconv[1]
    assert int(norm.num_batches_tracked) == 1
    assert not torch.equal(norm.running_mean, buffers["shared_decoder.deconv.1.running_mean"])
    with torch.no_grad():
        direct = model(x, "natural", sample=False)  # outside a pass: applied at once
    assert direct.recon is not None and int(norm.num_batches_tracked) == 2


def test_independent_passes_do_not_nest() -> None:
    from twinvae.models import domain_pass

    with (
        domain_pass.independent_pass(torch.Generator()),
        pytest.raises(RuntimeError, match="do not nest"),
        domain_pass.independent_pass(torch.Generator()),
    ):
        pass
    assert domain_pass.generator() is None
