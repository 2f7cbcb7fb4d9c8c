"""The stability study: what makes a deep CNN's training explode, and what stops it, measured.

Four parts, each from several seeds, every hyper-parameter chosen on the validation split (the
selection runs are kept in the results), the test split evaluated once per reported run:

  1. causes      a plain deep CNN with one factor varied at a time: initialisation scale,
                 activation, depth, learning rate (causes.py)
  2. remedies    AlexNet and Inception-v1 at a learning rate where the bare network diverges:
                 none, warmup, BN, clipping by global norm, AGC, BN + clipping, BN + clipping + guard;
                 and AlexNet's bare network and single remedies at the recipe's rate
  3. faults      the recipe's set-up with a fault injected late (a corrupt batch, a learning-rate
                 spike, a learning-rate blunder, mislabelled batches), guard on and off on the same
                 seeds (faults.py)
  4. recipes     every architecture at its recipe, on demand (recipes.py)

`python -m training.study` runs it (experiment.py schedules the runs, runner.py runs each one
through `training.train.train`) and writes docs/stability.md, its figures and the results JSON
they are all rendered from (report.py). The configuration is `design.StudyConfig`.
"""
