"""Make basicsr 1.4.2 work on current torch / torchvision and on machines without CUDA.

Every fix here is for a known breakage of basicsr 1.4.2 (see ``shared/REFERENCE.md`` section 6);
``patch_basicsr()`` applies them once and must run before the first ``import basicsr``:

* torchvision >= 0.17 removed ``torchvision.transforms.functional_tensor``, which
  ``basicsr.data.degradations`` still imports: alias it to ``torchvision.transforms.functional``.
* ``basicsr.utils.dist_util.init_dist`` hard-codes NCCL and ``torch.cuda.set_device``: use NCCL only
  where CUDA is available, gloo otherwise.
* ``basicsr.train.load_resume_state`` calls ``torch.cuda.current_device()`` and unpickles the
  state with code execution allowed: map to CPU (or the current GPU) and load with
  ``weights_only=True``.
* ``BaseModel.model_to_device`` passes CUDA device ids to DistributedDataParallel: pass none on CPU.
"""
import os
import os.path as osp
import pickle
import sys

_PATCHED = False


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint refused because loading it would run code (it pickles more than tensors and
    plain containers). The message names the file and the object torch's safe unpickler refused."""


class CorruptCheckpointError(ValueError):
    """A checkpoint that is truncated or not a torch file at all; the message names the file."""


def safe_torch_load(path, map_location='cpu', what='checkpoint'):
    """``torch.load(path, weights_only=True)`` with errors a user can read.

    Args:
        path (str): a ``.pth`` / ``.state`` file.
        map_location: as for ``torch.load``.
        what (str): what the file is, for messages (e.g. ``'path.resume_state'``).

    Returns:
        whatever the file holds (tensors, dicts, lists, numbers, strings).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file holds pickled objects whose loading would run code
            (``weights_only=True`` refused them); names the file and the refused object.
        CorruptCheckpointError: the file is truncated or not a torch checkpoint.
    """
    import torch
    if not osp.isfile(path):
        raise FileNotFoundError(f'{what}: no such file {path!r}')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines()]
        detail = next((line for line in lines if 'nsupported' in line or 'not an allowed global' in line), '')
        raise UnsafeCheckpointError(
            f'{what} {path!r} was refused: loading it would run code stored in the file (it pickles Python '
            f'objects, not only tensors{"; " + detail if detail else ""}). fmpsr loads checkpoints with '
            'torch.load(weights_only=True); re-save its state dict from a source you trust') from error
    except (RuntimeError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptCheckpointError(f'{what} {path!r} cannot be read: it is truncated or not a torch checkpoint '
                                     f'({reason})') from error


def _alias_functional_tensor():
    if 'torchvision.transforms.functional_tensor' in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision)
    except ImportError:
        import torchvision.transforms.functional as functional
        sys.modules['torchvision.transforms.functional_tensor'] = functional


def dist_backend():
    """Return the torch.distributed backend fmpsr uses: ``'nccl'`` with CUDA, ``'gloo'`` without."""
    import torch
    return 'nccl' if torch.cuda.is_available() else 'gloo'


