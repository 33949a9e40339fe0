"""examples/train_tiny_transformer.py: a short run of the training example
learns (the loss falls by a real factor), and its command line runs."""

import subprocess
import sys
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_tiny_transformer as example  # noqa: E402


def test_short_run_learns_to_copy():
    losses = example.train(steps=60, task="copy", seed=0)
    assert len(losses) == 60 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # A random guess costs ln(10) = 2.3; the copy task is learnt in ~50 steps.
    assert first > 1.5
    assert last < first / 10, (first, last)


def test_cross_entropy_gradient_is_the_softmax_minus_one_hot():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 5))
    targets = rng.integers(0, 5, (2, 3))
    mask = np.array([[True, False, True], [True, True, False]])
    loss, grad = example.cross_entropy(logits.copy(), targets, mask)
    eps, i = 1e-6, (1, 1, 2)
    up, down = logits.copy(), logits.copy()
    up[i] += eps
    down[i] -= eps
    fd = (example.cross_entropy(up, targets, mask)[0]
          - example.cross_entropy(down, targets, mask)[0]) / (2 * eps)
    assert abs(grad[i] - fd) < 1e-8
    assert np.all(grad[~mask] == 0)


def test_command_line():
    out = subprocess.run([sys.executable, str(EXAMPLES / "train_tiny_transformer.py"),
                          "--steps", "3", "--print-every", "1"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "step    2" in out and "->" in out
