"""Files from strangers: exports / checkpoints whose network_g names unsafe or huge networks, corrupt
safetensors, crash-safe writes (atomic_write) and images that must not take down a whole folder."""
import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
import zlib

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from deploy_helpers import EDSR_COMPACT, make_export
from fmpsr.compat import CorruptCheckpointError
from fmpsr.deploy import inference, sparse_store
from fmpsr.deploy.image_io import ImageTooLargeError, read_image
from fmpsr.pruning import export as export_module
from fmpsr.pruning.export import atomic_write, load_compact, read_network_options
from fmpsr.pruning.untrusted import MAX_PARAMS, NetworkOptionsError, check_network_opt

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope='module')
def edsr_export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp('edsr_export'), EDSR_COMPACT)


def crafted_export(folder, network_opt, state=None):
    """An export folder whose net_g.safetensors carries ``network_g`` = ``network_opt`` (as a stranger could write)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), 'net_g.safetensors')
    save_file(state or {'w': torch.zeros(2)}, path, metadata={'network_g': json.dumps(network_opt),
                                                               'format': 'fmpsr-compact-1'})
    return path


def photo(height=24, width=30, seed=0):
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(base)


# ---- network_g from a file ----
@pytest.fixture
def no_torch_load(monkeypatch):
    """Record every torch.load: an export must never make fmpsr open a file it names."""
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


BAD_OPTIONS = {
    # BasicSR's SpyNet / BasicVSR torch.load the path they are given, in their constructors
    'file_loading_arch': ({'type': 'SpyNet', 'load_path': 'SECRET'}, 'network_g.type'),
    'file_loading_arch_inside_compact': ({'type': 'CompactArch', 'arch': {'type': 'BasicVSR', 'spynet_path': 'SECRET'},
                                          'conv_channels': {}}, 'network_g.arch.type'),
    'unknown_arch': ({'type': 'NoSuchArch', 'num_feat': 8}, 'network_g.type'),
    'unknown_argument': ({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'weights_path': 'SECRET'},
                         'network_g.weights_path'),
    'huge_width': ({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 10 ** 6, 'num_block': 1},
                   'network_g.num_feat'),
    'string_width': ({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': '/etc/passwd'},
                     'network_g.num_feat'),
    'bool_width': ({'type': 'LSRB', 'num_feat': True}, 'network_g.num_feat'),
    'unknown_activation': ({'type': 'SRVGGNetCompact_basicsr', 'act_type': 'SECRET'}, 'network_g.act_type'),
    'conv_name_not_a_name': ({'type': 'CompactArch', 'arch': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3},
                              'conv_channels': {'../../x': [3, 3]}}, 'network_g.conv_channels'),
    # each argument within its bound, the whole network above MAX_PARAMS: counted on 'meta', never allocated
    'too_many_parameters': ({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 4096, 'num_block': 64},
                            'parameters'),
}


@pytest.mark.parametrize('case', sorted(BAD_OPTIONS))
def test_export_network_g_is_refused_before_anything_is_built(case, tmp_path, no_torch_load):
    network_opt, key = BAD_OPTIONS[case]
    path = crafted_export(tmp_path / 'export', network_opt)
    for load in (lambda: load_compact(str(tmp_path / 'export')), lambda: read_network_options(path)):
        with pytest.raises(NetworkOptionsError) as info:
            load()
        message = str(info.value)
        assert isinstance(info.value, ValueError) and '\n' not in message
        assert repr(path) in message and key in message
    assert no_torch_load == []


def test_parameter_cap_counts_without_allocating():
    opt = dict(BAD_OPTIONS['too_many_parameters'][0])
    with pytest.raises(NetworkOptionsError, match='parameters, above the limit of 100,000,000') as info:
        check_network_opt(opt, 'x.safetensors')  # 128 convs of 4096 x 4096 x 3 x 3 alone: 77 GB in float32
    assert int(str(info.value).split('network of ')[1].split(' ')[0].replace(',', '')) > 128 * 4096 * 4096 * 9
    opt['num_feat'], opt['num_block'] = 16, 2
    assert check_network_opt(opt, 'x.safetensors') == opt  # the same arch, small: accepted
    assert MAX_PARAMS == 100_000_000


@pytest.mark.parametrize('network_opt', [
    {'type': 'SwinIR', 'upscale': 2, 'img_size': 16, 'window_size': 4, 'embed_dim': 12, 'depths': [1, 1],
     'num_heads': [2, 2], 'mlp_ratio': 1, 'upsampler': 'pixelshuffle'},
    {'type': 'RIDNet', 'in_channels': 3, 'mid_channels': 16, 'out_channels': 3, 'num_block': 2},
    {'type': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_group': 2, 'num_block': 2,
     'squeeze_factor': 4, 'upscale': 2},
])
def test_archs_fmpsr_prunes_are_accepted_and_counted_exactly(network_opt):
    from basicsr.archs import build_network
    from fmpsr.pruning.untrusted import count_entries

    check_network_opt(network_opt, 'x.safetensors')
    net = build_network(dict(network_opt))
    expected = sum(t.numel() for t in net.parameters()) + sum(t.numel() for t in net.buffers())
    assert count_entries(network_opt) == expected


def test_sparse_store_and_checkpoints_check_network_g_too(tmp_path, no_torch_load):
    from fmpsr.models.pruned_sr_model import load_checkpoint

    bad = {'type': 'SpyNet', 'load_path': 'SECRET'}
    sparse = str(tmp_path / 'net_g.sparse.safetensors')
    sparse_store.save_sparse(sparse, {'w': torch.zeros(4)}, metadata={'network_g': json.dumps(bad)})
    with pytest.raises(NetworkOptionsError, match='network_g.type'):
        sparse_store.load_sparse_compact(sparse)
    pth = str(tmp_path / 'net_g_10.pth')
    torch.save({'params': {'w': torch.zeros(2)}, 'fmp_compact': {'network_g': bad, 'weight_masks': {}}}, pth)
    with pytest.raises(NetworkOptionsError, match='fmp_compact.network_g.type'):
        load_compact(pth)
    with pytest.raises(NetworkOptionsError, match='fmp_compact.network_g.type'):
        load_checkpoint(pth)
    assert [c for c in no_torch_load if c and c[0] == 'SECRET'] == []


def test_sparse_store_refuses_an_index_that_would_allocate(tmp_path):
    path = str(tmp_path / 's.safetensors')
    sparse_store.save_sparse(path, {'w': torch.tensor([0., 0., 1., 0.] * 8)})
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework='pt') as f:
        metadata = dict(f.metadata())
    index = json.loads(metadata['fmpsr_sparse'])
    index['w']['shape'] = [10 ** 6, 10 ** 6]  # 10^12 entries: torch.zeros would try 4 TB
    metadata['fmpsr_sparse'] = json.dumps(index)
    save_file(load_file(path), path, metadata=metadata)
    with pytest.raises(ValueError, match="tensor 'w'.*above the limit"):
        sparse_store.load_sparse(path)


# ---- corrupt safetensors: one line, status 2 ----
def corrupt_files(folder):
    good = crafted_export(folder / 'good', EDSR_COMPACT)
    data = open(good, 'rb').read()
    files = {'truncated': data[:len(data) // 2], 'garbage': b'this is not a safetensors file at all',
             'header_too_large': struct.pack('<Q', 2 ** 40) + b'{}'}
    paths = {}
    for name, content in files.items():
        os.makedirs(folder / name)
        paths[name] = str(folder / name / 'net_g.safetensors')
        with open(paths[name], 'wb') as f:
            f.write(content)
    return paths


def test_corrupt_safetensors_raise_one_line_naming_the_file(tmp_path):
    for name, path in corrupt_files(tmp_path).items():
        for load in (export_module.load_state, read_network_options, load_compact, sparse_store.load_sparse,
                     sparse_store.load_sparse_compact):
            with pytest.raises(CorruptCheckpointError) as info:
                load(path)
            assert repr(path) in str(info.value) and '\n' not in str(info.value), (name, load)


def run_console(script, *args):
    return subprocess.run([os.path.join(BIN, script), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_console_scripts_exit_2_with_one_line_on_corrupt_or_refused_files(tmp_path):
    image = tmp_path / 'in.png'
    cv2.imwrite(str(image), photo())
    paths = corrupt_files(tmp_path)
    paths['refused_arch'] = crafted_export(tmp_path / 'refused', {'type': 'SpyNet', 'load_path': 'SECRET'})
    for name, path in paths.items():
        model = os.path.dirname(path) if name != 'garbage' else path
        for result in (run_console('fmpsr-infer', '-i', str(image), '-o', str(tmp_path / 'out'), '-m', model),
                       run_console('fmpsr-export-onnx', model, '-o', str(tmp_path / 'm.onnx'))):
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, (name, result.stderr)
            assert 'Traceback' not in result.stderr and path in lines[0] and lines[0].startswith('fmpsr-')
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'm.onnx').exists()
    wrong = subprocess.run([sys.executable, '-m', 'fmpsr.deploy.sparse_store', str(tmp_path / 'nowhere')],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and 'nowhere' in wrong.stderr


# ---- atomic_write ----
def test_disk_full_during_torch_save_is_one_oserror_and_keeps_the_old_file(tmp_path):
    target = tmp_path / 'net_g_latest.pth'
    target.write_bytes(b'the previous checkpoint')
    code = textwrap.dedent(f'''
        import resource, signal, sys, torch
        from fmpsr.pruning.export import atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            atomic_write({str(target)!r}, lambda p: torch.save({{'w': torch.zeros(100000)}}, p))
        except OSError as error:
            print(type(error).__name__, str(error))
            sys.exit(3)
    ''')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    assert str(target) in result.stdout and len(result.stdout.strip().splitlines()) == 1
    assert target.read_bytes() == b'the previous checkpoint'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['net_g_latest.pth']  # no temporary file left


def test_replaced_file_keeps_its_permissions(tmp_path):
    target = tmp_path / 'state.json'
    target.write_text('old')
    os.chmod(target, 0o640)
    export_module.write_json(str(target), {'a': 1})
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640 and json.loads(target.read_text()) == {'a': 1}
    new = tmp_path / 'new.json'
    umask = os.umask(0o022)
    try:
        export_module.write_json(str(new), {})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o644


def test_atomic_write_fsyncs_the_file_before_and_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f'/proc/self/fd/{fd}')
        events.append(('fsync', 'folder' if os.path.isdir(path) else os.path.basename(path),
                       os.path.exists(tmp_path / 'a.bin')))
        real_fsync(fd)

    def replace(src, dst):
        events.append(('replace',))
        real_replace(src, dst)

    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    atomic_write(str(tmp_path / 'a.bin'), lambda p: open(p, 'wb').write(b'data'))
    assert [e[0] for e in events] == ['fsync', 'replace', 'fsync']
    assert events[0][1].startswith('.a.bin.') and events[0][2] is False  # the temporary file, before the rename
    assert events[2][1] == 'folder'
    assert (tmp_path / 'a.bin').read_bytes() == b'data'


def test_other_errors_in_write_are_not_disguised(tmp_path):
    with pytest.raises(KeyError):
        atomic_write(str(tmp_path / 'x'), lambda p: {}['missing'])
    assert list(tmp_path.iterdir()) == []


# ---- inference limits ----
def bomb_png(path, side=30000):
    """A valid 1-bit PNG of side x side pixels (about 100 kB on disk, 900 megapixels decoded)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    row = b'\x00' + bytes((side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b''.join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', side, side, 1, 0, 0, 0, 0))
                + chunk(b'IDAT', idat) + chunk(b'IEND', b''))


def test_decompression_bomb_is_refused_from_its_header_and_the_rest_is_written(tmp_path, edsr_export, monkeypatch,
                                                                                capsys):
    _, export = edsr_export
    folder = tmp_path / 'in'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a.png'), photo())
    bomb_png(str(folder / 'b_bomb.png'))
    cv2.imwrite(str(folder / 'c.png'), photo(20, 20, seed=1))
    assert os.path.getsize(folder / 'b_bomb.png') < 200_000
    decoded = []
    real_imread = cv2.imread
    monkeypatch.setattr(cv2, 'imread', lambda p, *a: decoded.append(os.path.basename(p)) or real_imread(p, *a))
    assert inference.main(['-i', str(folder), '-o', str(tmp_path / 'out'), '-m', export]) == 1
    assert decoded == ['a.png', 'c.png']  # the bomb was never decoded
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a_out.png', 'c_out.png']
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith('skipped')]
    assert len(skipped) == 1 and 'b_bomb.png' in skipped[0] and '900.0 megapixels' in skipped[0]
    assert sum(line.startswith('wrote ') for line in captured.out.splitlines()) == 2
    with pytest.raises(ImageTooLargeError):
        read_image(str(folder / 'a.png'), max_pixels=24 * 30 - 1)
    assert read_image(str(folder / 'a.png'), max_pixels=24 * 30).shape == (24, 30, 3)


