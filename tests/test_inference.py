"""Inference on your own images (scripts/inference.py, fmpsr.deploy): tiling, image kinds, errors."""
import cv2
import numpy as np
import pytest
import torch

from deploy_helpers import EDSR_COMPACT, LSRB_COMPACT, SCALE, make_export
from fmpsr.deploy.image_io import from_float, to_float
from fmpsr.deploy.inference import Upscaler, main
from fmpsr.deploy.tiling import tiled_forward


@pytest.fixture(scope='module')
def lsrb_export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp('lsrb_export'), LSRB_COMPACT)


@pytest.fixture(scope='module')
def edsr_export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp('edsr_export'), EDSR_COMPACT)


def photo(height=40, width=52, seed=0):
    """A smooth 8-bit BGR test image (a crop of a scikit-image photograph)."""
    import skimage.data
    return np.ascontiguousarray(skimage.data.astronaut()[100:100 + height, 150:150 + width, ::-1])


def net_output(net, rgb_float):
    """The network run once on the whole image, independently of fmpsr.deploy: (H, W, 3) RGB float."""
    with torch.no_grad():
        out = net(torch.from_numpy(np.ascontiguousarray(rgb_float.transpose(2, 0, 1)))[None].float())
    return out[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize('which,tol', [('edsr', 1e-5), ('lsrb', 1 / 255)])
def test_tiled_equals_untiled(which, tol, lsrb_export, edsr_export):
    # 70 x 90 LR pixels in 24-pixel tiles: 3 x 4 tiles, ragged last row and column.
    # EDSR's receptive field (7 convs: radius 7) is inside tile_pad 10, so tiling is exact up to float
    # rounding; ESA (LSRB) pools over its whole input, so seams differ slightly, within 1/255.
    net, _ = lsrb_export if which == 'lsrb' else edsr_export
    x = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = net(x)
        tiled = tiled_forward(net, x, SCALE, tile=24, tile_pad=10, min_size=15)
    assert tiled.shape == whole.shape == (1, 3, 140, 180)
    assert (tiled - whole).abs().max().item() <= tol


def test_tiled_upscaler_matches_untiled_through_the_cli(tmp_path, lsrb_export):
    _, export = lsrb_export
    cv2.imwrite(str(tmp_path / 'a.png'), photo(50, 66))
    assert main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'whole'), '--model', export]) == 0
    assert main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'tiled'), '--model', export,
                 '--tile', '16', '--tile-pad', '10']) == 0
    whole = cv2.imread(str(tmp_path / 'whole' / 'a_out.png'), cv2.IMREAD_UNCHANGED).astype(int)
    tiled = cv2.imread(str(tmp_path / 'tiled' / 'a_out.png'), cv2.IMREAD_UNCHANGED).astype(int)
    assert whole.shape == (100, 132, 3)
    assert np.abs(whole - tiled).max() <= 1


