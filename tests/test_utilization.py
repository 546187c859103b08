"""trainer/utilization.py: the train step's FLOPs come from the lowered step, without a second compile."""

import jax
import numpy as np

from benchmarks import kit
from parallel import mesh as mesh_lib
from trainer import job as job_lib, utilization


def test_train_step_flops_compile_nothing(monkeypatch):
  data = kit.dataset(n=32, shape=(16, 16, 1), seed=0, test=16)
  c = kit.config(batch_size=16)
  job = job_lib.build(c, mesh=mesh_lib.make_mesh(2), data=data)
  state = job.stepper.to_device(job.initial_state())
  lo, hi = mesh_lib.process_rows(job.mesh, c.batch_size)
  batch = job.stepper.place({'image': np.zeros((hi - lo, 16, 16, 1), np.float32),
                             'label': np.zeros((hi - lo,), np.int32)})
  compiled = utilization.cost_flops(job.flops_stepper().train_step.lower(state, batch).compile())

  def no_compile(*args, **kwargs):
    raise AssertionError('the FLOP count compiled the step')

  monkeypatch.setattr(jax.stages.Lowered, 'compile', no_compile)
  flops = utilization.train_step_flops(job, state)
  assert flops is not None and abs(flops - compiled) < 0.05 * compiled, (flops, compiled)
