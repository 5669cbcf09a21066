"""A two-turn env whose answer is in the image and is graded only after the env's feedback.

Loaded by file path through ``rollout_interaction_env_path``. The prompt shows a solid colour; the
label (``sample.label``, a number as the dataset requires) picks the letter that colour stands for
(label k: the k-th of ``letters``). The first turn is never graded: the
env answers it with a fixed request to name the colour, and only the model's second turn, written
after those env tokens, is scored (1 when it contains the colour's letter and no other). A policy can only earn more than
the most common label's share by reading the image, and only in the turn that follows env tokens.
"""

from __future__ import annotations

from envs.base import BaseInteractionEnv

FEEDBACK = "Now name the colour."


class ColourAfterFeedbackEnv(BaseInteractionEnv):
    def __init__(self, letter: str, letters: str) -> None:
        self.letter = letter
        self.others = [other for other in letters if other != letter]
        self.turn = 0
        self.outcome = {"score": 0.0, "attempts": 0, "solved_at_turn": None}

    def reset(self):
        self.turn = 0
        self.outcome = {"score": 0.0, "attempts": 0, "solved_at_turn": None}
        return {}, {}

    def step(self, response_text: str):
        self.turn += 1
        if self.turn == 1:
            return {"obs_str": FEEDBACK, "role": "tool"}, False, {"score": None}
        # A text naming every letter (one token can hold two: "ers") is right for no colour, so a
        # policy that ignores the image earns at most the most common colour's share.
        named = self.letter in response_text and not any(other in response_text for other in self.others)
        score = 1.0 if named else 0.0
        self.outcome = {"score": score, "attempts": 1, "solved_at_turn": 2 if score else None}
        return {"obs_str": f"score {score}", "role": "tool"}, True, {"score": score}


def build_env(sample=None, args=None, letters: str = "rs", **kwargs):
    return ColourAfterFeedbackEnv(letters[int(sample.label) - 1], letters)
