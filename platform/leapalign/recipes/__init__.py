"""Training recipes: one visible loop per family of methods, built on the run state they share
(leapalign.run.TrainingRun); leapalign.methods.METHODS names each method's recipe.

direct.py  LeapAlign, ReFL, DRaFT-LV, DRTune, full backprop: a loss per micro-batch, backward, step
grpo.py    the GRPO family: SDE rollouts in groups, advantages, several PPO updates per rollout
forward.py DiffusionNFT and AWM: ODE rollouts in groups, advantages, losses on re-noised clean samples
"""