def init_dist(launcher, backend=None, **kwargs):
    """Initialise torch.distributed for ``--launcher pytorch`` or ``--launcher slurm``.

    Replacement for ``basicsr.utils.dist_util.init_dist`` that works without CUDA.

    Args:
        launcher (str): ``'pytorch'`` (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
            or ``'slurm'`` (SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST are read).
        backend (str | None): ``'nccl'`` or ``'gloo'``; None picks :func:`dist_backend`. NCCL asked
            for on a machine without CUDA (option files say ``dist_params.backend: nccl``) falls back
            to gloo with a warning.
        **kwargs: ``port`` for slurm; anything else goes to ``init_process_group``.

    Raises:
        ValueError: unknown launcher.
        KeyError: a variable the launcher must set is missing (its name is in the message).
    """
    import subprocess

    import torch
    import torch.distributed as dist

    backend = backend or dist_backend()
    if backend == 'nccl' and not torch.cuda.is_available():
        import warnings
        warnings.warn("dist_params.backend 'nccl' needs CUDA and this machine has none: using 'gloo'")
        backend = 'gloo'
    if launcher == 'pytorch':
        for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
            if key not in os.environ:
                raise KeyError(f'--launcher pytorch needs the environment variable {key} (start with torchrun)')
        rank = int(os.environ['RANK'])
    elif launcher == 'slurm':
        port = kwargs.pop('port', None)
        rank = int(os.environ['SLURM_PROCID'])
        ntasks = int(os.environ['SLURM_NTASKS'])
        node_list = os.environ['SLURM_NODELIST']
        addr = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
        if port is not None:
            os.environ['MASTER_PORT'] = str(port)
        elif 'MASTER_PORT' not in os.environ:
            os.environ['MASTER_PORT'] = '29500'
        os.environ.setdefault('MASTER_ADDR', addr)
        os.environ['WORLD_SIZE'] = str(ntasks)
        os.environ['LOCAL_RANK'] = str(rank % max(torch.cuda.device_count(), 1))
        os.environ['RANK'] = str(rank)
    else:
        raise ValueError(f'Invalid launcher type: {launcher!r} (expected pytorch or slurm)')
    if backend == 'nccl':
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, **kwargs)


def resume_map_location():
    """``map_location`` for checkpoints: the current GPU with CUDA, otherwise the CPU."""
    import torch
    if torch.cuda.is_available():
        device_id = torch.cuda.current_device()
        return lambda storage, loc: storage.cuda(device_id)
    return 'cpu'


def remove_stale_temporary_files(experiments_root):
    """Remove the temporary files (``.<name>.<random>.tmp``) that a run killed inside
    :func:`fmpsr.pruning.export.atomic_write` left in ``models/``, ``training_states/`` and ``export/``.

    Returns:
        list[str]: the removed paths.
    """
    removed = []
    for sub in ('models', 'training_states', 'export'):
        folder = osp.join(experiments_root, sub)
        if not osp.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith('.') and name.endswith('.tmp'):
                try:
                    os.remove(osp.join(folder, name))
                    removed.append(osp.join(folder, name))
                except FileNotFoundError:
                    pass
    return removed


def resume_network_paths(opt, resume_iter):
    """The network checkpoints BasicSR's ``check_resume`` will load to resume at ``resume_iter``:
    ``<models>/net_<x>_<iter>.pth`` for every ``network_<x>`` of the options not listed in
    ``path.ignore_resume_networks`` (fmpsr's models keep all their state in these files and the
    training state)."""
    ignored = opt['path'].get('ignore_resume_networks') or []
    models = opt['path'].get('models') or osp.join(
        opt['path'].get('experiments_root') or osp.join('experiments', opt['name']), 'models')
    return {key: osp.join(models, f'net_{key[len("network_"):]}_{resume_iter}.pth')
            for key in opt if key.startswith('network_') and key not in ignored}


def _load_resume_pair(opt, state_path, what, iteration=None):
    """Load the training state ``state_path`` and check that the network checkpoints of its iteration
    load too (``weights_only``, CPU). Returns the state (mapped to :func:`resume_map_location`).

    Raises:
        FileNotFoundError, UnsafeCheckpointError, CorruptCheckpointError: naming the file at fault.
    """
    state = safe_torch_load(state_path, resume_map_location(), what=what)
    if not isinstance(state, dict) or not isinstance(state.get('iter'), int) or not isinstance(state.get('epoch'), int):
        raise CorruptCheckpointError(f'{what} {state_path!r} is not a BasicSR training state (no iter / epoch)')
    if iteration is not None and state['iter'] != iteration:
        raise CorruptCheckpointError(f'{what} {state_path!r} holds iteration {state["iter"]}, not {iteration}')
    for key, path in resume_network_paths(opt, state['iter']).items():
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} {state_path!r} (iteration {state["iter"]}) needs the network '
                                    f'checkpoint {path!r}, which does not exist')
        net = safe_torch_load(path, 'cpu', what=f'network checkpoint of {key} for iteration {state["iter"]}')
        if not isinstance(net, dict):
            raise CorruptCheckpointError(f'network checkpoint {path!r} holds a {type(net).__name__}, not a state dict')
        del net
    return state


