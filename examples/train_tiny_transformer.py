"""Train a tiny causal transformer from scratch with tileattn, without PyTorch.

The task is synthetic: a sequence of random digits, a separator, then the
same digits again (``--task copy``), reversed (``reverse``) or sorted
(``sort``). The model sees ``x_1 .. x_n SEP y_1 .. y_n`` and is trained to
predict each next token; the loss counts only the answer ``y``, which the
digits before the separator determine (a random guess costs ln(10) = 2.30).

    token embedding + learnt position embedding
    -> 2 x tileattn.TransformerEncoderLayer (pre-norm, causal attention)
    -> LayerNorm -> output projection -> softmax cross-entropy

Every gradient comes from tileattn's backward passes (``module.backward``) and
``tileattn.optim.AdamW`` updates the weights in place.

Run::

    python examples/train_tiny_transformer.py                 # 300 steps of sort
    python examples/train_tiny_transformer.py --task copy --steps 60

Use from other code::

    from train_tiny_transformer import train
    losses = train(steps=100, task="copy")      # the loss of each step
"""

from __future__ import annotations

import argparse
import time
from typing import Any, List, Tuple

import numpy as np

import tileattn
from tileattn import optim

DIGITS = 10
SEP = DIGITS                     # the separator's token id
VOCAB = DIGITS + 1


class TinyCausalLM(tileattn.Module):
    """Embeddings, a causal TransformerEncoder and an output projection.

    forward: tokens (B, L) ints -> logits (B, L, VOCAB); backward: dL/dlogits
    -> accumulates every parameter's gradient (the tokens have none).
    """

    def __init__(self, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 max_len: int = 64, seed: int = 0) -> None:
        super().__init__(np.float32)
        rng = np.random.default_rng(seed)
        self.register_parameter("embed", 0.1 * rng.standard_normal((VOCAB, d_model)))
        self.register_parameter("pos", 0.1 * rng.standard_normal((max_len, d_model)))
        layer = tileattn.TransformerEncoderLayer(d_model, nhead, 2 * d_model, dropout=0.0,
                                                 activation="gelu", norm_first=True, seed=seed)
        # Pre-norm stacks end with a norm.
        self.encoder = tileattn.TransformerEncoder(layer, num_layers,
                                                   norm=tileattn.LayerNorm(d_model))
        self.head = tileattn.Linear(d_model, VOCAB, rng=rng)
        self._tokens: Any = None

    def forward(self, tokens: np.ndarray, *, training: bool = False) -> np.ndarray:
        length = tokens.shape[1]
        x = self.embed[tokens] + self.pos[:length]
        h = self.encoder(x, is_causal=True, training=training)
        if training:
            self._tokens = tokens
        out: np.ndarray = self.head(h, training=training)
        return out

    def backward(self, grad_output: Any) -> None:
        dx = self.encoder.backward(self.head.backward(grad_output))
        g_embed = np.zeros_like(self.embed)
        np.add.at(g_embed, self._tokens, dx)          # rows of repeated tokens add up
        self._accumulate("embed", g_embed)
        g_pos = np.zeros_like(self.pos)
        g_pos[: dx.shape[1]] = dx.sum(axis=0)
        self._accumulate("pos", g_pos)


def make_batch(rng: np.random.Generator, batch: int, n: int, task: str
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """inputs (B, 2n), targets (B, 2n) (the next tokens) and the loss mask
    (B, 2n): True where the target is an answer digit."""
    x = rng.integers(0, DIGITS, (batch, n))
    y = {"copy": x, "reverse": x[:, ::-1], "sort": np.sort(x, axis=1)}[task]
    seq = np.concatenate([x, np.full((batch, 1), SEP), y], axis=1)      # (B, 2n + 1)
    mask = np.zeros((batch, 2 * n), bool)
    mask[:, n:] = True                   # positions n.. (SEP and after) predict y
    return seq[:, :-1], seq[:, 1:], mask


def cross_entropy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray
                  ) -> Tuple[float, np.ndarray]:
    """Mean -log softmax(logits)[target] over the masked positions, and its
    gradient with respect to logits (B, L, V)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    picked = np.take_along_axis(p, targets[..., None], axis=-1)[..., 0]
    count = int(mask.sum())
    loss = float(-np.log(np.maximum(picked[mask], 1e-30)).sum() / count)
    grad = p
    np.put_along_axis(grad, targets[..., None], picked[..., None] - 1.0, axis=-1)
    grad *= (mask / count)[..., None].astype(grad.dtype)
    return loss, grad


def train(steps: int = 300, task: str = "sort", n: int = 8, batch: int = 32,
          lr: float = 3e-3, seed: int = 0, print_every: int = 0) -> List[float]:
    """Train a fresh model; returns the loss of every step."""
    model = TinyCausalLM(max_len=2 * n, seed=seed)
    opt = optim.AdamW(model, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed + 1)
    losses: List[float] = []
    start = time.perf_counter()
    for step in range(steps):
        inputs, targets, mask = make_batch(rng, batch, n, task)
        loss, dlogits = cross_entropy(model(inputs, training=True), targets, mask)
        opt.zero_grad()
        model.backward(dlogits)
        opt.step()
        losses.append(loss)
        if print_every and (step % print_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}  ({time.perf_counter() - start:.1f} s)")
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("copy", "reverse", "sort"), default="sort")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--length", type=int, default=8, help="digits per sequence")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=int, default=25)
    a = ap.parse_args()
    losses = train(a.steps, a.task, a.length, a.batch, a.lr, a.seed, a.print_every)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"loss {first:.3f} -> {last:.3f} (mean of the first / last 10 steps)")


if __name__ == "__main__":
    main()
