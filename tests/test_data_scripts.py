"""Tests of the data-preparation scripts in scripts/data (CPU, a few seconds each).

The scripts are imported from their folder (they are not a package) and driven through ``main(argv)``
or their functions; one test per script also runs it as ``python scripts/data/X.py``.
"""
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import assert_one_line_error

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'scripts', 'data'))

import build_demo_dataset  # noqa: E402
import create_lmdb  # noqa: E402
import extract_subimages  # noqa: E402
import generate_bicubic_lr  # noqa: E402  (patches basicsr before importing it)

from basicsr.data.paired_image_dataset import PairedImageDataset  # noqa: E402
from basicsr.utils.matlab_functions import imresize  # noqa: E402


def _write(path, img):
    os.makedirs(osp.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return str(path)


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _expected_lr(hr_uint8, scale):
    """BasicSR's MATLAB-like bicubic of the mod-cropped image, rounded to uint8, computed here."""
    h, w = hr_uint8.shape[:2]
    cropped = hr_uint8[:h - h % scale, :w - w % scale]
    lr = imresize(cropped.astype(np.float32) / 255., 1 / scale)
    return cropped, np.clip(np.round(lr * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- generate_bicubic_lr.py
@pytest.mark.parametrize('scale', [2, 3, 4])
def test_lr_shape_and_values_match_imresize(tmp_path, scale):
    rng = np.random.default_rng(scale)
    hr = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    _write(tmp_path / 'hr' / 'img.png', hr)
    generate_bicubic_lr.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'lr'),
                              '--scale', str(scale), '--gt-output', str(tmp_path / 'gt')])
    cropped, expected = _expected_lr(hr, scale)
    lr = _read(tmp_path / 'lr' / 'img.png')
    assert lr.shape == (37 // scale, 50 // scale, 3) == (cropped.shape[0] // scale, cropped.shape[1] // scale, 3)
    assert np.abs(lr.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(_read(tmp_path / 'gt' / 'img.png'), cropped)


def test_gray_and_rgba_inputs_become_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (32, 40), dtype=np.uint8)
    bgra = rng.integers(0, 256, (32, 40, 4), dtype=np.uint8)
    _write(tmp_path / 'hr' / 'gray.png', gray)
    _write(tmp_path / 'hr' / 'rgba.PNG', bgra)  # upper-case extension is found too
    paths = generate_bicubic_lr.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'lr'),
                                      '--scale', '4'])
    assert sorted(osp.basename(p) for p in paths) == ['gray.png', 'rgba.png']
    lr_gray, lr_rgba = _read(tmp_path / 'lr' / 'gray.png'), _read(tmp_path / 'lr' / 'rgba.png')
    assert lr_gray.shape == lr_rgba.shape == (8, 10, 3)
    assert (lr_gray[..., 0] == lr_gray[..., 1]).all() and (lr_gray[..., 0] == lr_gray[..., 2]).all()
    _, expected = _expected_lr(np.ascontiguousarray(bgra[..., :3]), 4)  # alpha dropped, not blended
    assert np.abs(lr_rgba.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize('ext', ['.png', '.jpg'])
def test_truncated_image_error_names_the_file(tmp_path, ext):
    good = _write(tmp_path / 'hr' / f'good{ext}', np.full((16, 16, 3), 100, np.uint8))
    with open(good, 'rb') as f:
        data = f.read()
    with open(tmp_path / 'hr' / f'broken{ext}', 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f'broken\\{ext}'):
        generate_bicubic_lr.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'lr'), '--scale', '2'])


