"""LPIPS: refuses to run without real weights, loads torchvision / lpips weight files, matches the formula."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models.vgg import cfgs, make_layers

from ldm.nets.perceptual import LPIPS

CHANNELS = (64, 128, 256, 512, 512)


def save_vgg_features(path) -> torch.nn.Sequential:
    """A torchvision-layout VGG16 state dict file (random values: only the loading path is tested)."""
    features = make_layers(cfgs["D"], batch_norm=False)
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path))
    return features


def test_refuses_random_weights_without_explicit_opt_in(tmp_path):
    with pytest.raises(ValueError, match="model.vae.loss.perceptual.vgg_weights_path") as err:
        LPIPS()
    assert "perceptual_weight=0" in str(err.value)
    save_vgg_features(tmp_path / "vgg16.safetensors")
    with pytest.raises(ValueError, match="model.vae.loss.perceptual.lpips_weights_path"):
        LPIPS(vgg_weights_path=str(tmp_path / "vgg16.safetensors"))
    with pytest.raises(FileNotFoundError):
        LPIPS(vgg_weights_path=str(tmp_path / "missing.safetensors"))


def test_loads_vgg_and_linear_weights_from_files(tmp_path):
    torch.manual_seed(0)
    vgg_path = tmp_path / "vgg16.safetensors"
    features = save_vgg_features(vgg_path)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}
    lin_path = tmp_path / "vgg.pth"
    torch.save(lin, lin_path)

    lpips = LPIPS(vgg_weights_path=str(vgg_path), lpips_weights_path=str(lin_path))
    torch.testing.assert_close(lpips.slices[0][0].weight, features[0].weight)
    torch.testing.assert_close(lpips.slices[4][5].weight, features[28].weight)  # conv5_3
    torch.testing.assert_close(lpips.lin3.model[1].weight, lin["lin3.model.1.weight"])
    assert not any(p.requires_grad for p in lpips.parameters())

    # An independent evaluation of the LPIPS formula on the whole VGG feature stack.
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = {3: 0, 8: 1, 15: 2, 22: 3, 29: 4}  # relu1_2 ... relu5_3 inside vgg16().features

    def stage_outputs(img):
        h, outs = (img - shift) / scale, []
        for index, layer in enumerate(features[:30]):  # the last max-pool is not an LPIPS stage
            h = layer(h.clone())
            if index in taps:
                outs.append(h)
        return outs

    with torch.no_grad():
        expected = torch.zeros(2)
        for i, (a, b) in enumerate(zip(stage_outputs(x), stage_outputs(y), strict=True)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = lin[f"lin{i}.model.1.weight"].view(1, -1, 1, 1)
            expected += ((a - b).pow(2) * w).sum(1).mean(dim=(1, 2))
        torch.testing.assert_close(lpips(x, y), expected, atol=1e-5, rtol=1e-4)


def test_bad_weight_files_are_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        LPIPS(vgg_weights_path=str(bad), allow_random_weights_for_tests=True)
    torch.save({"something": torch.zeros(1)}, tmp_path / "lin.pth")
    with pytest.raises(ValueError, match="not an LPIPS vgg.pth"):
        LPIPS(lpips_weights_path=str(tmp_path / "lin.pth"), allow_random_weights_for_tests=True)


def test_distance_properties_and_gradient_to_input():
    torch.manual_seed(0)
    lpips = LPIPS(allow_random_weights_for_tests=True)
    lpips.train()
    assert not lpips.training  # stays a frozen metric
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = (torch.rand(2, 1, 16, 16) * 2 - 1).requires_grad_(True)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    d = lpips(y, x)
    assert d.shape == (2,) and bool((d > 0).all())
    torch.testing.assert_close(d, lpips(x, y.detach()), atol=1e-6, rtol=1e-5)
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="equal shape"):
        lpips(x, torch.zeros(2, 1, 8, 8))
