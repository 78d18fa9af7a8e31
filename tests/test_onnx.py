"""ONNX export (scripts/export_onnx.py, fmpsr.deploy.onnx_export): onnxruntime equals PyTorch at input
sizes other than the export size (odd ones too), for the compact archs fmpsr writes, in fp32 and fp16
(bf16 refused); the exporter that fails is named and the other one tried; the parity check refuses a
graph that computes something else."""
import json
import warnings

import numpy as np
import pytest
import torch

# plain imports: the `onnx` extra is part of the `test` extra, so a test install without onnx or
# onnxruntime must fail here (an error at collection), not skip these tests and pass
import onnx
import onnxruntime as ort
from deploy_helpers import EDSR_COMPACT, IMDN_OPT, LSRB_COMPACT, RLFN_OPT, make_export

from fmpsr.deploy import onnx_export
from fmpsr.deploy.onnx_export import FP16_MAX_ABS_DIFF, export_onnx, main, verify_onnx

ARCHS = {'lsrb_nonuniform': LSRB_COMPACT, 'edsr_compactarch': EDSR_COMPACT, 'rlfn': RLFN_OPT, 'imdn': IMDN_OPT}
EXPORT_SIZE = 32
# all differ from the 32 x 32 export input; odd and non-square sizes, batch 1 and 2
TEST_SHAPES = [(1, 3, 17, 23), (2, 3, 32, 32), (1, 3, 40, 57), (2, 3, 41, 33)]


def check_against_torch(net, onnx_path, dtype='fp32'):
    """onnxruntime against the float32 PyTorch network at TEST_SHAPES; returns the max abs difference."""
    session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in TEST_SHAPES:
        x = torch.rand(*shape, generator=generator)
        with torch.no_grad():
            expected = net.float()(x).numpy()
        got = session.run(None, {'input': x.numpy().astype(np.float16 if dtype == 'fp16' else np.float32)})[0]
        assert got.dtype == (np.float16 if dtype == 'fp16' else np.float32)
        assert got.shape == expected.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3])
        if dtype == 'fp32':
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)
        worst = max(worst, float(np.abs(got.astype(np.float32) - expected).max()))
    if dtype == 'fp16':
        assert worst <= FP16_MAX_ABS_DIFF
    return worst


def check_graph(onnx_path, dtype='fp32', exporter=None):
    model = onnx.load(onnx_path)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get('', opsets.get('ai.onnx')) >= 17
    elem = onnx.TensorProto.FLOAT16 if dtype == 'fp16' else onnx.TensorProto.FLOAT
    for value in (model.graph.input[0], model.graph.output[0]):
        assert value.type.tensor_type.elem_type == elem
        dims = value.type.tensor_type.shape.dim
        assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # batch, C fixed, H, W
    weights = [w for w in model.graph.initializer if len(w.dims) == 4]
    assert weights and all(w.data_type == elem for w in weights)  # the conv weights are stored in dtype
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta['scale'] == '2' and 'type' in json.loads(meta['network_g'])
    assert meta['dtype'] == dtype and float(meta['max_abs_diff']) >= 0
    if exporter:
        assert meta['exporter'] == exporter


@pytest.mark.slow
@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_onnxruntime_equals_pytorch(arch, tmp_path):
    net, export = make_export(tmp_path / 'export', ARCHS[arch])
    info = export_onnx(export, str(tmp_path / 'model.onnx'), size=EXPORT_SIZE)
    assert info['exporter'] == 'dynamo' and info['opset'] >= 17 and info['failed'] == {}
    check_graph(str(tmp_path / 'model.onnx'), exporter='dynamo')
    check_against_torch(net, str(tmp_path / 'model.onnx'))


@pytest.mark.slow
def test_dynamo_fp16(tmp_path):
    net, export = make_export(tmp_path / 'export', LSRB_COMPACT)
    info = export_onnx(export, str(tmp_path / 'model.onnx'), size=EXPORT_SIZE, dtype='fp16', fallback=False)
    assert info['exporter'] == 'dynamo' and info['dtype'] == 'fp16'
    check_graph(str(tmp_path / 'model.onnx'), 'fp16', 'dynamo')
    assert 1e-5 < check_against_torch(net, str(tmp_path / 'model.onnx'), 'fp16')


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_fp16_onnxruntime_within_the_stated_tolerance(arch, tmp_path):
    """fp16 graphs (input, output, weights float16) at odd sizes: within FP16_MAX_ABS_DIFF of float32
    PyTorch, and really computed in fp16 (an fp32 graph is ~100 times closer)."""
    net, export = make_export(tmp_path / 'export', ARCHS[arch])
    info = export_onnx(export, str(tmp_path / 'model.onnx'), size=EXPORT_SIZE, exporter='torchscript', dtype='fp16')
    assert info['exporter'] == 'torchscript' and info['dtype'] == 'fp16'
    assert 1e-5 < info['max_abs_diff'] <= FP16_MAX_ABS_DIFF
    assert verify_onnx(net, str(tmp_path / 'model.onnx'), 'fp16', 15)['max_abs_diff'] == info['max_abs_diff']
    check_graph(str(tmp_path / 'model.onnx'), 'fp16', 'torchscript')
    assert 1e-5 < check_against_torch(net, str(tmp_path / 'model.onnx'), 'fp16') <= FP16_MAX_ABS_DIFF
    assert next(net.parameters()).dtype == torch.float32  # the caller's network is not converted


