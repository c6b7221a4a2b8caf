"""check_shape: bindings, spatial groups and error messages that name the expected and the actual."""

from __future__ import annotations

import pytest
import torch

from plasticine.core import check_shape
from plasticine.core.shapes import spatial_dims


def test_binds_names_and_spatial_sizes():
    dims = check_shape(torch.zeros(2, 3, 8, 9), "B C *S", "image")
    assert dims == {"B": 2, "C": 3, "S": (8, 9), "N": 2}
    dims = check_shape(torch.zeros(2, 3, 4, 5, 6), "B N *S", "u")
    assert dims["N"] == 3 and dims["S"] == (4, 5, 6)
    assert spatial_dims(torch.zeros(1, 1, 2, 2, 2)) == 3


def test_bindings_are_shared_across_calls():
    dims = check_shape(torch.zeros(2, 1, 8, 9), "B C *S", "image")
    check_shape(torch.zeros(2, 2, 8, 9), "B N *S", "displacement", bindings=dims)
    with pytest.raises(ValueError, match=r"displacement: expected shape \(B, N, \*S\), got \(2, 2, 8, 8\): S=\(8, 8\) does not match S=\(8, 9\)"):
        check_shape(torch.zeros(2, 2, 8, 8), "B N *S", "displacement", bindings=dict(dims))
    with pytest.raises(ValueError, match=r"got \(3, 2, 8, 9\): B=3 does not match B=2 seen before"):
        check_shape(torch.zeros(3, 2, 8, 9), "B N *S", "displacement", bindings=dict(dims))


def test_errors_name_pattern_and_shape():
    with pytest.raises(ValueError, match=r"image: expected shape \(B, C, \*S\), got \(4, 5\): \*S must be 2 or 3 spatial dimensions, found 0"):
        check_shape(torch.zeros(4, 5), "B C *S", "image")
    with pytest.raises(ValueError, match=r"u: expected shape \(B, N, \*S\), got \(1, 3, 4, 5\): N=3 vector components but 2 spatial"):
        check_shape(torch.zeros(1, 3, 4, 5), "B N *S", "u")
    with pytest.raises(ValueError, match=r"labels: expected shape \(B, 1, \*S\), got \(1, 2, 4, 5\): a dimension of size 1 expected, found 2"):
        check_shape(torch.zeros(1, 2, 4, 5), "B 1 *S", "labels")
    with pytest.raises(ValueError, match=r"points: expected shape \(B, P, N\), got \(5, 2\): 3 dimensions expected, found 2"):
        check_shape(torch.zeros(5, 2), "B P N", "points", spatial=())
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor of shape \(B, C\), got list"):
        check_shape([1, 2], "B C", "x")
    with pytest.raises(ValueError, match="more than one starred group"):
        check_shape(torch.zeros(1, 2, 3), "*A *B", "x")


def test_empty_batches_and_empty_images_are_refused():
    with pytest.raises(ValueError, match=r"^image: expected shape \(B, C, \*S\), got \(0, 1, 4, 5\): an empty batch \(B = 0\); pass at least one item$"):
        check_shape(torch.zeros(0, 1, 4, 5), "B C *S", "image")
    with pytest.raises(ValueError, match=r"^image: expected shape \(B, C, \*S\), got \(1, 1, 4, 0\): S=\(4, 0\) has no voxels$"):
        check_shape(torch.zeros(1, 1, 4, 0), "B C *S", "image")
    assert check_shape(torch.zeros(2, 0, 3), "B P N", "points", spatial=())["P"] == 0  # only B and S must be non-empty


def test_floating_option_names_the_argument_and_dtype():
    assert check_shape(torch.zeros(1, 1, 4, 5, dtype=torch.float16), "B C *S", "image", floating=True)["B"] == 1
    for dtype in (torch.int64, torch.uint8, torch.bool, torch.complex64):
        with pytest.raises(ValueError, match=rf"^image: expected a floating-point tensor, got dtype {dtype}$"):
            check_shape(torch.zeros(1, 1, 4, 5, dtype=dtype), "B C *S", "image", floating=True)
    check_shape(torch.zeros(1, 1, 4, 5, dtype=torch.int64), "B C *S", "labels")  # without the option: any dtype


def test_check_finite_counts_and_names():
    from plasticine.core import NonFiniteError, check_finite

    check_finite(torch.zeros(3, 4), "x")
    check_finite(torch.zeros(3, dtype=torch.long), "labels")
    x = torch.zeros(3, 4)
    x[0, 1], x[2, 2] = float("nan"), -float("inf")
    with pytest.raises(NonFiniteError, match=r"^x: expected finite values, found 2 NaN or infinite value\(s\) in a tensor of shape \(3, 4\) \(a hint\)$"):
        check_finite(x, "x", "a hint")
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor, got list"):
        check_finite([1.0], "x")