def load_resume_state(opt, skipped=None):
    """Find and load the training state to resume from (replaces basicsr's version).

    With ``opt['auto_resume']`` the newest ``<experiments_root>/training_states/<iter>.state`` whose
    training state AND network checkpoint(s) (:func:`resume_network_paths`) both load is used; newer
    ones that do not load (truncated, damaged, unsafe, network checkpoint missing) are skipped and
    described in ``skipped``. Rank 0 first removes the temporary files of a write the killed run did
    not finish. Otherwise ``opt['path']['resume_state']`` if set (its network checkpoint must load
    too). Loading never executes code from a file (``weights_only=True``).

    Args:
        opt (dict): the parsed options; ``path.resume_state`` is set to the state used and
            ``path.pretrain_network_*`` to its network checkpoints (BasicSR's ``check_resume``).
        skipped (list | None): receives one line per skipped state (path and why).

    Returns:
        dict | None: the state, or None when there is nothing to resume.

    Raises:
        FileNotFoundError: ``path.resume_state`` (or the network checkpoint it needs) does not exist.
        UnsafeCheckpointError, CorruptCheckpointError: ``path.resume_state`` or its network checkpoint
            (see :func:`safe_torch_load`); with ``--auto_resume``, when no state in the folder loads
            (CorruptCheckpointError listing each one and why).
    """
    from basicsr.utils import check_resume, scandir

    skipped = [] if skipped is None else skipped
    resume_state = None
    if opt['auto_resume']:
        experiments_root = opt['path'].get('experiments_root') or osp.join('experiments', opt['name'])
        state_path = osp.join(experiments_root, 'training_states')
        if opt.get('rank', 0) == 0:
            remove_stale_temporary_files(experiments_root)
        iters = []
        if osp.isdir(state_path):
            names = scandir(state_path, suffix='state', recursive=False, full_path=False)
            iters = sorted((int(v[:-len('.state')]) for v in names if v[:-len('.state')].isdigit()), reverse=True)
        for iteration in iters:
            path = osp.join(state_path, f'{iteration}.state')
            try:
                resume_state = _load_resume_pair(opt, path, '--auto_resume: training state', iteration)
            except (OSError, ValueError, pickle.UnpicklingError) as error:
                skipped.append(f'{path}: {str(error).splitlines()[0]}')
                continue
            opt['path']['resume_state'] = path
            break
        if iters and resume_state is None:
            raise CorruptCheckpointError(
                f'--auto_resume: none of the {len(iters)} training state(s) in {state_path!r} can be resumed '
                f'(each one or its network checkpoint fails to load): {"; ".join(skipped)}. Move the folder '
                f'{experiments_root!r} away to start afresh')
    elif opt['path'].get('resume_state'):
        resume_state = _load_resume_pair(opt, opt['path']['resume_state'], 'path.resume_state')
    if resume_state is None:
        return None
    check_resume(opt, resume_state['iter'])
    return resume_state


def model_to_device(self, net):
    """``BaseModel.model_to_device`` that wraps DDP with device ids only on CUDA."""
    import torch
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    net = net.to(self.device)
    if self.opt['dist']:
        find_unused_parameters = self.opt.get('find_unused_parameters', False)
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    elif self.opt['num_gpu'] > 1:
        net = DataParallel(net)
    return net


def patch_basicsr():
    """Apply every fix listed in the module docstring (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    _alias_functional_tensor()
    import basicsr.train
    import basicsr.utils.dist_util
    import basicsr.utils.options
    from basicsr.models.base_model import BaseModel

    basicsr.utils.dist_util.init_dist = init_dist
    basicsr.utils.options.init_dist = init_dist
    basicsr.train.load_resume_state = load_resume_state
    BaseModel.model_to_device = model_to_device
    _PATCHED = True
