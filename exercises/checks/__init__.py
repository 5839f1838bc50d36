"""Automatic checks for the exercise notebooks (exercises/exNN_*.ipynb), one module per notebook.

Each ``check_*`` function takes the student's function, calls it on random and edge-case inputs and
compares the result with mini_scvi's own implementation (or, where mini_scvi has none, with a
trusted reference: scikit-learn's PCA, the moments of the negative binomial). It then either

* prints ``PASS: ...`` (and returns None), or
* raises ``AssertionError("FAIL: <what went wrong>. Hint: ...")``.

A check never prints the expected values, only where the function goes wrong and a hint that names
the idea to look at (or the chapter section), not the formula. A stub that still raises
``NotImplementedError`` makes the check raise ``NotImplementedError`` too, so a student notebook
that has not been worked on stops at exactly the exercise cells.

Conceptual questions are checked by ``check_answer(question_id, answer)``, which compares a salted
hash of the answer, so reading these files does not reveal the answers.

Every check seeds its own random numbers inside ``torch.random.fork_rng``: the result is the same
on every run, and the notebook's global random state is left as it was.

Layout: ``_common.py`` holds the shared PASS/FAIL machinery and the question registry;
``exNN.py`` holds the checkers (and questions) of ``exNN_*.ipynb``. The notebooks import from the
package (``from checks import check_kl_beta``), which re-exports every checker.
"""

from . import ex01, ex02, ex03, ex04, ex05, ex06, ex07, ex08
from ._common import _QUESTIONS, _digest, check_answer
from .ex01 import *  # noqa: F403
from .ex02 import *  # noqa: F403
from .ex03 import *  # noqa: F403
from .ex04 import *  # noqa: F403
from .ex05 import *  # noqa: F403
from .ex06 import *  # noqa: F403
from .ex07 import *  # noqa: F403
from .ex08 import *  # noqa: F403

_MODULES = (ex01, ex02, ex03, ex04, ex05, ex06, ex07, ex08)
__all__ = ["check_answer"] + [name for module in _MODULES for name in module.__all__]
