"""The machinery every exercise module shares: PASS/FAIL reporting, calling the student's function,
comparing tensors and arrays, seeding, and the hashed multiple-choice answers.

An exercise module (``ex02.py`` ...) writes its checkers with these helpers and registers its
questions with :func:`add_questions`; ``checks/__init__.py`` re-exports every checker.
"""

from __future__ import annotations

import functools
import hashlib
import textwrap
from collections.abc import Callable, Sequence

import numpy as np
import torch

_SEED = 20240  # every check seeds its random numbers with this

def _fail(name: str, message: str, hint: str = "") -> None:
    text = textwrap.fill(f"FAIL: {name}: {message}", width=88, subsequent_indent="      ")
    if hint:
        text += "\n" + textwrap.fill(f"Hint: {hint}", width=88, subsequent_indent="      ")
    raise AssertionError(text)


def _pass(name: str, message: str) -> None:
    print(textwrap.fill(f"PASS: {name}: {message}", width=68, subsequent_indent="      "))


def _call(fn: Callable, name: str, *args, **kwargs):
    """Call the student's function; turn an unfinished stub into a clear NotImplementedError."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise NotImplementedError(
            f"{name} is not implemented yet: replace `raise NotImplementedError()` with your code, "
            "run that cell, then run this check again."
        ) from None
    except Exception as err:  # noqa: BLE001  (report any crash as a failed check, with the cause)
        raise AssertionError(f"FAIL: {name}: calling it raised {type(err).__name__}: {err}") from err


def _clone(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _check_tensor(name: str, out, shape: Sequence[int], dtype: torch.dtype, what: str = "the result") -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        _fail(name, f"{what} should be a torch.Tensor, got {type(out).__name__}.",
              "build the result from torch operations on the inputs (no numpy, no Python floats).")
    if tuple(out.shape) != tuple(shape):
        _fail(name, f"{what} has shape {tuple(out.shape)}, expected {tuple(shape)}.",
              "re-read the shapes in the docstring: which axis should be summed, which kept?")
    if out.dtype != dtype:
        _fail(name, f"{what} has dtype {out.dtype} for {dtype} inputs.",
              "keep the input's dtype: avoid creating tensors with a fixed dtype inside your function.")
    return out


def _check_unchanged(name: str, originals: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    for a, b in zip(originals, inputs):
        if not torch.equal(a, b.detach()):
            _fail(name, "the function modified one of its inputs in place.",
                  "use out-of-place operations (x / s, not x /= s or x.div_(s)).")


def _close(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float | torch.Tensor) -> bool:
    """|got - expected| <= atol + rtol |expected| wherever expected is finite (atol may vary per entry)."""
    got = got.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    if not torch.equal(torch.isfinite(got), torch.isfinite(expected)):
        return False
    fin = torch.isfinite(expected)
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(expected)
    return bool(((got - expected).abs() <= atol + rtol * expected.abs())[fin].all())


def _compare(name: str, got: torch.Tensor, expected: torch.Tensor, where: str, hint: str,
             rtol: float = 1e-5, atol: float | torch.Tensor = 1e-6) -> None:
    """Fail with a hint (never the expected values) unless got matches expected."""
    g = got.detach().to(torch.float64)
    if torch.isnan(g).any() and not torch.isnan(expected).any():
        _fail(name, f"the result contains nan {where}.", hint)
    if torch.isinf(g).any() and not torch.isinf(expected).any():
        _fail(name, f"the result contains inf or -inf {where}.", hint)
    if not _close(got, expected, rtol, atol):
        _fail(name, f"wrong values {where}.", hint)


def _deterministic(check: Callable) -> Callable:
    """Run a check with torch's global generator seeded, then restore the notebook's generator state."""

    @functools.wraps(check)
    def wrapper(*args, **kwargs) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            return check(*args, **kwargs)

    return wrapper


def _rng() -> torch.Generator:
    return torch.Generator().manual_seed(_SEED)


# --------------------------------------------------------------------------- NumPy results


def _check_array(name: str, out, shape: Sequence[int], what: str = "the result") -> np.ndarray:
    """A NumPy result (a tensor is accepted and converted) of the given shape, as float64."""
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    if not isinstance(out, (np.ndarray, np.generic, float, int, bool)):
        _fail(name, f"{what} should be a NumPy array, got {type(out).__name__}.",
              "build the result from NumPy operations on the inputs.")
    out = np.asarray(out)
    if out.shape != tuple(shape):
        _fail(name, f"{what} has shape {out.shape}, expected {tuple(shape)}.",
              "re-read the shapes in the docstring: which axis should be reduced, which kept?")
    return out


def _compare_np(name: str, got: np.ndarray, expected: np.ndarray, where: str, hint: str,
                rtol: float = 1e-6, atol: float = 1e-8) -> None:
    _compare(name, torch.as_tensor(np.asarray(got, dtype=np.float64)),
             torch.as_tensor(np.asarray(expected, dtype=np.float64)), where, hint, rtol=rtol, atol=atol)


def _check_pair(name: str, out, what: str = "(a, b)") -> tuple:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        _fail(name, f"should return a tuple {what}.")
    return tuple(out)


# --------------------------------------------------------------------------- conceptual questions

# question id -> (options, sha256 of "<salt>|<id>|<answer>", hint shown after a wrong answer);
# each exercise module adds its own questions with add_questions
_SALT = "mini_scvi-exercises-v1"
_QUESTIONS: dict[str, tuple[str, str, str]] = {}


def add_questions(questions: dict[str, tuple[str, str, str]]) -> None:
    """Register an exercise module's multiple-choice questions (ids must be new)."""
    clash = set(questions) & set(_QUESTIONS)
    if clash:
        raise ValueError(f"question ids registered twice: {sorted(clash)}")
    _QUESTIONS.update(questions)


def _digest(question_id: str, answer: str) -> str:
    return hashlib.sha256(f"{_SALT}|{question_id}|{answer}".encode()).hexdigest()


def check_answer(question_id: str, answer) -> None:
    """Check a multiple-choice answer: ``answer`` is a letter such as ``'b'``."""
    if question_id not in _QUESTIONS:
        raise KeyError(f"unknown question id {question_id!r}; known: {sorted(_QUESTIONS)}")
    options, digest, hint = _QUESTIONS[question_id]
    choices = ", ".join(repr(o) for o in options)
    if answer is None:
        raise NotImplementedError(f"{question_id}: set `answer` to one of {choices}, then run this check again.")
    if not isinstance(answer, str) or answer.strip().lower() not in options or len(answer.strip()) != 1:
        _fail(question_id, f"`answer` must be one letter, one of {choices}; got {answer!r}.")
    if _digest(question_id, answer.strip().lower()) != digest:
        _fail(question_id, "not this one.", hint)
    _pass(question_id, "correct.")


