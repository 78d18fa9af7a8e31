"""ONNX export (scripts/export_onnx.py, fmpsr.deploy.onnx_export): onnxruntime equals PyTorch at input
sizes other than the export size, for the compact archs fmpsr writes."""
import json

import numpy as np
import pytest
import torch

# plain imports: the `onnx` extra is part of the `test` extra, so a test install without onnx or
# onnxruntime must fail here (an error at collection), not skip these tests and pass
import onnx
import onnxruntime as ort
from deploy_helpers import EDSR_COMPACT, IMDN_OPT, LSRB_COMPACT, RLFN_OPT, make_export

from fmpsr.deploy.onnx_export import export_onnx, main

ARCHS = {'lsrb_nonuniform': LSRB_COMPACT, 'edsr_compactarch': EDSR_COMPACT, 'rlfn': RLFN_OPT, 'imdn': IMDN_OPT}
EXPORT_SIZE = 32
TEST_SHAPES = [(1, 3, 20, 27), (2, 3, 41, 33)]  # both differ from the 32 x 32 export input


def check_against_torch(net, onnx_path):
    session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(0)
    for shape in TEST_SHAPES:
        x = torch.rand(*shape, generator=generator)
        with torch.no_grad():
            expected = net(x).numpy()
        got = session.run(None, {'input': x.numpy()})[0]
        assert got.shape == expected.shape == (shape[0], 3, 2 * shape[2], 2 * shape[3])
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


def check_graph(onnx_path):
    model = onnx.load(onnx_path)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get('', opsets.get('ai.onnx')) >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # batch, C fixed, H, W
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta['scale'] == '2' and 'type' in json.loads(meta['network_g'])


@pytest.mark.slow
@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_onnxruntime_equals_pytorch(arch, tmp_path):
    net, export = make_export(tmp_path / 'export', ARCHS[arch])
    info = export_onnx(export, str(tmp_path / 'model.onnx'), size=EXPORT_SIZE)
    assert info['exporter'] == 'dynamo' and info['opset'] >= 17
    check_graph(str(tmp_path / 'model.onnx'))
    check_against_torch(net, str(tmp_path / 'model.onnx'))


def test_torchscript_exporter_and_cli(tmp_path, capsys):
    net, export = make_export(tmp_path / 'export', LSRB_COMPACT)
    out = tmp_path / 'lsrb.onnx'
    assert main([export, '-o', str(out), '--exporter', 'torchscript', '--opset', '17', '--size', str(EXPORT_SIZE)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['exporter'] == 'torchscript'
    check_graph(str(out))
    check_against_torch(net, str(out))
    with pytest.raises(SystemExit):  # refuses to overwrite, and an opset below 17
        main([export, '-o', str(out)])
    with pytest.raises(ValueError, match='opset 16'):
        export_onnx(export, str(tmp_path / 'old.onnx'), opset=16)
    with pytest.raises(ValueError, match='15 pixels'):
        export_onnx(export, str(tmp_path / 'small.onnx'), size=12)
