"""One model: `finetune` (warm-started from the previous round) and `from_scratch` (tabula rasa).

State: {'params': model parameters, 'opt_state': optimizer state}.
"""
from __future__ import annotations

import jax
import numpy as np

from alma_jax import metrics, models, optim, steps
from alma_jax.learners import base


class SingleModel:

  def __init__(self, config, dataset, data: base.DeviceData, mesh, warm_start: bool):
    self.warm_start = warm_start
    self.reset_optimizer = config.learner.reset_optimizer
    self.train_config = config.train
    self.data = data
    self.test_indices = np.arange(len(dataset.test_labels))
    self.model = models.build(config.model, dataset.num_classes)
    self.optimizer = optim.build(config.optimizer)
    self.example = np.zeros((1,) + dataset.image_shape, np.uint8)

    def apply_fn(params, images):
      return self.model.apply({'params': params}, dataset.preprocess(images))

    self.apply_fn = apply_fn
    loss_fn, metric_fn = base.classification_losses(apply_fn)
    self.trainer = steps.Trainer(loss_fn, metric_fn, self.optimizer, config.train.batch_size,
                                 config.train.eval_batch_size, mesh)
    self._flops = None

  def _new_params(self, key):
    return self.model.init(key, self.example)['params']

  def init(self, key):
    params = self._new_params(key)
    return {'params': params, 'opt_state': self.optimizer.init(params)}

  def flops(self, state) -> dict:
    """FLOPs of one train step and of one example's forward pass (fixed shapes: computed once)."""
    if self._flops is None:
      self._flops = {
          'step': self.trainer.step_flops(state['params'], state['opt_state'],
                                          self.data.train_images, self.data.train_labels),
          'forward': base.forward_flops_per_example(self.apply_fn, state['params'],
                                                    self.data.train_images,
                                                    self.train_config.batch_size)}
    return self._flops

  def train_round(self, state, round: base.Round, key):
    init_key, fit_key = jax.random.split(key)
    params = state['params'] if self.warm_start else self._new_params(init_key)
    opt_state = (self.optimizer.init(params) if self.reset_optimizer or not self.warm_start
                 else state['opt_state'])
    flops = self.flops(state)
    params, opt_state, report = base.fit(self.trainer, params, opt_state, self.data, round,
                                         fit_key, self.train_config, flops)
    return {'params': params, 'opt_state': opt_state}, report

  def evaluate(self, state) -> dict:
    return base.evaluate(self.trainer, state['params'], self.data.test_images,
                         self.data.test_labels, self.test_indices)

  def params(self, state) -> int:
    return metrics.num_params(state['params'])

  def inference_flops(self, state) -> float:
    return self.flops(state)['forward'] or float('nan')

  def restore(self, tree):
    return base.restore_like(jax.eval_shape(self.init, jax.random.key(0)), tree)
