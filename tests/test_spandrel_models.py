"""Models from the ecosystem in (fmpsr/archs/spandrel_arch.py): model files spandrel recognises, made
by the tests themselves (Compact = SRVGGNetCompact, ESRGAN = RRDBNet, SPAN, small sizes), are read
safely into plain ``network_g`` options and weights; Compact and ESRGAN prune (L1-norm / SRP selection,
float64 compact == masked check), export without any file path, and reload from the export; an
in-process L1-norm run starts from the file's weights. Pickles that need code, TorchScript archives,
unknown state dicts and oversized files are refused in one line naming the file."""
import json
import os
import pickle

import pytest
import torch
from conftest import build_model_in
from safetensors.torch import save_file
from test_frozen_transposed import F64, l1_masks, masked_copy, srp_masks

import fmpsr  # noqa: F401
from basicsr.archs import build_network
from fmpsr.archs.spandrel_arch import SpandrelModelError, load_spandrel_model, main
from fmpsr.pruning import auto_grouping, finalize_plain, load_compact, plain_state_dict, save_compact
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SPAN import SPAN

MODELS = {  # spandrel's own classes, small; (class, kwargs, expected network_g, file kind)
    'compact': (Compact, dict(num_feat=10, num_conv=3, upscale=2),
                {'type': 'SpandrelCompact', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 10, 'num_conv': 3,
                 'upscale': 2, 'act_type': 'prelu'}, 'pth'),
    'esrgan': (ESRGAN, dict(num_filters=8, num_blocks=2, scale=2),
               {'type': 'SpandrelESRGAN', 'in_nc': 3, 'out_nc': 3, 'num_filters': 8, 'num_blocks': 2, 'scale': 2,
                'plus': False, 'shuffle_factor': None, 'norm': None, 'act': 'leakyrelu', 'upsampler': 'upconv',
                'mode': 'CNA'}, 'safetensors'),
    'span': (SPAN, dict(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2),
             {'type': 'SpandrelSPAN', 'num_in_ch': 3, 'num_out_ch': 3, 'feature_channels': 8, 'upscale': 2,
              'bias': True, 'norm': True, 'img_range': 255.0, 'rgb_mean': [0.4488, 0.4371, 0.404]}, 'pth'),
}


def make_model_file(folder, kind, seed=0, wrap=None):
    """A trained-looking model file (random weights) as a user would download it; returns (net, path)."""
    cls, kwargs, _, ext = MODELS[kind]
    torch.manual_seed(seed)
    net = cls(**kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not the init: a loader that re-inits would be caught
    state = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    path = os.path.join(str(folder), f'{kind}_x2.{ext}')
    if ext == 'safetensors':
        save_file(state, path)
    else:
        torch.save({wrap: state} if wrap else state, path)
    return net, path


def files_text(folder):
    text = ''
    for root, _, names in os.walk(str(folder)):
        for name in names:
            with open(os.path.join(root, name), 'rb') as f:
                text += f.read().decode('latin-1')
    return text


@pytest.mark.parametrize('kind', sorted(MODELS))
def test_model_file_becomes_plain_options_and_the_same_network(kind, tmp_path):
    net, path = make_model_file(tmp_path, kind, wrap='params_ema' if kind == 'compact' else None)
    network_opt, weights, info = load_spandrel_model(path)
    assert network_opt == MODELS[kind][2]  # the detected arch and its arguments; no path
    assert path not in json.dumps(network_opt) and info['scale'] == 2
    rebuilt = build_network(dict(network_opt)).eval()
    rebuilt.load_state_dict(weights, strict=True)
    x = torch.rand(1, 3, 13, 17)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))  # the file's weights, bit for bit


