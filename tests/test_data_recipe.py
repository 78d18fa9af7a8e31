"""The README's training-data recipe (section "Prepare the data sets") cannot misalign HR / LR pairs.

The recipe is run exactly as written (its bash block, `python` being this interpreter) on photographs
whose sizes are not multiples of the scale; every sub-image pair is then located in the full HR and LR
images by exact template matching, independently of the scripts, and must sit at HR position =
scale x LR position. The old recipe (HR not mod-cropped, HR and LR folders cut in separate runs) is
rebuilt too: its shifted pairs, measured the same way, are exactly the ones ``check_pairs.py`` reports.
"""
import os
import os.path as osp
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'scripts', 'data'))

import check_pairs  # noqa: E402
import extract_subimages  # noqa: E402
import generate_bicubic_lr  # noqa: E402

SCALE = 4


def _photos():
    """Three photographs (BGR uint8) of sizes that are not multiples of 4, from scikit-image's samples."""
    import skimage.data
    bgr = (lambda rgb: np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
    rocket = cv2.resize(bgr(skimage.data.rocket()), (789, 526), interpolation=cv2.INTER_CUBIC)
    return {'astronaut.png': bgr(skimage.data.astronaut())[:509, :507],      # H mod 4 = 1, W mod 4 = 3
            'retina.png': bgr(skimage.data.retina())[300:1001, 400:934],     # 701 x 534: 1, 2
            'rocket.jpg': rocket}                                            # 526 x 789, stored as JPEG


def _readme_block(title):
    """The first ```bash block after the paragraph starting with ``title`` in README.md."""
    with open(osp.join(REPO, 'README.md')) as f:
        text = f.read()
    start = text.index(title)
    match = re.search(r'```bash\n(.*?)```', text[start:], re.S)
    return match.group(1)


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _locate(small, big):
    """(y, x) of ``small`` in ``big``: the best template match, checked to be an exact copy."""
    result = cv2.matchTemplate(big.astype(np.float32), small.astype(np.float32), cv2.TM_SQDIFF)
    _, _, (x, y), _ = cv2.minMaxLoc(result)
    h, w = small.shape[:2]
    np.testing.assert_array_equal(big[y:y + h, x:x + w], small, err_msg='sub-image not found in its source image')
    return y, x


def _shifts(hr_full, lr_full, hr_sub, lr_sub):
    """{name: (dy, dx)}: HR position - scale x LR position of every sub-image pair, HR pixels."""
    out = {}
    for name in sorted(os.listdir(hr_sub)):
        stem = name.rsplit('_s', 1)[0]
        hr_pos = _locate(_read(osp.join(hr_sub, name)), hr_full[stem])
        lr_pos = _locate(_read(osp.join(lr_sub, name)), lr_full[stem])
        out[name[:-4]] = (hr_pos[0] - SCALE * lr_pos[0], hr_pos[1] - SCALE * lr_pos[1])
    return out


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp('recipe')
    folder = root / 'datasets' / 'DF2K' / 'HR_original'
    folder.mkdir(parents=True)
    images = _photos()
    for name, img in images.items():
        assert cv2.imwrite(str(folder / name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert img.shape[0] % SCALE and img.shape[1] % SCALE
    return root, {osp.splitext(n)[0]: _read(folder / n) for n in images}


@pytest.mark.slow  # runs the recipe's five commands as subprocesses
def test_readme_recipe_as_written_gives_aligned_pairs(photos):
    root, originals = photos
    block = _readme_block('**Training (DIV2K + Flickr2K = DF2K).**')
    assert 'generate_bicubic_lr.py' in block and 'check_pairs.py' in block and 'create_lmdb.py' in block
    (root / 'bin').mkdir()
    python = root / 'bin' / 'python'
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    os.symlink(osp.join(REPO, 'scripts'), root / 'scripts')
    env = dict(os.environ, PATH=f'{root / "bin"}:{os.environ["PATH"]}', OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', '-e', '-c', block], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'All 14 pairs aligned (x4)' in proc.stdout
    # no progress bar and no OpenCV / libjpeg line in a log: stderr is empty
    assert proc.stderr.strip() == '', proc.stderr

    data = root / 'datasets' / 'DF2K'
    hr_full = {n: _read(data / 'HR' / f'{n}.png') for n in originals}
    lr_full = {n: _read(data / 'LR_bicubic' / 'X4' / f'{n}.png') for n in originals}
    for name, original in originals.items():  # the HR of the pairs is the mod-cropped original
        h, w = original.shape[:2]
        np.testing.assert_array_equal(hr_full[name], original[:h - h % SCALE, :w - w % SCALE])
        assert lr_full[name].shape[:2] == (h // SCALE, w // SCALE)
    shifts = _shifts(hr_full, lr_full, data / 'HR_sub', data / 'LR_bicubic_sub' / 'X4')
    assert len(shifts) == 14
    assert set(shifts.values()) == {(0, 0)}, shifts
    with open(data / 'DF2K_train_HR_sub.lmdb' / 'meta_info.txt') as f:
        assert sorted(line.split('.')[0] for line in f) == sorted(shifts)


@pytest.mark.slow  # cuts 14 sub-image pairs twice and checks them
def test_old_recipe_misalignment_is_measured_and_reported(photos, tmp_path, capsys):
    root, originals = photos
    hr_dir = str(root / 'datasets' / 'DF2K' / 'HR_original')
    # the old recipe: LR from the whole image (the script mod-crops internally), then HR and LR cut
    # in separate runs, HR not mod-cropped
    generate_bicubic_lr.generate_bicubic_lr(generate_bicubic_lr.list_images(hr_dir), str(tmp_path / 'lr'), SCALE,
                                            gt_dir=str(tmp_path / 'unused_gt'))
    extract_subimages.main(['--input', hr_dir, '--output', str(tmp_path / 'hr_sub'), '--crop-size', '480',
                            '--step', '240'])
    extract_subimages.main(['--input', str(tmp_path / 'lr'), '--output', str(tmp_path / 'lr_sub'),
                            '--crop-size', '120', '--step', '60'])
    lr_full = {n: _read(tmp_path / 'lr' / f'{n}.png') for n in originals}
    measured = _shifts(originals, lr_full, tmp_path / 'hr_sub', tmp_path / 'lr_sub')
    shifted = {name: s for name, s in measured.items() if s != (0, 0)}
    # the last border-aligned crop is off by H mod 4 rows / W mod 4 columns
    assert shifted == {'astronaut_s002': (0, 3), 'astronaut_s003': (1, 0), 'astronaut_s004': (1, 3),
                       'retina_s002': (0, 2), 'retina_s003': (1, 0), 'retina_s004': (1, 2),
                       'rocket_s003': (0, 1), 'rocket_s004': (2, 0), 'rocket_s005': (2, 0),
                       'rocket_s006': (2, 1)}, shifted
    capsys.readouterr()
    with pytest.raises(ValueError, match='10 of 14 pairs .* are misaligned'):
        check_pairs.main(['--gt', str(tmp_path / 'hr_sub'), '--lq', str(tmp_path / 'lr_sub'), '--scale', '4'])
    printed = capsys.readouterr().out.splitlines()
    reported = {line.split(':')[0]: tuple(int(v) for v in re.findall(r'([+-]\d+) (?:rows|columns)', line))
                for line in printed}
    assert reported == shifted


# ---------------------------------------------------------------- the pieces, small and quick
def _texture(h, w, seed=0):
    """A smooth random texture (uint8, 3 channels): detail at every scale, no flat area."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for size in (3, 7, 17):
        noise = rng.random((h // size + 2, w // size + 2, 3)).astype(np.float32)
        img += cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)[:h, :w]
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * 255).astype(np.uint8)


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_pair_offset_finds_every_shift_in_hr_pixels(scale):
    hr = _texture(40 * scale, 40 * scale, seed=scale)
    lr = generate_bicubic_lr.bicubic_downscale(hr, scale)
    crop, y0, x0 = 24 * scale, 8 * scale, 8 * scale
    lr_sub = lr[y0 // scale:(y0 + crop) // scale, x0 // scale:(x0 + crop) // scale]
    for dy, dx in [(0, 0), (1, 0), (0, -1), (scale - 1, 1), (-scale, scale), (2, -2)]:
        result = check_pairs.pair_offset(hr[y0 + dy:y0 + dy + crop, x0 + dx:x0 + dx + crop], lr_sub, scale)
        assert (result['dy'], result['dx']) == (dy, dx)
        assert result['error_best'] < 0.3  # the bicubic downscale reproduces the LR up to rounding
        if (dy, dx) != (0, 0):
            assert result['error_aligned'] > result['error_best'] + 0.1
    flat = np.full((crop, crop, 3), 128, np.uint8)
    assert check_pairs.pair_offset(flat, flat[::scale, ::scale], scale)['dy'] == 0  # nothing to go by: aligned
    with pytest.raises(ValueError, match='not x'):
        check_pairs.pair_offset(hr[:crop + 1, :crop], lr_sub, scale)


def test_generate_refuses_hr_that_is_not_a_multiple_without_gt_output(tmp_path):
    (tmp_path / 'hr').mkdir()
    cv2.imwrite(str(tmp_path / 'hr' / 'good.png'), _texture(32, 48))
    cv2.imwrite(str(tmp_path / 'hr' / 'odd.png'), _texture(33, 48))
    argv = ['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'lr'), '--scale', '4']
    with pytest.raises(ValueError, match=r"odd\.png.* 33x48 pixels, not a multiple of the scale 4.*--gt-output"):
        generate_bicubic_lr.main(argv)
    assert not osp.exists(tmp_path / 'lr')  # refused before anything was written
    generate_bicubic_lr.main(argv + ['--gt-output', str(tmp_path / 'gt')])
    assert _read(tmp_path / 'gt' / 'odd.png').shape == (32, 48, 3)


def test_paired_extraction_aligns_crops_of_an_uncropped_hr(tmp_path):
    hr = _texture(101, 150)  # not multiples of 4: the pair mode cuts within the top-left 100 x 148
    lr = generate_bicubic_lr.bicubic_downscale(hr[:100, :148], SCALE)
    cv2.imwrite(str(tmp_path / 'hr.png'), hr)
    os.makedirs(tmp_path / 'lr')
    cv2.imwrite(str(tmp_path / 'lr' / 'hr.png'), lr)
    os.makedirs(tmp_path / 'in')
    os.rename(tmp_path / 'hr.png', tmp_path / 'in' / 'hr.png')
    total = extract_subimages.main(['--input', str(tmp_path / 'in'), '--output', str(tmp_path / 'hs'),
                                    '--lq-input', str(tmp_path / 'lr'), '--lq-output', str(tmp_path / 'ls'),
                                    '--scale', '4', '--crop-size', '48', '--step', '24'])
    rows, cols = [0, 24, 48, 52], [0, 24, 48, 72, 96, 100]  # positions on 100 x 148; 52 and 100: border crops
    assert total == len(rows) * len(cols)
    index = 0
    for y in rows:
        for x in cols:
            index += 1
            np.testing.assert_array_equal(_read(tmp_path / 'hs' / f'hr_s{index:03d}.png'), hr[y:y + 48, x:x + 48])
            np.testing.assert_array_equal(_read(tmp_path / 'ls' / f'hr_s{index:03d}.png'),
                                          lr[y // 4:y // 4 + 12, x // 4:x // 4 + 12])
    assert check_pairs.check_pairs(str(tmp_path / 'hs'), str(tmp_path / 'ls'), 4)['misaligned'] == {}


def test_paired_extraction_refuses_what_cannot_pair(tmp_path):
    for folder, size in (('hr', (64, 64)), ('lr', (17, 16))):
        os.makedirs(tmp_path / folder)
        cv2.imwrite(str(tmp_path / folder / 'a.png'), _texture(*size))
    argv = ['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'hs'), '--lq-input', str(tmp_path / 'lr'),
            '--lq-output', str(tmp_path / 'ls'), '--scale', '4', '--step', '16']
    with pytest.raises(ValueError, match=r"lr/a\.png.* 17x16 pixels, not those of its HR"):
        extract_subimages.main(argv + ['--crop-size', '32'])
    with pytest.raises(ValueError, match='crop_size must be a multiple of the scale 4'):
        extract_subimages.main(argv + ['--crop-size', '30', '--overwrite'])
    with pytest.raises(SystemExit):  # --scale without --lq-input
        extract_subimages.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'x'), '--scale', '4',
                                '--crop-size', '32', '--step', '16'])