def test_bf16_is_refused_in_one_line_naming_why(tmp_path):
    _, export = make_export(tmp_path / 'export', EDSR_COMPACT)
    out = tmp_path / 'm.onnx'
    for call in (lambda: export_onnx(export, str(out), dtype='bf16'),
                 lambda: main([export, '-o', str(out), '--dtype', 'bf16'])):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert '\n' not in message and 'bf16' in message and 'onnxruntime' in message and 'Conv' in message
    with pytest.raises(ValueError, match="dtype must be one of .* got 'int8'"):
        export_onnx(export, str(out), dtype='int8')
    assert not out.exists()


class BakedWidth(torch.nn.Module):
    """conv -> PixelShuffle plus ``W / 100``: the TorchScript tracer bakes the Python float of the traced
    width into the graph (wrong at any other width); ``torch.export`` specialises the width to 32."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.pixel_shuffle(self.conv(x), 2) + float(x.shape[-1]) / 100


def test_parity_check_refuses_a_wrong_graph_from_either_exporter(tmp_path):
    net, out = BakedWidth().eval(), tmp_path / 'baked.onnx'
    opt = {'type': 'BakedWidth'}
    with pytest.raises(ValueError) as error:  # torchscript alone: the parity check refuses its graph
        export_onnx((net, opt), str(out), size=EXPORT_SIZE, exporter='torchscript', fallback=False)
    message = str(error.value)
    assert message.startswith(f'{out}: ONNX export failed: exporter torchscript: ParityError: {out}: onnxruntime '
                              'differs from PyTorch by 0.09 at input 1x3x17x23 (fp32; tolerance')
    assert '\n' not in message and 'dynamo' not in message and not out.exists()
    with warnings.catch_warnings(record=True) as caught:  # then dynamo: its graph is fixed to width 32
        warnings.simplefilter('always')
        with pytest.raises(ValueError) as error:
            export_onnx((net, opt), str(out), size=EXPORT_SIZE, exporter='torchscript')
    assert any(str(w.message).startswith('ONNX exporter torchscript failed (ParityError: ') and
               str(w.message).endswith('trying dynamo') for w in caught)
    message = str(error.value)
    assert '\n' not in message and f'; exporter dynamo: ParityError: {out}: onnxruntime cannot run input 1x3x17x23' \
        in message
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, no temporary file left


def test_a_failing_exporter_is_named_and_the_other_tried(tmp_path, monkeypatch):
    net, export_dir = make_export(tmp_path / 'export', EDSR_COMPACT)
    real_export = torch.onnx.export
    broken = set()

    def fake_export(*args, dynamo=True, **kwargs):
        if ('dynamo' if dynamo else 'torchscript') in broken:
            raise RuntimeError('exporter broke\nsecond line')
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, 'export', fake_export)
    broken.add('dynamo')
    out = tmp_path / 'm.onnx'
    with pytest.warns(UserWarning, match=r'ONNX exporter dynamo failed \(RuntimeError: exporter broke\); '
                                         r'trying torchscript'):
        info = export_onnx(export_dir, str(out), size=EXPORT_SIZE)
    assert info['exporter'] == 'torchscript' and info['failed'] == {'dynamo': 'RuntimeError: exporter broke'}
    check_graph(str(out), exporter='torchscript')
    check_against_torch(net, str(out))
    broken.clear()
    broken.add('torchscript')  # tried first, fails: dynamo writes the file
    info = export_onnx(export_dir, str(tmp_path / 'd.onnx'), size=EXPORT_SIZE, exporter='torchscript')
    assert info['exporter'] == 'dynamo' and list(info['failed']) == ['torchscript']
    check_against_torch(net, str(tmp_path / 'd.onnx'))
    broken.add('dynamo')
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r'^.*m\.onnx: ONNX export failed: exporter dynamo: RuntimeError: exporter '
                                         r'broke; exporter torchscript: RuntimeError: exporter broke$'):
        export_onnx(export_dir, str(out), size=EXPORT_SIZE)
    assert out.read_bytes() == before  # the file that was there is kept
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_torchscript_exporter_and_cli(tmp_path, capsys):
    net, export = make_export(tmp_path / 'export', LSRB_COMPACT)
    out = tmp_path / 'lsrb.onnx'
    assert main([export, '-o', str(out), '--exporter', 'torchscript', '--opset', '17', '--size', str(EXPORT_SIZE)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['exporter'] == 'torchscript'
    check_graph(str(out), exporter='torchscript')
    check_against_torch(net, str(out))
    with pytest.raises(SystemExit):  # refuses to overwrite, and an opset below 17
        main([export, '-o', str(out)])
    with pytest.raises(ValueError, match='opset 16'):
        export_onnx(export, str(tmp_path / 'old.onnx'), opset=16)
    with pytest.raises(ValueError, match='15 pixels'):
        export_onnx(export, str(tmp_path / 'small.onnx'), size=12)


def test_cli_fp16_torchscript(tmp_path, capsys):
    net, export = make_export(tmp_path / 'export', RLFN_OPT)
    out = tmp_path / 'rlfn16.onnx'
    assert main([export, '-o', str(out), '--exporter', 'torchscript', '--dtype', 'fp16', '--size', '24']) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info['dtype'] == 'fp16' and info['exporter'] == 'torchscript' and info['max_abs_diff'] > 1e-5
    check_graph(str(out), 'fp16', 'torchscript')
    check_against_torch(net, str(out), 'fp16')
    assert onnx_export.VERIFY_SHAPES[0] == (1, 17, 23)  # the parity check's sizes include odd ones
