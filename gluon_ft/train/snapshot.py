"""Put a network and its Trainer back exactly as they were: :class:`TrainingSnapshot`.

For work that trains only to look (the LR range test): every parameter's every copy (one per
device, the BatchNorm running statistics included), the optimizer's state arrays and counters,
the learning rate and a loss scaler's state are copied, and written back in place afterwards.

A Trainer that updates on its kvstore (several devices) keeps a copy of the weights and the
optimizer state in the kvstore, which writing the parameters back does not reach. A kvstore
that existed before is written back too (a push that stores the value as it is); one made
since is dropped, so the next step makes it again from the restored weights, as it would
have. (Dropping the old one instead, as ``Parameter.set_data`` does, would not be exact: a new
kvstore gives every device the first device's BatchNorm statistics.)
"""

from __future__ import annotations

import copy

import mxnet as mx
from mxnet import gluon


def _copy_state(state):
    """A deep copy of one optimizer state (an NDArray, a tuple or list of them, or a number)."""
    if isinstance(state, mx.nd.NDArray):
        return state.copy()
    if isinstance(state, tuple | list):
        return type(state)(_copy_state(s) for s in state)
    return state


def _store_as_is(key, value, stored) -> None:
    """A kvstore updater that stores the pushed value itself."""
    stored[:] = value


def _state_holders(trainer: gluon.Trainer) -> list:
    """The Updaters holding ``trainer``'s optimizer state, without creating a kvstore."""
    if trainer._kv_initialized and trainer._update_on_kvstore:
        return [trainer._kvstore._updater]
    return list(trainer._updaters)


class TrainingSnapshot:
    """Copies of everything training changes in ``net`` and ``trainer``; :meth:`restore`
    writes them back.

    The gradients are not kept: :meth:`restore` zeroes them, as they are between two steps.
    """

    def __init__(self, net: gluon.Block, trainer: gluon.Trainer):
        self.net = net
        self.trainer = trainer
        params = net.collect_params().values()
        # The last step first. MXNet 1.9 updates BatchNorm's running statistics in the backward
        # pass (measured: a training-mode forward pass alone leaves them as they were), and a
        # copy taken before they land is stale (seen on cpu:2).
        mx.nd.waitall()
        self.data = [(p, [d.copy() for d in p.list_data()]) for p in params]
        self.on_kvstore = bool(trainer._kv_initialized and trainer._update_on_kvstore)
        self.states = [
            ({i: _copy_state(s) for i, s in u.states.items()}, dict(u.states_synced))
            for u in _state_holders(trainer)
        ]
        optimizer = trainer._optimizer
        self.num_update = optimizer.num_update
        self.update_counts = copy.deepcopy(optimizer._all_index_update_counts)
        self.learning_rate = trainer.learning_rate
        scaler = getattr(trainer, "_amp_loss_scaler", None)  # float16's dynamic loss scale
        self.scaler = dict(vars(scaler)) if scaler is not None else None

    def restore(self) -> None:
        """Write every copy back in place, with the optimizer's state; zero the gradients."""
        # The work's last step first, for the same reason as in __init__: a CI run once saw its
        # BatchNorm statistics land after the copies written here.
        mx.nd.waitall()
        for param, copies in self.data:
            for array, saved in zip(param.list_data(), copies):
                array[:] = saved
        self.net.collect_params().zero_grad()
        trainer = self.trainer
        if self.on_kvstore:
            self._restore_kvstore_weights()
        elif trainer._kv_initialized and trainer._update_on_kvstore:
            trainer._reset_kvstore()  # made during the work: none again, as before
        for updater, (states, synced) in zip(_state_holders(trainer), self.states):
            updater.states.clear()
            updater.states.update({i: _copy_state(s) for i, s in states.items()})
            updater.states_synced.clear()
            updater.states_synced.update(synced)
        self._restore_counters()
        mx.nd.waitall()

    def _restore_kvstore_weights(self) -> None:
        """Put the saved weights into the kvstore's own copy, its optimizer left out."""
        kvstore = self.trainer._kvstore
        updater = kvstore._updater
        saved = {id(param): copies[0] for param, copies in self.data}
        pending = {id(param) for param in self.trainer._params_to_init}
        kvstore._set_updater(_store_as_is)
        try:
            for index, param in enumerate(self.trainer._params):
                if id(param) not in pending:  # only keys the kvstore holds
                    kvstore.push(index, saved[id(param)])
        finally:
            kvstore._set_updater(updater)

    def _restore_counters(self) -> None:
        trainer, optimizer = self.trainer, self.trainer._optimizer
        optimizer.num_update = self.num_update
        # In place: the optimizer aliases one of these dicts as its _index_update_count.
        for device, counts in optimizer._all_index_update_counts.items():
            counts.clear()
            counts.update(self.update_counts.get(device, {}))
        if optimizer.lr_scheduler is None:
            trainer.set_learning_rate(self.learning_rate)
        if self.scaler is not None:
            vars(trainer._amp_loss_scaler).update(self.scaler)
