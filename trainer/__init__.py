"""Single-machine GRPO for multi-turn VLM episodes: the local backend's trainer.

- ``trainer.config``: :class:`TrainConfig`, slime's hyper-parameter names, validated;
- ``trainer.grpo``: advantages, clipped policy loss, KL (pure tensor functions);
- ``trainer.batch``: finished samples -> left-padded micro-batches -> log-probs;
- ``trainer.update``: one policy update (accumulation, clipping, train/rollout mismatch);
- ``trainer.optim``: AdamW with fp32 master weights;
- ``trainer.rollouts``: running a rollout with the plugin's ``generate``/``reward``;
- ``trainer.data``: which prompts each step uses;
- ``trainer.loop``: :func:`train`, the rollout -> update loop;
- ``trainer.checkpoint``, ``trainer.metrics``, ``trainer.report``: what a run leaves behind;
- ``trainer.slime_launch``: the slime backend's argument list and preflight checks.

Submodules are imported by their users; importing this package pulls in nothing heavy.
"""
