import io

import numpy as np
import pytest
from PIL import Image

from ditmoe.data.preprocess import center_crop_arr, pil_preprocess, plan_resize, probe_image
from ditmoe.data.synthetic import VARIED, encode_image, natural_image, varied_samples


def test_plan_follows_adm():
    plan = plan_resize(2900, 2100, 256)  # 2900x2100 -> 1450x1050 -> 725x525 -> 362x262, then bicubic
    assert plan.halvings == 3 and plan.resized == (354, 256) and plan.crop == (0, 49)
    assert plan_resize(300, 200, 256).resized == (384, 256)  # upscale
    assert plan_resize(511, 1023, 256).halvings == 0 and plan_resize(512, 1023, 256).halvings == 1


@pytest.mark.slow
def test_pil_reference_shapes():
    for h, w, fmt, mode in VARIED:
        out = pil_preprocess(encode_image(natural_image(h, w, 0), fmt, mode), 256)
        assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    exact = natural_image(512, 1024, 1)  # one exact 2:1 box step is the mean of 2x2 blocks
    pooled = exact.reshape(256, 2, 512, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(center_crop_arr(Image.fromarray(exact), 256) - pooled[:, 128:384]).max() <= 1


@pytest.mark.parametrize("resolution", [256, 512])
@pytest.mark.slow
def test_dali_cpu_matches_pil(resolution):
    from ditmoe.data.dali_preprocess import DaliPreprocessor

    datas = [fields[ext] for _, fields in varied_samples(seed=3, bad=False) for ext in fields if ext != "cls"]
    datas.append(encode_image(natural_image(1100, 2300, 4)))  # two halvings, odd sizes
    plans = [plan_resize(*probe_image(d)[2], resolution) for d in datas]
    dali = DaliPreprocessor(resolution, 16, num_threads=2)
    assert all(dali.supports(*probe_image(d)[:2], p) for d, p in zip(datas, plans))
    out = dali(datas, plans).numpy()
    for d, o in zip(datas, out):
        mad = np.abs(o.astype(np.float64) - pil_preprocess(d, resolution)).mean()
        assert mad < 1.0, (Image.open(io.BytesIO(d)).size, mad)
    assert np.mean([np.abs(o.astype(np.float64) - pil_preprocess(d, resolution)).mean()
                    for d, o in zip(datas, out)]) < 0.1


def test_dali_batch_with_corrupt_jpeg_fails_then_recovers():
    from ditmoe.data.dali_preprocess import DaliPreprocessor

    good = encode_image(natural_image(300, 400, 0))
    bad = encode_image(natural_image(600, 600, 1))
    bad = bad[: len(bad) // 2]
    plans = [plan_resize(*probe_image(d)[2], 256) for d in (good, bad)]
    dali = DaliPreprocessor(256, 4, num_threads=1)
    with pytest.raises(Exception):
        dali([good, bad], plans)
    out = dali([good], plans[:1])
    assert np.abs(out[0].numpy().astype(float) - pil_preprocess(good, 256)).mean() < 1.0
    with pytest.raises(OSError):
        pil_preprocess(bad, 256)
