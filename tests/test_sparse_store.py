"""Sparse store of unstructured zeros (fmpsr.deploy.sparse_store): size follows the nonzeros and the
round trip is bit-exact."""
import os

import pytest
import torch
from safetensors.torch import load_file

from deploy_helpers import LSRB_COMPACT, make_export
from fmpsr.deploy.sparse_store import (SPARSE_FILE, load_sparse, load_sparse_compact, main, save_sparse,
                                       write_sparse_export)

HEADER_SLACK = 1024  # bytes of safetensors JSON header for a couple of tensors


def bits(t):
    """The raw bytes of a tensor, so that -0.0 vs 0.0 and NaN payloads count as different."""
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def data_bytes(path):
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the JSON header."""
    with open(path, 'rb') as f:
        header = int.from_bytes(f.read(8), 'little')
    return os.path.getsize(path) - 8 - header


def assert_bit_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize('density', [0.6, 0.3, 0.1, 0.01])
def test_file_size_follows_nonzeros(tmp_path, density):
    numel = 64 * 64 * 9
    weight = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0))
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < density
    weight = weight * keep  # as a mask is applied: about half the zeros are -0.0
    nnz = int(keep.sum())
    sign_bits = (numel - nnz + 7) // 8  # the sign of each zero, kept for a bit-exact round trip
    path = str(tmp_path / 'w.safetensors')
    encodings = save_sparse(path, {'w': weight})
    # independent payload count: a bit per entry + 4-byte values, or 4-byte index + 4-byte value per nonzero
    payload = min(numel // 8 + 4 * nnz, 8 * nnz) + sign_bits
    size = os.path.getsize(path)
    assert payload <= size <= payload + HEADER_SLACK
    assert size < 4 * numel * (density + 2 / 32) + HEADER_SLACK  # vs 4 * numel bytes dense
    assert encodings['w'] == ('indices' if 8 * nnz < numel // 8 + 4 * nnz else 'bitmask')
    state, _ = load_sparse(path)
    assert_bit_equal(state['w'], weight)


def test_round_trip_is_bit_exact_for_awkward_values(tmp_path):
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float('nan'), float('inf'), -float('inf'), 1e-45, -3.5] + [0.0] * 57)
    tensors = {
        'special': special.reshape(8, 8),
        'half': (torch.randn(300, generator=g) * (torch.rand(300, generator=g) < 0.2)).half(),
        'bf16': (torch.randn(17, 5, generator=g) * (torch.rand(17, 5, generator=g) < 0.3)).bfloat16(),
        'f64': torch.randn(40, generator=g, dtype=torch.float64) * (torch.arange(40) % 7 == 0),
        'dense': torch.randn(10, 10, generator=g),
        'all_zero': torch.zeros(3, 4, 3, 3),
        'very_sparse': torch.zeros(5000).index_fill_(0, torch.tensor([3, 4000]), 2.0),
        'scalar': torch.tensor(0.0),
        'empty': torch.zeros(0, 3),
        'int_buffer': torch.tensor([0, 5, 0, 7]),
        'bool_mask': torch.tensor([True, False, True]),
    }
    path = str(tmp_path / 's.safetensors')
    encodings = save_sparse(path, tensors, metadata={'network_g': '{"type": "X"}'})
    assert encodings['very_sparse'] == 'indices' and encodings['half'] == 'bitmask'
    assert encodings['dense'] == encodings['int_buffer'] == 'dense'
    state, metadata = load_sparse(path)
    assert metadata['network_g'] == '{"type": "X"}'
    assert sorted(state) == sorted(tensors)
    for name, tensor in tensors.items():
        assert_bit_equal(state[name], tensor)
    assert torch.signbit(state['special'].reshape(-1)[1])  # -0.0 stays -0.0


def test_reserved_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match='a.__mask'):
        save_sparse(str(tmp_path / 'x.safetensors'), {'a.__mask': torch.zeros(2)})
    with pytest.raises(ValueError, match='not an fmpsr sparse store'):
        from safetensors.torch import save_file
        save_file({'a': torch.zeros(2)}, str(tmp_path / 'plain.safetensors'))
        load_sparse(str(tmp_path / 'plain.safetensors'))


def test_export_round_trip(tmp_path, capsys):
    net, export = make_export(tmp_path / 'export', LSRB_COMPACT, zero_fraction=0.7)
    assert main([export]) == 0
    path = os.path.join(export, SPARSE_FILE)
    dense_state = load_file(os.path.join(export, 'net_g.safetensors'))
    rebuilt, network_opt = load_sparse_compact(export)
    assert network_opt == LSRB_COMPACT
    for name, tensor in rebuilt.state_dict().items():
        assert_bit_equal(tensor, dense_state[name])
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
    nnz = sum(int((t != 0).sum()) for t in dense_state.values())
    numel = sum(t.numel() for t in dense_state.values())
    dense_data, sparse_data = data_bytes(os.path.join(export, 'net_g.safetensors')), data_bytes(path)
    assert dense_data == 4 * numel
    # 70 % zeros in the conv weights (biases stay dense): the tensor data shrinks with the nonzeros
    # (the JSON header, large for a network this tiny, is not counted)
    assert nnz < 0.4 * numel and sparse_data < 4 * nnz + numel / 8 + numel / 8
    assert write_sparse_export(export, str(tmp_path / 'again.safetensors')) == str(tmp_path / 'again.safetensors')
