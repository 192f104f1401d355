"""The structure proof is made once per structure and shared through the cache (compress inspect and the run's
first pruning step), and its key changes with everything its outcome depends on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stages._structure as S
from stages._graph import build_graph


class Stored(nn.Module):
    """conv1's width is also a stored int its forward reshapes by (pruning conv1 breaks it); conv2 prunes."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = self.conv1(x).reshape(b, self.width, h * w).reshape(b, self.width, h, w)
        return self.fc(self.conv3(self.conv2(x).relu()).mean((2, 3)))


ROOTS = ["conv1", "conv2"]
X = torch.zeros(1, 3, 8, 8)


@pytest.fixture
def trials(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    count = []
    real = S._trial

    def counted(*args, **kwargs):
        count.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "_trial", counted)
    return count


def test_a_proof_is_made_once_per_structure_and_reused(trials):
    first = S.prove(Stored(), X, ROOTS, build_graph)
    assert set(first) == {"conv1"} and not S.prove.last_cached and len(trials) > 1
    made = len(trials)
    again = S.prove(Stored(), X, ROOTS, build_graph)  # another instance, other weights: the same structure
    assert again == first and S.prove.last_cached and len(trials) == made


def test_the_key_changes_with_what_the_outcome_depends_on():
    key = S.proof_key(Stored(), X, ROOTS)
    assert key is not None and S.proof_key(Stored(), X, ROOTS) == key
    wider = Stored()
    wider.width = 16  # a stored int (what breaks this model's proof) is in the key
    patched = Stored()
    patched.forward = lambda x: x  # a forward replaced on the instance
    hooked = Stored()
    hooked.conv2.register_forward_hook(lambda m, i, o: o)
    others = [S.proof_key(Stored(width=6), X, ROOTS), S.proof_key(wider, X, ROOTS),
              S.proof_key(Stored(), torch.zeros(1, 3, 16, 16), ROOTS), S.proof_key(Stored(), X, ["conv2"]),
              S.proof_key(patched, X, ROOTS)]
    assert key not in others and len(set(others)) == len(others)
    assert S.proof_key(hooked, X, ROOTS) is None, "a hook can change the forward: nothing is cached"


def test_a_proof_cut_short_by_its_budget_is_not_kept(trials):
    S.prove(Stored(), X, ROOTS, build_graph, budget_s=0.0)
    assert not S.prove.last_cached
    S.prove(Stored(), X, ROOTS, build_graph)
    assert not S.prove.last_cached, "the proof past its budget held groups together: it is made again"


def test_heads_tied_to_a_width_are_kept_with_the_proof_and_come_back_from_the_cache(trials):
    """The proof holds both the tied heads and the width they read; the coupling it finds (the two shrink
    together) is part of the cached outcome, so a run after `compress inspect` prunes them jointly too."""
    from stages._graph import build_graph as graph_of
    from tests.fixtures.tied import TiedNet

    x = torch.zeros(1, 1, 8, 16)
    model = TiedNet().eval()
    found, _ = graph_of(model, x).groups(model, [model.head], {})
    roots = [f[0] for f in found]
    first = S.prove(model, x, roots, graph_of)
    assert not S.prove.last_cached and set(first) == {"mlp.2", "attn.q"}, dict(first)
    assert first.coupled == {"mlp.2": ["attn.q"]} and first.held() == {}
    again = S.prove(TiedNet().eval(), x, roots, graph_of)
    assert S.prove.last_cached and again == first and again.coupled == first.coupled
