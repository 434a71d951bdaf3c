import pytest
import torch

from guard.core.validation import check_float, check_images, check_int, check_labels


@pytest.mark.parametrize(
    "x, exc, pattern",
    [
        (torch.full((2, 1, 4, 4), float("nan")), ValueError, r"images must be finite; got 32 NaN"),
        (torch.rand(1, 4, 4), ValueError, r"images must be a 4-D tensor \(N, C, H, W\); got shape \(1, 4, 4\)"),
        (
            torch.randint(0, 255, (2, 1, 4, 4), dtype=torch.uint8),
            TypeError,
            r"images must be a floating-point.*uint8.*divide",
        ),
        (torch.rand(2, 1, 4, 4) + 1.5, ValueError, r"images must lie in \[0, 1\]"),
        (torch.rand(0, 1, 4, 4), ValueError, r"images must hold at least one image"),
        ([[0.5]], TypeError, r"images must be a torch.Tensor.*got list"),
    ],
)
def test_check_images_errors_name_argument_expected_and_got(x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        check_images(x, "images")


def test_check_images_channels_and_pass_through():
    x = torch.rand(2, 3, 4, 4)
    assert check_images(x, "x", channels=3) is x
    with pytest.raises(ValueError, match="x must have 1 channel"):
        check_images(x, "x", channels=1)
    assert check_images(torch.rand(0, 1, 2, 2), "x", allow_empty=True).shape[0] == 0


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32)])
def test_wrong_image_geometry_gives_clear_error(tiny_model, shape):
    from guard.core.features import FeatureExtractor

    with pytest.raises(
        ValueError, match=r"the model cannot take x of shape " + repr(shape).replace("(", r"\(").replace(")", r"\)")
    ):
        FeatureExtractor(tiny_model, ["conv2"])(torch.rand(shape))


def test_feature_extractor_rejects_inf(tiny_model):
    from guard.core.features import FeatureExtractor

    with pytest.raises(ValueError, match="x must be finite"):
        FeatureExtractor(tiny_model, ["conv2"])(torch.full((1, 1, 28, 28), float("inf")))


def test_labels_and_params():
    assert check_labels(torch.tensor([0, 2], dtype=torch.int32), "y").dtype == torch.int64
    with pytest.raises(TypeError, match="y must hold integer"):
        check_labels(torch.tensor([0.0]), "y")
    with pytest.raises(ValueError, match=r"y must lie in \[0, 9\]"):
        check_labels(torch.tensor([10]), "y", num_classes=10)
    with pytest.raises(ValueError, match=r"The 'k' parameter of KNNRank must be an int >= 1. Got 0."):
        check_int(0, "k", "KNNRank", low=1)
    with pytest.raises(ValueError, match="eps"):
        check_float(-0.1, "eps", "PGD", low=0.0)
    with pytest.raises(ValueError, match="eps"):
        check_float(float("nan"), "eps", "PGD", low=0.0)
    assert check_int(3, "k", "KNNRank", low=1) == 3