def test_rgb_round_trip_matches_the_network(tmp_path, edsr_export):
    net, export = edsr_export
    img = photo()
    cv2.imwrite(str(tmp_path / 'in.png'), img)
    assert main(['-i', str(tmp_path / 'in.png'), '-o', str(tmp_path / 'out'), '--model', export,
                 '--pre-pad', '0', '--suffix', 'x2']) == 0
    out = cv2.imread(str(tmp_path / 'out' / 'in_x2.png'), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint8 and out.shape == (80, 104, 3)
    # the network on RGB input, written back as BGR: a swapped channel order would fail here
    expected = from_float(net_output(net, img[:, :, ::-1] / 255.)[:, :, ::-1], np.uint8)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_outscale_and_jpg(tmp_path, edsr_export):
    _, export = edsr_export
    cv2.imwrite(str(tmp_path / 'in.png'), photo())
    assert main(['-i', str(tmp_path / 'in.png'), '-o', str(tmp_path), '--model', export,
                 '--outscale', '3', '--ext', 'jpg']) == 0
    out = cv2.imread(str(tmp_path / 'in_out.jpg'))
    assert out.shape == (120, 156, 3)


@pytest.mark.parametrize('alpha_upsampler', ['network', 'bicubic'])
def test_rgba_round_trip(tmp_path, edsr_export, alpha_upsampler):
    net, export = edsr_export
    bgr = photo()
    yy, xx = np.mgrid[:bgr.shape[0], :bgr.shape[1]]
    alpha = np.clip((xx * 5 + yy * 3) % 256, 0, 255).astype(np.uint8)  # a ramp with sharp wraps
    cv2.imwrite(str(tmp_path / 'rgba.png'), np.dstack([bgr, alpha]))
    assert main(['-i', str(tmp_path / 'rgba.png'), '-o', str(tmp_path / 'out'), '--model', export,
                 '--pre-pad', '0', '--alpha-upsampler', alpha_upsampler]) == 0
    out = cv2.imread(str(tmp_path / 'out' / 'rgba_out.png'), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint8 and out.shape == (80, 104, 4)
    expected_color = from_float(net_output(net, bgr[:, :, ::-1] / 255.)[:, :, ::-1], np.uint8)
    assert np.abs(out[:, :, :3].astype(int) - expected_color.astype(int)).max() <= 1
    bicubic = from_float(cv2.resize(to_float(alpha), (104, 80), interpolation=cv2.INTER_CUBIC), np.uint8)
    gray = np.repeat(to_float(alpha)[:, :, None], 3, axis=2)
    by_network = from_float(cv2.cvtColor(net_output(net, gray), cv2.COLOR_RGB2GRAY), np.uint8)
    assert np.abs(bicubic.astype(int) - by_network.astype(int)).max() > 10  # the two modes differ
    expected_alpha = bicubic if alpha_upsampler == 'bicubic' else by_network
    assert np.abs(out[:, :, 3].astype(int) - expected_alpha.astype(int)).max() <= 1


def test_16bit_grayscale_round_trip(tmp_path, lsrb_export):
    _, export = lsrb_export
    gray16 = (cv2.cvtColor(photo(), cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
              + np.arange(40 * 52, dtype=np.uint16).reshape(40, 52) % 200)  # not a multiple of 257
    cv2.imwrite(str(tmp_path / 'g16.png'), gray16)
    up = Upscaler(export, device='cpu')
    direct = up.enhance(gray16)
    assert main(['-i', str(tmp_path / 'g16.png'), '-o', str(tmp_path / 'out'), '--model', export]) == 0
    out = cv2.imread(str(tmp_path / 'out' / 'g16_out.png'), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (80, 104)
    np.testing.assert_array_equal(out, direct)
    inner = out[(out > 0) & (out < 65535)]  # not clipped
    assert inner.size > 1000 and np.count_nonzero(inner % 257) > inner.size // 2  # 16 bits kept, not 8


def test_unreadable_file_is_reported_and_skipped(tmp_path, edsr_export, capsys):
    _, export = edsr_export
    inputs = tmp_path / 'in'
    inputs.mkdir()
    cv2.imwrite(str(inputs / 'a.png'), photo())
    (inputs / 'b_broken.png').write_bytes(b'this is not a PNG file')
    cv2.imwrite(str(inputs / 'c.jpg'), photo(30, 30))
    assert main(['-i', str(inputs), '-o', str(tmp_path / 'out'), '--model', export]) == 1
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a_out.png', 'c_out.jpg']
    err = capsys.readouterr().err
    assert 'b_broken.png' in err and 'cannot read' in err


def test_existing_output_is_not_overwritten(tmp_path, edsr_export, capsys):
    _, export = edsr_export
    cv2.imwrite(str(tmp_path / 'a.png'), photo())
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'a_out.png').write_bytes(b'keep me')
    assert main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'out'), '--model', export]) == 1
    assert (tmp_path / 'out' / 'a_out.png').read_bytes() == b'keep me'
    assert main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'out'), '--model', export, '--overwrite']) == 0
    assert cv2.imread(str(tmp_path / 'out' / 'a_out.png')).shape == (80, 104, 3)


def test_half_on_cpu_is_refused(tmp_path, edsr_export, capsys):
    _, export = edsr_export
    cv2.imwrite(str(tmp_path / 'a.png'), photo())
    with pytest.raises(SystemExit) as info:
        main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'out'), '--model', export,
              '--device', 'cpu', '--half'])
    assert info.value.code == 2
    assert '--half needs a CUDA device' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_tile_below_the_esa_minimum_is_refused(tmp_path, lsrb_export, edsr_export, capsys):
    cv2.imwrite(str(tmp_path / 'a.png'), photo())
    with pytest.raises(SystemExit) as info:
        main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'out'), '--model', lsrb_export[1], '--tile', '12'])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert '--tile 12' in err and '15 pixels' in err
    assert not (tmp_path / 'out').exists()
    with pytest.raises(ValueError, match='minimum LR input of this network \\(15 pixels'):
        Upscaler(lsrb_export[1], device='cpu', tile=14)
    # no ESA in EDSR: a small tile is fine and still exact
    assert main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'out'), '--model', edsr_export[1],
                 '--tile', '12']) == 0


def test_image_smaller_than_the_esa_minimum_is_padded(lsrb_export):
    _, export = lsrb_export
    out = Upscaler(export, device='cpu', pre_pad=0).enhance(photo(9, 11))
    assert out.shape == (18, 22, 3) and out.dtype == np.uint8
