"""A trivially learnable env for the trainer's tests: reward 1 when the model's turn contains a target string.

Loaded by file path through ``rollout_interaction_env_path``. One turn: the env grades the text the
model wrote and ends the episode. With the target as a stop string (``rollout_stop``) a turn ends
as soon as the model writes it, so the reward is "did the model write the target within budget",
which a tiny random model does some of the time and can learn to do every time.
"""

from __future__ import annotations

from envs.base import BaseInteractionEnv


class TargetStringEnv(BaseInteractionEnv):
    def __init__(self, target: str) -> None:
        self.target = target
        self.outcome = {"score": 0.0, "attempts": 0}

    def reset(self):
        self.outcome = {"score": 0.0, "attempts": 0}
        return {"obs_str": "", "role": "tool"}, {}

    def step(self, response_text: str):
        score = 1.0 if self.target in response_text else 0.0
        self.outcome = {"score": score, "attempts": 1, "solved_at_turn": 1 if score else None}
        return {"obs_str": f"score {score}", "role": "tool"}, True, {"score": score}


def build_env(sample=None, args=None, target: str = "e", **kwargs):
    return TargetStringEnv(target)
