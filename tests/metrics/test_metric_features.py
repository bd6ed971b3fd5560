"""Feature extractors: the canonical image format, the judge's features, the Inception wrapper, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.metrics.classifier import DigitJudge
from ldm.metrics.features import (
    INCEPTION_WEIGHTS_ENV,
    InceptionFeatures,
    JudgeFeatures,
    reference_features,
    to_uint8_nhwc,
)


def test_to_uint8_nhwc_conversions():
    floats = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 1.7, -3.0]).reshape(1, 1, 1, 7)
    # round((x + 1) * 127.5), saturating: 0, 63.75 -> 64, 127.5 -> 128 (half to even), 254.87 -> 255.
    assert to_uint8_nhwc(floats)[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255, 0]
    chw = np.random.default_rng(0).random((2, 3, 4, 5)) * 2 - 1
    assert to_uint8_nhwc(chw).shape == (2, 4, 5, 3)
    grey = np.zeros((2, 28, 28), dtype=np.uint8)
    assert to_uint8_nhwc(grey).shape == (2, 28, 28, 1)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_nhwc(np.full((1, 1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="uint8"):
        to_uint8_nhwc(np.zeros((2, 28, 28, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        to_uint8_nhwc(np.zeros((2, 1, 28, 28), dtype=np.int32))


def test_judge_features_are_the_penultimate_layer_and_stay_in_eval():
    torch.manual_seed(0)
    judge = DigitJudge()
    extractor = JudgeFeatures(judge)
    extractor.train()  # torchmetrics / Lightning may flip modes; dropout must stay off
    assert not judge.training
    images = np.random.default_rng(1).integers(0, 256, size=(5, 32, 32, 1), dtype=np.uint8)
    expected = judge.features(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.testing.assert_allclose(
        extractor.extract(images, batch_size=2), expected.detach().double().numpy(), rtol=1e-5, atol=1e-6
    )
    assert extractor.num_features == 128 and extractor.name.startswith("judge128-")
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(2, 1, 32, 32))


def test_reference_features_hit_equals_miss(tmp_path):
    torch.manual_seed(0)
    extractor = JudgeFeatures(DigitJudge())
    images = np.random.default_rng(2).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    miss = reference_features("toy", 28, extractor, lambda: images, tmp_path)
    hit = reference_features("toy", 28, extractor, lambda: pytest.fail("cache miss"), tmp_path)
    np.testing.assert_array_equal(hit, miss)
    assert miss.shape == (20, 128) and miss.dtype == np.float64


def test_inception_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            InceptionFeatures()
        return
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV) as error:
        InceptionFeatures()
    assert "weights_path" in str(error.value) and "JudgeFeatures" in str(error.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        InceptionFeatures(weights_path=str(tmp_path / "missing.pth"))
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "missing-too.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InceptionFeatures()


@pytest.mark.slow  # builds and runs a full Inception-v3 on CPU
def test_inception_wrapper_loads_local_weights(tmp_path, monkeypatch):
    inception_module = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from safetensors.torch import save_file

    # Random weights in the real layout, made without a download: build the net with loading stubbed out.
    with monkeypatch.context() as patch:
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        random_net = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = {k: v.contiguous() for k, v in random_net.state_dict().items()}
    save_file(weights, tmp_path / "inception.safetensors")

    extractor = InceptionFeatures(weights_path=str(tmp_path / "inception.safetensors"))
    loaded = extractor.inception.state_dict()
    torch.testing.assert_close(
        loaded["Mixed_7c.branch1x1.conv.weight"], weights["Mixed_7c.branch1x1.conv.weight"]
    )
    images = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32), dtype=np.uint8)
    features = extractor.extract(images)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    assert extractor.name == "inception-v3-fid2048" and extractor.num_features == 2048
    # Grey input equals the same image repeated over RGB.
    rgb = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous()
    np.testing.assert_allclose(extractor(rgb).double().numpy(), features, rtol=1e-5, atol=1e-6)