def test_out_of_memory_image_is_skipped_and_the_rest_written(tmp_path, edsr_export, monkeypatch, capsys):
    _, export = edsr_export
    folder = tmp_path / 'in'
    folder.mkdir()
    for name in ('a.png', 'b.png', 'c.png'):
        cv2.imwrite(str(folder / name), photo())
    real = inference.Upscaler.enhance
    calls = []

    def enhance(self, img, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError('[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: '
                               'you tried to allocate 123456789012 bytes.')
        return real(self, img, *args)

    monkeypatch.setattr(inference.Upscaler, 'enhance', enhance)
    assert inference.main(['-i', str(folder), '-o', str(tmp_path / 'out'), '-m', export]) == 1
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a_out.png', 'c_out.png']
    err = capsys.readouterr().err
    assert 'skipped' in err and 'b.png' in err and 'out of memory' in err


def test_large_images_are_tiled_automatically(tmp_path, edsr_export, monkeypatch):
    _, export = edsr_export
    seen = []
    real = inference.tiled_forward
    monkeypatch.setattr(inference, 'tiled_forward', lambda net, x, scale, tile, *a: seen.append(tile) or
                        real(net, x, scale, tile, *a))
    monkeypatch.setattr(inference, 'AUTO_TILE_ABOVE', 24 * 30 - 1)
    monkeypatch.setattr(inference, 'AUTO_TILE', 16)
    cv2.imwrite(str(tmp_path / 'big.png'), photo(24, 30))
    cv2.imwrite(str(tmp_path / 'small.png'), photo(20, 30))
    for name in ('big.png', 'small.png'):
        assert inference.main(['-i', str(tmp_path / name), '-o', str(tmp_path / 'out'), '-m', export]) == 0
    assert inference.main(['-i', str(tmp_path / 'big.png'), '-o', str(tmp_path / 'out0'), '-m', export,
                           '--tile', '0']) == 0
    assert seen == [16, 0, 0]
    tiled = cv2.imread(str(tmp_path / 'out' / 'big_out.png')).astype(int)
    whole = cv2.imread(str(tmp_path / 'out0' / 'big_out.png')).astype(int)
    assert tiled.shape == (48, 60, 3) and np.abs(tiled - whole).max() <= 1  # EDSR: tiling is exact


def test_exif_orientation_is_honoured(tmp_path, edsr_export):
    from PIL import Image
    net, export = edsr_export
    bgr = photo(24, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 wide; shown turned 90 degrees clockwise: 24 wide, 30 high
    Image.fromarray(bgr[:, :, ::-1]).save(str(tmp_path / 'turned.png'), exif=exif.tobytes())
    Image.fromarray(np.ascontiguousarray(np.rot90(bgr, -1)[:, :, ::-1])).save(str(tmp_path / 'upright.png'))
    for name in ('turned', 'upright'):
        assert inference.main(['-i', str(tmp_path / f'{name}.png'), '-o', str(tmp_path / 'out'), '-m', export]) == 0
    turned = cv2.imread(str(tmp_path / 'out' / 'turned_out.png'))
    upright = cv2.imread(str(tmp_path / 'out' / 'upright_out.png'))
    assert turned.shape == (60, 48, 3)
    np.testing.assert_array_equal(turned, upright)


@pytest.mark.parametrize('ext', ['png', 'auto'])
def test_two_inputs_with_one_output_name_are_refused_before_writing(tmp_path, edsr_export, ext):
    _, export = edsr_export
    folder = tmp_path / 'in'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a.png'), photo())
    cv2.imwrite(str(folder / 'a.tif'), photo(20, 20))  # a TIFF may carry alpha: PNG output, like a.png
    with pytest.raises(ValueError) as info:
        inference.main(['-i', str(folder), '-o', str(tmp_path / 'out'), '-m', export, '--ext', ext])
    assert 'a.png' in str(info.value) and 'a.tif' in str(info.value) and 'a_out.png' in str(info.value)
    assert not (tmp_path / 'out').exists()


def test_fmpsr_pth_checkpoint_is_accepted_and_a_plain_one_refused_in_one_line(tmp_path, edsr_export):
    net, export = edsr_export
    pth = str(tmp_path / 'net_g_latest.pth')
    torch.save({'params': net.state_dict(), 'fmp_compact': {'network_g': EDSR_COMPACT, 'weight_masks': {}}}, pth)
    loaded, opt, _ = load_compact(pth)
    assert opt == EDSR_COMPACT
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    plain = str(tmp_path / 'basicsr_net_g.pth')
    torch.save({'params': net.state_dict()}, plain)
    with pytest.raises(ValueError, match="without fmpsr's network_g"):
        load_compact(plain)