@pytest.mark.parametrize('select', [l1_masks, srp_masks], ids=['l1norm', 'srp'])
@pytest.mark.parametrize('kind', ['compact', 'esrgan'])
def test_prune_export_and_reload_without_a_path(kind, select, tmp_path):
    _, path = make_model_file(tmp_path, kind)
    network_opt, weights, _ = load_spandrel_model(path)
    net = build_network(dict(network_opt))
    net.load_state_dict(weights)
    net = net.to(F64).eval()
    grouping = auto_grouping(net, torch.zeros(1, 3, 12, 12, dtype=F64))
    masks = select(net, grouping)
    assert any(not m.all() for m in masks.values())
    compact, compact_opt, weight_masks = finalize_plain(net, grouping, masks, build_network, network_opt)
    x = torch.rand(1, 3, 11, 9, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = masked_copy(net, grouping, masks)(x), compact.eval()(x)
    assert expected.shape == got.shape == (1, 3, 22, 18)
    assert float((expected - got).abs().max()) <= 1e-12 * float(expected.abs().max())
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in net.parameters())
    export = tmp_path / 'export'
    save_compact(str(export), compact.float(), compact_opt, weight_masks)
    text = files_text(export)
    assert os.path.basename(path) not in text and str(tmp_path) not in text  # the export names no file
    loaded, loaded_opt, _ = load_compact(str(export))  # through fmpsr's untrusted-file checks
    assert loaded_opt == compact_opt and compact_opt['arch'] == network_opt
    with torch.no_grad():
        assert torch.allclose(loaded.to(F64).eval()(x), got, rtol=0, atol=1e-6)


def test_l1norm_run_starts_from_the_file_weights_and_exports(tmp_path, data, capsys):
    _, path = make_model_file(tmp_path, 'esrgan')
    checkpoint = tmp_path / 'pretrained.pth'
    assert main([path, '-o', str(checkpoint)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed['architecture'] == 'ESRGAN' and printed['network_g'] == MODELS['esrgan'][2]
    with pytest.raises(SystemExit):  # an existing output is kept
        main([path, '-o', str(checkpoint)])
    exp = tmp_path / 'exp'
    model = build_model_in(tmp_path, data, 'pytest_spandrel', model_type='L1NormModel',
                           pruning={'ratio': 0.5, 'mode': 'aligned', 'metric': 'params', 'macs_input_size': [16, 16]},
                           **{'network_g': printed['network_g'], 'path.pretrain_network_g': str(checkpoint)})
    _, weights, _ = load_spandrel_model(path)
    dense = plain_state_dict(model.get_bare_model(model.net_g))
    assert all(torch.equal(dense[k], v) for k, v in weights.items())  # the pretrained starting point
    g = torch.Generator().manual_seed(0)
    for it in range(1, 4):
        model.feed_data({'lq': torch.rand(2, 3, 16, 16, generator=g), 'gt': torch.rand(2, 3, 32, 32, generator=g)})
        model.optimize_parameters(it)
    assert model.stage == 'finetune'
    model.save(0, 3)
    text = files_text(exp / 'export')
    assert os.path.basename(path) not in text and 'pretrained.pth' not in text
    loaded, loaded_opt, _ = load_compact(str(exp / 'export'))
    assert loaded_opt['type'] == 'CompactArch' and loaded_opt['arch']['type'] == 'SpandrelESRGAN'
    assert loaded(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)


class Payload:
    def __reduce__(self):
        return (os.system, ('echo pwned > /dev/null',))


def test_unsafe_unknown_and_oversized_files_are_refused_in_one_line(tmp_path):
    evil = tmp_path / 'evil.pth'
    with open(evil, 'wb') as f:
        pickle.dump({'params': Payload()}, f)
    module = tmp_path / 'module.pth'
    torch.save(torch.nn.Conv2d(3, 3, 3), module)  # a pickled module: loading it needs code
    scripted = tmp_path / 'scripted.pt'
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 3)), str(scripted))
    unknown = tmp_path / 'unknown.safetensors'
    save_file({'foo.weight': torch.zeros(3, 3)}, str(unknown))
    for bad, words in ((evil, 'not read as a state dict'), (module, 'not read as a state dict'),
                       (scripted, 'not read as a state dict'), (unknown, 'does not recognise'),
                       (tmp_path / 'x.onnx', 'no such file')):
        with pytest.raises((ValueError, OSError)) as error:
            load_spandrel_model(str(bad))
        message = str(error.value)
        assert '\n' not in message and str(bad) in message and words in message, message
    (tmp_path / 'm.onnx').write_bytes(b'x')
    with pytest.raises(SpandrelModelError, match="unsupported model file extension '.onnx'"):
        load_spandrel_model(str(tmp_path / 'm.onnx'))
    _, path = make_model_file(tmp_path, 'compact')
    with pytest.raises(SpandrelModelError, match='above the limit of 1,000 for a model file'):
        load_spandrel_model(path, max_bytes=1000)
