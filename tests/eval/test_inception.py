"""The FID Inception port on random weights: pytorch-fid's parameter layout, output shapes, the ADM
feature definitions (pool_3, mixed_6/conv[..., :7] channel-last, unbiased logits), the TF graph's
resize/normalisation/pooling, and weight loading."""

import pytest
import torch
import torch.nn.functional as F

from ditmoe.eval.inception import InceptionV3, load_inception, resize_bilinear_tf1

pytestmark = pytest.mark.usefixtures("one_thread")  # much faster on the shared CPU cores


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = InceptionV3()
    net.fc.bias.fill_(5.0)  # ADM's logits leave the bias out: a non-zero bias must not show
    return net


@pytest.fixture(scope="module")
def weights_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(model.state_dict(), path)
    return path


def test_parameter_layout_matches_pytorch_fid(model):
    state = model.state_dict()
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
        "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
        "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.bn.weight": (448,),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.running_mean": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    assert {k: tuple(state[k].shape) for k in expected_shapes} == expected_shapes
    assert not any(k.startswith("AuxLogits") for k in state)
    # 94 conv + batch-norm layers (conv weight, bn weight/bias/running_mean/running_var/num_batches_tracked) + fc
    assert len(state) == 94 * 6 + 2
    # torchvision's Inception-v3 has 27,161,264 parameters; less its aux head (3,326,696) is 23,834,568;
    # the 1008-way classifier adds 8 * (2048 + 1)
    assert sum(p.numel() for p in model.parameters()) == 23_834_568 + 8 * 2049


def test_small_images_give_adm_features(model):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    seen = {}
    hooks = [model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, a: seen.update(input=a[0])),
             model.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: seen.update(mixed_6_conv=out)),
             model.Mixed_7c.register_forward_hook(lambda m, a, out: seen.update(mixed_10=out))]
    with torch.no_grad():
        out = model(images)
    for hook in hooks:
        hook.remove()
    assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 7 * 17 * 17)
    assert out.logits.shape == out.probs.shape == (2, 1008)
    assert torch.allclose(seen["input"], (resize_bilinear_tf1(images.float(), 299) - 128) / 128)
    assert seen["mixed_6_conv"].shape == (2, 192, 17, 17)
    # ADM flattens the NHWC tensor mixed_6/conv[..., :7]: channel-last order
    assert torch.equal(out.spatial, seen["mixed_6_conv"][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert seen["mixed_10"].shape == (2, 2048, 8, 8)
    assert torch.allclose(out.pool, seen["mixed_10"].mean((2, 3)))
    assert out.pool.std() > 0.01 and out.spatial.std() > 0.01  # random weights, yet not degenerate
    assert torch.allclose(out.logits, out.pool @ model.fc.weight.T)
    assert torch.allclose(out.probs.sum(1), torch.ones(2, dtype=torch.float64))


def test_299_images_are_only_rescaled(model):
    images = torch.randint(0, 256, (1, 3, 299, 299)).float()
    seen = {}
    hook = model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, a: seen.update(input=a[0]))
    with torch.no_grad():
        out = model(images)
    hook.remove()
    assert torch.equal(seen["input"], (images - 128) / 128)
    assert out.pool.shape == (1, 2048) and out.spatial.shape == (1, 2023) and out.probs.shape == (1, 1008)


def test_resize_follows_tf1_without_half_pixel_centres():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    # output i samples input i * in / out, the last column clamps: [a, (a + b) / 2, b, b]
    up = resize_bilinear_tf1(x, 4)
    assert torch.allclose(up[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    assert torch.allclose(up[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))
    ramp = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    assert torch.equal(resize_bilinear_tf1(ramp, 2)[0, 0, 0], torch.tensor([0.0, 2.0]))  # pixels 0 and 2
    assert not torch.allclose(up, F.interpolate(x, size=4, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("block, channels, size, pool", [
    ("Mixed_5b", 192, 5, "avg"), ("Mixed_6b", 768, 5, "avg"),
    ("Mixed_7b", 1280, 3, "avg"), ("Mixed_7c", 2048, 3, "max"),  # the graph's last block max-pools
])
def test_block_pool_branches_follow_the_tf_graph(model, block, channels, size, pool):
    x = torch.rand(1, channels, size, size)
    seen = {}
    hook = getattr(model, block).branch_pool.register_forward_pre_hook(lambda m, a: seen.update(pooled=a[0]))
    with torch.no_grad():
        getattr(model, block)(x)
    hook.remove()
    expected = (F.max_pool2d(x, 3, stride=1, padding=1) if pool == "max"
                else F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))  # TF ignores the padding
    assert torch.allclose(seen["pooled"], expected)


@pytest.mark.slow
def test_load_inception_round_trips(model, weights_file, tmp_path):
    loaded = load_inception(weights_file)
    assert not loaded.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    # pytorch-fid's file may lack the num_batches_tracked counters
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "plain.pth")
    assert torch.equal(load_inception(tmp_path / "plain.pth").fc.weight, model.fc.weight)


def test_load_inception_names_the_file_and_the_bad_keys(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="none.pth: no such Inception weights file"):
        load_inception(tmp_path / "none.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pth: not a PyTorch state dict"):
        load_inception(tmp_path / "text.pth")
    state = dict(model.state_dict())
    del state["fc.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
    torch.save(state, tmp_path / "torchvision.pth")
    with pytest.raises(ValueError) as err:
        load_inception(tmp_path / "torchvision.pth")
    message = str(err.value)
    assert "torchvision.pth: not the FID Inception state dict" in message
    assert "missing keys: fc.weight" in message and "unexpected keys: AuxLogits.fc.weight" in message
    assert "wrong shapes: Mixed_5b.branch1x1.conv.weight (64, 192, 3, 3) (expected (64, 192, 1, 1))" in message