def test_missing_or_empty_folder_and_bad_scale(tmp_path):
    missing = tmp_path / 'no_such_folder'
    with pytest.raises(FileNotFoundError, match='no_such_folder'):
        generate_bicubic_lr.main(['--input', str(missing), '--output', str(tmp_path / 'lr'), '--scale', '2'])
    (tmp_path / 'empty_folder').mkdir()
    with pytest.raises(ValueError, match='empty_folder'):
        generate_bicubic_lr.main(['--input', str(tmp_path / 'empty_folder'), '--output', str(tmp_path / 'lr'),
                                  '--scale', '2'])
    for bad in ['1', '2.5', 'x']:
        with pytest.raises(SystemExit):  # argparse rejects it
            generate_bicubic_lr.main(['--input', str(tmp_path), '--output', str(tmp_path / 'lr'), '--scale', bad])
    with pytest.raises(ValueError, match='2.5'):
        generate_bicubic_lr.generate_bicubic_lr([], str(tmp_path / 'lr'), 2.5)


def test_output_folder_with_images_is_refused(tmp_path):
    _write(tmp_path / 'hr' / 'a.png', np.zeros((8, 8, 3), np.uint8))
    argv = ['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'lr'), '--scale', '2']
    generate_bicubic_lr.main(argv)
    with pytest.raises(ValueError, match='already holds images'):
        generate_bicubic_lr.main(argv)
    generate_bicubic_lr.main(argv + ['--overwrite'])
    with pytest.raises(ValueError, match='input folder'):  # would overwrite the HR images
        generate_bicubic_lr.main(['--input', str(tmp_path / 'hr'), '--output', str(tmp_path / 'hr'),
                                  '--scale', '2', '--overwrite'])


# ---------------------------------------------------------------- extract_subimages.py
def _positions(length, crop, step, thresh):
    """Independent re-statement of BasicSR's rule: stride from 0, then one border-aligned crop."""
    out, pos = [], 0
    while pos + crop <= length:
        out.append(pos)
        pos += step
    if length - (out[-1] + crop) > thresh:
        out.append(length - crop)
    return out


@pytest.mark.parametrize('thresh, workers', [(0, 1), (10, 2)])
def test_extract_subimages_positions_and_content(tmp_path, thresh, workers):
    img = np.random.default_rng(1).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    _write(tmp_path / 'in' / 'pic.png', img)
    total = extract_subimages.main(['--input', str(tmp_path / 'in'), '--output', str(tmp_path / 'out'),
                                    '--crop-size', '48', '--step', '24', '--thresh-size', str(thresh),
                                    '--workers', str(workers)])
    rows, cols = _positions(100, 48, 24, thresh), _positions(130, 48, 24, thresh)
    if thresh == 0:
        assert (rows, cols) == ([0, 24, 48, 52], [0, 24, 48, 72, 82])
    else:  # remainders 4 and 10 are not > 10: no border-aligned crops
        assert (rows, cols) == ([0, 24, 48], [0, 24, 48, 72])
    expected = [img[y:y + 48, x:x + 48] for y in rows for x in cols]
    assert total == len(expected)
    assert sorted(os.listdir(tmp_path / 'out')) == [f'pic_s{i:03d}.png' for i in range(1, len(expected) + 1)]
    for i, crop in enumerate(expected, start=1):
        np.testing.assert_array_equal(_read(tmp_path / 'out' / f'pic_s{i:03d}.png'), crop)


def test_extract_subimages_errors_name_the_file(tmp_path):
    _write(tmp_path / 'in' / 'tiny.png', np.zeros((20, 60, 3), np.uint8))
    with pytest.raises(ValueError, match='tiny.png'):
        extract_subimages.main(['--input', str(tmp_path / 'in'), '--output', str(tmp_path / 'out'),
                                '--crop-size', '32', '--step', '16'])
    with pytest.raises(FileNotFoundError, match='not_here'):
        extract_subimages.main(['--input', str(tmp_path / 'not_here'), '--output', str(tmp_path / 'out'),
                                '--crop-size', '32', '--step', '16'])


# ---------------------------------------------------------------- create_lmdb.py
def _pair_folders(root, names, scale=4, size=64):
    rng = np.random.default_rng(2)
    images = {}
    for name in names:
        gt = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
        lq = rng.integers(0, 256, (size // scale, (size + 8) // scale, 3), dtype=np.uint8)
        _write(root / 'gt' / f'{name}.png', gt)
        _write(root / 'lq' / f'{name}.png', lq)
        images[name] = (gt, lq)
    return str(root / 'gt'), str(root / 'lq'), images


def _lmdb_argv(root, gt, lq):
    return ['--gt', gt, '--lq', lq, '--gt-lmdb', str(root / 'gt.lmdb'), '--lq-lmdb', str(root / 'lq.lmdb')]


def _dataset(root, phase, gt_size=64, scale=4):
    opt = {'dataroot_gt': str(root / 'gt.lmdb'), 'dataroot_lq': str(root / 'lq.lmdb'),
           'io_backend': {'type': 'lmdb', 'db_paths': [str(root / 'lq.lmdb'), str(root / 'gt.lmdb')],
                          'client_keys': ['lq', 'gt']},
           'gt_size': gt_size, 'use_hflip': True, 'use_rot': True, 'scale': scale, 'phase': phase}
    return PairedImageDataset(opt)


def test_create_lmdb_is_readable_by_paired_image_dataset(tmp_path):
    gt, lq, images = _pair_folders(tmp_path, ['img_001', 'img_002', 'other'])
    assert create_lmdb.main(_lmdb_argv(tmp_path, gt, lq)) == 3
    for name in ('gt.lmdb', 'lq.lmdb'):
        assert {'data.mdb', 'meta_info.txt'} <= set(os.listdir(tmp_path / name))
    assert not [n for n in os.listdir(tmp_path) if 'partial' in n]
    with open(tmp_path / 'gt.lmdb' / 'meta_info.txt') as f:
        assert sorted(f.read().splitlines()) == [f'{n}.png (64,72,3) 1' for n in ('img_001', 'img_002', 'other')]

    train = _dataset(tmp_path, 'train')  # gt patch 64 -> lq patch 16 at scale 4
    assert len(train) == 3
    item = train[0]
    assert tuple(item['gt'].shape) == (3, 64, 64) and tuple(item['lq'].shape) == (3, 16, 16)
    for env in train.file_client.client._client.values():  # lmdb allows one open per process
        env.close()

    val = _dataset(tmp_path, 'val')  # no crop / flip: the pixels must come back unchanged
    for item in (val[i] for i in range(len(val))):
        gt_img, lq_img = images[item['gt_path']]
        assert item['lq_path'] == item['gt_path']
        # tensors are RGB, [0, 1], (C, H, W); the files are BGR uint8 (H, W, C)
        np.testing.assert_allclose(item['gt'].numpy().transpose(1, 2, 0)[..., ::-1] * 255, gt_img, atol=1e-3)
        np.testing.assert_allclose(item['lq'].numpy().transpose(1, 2, 0)[..., ::-1] * 255, lq_img, atol=1e-3)


def test_create_lmdb_refuses_mismatched_keys_and_dots(tmp_path):
    gt, lq, _ = _pair_folders(tmp_path, ['a', 'b', 'c'])
    os.remove(osp.join(lq, 'b.png'))
    with pytest.raises(ValueError, match="'b'"):
        create_lmdb.main(_lmdb_argv(tmp_path, gt, lq))
    assert not osp.exists(tmp_path / 'gt.lmdb') and not osp.exists(tmp_path / 'lq.lmdb')

    gt2, lq2, _ = _pair_folders(tmp_path / 'dots', ['x.y'])
    with pytest.raises(ValueError, match=r'x\.y\.png'):
        create_lmdb.main(_lmdb_argv(tmp_path / 'dots', gt2, lq2))
    assert not osp.exists(tmp_path / 'dots' / 'gt.lmdb')


def test_create_lmdb_refuses_to_overwrite(tmp_path):
    gt, lq, _ = _pair_folders(tmp_path, ['a'])
    argv = _lmdb_argv(tmp_path, gt, lq)
    create_lmdb.main(argv)
    with pytest.raises(ValueError, match='gt.lmdb'):
        create_lmdb.main(argv)
    assert create_lmdb.main(argv + ['--overwrite']) == 1
    assert create_lmdb.main(['--single', gt, '--lmdb', str(tmp_path / 'single.lmdb')]) == 1
    assert osp.isfile(tmp_path / 'single.lmdb' / 'meta_info.txt')


def test_create_lmdb_writes_no_progress_bar_into_logs(tmp_path, capsys):
    """Output that is not a terminal (a log, CI) gets one summary line, not ~85 bytes per key (BasicSR's
    make_lmdb_from_imgs prints a progress-bar line with each key's name)."""
    gt, lq, _ = _pair_folders(tmp_path, [f'img_{i:03d}' for i in range(40)], size=16)
    capsys.readouterr()
    assert create_lmdb.main(_lmdb_argv(tmp_path, gt, lq) + ['--n-thread', '2']) == 40
    out, err = capsys.readouterr()
    assert err == ''
    assert out.strip().splitlines() == [f'Wrote 40 GT/LQ pairs to {tmp_path / "gt.lmdb"} and {tmp_path / "lq.lmdb"}']
    with open(tmp_path / 'lq.lmdb' / 'meta_info.txt') as f:  # BasicSR's format, every key in order
        assert f.read().splitlines() == [f'img_{i:03d}.png (4,6,3) 1' for i in range(40)]


def test_create_lmdb_refuses_a_file_name_with_a_space(tmp_path):
    gt, lq, _ = _pair_folders(tmp_path, ['my photo'])
    with pytest.raises(ValueError, match=r"my photo\.png.*without dots or whitespace.*rename the file"):
        create_lmdb.main(_lmdb_argv(tmp_path, gt, lq))
    assert not osp.exists(tmp_path / 'gt.lmdb')


def test_corrupt_jpeg_is_named_and_decoder_output_does_not_leak(tmp_path, capfd):
    """libjpeg prints "Corrupt JPEG data: premature end of data segment" on fd 2 and OpenCV returns a
    grey-padded image; with the end marker present the truncation check cannot see it."""
    ok, data = cv2.imencode('.jpg', np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = data.tobytes()
    path = tmp_path / 'broken.jpg'
    path.write_bytes(data[:len(data) // 2] + b'\xff\xd9')
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"broken\.jpg.*truncated or not a valid image"):
        generate_bicubic_lr.read_image(str(path))
    assert capfd.readouterr().err == ''
    cv2.imread(str(tmp_path / 'no_such_file.png'))  # OpenCV's own [ WARN ] log is kept to errors
    assert 'WARN' not in capfd.readouterr().err


# ---------------------------------------------------------------- running the files as scripts
@pytest.mark.slow
@pytest.mark.parametrize('script, argv, rc, text', [
    ('generate_bicubic_lr.py', ['--input', 'missing_hr_dir', '--output', 'x', '--scale', '4'], 2, 'missing_hr_dir'),
    ('extract_subimages.py', ['--help'], 0, '--crop-size'),
    ('create_lmdb.py', ['--help'], 0, '--gt-lmdb'),
    ('build_demo_dataset.py', ['--help'], 0, 'LR_bicubic_sub'),
])
def test_scripts_run_from_repo_root(tmp_path, script, argv, rc, text):
    argv = [str(tmp_path / a) if a.startswith('missing') else a for a in argv]
    proc = subprocess.run([sys.executable, osp.join('scripts', 'data', script), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == rc, proc.stderr
    assert text in proc.stdout + proc.stderr
    if rc == 2:  # bad input: one line naming the file, no traceback (fmpsr.cli.run_cli)
        assert_one_line_error(proc, f'{script}: error: input folder ')


# ---------------------------------------------------------------- build_demo_dataset.py
SCALE = 4


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo') / 'demo'
    assert build_demo_dataset.main(['--output', str(out), '--scale', str(SCALE)]) is True
    return out


def _stems(folder):
    return {osp.splitext(n)[0] for n in os.listdir(folder)}


@pytest.mark.slow  # builds the whole demo data set (all bundled photographs)
def test_demo_layout_and_disjoint_splits(demo):
    lr = f'LR_bicubic/X{SCALE}'
    assert _stems(demo / 'train' / 'HR') == set(build_demo_dataset.TRAIN_IMAGES)
    assert _stems(demo / 'val' / 'HR') == set(build_demo_dataset.VAL_IMAGES)
    assert _stems(demo / 'train' / 'HR').isdisjoint(_stems(demo / 'val' / 'HR'))
    assert 'motorcycle_right' not in _stems(demo / 'train' / 'HR') | _stems(demo / 'val' / 'HR')
    for split in ('train', 'val'):
        assert _stems(demo / split / lr) == _stems(demo / split / 'HR')
    readme = (demo / 'README.txt').read_text()
    assert 'chelsea' in readme and 'astronaut' in readme and f'X{SCALE}' in readme
    assert (demo / f'.complete_x{SCALE}').is_file()
    assert not [n for n in os.listdir(demo.parent) if n != 'demo']  # no temporary folders left


@pytest.mark.slow  # builds the whole demo data set (all bundled photographs)
def test_demo_full_images_are_mod_cropped_and_lr_is_quarter(demo):
    for split in ('train', 'val'):
        for name in os.listdir(demo / split / 'HR'):
            hr = _read(demo / split / 'HR' / name)
            lr = _read(demo / split / f'LR_bicubic/X{SCALE}' / name)
            assert hr.ndim == 3 and hr.shape[2] == 3
            assert hr.shape[0] % SCALE == 0 and hr.shape[1] % SCALE == 0, name
            assert lr.shape == (hr.shape[0] // SCALE, hr.shape[1] // SCALE, 3), name


@pytest.mark.slow  # builds the whole demo data set (all bundled photographs)
def test_demo_sub_images_are_aligned(demo):
    hr_sub, lr_sub = demo / 'train' / 'HR_sub', demo / 'train' / f'LR_bicubic_sub/X{SCALE}'
    names = sorted(os.listdir(hr_sub))
    assert names and names == sorted(os.listdir(lr_sub))
    for name in names:
        h, w = _read(hr_sub / name).shape[:2]
        assert (h, w) == (192, 192)
        assert _read(lr_sub / name).shape[:2] == (h // SCALE, w // SCALE), name
    # every astronaut sub-image pair is cut at the same place of the full HR / LR images
    hr = _read(demo / 'train' / 'HR' / 'astronaut.png')
    lr = _read(demo / 'train' / f'LR_bicubic/X{SCALE}' / 'astronaut.png')
    rows, cols = _positions(hr.shape[0], 192, 96, 0), _positions(hr.shape[1], 192, 96, 0)
    assert len([n for n in names if n.startswith('astronaut_s')]) == len(rows) * len(cols)
    for i, (y, x) in enumerate(((y, x) for y in rows for x in cols), start=1):
        name = f'astronaut_s{i:03d}.png'
        np.testing.assert_array_equal(_read(hr_sub / name), hr[y:y + 192, x:x + 192])
        s = SCALE
        np.testing.assert_array_equal(_read(lr_sub / name), lr[y // s:(y + 192) // s, x // s:(x + 192) // s])


@pytest.mark.slow  # builds the whole demo data set (all bundled photographs)
def test_demo_second_build_is_a_no_op(demo, capsys, monkeypatch):
    before = {p: osp.getmtime(osp.join(demo, p)) for p in ('README.txt', f'.complete_x{SCALE}')}

    def no_build(*args, **kwargs):
        raise AssertionError('a complete build must not be built again')
    monkeypatch.setattr(build_demo_dataset, '_build', no_build)  # nothing is resized or cropped again
    assert build_demo_dataset.main(['--output', str(demo), '--scale', str(SCALE)]) is False
    assert 'nothing to do' in capsys.readouterr().out
    assert before == {p: osp.getmtime(osp.join(demo, p)) for p in before}
    with pytest.raises(ValueError, match='--force'):  # another scale does not silently replace it
        build_demo_dataset.main(['--output', str(demo), '--scale', '2'])
