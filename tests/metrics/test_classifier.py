"""The digit judge: input handling, cache keying/loading, and (slow) accuracy on the MNIST-5k val split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ldm.metrics.classifier as classifier
from ldm.metrics.classifier import (
    DigitJudge,
    JudgeArch,
    JudgeTrainConfig,
    conditional_accuracy,
    conditional_accuracy_report,
    judge_cache_key,
    judge_input,
    load_or_train_judge,
)
from ldm.metrics.features import module_fingerprint

TINY_CONFIG = JudgeTrainConfig(epochs=1, batch_size=16)
TINY_ARCH = JudgeArch(channels=(4, 8), feature_dim=16)


def _toy_digits(count: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c is a bright horizontal bar at row 2 + 2c on a black 28x28 canvas, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    images = rng.integers(0, 40, size=(count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
    return images, labels.astype(np.int64)


def test_28px_input_is_padded_with_background():
    torch.manual_seed(0)
    judge = DigitJudge().eval()
    x28 = torch.rand(3, 1, 28, 28) * 2 - 1
    x32 = F.pad(x28, (2, 2, 2, 2), value=-1.0)
    torch.testing.assert_close(judge.features(x28), judge.features(x32))
    assert judge.features(x32).shape == (3, 128) and judge(x32).shape == (3, 10)
    with pytest.raises(ValueError, match="28\\|32"):
        judge(torch.zeros(2, 1, 30, 30))
    with pytest.raises(ValueError, match="single-channel"):
        judge_input(np.zeros((2, 32, 32, 3), dtype=np.uint8))


def test_conditional_accuracy_counts_agreement_with_the_judge():
    torch.manual_seed(0)
    judge = DigitJudge().eval()
    images = torch.rand(40, 1, 32, 32) * 2 - 1  # float NCHW in [-1, 1], the sampler's format
    predicted = judge.predict(judge_input(images))
    assert conditional_accuracy(judge, images, predicted) == 1.0
    assert conditional_accuracy(judge, images, (predicted + 1) % 10) == 0.0
    half = predicted.clone()
    half[:20] = (half[:20] + 1) % 10
    report = conditional_accuracy_report(judge, images, half)
    assert report == {"cond_acc": 0.5, "cond_acc_n": 40, "judge": f"digit-judge-{module_fingerprint(judge)}"}
    with pytest.raises(ValueError, match="labels"):
        conditional_accuracy(judge, images, predicted[:5])


def test_cache_key_tracks_data_architecture_and_hyperparameters():
    images, labels = _toy_digits()
    args = (images[:50], labels[:50], images[50:], labels[50:])
    key = judge_cache_key(*args, JudgeArch(), JudgeTrainConfig())
    assert judge_cache_key(*args, JudgeArch(), JudgeTrainConfig()) == key
    changed = images[:50].copy()
    changed[0, 0, 0] ^= 1  # one pixel, one bit
    assert judge_cache_key(changed, *args[1:], JudgeArch(), JudgeTrainConfig()) != key
    assert judge_cache_key(*args, JudgeArch(feature_dim=64), JudgeTrainConfig()) != key
    assert judge_cache_key(*args, JudgeArch(), JudgeTrainConfig(epochs=5)) != key


def test_cached_judge_loads_without_retraining(tmp_path, monkeypatch):
    images, labels = _toy_digits()
    trained = load_or_train_judge(tmp_path, images, labels, arch=TINY_ARCH, config=TINY_CONFIG)
    files = list(tmp_path.glob("judge-*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    assert trained.val_accuracy is not None and trained.train_info["val_n"] == 10

    def refuse_to_train(*args, **kwargs):
        raise AssertionError("a cached judge must not be retrained")

    monkeypatch.setattr(classifier, "train_judge", refuse_to_train)
    loaded = load_or_train_judge(tmp_path, images, labels, arch=TINY_ARCH, config=TINY_CONFIG)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert loaded.val_accuracy == trained.val_accuracy and not loaded.training

    changed = images.copy()
    changed[0, 0, 0] ^= 1
    with pytest.raises(AssertionError, match="must not be retrained"):
        load_or_train_judge(tmp_path, changed, labels, arch=TINY_ARCH, config=TINY_CONFIG)


@pytest.mark.slow
def test_judge_reaches_95_percent_on_mnist5k_val(tmp_path):
    # MNIST-5k train split, default architecture and schedule, trained here (not the shipped judge)
    judge = load_or_train_judge(tmp_path, shipped=False)
    assert judge.val_accuracy >= 0.95, judge.train_info
    assert judge.train_info["val_n"] == 500 and judge.train_info["train_n"] == 4500

    from ldm.data.mnist5k import load_mnist5k_arrays, stratified_split

    images, labels = load_mnist5k_arrays()
    _, val_idx = stratified_split(labels, 0.1, 0)
    assert conditional_accuracy(judge, images[val_idx], labels[val_idx]) == judge.val_accuracy
    shuffled = np.random.default_rng(0).permutation(labels[val_idx])
    assert conditional_accuracy(judge, images[val_idx], shuffled) < 0.3


# The shipped judge's weights define the units of every FID on digits recorded in the README and the studies;
# replacing the file changes those units, so it must be a deliberate change of this fingerprint.
SHIPPED_FINGERPRINT = "d123210de8ea"


def test_the_mnist5k_judge_is_shipped_not_trained(tmp_path, monkeypatch):
    def refuse_to_train(*args, **kwargs):
        raise AssertionError("the default MNIST-5k judge is shipped; its key no longer matches the shipped file "
                             "(re-ship ldm/metrics/judges/ or restore the key's inputs)")

    monkeypatch.setattr(classifier, "train_judge", refuse_to_train)
    judge = load_or_train_judge(tmp_path)
    assert module_fingerprint(judge) == SHIPPED_FINGERPRINT
    assert not list(tmp_path.iterdir()), "a shipped judge writes nothing to the cache"
    assert not judge.training and judge.train_info["val_n"] == 500

    from ldm.data.mnist5k import load_mnist5k_arrays, stratified_split

    images, labels = load_mnist5k_arrays()
    _, val_idx = stratified_split(labels, 0.1, 0)
    # Another CPU's kernels may flip a borderline digit, not more.
    assert abs(conditional_accuracy(judge, images[val_idx], labels[val_idx]) - judge.val_accuracy) <= 2 / 500

    with pytest.raises(AssertionError, match="is shipped"):
        load_or_train_judge(tmp_path, shipped=False)  # opting out trains
