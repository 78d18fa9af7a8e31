"""Stop training cleanly on SIGTERM (preemption), and an optional deterministic mode.

SIGTERM (SLURM preemption, ``scancel``, the compare runner stopping its cells): the handler only sets
a flag. Before the next iteration starts (so the step that was running has finished) the model
writes the same files BasicSR's periodic save writes (``model.save``: network checkpoints, training
state and, for pruning models, the export) at that iteration, unless the periodic save just wrote
them, and training ends with :class:`TrainingStopped`; ``fmpsr/train.py`` then exits with status 143
(128 + SIGTERM). ``--auto_resume`` continues from that checkpoint exactly. Under ``torchrun`` /
SLURM every rank learns of the signal through an all-reduce each iteration, so all ranks stop at the
same iteration (rank 0 writes). DataLoader workers ignore SIGTERM (a signal sent to the whole process
group would otherwise kill them mid-iteration and abort the main process); they end with it.

Deterministic mode (``deterministic: true`` at the top of the option file, or ``--deterministic`` on
the command line): after BasicSR has turned ``cudnn.benchmark`` on, it is turned off again,
``cudnn.deterministic`` and ``torch.use_deterministic_algorithms(True)`` are set and
``CUBLAS_WORKSPACE_CONFIG`` is ``:4096:8`` (unless already set), so a resumed GPU run repeats an
uninterrupted one. ``deterministic: warn`` warns instead of failing at an op that has no
deterministic implementation.
"""
import os
import signal

import torch

EXIT_STOPPED = 128 + signal.SIGTERM
_STOP = {'signal': None}


class TrainingStopped(Exception):
    """Training ended early on a signal; ``iteration`` is the last one run, ``saved`` whether its
    checkpoint was written now (False: the periodic save had written it, or no step had run)."""

    def __init__(self, signum, iteration, saved):
        super().__init__(f'stopped by signal {signal.Signals(signum).name} after iteration {iteration}')
        self.signum, self.iteration, self.saved = signum, iteration, saved


def _request_stop(signum, frame):
    _STOP['signal'] = signum


def install_stop_handler(signals=(signal.SIGTERM,)):
    """Make ``signals`` request a clean stop (see the module docstring); call from the main thread."""
    for signum in signals:
        signal.signal(signum, _request_stop)


def stop_requested():
    """The signal number that asked this process to stop, or None."""
    return _STOP['signal']


def _stop_agreed(device):
    """The stop signal of any rank (all-reduced under torch.distributed), or None."""
    import torch.distributed as dist
    local = _STOP['signal'] or 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([local], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        local = int(flag.item())
    return local or None


def stop_between_iterations(model, opt, current_epoch, log):
    """Make ``model`` end training at the first iteration boundary after a stop request.

    BasicSR's loop calls ``model.update_learning_rate(current_iter)`` first thing in every iteration;
    the wrapper checks for a stop there, so iteration ``current_iter - 1`` has completed (its step,
    log line, periodic save and validation).

    Args:
        model: a BasicSR model (its ``update_learning_rate`` is wrapped on the instance).
        opt (dict): the parsed options (``logger.save_checkpoint_freq``).
        current_epoch (callable): the epoch the training loop is in.
        log (callable): messages (str).

    Raises (from the wrapped method):
        TrainingStopped: after the checkpoint is written.
    """
    original = model.update_learning_rate
    start = {}
    freq = int((opt.get('logger') or {}).get('save_checkpoint_freq') or 0)

    def update_learning_rate(current_iter, *args, **kwargs):
        done = current_iter - 1
        start.setdefault('iter', done)
        signum = _stop_agreed(model.device)
        if signum is not None:
            name = signal.Signals(signum).name
            saved = done > start['iter'] and not (freq and done % freq == 0)
            if saved:
                log(f'{name}: saving models and training states at iteration {done}, then stopping '
                    '(--auto_resume continues from here)')
                model.save(current_epoch(), done)
            else:
                log(f'{name}: stopping after iteration {done}; its checkpoint is already written'
                    if done > start['iter'] else f'{name}: stopping before the first step of this run')
            raise TrainingStopped(signum, done, saved)
        return original(current_iter, *args, **kwargs)
    model.update_learning_rate = update_learning_rate
    return model


def _ignore_sigterm_then(init):
    def worker_init(worker_id):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if init is not None:
            init(worker_id)
    return worker_init


def workers_ignore_sigterm(loader):
    """Make the DataLoader ``loader``'s worker processes ignore SIGTERM (they still end with the run)."""
    if loader is not None and getattr(loader, 'num_workers', 0) > 0:
        loader.worker_init_fn = _ignore_sigterm_then(loader.worker_init_fn)
    return loader


DETERMINISTIC_VALUES = (False, True, 'warn')


def check_deterministic(opt):
    """Raise ValueError unless ``deterministic`` (if given) is true, false or 'warn'."""
    value = opt.get('deterministic', False)
    if value is None or not any(value is v or (isinstance(v, str) and value == v) for v in DETERMINISTIC_VALUES):
        raise ValueError(f"deterministic: must be true, false or 'warn', got {value!r}")


def apply_deterministic(opt):
    """Set torch's deterministic flags when ``opt['deterministic']`` is true or 'warn' (see the module
    docstring). Call after BasicSR's ``cudnn.benchmark = True``. Returns True when it set them."""
    value = opt.get('deterministic', False)
    if not value:
        return False
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=value == 'warn')
    return True
