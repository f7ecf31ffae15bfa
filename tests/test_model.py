"""TwinVAE shapes, deterministic inference, variants; the bundled counting network is the
model's own definition."""

import ast
from pathlib import Path

import pytest
import torch

from twinvae.export.network import (
    NetworkSpec,
    architecture_source,
    load_standalone_class,
    network_state,
)
from twinvae.models import ModelConfig, TwinVAE, counting_network
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


def test_the_bundled_architecture_file_is_the_models_own_definition(tmp_path: Path) -> None:
    """Bundles ship `twinvae.models.counting_network` itself, which imports only torch."""
    source = Path(counting_network.__file__).read_bytes()
    assert architecture_source() == source
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert imported <= {"__future__", "collections", "torch"}, imported
    shipped = tmp_path / "twinvae_counting_network.py"
    shipped.write_bytes(architecture_source())
    standalone = load_standalone_class(shipped)
    images = torch.rand(3, 1, 128, 128)
    for update in ({}, {"regressor_input": "shared_decoder", "standardize_input": True}):
        torch.manual_seed(4)
        twin = TwinVAE(TINY.model_copy(update=update)).eval()
        spec = NetworkSpec(twin.config, with_mu=True)
        network = standalone(**spec.architecture_kwargs())
        network.load_state_dict(network_state(twin), strict=True)
        count, mu = network(images)
        torch.testing.assert_close(count[:, 0], twin.count(images), rtol=0, atol=0)
        torch.testing.assert_close(mu, twin.encode(images, "natural")[0], rtol=0, atol=0)
